//! Q2_K: 2.625 bits per weight. Sixteen sub-blocks of 16 weights, each
//! `x = d·sc·q - dmin·m` with a 2-bit `q`, 4-bit `sc` and `m`, f16 `d` and `dmin`.

use super::fit::{fit_scale_offset, importance, nearest_int, quantize_unsigned};
use super::q8_k::BlockQ8K;
use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, super_blocks, KBlock, QK_K};
use crate::cpu::{self, Isa};
use crate::GgmlType;

/// `block_q2_K`: 16 + 64 + 2 + 2 = 84 bytes.
///
/// Weight `e = 128 h + 32 k + l` (`h` < 2, `k` < 4, `l` < 32) sits at bits `2k..2k+2` of
/// `qs[32 h + l]`; its sub-block is `e / 16`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ2K {
    /// Low nibble: scale; high nibble: min; one byte per sub-block.
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    /// f16 factor of the scales.
    pub d: [u8; 2],
    /// f16 factor of the mins.
    pub dmin: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

impl KBlock for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2K;
}

/// Two-bit field of weight `e` in a Q2_K / Q3_K `qs` array.
#[cfg(test)]
fn two_bit_level(qs: &[u8; QK_K / 4], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// All 256 two-bit fields of a Q2_K / Q3_K `qs` array, in weight order.
#[inline]
pub(crate) fn unpack_two_bit_levels(qs: &[u8; QK_K / 4]) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    for (qs, out) in qs.chunks_exact(32).zip(levels.chunks_exact_mut(128)) {
        for (k, out) in out.chunks_exact_mut(32).enumerate() {
            for (level, &q) in out.iter_mut().zip(qs) {
                *level = (q >> (2 * k)) & 3;
            }
        }
    }
    levels
}

/// Packs 256 two-bit levels in the Q2_K / Q3_K `qs` order.
pub(crate) fn pack_two_bit_levels(levels: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for h in 0..2 {
        for l in 0..32 {
            let e = 128 * h + l;
            qs[32 * h + l] =
                levels[e] | (levels[e + 32] << 2) | (levels[e + 64] << 4) | (levels[e + 96] << 6);
        }
    }
    qs
}

/// Expands Q2_K blocks to floats (`out.len()` a multiple of 256).
pub fn dequantize_row_q2k(src: &[u8], out: &mut [f32]) {
    let n_blocks = super_blocks(out.len());
    for (block, out) in blocks::<BlockQ2K>(src, n_blocks)
        .iter()
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_to_f32(block.d);
        let dmin = f16_to_f32(block.dmin);
        let levels = unpack_two_bit_levels(&block.qs);
        for ((sub_out, sub_levels), &scale_min) in out
            .chunks_exact_mut(16)
            .zip(levels.chunks_exact(16))
            .zip(&block.scales)
        {
            let step = d * (scale_min & 0x0F) as f32;
            let offset = dmin * (scale_min >> 4) as f32;
            for (y, &q) in sub_out.iter_mut().zip(sub_levels) {
                *y = step * q as f32 - offset;
            }
        }
    }
}

/// Reference quantizer: per sub-block scale/offset search, then 4-bit scales and mins.
pub fn quantize_row_q2k_ref(x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    for (x, block) in x
        .chunks_exact(QK_K)
        .zip(blocks_mut::<BlockQ2K>(out, n_blocks))
    {
        let mut levels = [0u8; QK_K];
        let mut weights = [0f32; 16];
        let mut sub_scales = [0f32; 16];
        let mut sub_offsets = [0f32; 16];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            importance(sub, &mut weights);
            let (scale, offset) =
                fit_scale_offset(sub, &weights, 3, &mut levels[16 * j..16 * j + 16]);
            sub_scales[j] = scale;
            sub_offsets[j] = offset;
        }
        let mut scale_levels = [0u8; 16];
        let mut min_levels = [0u8; 16];
        let d = quantize_unsigned(&sub_scales, 15, &mut scale_levels);
        let dmin = quantize_unsigned(&sub_offsets, 15, &mut min_levels);
        for (j, sub) in x.chunks_exact(16).enumerate() {
            let step = d * scale_levels[j] as f32;
            let offset = dmin * min_levels[j] as f32;
            for (level, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(sub) {
                *level = if step > 0.0 {
                    nearest_int((v + offset) / step).clamp(0, 3) as u8
                } else {
                    0
                };
            }
            block.scales[j] = scale_levels[j] | (min_levels[j] << 4);
        }
        block.d = f32_to_f16(d);
        block.dmin = f32_to_f16(dmin);
        block.qs = pack_two_bit_levels(&levels);
    }
}

/// `(Σ_j sc_j Σ q·q8, Σ_j m_j Σ q8)` over one super-block.
#[inline]
fn block_sums(w: &BlockQ2K, a: &BlockQ8K) -> (i32, i32) {
    let levels = unpack_two_bit_levels(&w.qs);
    let mut scaled = 0i32;
    let mut offsets = 0i32;
    for (j, (sub_levels, q8)) in levels
        .chunks_exact(16)
        .zip(a.qs.chunks_exact(16))
        .enumerate()
    {
        let dot: i32 = sub_levels
            .iter()
            .zip(q8)
            .map(|(&q, &x)| q as i32 * x as i32)
            .sum();
        scaled += (w.scales[j] & 0x0F) as i32 * dot;
        offsets += (w.scales[j] >> 4) as i32 * a.bsum(j) as i32;
    }
    (scaled, offsets)
}

