//! Q8_K: the activation format every k-quant dot product pairs with.
//!
//! One super-block of 256 activations: an f32 step `d`, 256 signed bytes, and the sums of
//! each run of 16 bytes (`bsums`), which let the asymmetric formats apply their mins
//! without touching the quants again.

use super::fit::nearest_int;
use super::{blocks, blocks_mut, super_blocks, KBlock, QK_K};
use crate::cpu::{self, Isa};
use crate::GgmlType;

/// `block_q8_K`: 4 + 256 + 32 = 292 bytes.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8K {
    /// f32 step, little-endian.
    pub d: [u8; 4],
    /// Quants in `-127..=127`.
    pub qs: [i8; QK_K],
    /// i16 little-endian sums of `qs[16 j .. 16 j + 16]`.
    pub bsums: [[u8; 2]; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

impl KBlock for BlockQ8K {
    const TYPE: GgmlType = GgmlType::Q8K;
}

impl BlockQ8K {
    #[inline]
    pub fn scale(&self) -> f32 {
        f32::from_le_bytes(self.d)
    }

    #[inline]
    pub fn bsum(&self, group: usize) -> i16 {
        i16::from_le_bytes(self.bsums[group])
    }
}

/// Quantizes `x` (a multiple of 256 long) into Q8_K blocks in `out`, using the best kernel
/// this machine has. Every kernel produces identical bytes.
pub fn quantize_row_q8k(x: &[f32], out: &mut [u8]) {
    quantize_row_q8k_with(cpu::isa(), x, out)
}

/// [`quantize_row_q8k`] with the kernel for `isa`; panics if `isa` cannot run here.
pub fn quantize_row_q8k_on(isa: Isa, x: &[f32], out: &mut [u8]) {
    assert!(
        cpu::is_runnable(isa),
        "{} kernels cannot run on this CPU",
        isa.name()
    );
    quantize_row_q8k_with(isa, x, out)
}

fn quantize_row_q8k_with(isa: Isa, x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    let out_blocks = blocks_mut::<BlockQ8K>(out, n_blocks);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => {
            // SAFETY: `isa` comes from `cpu::isa()` or passed `cpu::is_runnable`, so AVX2, FMA and
            // F16C are present.
            unsafe { super::avx2::quantize_row_q8k(x, out_blocks) }
        }
        _ => quantize_blocks_scalar(x, out_blocks),
    }
}

/// The scalar reference of [`quantize_row_q8k`].
pub fn quantize_row_q8k_scalar(x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    quantize_blocks_scalar(x, blocks_mut::<BlockQ8K>(out, n_blocks));
}

/// `1 / step` for a block whose largest magnitude is `amax`, or `None` when the block
/// must be stored as all zeros (zero, subnormal-tiny or non-finite range).
#[inline]
pub(crate) fn inverse_step(amax: f32) -> Option<f32> {
    let inv = 127.0 / amax;
    (amax > 0.0 && inv.is_finite()).then_some(inv)
}

fn quantize_blocks_scalar(x: &[f32], out: &mut [BlockQ8K]) {
    for (block, out) in x.chunks_exact(QK_K).zip(out) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let Some(inv) = inverse_step(amax) else {
            *out = BlockQ8K {
                d: [0; 4],
                qs: [0; QK_K],
                bsums: [[0; 2]; QK_K / 16],
            };
            continue;
        };
        for (q, &v) in out.qs.iter_mut().zip(block) {
            *q = nearest_int(inv * v).clamp(-127, 127) as i8;
        }
        for (group, sum) in out.bsums.iter_mut().enumerate() {
            let total: i16 = out.qs[16 * group..16 * group + 16]
                .iter()
                .map(|&q| q as i16)
                .sum();
            *sum = total.to_le_bytes();
        }
        out.d = (1.0 / inv).to_le_bytes();
    }
}

/// Expands Q8_K blocks back to floats (`out.len()` a multiple of 256).
pub fn dequantize_row_q8k(src: &[u8], out: &mut [f32]) {
    let n_blocks = super_blocks(out.len());
    for (block, out) in blocks::<BlockQ8K>(src, n_blocks)
        .iter()
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = block.scale();
        for (y, &q) in out.iter_mut().zip(&block.qs) {
            *y = d * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{cosine_vector, rmse, weight_like, XorShift};
    use super::*;

    /// Q8_K rounds to the nearest of 255 levels: RMSE ≤ step / √12 ≈ 0.0029·amax; on the
    /// cosine vector (amax ≈ 2.1) that is ≈ 0.0047.
    const Q8K_RMSE_LIMIT: f32 = 0.005;

    #[test]
    fn quantize_meets_rmse_limit_on_fixed_vector() {
        let x = cosine_vector(4 * QK_K, 0.0);
        let mut q = vec![0u8; 4 * 292];
        quantize_row_q8k_scalar(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row_q8k(&q, &mut y);
        let err = rmse(&x, &y);
        assert!(err < Q8K_RMSE_LIMIT, "Q8_K rmse {err}");
    }

    #[test]
    fn bsums_and_extremes_are_consistent() {
        let x = weight_like(2 * QK_K, 5);
        let mut q = vec![0u8; 2 * 292];
        quantize_row_q8k_scalar(&x, &mut q);
        for block in blocks::<BlockQ8K>(&q, 2) {
            assert_eq!(block.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
            for g in 0..16 {
                let sum: i32 = block.qs[16 * g..16 * g + 16]
                    .iter()
                    .map(|&q| q as i32)
                    .sum();
                assert_eq!(block.bsum(g) as i32, sum);
            }
        }
    }

    #[test]
    fn zero_and_tiny_blocks_quantize_to_zero() {
        let mut x = vec![0f32; 2 * QK_K];
        x[QK_K + 3] = f32::from_bits(1); // smallest subnormal: 127 / it overflows
        let mut q = vec![0xAAu8; 2 * 292];
        quantize_row_q8k_scalar(&x, &mut q);
        assert!(q.iter().all(|&b| b == 0));
    }

    #[test]
    fn every_kernel_writes_identical_bytes() {
        let mut rng = XorShift(0x5eed);
        for n_blocks in [1usize, 2, 3, 6] {
            let mut x: Vec<f32> = (0..n_blocks * QK_K).map(|_| rng.next_f32() * 3.0).collect();
            // Exact ties and a zero block exercise rounding and the zero path.
            x[7] = 0.5 * (1.0 / (127.0 / 3.0));
            if n_blocks > 1 {
                x[QK_K..2 * QK_K].fill(0.0);
            }
            let mut reference = vec![0u8; n_blocks * 292];
            quantize_row_q8k_scalar(&x, &mut reference);
            for isa in cpu::available_isas() {
                let mut got = vec![0u8; n_blocks * 292];
                quantize_row_q8k_on(isa, &x, &mut got);
                assert!(got == reference, "{} differs from scalar", isa.name());
            }
        }
    }
}
