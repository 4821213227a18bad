//! AVX2 (+FMA, F16C) kernels: Q8_K quantization and the Q4_K / Q6_K dot products.
//!
//! Every function here is a safe `#[target_feature]` fn; callers outside this file must have
//! checked the features (the dispatchers do, via `cpu::isa()`). Integer work follows the
//! scalar twins exactly: `maddubs` forms u8·i8 pair sums in i16 (no saturation is possible:
//! |q|·|q8| pairs stay below 2·63·127), `madd` applies the sub-block scale in i32, and each
//! block's i32 lanes are scaled by `d · d8` into a float accumulator.

use std::arch::x86_64::*;

use super::q2_k::BlockQ2K;
use super::q3_k::BlockQ3K;
use super::q4_k::BlockQ4K;
use super::q5_k::BlockQ5K;
use super::q6_k::BlockQ6K;
use super::q8_k::{inverse_step, BlockQ8K};
use super::{unpack_scale_min_k4_words, QK_K};

/// The `N`-element array starting at `start` (panics if out of range; constant indices in
/// unrolled loops fold the check away).
#[inline(always)]
pub(super) fn array_at<T, const N: usize>(slice: &[T], start: usize) -> &[T; N] {
    slice[start..start + N]
        .try_into()
        .expect("range has length N")
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load128_i8(bytes: &[i8; 16]) -> __m128i {
    // SAFETY: the reference covers 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load128_u8(bytes: &[u8; 16]) -> __m128i {
    // SAFETY: the reference covers 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load256_u8(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: the reference covers 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load256_i8(bytes: &[i8; 32]) -> __m256i {
    // SAFETY: the reference covers 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_ps(values: &[f32; 8]) -> __m256 {
    // SAFETY: the reference covers 8 readable f32; loadu has no alignment requirement.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store256_i8(out: &mut [i8; 32], value: __m256i) {
    // SAFETY: the exclusive reference covers 32 writable bytes; storeu needs no alignment.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), value) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store_ps128(out: &mut [f32; 4], value: __m128) {
    // SAFETY: the exclusive reference covers 4 writable f32; storeu needs no alignment.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), value) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store128_u8(out: &mut [u8; 16], value: __m128i) {
    // SAFETY: the exclusive reference covers 16 writable bytes; storeu needs no alignment.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), value) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps128(v: __m128) -> f32 {
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let v = _mm_add_ss(v, _mm_movehdup_ps(v));
    _mm_cvtss_f32(v)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    hsum_ps128(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps::<1>(v),
    ))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_epi32(v: __m256i) -> i32 {
    hsum_epi32_128(_mm_add_epi32(
        _mm256_castsi256_si128(v),
        _mm256_extracti128_si256::<1>(v),
    ))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32_128(v: __m128i) -> i32 {
    let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01>(v));
    _mm_cvtsi128_si32(v)
}

/// Two little-endian f16 values converted with F16C (exact, like `half`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_pair(first: [u8; 2], second: [u8; 2]) -> (f32, f32) {
    let bits = u16::from_le_bytes(first) as u32 | ((u16::from_le_bytes(second) as u32) << 16);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_one(bits: [u8; 2]) -> f32 {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes(bits) as i32));
    _mm_cvtss_f32(v)
}

/// A vector whose every 16-bit lane selects word `word` of each 128-bit lane (`pshufb`).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn word_selector(low_lane_word: i16, high_lane_word: i16) -> __m256i {
    let pick = |w: i16| _mm_set1_epi16(((2 * w + 1) << 8) | (2 * w));
    _mm256_set_m128i(pick(high_lane_word), pick(low_lane_word))
}

/// The Q4_K/Q5_K min term `Σ_j m_j (bsum_2j + bsum_2j+1)` as four i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn k4_offset_lanes(mins: u64, a: &BlockQ8K) -> __m128i {
    let mins16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mins as i64));
    let bsums = load256_u8(array_at(a.bsums.as_flattened(), 0));
    // Pairs of 16-wide sums make the eight 32-wide sub-block sums (|sum| ≤ 32·127).
    let sub_sums = _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256::<1>(bsums),
    );
    _mm_madd_epi16(mins16, sub_sums)
}

