//! AVX-512 kernels (F, BW, VL; VNNI `vpdpbusd` where present), 512-bit.
//!
//! The tiled integer kernels unpack four Q4_0/Q4_1/Q5_0/Q5_1 blocks (or two Q8_0 blocks) per
//! 512-bit register with one two-source word permute straight from the raw row bytes, so
//! blocks of any byte stride need no scalar gathering; block scales (and Q5's `qh` words)
//! come out of the same loaded registers with a word permute (`vcvtph2ps` for the scales).

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::avx2::{self, Dot256};
use crate::pack::{drive, BytePair, NibbleGroup, NibbleWeights, Tiles};
use crate::GgmlType;

/// How a kernel forms unsigned × signed byte dots into 32-bit lanes (VNNI or not).
pub(crate) trait DotI8 {
    /// `acc` + Σ u1·s1 + Σ u2·s2 per 4-byte lane, where u1, u2 are nibbles (0..16).
    ///
    /// # Safety
    /// The implementor's ISA must be available: AVX-512 F/BW, plus VNNI for [`Vnni`].
    unsafe fn dot_nibbles(
        acc: __m512i,
        u1: __m512i,
        s1: __m512i,
        u2: __m512i,
        s2: __m512i,
    ) -> __m512i;
    /// Σ w·a per 4-byte lane for signed `w` and `a`, exact for `a` > −128. `corr` must hold
    /// −128 · Σa per lane (the VNNI form biases `w` to unsigned and takes the bias back out).
    ///
    /// # Safety
    /// The implementor's ISA must be available: AVX-512 F/BW, plus VNNI for [`Vnni`].
    unsafe fn dot_signed(corr: __m512i, w: __m512i, a: __m512i) -> __m512i;
}

/// AVX-512 VNNI: `vpdpbusd`.
pub(crate) struct Vnni;
/// AVX-512 BW without VNNI: `vpmaddubsw` + `vpmaddwd`.
pub(crate) struct NoVnni;

impl DotI8 for Vnni {
    #[inline(always)]
    unsafe fn dot_nibbles(
        acc: __m512i,
        u1: __m512i,
        s1: __m512i,
        u2: __m512i,
        s2: __m512i,
    ) -> __m512i {
        // SAFETY: the `DotI8` contract makes the caller guarantee AVX-512 F/BW/VNNI, which
        // is all `vpdpbusd` needs; only registers are touched.
        unsafe { _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, u1, s1), u2, s2) }
    }

    #[inline(always)]
    unsafe fn dot_signed(corr: __m512i, w: __m512i, a: __m512i) -> __m512i {
        // SAFETY: the `DotI8` contract makes the caller guarantee AVX-512 F/BW/VNNI, which
        // is all `vpdpbusd` needs; only registers are touched.
        unsafe { _mm512_dpbusd_epi32(corr, _mm512_xor_si512(w, _mm512_set1_epi8(-128)), a) }
    }
}

impl DotI8 for NoVnni {
    #[inline(always)]
    unsafe fn dot_nibbles(
        acc: __m512i,
        u1: __m512i,
        s1: __m512i,
        u2: __m512i,
        s2: __m512i,
    ) -> __m512i {
        // SAFETY: the `DotI8` contract makes the caller guarantee AVX-512 F/BW; only registers are
        // touched.
        unsafe {
            // |pair sums| ≤ 2 · 2 · 15 · 128: no 16-bit saturation.
            let pairs =
                _mm512_add_epi16(_mm512_maddubs_epi16(u1, s1), _mm512_maddubs_epi16(u2, s2));
            _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
        }
    }

    #[inline(always)]
    unsafe fn dot_signed(_corr: __m512i, w: __m512i, a: __m512i) -> __m512i {
        // SAFETY: the `DotI8` contract makes the caller guarantee AVX-512 F/BW; only registers are
        // touched.
        unsafe {
            let negative = _mm512_movepi8_mask(w);
            let a_signed = _mm512_mask_sub_epi8(a, negative, _mm512_setzero_si512(), a);
            let pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(w), a_signed);
            _mm512_madd_epi16(pairs, _mm512_set1_epi16(1))
        }
    }
}

/// 256-bit VNNI dot for the single-row kernels shared with AVX2.
pub(crate) struct Vnni256;

impl Dot256 for Vnni256 {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the `Dot256` contract makes the caller guarantee AVX-512 VNNI + VL, which
        // is all 256-bit `vpdpbusd` needs; only registers are touched.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
    }
}

/// Word indices for `vpermt2w`: 8 code words per block, `blocks_per_reg` blocks of
/// `words_per_block` words, codes starting at word `first` of each block.
const fn code_index(words_per_block: u16, first: u16, words_per_lane_block: u16) -> [u16; 32] {
    let mut idx = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        let block = i as u16 / words_per_lane_block;
        idx[i] = block * words_per_block + first + i as u16 % words_per_lane_block;
        i += 1;
    }
    idx
}

/// Word indices for `vpermw` that spread word `word` of each block over `lanes` f32 lanes
/// (16 results; the upper 16 indices are unused).
const fn scale_index(words_per_block: u16, word: u16, lanes: u16) -> [u16; 32] {
    let mut idx = [0u16; 32];
    let mut i = 0;
    while i < 16 {
        idx[i] = (i as u16 / lanes) * words_per_block + word;
        i += 1;
    }
    idx
}

