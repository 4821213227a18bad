//! Q6_K: 6.5625 bits per weight. Sixteen sub-blocks of 16 weights, each `x = d·sc·(q - 32)`
//! with a 6-bit `q` split into a low nibble and two high bits, an i8 `sc`, and one f16 `d`.

use super::fit::{fit_scale_symmetric, importance, nearest_int, quantize_signed};
use super::q8_k::BlockQ8K;
use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, super_blocks, KBlock, QK_K};
use crate::cpu::{self, Isa};
use crate::GgmlType;

/// `block_q6_K`: 128 + 64 + 16 + 2 = 210 bytes.
///
/// Weight `e = 128 h + 32 k + l` (`h` < 2, `k` < 4, `l` < 32) keeps its low nibble in
/// `ql[64 h + 32 (k & 1) + l]` (low half for `k` < 2, high half otherwise) and its top two
/// bits at bit `2 k` of `qh[32 h + l]`; its scale is `scales[e / 16]`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    /// f16 factor of the scales.
    pub d: [u8; 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

impl KBlock for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
}

/// The 256 signed levels (`q - 32`, in `-32..32`) of one block, in weight order.
#[inline]
fn unpack_levels(block: &BlockQ6K) -> [i8; QK_K] {
    let mut levels = [0i8; QK_K];
    for h in 0..2 {
        let ql = &block.ql[64 * h..64 * h + 64];
        let qh = &block.qh[32 * h..32 * h + 32];
        let out = &mut levels[128 * h..128 * h + 128];
        for l in 0..32 {
            let high = qh[l];
            out[l] = ((ql[l] & 0x0F) | ((high & 3) << 4)) as i8 - 32;
            out[l + 32] = ((ql[l + 32] & 0x0F) | (((high >> 2) & 3) << 4)) as i8 - 32;
            out[l + 64] = ((ql[l] >> 4) | (((high >> 4) & 3) << 4)) as i8 - 32;
            out[l + 96] = ((ql[l + 32] >> 4) | (((high >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    levels
}

/// Expands Q6_K blocks to floats (`out.len()` a multiple of 256).
pub fn dequantize_row_q6k(src: &[u8], out: &mut [f32]) {
    let n_blocks = super_blocks(out.len());
    for (block, out) in blocks::<BlockQ6K>(src, n_blocks)
        .iter()
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_to_f32(block.d);
        let levels = unpack_levels(block);
        for ((sub_levels, sub_out), &scale) in levels
            .chunks_exact(16)
            .zip(out.chunks_exact_mut(16))
            .zip(&block.scales)
        {
            let step = d * scale as f32;
            for (y, &q) in sub_out.iter_mut().zip(sub_levels) {
                *y = step * q as f32;
            }
        }
    }
}

/// Reference quantizer: per sub-block symmetric scale search, then i8 scales.
pub fn quantize_row_q6k_ref(x: &[f32], out: &mut [u8]) {
    let n_blocks = super_blocks(x.len());
    for (x, block) in x
        .chunks_exact(QK_K)
        .zip(blocks_mut::<BlockQ6K>(out, n_blocks))
    {
        let mut levels = [0i8; QK_K];
        let mut weights = [0f32; 16];
        let mut sub_scales = [0f32; 16];
        for (j, sub) in x.chunks_exact(16).enumerate() {
            importance(sub, &mut weights);
            sub_scales[j] =
                fit_scale_symmetric(sub, &weights, 32, &mut levels[16 * j..16 * j + 16]);
        }
        let mut scale_levels = [0i32; 16];
        let d = quantize_signed(&sub_scales, 128, &mut scale_levels);
        for (j, sub) in x.chunks_exact(16).enumerate() {
            let step = d * scale_levels[j] as f32;
            for (level, &v) in levels[16 * j..16 * j + 16].iter_mut().zip(sub) {
                *level = if step != 0.0 {
                    nearest_int(v / step).clamp(-32, 31) as i8
                } else {
                    0
                };
            }
        }
        block.d = f32_to_f16(d);
        for (scale, &level) in block.scales.iter_mut().zip(&scale_levels) {
            *scale = level as i8;
        }
        // Stored levels are unsigned: `level + 32` in 0..64.
        let stored = levels.map(|l| (l + 32) as u8);
        for h in 0..2 {
            let e = &stored[128 * h..128 * h + 128];
            for l in 0..32 {
                block.ql[64 * h + l] = (e[l] & 0x0F) | ((e[l + 64] & 0x0F) << 4);
                block.ql[64 * h + 32 + l] = (e[l + 32] & 0x0F) | ((e[l + 96] & 0x0F) << 4);
                block.qh[32 * h + l] = (e[l] >> 4)
                    | ((e[l + 32] >> 4) << 2)
                    | ((e[l + 64] >> 4) << 4)
                    | ((e[l + 96] >> 4) << 6);
            }
        }
    }
}

/// `Σ_j sc_j Σ (q - 32)·q8` over one super-block; the dot is `d·d8` times this.
#[inline]
pub(crate) fn block_sum(w: &BlockQ6K, a: &BlockQ8K) -> i32 {
    let levels = unpack_levels(w);
    let mut total = 0i32;
    for ((sub_levels, q8), &scale) in levels
        .chunks_exact(16)
        .zip(a.qs.chunks_exact(16))
        .zip(&w.scales)
    {
        let dot: i32 = sub_levels
            .iter()
            .zip(q8)
            .map(|(&q, &a)| q as i32 * a as i32)
            .sum();
        total += scale as i32 * dot;
    }
    total
}

/// Scalar reference: `Σ w_i a_i` over `n` weights of a Q6_K row and a Q8_K row.
pub fn vec_dot_q6k_q8k_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let n_blocks = super_blocks(n);
    let mut sum = 0.0f32;
    for (w, a) in blocks::<BlockQ6K>(w, n_blocks)
        .iter()
        .zip(blocks::<BlockQ8K>(act, n_blocks))
    {
        sum += f16_to_f32(w.d) * a.scale() * block_sum(w, a) as f32;
    }
    sum
}

/// `Σ w_i a_i` over `n` weights (a multiple of 256) of a Q6_K row `w` and a Q8_K row `act`,
/// with the widest kernel this CPU runs. The SIMD kernels take the `- 32` offset from the
/// activation's `bsums`, so `act` must come from `quantize_row_q8k`.
pub fn vec_dot_q6k_q8k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: `cpu::isa()` only reports instruction sets detected on this CPU.
    unsafe { vec_dot_with(cpu::isa(), n, w, act) }
}

/// [`vec_dot_q6k_q8k`] with the kernel for `isa` (ISAs without a Q6_K kernel use the next
/// narrower one); panics if `isa` cannot run here.
pub fn vec_dot_q6k_q8k_on(isa: Isa, n: usize, w: &[u8], act: &[u8]) -> f32 {
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
            blocks::<BlockQ6K>(w, n_blocks),
            blocks::<BlockQ8K>(act, n_blocks),
        )
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            // SAFETY: the caller guarantees `isa`: AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C.
            unsafe { super::avx512::vec_dot_q6k_q8k_vnni(w_blocks, a_blocks) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: the caller guarantees `isa`: AVX-512 F/BW/VL, AVX2, FMA, F16C.
            unsafe { super::avx512::vec_dot_q6k_q8k(w_blocks, a_blocks) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: the caller guarantees `isa`: AVX2, FMA, F16C.
            unsafe { super::avx2::vec_dot_q6k_q8k(w_blocks, a_blocks) }
        }
        _ => vec_dot_q6k_q8k_scalar(n, w, act),
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8_k::{dequantize_row_q8k, quantize_row_q8k_scalar};
    use super::super::test_support::{abs_dot, cosine_vector, rmse, weight_like, XorShift};
    use super::*;

    /// 64 levels per 16-weight sub-block with i8 scales: on the cosine vector (sub-block
    /// amax ≈ 2.1 → step ≈ 0.066, step/√12 ≈ 0.019); the search reaches 0.016.
    const Q6K_RMSE_LIMIT: f32 = 0.017;
    /// SIMD and scalar sum the same integers in a different float order.
    const DOT_REL_TOLERANCE: f64 = 2e-6;

    fn random_blocks(n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut rng = XorShift(seed);
        let mut bytes = vec![0u8; n_blocks * 210];
        rng.fill_bytes(&mut bytes);
        for block in blocks_mut::<BlockQ6K>(&mut bytes, n_blocks) {
            block.d = f32_to_f16(rng.next_f32() * 0.001);
        }
        bytes
    }

    #[test]
    fn quantizer_meets_rmse_limit_on_fixed_vector() {
        let x = cosine_vector(4 * QK_K, 0.0);
        let mut q = vec![0u8; 4 * 210];
        quantize_row_q6k_ref(&x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row_q6k(&q, &mut y);
        let err = rmse(&x, &y);
        assert!(err < Q6K_RMSE_LIMIT, "Q6_K rmse {err}");
    }

    #[test]
    fn scalar_dot_equals_dot_of_dequantized_rows() {
        let w = random_blocks(3, 21);
        let x = weight_like(3 * QK_K, 22);
        let mut act = vec![0u8; 3 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let mut wf = vec![0f32; 3 * QK_K];
        let mut af = vec![0f32; 3 * QK_K];
        dequantize_row_q6k(&w, &mut wf);
        dequantize_row_q8k(&act, &mut af);
        let exact: f64 = wf.iter().zip(&af).map(|(a, b)| *a as f64 * *b as f64).sum();
        let got = vec_dot_q6k_q8k_scalar(3 * QK_K, &w, &act) as f64;
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
            let reference = vec_dot_q6k_q8k_scalar(n, &w, &act) as f64;
            let mut wf = vec![0f32; n];
            let mut af = vec![0f32; n];
            dequantize_row_q6k(&w, &mut wf);
            dequantize_row_q8k(&act, &mut af);
            let bound = DOT_REL_TOLERANCE * abs_dot(&wf, &af);
            for isa in cpu::available_isas() {
                let got = vec_dot_q6k_q8k_on(isa, n, &w, &act) as f64;
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
        let w = random_blocks(6, 87);
        let mut rng = XorShift(88);
        let x: Vec<f32> = (0..6 * QK_K).map(|_| rng.next_f32() * 5.0).collect();
        let mut act = vec![0u8; 6 * 292];
        quantize_row_q8k_scalar(&x, &mut act);
        let detected = cpu::detect();
        for (wb, ab) in blocks::<BlockQ6K>(&w, 6)
            .iter()
            .zip(blocks::<BlockQ8K>(&act, 6))
        {
            let expected = block_sum(wb, ab);
            if detected.has_avx2() {
                // SAFETY: AVX2 (with FMA, F16C) detected just above.
                let got = unsafe { super::super::avx2::q6k_block_sum(wb, ab) };
                assert_eq!(got, expected);
            }
            if detected.has_avx512() {
                // SAFETY: AVX-512 F/BW/VL detected just above.
                let got = unsafe { super::super::avx512::q6k_block_sum(wb, ab) };
                assert_eq!(got, expected);
            }
            if detected == Isa::Avx512Vnni {
                // SAFETY: AVX-512 VNNI detected just above.
                let got = unsafe { super::super::avx512::q6k_block_sum_vnni(wb, ab) };
                assert_eq!(got, expected);
            }
        }
    }

    /// llama.cpp's tiled K-quant matmul (batches of 8 tokens or more), written out from the
    /// integer sums: per super-block `d·Σ` in f32, then one fused multiply-add with the
    /// activation's scale.
    #[test]
    fn avx2_tiled_order_follows_llama_cpp_bit_for_bit() {
        if !cpu::is_runnable(Isa::Avx2) {
            return;
        }
        for (seed, n_blocks) in [(5u64, 1usize), (6, 4), (7, 8)] {
            let w = random_blocks(n_blocks, seed);
            let x = weight_like(n_blocks * QK_K, seed + 50);
            let mut act = vec![0u8; n_blocks * 292];
            quantize_row_q8k_scalar(&x, &mut act);
            let mut want = 0.0f32;
            for (wb, ab) in blocks::<BlockQ6K>(&w, n_blocks)
                .iter()
                .zip(blocks::<BlockQ8K>(&act, n_blocks))
            {
                let res = f16_to_f32(wb.d) * block_sum(wb, ab) as f32;
                want = res.mul_add(ab.scale(), want);
            }
            let order = super::super::KDotOrder::Tiled;
            let n = n_blocks * QK_K;
            let got =
                super::super::vec_dot_in_order_on(Isa::Avx2, GgmlType::Q6K, order, n, &w, &act);
            assert_eq!(got.to_bits(), want.to_bits());
        }
    }
}