/// The eight sub-block scales of a Q4_K block (as i16, in both 128-bit lanes) and the packed
/// mins, from its scale bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_scales(w: &BlockQ4K) -> (__m256i, u64) {
    let (scales, mins) = unpack_scale_min_k4_words(&w.scales);
    let scales16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
    (scales16, mins)
}

/// One 64-weight chunk `c` of a Q4_K block unpacked: the low and high nibbles (weights
/// 64c..64c+32 and 64c+32..64c+64) and the scales of sub-blocks `2c` and `2c + 1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_chunk(w: &BlockQ4K, scales16: __m256i, chunk: usize) -> [__m256i; 4] {
    let low4 = _mm256_set1_epi8(0x0F);
    let packed = load256_u8(array_at(&w.qs, 32 * chunk));
    let sub = 2 * chunk as i16;
    [
        _mm256_and_si256(packed, low4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low4),
        _mm256_shuffle_epi8(scales16, word_selector(sub, sub)),
        _mm256_shuffle_epi8(scales16, word_selector(sub + 1, sub + 1)),
    ]
}

/// `Σ sc·q·q8` over chunk `c` of a Q4_K block unpacked by [`q4k_chunk`], as 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_chunk_sum(
    [q_low, q_high, s_low, s_high]: [__m256i; 4],
    a: &BlockQ8K,
    chunk: usize,
) -> __m256i {
    let p_low = _mm256_maddubs_epi16(q_low, load256_i8(array_at(&a.qs, 64 * chunk)));
    let p_high = _mm256_maddubs_epi16(q_high, load256_i8(array_at(&a.qs, 64 * chunk + 32)));
    _mm256_add_epi32(
        _mm256_madd_epi16(p_low, s_low),
        _mm256_madd_epi16(p_high, s_high),
    )
}

/// The integer sums of one Q4_K block per 64 weights: for each `c` in 0..4 (sub-blocks
/// `2c`, `2c + 1`), `Σ sc·q·q8` as 8 lanes; and `Σ m·bsum` as 4 lanes, lane `c` for the same
/// 64 weights.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_chunks(w: &BlockQ4K, a: &BlockQ8K) -> ([__m256i; 4], __m128i) {
    let (scales16, mins) = q4k_scales(w);
    let chunk_sums =
        std::array::from_fn(|chunk| q4k_chunk_sum(q4k_chunk(w, scales16, chunk), a, chunk));
    (chunk_sums, k4_offset_lanes(mins, a))
}

/// `(Σ_j sc_j Σ q·q8 as 8 lanes, Σ_j m_j Σ q8 as 4 lanes)` of one Q4_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_block(w: &BlockQ4K, a: &BlockQ8K) -> (__m256i, __m128i) {
    let ([c0, c1, c2, c3], offsets) = q4k_chunks(w, a);
    let scaled = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
    (scaled, offsets)
}

/// Q4_K · Q8_K over whole rows of blocks, in the order of llama.cpp's AVX2 build, which runs
/// Q4_K matrices repacked eight rows at a time (for matrices of a multiple of 8 rows), one
/// token with `ggml_gemv_q4_K_8x8_q8_K`: per super-block the whole integer sum Σ sc·q·q8 and
/// the whole min sum Σ m·bsum, each then added with one fused multiply-add on its own chain
/// (`d·d8` and `dmin·d8` the factors), and the min chain subtracted at the end. (For matrices
/// of other row counts llama.cpp runs `ggml_vec_dot_q4_K_q8_K`, lane-wise: not reproduced.)
/// Prompt tokens in groups of 4 take [`vec_dot_q4k_q8k_per_64`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q4k_q8k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    let mut acc_min = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let (d, dmin) = f16_pair(wb.d, wb.dmin);
        let d8 = ab.scale();
        let (scaled, offsets) = q4k_block(wb, ab);
        acc = (hsum_epi32(scaled) as f32).mul_add(d * d8, acc);
        acc_min = (hsum_epi32_128(offsets) as f32).mul_add(dmin * d8, acc_min);
    }
    acc - acc_min
}