/// Word indices for `vpermt2w` that put the low `qh` word of blocks 0..4 in words 0..4 and
/// the high one in words 4..8, so that qword 0 is the fifth-bit mask of the low nibbles of
/// a group (bit 16b + i = weight i of block b) and qword 1 that of the high nibbles.
const fn qh_index(words_per_block: u16, word: u16) -> [u16; 32] {
    let mut idx = [0u16; 32];
    let mut b = 0;
    while b < 4 {
        idx[b] = b as u16 * words_per_block + word;
        idx[4 + b] = b as u16 * words_per_block + word + 1;
        b += 1;
    }
    idx
}

// Q4_0 block: 9 words (d, qs[16]); Q4_1: 10 words (d, m, qs[16]); Q8_0: 17 words (d, qs[32]).
// Q5_0: 11 words (d, qh[2], qs[16]); Q5_1: 12 words (d, m, qh[2], qs[16]).
static Q4_0_CODES: [u16; 32] = code_index(9, 1, 8);
static Q4_0_D: [u16; 32] = scale_index(9, 0, 4);
static Q4_1_CODES: [u16; 32] = code_index(10, 2, 8);
static Q4_1_D: [u16; 32] = scale_index(10, 0, 4);
static Q4_1_M: [u16; 32] = scale_index(10, 1, 4);
static Q5_0_CODES: [u16; 32] = code_index(11, 3, 8);
static Q5_0_D: [u16; 32] = scale_index(11, 0, 4);
static Q5_0_QH: [u16; 32] = qh_index(11, 1);
static Q5_1_CODES: [u16; 32] = code_index(12, 4, 8);
static Q5_1_D: [u16; 32] = scale_index(12, 0, 4);
static Q5_1_M: [u16; 32] = scale_index(12, 1, 4);
static Q5_1_QH: [u16; 32] = qh_index(12, 2);
static Q8_0_CODES: [u16; 32] = code_index(17, 1, 16);
static Q8_0_D: [u16; 32] = scale_index(17, 0, 8);

/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn load_index(idx: &'static [u16; 32]) -> __m512i {
    // SAFETY: the caller guarantees AVX-512F; `idx` is a live reference to 32 u16
    // (64 bytes), which the unaligned load reads exactly.
    unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// 16 f16 values selected from the words of `z` by `idx`, as f32.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL: only call this from a kernel compiled with
/// those features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn gather_scales(idx: __m512i, z: __m512i) -> __m512 {
    // SAFETY: the caller guarantees AVX-512 F/BW/VL are available (this fn's contract);
    // only registers are touched.
    unsafe { _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(idx, z))) }
}

/// 16 f16 values selected from the 64 words of `z0`:`z1` by `idx`, as f32.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL: only call this from a kernel compiled with
/// those features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn gather_scales2(idx: __m512i, z0: __m512i, z1: __m512i) -> __m512 {
    // SAFETY: the caller guarantees AVX-512 F/BW/VL are available (this fn's contract);
    // only registers are touched.
    unsafe {
        _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(
            z0, idx, z1,
        )))
    }
}

/// Horizontal sums of a tile of accumulators.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL: only call this from a kernel compiled with
/// those features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn reduce_tile<const R: usize, const T: usize>(acc: &[[__m512; T]; R]) -> [[f32; T]; R] {
    // SAFETY: the caller guarantees AVX-512 F/BW/VL are available (this fn's contract);
    // only registers and the borrowed tile are read.
    unsafe {
        let mut sums = [[0.0f32; T]; R];
        for (sums_r, acc_r) in sums.iter_mut().zip(acc) {
            for (s, &v) in sums_r.iter_mut().zip(acc_r) {
                *s = _mm512_reduce_add_ps(v);
            }
        }
        sums
    }
}

/// Mask of the low `n` bits (n ≤ 32).
#[inline(always)]
fn low_bits(n: usize) -> __mmask32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

// ---------------------------------------------------------------------------------------
// f32 ops

/// Loads 16 weights of a float row type as f32.
pub(crate) trait FloatRow16 {
    /// Bytes per weight.
    const BYTES: usize;
    /// Weights `0..16` at `p`.
    ///
    /// # Safety
    /// AVX-512F must be available and `p` readable for `16 · BYTES` bytes (any alignment).
    unsafe fn load16(p: *const u8) -> __m512;
    /// The weights of `p` selected by `mask`, zero elsewhere; unselected ones are not read.
    ///
    /// # Safety
    /// AVX-512F (plus BW and VL for 2-byte weights) must be available, and the weights
    /// selected by `mask` readable at `p` (any alignment).
    unsafe fn load_masked(p: *const u8, mask: __mmask16) -> __m512;
}

impl FloatRow16 for avx2::F32Row {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        // SAFETY: per the `FloatRow16` contract the caller guarantees AVX-512F and that `p` is
        // readable for 16 f32 (64 bytes); `loadu` needs no alignment.
        unsafe { _mm512_loadu_ps(p.cast()) }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const u8, mask: __mmask16) -> __m512 {
        // SAFETY: per the `FloatRow16` contract the caller guarantees AVX-512F and that the
        // f32 selected by `mask` are readable at `p`; masked-off lanes are not accessed.
        unsafe { _mm512_maskz_loadu_ps(mask, p.cast()) }
    }
}

