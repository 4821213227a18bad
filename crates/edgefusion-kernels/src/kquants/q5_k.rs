//! Q5_K: 5.5 bits per weight. Q4_K's layout plus one high bit per weight: eight sub-blocks
//! of 32, each `x = d·sc·q - dmin·m` with a 5-bit `q` and 6-bit `sc`, `m`.

use super::fit::{fit_scale_offset, importance, nearest_int, quantize_unsigned};
use super::q8_k::BlockQ8K;
use super::{
    blocks, blocks_mut, f16_to_f32, f32_to_f16, pack_scale_min_k4, super_blocks,
    unpack_scale_min_k4, KBlock, K_SCALE_SIZE, QK_K,
};
use crate::cpu::{self, Isa};
use crate::GgmlType;

/// `block_q5_K`: 2 + 2 + 12 + 32 + 128 = 176 bytes.
///
/// Weight `e` keeps its low nibble where Q4_K keeps it and its fifth bit at bit `e / 32`
/// of `qh[e % 32]`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

impl KBlock for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
}

/// The 256 unsigned levels (`0..32`) of one block, in weight order.
#[inline]
fn unpack_levels(block: &BlockQ5K) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    for (chunk, (qs, out)) in block
        .qs
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(64))
        .enumerate()
    {
        let (low_out, high_out) = out.split_at_mut(32);
        let (low_bit, high_bit) = (2 * chunk, 2 * chunk + 1);
        for (((low, high), &q), &h) in low_out.iter_mut().zip(high_out).zip(qs).zip(&block.qh) {
            *low = (q & 0x0F) | (((h >> low_bit) & 1) << 4);
            *high = (q >> 4) | (((h >> high_bit) & 1) << 4);
        }
    }
    levels
}

/// Expands Q5_K blocks to floats (`out.len()` a multiple of 256).
pub fn dequantize_row_q5k(src: &[u8], out: &mut [f32]) {
    let n_blocks = super_blocks(out.len());
    for (block, out) in blocks::<BlockQ5K>(src, n_blocks)
        .iter()
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_to_f32(block.d);
        let dmin = f16_to_f32(block.dmin);
        let (scales, mins) = unpack_scale_min_k4(&block.scales);
        let levels = unpack_levels(block);
        for (j, (sub_out, sub_levels)) in out
            .chunks_exact_mut(32)
            .zip(levels.chunks_exact(32))
            .enumerate()
        {
            let step = d * scales[j] as f32;
            let offset = dmin * mins[j] as f32;
            for (y, &q) in sub_out.iter_mut().zip(sub_levels) {
                *y = step * q as f32 - offset;
            }
        }
    }
}

/// Reference quantizer: per sub-block scale/offset search, then 6-bit scales and mins.
pub fn quantize_row_q5k_ref(x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    for (x, block) in x
        .chunks_exact(QK_K)
        .zip(blocks_mut::<BlockQ5K>(out, n_blocks))
    {
        let mut levels = [0u8; QK_K];
        let mut weights = [0f32; 32];
        let mut sub_scales = [0f32; 8];
        let mut sub_offsets = [0f32; 8];
        for (j, sub) in x.chunks_exact(32).enumerate() {
            importance(sub, &mut weights);
            let (scale, offset) =
                fit_scale_offset(sub, &weights, 31, &mut levels[32 * j..32 * j + 32]);
            sub_scales[j] = scale;
            sub_offsets[j] = offset;
        }
        let mut scale_levels = [0u8; 8];
        let mut min_levels = [0u8; 8];
        let d = quantize_unsigned(&sub_scales, 63, &mut scale_levels);
        let dmin = quantize_unsigned(&sub_offsets, 63, &mut min_levels);
        for (j, sub) in x.chunks_exact(32).enumerate() {
            let step = d * scale_levels[j] as f32;
            let offset = dmin * min_levels[j] as f32;
            for (level, &v) in levels[32 * j..32 * j + 32].iter_mut().zip(sub) {
                *level = if step > 0.0 {
                    nearest_int((v + offset) / step).clamp(0, 31) as u8
                } else {
                    0
                };
            }
        }
        block.d = f32_to_f16(d);
        block.dmin = f32_to_f16(dmin);
        block.scales = pack_scale_min_k4(&scale_levels, &min_levels);
        block.qh = [0; QK_K / 8];
        block.qs = [0; QK_K / 2];
        for (e, &l) in levels.iter().enumerate() {
            let nibble = l & 0x0F;
            block.qs[32 * (e / 64) + e % 32] |= if e % 64 < 32 { nibble } else { nibble << 4 };
            block.qh[e % 32] |= (l >> 4) << (e / 32);
        }
    }
}

/// `(Σ_j sc_j Σ q·q8, Σ_j m_j Σ q8)` over one super-block.
#[inline]
fn block_sums(w: &BlockQ5K, a: &BlockQ8K) -> (i32, i32) {
    let (scales, mins) = unpack_scale_min_k4(&w.scales);
    let levels = unpack_levels(w);
    let mut scaled = 0i32;
    let mut offsets = 0i32;
    for (j, (sub_levels, q8)) in levels
        .chunks_exact(32)
        .zip(a.qs.chunks_exact(32))
        .enumerate()
    {
        let dot: i32 = sub_levels
            .iter()
            .zip(q8)
            .map(|(&q, &x)| q as i32 * x as i32)
            .sum();
        scaled += scales[j] as i32 * dot;
        offsets += mins[j] as i32 * (a.bsum(2 * j) as i32 + a.bsum(2 * j + 1) as i32);
    }
    (scaled, offsets)
}