/// [`vec_dot_q4k_q8k`] in the order of llama.cpp's AVX2 repacked Q4_K gemm
/// (`ggml_gemm_q4_K_8x8_q8_K`), which multiplies prompt tokens in groups of 4: the same two
/// chains, but one fused multiply-add per 64 weights (two sub-blocks) on each.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q4k_q8k_per_64(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (wb, ab) in w.iter().zip(a) {
        let (d, dmin) = f16_pair(wb.d, wb.dmin);
        let d8 = ab.scale();
        let (chunks, offsets) = q4k_chunks(wb, ab);
        let mut scaled = [0.0f32; 4];
        store_ps128(&mut scaled, _mm_cvtepi32_ps(hsum4_epi32(chunks)));
        let mut mins = [0.0f32; 4];
        store_ps128(&mut mins, _mm_cvtepi32_ps(offsets));
        for (s, m) in scaled.into_iter().zip(mins) {
            acc = s.mul_add(d * d8, acc);
            acc_min = m.mul_add(dmin * d8, acc_min);
        }
    }
    acc - acc_min
}

/// [`vec_dot_q4k_q8k_per_64`] of one weight row with four activation rows at once: lane `t`
/// of each chain register is token `t`'s chain, taking the same fused multiply-adds
/// (`d · d8` rounded, then `fma(Σ, d · d8, acc)` per 64 weights), so each lane equals the
/// single-token result bit for bit. Each weight block is unpacked once for the four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot4_q4k_q8k_per_64(w: &[BlockQ4K], a: [&[BlockQ8K]; 4]) -> [f32; 4] {
    let (mut acc, mut acc_min) = (_mm_setzero_ps(), _mm_setzero_ps());
    for (b, wb) in w.iter().enumerate() {
        let (d, dmin) = f16_pair(wb.d, wb.dmin);
        let d8 = act_scales4(a, b);
        let (d_d8, dmin_d8) = (
            _mm_mul_ps(_mm_set1_ps(d), d8),
            _mm_mul_ps(_mm_set1_ps(dmin), d8),
        );
        let (scales16, mins) = q4k_scales(wb);
        // [t][c] → [c][t]: the min sums of 64-weight chunk c for the four tokens.
        let mut mins_ct = [0, 1, 2, 3].map(|t| _mm_cvtepi32_ps(k4_offset_lanes(mins, &a[t][b])));
        let [m0, m1, m2, m3] = &mut mins_ct;
        _MM_TRANSPOSE4_PS(m0, m1, m2, m3);
        for (chunk, mins_c) in mins_ct.into_iter().enumerate() {
            let weights = q4k_chunk(wb, scales16, chunk);
            let sums = [0, 1, 2, 3].map(|t| q4k_chunk_sum(weights, &a[t][b], chunk));
            // Lane t: token t's integer sum over the chunk (exact in any order).
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_epi32(sums)), d_d8, acc);
            acc_min = _mm_fmadd_ps(mins_c, dmin_d8, acc_min);
        }
    }
    let mut out = [0.0f32; 4];
    store_ps128(&mut out, _mm_sub_ps(acc, acc_min));
    out
}

/// The scales `d8` of block `b` of four activation rows, lane `t` of row `t`.
#[inline]
#[target_feature(enable = "avx2")]
fn act_scales4(a: [&[BlockQ8K]; 4], b: usize) -> __m128 {
    _mm_setr_ps(
        a[0][b].scale(),
        a[1][b].scale(),
        a[2][b].scale(),
        a[3][b].scale(),
    )
}