impl FloatRow16 for avx2::F16Row {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        // SAFETY: per the `FloatRow16` contract the caller guarantees AVX-512F and that `p` is
        // readable for 16 f16 (32 bytes); `loadu` needs no alignment.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const u8, mask: __mmask16) -> __m512 {
        // SAFETY: per the `FloatRow16` contract the caller guarantees AVX-512 F/BW/VL and that
        // the f16 selected by `mask` are readable at `p`; masked-off words are not accessed.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

impl FloatRow16 for avx2::Bf16Row {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> __m512 {
        // SAFETY: per the `FloatRow16` contract the caller guarantees AVX-512F and that `p` is
        // readable for 16 bf16 (32 bytes); `loadu` needs no alignment.
        unsafe {
            let widened = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(widened))
        }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const u8, mask: __mmask16) -> __m512 {
        // SAFETY: per the `FloatRow16` contract the caller guarantees AVX-512 F/BW/VL and that
        // the bf16 selected by `mask` are readable at `p`; masked-off words are not accessed.
        unsafe {
            let widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(widened))
        }
    }
}

/// # Safety
/// AVX-512F (plus BW and VL for `F16Row` / `Bf16Row`) must be available; `w` must be
/// readable for `n · W::BYTES` bytes and `act` for `4n` bytes (any alignment).
#[inline(always)]
unsafe fn dot_float_body<W: FloatRow16>(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: the caller guarantees the ISA `W` needs and that `w` is readable for
    // `n · W::BYTES` bytes and `act` for `n` f32. Full loads cover indices `i..i + 16 ≤ n`;
    // the tail mask selects exactly indices `i..n` (`n − i < 16`), and masked-off lanes are
    // not accessed.
    unsafe {
        let x = act.cast::<f32>();
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, lane) in acc.iter_mut().enumerate() {
                let wv = W::load16(w.add((i + 16 * j) * W::BYTES));
                *lane = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(i + 16 * j)), *lane);
            }
            i += 64;
        }
        while i + 16 <= n {
            let wv = W::load16(w.add(i * W::BYTES));
            acc[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(i)), acc[0]);
            i += 16;
        }
        if i < n {
            let mask = (1u16 << (n - i)) - 1;
            let wv = W::load_masked(w.add(i * W::BYTES), mask);
            acc[1] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x.add(i)), acc[1]);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }
}

/// Σ a[i]·b[i] over `n` floats read unaligned.
///
/// # Safety
/// AVX-512F available; `a` and `b` readable for `n` floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: AVX-512F is enabled here and guaranteed by the caller (the f32ops dispatcher
    // checks `cpu::isa()`); `a` and `b` hold `n` f32 each, as `dot_float_body::<F32Row>`
    // requires.
    unsafe { dot_float_body::<avx2::F32Row>(a.cast(), b.cast(), n) }
}

/// F16 row · F32 row (f32 values as little-endian bytes, any alignment).
///
/// # Safety
/// AVX-512 F/BW/VL available; `w` readable for `2n` bytes, `act` for `4n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dot_f16_f32(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: AVX-512 F/BW/VL are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`); `w` holds `2n` bytes and `act` `4n`, as `dot_float_body` requires.
    unsafe { dot_float_body::<avx2::F16Row>(w, act, n) }
}

/// BF16 row · F32 row.
///
/// # Safety
/// AVX-512 F/BW/VL available; `w` readable for `2n` bytes, `act` for `4n`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dot_bf16_f32(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: AVX-512 F/BW/VL are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`); `w` holds `2n` bytes and `act` `4n`, as `dot_float_body` requires.
    unsafe { dot_float_body::<avx2::Bf16Row>(w, act, n) }
}

/// F32 row · F32 row, both as bytes.
///
/// # Safety
/// AVX-512F available; both readable for `4n` bytes.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot_f32_bytes(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: AVX-512F is enabled here and guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); both rows hold `4n` bytes, as `dot_float_body::<F32Row>` requires.
    unsafe { dot_float_body::<avx2::F32Row>(w, act, n) }
}

/// y[i] += alpha · x[i] over `n` floats.
///
/// # Safety
/// AVX-512F available; `x` readable and `y` writable for `n` floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn axpy_f32(alpha: f32, x: *const f32, y: *mut f32, n: usize) {
    // SAFETY: AVX-512F is guaranteed by the caller (checked by the f32ops dispatcher); `x`
    // is readable and `y` writable for `n` floats. Full accesses cover `i..i + 32 ≤ n`; the
    // tail mask selects only indices `< n`, and masked-off lanes are not accessed.
    unsafe {
        let a = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i + 32 <= n {
            let v0 = _mm512_fmadd_ps(a, _mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(y.add(i)));
            let v1 = _mm512_fmadd_ps(
                a,
                _mm512_loadu_ps(x.add(i + 16)),
                _mm512_loadu_ps(y.add(i + 16)),
            );
            _mm512_storeu_ps(y.add(i), v0);
            _mm512_storeu_ps(y.add(i + 16), v1);
            i += 32;
        }
        while i < n {
            let mask = if n - i >= 16 {
                u16::MAX
            } else {
                (1u16 << (n - i)) - 1
            };
            let v = _mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(mask, x.add(i)),
                _mm512_maskz_loadu_ps(mask, y.add(i)),
            );
            _mm512_mask_storeu_ps(y.add(i), mask, v);
            i += 16;
        }
    }
}

/// x[i] *= s over `n` floats.
///
/// # Safety
/// AVX-512F available; `x` writable for `n` floats.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scale_f32(x: *mut f32, s: f32, n: usize) {
    // SAFETY: AVX-512F is guaranteed by the caller (checked by the f32ops dispatcher); `x`
    // is writable for `n` floats and each mask selects only indices `< n`; masked-off lanes
    // are not accessed.
    unsafe {
        let factor = _mm512_set1_ps(s);
        let mut i = 0;
        while i < n {
            let mask = if n - i >= 16 {
                u16::MAX
            } else {
                (1u16 << (n - i)) - 1
            };
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x.add(i)), factor);
            _mm512_mask_storeu_ps(x.add(i), mask, v);
            i += 16;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Activation quantization

