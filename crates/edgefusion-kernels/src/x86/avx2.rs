//! AVX2 (+FMA, F16C) kernels, 256-bit. The integer dot bodies are generic over [`Dot256`]
//! so the AVX-512 VNNI build reuses them with `vpdpbusd` on 256-bit registers.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use crate::pack::{drive, BytePair, NibbleGroup, NibbleWeights, Tiles};
use crate::GgmlType;

/// How a kernel forms the dot of 4 unsigned by 4 signed bytes into each 32-bit lane.
pub(crate) trait Dot256 {
    /// Σ u·s over each 4-byte lane. `u` ≤ 128 and `s` ≥ −127 (or `u` ≤ 127 and |s| ≤ 128),
    /// so the 16-bit pair sums of `vpmaddubsw` cannot saturate.
    ///
    /// # Safety
    /// The implementor's ISA must be available: AVX2 for [`Maddubs`], AVX-512 VNNI + VL for
    /// the VNNI implementation.
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i;
}

/// `vpmaddubsw` + `vpmaddwd`: plain AVX2.
pub(crate) struct Maddubs;

impl Dot256 for Maddubs {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the `Dot256` contract makes the caller guarantee AVX2, which is all that
        // `vpmaddubsw` / `vpmaddwd` need; no memory is accessed.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
}

/// Horizontal sum of 8 floats in ggml's `hsum_float_8` order:
/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C: only call this from a kernel compiled with those
/// features whose caller checked `cpu::isa()`.
#[inline(always)]
pub(crate) unsafe fn hsum_ps(v: __m256) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA and F16C are available (this fn's contract); the
    // intrinsics only touch registers.
    unsafe {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }
}

/// Horizontal sums of a tile of accumulators.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C: only call this from a kernel compiled with those
/// features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn reduce_tile<const R: usize, const T: usize>(acc: &[[__m256; T]; R]) -> [[f32; T]; R] {
    // SAFETY: the caller guarantees AVX2, FMA and F16C are available (this fn's contract), as
    // `hsum_ps` requires; only registers and the borrowed tile are read.
    unsafe {
        let mut sums = [[0.0f32; T]; R];
        for (sums_r, acc_r) in sums.iter_mut().zip(acc) {
            for (s, &v) in sums_r.iter_mut().zip(acc_r) {
                *s = hsum_ps(v);
            }
        }
        sums
    }
}

/// Horizontal max of 8 floats (exact: no rounding).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C: only call this from a kernel compiled with those
/// features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn hmax_ps(v: __m256) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA and F16C are available (this fn's contract); the
    // intrinsics only touch registers.
    unsafe {
        let quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)))
    }
}

/// The f16 at `p` (any alignment) as f32, via F16C.
///
/// # Safety
/// F16C (and AVX2) must be available and `p` readable for 2 bytes.
#[inline(always)]
pub(crate) unsafe fn load_f16(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees F16C is available and `p` is readable for 2 bytes;
    // `read_unaligned` has no alignment requirement.
    unsafe {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// `value` rounded to the nearest f16 (ties to even), as little-endian bytes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C: only call this from a kernel compiled with those
/// features whose caller checked `cpu::isa()`.
#[inline(always)]
pub(crate) unsafe fn f16_bytes(value: f32) -> [u8; 2] {
    // SAFETY: the caller guarantees AVX2, FMA and F16C are available (this fn's contract); the
    // conversion only touches registers.
    unsafe {
        let half = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(value));
        (_mm_extract_epi16::<0>(half) as u16).to_le_bytes()
    }
}

/// Rounds to the nearest integer, ties to even (as llama.cpp's activation quantizers do).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C: only call this from a kernel compiled with those
/// features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn round_half_even(v: __m256) -> __m256 {
    // SAFETY: the caller guarantees AVX2, FMA and F16C are available (this fn's contract); the
    // rounding only touches registers.
    unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v) }
}

// ---------------------------------------------------------------------------------------
// f32 ops

/// Σ a[i]·b[i] over `n` floats read unaligned.
///
/// # Safety
/// AVX2 and FMA available; `a` and `b` readable for `n` floats.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: AVX2 and FMA are enabled on this fn and guaranteed by the caller (the f32ops
    // dispatcher checks `cpu::isa()`); `a` and `b` are readable for `n` floats and every load
    // below is at an index `< n` (`i + 8·j + 8 ≤ i + 32 ≤ n`, then `i + 8 ≤ n`, then `i < n`).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, lane) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.add(i + 8 * j));
                let y = _mm256_loadu_ps(b.add(i + 8 * j));
                *lane = _mm256_fmadd_ps(x, y, *lane);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
            i += 8;
        }
        let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum_ps(total);
        while i < n {
            sum = a
                .add(i)
                .read_unaligned()
                .mul_add(b.add(i).read_unaligned(), sum);
            i += 1;
        }
        sum
    }
}

/// y[i] += alpha · x[i] over `n` floats.
///
/// # Safety
/// AVX2 and FMA available; `x` readable and `y` writable for `n` floats.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy_f32(alpha: f32, x: *const f32, y: *mut f32, n: usize) {
    // SAFETY: AVX2 and FMA are guaranteed by the caller (checked by the f32ops dispatcher);
    // `x` is readable and `y` writable for `n` floats, and every access is below `n`
    // (`i + 8 ≤ n` in the vector loop, `i < n` in the tail).
    unsafe {
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i)));
            _mm256_storeu_ps(y.add(i), v);
            i += 8;
        }
        while i < n {
            *y.add(i) = alpha.mul_add(*x.add(i), *y.add(i));
            i += 1;
        }
    }
}

/// x[i] *= s over `n` floats.
///
/// # Safety
/// AVX2 available; `x` writable for `n` floats.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn scale_f32(x: *mut f32, s: f32, n: usize) {
    // SAFETY: AVX2 is guaranteed by the caller (checked by the f32ops dispatcher); `x` is
    // writable for `n` floats and every access is below `n` (`i + 8 ≤ n`, then `i < n`).
    unsafe {
        let factor = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(x.add(i), _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), factor));
            i += 8;
        }
        while i < n {
            *x.add(i) *= s;
            i += 1;
        }
    }
}