/// Lane `c` of the result is the sum of the 8 lanes of `v[c]`.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum4_epi32(v: [__m256i; 4]) -> __m128i {
    // Each hadd adds neighbouring pairs per 128-bit half; after two, lane c of each half
    // holds that half's sum of v[c].
    let pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_add_epi32(
        _mm256_castsi256_si128(pairs),
        _mm256_extracti128_si256::<1>(pairs),
    )
}

/// The integer sums of one block, reduced, for the exactness tests.
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4k_block_sums(w: &BlockQ4K, a: &BlockQ8K) -> (i32, i32) {
    let (scaled, offsets) = q4k_block(w, a);
    (hsum_epi32(scaled), hsum_epi32_128(offsets))
}

/// The unsigned 6-bit levels (q6 + 32) of one Q6_K half of 128 weights, as the four
/// 32-weight quarters `l`, `l + 32`, `l + 64`, `l + 96` (`l` in 0..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_quarters(ql: &[u8; 64], qh: &[u8; 32]) -> [__m256i; 4] {
    let low4 = _mm256_set1_epi8(0x0F);
    let high2 = _mm256_set1_epi8(0x30);
    let ql0 = load256_u8(array_at(ql, 0));
    let ql1 = load256_u8(array_at(ql, 32));
    let qh = load256_u8(qh);
    // The shifts bring bit pair 2k of `qh` to bits 4-5 (16-bit shifts never leak into bits
    // 4-5 of a neighbour byte).
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, low4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, low4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
            _mm256_and_si256(qh, high2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high2),
        ),
    ]
}

/// The scales of quarter `k` of a Q6_K half for [`_mm256_madd_epi16`] over its `maddubs`
/// words: words 0-7 take sub-block `2k`, words 8-15 sub-block `2k + 1`, given the half's
/// eight scales (as i16) in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_quarter_scales(scales: __m256i, k: usize) -> __m256i {
    _mm256_shuffle_epi8(scales, word_selector(2 * k as i16, 2 * k as i16 + 1))
}

/// Σ sc·(q6 + 32)·q8 for 128 weights of one Q6_K half, given that half's eight scales
/// (as i16) in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_half(ql: &[u8; 64], qh: &[u8; 32], q8: &[i8; 128], scales: __m256i) -> __m256i {
    let mut acc = _mm256_setzero_si256();
    for (k, q) in q6k_quarters(ql, qh).into_iter().enumerate() {
        let products = _mm256_maddubs_epi16(q, load256_i8(array_at(q8, 32 * k)));
        acc = _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(products, q6k_quarter_scales(scales, k)),
        );
    }
    acc
}

/// The two halves' scales of a Q6_K block for [`q6k_half`]: each half's eight scales (as
/// i16) in both 128-bit lanes; and all sixteen as i16, for the `-32` offset.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_scales(w: &BlockQ6K) -> ([__m256i; 2], __m256i) {
    let scales16 = _mm256_cvtepi8_epi16(load128_i8(&w.scales));
    (
        [
            _mm256_permute2x128_si256::<0x00>(scales16, scales16),
            _mm256_permute2x128_si256::<0x11>(scales16, scales16),
        ],
        scales16,
    )
}

/// `32 Σ_j sc_j bsum_j`: the `-32` of every Q6_K level, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_offset(scales16: __m256i, a: &BlockQ8K) -> __m256i {
    let bsums = load256_u8(array_at(a.bsums.as_flattened(), 0));
    _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales16, bsums))
}

/// `Σ_j sc_j Σ (q - 32)·q8` of one Q6_K block as 8 i32 lanes. The `-32` is taken as
/// `32 Σ_j sc_j bsum_j`, so activations must carry consistent `bsums`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_block(w: &BlockQ6K, a: &BlockQ8K) -> __m256i {
    let ([first_scales, second_scales], scales16) = q6k_scales(w);
    let first = q6k_half(
        array_at(&w.ql, 0),
        array_at(&w.qh, 0),
        array_at(&a.qs, 0),
        first_scales,
    );
    let second = q6k_half(
        array_at(&w.ql, 64),
        array_at(&w.qh, 32),
        array_at(&a.qs, 128),
        second_scales,
    );
    _mm256_sub_epi32(_mm256_add_epi32(first, second), q6k_offset(scales16, a))
}