/// Rounds to the nearest integer, ties to even (as llama.cpp's activation quantizers do).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL: only call this from a kernel compiled with
/// those features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn round_half_even(v: __m512) -> __m512 {
    // SAFETY: the caller guarantees AVX-512 F/BW/VL are available (this fn's contract);
    // only registers are touched.
    unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v) }
}

/// Quantizes one block of 32 floats at `x` to codes at `qs`; returns (d, Σq).
///
/// # Safety
/// AVX-512 F/BW/VL must be available; `x` must be readable for 32 f32 and `qs` writable for
/// 32 bytes (any alignment).
#[inline(always)]
unsafe fn quantize_block(x: *const f32, qs: *mut u8) -> (f32, i32) {
    // SAFETY: the caller guarantees AVX-512 F/BW/VL and that `x` is readable for 32 f32
    // and `qs` writable for 32 bytes; the loads cover `x[0..32]` and the two 16-byte stores
    // `qs[0..32]`, all unaligned.
    unsafe {
        let v0 = _mm512_loadu_ps(x);
        let v1 = _mm512_loadu_ps(x.add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        // Same scalar operations as the reference, so the codes match it bit for bit.
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q0 = _mm512_cvtps_epi32(round_half_even(_mm512_mul_ps(v0, id)));
        let q1 = _mm512_cvtps_epi32(round_half_even(_mm512_mul_ps(v1, id)));
        _mm_storeu_si128(qs.cast(), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(qs.add(16).cast(), _mm512_cvtepi32_epi8(q1));
        (d, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)))
    }
}

/// Q8_0 quantization of `nb` blocks, bit-identical to the scalar reference.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C available; `x` readable for `32·nb` floats, `out` writable for
/// `34·nb` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn quantize_row_q8_0(x: *const f32, out: *mut u8, nb: usize) {
    // SAFETY: AVX-512 F/BW/VL and F16C are guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); for `b < nb`, `x + 32b` has 32 readable floats and `out + 34b` a
    // 34-byte writable block: 2 bytes of `d`, then 32 codes written by `quantize_block`.
    unsafe {
        for b in 0..nb {
            let block = out.add(34 * b);
            let (d, _) = quantize_block(x.add(32 * b), block.add(2));
            let bytes = avx2::f16_bytes(d);
            block.copy_from_nonoverlapping(bytes.as_ptr(), 2);
        }
    }
}

/// Q8_1 quantization of `nb` blocks, bit-identical to the scalar reference.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C available; `x` readable for `32·nb` floats, `out` writable for
/// `36·nb` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn quantize_row_q8_1(x: *const f32, out: *mut u8, nb: usize) {
    // SAFETY: AVX-512 F/BW/VL and F16C are guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); for `b < nb`, `x + 32b` has 32 readable floats and `out + 36b` a
    // 36-byte writable block: `d` and `s` (2 bytes each), then 32 codes.
    unsafe {
        for b in 0..nb {
            let block = out.add(36 * b);
            let (d, sum) = quantize_block(x.add(32 * b), block.add(4));
            let d_bytes = avx2::f16_bytes(d);
            let s_bytes = avx2::f16_bytes(sum as f32 * d);
            block.copy_from_nonoverlapping(d_bytes.as_ptr(), 2);
            block.add(2).copy_from_nonoverlapping(s_bytes.as_ptr(), 2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Single-row dots on raw blocks: the AVX2 bodies with 256-bit `vpdpbusd`.

/// Q4_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX-512 VNNI + VL available; `w` readable for `18·nb` bytes, `act` for `34·nb`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn vec_dot_q4_0_q8_0_vnni(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA, F16C and AVX-512 VNNI + VL (the ISA of `Vnni256`) are enabled here
    // and guaranteed by the caller (dispatch.rs checks `cpu::isa()`); `w` holds `18·nb` bytes
    // and `act` `34·nb`, as the AVX2 body requires.
    unsafe { avx2::vec_dot_q4_0_q8_0_body::<Vnni256>(nb, w, act) }
}

/// Q4_1 · Q8_1 over `nb` blocks.
///
/// # Safety
/// AVX-512 VNNI + VL available; `w` readable for `20·nb` bytes, `act` for `36·nb`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn vec_dot_q4_1_q8_1_vnni(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA, F16C and AVX-512 VNNI + VL (the ISA of `Vnni256`) are enabled here
    // and guaranteed by the caller (dispatch.rs checks `cpu::isa()`); `w` holds `20·nb` bytes
    // and `act` `36·nb`, as the AVX2 body requires.
    unsafe { avx2::vec_dot_q4_1_q8_1_body::<Vnni256>(nb, w, act) }
}

/// Q5_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX-512 VNNI + VL available; `w` readable for `22·nb` bytes, `act` for `34·nb`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn vec_dot_q5_0_q8_0_vnni(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA, F16C and AVX-512 VNNI + VL (the ISA of `Vnni256`) are enabled here
    // and guaranteed by the caller (dispatch.rs checks `cpu::isa()`); `w` holds `22·nb` bytes
    // and `act` `34·nb`, as the AVX2 body requires.
    unsafe { avx2::vec_dot_q5_0_q8_0_body::<Vnni256>(nb, w, act) }
}