/// Loads 8 weights of a float row type as f32.
pub(crate) trait FloatRow8 {
    /// Bytes per weight.
    const BYTES: usize;
    /// Weights `0..8` at `p`.
    ///
    /// # Safety
    /// AVX2 (and F16C for [`F16Row`]) must be available and `p` readable for
    /// `8 · BYTES` bytes (any alignment).
    unsafe fn load8(p: *const u8) -> __m256;
    /// One weight at `p`.
    ///
    /// # Safety
    /// F16C must be available for [`F16Row`], and `p` readable for `BYTES` bytes (any
    /// alignment).
    unsafe fn load1(p: *const u8) -> f32;
}

/// F32 weights.
pub(crate) struct F32Row;
/// F16 weights.
pub(crate) struct F16Row;
/// BF16 weights.
pub(crate) struct Bf16Row;

impl FloatRow8 for F32Row {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: per the `FloatRow8` contract the caller guarantees AVX2 and that `p` is
        // readable for 8 f32 (32 bytes); `loadu` needs no alignment.
        unsafe { _mm256_loadu_ps(p.cast()) }
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        // SAFETY: per the `FloatRow8` contract `p` is readable for one f32 (4 bytes);
        // `read_unaligned` needs no alignment.
        unsafe { p.cast::<f32>().read_unaligned() }
    }
}

impl FloatRow8 for F16Row {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: per the `FloatRow8` contract the caller guarantees AVX2 and F16C and that
        // `p` is readable for 8 f16 (16 bytes); `loadu` needs no alignment.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        // SAFETY: per the `FloatRow8` contract the caller guarantees F16C and that `p` is
        // readable for one f16 (2 bytes), as `load_f16` requires.
        unsafe { load_f16(p) }
    }
}

impl FloatRow8 for Bf16Row {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: per the `FloatRow8` contract the caller guarantees AVX2 and that `p` is
        // readable for 8 bf16 (16 bytes); `loadu` needs no alignment.
        unsafe {
            let widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(widened))
        }
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        // SAFETY: per the `FloatRow8` contract `p` is readable for one bf16 (2 bytes);
        // `read_unaligned` needs no alignment.
        unsafe { f32::from_bits((p.cast::<u16>().read_unaligned() as u32) << 16) }
    }
}

/// # Safety
/// AVX2 and FMA (and F16C when `W` is `F16Row`) must be available; `w` must be readable for
/// `n · W::BYTES` bytes and `act` for `4n` bytes (any alignment).
#[inline(always)]
unsafe fn dot_float_body<W: FloatRow8>(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: the caller guarantees AVX2 and FMA (plus F16C for `F16Row`), that `w` is
    // readable for `n · W::BYTES` bytes and `act` for `n` f32. Every weight load covers
    // indices `i..i + 8 ≤ n` (or the single index `i < n`), and so does every activation load.
    unsafe {
        let x = act.cast::<f32>();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, lane) in acc.iter_mut().enumerate() {
                let wv = W::load8(w.add((i + 8 * j) * W::BYTES));
                *lane = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i + 8 * j)), *lane);
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = W::load8(w.add(i * W::BYTES));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i)), acc[0]);
            i += 8;
        }
        let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum_ps(total);
        while i < n {
            sum = W::load1(w.add(i * W::BYTES)).mul_add(x.add(i).read_unaligned(), sum);
            i += 1;
        }
        sum
    }
}

/// F16 row · F32 row (f32 values as little-endian bytes, any alignment).
///
/// # Safety
/// AVX2, FMA and F16C available; `w` readable for `2n` bytes, `act` for `4n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_f32(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: AVX2, FMA and F16C are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`); `w` holds `2n` bytes and `act` `4n`, as `dot_float_body::<F16Row>`
    // requires.
    unsafe { dot_float_body::<F16Row>(w, act, n) }
}

/// BF16 row · F32 row.
///
/// # Safety
/// AVX2 and FMA available; `w` readable for `2n` bytes, `act` for `4n`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_bf16_f32(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: AVX2 and FMA are enabled here and guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); `w` holds `2n` bytes and `act` `4n`, as `dot_float_body::<Bf16Row>`
    // requires.
    unsafe { dot_float_body::<Bf16Row>(w, act, n) }
}

/// F32 row · F32 row, both as bytes.
///
/// # Safety
/// AVX2 and FMA available; both readable for `4n` bytes.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32_bytes(w: *const u8, act: *const u8, n: usize) -> f32 {
    // SAFETY: AVX2 and FMA are enabled here and guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); both rows hold `4n` bytes, as `dot_float_body::<F32Row>` requires.
    unsafe { dot_float_body::<F32Row>(w, act, n) }
}

// ---------------------------------------------------------------------------------------
// Activation quantization

/// Quantizes one block of 32 floats at `x` to Q8_0/Q8_1 codes at `qs`; returns (d, Σq).
///
/// # Safety
/// AVX2 must be available; `x` must be readable for 32 f32 and `qs` writable for 32 bytes
/// (any alignment).
#[inline(always)]
unsafe fn quantize_block(x: *const f32, qs: *mut u8) -> (f32, i32) {
    // SAFETY: the caller guarantees AVX2 and that `x` is readable for 32 f32 and `qs`
    // writable for 32 bytes; the loads cover `x[0..32]` and the one store `qs[0..32]`, all
    // unaligned.
    unsafe {
        let sign_bit = _mm256_set1_ps(-0.0);
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let mut abs = [_mm256_setzero_ps(); 4];
        for (a, &vi) in abs.iter_mut().zip(&v) {
            *a = _mm256_andnot_ps(sign_bit, vi);
        }
        let amax = hmax_ps(_mm256_max_ps(
            _mm256_max_ps(abs[0], abs[1]),
            _mm256_max_ps(abs[2], abs[3]),
        ));
        // Same scalar operations as the reference, so the codes match it bit for bit.
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, &vi) in q.iter_mut().zip(&v) {
            *qi = _mm256_cvtps_epi32(round_half_even(_mm256_mul_ps(vi, id)));
        }
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum128 = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum64 = _mm_add_epi32(sum128, _mm_unpackhi_epi64(sum128, sum128));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(sum64, _mm_shuffle_epi32::<0b01>(sum64)));
        // packs work per 128-bit lane: restore element order with a dword permute.
        let words_lo = _mm256_packs_epi32(q[0], q[1]);
        let words_hi = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_packs_epi16(words_lo, words_hi);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.cast(), ordered);
        (d, total)
    }
}

