//! AVX-512 (F, BW, VL) kernels for Q4_K · Q8_K and Q6_K · Q8_K, each in two builds: plain
//! BW (`maddubs` then `madd` + add) and VNNI (`maddubs` then `vpdpwssd`, which fuses the
//! scale multiply with the accumulate).
//!
//! The VNNI byte dot `vpdpbusd` would skip the i16 stage but leave the per-sub-block scale
//! to an i32 multiply (`vpmulld`), one more instruction per 64 weights than
//! `maddubs` + `vpdpwssd`.
//!
//! One 512-bit register holds 64 weights: two Q4_K sub-blocks (a broadcast 32-byte load,
//! the upper copy shifted right by 4) or four Q6_K sub-blocks.

use std::arch::x86_64::*;

use super::avx2::{
    array_at, f16_one, f16_pair, hsum_ps128, k4_offset_lanes, load128_i8, load256_u8,
};
use super::q4_k::BlockQ4K;
use super::q6_k::BlockQ6K;
use super::q8_k::BlockQ8K;
use super::unpack_scale_min_k4_words;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn load512_u8(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: the reference covers 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn load512_i8(bytes: &[i8; 64]) -> __m512i {
    // SAFETY: the reference covers 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

/// `acc + Σ pairs (products · scales)` with `madd` + add.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn madd_accumulate(acc: __m512i, products: __m512i, scales: __m512i) -> __m512i {
    _mm512_add_epi32(acc, _mm512_madd_epi16(products, scales))
}

/// The same with one `vpdpwssd`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dpwssd_accumulate(acc: __m512i, products: __m512i, scales: __m512i) -> __m512i {
    _mm512_dpwssd_epi32(acc, products, scales)
}

/// A `pshufb` control picking word `low` in 128-bit lanes 0-1 and word `high` in lanes 2-3.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn word_selector_512(low: i16, high: i16) -> __m512i {
    let pick = |w: i16| _mm512_set1_epi16(((2 * w + 1) << 8) | (2 * w));
    _mm512_mask_blend_epi64(0xF0, pick(low), pick(high))
}

/// `vpermw` indices putting scale `first + lane` (as i16) in every word of 128-bit lane
/// `lane`, for the four 16-weight sub-blocks one Q6_K register spans.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn q6k_scale_index(first: i16) -> __m512i {
    _mm512_add_epi16(
        _mm512_set1_epi16(first),
        _mm512_set_epi64(
            0x0003_0003_0003_0003,
            0x0003_0003_0003_0003,
            0x0002_0002_0002_0002,
            0x0002_0002_0002_0002,
            0x0001_0001_0001_0001,
            0x0001_0001_0001_0001,
            0,
            0,
        ),
    )
}