/// Q5_1 · Q8_1 over `nb` blocks.
///
/// # Safety
/// AVX-512 VNNI + VL available; `w` readable for `24·nb` bytes, `act` for `36·nb`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn vec_dot_q5_1_q8_1_vnni(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA, F16C and AVX-512 VNNI + VL (the ISA of `Vnni256`) are enabled here
    // and guaranteed by the caller (dispatch.rs checks `cpu::isa()`); `w` holds `24·nb` bytes
    // and `act` `36·nb`, as the AVX2 body requires.
    unsafe { avx2::vec_dot_q5_1_q8_1_body::<Vnni256>(nb, w, act) }
}

/// Q8_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX-512 VNNI + VL available; `w` and `act` readable for `34·nb` bytes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(crate) unsafe fn vec_dot_q8_0_q8_0_vnni(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA, F16C and AVX-512 VNNI + VL (the ISA of `Vnni256`) are enabled here
    // and guaranteed by the caller (dispatch.rs checks `cpu::isa()`); `w` holds `34·nb` bytes
    // and `act` `34·nb`, as the AVX2 body requires.
    unsafe { avx2::vec_dot_q8_0_q8_0_body::<Vnni256>(nb, w, act) }
}

// ---------------------------------------------------------------------------------------
// Tiled matmul over packed activations

/// Accumulators of a nibble tile: the scaled code dots, and (Q4_1) the `m · s` offset terms
/// on a second chain so two dependent FMAs do not serialize each group.
struct NibbleAcc<const R: usize, const T: usize> {
    codes: [[__m512; T]; R],
    offsets: [[__m512; T]; R],
}

/// Q4_0 (`MIN = false`) or Q4_1 (`MIN = true`) rows against packed [`NibbleGroup`]s, four
/// blocks per step; with `FIVE`, Q5_0 / Q5_1 rows, whose `qh` bits become byte masks that
/// add 16 to the nibbles they belong to.
struct NibbleTiles<D, const MIN: bool, const FIVE: bool> {
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    act: *const NibbleGroup,
    n_groups: usize,
    _dot: PhantomData<D>,
}

impl<D: DotI8, const MIN: bool, const FIVE: bool> NibbleTiles<D, MIN, FIVE> {
    const BLOCK_WORDS: usize = 9 + if MIN { 1 } else { 0 } + if FIVE { 2 } else { 0 };
    const GROUP_BYTES: usize = 8 * Self::BLOCK_WORDS;

    /// Adds group `g` of rows `r0..r0+R` × tokens `t0..t0+T` into `acc`. A full group spans
    /// 72 to 96 bytes: 64 in `z0`, the rest (mask `m1`) in `z1`. The last, partial group
    /// loads words `m0` into `z0` and `m1` into `z1` (Q4 tails fit in `z0`, so `m1` is 0);
    /// masked-off words are neither read nor nonzero.
    ///
    /// # Safety
    /// The ISA of `D` (AVX-512 F/BW/VL, plus VNNI for `Vnni`) must be available;
    /// `r0 + R ≤ n_rows`, `t0 + T ≤ n_tok`, `g < n_groups`, and `m0` / `m1` must select only
    /// words of group `g` (all of a full group when `FULL`).
    #[inline(always)]
    unsafe fn group<const R: usize, const T: usize, const FULL: bool>(
        &self,
        acc: &mut NibbleAcc<R, T>,
        r0: usize,
        t0: usize,
        g: usize,
        m0: __mmask32,
        m1: __mmask32,
    ) {
        // SAFETY: the caller guarantees AVX-512 F/BW/VL (VNNI for `Vnni`), `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok` and `g < n_groups`. Group `g` of row `r0 + r` lies inside the row; the
        // masks `m0` / `m1` select only its words (a full group's tail past byte 64, or a partial
        // group's blocks), and masked-off words are not accessed. `act` holds `n_groups` aligned
        // groups per token, so `a` is a valid `NibbleGroup` whose fields the aligned loads read.
        unsafe {
            let (codes_idx, d_idx, qh_idx) = match (MIN, FIVE) {
                (false, false) => (&Q4_0_CODES, &Q4_0_D, &Q5_0_QH),
                (true, false) => (&Q4_1_CODES, &Q4_1_D, &Q5_1_QH),
                (false, true) => (&Q5_0_CODES, &Q5_0_D, &Q5_0_QH),
                (true, true) => (&Q5_1_CODES, &Q5_1_D, &Q5_1_QH),
            };
            let idx_codes = load_index(codes_idx);
            let idx_d = load_index(d_idx);
            let idx_m = load_index(if FIVE { &Q5_1_M } else { &Q4_1_M });
            let idx_qh = load_index(qh_idx);
            let low4 = _mm512_set1_epi8(0x0F);
            let sixteen = _mm512_set1_epi8(16);
            for (r, (acc_r, acc_m_r)) in
                acc.codes.iter_mut().zip(acc.offsets.iter_mut()).enumerate()
            {
                let wp = self
                    .w
                    .add((r0 + r) * self.row_bytes + g * Self::GROUP_BYTES);
                let (z0, z1) = if FULL {
                    (
                        _mm512_loadu_si512(wp.cast()),
                        _mm512_maskz_loadu_epi16(m1, wp.add(64).cast()),
                    )
                } else if m1 != 0 {
                    // The partial group is longer than 64 bytes, so `wp + 64` is in the row.
                    (
                        _mm512_maskz_loadu_epi16(m0, wp.cast()),
                        _mm512_maskz_loadu_epi16(m1, wp.add(64).cast()),
                    )
                } else {
                    (
                        _mm512_maskz_loadu_epi16(m0, wp.cast()),
                        _mm512_setzero_si512(),
                    )
                };
                // Lane b of `codes` = the 16 code bytes of block b.
                let codes = _mm512_permutex2var_epi16(z0, idx_codes, z1);
                let mut lo = _mm512_and_si512(codes, low4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(codes), low4);
                let (dw, mw) = if FIVE {
                    let qh = _mm512_castsi512_si128(_mm512_permutex2var_epi16(z0, idx_qh, z1));
                    let lo_bits = _mm_cvtsi128_si64(qh) as u64;
                    let hi_bits = _mm_extract_epi64::<1>(qh) as u64;
                    lo = _mm512_mask_add_epi8(lo, lo_bits, lo, sixteen);
                    hi = _mm512_mask_add_epi8(hi, hi_bits, hi, sixteen);
                    let mw = if MIN {
                        gather_scales2(idx_m, z0, z1)
                    } else {
                        _mm512_setzero_ps()
                    };
                    (gather_scales2(idx_d, z0, z1), mw)
                } else {
                    let mw = if MIN {
                        gather_scales(idx_m, z0)
                    } else {
                        _mm512_setzero_ps()
                    };
                    (gather_scales(idx_d, z0), mw)
                };
                for (t, (acc_rt, acc_m_rt)) in acc_r.iter_mut().zip(acc_m_r.iter_mut()).enumerate()
                {
                    let a = &*self.act.add((t0 + t) * self.n_groups + g);
                    let init = if MIN {
                        _mm512_setzero_si512()
                    } else if FIVE {
                        // −16 · Σa for codes biased by 16.
                        let corr = _mm512_load_si512(a.corr.as_ptr().cast());
                        _mm512_add_epi32(corr, corr)
                    } else {
                        _mm512_load_si512(a.corr.as_ptr().cast())
                    };
                    let a_lo = _mm512_load_si512(a.lo.as_ptr().cast());
                    let a_hi = _mm512_load_si512(a.hi.as_ptr().cast());
                    let sums = D::dot_nibbles(init, lo, a_lo, hi, a_hi);
                    let scaled =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_load_ps(a.da.as_ptr()));
                    *acc_rt = _mm512_fmadd_ps(scaled, dw, *acc_rt);
                    if MIN {
                        *acc_m_rt = _mm512_fmadd_ps(mw, _mm512_load_ps(a.sa.as_ptr()), *acc_m_rt);
                    }
                }
            }
        }
    }
}