/// Q8_0 quantization of `nb` blocks, bit-identical to the scalar reference.
///
/// # Safety
/// AVX2 and F16C available; `x` readable for `32·nb` floats, `out` writable for `34·nb`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_row_q8_0(x: *const f32, out: *mut u8, nb: usize) {
    // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); for `b < nb`, `x + 32b` has 32 readable floats and `out + 34b` a
    // 34-byte writable block: 2 bytes of `d`, then 32 codes written by `quantize_block`.
    unsafe {
        for b in 0..nb {
            let block = out.add(34 * b);
            let (d, _) = quantize_block(x.add(32 * b), block.add(2));
            let bytes = f16_bytes(d);
            block.copy_from_nonoverlapping(bytes.as_ptr(), 2);
        }
    }
}

/// Q8_1 quantization of `nb` blocks, bit-identical to the scalar reference.
///
/// # Safety
/// AVX2 and F16C available; `x` readable for `32·nb` floats, `out` writable for `36·nb`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_row_q8_1(x: *const f32, out: *mut u8, nb: usize) {
    // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (dispatch.rs checks
    // `cpu::isa()`); for `b < nb`, `x + 32b` has 32 readable floats and `out + 36b` a
    // 36-byte writable block: `d` and `s` (2 bytes each), then 32 codes.
    unsafe {
        for b in 0..nb {
            let block = out.add(36 * b);
            let (d, sum) = quantize_block(x.add(32 * b), block.add(4));
            let d_bytes = f16_bytes(d);
            let s_bytes = f16_bytes(sum as f32 * d);
            block.copy_from_nonoverlapping(d_bytes.as_ptr(), 2);
            block.add(2).copy_from_nonoverlapping(s_bytes.as_ptr(), 2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Single-row dots on raw blocks

/// The 32 codes of a Q4_0/Q4_1 block at `qs` as bytes 0..16, weight order.
///
/// # Safety
/// AVX2 must be available and `qs` readable for 16 bytes.
#[inline(always)]
unsafe fn unpack_nibbles(qs: *const u8) -> __m256i {
    // SAFETY: the caller guarantees AVX2 and that `qs` is readable for 16 bytes (one
    // unaligned 128-bit load).
    unsafe {
        let packed = _mm_loadu_si128(qs.cast());
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

/// The fifth bits of a Q5 block as bytes: byte j is 16 where bit j of `bits` is set, else 0.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C: only call this from a kernel compiled with those
/// features whose caller checked `cpu::isa()`.
#[inline(always)]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    // SAFETY: the caller guarantees AVX2, FMA and F16C are available (this fn's contract); the
    // shuffles only touch registers.
    unsafe {
        // Byte j takes byte j/8 of `bits` (both 128-bit lanes hold all four bytes), then keeps
        // bit j%8 of it.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }
}

/// The 32 codes of a Q5_0/Q5_1 block (`qh` word at `qh`, nibbles at `qs`) as bytes 0..32,
/// weight order.
///
/// # Safety
/// AVX2 must be available; `qh` must be readable for 4 bytes and `qs` for 16.
#[inline(always)]
unsafe fn unpack_q5(qh: *const u8, qs: *const u8) -> __m256i {
    // SAFETY: the caller guarantees AVX2, that `qh` is readable for 4 bytes (read
    // unaligned) and `qs` for 16, as `unpack_nibbles` requires.
    unsafe {
        let bits = qh.cast::<u32>().read_unaligned();
        _mm256_or_si256(unpack_nibbles(qs), fifth_bits(u32::from_le(bits)))
    }
}

/// Σ x·y per 4-byte lane for signed x, y via |x| · (y with x's sign).
///
/// # Safety
/// AVX2 and the ISA of `D` (AVX-512 VNNI for `Vnni256`) must be available.
#[inline(always)]
unsafe fn dot_signed<D: Dot256>(x: __m256i, y: __m256i) -> __m256i {
    // SAFETY: the caller guarantees AVX2 and the features `D` needs, as `D::dot`
    // requires; only registers are touched.
    unsafe { D::dot(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)) }
}

/// Q4_0 · Q8_0 over `nb` blocks, two blocks per step on independent accumulators.
///
/// # Safety
/// AVX2, FMA, F16C and the ISA of `D` must be available; `w` must be readable for
/// `18·nb` bytes and `act` for `34·nb`.
#[inline(always)]
pub(crate) unsafe fn vec_dot_q4_0_q8_0_body<D: Dot256>(
    nb: usize,
    w: *const u8,
    act: *const u8,
) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA, F16C and the ISA of `D`, and that `w` holds
    // `nb` 18-byte blocks and `act` `nb` 34-byte blocks; block `b < nb` is read only
    // within `w[18b..18(b+1)]` and `act[34b..34(b+1)]`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 2];
        let eight = _mm256_set1_epi8(8);
        for b in 0..nb {
            let wb = w.add(18 * b);
            let ab = act.add(34 * b);
            let x = _mm256_sub_epi8(unpack_nibbles(wb.add(2)), eight);
            let y = _mm256_loadu_si256(ab.add(2).cast());
            let sums = _mm256_cvtepi32_ps(dot_signed::<D>(x, y));
            let scale = _mm256_set1_ps(load_f16(wb) * load_f16(ab));
            acc[b % 2] = _mm256_fmadd_ps(scale, sums, acc[b % 2]);
        }
        hsum_ps(_mm256_add_ps(acc[0], acc[1]))
    }
}

/// Q4_1 · Q8_1 over `nb` blocks, in llama.cpp's order (one accumulator, as
/// [`GgmlNibbleTiles`]; so are Q5_0 and Q5_1 below).
///
/// # Safety
/// AVX2, FMA, F16C and the ISA of `D` must be available; `w` must be readable for
/// `20·nb` bytes and `act` for `36·nb`.
#[inline(always)]
pub(crate) unsafe fn vec_dot_q4_1_q8_1_body<D: Dot256>(
    nb: usize,
    w: *const u8,
    act: *const u8,
) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA, F16C and the ISA of `D`, and that `w` holds
    // `nb` 20-byte blocks and `act` `nb` 36-byte blocks; block `b < nb` is read only
    // within `w[20b..20(b+1)]` and `act[36b..36(b+1)]`.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0.0f32;
        for b in 0..nb {
            let wb = w.add(20 * b);
            let ab = act.add(36 * b);
            let codes = unpack_nibbles(wb.add(4));
            let y = _mm256_loadu_si256(ab.add(4).cast());
            let sums = _mm256_cvtepi32_ps(D::dot(codes, y));
            let scale = _mm256_set1_ps(load_f16(wb) * load_f16(ab));
            acc = _mm256_fmadd_ps(scale, sums, acc);
            offsets = load_f16(wb.add(2)).mul_add(load_f16(ab.add(2)), offsets);
        }
        hsum_ps(acc) + offsets
    }
}

