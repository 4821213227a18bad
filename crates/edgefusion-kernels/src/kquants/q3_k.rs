//! Q3_K: 3.4375 bits per weight. Sixteen sub-blocks of 16 weights, each `x = d·sc·q` with
//! `q` in `-4..4` (two low bits plus an inverted high bit) and a 6-bit signed `sc`.

use super::fit::{fit_scale_symmetric, importance, nearest_int, quantize_signed};
use super::q2_k::{pack_two_bit_levels, unpack_two_bit_levels};
use super::q8_k::BlockQ8K;
use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, super_blocks, KBlock, QK_K};
use crate::cpu::{self, Isa};
use crate::GgmlType;

/// `block_q3_K`: 32 + 64 + 12 + 2 = 110 bytes.
///
/// Weight `e` keeps its two low bits where Q2_K keeps them, and bit `e / 32` of
/// `hmask[e % 32]` *clear* means "subtract 4".
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales biased by 32: low nibbles in bytes 0-7 (scales 0-7 low half,
    /// 8-15 high half), top two bits of scale `j` at bits `2 (j / 4)` of byte `8 + j % 4`.
    pub scales: [u8; 12],
    /// f16 factor of the scales.
    pub d: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

impl KBlock for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3K;
}

fn unpack_scales(packed: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = (packed[j % 8] >> (4 * (j / 8))) & 0x0F;
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

fn pack_scales(scales: &[i32; 16]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for (j, &s) in scales.iter().enumerate() {
        let biased = (s + 32) as u8;
        packed[j % 8] |= (biased & 0x0F) << (4 * (j / 8));
        packed[8 + j % 4] |= (biased >> 4) << (2 * (j / 4));
    }
    packed
}

/// The 256 signed levels (`-4..4`) of one block, in weight order.
#[inline]
fn unpack_levels(block: &BlockQ3K) -> [i8; QK_K] {
    let low_bits = unpack_two_bit_levels(&block.qs);
    let mut levels = [0i8; QK_K];
    for (bit, (out, low)) in levels
        .chunks_exact_mut(32)
        .zip(low_bits.chunks_exact(32))
        .enumerate()
    {
        for ((level, &low), &mask) in out.iter_mut().zip(low).zip(&block.hmask) {
            // A clear high bit means "subtract 4".
            let minus_four = (((mask >> bit) & 1) ^ 1) << 2;
            *level = low as i8 - minus_four as i8;
        }
    }
    levels
}

/// Expands Q3_K blocks to floats (`out.len()` a multiple of 256).
pub fn dequantize_row_q3k(src: &[u8], out: &mut [f32]) {
    let n_blocks = super_blocks(out.len());
    for (block, out) in blocks::<BlockQ3K>(src, n_blocks)
        .iter()
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_to_f32(block.d);
        let scales = unpack_scales(&block.scales);
        let levels = unpack_levels(block);
        for ((sub_out, sub_levels), &scale) in out
            .chunks_exact_mut(16)
            .zip(levels.chunks_exact(16))
            .zip(&scales)
        {
            let step = d * scale as f32;
            for (y, &q) in sub_out.iter_mut().zip(sub_levels) {
                *y = step * q as f32;
            }
        }
    }
}

/// Reference quantizer: per sub-block symmetric scale search, then 6-bit signed scales.
pub fn quantize_row_q3k_ref(x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    for (x, block) in x
        .chunks_exact(QK_K)
        .zip(blocks_mut::<BlockQ3K>(out, n_blocks))
    {
        let mut levels = [0i8; QK_K];
        let mut weights = [0f32; 16];
        let mut sub_scales = [0f32; 16];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            importance(sub, &mut weights);
            sub_scales[j] = fit_scale_symmetric(sub, &weights, 4, &mut levels[16 * j..16 * j + 16]);
        }
        let mut scale_levels = [0i32; 16];
        let d = quantize_signed(&sub_scales, 32, &mut scale_levels);
        for (j, sub) in x.chunks_exact(16).enumerate() {
            let step = d * scale_levels[j] as f32;
            for (level, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(sub) {
                *level = if step != 0.0 {
                    nearest_int(v / step).clamp(-4, 3) as i8
                } else {
                    0
                };
            }
        }
        block.d = f32_to_f16(d);
        block.scales = pack_scales(&scale_levels);
        block.hmask = [0; QK_K / 8];
        let mut low_bits = [0u8; QK_K];
        for (e, &l) in levels.iter().enumerate() {
            // Stored as `l + 4` in 0..8: the high bit set means "no -4".
            let stored = (l + 4) as u8;
            block.hmask[e % 32] |= (stored >> 2) << (e / 32);
            low_bits[e] = stored & 3;
        }
        block.qs = pack_two_bit_levels(&low_bits);
    }
}