impl<D: DotI8, const MIN: bool, const FIVE: bool> Tiles for NibbleTiles<D, MIN, FIVE> {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        // SAFETY: the `Tiles` contract gives the ISA of `D` and `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok`. Groups `0..full_groups` are full; the tail group (`nb % 4` blocks) gets
        // masks of exactly its `tail · BLOCK_WORDS` words, as `group` requires.
        unsafe {
            let mut acc = NibbleAcc {
                codes: [[_mm512_setzero_ps(); T]; R],
                offsets: [[_mm512_setzero_ps(); T]; R],
            };
            let full_groups = self.nb / 4;
            let m1 = low_bits(4 * Self::BLOCK_WORDS - 32);
            for g in 0..full_groups {
                self.group::<R, T, true>(&mut acc, r0, t0, g, u32::MAX, m1);
            }
            let tail = self.nb % 4;
            if tail > 0 {
                let words = tail * Self::BLOCK_WORDS;
                let m0 = low_bits(words);
                let m1 = low_bits(words.saturating_sub(32));
                self.group::<R, T, false>(&mut acc, r0, t0, full_groups, m0, m1);
            }
            if MIN {
                for (acc_r, acc_m_r) in acc.codes.iter_mut().zip(&acc.offsets) {
                    for (v, &m) in acc_r.iter_mut().zip(acc_m_r) {
                        *v = _mm512_add_ps(*v, m);
                    }
                }
            }
            reduce_tile(&acc.codes)
        }
    }
}

/// Q8_0 rows against packed [`BytePair`]s, two blocks per step.
struct ByteTiles<D> {
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    act: *const BytePair,
    n_pairs: usize,
    _dot: PhantomData<D>,
}

impl<D: DotI8> ByteTiles<D> {
    /// Adds pair `p` (68 bytes when full: 64 in `z0`, 4 in `z1`; one 34-byte block in `z0`
    /// when the row has an odd block count and this is its last block).
    ///
    /// # Safety
    /// The ISA of `D` must be available; `r0 + R ≤ n_rows`, `t0 + T ≤ n_tok` and `p < n_pairs`,
    /// with `FULL` only when both blocks of pair `p` exist.
    #[inline(always)]
    unsafe fn pair<const R: usize, const T: usize, const FULL: bool>(
        &self,
        acc: &mut [[__m512; T]; R],
        r0: usize,
        t0: usize,
        p: usize,
    ) {
        // SAFETY: the caller guarantees AVX-512 F/BW/VL (VNNI for `Vnni`), `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok` and `p < n_pairs`. A full pair reads bytes `68p..68p + 68` of the row
        // (64 unmasked + 2 masked words), a lone last block `68p..68p + 34` (17 masked words);
        // masked-off words are not accessed. `a` is an aligned `BytePair` of token `t0 + t`.
        unsafe {
            let idx_codes = load_index(&Q8_0_CODES);
            let idx_d = load_index(&Q8_0_D);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wp = self.w.add((r0 + r) * self.row_bytes + 68 * p);
                let (z0, z1) = if FULL {
                    (
                        _mm512_loadu_si512(wp.cast()),
                        _mm512_maskz_loadu_epi16(0b11, wp.add(64).cast()),
                    )
                } else {
                    (
                        _mm512_maskz_loadu_epi16(low_bits(17), wp.cast()),
                        _mm512_setzero_si512(),
                    )
                };
                // Half b of `codes` = the 32 code bytes of block b.
                let codes = _mm512_permutex2var_epi16(z0, idx_codes, z1);
                let dw = gather_scales(idx_d, z0);
                for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                    let a = &*self.act.add((t0 + t) * self.n_pairs + p);
                    let corr = _mm512_load_si512(a.corr.as_ptr().cast());
                    let sums = D::dot_signed(corr, codes, _mm512_load_si512(a.qs.as_ptr().cast()));
                    let scaled =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_load_ps(a.da.as_ptr()));
                    *acc_rt = _mm512_fmadd_ps(scaled, dw, *acc_rt);
                }
            }
        }
    }
}