/// Q6_K · Q8_K over whole rows of blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q6k_q8k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (wb, ab) in w.iter().zip(a) {
        let d = f16_one(wb.d) * ab.scale();
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(d),
            _mm256_cvtepi32_ps(q6k_block(wb, ab)),
            acc,
        );
    }
    hsum_ps(acc)
}

/// [`vec_dot_q6k_q8k`] in the order of llama.cpp's tiled K-quant matmul (batches of 8
/// tokens or more): per super-block `d · Σ` in f32, then one fused multiply-add with the
/// activation's scale.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q6k_q8k_tiled(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let res = f16_one(wb.d) * hsum_epi32(q6k_block(wb, ab)) as f32;
        acc = res.mul_add(ab.scale(), acc);
    }
    acc
}

/// [`vec_dot_q6k_q8k_tiled`] of one weight row with four activation rows at once: lane `t`
/// of the chain register is token `t`'s chain, with the same roundings (`d · Σ`, then
/// `fma(·, d8, acc)`), so each lane equals the single-token result bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot4_q6k_q8k_tiled(w: &[BlockQ6K], a: [&[BlockQ8K]; 4]) -> [f32; 4] {
    let mut acc = _mm_setzero_ps();
    for (b, wb) in w.iter().enumerate() {
        let d8 = act_scales4(a, b);
        let (half_scales, scales16) = q6k_scales(wb);
        let mut sums = [0, 1, 2, 3]
            .map(|t| _mm256_sub_epi32(_mm256_setzero_si256(), q6k_offset(scales16, &a[t][b])));
        // Each half is unpacked once for the four tokens.
        for (half, scales) in half_scales.into_iter().enumerate() {
            let quarters = q6k_quarters(array_at(&wb.ql, 64 * half), array_at(&wb.qh, 32 * half));
            for (k, q) in quarters.into_iter().enumerate() {
                let s = q6k_quarter_scales(scales, k);
                for (t, sum) in sums.iter_mut().enumerate() {
                    let q8 = array_at(&a[t][b].qs, 128 * half + 32 * k);
                    let products = _mm256_maddubs_epi16(q, load256_i8(q8));
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(products, s));
                }
            }
        }
        // Lane t: token t's integer sum (exact in any order).
        let res = _mm_mul_ps(
            _mm_set1_ps(f16_one(wb.d)),
            _mm_cvtepi32_ps(hsum4_epi32(sums)),
        );
        acc = _mm_fmadd_ps(res, d8, acc);
    }
    let mut out = [0.0f32; 4];
    store_ps128(&mut out, acc);
    out
}

#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q6k_block_sum(w: &BlockQ6K, a: &BlockQ8K) -> i32 {
    hsum_epi32(q6k_block(w, a))
}

/// Bit `from` of every byte of `bits`, moved to bit `to` (`to` ≤ 4, the rest cleared).
/// 16-bit shifts are safe: the kept bit always comes from the same byte.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn move_bit(bits: __m256i, from: u32, to: u32) -> __m256i {
    let moved = match from as i32 - to as i32 {
        -4 => _mm256_slli_epi16::<4>(bits),
        -3 => _mm256_slli_epi16::<3>(bits),
        -2 => _mm256_slli_epi16::<2>(bits),
        -1 => _mm256_slli_epi16::<1>(bits),
        0 => bits,
        1 => _mm256_srli_epi16::<1>(bits),
        2 => _mm256_srli_epi16::<2>(bits),
        3 => _mm256_srli_epi16::<3>(bits),
        4 => _mm256_srli_epi16::<4>(bits),
        5 => _mm256_srli_epi16::<5>(bits),
        6 => _mm256_srli_epi16::<6>(bits),
        _ => _mm256_srli_epi16::<7>(bits),
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(1 << to))
}

