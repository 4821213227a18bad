//! Q4_K: 4.5 bits per weight. Eight sub-blocks of 32 weights, each `x = d·sc·q - dmin·m`
//! with a 4-bit `q`, 6-bit `sc` and `m`, and f16 `d`, `dmin` per super-block.

use super::fit::{fit_scale_offset, importance, nearest_int, quantize_unsigned};
use super::q8_k::BlockQ8K;
use super::{
    blocks, blocks_mut, f16_to_f32, f32_to_f16, pack_scale_min_k4, super_blocks,
    unpack_scale_min_k4, KBlock, K_SCALE_SIZE, QK_K,
};
use crate::cpu::{self, Isa};
use crate::GgmlType;

/// `block_q4_K`: 2 + 2 + 12 + 128 = 144 bytes.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4K {
    /// f16 factor of the sub-block scales.
    pub d: [u8; 2],
    /// f16 factor of the sub-block mins.
    pub dmin: [u8; 2],
    /// Six-bit scales and mins, packed as described at `unpack_scale_min_k4`.
    pub scales: [u8; K_SCALE_SIZE],
    /// Byte `32 c + l` holds weight `64 c + l` in its low nibble and `64 c + 32 + l` in its
    /// high nibble.
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

impl KBlock for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
}

/// Expands Q4_K blocks to floats (`out.len()` a multiple of 256, `src` at least that many
/// blocks).
pub fn dequantize_row_q4k(src: &[u8], out: &mut [f32]) {
    let n_blocks = super_blocks(out.len());
    for (block, out) in blocks::<BlockQ4K>(src, n_blocks)
        .iter()
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_to_f32(block.d);
        let dmin = f16_to_f32(block.dmin);
        let (scales, mins) = unpack_scale_min_k4(&block.scales);
        for (chunk, (qs, out)) in block
            .qs
            .chunks_exact(32)
            .zip(out.chunks_exact_mut(64))
            .enumerate()
        {
            let (low_out, high_out) = out.split_at_mut(32);
            let d_low = d * scales[2 * chunk] as f32;
            let m_low = dmin * mins[2 * chunk] as f32;
            let d_high = d * scales[2 * chunk + 1] as f32;
            let m_high = dmin * mins[2 * chunk + 1] as f32;
            for ((&q, y_low), y_high) in qs.iter().zip(low_out).zip(high_out) {
                *y_low = d_low * (q & 0x0F) as f32 - m_low;
                *y_high = d_high * (q >> 4) as f32 - m_high;
            }
        }
    }
}

/// Reference quantizer: per sub-block scale/offset search, then 6-bit scales and mins.
pub fn quantize_row_q4k_ref(x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    for (x, block) in x
        .chunks_exact(QK_K)
        .zip(blocks_mut::<BlockQ4K>(out, n_blocks))
    {
        let mut levels = [0u8; QK_K];
        let mut weights = [0f32; 32];
        let mut sub_scales = [0f32; 8];
        let mut sub_offsets = [0f32; 8];
        for (j, sub) in x.chunks_exact(32).enumerate() {
            importance(sub, &mut weights);
            let (scale, offset) =
                fit_scale_offset(sub, &weights, 15, &mut levels[32 * j..32 * j + 32]);
            sub_scales[j] = scale;
            sub_offsets[j] = offset;
        }
        let mut scale_levels = [0u8; 8];
        let mut min_levels = [0u8; 8];
        let d = quantize_unsigned(&sub_scales, 63, &mut scale_levels);
        let dmin = quantize_unsigned(&sub_offsets, 63, &mut min_levels);
        // Re-round every weight against the scales as stored.
        for (j, sub) in x.chunks_exact(32).enumerate() {
            let step = d * scale_levels[j] as f32;
            let offset = dmin * min_levels[j] as f32;
            for (level, &v) in levels[32 * j..32 * j + 32].iter_mut().zip(sub) {
                *level = if step > 0.0 {
                    nearest_int((v + offset) / step).clamp(0, 15) as u8
                } else {
                    0
                };
            }
        }
        block.d = f32_to_f16(d);
        block.dmin = f32_to_f16(dmin);
        block.scales = pack_scale_min_k4(&scale_levels, &min_levels);
        for (chunk, qs) in block.qs.chunks_exact_mut(32).enumerate() {
            for (l, q) in qs.iter_mut().enumerate() {
                *q = levels[64 * chunk + l] | (levels[64 * chunk + 32 + l] << 4);
            }
        }
    }
}