/// Q5_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA, F16C and the ISA of `D` must be available; `w` must be readable for
/// `22·nb` bytes and `act` for `34·nb`.
#[inline(always)]
pub(crate) unsafe fn vec_dot_q5_0_q8_0_body<D: Dot256>(
    nb: usize,
    w: *const u8,
    act: *const u8,
) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA, F16C and the ISA of `D`, and that `w` holds
    // `nb` 22-byte blocks and `act` `nb` 34-byte blocks; block `b < nb` is read only
    // within `w[22b..22(b+1)]` and `act[34b..34(b+1)]`.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let sixteen = _mm256_set1_epi8(16);
        for b in 0..nb {
            let wb = w.add(22 * b);
            let ab = act.add(34 * b);
            let x = _mm256_sub_epi8(unpack_q5(wb.add(2), wb.add(6)), sixteen);
            let y = _mm256_loadu_si256(ab.add(2).cast());
            let sums = _mm256_cvtepi32_ps(dot_signed::<D>(x, y));
            let scale = _mm256_set1_ps(load_f16(wb) * load_f16(ab));
            acc = _mm256_fmadd_ps(scale, sums, acc);
        }
        hsum_ps(acc)
    }
}

/// Q5_1 · Q8_1 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA, F16C and the ISA of `D` must be available; `w` must be readable for
/// `24·nb` bytes and `act` for `36·nb`.
#[inline(always)]
pub(crate) unsafe fn vec_dot_q5_1_q8_1_body<D: Dot256>(
    nb: usize,
    w: *const u8,
    act: *const u8,
) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA, F16C and the ISA of `D`, and that `w` holds
    // `nb` 24-byte blocks and `act` `nb` 36-byte blocks; block `b < nb` is read only
    // within `w[24b..24(b+1)]` and `act[36b..36(b+1)]`.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0.0f32;
        for b in 0..nb {
            let wb = w.add(24 * b);
            let ab = act.add(36 * b);
            // Codes ≤ 31: the 16-bit pair sums of `vpmaddubsw` stay below 2 · 31 · 128.
            let codes = unpack_q5(wb.add(4), wb.add(8));
            let y = _mm256_loadu_si256(ab.add(4).cast());
            let sums = _mm256_cvtepi32_ps(D::dot(codes, y));
            let scale = _mm256_set1_ps(load_f16(wb) * load_f16(ab));
            acc = _mm256_fmadd_ps(scale, sums, acc);
            offsets = load_f16(wb.add(2)).mul_add(load_f16(ab.add(2)), offsets);
        }
        hsum_ps(acc) + offsets
    }
}

/// Q8_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA, F16C and the ISA of `D` must be available; `w` must be readable for
/// `34·nb` bytes and `act` for `34·nb`.
#[inline(always)]
pub(crate) unsafe fn vec_dot_q8_0_q8_0_body<D: Dot256>(
    nb: usize,
    w: *const u8,
    act: *const u8,
) -> f32 {
    // SAFETY: the caller guarantees AVX2, FMA, F16C and the ISA of `D`, and that `w` holds
    // `nb` 34-byte blocks and `act` `nb` 34-byte blocks; block `b < nb` is read only
    // within `w[34b..34(b+1)]` and `act[34b..34(b+1)]`.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let wb = w.add(34 * b);
            let ab = act.add(34 * b);
            let x = _mm256_loadu_si256(wb.add(2).cast());
            let y = _mm256_loadu_si256(ab.add(2).cast());
            let sums = _mm256_cvtepi32_ps(dot_signed::<D>(x, y));
            let scale = _mm256_set1_ps(load_f16(wb) * load_f16(ab));
            acc = _mm256_fmadd_ps(scale, sums, acc);
        }
        hsum_ps(acc)
    }
}

/// Q4_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` readable for `18·nb` bytes, `act` for `34·nb`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q4_0_q8_0(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA and F16C are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`), which is the ISA of `Maddubs`; `w` holds `18·nb` bytes and `act`
    // `34·nb`, as the body requires.
    unsafe { vec_dot_q4_0_q8_0_body::<Maddubs>(nb, w, act) }
}

/// Q4_1 · Q8_1 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` readable for `20·nb` bytes, `act` for `36·nb`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q4_1_q8_1(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA and F16C are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`), which is the ISA of `Maddubs`; `w` holds `20·nb` bytes and `act`
    // `36·nb`, as the body requires.
    unsafe { vec_dot_q4_1_q8_1_body::<Maddubs>(nb, w, act) }
}

/// Q5_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` readable for `22·nb` bytes, `act` for `34·nb`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q5_0_q8_0(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA and F16C are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`), which is the ISA of `Maddubs`; `w` holds `22·nb` bytes and `act`
    // `34·nb`, as the body requires.
    unsafe { vec_dot_q5_0_q8_0_body::<Maddubs>(nb, w, act) }
}

/// Q5_1 · Q8_1 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` readable for `24·nb` bytes, `act` for `36·nb`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q5_1_q8_1(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA and F16C are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`), which is the ISA of `Maddubs`; `w` holds `24·nb` bytes and `act`
    // `36·nb`, as the body requires.
    unsafe { vec_dot_q5_1_q8_1_body::<Maddubs>(nb, w, act) }
}