impl<D: DotI8> Tiles for ByteTiles<D> {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        // SAFETY: the `Tiles` contract gives the ISA of `D` and `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok`; pairs `0..nb / 2` hold two blocks, and the lone last block of an odd
        // `nb` is read with `FULL = false`, as `pair` requires.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let full_pairs = self.nb / 2;
            for p in 0..full_pairs {
                self.pair::<R, T, true>(&mut acc, r0, t0, p);
            }
            if self.nb % 2 == 1 {
                self.pair::<R, T, false>(&mut acc, r0, t0, full_pairs);
            }
            reduce_tile(&acc)
        }
    }
}

/// Float weight rows (F32, F16, BF16) against F32 activation rows, 16 values per step.
struct FloatTiles<W> {
    w: *const u8,
    row_bytes: usize,
    k: usize,
    act: *const u8,
    act_row_bytes: usize,
    _row: PhantomData<W>,
}

impl<W: FloatRow16> Tiles for FloatTiles<W> {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        // SAFETY: the `Tiles` contract gives AVX-512 F/BW/VL and `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok`. Weight row `r0 + r` spans `k · W::BYTES` bytes and token `t0 + t` `k`
        // f32; full loads cover `i..i + 16 ≤ full`, and the tail mask selects exactly `full..k`
        // (masked-off lanes are not accessed).
        unsafe {
            if R == 1 && T == 1 {
                // One row, one token (decode): the dot kernel, whose four accumulators hide
                // the FMA latency that a single tile accumulator would expose.
                let mut sums = [[0.0f32; T]; R];
                sums[0][0] = dot_float_body::<W>(
                    self.w.add(r0 * self.row_bytes),
                    self.act.add(t0 * self.act_row_bytes),
                    self.k,
                );
                return sums;
            }
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut rows = [std::ptr::null::<u8>(); R];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = self.w.add((r0 + r) * self.row_bytes);
            }
            let mut toks = [std::ptr::null::<f32>(); T];
            for (t, tok) in toks.iter_mut().enumerate() {
                *tok = self.act.add((t0 + t) * self.act_row_bytes).cast();
            }
            let full = self.k / 16 * 16;
            let mut i = 0;
            while i < full {
                let mut wv = [_mm512_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = W::load16(rows[r].add(i * W::BYTES));
                }
                for t in 0..T {
                    let x = _mm512_loadu_ps(toks[t].add(i));
                    for r in 0..R {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], x, acc[r][t]);
                    }
                }
                i += 16;
            }
            if full < self.k {
                let mask = (1u16 << (self.k - full)) - 1;
                let mut wv = [_mm512_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = W::load_masked(rows[r].add(full * W::BYTES), mask);
                }
                for t in 0..T {
                    let x = _mm512_maskz_loadu_ps(mask, toks[t].add(full));
                    for r in 0..R {
                        acc[r][t] = _mm512_fmadd_ps(wv[r], x, acc[r][t]);
                    }
                }
            }
            reduce_tile(&acc)
        }
    }
}

/// Builds the nibble tiles of one weight format and drives them.
///
/// # Safety
/// AVX-512 F/BW/VL (and VNNI for `Vnni`) must be available; `w` must hold `n_rows` rows of
/// `nb` blocks of the format picked by `MIN` / `FIVE`, `packed` `n_tok · ⌈nb/4⌉` groups of
/// the matching activation rows, and `out` `(n_tok − 1) · out_stride + n_rows` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn drive_nibble<D: DotI8, const MIN: bool, const FIVE: bool>(
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[NibbleGroup],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: the caller guarantees the ISA of `D`, that `w` holds `n_rows` rows of `nb`
    // blocks of `2 · BLOCK_WORDS` bytes, `packed` `n_tok · ⌈nb/4⌉` groups and `out`
    // `(n_tok − 1) · out_stride + n_rows` values: exactly what `drive` needs of these tiles.
    unsafe {
        let row_bytes = 2 * NibbleTiles::<D, MIN, FIVE>::BLOCK_WORDS * nb;
        let tiles = NibbleTiles::<D, MIN, FIVE> {
            w: w.as_ptr(),
            row_bytes,
            nb,
            act: packed.as_ptr(),
            n_groups: nb.div_ceil(4),
            _dot: PhantomData,
        };
        drive(&tiles, n_rows, n_tok, row_bytes, out, out_stride);
    }
}