/// The two integer sums of one super-block against one Q8_K block per 64 weights (chunk `c`
/// = sub-blocks `2c`, `2c + 1`): `(Σ sc·q·q8, Σ m·Σ q8)` of each chunk.
#[inline]
pub(crate) fn chunk_sums(w: &BlockQ4K, a: &BlockQ8K) -> ([i32; 4], [i32; 4]) {
    let (scales, mins) = unpack_scale_min_k4(&w.scales);
    let mut scaled = [0i32; 4];
    let mut offsets = [0i32; 4];
    for (chunk, (qs, q8)) in w.qs.chunks_exact(32).zip(a.qs.chunks_exact(64)).enumerate() {
        let (q8_low, q8_high) = q8.split_at(32);
        let low: i32 = qs
            .iter()
            .zip(q8_low)
            .map(|(&q, &x)| (q & 0x0F) as i32 * x as i32)
            .sum();
        let high: i32 = qs
            .iter()
            .zip(q8_high)
            .map(|(&q, &x)| (q >> 4) as i32 * x as i32)
            .sum();
        scaled[chunk] = scales[2 * chunk] as i32 * low + scales[2 * chunk + 1] as i32 * high;
        let (j0, j1) = (2 * chunk, 2 * chunk + 1);
        offsets[chunk] = mins[j0] as i32 * (a.bsum(2 * j0) as i32 + a.bsum(2 * j0 + 1) as i32)
            + mins[j1] as i32 * (a.bsum(2 * j1) as i32 + a.bsum(2 * j1 + 1) as i32);
    }
    (scaled, offsets)
}

/// The two integer sums of one super-block against one Q8_K block:
/// `(Σ_j sc_j Σ q·q8, Σ_j m_j Σ q8)`, so the dot is `d·d8·first - dmin·d8·second`.
#[inline]
pub(crate) fn block_sums(w: &BlockQ4K, a: &BlockQ8K) -> (i32, i32) {
    let (scaled, offsets) = chunk_sums(w, a);
    (scaled.iter().sum(), offsets.iter().sum())
}

/// Scalar reference: `Σ w_i a_i` over `n` weights of a Q4_K row and a Q8_K row.
pub fn vec_dot_q4k_q8k_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let n_blocks = super_blocks(n);
    let mut sum = 0.0f32;
    for (w, a) in blocks::<BlockQ4K>(w, n_blocks)
        .iter()
        .zip(blocks::<BlockQ8K>(act, n_blocks))
    {
        let (scaled, offsets) = block_sums(w, a);
        let d8 = a.scale();
        sum += f16_to_f32(w.d) * d8 * scaled as f32 - f16_to_f32(w.dmin) * d8 * offsets as f32;
    }
    sum
}

/// `Σ w_i a_i` over `n` weights (a multiple of 256) of a Q4_K row `w` and a Q8_K row `act`,
/// with the widest kernel this CPU runs.
pub fn vec_dot_q4k_q8k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: `cpu::isa()` only reports instruction sets detected on this CPU.
    unsafe { vec_dot_with(cpu::isa(), n, w, act) }
}