/// Scalar reference: `Σ w_i a_i` over `n` weights of a Q5_K row and a Q8_K row.
pub fn vec_dot_q5k_q8k_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let n_blocks = super_blocks(n);
    let mut sum = 0.0f32;
    for (w, a) in blocks::<BlockQ5K>(w, n_blocks)
        .iter()
        .zip(blocks::<BlockQ8K>(act, n_blocks))
    {
        let (scaled, offsets) = block_sums(w, a);
        let d8 = a.scale();
        sum += f16_to_f32(w.d) * d8 * scaled as f32 - f16_to_f32(w.dmin) * d8 * offsets as f32;
    }
    sum
}

/// `Σ w_i a_i` over `n` weights (a multiple of 256) of a Q5_K row `w` and a Q8_K row `act`,
/// with the widest kernel this CPU runs (AVX2 on any x86 SIMD level).
pub fn vec_dot_q5k_q8k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: `cpu::isa()` only reports instruction sets detected on this CPU.
    unsafe { vec_dot_with(cpu::isa(), n, w, act) }
}

/// [`vec_dot_q5k_q8k`] with the kernel for `isa` (ISAs without a Q5_K kernel use the next
/// narrower one); panics if `isa` cannot run here.
pub fn vec_dot_q5k_q8k_on(isa: Isa, n: usize, w: &[u8], act: &[u8]) -> f32 {
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
            let w_blocks = blocks::<BlockQ5K>(w, n_blocks);
            let a_blocks = blocks::<BlockQ8K>(act, n_blocks);
            // SAFETY: the caller guarantees `isa`; each of these includes AVX2, FMA and F16C.
            unsafe { super::avx2::vec_dot_q5k_q8k(w_blocks, a_blocks) }
        }
        _ => vec_dot_q5k_q8k_scalar(n, w, act),
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
        let mut bytes = vec![0u8; n_blocks * 176];
        rng.fill_bytes(&mut bytes);
        for block in blocks_mut::<BlockQ5K>(&mut bytes, n_blocks) {
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
            let reference = vec_dot_q5k_q8k_scalar(n, &w, &act) as f64;
            let mut wf = vec![0f32; n];
            let mut af = vec![0f32; n];
            dequantize_row_q5k(&w, &mut wf);
            dequantize_row_q8k(&act, &mut af);
            let bound = DOT_REL_TOLERANCE * abs_dot(&wf, &af);
            for isa in cpu::available_isas() {
                let got = vec_dot_q5k_q8k_on(isa, n, &w, &act) as f64;
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
        for (wb, ab) in blocks::<BlockQ5K>(&w, 6)
            .iter()
            .zip(blocks::<BlockQ8K>(&act, 6))
        {
            // SAFETY: AVX2 (with FMA, F16C) detected just above.
            let got = unsafe { super::super::avx2::q5k_block_sums(wb, ab) };
            assert_eq!(got, block_sums(wb, ab));
        }
    }

    /// 32 levels over a 32-weight sub-block's range: on the cosine vector (range ≈ 4.0
    /// → step ≈ 0.13, step/√12 ≈ 0.037); the search reaches 0.034.
    const Q5K_RMSE_LIMIT: f32 = 0.036;

    #[test]
    fn quantizer_meets_rmse_limit_on_fixed_vector() {
        let x = cosine_vector(4 * QK_K, 0.0);
        let mut q = vec![0u8; 4 * 176];
        quantize_row_q5k_ref(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row_q5k(&q, &mut y);
        let err = rmse(&x, &y);
        assert!(err < Q5K_RMSE_LIMIT, "Q5_K rmse {err}");
    }

    #[test]
    fn scalar_dot_equals_dot_of_dequantized_rows() {
        let mut rng = XorShift(51);
        let mut w = vec![0u8; 3 * 176];
        rng.fill_bytes(&mut w);
        for block in blocks_mut::<BlockQ5K>(&mut w, 3) {
            block.d = f32_to_f16(0.002);
            block.dmin = f32_to_f16(0.01);
        }
        let x = weight_like(3 * QK_K, 52);
        let mut act = vec![0u8; 3 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let mut wf = vec![0f32; 3 * QK_K];
        let mut af = vec![0f32; 3 * QK_K];
        dequantize_row_q5k(&w, &mut wf);
        dequantize_row_q8k(&act, &mut af);
        let exact: f64 = wf.iter().zip(&af).map(|(a, b)| *a as f64 * *b as f64).sum();
        let got = vec_dot_q5k_q8k(3 * QK_K, &w, &act) as f64;
        assert!(
            (got - exact).abs() <= 1e-5 * abs_dot(&wf, &af),
            "{got} vs {exact}"
        );
    }
}