/// Q8_0 · Q8_0 over `nb` blocks.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` and `act` readable for `34·nb` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_q8_0_q8_0(nb: usize, w: *const u8, act: *const u8) -> f32 {
    // SAFETY: AVX2, FMA and F16C are enabled here and guaranteed by the caller (dispatch.rs
    // checks `cpu::isa()`), which is the ISA of `Maddubs`; `w` holds `34·nb` bytes and `act`
    // `34·nb`, as the body requires.
    unsafe { vec_dot_q8_0_q8_0_body::<Maddubs>(nb, w, act) }
}

// ---------------------------------------------------------------------------------------
// Tiled matmul over packed activations

/// Q4_0 (`MIN = false`) or Q4_1 (`MIN = true`) rows against packed [`NibbleGroup`]s, two
/// blocks (one 256-bit half of a group) per step; with `FIVE`, Q5_0 / Q5_1 rows, whose
/// `qh` bits are ORed into the nibbles as 16s.
struct NibbleTiles<const MIN: bool, const FIVE: bool> {
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    act: *const NibbleGroup,
    n_groups: usize,
}

impl<const MIN: bool, const FIVE: bool> NibbleTiles<MIN, FIVE> {
    /// Bytes of `d` (and `m`): where `qh` (Q5) or the nibbles (Q4) start.
    const QH_OFFSET: usize = if MIN { 4 } else { 2 };
    const QS_OFFSET: usize = Self::QH_OFFSET + if FIVE { 4 } else { 0 };
    const BLOCK_BYTES: usize = Self::QS_OFFSET + 16;
}

impl<const MIN: bool, const FIVE: bool> Tiles for NibbleTiles<MIN, FIVE> {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        // SAFETY: the `Tiles` contract gives AVX2, FMA and F16C and `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok`. Row `r0 + r` spans `row_bytes = nb · BLOCK_BYTES` bytes of `w` and
        // every weight read stays in block `b0` or, when `both`, `b0 + 1 < nb`. Token `t0 + t`
        // owns groups `(t0 + t) · n_groups ..+ n_groups` of `act` and `group < n_groups`; the
        // aligned loads read 32-byte halves of 64-byte-aligned `NibbleGroup` fields.
        unsafe {
            let low4 = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            // The offset term of Q4_1 runs on its own chain, so two dependent FMAs do not
            // serialize each step.
            let mut acc_m = [[_mm256_setzero_ps(); T]; R];
            for b0 in (0..self.nb).step_by(2) {
                let both = b0 + 1 < self.nb;
                let group = b0 / 4;
                let half = (b0 % 4) / 2;
                for (r, (acc_r, acc_m_r)) in acc.iter_mut().zip(acc_m.iter_mut()).enumerate() {
                    let wb = self
                        .w
                        .add((r0 + r) * self.row_bytes + b0 * Self::BLOCK_BYTES);
                    let first = _mm_loadu_si128(wb.add(Self::QS_OFFSET).cast());
                    let (second, d1, m1) = if both {
                        let wb1 = wb.add(Self::BLOCK_BYTES);
                        let m1 = if MIN { load_f16(wb1.add(2)) } else { 0.0 };
                        (
                            _mm_loadu_si128(wb1.add(Self::QS_OFFSET).cast()),
                            load_f16(wb1),
                            m1,
                        )
                    } else {
                        (_mm_setzero_si128(), 0.0, 0.0)
                    };
                    let codes = _mm256_set_m128i(second, first);
                    let mut lo = _mm256_and_si256(codes, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(codes), low4);
                    if FIVE {
                        // `lo` holds weights 0..16 of both blocks, `hi` weights 16..32.
                        let read_qh = |p: *const u8| {
                            u32::from_le(p.add(Self::QH_OFFSET).cast::<u32>().read_unaligned())
                        };
                        let qh0 = read_qh(wb);
                        let qh1 = if both {
                            read_qh(wb.add(Self::BLOCK_BYTES))
                        } else {
                            0
                        };
                        lo = _mm256_or_si256(lo, fifth_bits((qh0 & 0xFFFF) | (qh1 << 16)));
                        hi = _mm256_or_si256(hi, fifth_bits((qh0 >> 16) | (qh1 & 0xFFFF_0000)));
                    }
                    let dw = _mm256_set_m128(_mm_set1_ps(d1), _mm_set1_ps(load_f16(wb)));
                    let mw = if MIN {
                        _mm256_set_m128(_mm_set1_ps(m1), _mm_set1_ps(load_f16(wb.add(2))))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for (t, (acc_rt, acc_m_rt)) in
                        acc_r.iter_mut().zip(acc_m_r.iter_mut()).enumerate()
                    {
                        let g = &*self.act.add((t0 + t) * self.n_groups + group);
                        let a_lo = _mm256_load_si256(g.lo.as_ptr().add(32 * half).cast());
                        let a_hi = _mm256_load_si256(g.hi.as_ptr().add(32 * half).cast());
                        let pairs = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, a_lo),
                            _mm256_maddubs_epi16(hi, a_hi),
                        );
                        let mut sums = _mm256_madd_epi16(pairs, ones);
                        if !MIN {
                            let mut corr = _mm256_load_si256(g.corr.as_ptr().add(8 * half).cast());
                            if FIVE {
                                // −16 · Σa for codes biased by 16.
                                corr = _mm256_add_epi32(corr, corr);
                            }
                            sums = _mm256_add_epi32(sums, corr);
                        }
                        let da = _mm256_load_ps(g.da.as_ptr().add(8 * half));
                        let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), da);
                        *acc_rt = _mm256_fmadd_ps(scaled, dw, *acc_rt);
                        if MIN {
                            let sa = _mm256_load_ps(g.sa.as_ptr().add(8 * half));
                            *acc_m_rt = _mm256_fmadd_ps(mw, sa, *acc_m_rt);
                        }
                    }
                }
            }
            if MIN {
                for (acc_r, acc_m_r) in acc.iter_mut().zip(&acc_m) {
                    for (v, &m) in acc_r.iter_mut().zip(acc_m_r) {
                        *v = _mm256_add_ps(*v, m);
                    }
                }
            }
            reduce_tile(&acc)
        }
    }
}