/// [`vec_dot_q4k_q8k`] with the kernel for `isa` (ISAs without a Q4_K kernel use the next
/// narrower one); panics if `isa` cannot run here.
pub fn vec_dot_q4k_q8k_on(isa: Isa, n: usize, w: &[u8], act: &[u8]) -> f32 {
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
    // The SIMD kernels take typed blocks (x86 only so far).
    #[cfg(target_arch = "x86_64")]
    let (w_blocks, a_blocks) = {
        let n_blocks = super_blocks(n);
        (
            blocks::<BlockQ4K>(w, n_blocks),
            blocks::<BlockQ8K>(act, n_blocks),
        )
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            // SAFETY: the caller guarantees `isa`: AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C.
            unsafe { super::avx512::vec_dot_q4k_q8k_vnni(w_blocks, a_blocks) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: the caller guarantees `isa`: AVX-512 F/BW/VL, AVX2, FMA, F16C.
            unsafe { super::avx512::vec_dot_q4k_q8k(w_blocks, a_blocks) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: the caller guarantees `isa`: AVX2, FMA, F16C.
            unsafe { super::avx2::vec_dot_q4k_q8k(w_blocks, a_blocks) }
        }
        _ => vec_dot_q4k_q8k_scalar(n, w, act),
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8_k::quantize_row_q8k_scalar;
    use super::super::test_support::{abs_dot, cosine_vector, rmse, weight_like, XorShift};
    use super::super::{vec_dot_in_order_on, KDotOrder};
    use super::*;

    /// 4-bit levels over a sub-block's range with 6-bit scales: on the cosine vector (range
    /// ≈ 4.0 per sub-block → step ≈ 0.27, step/√12 ≈ 0.077); the search reaches 0.063.
    const Q4K_RMSE_LIMIT: f32 = 0.066;
    /// SIMD and scalar sum the same integers in a different float order.
    const DOT_REL_TOLERANCE: f64 = 2e-6;

    fn random_blocks(n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut rng = XorShift(seed);
        let mut bytes = vec![0u8; n_blocks * 144];
        rng.fill_bytes(&mut bytes);
        for block in blocks_mut::<BlockQ4K>(&mut bytes, n_blocks) {
            block.d = f32_to_f16(rng.next_f32() * 0.01);
            block.dmin = f32_to_f16(rng.next_f32() * 0.01);
        }
        bytes
    }

    #[test]
    fn quantizer_meets_rmse_limit_on_fixed_vector() {
        let x = cosine_vector(4 * QK_K, 0.0);
        let mut q = vec![0u8; 4 * 144];
        quantize_row_q4k_ref(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row_q4k(&q, &mut y);
        let err = rmse(&x, &y);
        assert!(err < Q4K_RMSE_LIMIT, "Q4_K rmse {err}");
    }

    #[test]
    fn quantizer_keeps_zero_rows_zero() {
        let x = vec![0f32; QK_K];
        let mut q = vec![0xFFu8; 144];
        quantize_row_q4k_ref(&x, &mut q);
        let mut y = vec![1f32; QK_K];
        dequantize_row_q4k(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn scalar_dot_equals_dot_of_dequantized_rows() {
        let w = random_blocks(3, 11);
        let x = weight_like(3 * QK_K, 12);
        let mut act = vec![0u8; 3 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let mut wf = vec![0f32; 3 * QK_K];
        let mut af = vec![0f32; 3 * QK_K];
        dequantize_row_q4k(&w, &mut wf);
        super::super::dequantize_row_q8k(&act, &mut af);
        let exact: f64 = wf.iter().zip(&af).map(|(a, b)| *a as f64 * *b as f64).sum();
        let got = vec_dot_q4k_q8k_scalar(3 * QK_K, &w, &act) as f64;
        assert!(
            (got - exact).abs() <= 1e-5 * abs_dot(&wf, &af),
            "{got} vs {exact}"
        );
    }

    #[test]
    fn every_kernel_matches_scalar() {
        for (seed, n_blocks) in [(1u64, 1usize), (2, 2), (3, 3), (4, 6)] {
            let w = random_blocks(n_blocks, seed);
            let x = weight_like(n_blocks * QK_K, seed + 100);
            let mut act = vec![0u8; n_blocks * 292];
            quantize_row_q8k_scalar(&x, &mut act);
            let n = n_blocks * QK_K;
            let reference = vec_dot_q4k_q8k_scalar(n, &w, &act) as f64;
            let mut wf = vec![0f32; n];
            let mut af = vec![0f32; n];
            dequantize_row_q4k(&w, &mut wf);
            super::super::dequantize_row_q8k(&act, &mut af);
            let bound = DOT_REL_TOLERANCE * abs_dot(&wf, &af);
            for isa in cpu::available_isas() {
                let got = vec_dot_q4k_q8k_on(isa, n, &w, &act) as f64;
                assert!(
                    (got - reference).abs() <= bound,
                    "{}: {got} vs {reference} (bound {bound})",
                    isa.name()
                );
            }
        }
    }

    /// llama.cpp's AVX2 Q4_K orders, written out from the integer sums: the gemv (one
    /// token) and the gemm (tokens in groups of 4) add with one fused multiply-add per
    /// super-block or per 64 weights on a scale chain and a min chain, the min chain
    /// subtracted last.
    fn llama_cpp_avx2_dot(w: &[u8], act: &[u8], n_blocks: usize, order: KDotOrder) -> f32 {
        let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
        for (wb, ab) in blocks::<BlockQ4K>(w, n_blocks)
            .iter()
            .zip(blocks::<BlockQ8K>(act, n_blocks))
        {
            let (d, dmin, d8) = (f16_to_f32(wb.d), f16_to_f32(wb.dmin), ab.scale());
            let (scaled, offsets) = chunk_sums(wb, ab);
            let (s, m): (i32, i32) = (scaled.iter().sum(), offsets.iter().sum());
            match order {
                KDotOrder::Single => {
                    acc = (s as f32).mul_add(d * d8, acc);
                    acc_min = (m as f32).mul_add(dmin * d8, acc_min);
                }
                KDotOrder::Grouped4 => {
                    for (s, m) in scaled.into_iter().zip(offsets) {
                        acc = (s as f32).mul_add(d * d8, acc);
                        acc_min = (m as f32).mul_add(dmin * d8, acc_min);
                    }
                }
                KDotOrder::Tiled => unreachable!("llama.cpp repacks Q4_K on AVX2"),
            }
        }
        acc - acc_min
    }

    #[test]
    fn avx2_dots_follow_llama_cpp_order_bit_for_bit() {
        if !cpu::is_runnable(Isa::Avx2) {
            return;
        }
        for (seed, n_blocks) in [(5u64, 1usize), (6, 4), (7, 8)] {
            let w = random_blocks(n_blocks, seed);
            let x = weight_like(n_blocks * QK_K, seed + 50);
            let mut act = vec![0u8; n_blocks * 292];
            quantize_row_q8k_scalar(&x, &mut act);
            let n = n_blocks * QK_K;
            for order in [KDotOrder::Single, KDotOrder::Grouped4] {
                let got = vec_dot_in_order_on(Isa::Avx2, GgmlType::Q4K, order, n, &w, &act);
                let want = llama_cpp_avx2_dot(&w, &act, n_blocks, order);
                assert_eq!(got.to_bits(), want.to_bits(), "{order:?}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_block_integer_sums_are_exact() {
        let w = random_blocks(6, 77);
        let mut rng = XorShift(78);
        // Full-range activations, including the ±127 extremes.
        let x: Vec<f32> = (0..6 * QK_K).map(|_| rng.next_f32() * 5.0).collect();
        let mut act = vec![0u8; 6 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let detected = cpu::detect();
        for (wb, ab) in blocks::<BlockQ4K>(&w, 6)
            .iter()
            .zip(blocks::<BlockQ8K>(&act, 6))
        {
            let expected = block_sums(wb, ab);
            if detected.has_avx2() {
                // SAFETY: AVX2 (with FMA, F16C) detected just above.
                let got = unsafe { super::super::avx2::q4k_block_sums(wb, ab) };
                assert_eq!(got, expected);
            }
            if detected.has_avx512() {
                // SAFETY: AVX-512 F/BW/VL detected just above.
                let got = unsafe { super::super::avx512::q4k_block_sums(wb, ab) };
                assert_eq!(got, expected);
            }
            if detected == Isa::Avx512Vnni {
                // SAFETY: AVX-512 VNNI detected just above.
                let got = unsafe { super::super::avx512::q4k_block_sums_vnni(wb, ab) };
                assert_eq!(got, expected);
            }
        }
    }
}