/// `Σ_j sc_j Σ q·q8` over one super-block.
#[inline]
fn block_sum(w: &BlockQ3K, a: &BlockQ8K) -> i32 {
    let scales = unpack_scales(&w.scales);
    let levels = unpack_levels(w);
    let mut total = 0i32;
    for ((sub_levels, q8), &scale) in levels
        .chunks_exact(16)
        .zip(a.qs.chunks_exact(16))
        .zip(&scales)
    {
        let dot: i32 = sub_levels
            .iter()
            .zip(q8)
            .map(|(&q, &x)| q as i32 * x as i32)
            .sum();
        total += scale as i32 * dot;
    }
    total
}

/// Scalar reference: `Σ w_i a_i` over `n` weights of a Q3_K row and a Q8_K row.
pub fn vec_dot_q3k_q8k_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let n_blocks = super_blocks(n);
    let mut sum = 0.0f32;
    for (w, a) in blocks::<BlockQ3K>(w, n_blocks)
        .iter()
        .zip(blocks::<BlockQ8K>(act, n_blocks))
    {
        sum += f16_to_f32(w.d) * a.scale() * block_sum(w, a) as f32;
    }
    sum
}

/// `Σ w_i a_i` over `n` weights (a multiple of 256) of a Q3_K row `w` and a Q8_K row `act`,
/// with the widest kernel this CPU runs (AVX2 on any x86 SIMD level).
pub fn vec_dot_q3k_q8k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: `cpu::isa()` only reports instruction sets detected on this CPU.
    unsafe { vec_dot_with(cpu::isa(), n, w, act) }
}

/// [`vec_dot_q3k_q8k`] with the kernel for `isa` (ISAs without a Q3_K kernel use the next
/// narrower one); panics if `isa` cannot run here.
pub fn vec_dot_q3k_q8k_on(isa: Isa, n: usize, w: &[u8], act: &[u8]) -> f32 {
    assert!(
        cpu::is_runnable(isa),
        "{} kernels cannot run on this CPU",
        isa.name()
    );
    // SAFETY: checked just above.
    unsafe { vec_dot_with(isa, n, w, act) }
}