/// # Safety
/// As [`matmul_nibble_vnni`], with the ISA of `D` available.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_nibble_body<D: DotI8>(
    weights: NibbleWeights,
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[NibbleGroup],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: the caller guarantees the ISA of `D` and this fn's shape contract, which is the
    // one `drive_nibble` requires for each format.
    unsafe {
        match weights {
            NibbleWeights::Q4_0 => {
                drive_nibble::<D, false, false>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
            NibbleWeights::Q4_1 => {
                drive_nibble::<D, true, false>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
            NibbleWeights::Q5_0 => {
                drive_nibble::<D, false, true>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
            NibbleWeights::Q5_1 => {
                drive_nibble::<D, true, true>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
        }
    }
}

/// Tiled Q4_0 / Q5_0 · Q8_0 or Q4_1 / Q5_1 · Q8_1 over packed activations, with VNNI.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `w` holds `n_rows` rows of `nb` blocks of `weights`;
/// `packed` holds `n_tok · ⌈nb/4⌉` groups of `weights.act()` rows; `out` holds
/// `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_nibble_vnni(
    weights: NibbleWeights,
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[NibbleGroup],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX-512 F/BW/VL/VNNI (the ISA of `Vnni`) are guaranteed by the caller
    // (matmul.rs checks the ISA), and the shape contract is passed through unchanged.
    unsafe {
        matmul_nibble_body::<Vnni>(weights, w, nb, n_rows, packed, n_tok, out, out_stride);
    }
}

/// [`matmul_nibble_vnni`] without VNNI.
///
/// # Safety
/// AVX-512 F/BW/VL available; otherwise as [`matmul_nibble_vnni`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_nibble_bw(
    weights: NibbleWeights,
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[NibbleGroup],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX-512 F/BW/VL (the ISA of `NoVnni`) are guaranteed by the caller
    // (matmul.rs checks the ISA), and the shape contract is passed through unchanged.
    unsafe {
        matmul_nibble_body::<NoVnni>(weights, w, nb, n_rows, packed, n_tok, out, out_stride);
    }
}

/// # Safety
/// As [`matmul_byte_vnni`], with the ISA of `D` available.
#[inline(always)]
unsafe fn matmul_byte_body<D: DotI8>(
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[BytePair],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: the caller guarantees the ISA of `D`; `w` holds `n_rows` rows of `34 · nb`
    // bytes, `packed` `n_tok · ⌈nb/2⌉` pairs and `out` `(n_tok − 1) · out_stride + n_rows`
    // values, so the tiles satisfy `drive`'s contract.
    unsafe {
        let row_bytes = 34 * nb;
        let tiles = ByteTiles::<D> {
            w: w.as_ptr(),
            row_bytes,
            nb,
            act: packed.as_ptr(),
            n_pairs: nb.div_ceil(2),
            _dot: PhantomData,
        };
        drive(&tiles, n_rows, n_tok, row_bytes, out, out_stride);
    }
}

/// Tiled Q8_0 · Q8_0 over packed activations, with VNNI.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI available; `w` holds `n_rows` rows of `nb` blocks; `packed` holds
/// `n_tok · ⌈nb/2⌉` pairs; `out` holds `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn matmul_byte_vnni(
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[BytePair],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX-512 F/BW/VL/VNNI (the ISA of `Vnni`) are guaranteed by the caller
    // (matmul.rs checks the ISA), and the shape contract is passed through unchanged.
    unsafe {
        matmul_byte_body::<Vnni>(w, nb, n_rows, packed, n_tok, out, out_stride);
    }
}

/// [`matmul_byte_vnni`] without VNNI.
///
/// # Safety
/// AVX-512 F/BW/VL available; otherwise as [`matmul_byte_vnni`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn matmul_byte_bw(
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[BytePair],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX-512 F/BW/VL (the ISA of `NoVnni`) are guaranteed by the caller
    // (matmul.rs checks the ISA), and the shape contract is passed through unchanged.
    unsafe {
        matmul_byte_body::<NoVnni>(w, nb, n_rows, packed, n_tok, out, out_stride);
    }
}

/// Tiled float-weight matmul (F32, F16 or BF16 rows; F32 activation rows).
///
/// # Safety
/// AVX-512 F/BW/VL available; `w` holds `n_rows` rows of `k` values of `ty`, `act` holds
/// `n_tok` f32 rows of `k`; `out` holds `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_float(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX-512 F/BW/VL are guaranteed by the caller (matmul.rs checks the ISA); `w`
    // holds `n_rows` rows of `k` values of `ty` (the row size given to each tile set), `act`
    // `n_tok` rows of `k` f32, and `out` `(n_tok − 1) · out_stride + n_rows` values, so each
    // tile set satisfies `drive`'s contract.
    unsafe {
        let act_row_bytes = 4 * k;
        match ty {
            GgmlType::F16 => {
                let tiles = FloatTiles::<avx2::F16Row> {
                    w: w.as_ptr(),
                    row_bytes: 2 * k,
                    k,
                    act: act.as_ptr(),
                    act_row_bytes,
                    _row: PhantomData,
                };
                drive(&tiles, n_rows, n_tok, 2 * k, out, out_stride);
            }
            GgmlType::BF16 => {
                let tiles = FloatTiles::<avx2::Bf16Row> {
                    w: w.as_ptr(),
                    row_bytes: 2 * k,
                    k,
                    act: act.as_ptr(),
                    act_row_bytes,
                    _row: PhantomData,
                };
                drive(&tiles, n_rows, n_tok, 2 * k, out, out_stride);
            }
            _ => {
                debug_assert_eq!(ty, GgmlType::F32);
                let tiles = FloatTiles::<avx2::F32Row> {
                    w: w.as_ptr(),
                    row_bytes: 4 * k,
                    k,
                    act: act.as_ptr(),
                    act_row_bytes,
                    _row: PhantomData,
                };
                drive(&tiles, n_rows, n_tok, 4 * k, out, out_stride);
            }
        }
    }
}