/// Σ over one 128-weight half of a Q2_K / Q3_K block: the four 32-weight quarters (bit
/// pairs 0-1 … 6-7 of `qs`, plus `high(k)` for Q3_K) times their 16-weight sub-block scale.
/// `scales` holds the half's eight scales as i16 in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn two_bit_half(
    qs: &[u8; 32],
    q8: &[i8; 128],
    scales: __m256i,
    high: impl Fn(u32) -> __m256i,
) -> __m256i {
    let three = _mm256_set1_epi8(3);
    let packed = load256_u8(qs);
    let quarters = [
        packed,
        _mm256_srli_epi16::<2>(packed),
        _mm256_srli_epi16::<4>(packed),
        _mm256_srli_epi16::<6>(packed),
    ];
    let mut acc = _mm256_setzero_si256();
    for (k, shifted) in quarters.into_iter().enumerate() {
        let q = _mm256_or_si256(_mm256_and_si256(shifted, three), high(k as u32));
        let products = _mm256_maddubs_epi16(q, load256_i8(array_at(q8, 32 * k)));
        let s = _mm256_shuffle_epi8(scales, word_selector(2 * k as i16, 2 * k as i16 + 1));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(products, s));
    }
    acc
}

/// `(Σ_j sc_j Σ q·q8, Σ_j m_j bsum_j)` of one Q2_K block, 8 lanes each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2k_block(w: &BlockQ2K, a: &BlockQ8K) -> (__m256i, __m256i) {
    let packed_scales = load128_u8(&w.scales);
    let low4 = _mm_set1_epi8(0x0F);
    let scales16 = _mm256_cvtepu8_epi16(_mm_and_si128(packed_scales, low4));
    let mins16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed_scales), low4));
    let offsets = _mm256_madd_epi16(mins16, load256_u8(array_at(a.bsums.as_flattened(), 0)));
    let no_high = |_: u32| _mm256_setzero_si256();
    let first = two_bit_half(
        array_at(&w.qs, 0),
        array_at(&a.qs, 0),
        _mm256_permute2x128_si256::<0x00>(scales16, scales16),
        no_high,
    );
    let second = two_bit_half(
        array_at(&w.qs, 32),
        array_at(&a.qs, 128),
        _mm256_permute2x128_si256::<0x11>(scales16, scales16),
        no_high,
    );
    (_mm256_add_epi32(first, second), offsets)
}

/// Q2_K · Q8_K over whole rows of blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q2k_q8k(w: &[BlockQ2K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_offsets = _mm256_setzero_ps();
    for (wb, ab) in w.iter().zip(a) {
        let (d, dmin) = f16_pair(wb.d, wb.dmin);
        let d8 = ab.scale();
        let (scaled, offsets) = q2k_block(wb, ab);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(scaled), acc);
        acc_offsets = _mm256_fmadd_ps(
            _mm256_set1_ps(dmin * d8),
            _mm256_cvtepi32_ps(offsets),
            acc_offsets,
        );
    }
    hsum_ps(_mm256_sub_ps(acc, acc_offsets))
}

#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q2k_block_sums(w: &BlockQ2K, a: &BlockQ8K) -> (i32, i32) {
    let (scaled, offsets) = q2k_block(w, a);
    (hsum_epi32(scaled), hsum_epi32(offsets))
}

/// The sixteen Q3_K scales (6-bit, biased by 32) as signed bytes, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_scales(packed: &[u8; 12]) -> __m128i {
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (low, mid, high) = (word(0), word(4), word(8));
    let nibbles = 0x0F0F_0F0F;
    let pairs = 0x0303_0303;
    let s_0_3 = (low & nibbles) | ((high & pairs) << 4);
    let s_4_7 = (mid & nibbles) | (((high >> 2) & pairs) << 4);
    let s_8_11 = ((low >> 4) & nibbles) | (((high >> 4) & pairs) << 4);
    let s_12_15 = ((mid >> 4) & nibbles) | (((high >> 6) & pairs) << 4);
    let biased = _mm_setr_epi32(s_0_3 as i32, s_4_7 as i32, s_8_11 as i32, s_12_15 as i32);
    _mm_sub_epi8(biased, _mm_set1_epi8(32))
}