/// # Safety
/// `isa` must be runnable on this CPU.
#[inline]
unsafe fn vec_dot_with(isa: Isa, n: usize, w: &[u8], act: &[u8]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => {
            let n_blocks = super_blocks(n);
            let w_blocks = blocks::<BlockQ3K>(w, n_blocks);
            let a_blocks = blocks::<BlockQ8K>(act, n_blocks);
            // SAFETY: the caller guarantees `isa`; each of these includes AVX2, FMA and F16C.
            unsafe { super::avx2::vec_dot_q3k_q8k(w_blocks, a_blocks) }
        }
        _ => vec_dot_q3k_q8k_scalar(n, w, act),
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8_k::{dequantize_row_q8k, quantize_row_q8k_scalar};
    use super::super::test_support::{abs_dot, cosine_vector, rmse, weight_like, XorShift};
    use super::*;

    /// SIMD and scalar sum the same integers in a different float order.
    const DOT_REL_TOLERANCE: f64 = 2e-6;

    fn random_blocks(n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut rng = XorShift(seed);
        let mut bytes = vec![0u8; n_blocks * 110];
        rng.fill_bytes(&mut bytes);
        for block in blocks_mut::<BlockQ3K>(&mut bytes, n_blocks) {
            block.d = f32_to_f16(rng.next_f32() * 0.01);
        }
        bytes
    }

    #[test]
    fn every_kernel_matches_scalar() {
        for (seed, n_blocks) in [(1u64, 1usize), (2, 2), (3, 3), (4, 6)] {
            let w = random_blocks(n_blocks, seed);
            let x = weight_like(n_blocks * QK_K, seed + 100);
            let mut act = vec![0u8; n_blocks * 292];
            quantize_row_q8k_scalar(&x, &mut act);
            let n = n_blocks * QK_K;
            let reference = vec_dot_q3k_q8k_scalar(n, &w, &act) as f64;
            let mut wf = vec![0f32; n];
            let mut af = vec![0f32; n];
            dequantize_row_q3k(&w, &mut wf);
            dequantize_row_q8k(&act, &mut af);
            let bound = DOT_REL_TOLERANCE * abs_dot(&wf, &af);
            for isa in cpu::available_isas() {
                let got = vec_dot_q3k_q8k_on(isa, n, &w, &act) as f64;
                assert!(
                    (got - reference).abs() <= bound,
                    "{}: {got} vs {reference} (bound {bound})",
                    isa.name()
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_block_integer_sums_are_exact() {
        let w = random_blocks(6, 97);
        let mut rng = XorShift(98);
        let x: Vec<f32> = (0..6 * QK_K).map(|_| rng.next_f32() * 5.0).collect();
        let mut act = vec![0u8; 6 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        if !cpu::detect().has_avx2() {
            return;
        }
        for (wb, ab) in blocks::<BlockQ3K>(&w, 6)
            .iter()
            .zip(blocks::<BlockQ8K>(&act, 6))
        {
            // SAFETY: AVX2 (with FMA, F16C) detected just above.
            let got = unsafe { super::super::avx2::q3k_block_sum(wb, ab) };
            assert_eq!(got, block_sum(wb, ab));
        }
    }

    /// Eight levels per 16-weight sub-block: on the cosine vector (amax ≈ 2.1 → step ≈ 0.53,
    /// step/√12 ≈ 0.15); the search reaches 0.154.
    const Q3K_RMSE_LIMIT: f32 = 0.16;

    #[test]
    fn quantizer_meets_rmse_limit_on_fixed_vector() {
        let x = cosine_vector(4 * QK_K, 0.0);
        let mut q = vec![0u8; 4 * 110];
        quantize_row_q3k_ref(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row_q3k(&q, &mut y);
        let err = rmse(&x, &y);
        assert!(err < Q3K_RMSE_LIMIT, "Q3_K rmse {err}");
    }

    #[test]
    fn scale_packing_round_trips() {
        let scales: [i32; 16] = std::array::from_fn(|j| (j as i32 * 5) % 64 - 32);
        let unpacked = unpack_scales(&pack_scales(&scales));
        for (a, b) in scales.iter().zip(unpacked) {
            assert_eq!(*a, b as i32);
        }
    }

    #[test]
    fn scalar_dot_equals_dot_of_dequantized_rows() {
        let mut rng = XorShift(41);
        let mut w = vec![0u8; 3 * 110];
        rng.fill_bytes(&mut w);
        for block in blocks_mut::<BlockQ3K>(&mut w, 3) {
            block.d = f32_to_f16(-0.004);
        }
        let x = weight_like(3 * QK_K, 42);
        let mut act = vec![0u8; 3 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let mut wf = vec![0f32; 3 * QK_K];
        let mut af = vec![0f32; 3 * QK_K];
        dequantize_row_q3k(&w, &mut wf);
        dequantize_row_q8k(&act, &mut af);
        let exact: f64 = wf.iter().zip(&af).map(|(a, b)| *a as f64 * *b as f64).sum();
        let got = vec_dot_q3k_q8k(3 * QK_K, &w, &act) as f64;
        assert!(
            (got - exact).abs() <= 1e-5 * abs_dot(&wf, &af),
            "{got} vs {exact}"
        );
    }
}