/// Q4_1 (`MIN`), Q5_0 (`FIVE`) or Q5_1 (both) rows against Q8_1 / Q8_0 activation rows in
/// llama.cpp's order (its AVX2 `ggml_vec_dot_q4_1_q8_1` / `_q5_0_q8_0` / `_q5_1_q8_1`, and
/// tinyBLAS's Q5_0 kernel for prompts, which adds in the same order), so that every dot product
/// equals its to the last bit: one 8-lane accumulator per dot, lane `l` taking weights
/// `4l..4l + 4` of each block, each block added as `fma(d_w · d_a, lane sums, acc)`; for the
/// formats with a min, the min term `m_w · s_a` summed on its own chain of fused multiply-adds
/// (as GCC contracts llama.cpp's `summs += m · s`); then the lanes added as [`hsum_ps`] does
/// and the min term last. Activations are read in their natural layout, one block per step.
struct GgmlNibbleTiles<const MIN: bool, const FIVE: bool> {
    rows: GgmlNibbleRows,
}

/// What [`GgmlNibbleTiles`] reads, whatever the format.
#[derive(Clone, Copy)]
struct GgmlNibbleRows {
    w: *const u8,
    nb: usize,
    act: *const u8,
    act_row_bytes: usize,
    /// `(nb, n_tok)` activation scales `d`, then (Q8_1) `s = d · Σ codes`, as f32
    /// (`pack::pack_act_scales`).
    scales: *const f32,
    n_tok: usize,
}

impl<const MIN: bool, const FIVE: bool> GgmlNibbleTiles<MIN, FIVE> {
    /// The block layout, [`NibbleTiles`]'.
    const QH_OFFSET: usize = NibbleTiles::<MIN, FIVE>::QH_OFFSET;
    const QS_OFFSET: usize = NibbleTiles::<MIN, FIVE>::QS_OFFSET;
    const BLOCK_BYTES: usize = NibbleTiles::<MIN, FIVE>::BLOCK_BYTES;
    /// Q8_1 (d, s, codes) pairs with the formats with a min, Q8_0 (d, codes) with the others.
    const ACT_CODES: usize = if MIN { 4 } else { 2 };
    const ACT_BYTES: usize = Self::ACT_CODES + 32;

    /// Weight block `b` of row `r`.
    ///
    /// # Safety
    /// `r` and `b` must be inside the matrix the tiles were built over.
    #[inline(always)]
    unsafe fn weight_block(&self, r: usize, b: usize) -> *const u8 {
        // SAFETY: the caller keeps `r < n_rows` and `b < nb`, inside `w`.
        unsafe {
            let row_bytes = Self::BLOCK_BYTES * self.rows.nb;
            self.rows.w.add(r * row_bytes + Self::BLOCK_BYTES * b)
        }
    }

    /// The codes of the weight block at `wb` as the dot takes them (Q5_0's signed), and its
    /// `[d, m, ..]` (m for the formats with a min) from one conversion.
    ///
    /// # Safety
    /// AVX2 and F16C must be available and `wb` a whole weight block.
    #[inline(always)]
    unsafe fn unpack(wb: *const u8) -> (__m256i, __m128) {
        // SAFETY: the caller guarantees the ISA and a whole block at `wb`: its first 4 bytes
        // (d and m, or d and the first half of qh) and the codes are read.
        unsafe {
            let codes = if FIVE {
                unpack_q5(wb.add(Self::QH_OFFSET), wb.add(Self::QS_OFFSET))
            } else {
                unpack_nibbles(wb.add(Self::QS_OFFSET))
            };
            let codes = if MIN {
                codes
            } else {
                _mm256_sub_epi8(codes, _mm256_set1_epi8(16))
            };
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(wb.cast::<i32>().read_unaligned()));
            (codes, dm)
        }
    }

    /// The 8 integer lane sums of a block's codes with an activation block's, as f32.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[inline(always)]
    unsafe fn lane_sums(codes: __m256i, ya: __m256i) -> __m256 {
        // SAFETY: the caller guarantees AVX2, the ISA of `Maddubs`; registers only.
        unsafe {
            _mm256_cvtepi32_ps(if MIN {
                Maddubs::dot(codes, ya)
            } else {
                dot_signed::<Maddubs>(codes, ya)
            })
        }
    }
}