/// `Σ_j sc_j Σ q·q8` of one Q3_K block as 8 lanes. The kernel multiplies the unsigned
/// level `q + 4` (low bits | high bit · 4) and takes `4 Σ_j sc_j bsum_j` back off.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3k_block(w: &BlockQ3K, a: &BlockQ8K) -> __m256i {
    let scales16 = _mm256_cvtepi8_epi16(q3k_scales(&w.scales));
    let offset = _mm256_madd_epi16(scales16, load256_u8(array_at(a.bsums.as_flattened(), 0)));
    let hmask = load256_u8(&w.hmask);
    let first = two_bit_half(
        array_at(&w.qs, 0),
        array_at(&a.qs, 0),
        _mm256_permute2x128_si256::<0x00>(scales16, scales16),
        |k| move_bit(hmask, k, 2),
    );
    let second = two_bit_half(
        array_at(&w.qs, 32),
        array_at(&a.qs, 128),
        _mm256_permute2x128_si256::<0x11>(scales16, scales16),
        |k| move_bit(hmask, 4 + k, 2),
    );
    _mm256_sub_epi32(
        _mm256_add_epi32(first, second),
        _mm256_slli_epi32::<2>(offset),
    )
}

/// Q3_K · Q8_K over whole rows of blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q3k_q8k(w: &[BlockQ3K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (wb, ab) in w.iter().zip(a) {
        let d = f16_one(wb.d) * ab.scale();
        acc = _mm256_fmadd_ps(
            _mm256_set1_ps(d),
            _mm256_cvtepi32_ps(q3k_block(wb, ab)),
            acc,
        );
    }
    hsum_ps(acc)
}

#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q3k_block_sum(w: &BlockQ3K, a: &BlockQ8K) -> i32 {
    hsum_epi32(q3k_block(w, a))
}

/// `(Σ_j sc_j Σ q·q8 as 8 lanes, Σ_j m_j Σ q8 as 4 lanes)` of one Q5_K block: Q4_K's
/// nibbles with bit `e / 32` of `qh[e % 32]` as bit 4.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q5k_block(w: &BlockQ5K, a: &BlockQ8K) -> (__m256i, __m128i) {
    let (scales, mins) = unpack_scale_min_k4_words(&w.scales);
    let offsets = k4_offset_lanes(mins, a);
    let scales16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scales as i64)));
    let low4 = _mm256_set1_epi8(0x0F);
    let qh = load256_u8(&w.qh);
    let mut acc = _mm256_setzero_si256();
    for chunk in 0..4 {
        let packed = load256_u8(array_at(&w.qs, 32 * chunk));
        let bit = 2 * chunk as u32;
        let q_low = _mm256_or_si256(_mm256_and_si256(packed, low4), move_bit(qh, bit, 4));
        let q_high = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low4),
            move_bit(qh, bit + 1, 4),
        );
        let p_low = _mm256_maddubs_epi16(q_low, load256_i8(array_at(&a.qs, 64 * chunk)));
        let p_high = _mm256_maddubs_epi16(q_high, load256_i8(array_at(&a.qs, 64 * chunk + 32)));
        let sub = 2 * chunk as i16;
        let s_low = _mm256_shuffle_epi8(scales16, word_selector(sub, sub));
        let s_high = _mm256_shuffle_epi8(scales16, word_selector(sub + 1, sub + 1));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p_low, s_low));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p_high, s_high));
    }
    (acc, offsets)
}