macro_rules! k_quant_kernels {
    (
        features = $features:literal,
        accumulate = $accumulate:ident,
        q4k_block = $q4k_block:ident,
        q4k_dot = $q4k_dot:ident,
        q4k_sums = $q4k_sums:ident,
        q6k_block = $q6k_block:ident,
        q6k_dot = $q6k_dot:ident,
        q6k_sum = $q6k_sum:ident $(,)?
    ) => {
        /// `(Σ_j sc_j Σ q·q8 as 16 lanes, Σ_j m_j Σ q8 as 4 lanes)` of one Q4_K block.
        #[inline]
        #[target_feature(enable = $features)]
        fn $q4k_block(w: &BlockQ4K, a: &BlockQ8K) -> (__m512i, __m128i) {
            let (scales, mins) = unpack_scale_min_k4_words(&w.scales);
            let offsets = k4_offset_lanes(mins, a);
            let scales16 =
                _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
            // Upper 256 bits take the high nibbles.
            let nibble_shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
            let low4 = _mm512_set1_epi8(0x0F);
            let mut acc = _mm512_setzero_si512();
            for chunk in 0..4 {
                let packed = _mm512_broadcast_i64x4(load256_u8(array_at(&w.qs, 32 * chunk)));
                // Weights 64c..64c+64, in order: sub-blocks 2c and 2c+1.
                let q = _mm512_and_si512(_mm512_srlv_epi64(packed, nibble_shift), low4);
                let products = _mm512_maddubs_epi16(q, load512_i8(array_at(&a.qs, 64 * chunk)));
                let sub = 2 * chunk as i16;
                let s = _mm512_shuffle_epi8(scales16, word_selector_512(sub, sub + 1));
                acc = $accumulate(acc, products, s);
            }
            (acc, offsets)
        }

        /// Q4_K · Q8_K over whole rows of blocks.
        #[target_feature(enable = $features)]
        pub(super) fn $q4k_dot(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
            let mut acc = _mm512_setzero_ps();
            let mut acc_offsets = _mm_setzero_ps();
            for (wb, ab) in w.iter().zip(a) {
                let (d, dmin) = f16_pair(wb.d, wb.dmin);
                let d8 = ab.scale();
                let (scaled, offsets) = $q4k_block(wb, ab);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(d * d8), _mm512_cvtepi32_ps(scaled), acc);
                acc_offsets = _mm_fmadd_ps(
                    _mm_set1_ps(dmin * d8),
                    _mm_cvtepi32_ps(offsets),
                    acc_offsets,
                );
            }
            _mm512_reduce_add_ps(acc) - hsum_ps128(acc_offsets)
        }

        /// The integer sums of one block, reduced, for the exactness tests.
        #[cfg(test)]
        #[target_feature(enable = $features)]
        pub(super) fn $q4k_sums(w: &BlockQ4K, a: &BlockQ8K) -> (i32, i32) {
            let (scaled, offsets) = $q4k_block(w, a);
            let offsets = _mm512_castsi128_si512(offsets);
            let offsets = _mm512_maskz_mov_epi32(0x000F, offsets);
            (
                _mm512_reduce_add_epi32(scaled),
                _mm512_reduce_add_epi32(offsets),
            )
        }

        /// `Σ_j sc_j Σ (q - 32)·q8` of one Q6_K block as 8 lanes; the `-32` comes from the
        /// activation's `bsums`.
        #[inline]
        #[target_feature(enable = $features)]
        fn $q6k_block(w: &BlockQ6K, a: &BlockQ8K) -> __m256i {
            let scales16 = _mm256_cvtepi8_epi16(load128_i8(&w.scales));
            let offset =
                _mm256_madd_epi16(scales16, load256_u8(array_at(a.bsums.as_flattened(), 0)));
            let scales512 = _mm512_castsi256_si512(scales16);
            let low4 = _mm512_set1_epi8(0x0F);
            let high2 = _mm512_set1_epi8(0x30);
            // Bit pairs 0-1 / 2-3 of `qh` to bits 4-5 for the first two quarters of a half,
            // 4-5 / 6-7 for the last two (64-bit shifts cannot leak into bits 4-5 of a
            // neighbour byte for these counts).
            let shift_first = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4);
            let shift_last = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
            let mut acc = _mm512_setzero_si512();
            for half in 0..2 {
                // [ql 0..32 | ql 32..64]: low nibbles are weights 0..64 of the half, high
                // nibbles weights 64..128.
                let ql = load512_u8(array_at(&w.ql, 64 * half));
                let qh = _mm512_broadcast_i64x4(load256_u8(array_at(&w.qh, 32 * half)));
                let q_first = _mm512_or_si512(
                    _mm512_and_si512(ql, low4),
                    _mm512_and_si512(_mm512_sllv_epi64(qh, shift_first), high2),
                );
                let q_last = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                    _mm512_and_si512(_mm512_srlv_epi64(qh, shift_last), high2),
                );
                let p_first =
                    _mm512_maddubs_epi16(q_first, load512_i8(array_at(&a.qs, 128 * half)));
                let p_last =
                    _mm512_maddubs_epi16(q_last, load512_i8(array_at(&a.qs, 128 * half + 64)));
                let first_sub = 8 * half as i16;
                let s_first = _mm512_permutexvar_epi16(q6k_scale_index(first_sub), scales512);
                let s_last = _mm512_permutexvar_epi16(q6k_scale_index(first_sub + 4), scales512);
                acc = $accumulate(acc, p_first, s_first);
                acc = $accumulate(acc, p_last, s_last);
            }
            let acc = _mm256_add_epi32(
                _mm512_castsi512_si256(acc),
                _mm512_extracti64x4_epi64::<1>(acc),
            );
            _mm256_sub_epi32(acc, _mm256_slli_epi32::<5>(offset))
        }

        /// Q6_K · Q8_K over whole rows of blocks.
        #[target_feature(enable = $features)]
        pub(super) fn $q6k_dot(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (wb, ab) in w.iter().zip(a) {
                let d = f16_one(wb.d) * ab.scale();
                acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(d),
                    _mm256_cvtepi32_ps($q6k_block(wb, ab)),
                    acc,
                );
            }
            let acc = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            hsum_ps128(acc)
        }

        #[cfg(test)]
        #[target_feature(enable = $features)]
        pub(super) fn $q6k_sum(w: &BlockQ6K, a: &BlockQ8K) -> i32 {
            _mm512_reduce_add_epi32(_mm512_zextsi256_si512($q6k_block(w, a)))
        }
    };
}

k_quant_kernels!(
    features = "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    accumulate = madd_accumulate,
    q4k_block = q4k_block,
    q4k_dot = vec_dot_q4k_q8k,
    q4k_sums = q4k_block_sums,
    q6k_block = q6k_block,
    q6k_dot = vec_dot_q6k_q8k,
    q6k_sum = q6k_block_sum,
);

k_quant_kernels!(
    features = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
    accumulate = dpwssd_accumulate,
    q4k_block = q4k_block_vnni,
    q4k_dot = vec_dot_q4k_q8k_vnni,
    q4k_sums = q4k_block_sums_vnni,
    q6k_block = q6k_block_vnni,
    q6k_dot = vec_dot_q6k_q8k_vnni,
    q6k_sum = q6k_block_sum_vnni,
);