impl<const MIN: bool, const FIVE: bool> Tiles for GgmlNibbleTiles<MIN, FIVE> {
    // Rows and tokens index several per-row and per-token arrays at once.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        const { assert!(T <= 4, "the min terms hold four tokens") };
        // SAFETY: the `Tiles` contract gives AVX2, FMA and F16C and `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok`. Token `t0 + t` spans `act_row_bytes ≥ ACT_BYTES · nb` bytes of `act`
        // and block `b < nb` is read within `ACT_BYTES · b..` of it; weight blocks come from
        // `weight_block` within rows `r0..r0 + R`; `scales` holds `2 · nb · n_tok` floats and
        // indices `b · n_tok + t0 + t` (+ `nb · n_tok` for `s`) are read.
        unsafe {
            let rows = &self.rows;
            let act_s = rows.scales.add(rows.nb * rows.n_tok);
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            // The min term of each (row, token) in block order: lane t of a register is token
            // t0 + t; one token (decode) keeps scalars.
            let mut offsets = [_mm_setzero_ps(); R];
            let mut offsets_one = [0.0f32; R];
            for b in 0..rows.nb {
                let d_act = rows.scales.add(b * rows.n_tok + t0);
                let s_act = act_s.add(b * rows.n_tok + t0);
                let act_codes = |t: usize| {
                    let ab = rows
                        .act
                        .add((t0 + t) * rows.act_row_bytes + Self::ACT_BYTES * b);
                    _mm256_loadu_si256(ab.add(Self::ACT_CODES).cast())
                };
                if T == 1 {
                    // One token: `d_w · d_a` multiplied and broadcast once per row.
                    let (da, ya) = (*d_act, act_codes(0));
                    for r in 0..R {
                        let (codes, dm) = Self::unpack(self.weight_block(r0 + r, b));
                        let scale = _mm256_set1_ps(_mm_cvtss_f32(dm) * da);
                        let sums = Self::lane_sums(codes, ya);
                        acc[r][0] = _mm256_fmadd_ps(scale, sums, acc[r][0]);
                        if MIN {
                            let mw = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                            offsets_one[r] = mw.mul_add(*s_act, offsets_one[r]);
                        }
                    }
                    continue;
                }
                let sa = if MIN {
                    let mut sa = [0.0f32; 4];
                    for (t, v) in sa.iter_mut().enumerate().take(T) {
                        *v = *s_act.add(t);
                    }
                    _mm_loadu_ps(sa.as_ptr())
                } else {
                    _mm_setzero_ps()
                };
                let mut codes = [_mm256_setzero_si256(); R];
                let mut dw = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let dm;
                    (codes[r], dm) = Self::unpack(self.weight_block(r0 + r, b));
                    dw[r] = _mm256_broadcastss_ps(dm);
                    if MIN {
                        let mw = _mm_broadcastss_ps(_mm_movehdup_ps(dm));
                        offsets[r] = _mm_fmadd_ps(mw, sa, offsets[r]);
                    }
                }
                for t in 0..T {
                    let (da, ya) = (_mm256_set1_ps(*d_act.add(t)), act_codes(t));
                    for r in 0..R {
                        let sums = Self::lane_sums(codes[r], ya);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], da), sums, acc[r][t]);
                    }
                }
            }
            let mut sums = reduce_tile(&acc);
            if MIN {
                for (r, s_r) in sums.iter_mut().enumerate() {
                    let mut o = [0.0f32; 4];
                    _mm_storeu_ps(o.as_mut_ptr(), offsets[r]);
                    if T == 1 {
                        o[0] = offsets_one[r];
                    }
                    for (s, &o) in s_r.iter_mut().zip(&o) {
                        *s += o;
                    }
                }
            }
            sums
        }
    }
}

/// Tiled Q4_1 · Q8_1, Q5_0 · Q8_0 or Q5_1 · Q8_1 in llama.cpp's summation order
/// ([`GgmlNibbleTiles`]), over activation rows in their natural layout and their scales
/// unpacked by `pack::pack_act_scales`.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` holds `n_rows` rows of `nb` blocks of `weights` (Q4_0
/// is not one of them), `act` `n_tok` rows of `act_row_bytes` bytes, whole blocks of
/// `weights.act()`, `scales` their `2 · nb · n_tok` scales; `out` holds
/// `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_nibble_ggml(
    weights: NibbleWeights,
    w: &[u8],
    nb: usize,
    n_rows: usize,
    act: &[u8],
    act_row_bytes: usize,
    scales: &[f32],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let rows = GgmlNibbleRows {
        w: w.as_ptr(),
        nb,
        act: act.as_ptr(),
        act_row_bytes,
        scales: scales.as_ptr(),
        n_tok,
    };
    // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (matmul.rs checks the ISA), and
    // `rows` holds what the tiles of the format read: `n_rows` rows of `BLOCK_BYTES · nb`
    // bytes, `n_tok` activation rows of whole blocks and their scales, as `drive_ggml` needs.
    unsafe {
        match weights {
            NibbleWeights::Q4_1 => drive_ggml::<true, false>(rows, n_rows, out, out_stride),
            NibbleWeights::Q5_0 => drive_ggml::<false, true>(rows, n_rows, out, out_stride),
            NibbleWeights::Q5_1 => drive_ggml::<true, true>(rows, n_rows, out, out_stride),
            NibbleWeights::Q4_0 => unreachable!("Q4_0 runs the packed nibble kernel"),
        }
    }
}

/// [`drive`] over the [`GgmlNibbleTiles`] of one format.
///
/// # Safety
/// AVX2, FMA and F16C available; `rows` holds `n_rows` weight rows of the format and
/// `rows.n_tok` activation rows with their scales; `out` holds
/// `(n_tok − 1) · out_stride + n_rows` values.
#[inline(always)]
unsafe fn drive_ggml<const MIN: bool, const FIVE: bool>(
    rows: GgmlNibbleRows,
    n_rows: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let row_bytes = GgmlNibbleTiles::<MIN, FIVE>::BLOCK_BYTES * rows.nb;
    let tiles = GgmlNibbleTiles::<MIN, FIVE> { rows };
    // SAFETY: the caller's contract is `drive`'s for these tiles.
    unsafe { drive(&tiles, n_rows, rows.n_tok, row_bytes, out, out_stride) }
}

/// Q8_0 rows against packed [`BytePair`]s, one block per step.
struct ByteTiles {
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    act: *const BytePair,
    n_pairs: usize,
}

impl Tiles for ByteTiles {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        // SAFETY: the `Tiles` contract gives AVX2, FMA and F16C and `r0 + R ≤ n_rows`,
        // `t0 + T ≤ n_tok`. Row `r0 + r` spans `34 · nb` bytes of `w` and block `b < nb` is read
        // at `34b..34b + 34`; token `t0 + t` owns pairs `(t0 + t) · n_pairs ..+ n_pairs` of `act`
        // and `pair < n_pairs`; the aligned loads read halves of 64-byte-aligned `BytePair` fields.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            for b in 0..self.nb {
                let (pair, half) = (b / 2, b % 2);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let wb = self.w.add((r0 + r) * self.row_bytes + 34 * b);
                    let x = _mm256_loadu_si256(wb.add(2).cast());
                    let dw = _mm256_set1_ps(load_f16(wb));
                    let ax = _mm256_sign_epi8(x, x);
                    for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                        let p = &*self.act.add((t0 + t) * self.n_pairs + pair);
                        let y = _mm256_load_si256(p.qs.as_ptr().add(32 * half).cast());
                        let sums = Maddubs::dot(ax, _mm256_sign_epi8(y, x));
                        let da = _mm256_load_ps(p.da.as_ptr().add(8 * half));
                        // fma(d_w · d_a, sums, acc), as llama.cpp's Q8_0 dot rounds.
                        let scale = _mm256_mul_ps(dw, da);
                        *acc_rt = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), *acc_rt);
                    }
                }
            }
            reduce_tile(&acc)
        }
    }
}