/// Q5_K · Q8_K over whole rows of blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn vec_dot_q5k_q8k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_offsets = _mm_setzero_ps();
    for (wb, ab) in w.iter().zip(a) {
        let (d, dmin) = f16_pair(wb.d, wb.dmin);
        let d8 = ab.scale();
        let (scaled, offsets) = q5k_block(wb, ab);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * d8), _mm256_cvtepi32_ps(scaled), acc);
        acc_offsets = _mm_fmadd_ps(
            _mm_set1_ps(dmin * d8),
            _mm_cvtepi32_ps(offsets),
            acc_offsets,
        );
    }
    hsum_ps(acc) - hsum_ps128(acc_offsets)
}

#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q5k_block_sums(w: &BlockQ5K, a: &BlockQ8K) -> (i32, i32) {
    let (scaled, offsets) = q5k_block(w, a);
    let offsets =
        _mm256_blend_epi32::<0x0F>(_mm256_setzero_si256(), _mm256_castsi128_si256(offsets));
    (hsum_epi32(scaled), hsum_epi32(offsets))
}

/// Largest |x| of a 256-float block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_amax(block: &[f32; QK_K]) -> f32 {
    let magnitude = _mm256_set1_ps(-0.0);
    let mut amax = _mm256_setzero_ps();
    for i in 0..QK_K / 8 {
        amax = _mm256_max_ps(
            amax,
            _mm256_andnot_ps(magnitude, load_ps(array_at(block, 8 * i))),
        );
    }
    let m = _mm_max_ps(
        _mm256_castps256_ps128(amax),
        _mm256_extractf128_ps::<1>(amax),
    );
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// Q8_K quantization; writes exactly the bytes of the scalar reference (same products,
/// `cvtps2dq` rounds half to even like `fit::nearest_int`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for (block, out) in x.chunks_exact(QK_K).zip(out) {
        let block: &[f32; QK_K] = array_at(block, 0);
        let Some(inv) = inverse_step(block_amax(block)) else {
            *out = BlockQ8K {
                d: [0; 4],
                qs: [0; QK_K],
                bsums: [[0; 2]; QK_K / 16],
            };
            continue;
        };
        let inv_v = _mm256_set1_ps(inv);
        // Per 32 quants: eight i32 lanes, lane k the sum of quants 4k..4k+4.
        let mut quad_sums = [_mm256_setzero_si256(); 8];
        for (i, quad_sum) in quad_sums.iter_mut().enumerate() {
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                let v = _mm256_mul_ps(load_ps(array_at(block, 32 * i + 8 * k)), inv_v);
                _mm256_cvtps_epi32(v)
            });
            // packs interleave 128-bit lanes; `order` restores element order. Values are
            // already within ±127, so saturation never changes them.
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let packed = _mm256_permutevar8x32_epi32(packed, order);
            let dst: &mut [i8; 32] = (&mut out.qs[32 * i..32 * i + 32])
                .try_into()
                .expect("32 quants");
            store256_i8(dst, packed);
            *quad_sum = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, packed), ones16);
        }
        // Two rounds of hadd: low lanes then hold bsums 0,2,4,6 (8,10,12,14), high lanes
        // 1,3,5,7 (9,...,15); packing and one interleave put them in order.
        let sums_0_7 = _mm256_hadd_epi32(
            _mm256_hadd_epi32(quad_sums[0], quad_sums[1]),
            _mm256_hadd_epi32(quad_sums[2], quad_sums[3]),
        );
        let sums_8_15 = _mm256_hadd_epi32(
            _mm256_hadd_epi32(quad_sums[4], quad_sums[5]),
            _mm256_hadd_epi32(quad_sums[6], quad_sums[7]),
        );
        let words = _mm256_packs_epi32(sums_0_7, sums_8_15);
        let even = _mm256_castsi256_si128(words);
        let odd = _mm256_extracti128_si256::<1>(words);
        let bsums = out.bsums.as_flattened_mut();
        store128_u8(
            (&mut bsums[0..16]).try_into().expect("16 bytes"),
            _mm_unpacklo_epi16(even, odd),
        );
        store128_u8(
            (&mut bsums[16..32]).try_into().expect("16 bytes"),
            _mm_unpackhi_epi16(even, odd),
        );
        out.d = (1.0 / inv).to_le_bytes();
    }
}