/// Scalar reference: `Σ w_i a_i` over `n` weights of a Q2_K row and a Q8_K row.
pub fn vec_dot_q2k_q8k_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let n_blocks = super_blocks(n);
    let mut sum = 0.0f32;
    for (w, a) in blocks::<BlockQ2K>(w, n_blocks)
        .iter()
        .zip(blocks::<BlockQ8K>(act, n_blocks))
    {
        let (scaled, offsets) = block_sums(w, a);
        let d8 = a.scale();
        sum += f16_to_f32(w.d) * d8 * scaled as f32 - f16_to_f32(w.dmin) * d8 * offsets as f32;
    }
    sum
}

/// `Σ w_i a_i` over `n` weights (a multiple of 256) of a Q2_K row `w` and a Q8_K row `act`,
/// with the widest kernel this CPU runs (AVX2 on any x86 SIMD level).
pub fn vec_dot_q2k_q8k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: `cpu::isa()` only reports instruction sets detected on this CPU.
    unsafe { vec_dot_with(cpu::isa(), n, w, act) }
}

/// [`vec_dot_q2k_q8k`] with the kernel for `isa` (ISAs without a Q2_K kernel use the next
/// narrower one); panics if `isa` cannot run here.
pub fn vec_dot_q2k_q8k_on(isa: Isa, n: usize, w: &[u8], act: &[u8]) -> f32 {
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
            let w_blocks = blocks::<BlockQ2K>(w, n_blocks);
            let a_blocks = blocks::<BlockQ8K>(act, n_blocks);
            // SAFETY: the caller guarantees `isa`; each of these includes AVX2, FMA and F16C.
            unsafe { super::avx2::vec_dot_q2k_q8k(w_blocks, a_blocks) }
        }
        _ => vec_dot_q2k_q8k_scalar(n, w, act),
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
        let mut bytes = vec![0u8; n_blocks * 84];
        rng.fill_bytes(&mut bytes);
        for block in blocks_mut::<BlockQ2K>(&mut bytes, n_blocks) {
            block.d = f32_to_f16(rng.next_f32() * 0.01);
            block.dmin = f32_to_f16(rng.next_f32() * 0.01);
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
            let reference = vec_dot_q2k_q8k_scalar(n, &w, &act) as f64;
            let mut wf = vec![0f32; n];
            let mut af = vec![0f32; n];
            dequantize_row_q2k(&w, &mut wf);
            dequantize_row_q8k(&act, &mut af);
            let bound = DOT_REL_TOLERANCE * abs_dot(&wf, &af);
            for isa in cpu::available_isas() {
                let got = vec_dot_q2k_q8k_on(isa, n, &w, &act) as f64;
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
        for (wb, ab) in blocks::<BlockQ2K>(&w, 6)
            .iter()
            .zip(blocks::<BlockQ8K>(&act, 6))
        {
            // SAFETY: AVX2 (with FMA, F16C) detected just above.
            let got = unsafe { super::super::avx2::q2k_block_sums(wb, ab) };
            assert_eq!(got, block_sums(wb, ab));
        }
    }

    /// Four levels per 16-weight sub-block: on the cosine vector (sub-block range ≈ 4
    /// → step ≈ 1.3) plain rounding gives step/√12 ≈ 0.39; the search reaches 0.289.
    const Q2K_RMSE_LIMIT: f32 = 0.30;

    #[test]
    fn quantizer_meets_rmse_limit_on_fixed_vector() {
        let x = cosine_vector(4 * QK_K, 0.0);
        let mut q = vec![0u8; 4 * 84];
        quantize_row_q2k_ref(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row_q2k(&q, &mut y);
        let err = rmse(&x, &y);
        assert!(err < Q2K_RMSE_LIMIT, "Q2_K rmse {err}");
    }

    #[test]
    fn two_bit_packing_round_trips() {
        let mut rng = XorShift(3);
        let levels: [u8; QK_K] = std::array::from_fn(|_| (rng.next_u64() >> 62) as u8);
        let qs = pack_two_bit_levels(&levels);
        assert_eq!(unpack_two_bit_levels(&qs), levels);
        for (e, &l) in levels.iter().enumerate() {
            assert_eq!(two_bit_level(&qs, e), l);
        }
    }

    #[test]
    fn scalar_dot_equals_dot_of_dequantized_rows() {
        let mut rng = XorShift(31);
        let mut w = vec![0u8; 3 * 84];
        rng.fill_bytes(&mut w);
        for block in blocks_mut::<BlockQ2K>(&mut w, 3) {
            block.d = f32_to_f16(0.01);
            block.dmin = f32_to_f16(0.003);
        }
        let x = weight_like(3 * QK_K, 32);
        let mut act = vec![0u8; 3 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let mut wf = vec![0f32; 3 * QK_K];
        let mut af = vec![0f32; 3 * QK_K];
        dequantize_row_q2k(&w, &mut wf);
        dequantize_row_q8k(&act, &mut af);
        let exact: f64 = wf.iter().zip(&af).map(|(a, b)| *a as f64 * *b as f64).sum();
        let got = vec_dot_q2k_q8k(3 * QK_K, &w, &act) as f64;
        assert!(
            (got - exact).abs() <= 1e-5 * abs_dot(&wf, &af),
            "{got} vs {exact}"
        );
    }
}