/// Float weight rows (F32, F16, BF16) against F32 activation rows.
struct FloatTiles<W> {
    w: *const u8,
    row_bytes: usize,
    k: usize,
    act: *const u8,
    act_row_bytes: usize,
    _row: PhantomData<W>,
}

impl<W: FloatRow8> Tiles for FloatTiles<W> {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R] {
        // SAFETY: the `Tiles` contract gives AVX2 and FMA (F16C for `F16Row`) and
        // `r0 + R ≤ n_rows`, `t0 + T ≤ n_tok`. Weight row `r0 + r` spans `k · W::BYTES` bytes of
        // `w` and token `t0 + t` `k` f32 of `act`; reads cover indices `i..i + 8 ≤ full ≤ k` and
        // then single indices `< k`.
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
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut rows = [std::ptr::null::<u8>(); R];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = self.w.add((r0 + r) * self.row_bytes);
            }
            let mut toks = [std::ptr::null::<f32>(); T];
            for (t, tok) in toks.iter_mut().enumerate() {
                *tok = self.act.add((t0 + t) * self.act_row_bytes).cast();
            }
            let full = self.k / 8 * 8;
            let mut i = 0;
            while i < full {
                let mut wv = [_mm256_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = W::load8(rows[r].add(i * W::BYTES));
                }
                for t in 0..T {
                    let x = _mm256_loadu_ps(toks[t].add(i));
                    for r in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(wv[r], x, acc[r][t]);
                    }
                }
                i += 8;
            }
            let mut sums = reduce_tile(&acc);
            for i in full..self.k {
                for (r, sums_r) in sums.iter_mut().enumerate() {
                    let wv = W::load1(rows[r].add(i * W::BYTES));
                    for (t, s) in sums_r.iter_mut().enumerate() {
                        *s = wv.mul_add(toks[t].add(i).read_unaligned(), *s);
                    }
                }
            }
            sums
        }
    }
}

/// Builds the nibble tiles of one weight format and drives them.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` must hold `n_rows` rows of `nb` blocks of the
/// format picked by `MIN` / `FIVE`, `packed` `n_tok · ⌈nb/4⌉` groups of the matching
/// activation rows, and `out` `(n_tok − 1) · out_stride + n_rows` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn drive_nibble<const MIN: bool, const FIVE: bool>(
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[NibbleGroup],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: the caller guarantees AVX2, FMA and F16C, that `w` holds `n_rows` rows of `nb`
    // blocks of `BLOCK_BYTES` each, `packed` `n_tok · ⌈nb/4⌉` groups and `out`
    // `(n_tok − 1) · out_stride + n_rows` values: exactly what `drive` needs of these tiles.
    unsafe {
        let row_bytes = NibbleTiles::<MIN, FIVE>::BLOCK_BYTES * nb;
        let tiles = NibbleTiles::<MIN, FIVE> {
            w: w.as_ptr(),
            row_bytes,
            nb,
            act: packed.as_ptr(),
            n_groups: nb.div_ceil(4),
        };
        drive(&tiles, n_rows, n_tok, row_bytes, out, out_stride);
    }
}

/// Tiled Q4_0 / Q5_0 · Q8_0 or Q4_1 / Q5_1 · Q8_1 over packed activations.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` holds `n_rows` rows of `nb` blocks of `weights`;
/// `packed` holds `n_tok · ⌈nb/4⌉` groups of `weights.act()` rows; `out` holds
/// `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_nibble(
    weights: NibbleWeights,
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[NibbleGroup],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (matmul.rs checks the ISA),
    // and the shape contract of this fn is the one `drive_nibble` requires for each format.
    unsafe {
        match weights {
            NibbleWeights::Q4_0 => {
                drive_nibble::<false, false>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
            NibbleWeights::Q4_1 => {
                drive_nibble::<true, false>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
            NibbleWeights::Q5_0 => {
                drive_nibble::<false, true>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
            NibbleWeights::Q5_1 => {
                drive_nibble::<true, true>(w, nb, n_rows, packed, n_tok, out, out_stride)
            }
        }
    }
}

/// Tiled Q8_0 · Q8_0 over packed activations.
///
/// # Safety
/// AVX2, FMA and F16C available; `w` holds `n_rows` rows of `nb` blocks; `packed` holds
/// `n_tok · ⌈nb/2⌉` pairs; `out` holds `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matmul_byte(
    w: &[u8],
    nb: usize,
    n_rows: usize,
    packed: &[BytePair],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (matmul.rs checks the ISA);
    // `w` holds `n_rows` rows of `34 · nb` bytes, `packed` `n_tok · ⌈nb/2⌉` pairs and `out`
    // `(n_tok − 1) · out_stride + n_rows` values, so the tiles satisfy `drive`'s contract.
    unsafe {
        let row_bytes = 34 * nb;
        let tiles = ByteTiles {
            w: w.as_ptr(),
            row_bytes,
            nb,
            act: packed.as_ptr(),
            n_pairs: nb.div_ceil(2),
        };
        drive(&tiles, n_rows, n_tok, row_bytes, out, out_stride);
    }
}

/// Tiled float-weight matmul (F32, F16 or BF16 rows; F32 activation rows).
///
/// # Safety
/// AVX2, FMA and F16C available; `w` holds `n_rows` rows of `k` values of `ty`, `act` holds
/// `n_tok` f32 rows of `k`; `out` holds `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx2,fma,f16c")]
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
    // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (matmul.rs checks the ISA);
    // `w` holds `n_rows` rows of `k` values of `ty` (the row size given to each tile set),
    // `act` `n_tok` rows of `k` f32, and `out` `(n_tok − 1) · out_stride + n_rows` values,
    // so each tile set satisfies `drive`'s contract.
    unsafe {
        let act_row_bytes = 4 * k;
        match ty {
            GgmlType::F16 => {
                let tiles = FloatTiles::<F16Row> {
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
                let tiles = FloatTiles::<Bf16Row> {
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
                let tiles = FloatTiles::<F32Row> {
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
