//! AVX2 (+FMA, F16C) kernel for EFQ matrices (format: [`crate::efq`]), for CPUs without
//! AVX-512 VNNI.
//!
//! A 64-byte code chunk holds one quad of all 16 rows; its two 32-byte halves hold rows 0-7
//! and 8-15, so the kernel runs a row group as two 8-row halves, each in 256-bit registers.
//! A step decodes 8 quads (32 columns) of a half into eight registers of unsigned codes, then
//! per token eight `vpmaddubsw` against broadcast 4-byte activation quads are summed in
//! 16 bits (codes ≤ 15 and |a| ≤ 128, so 8 · 2 · 15 · 128 = 30720 cannot saturate) and one
//! `vpmaddwd` widens them into the half's 8 row sums. Codes of wide tiles (5–8 bits) would
//! overflow those 16-bit sums, so they run as two such passes, the low nibbles and the high
//! bits, and the high pass's sums are shifted up by 4 before they are added. After a tile, `vpmulld` takes the zero
//! points back out (`z · Σa`), and one multiply and one FMA apply the activation and block
//! scales. Outliers are one gather + FMA per slot and half. Float operations follow the
//! scalar reference's order exactly.

use std::arch::x86_64::*;

use crate::efq::{codes_offset, tile_cols, ActQ8, EfqMatrix, SLOT_BYTES, TILE_COLS, TILE_ROWS};

/// Tokens per tile: each step's eight code registers are reused across them (8 measured
/// ~7% faster than 4 at 64 tokens). Remainders run as tiles of 4, 3, 2 and 1.
const TILE_TOKENS: usize = 8;
/// Rows per half of a row group: one 32-bit lane each in a 256-bit register.
const HALF_ROWS: usize = TILE_ROWS / 2;

/// Quads 0..4 of a 2-bit chunk half: bits `2j..2j+2` of each byte.
///
/// # Safety
/// AVX2 must be available; `q` must have at least 4 elements.
#[inline(always)]
unsafe fn low2(chunk: __m256i, q: &mut [__m256i]) {
    // SAFETY: the caller guarantees AVX2 (this fn's contract); only registers are touched,
    // and `q` is indexed within its length 4 (checked by the slice indexing).
    unsafe {
        let two = _mm256_set1_epi8(0b11);
        q[0] = _mm256_and_si256(chunk, two);
        q[1] = _mm256_and_si256(_mm256_srli_epi16::<2>(chunk), two);
        q[2] = _mm256_and_si256(_mm256_srli_epi16::<4>(chunk), two);
        q[3] = _mm256_and_si256(_mm256_srli_epi16::<6>(chunk), two);
    }
}

/// Quads 0..8 of rows `8h..8h + 8` from four 4-bit chunks at `at` (`at` already offset by
/// the half): low nibbles quads 0, 2, 4, 6; high nibbles 1, 3, 5, 7.
///
/// # Safety
/// AVX2 must be available; `at + 64 · i` must be readable for 32 bytes, i in 0..4.
#[inline(always)]
unsafe fn nibbles(at: *const u8) -> [__m256i; 8] {
    // SAFETY: the caller guarantees AVX2 and the four 32-byte spans that are loaded.
    unsafe {
        let mut q = [_mm256_setzero_si256(); 8];
        let low4 = _mm256_set1_epi8(0x0F);
        for i in 0..4 {
            let chunk = _mm256_loadu_si256(at.add(64 * i).cast());
            q[2 * i] = _mm256_and_si256(chunk, low4);
            q[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(chunk), low4);
        }
        q
    }
}

/// Bit j of each byte of `plane`, for quads j = 0..8, moved to bit `to` of quad j's byte.
///
/// # Safety
/// AVX2 must be available.
#[inline(always)]
unsafe fn bit_planes<const TO: i32>(plane: __m256i) -> [__m256i; 8] {
    // SAFETY: the caller guarantees AVX2; only registers are touched. 16-bit shifts are
    // fine: the mask keeps only bits that came from the same byte.
    unsafe {
        let bit = _mm256_set1_epi8(1 << TO);
        let mut q = [_mm256_setzero_si256(); 8];
        for (j, qj) in q.iter_mut().enumerate() {
            let moved = match TO - j as i32 {
                2 => _mm256_slli_epi16::<2>(plane),
                1 => _mm256_slli_epi16::<1>(plane),
                0 => plane,
                -1 => _mm256_srli_epi16::<1>(plane),
                -2 => _mm256_srli_epi16::<2>(plane),
                -3 => _mm256_srli_epi16::<3>(plane),
                -4 => _mm256_srli_epi16::<4>(plane),
                -5 => _mm256_srli_epi16::<5>(plane),
                -6 => _mm256_srli_epi16::<6>(plane),
                _ => _mm256_srli_epi16::<7>(plane),
            };
            *qj = _mm256_and_si256(moved, bit);
        }
        q
    }
}

/// Codes of 8 quads (columns `32 · step ..`) of rows `8h..8h + 8` of a tile with
/// `bits`-bit codes at `codes`: the codes (≤ 15) and, for tiles wider than 4 bits, their
/// bits above the fourth (≤ 15) in a second set.
///
/// # Safety
/// AVX2 is available and `codes` points at a tile's code area holding at least
/// `step + 1` steps of `bits`-bit codes (see [`crate::efq::code`]).
#[inline(always)]
unsafe fn decode_step(
    bits: u8,
    codes: *const u8,
    step: usize,
    h: usize,
) -> ([__m256i; 8], Option<[__m256i; 8]>) {
    // SAFETY: the caller guarantees AVX2 and that `codes` holds at least `step + 1` steps of
    // `bits`-bit codes: `64 · bits` bytes per step; with `half = 32h ≤ 32`, every 32-byte
    // load stays inside step `step`'s chunks.
    unsafe {
        let half = 32 * h;
        let at = codes.add(64 * bits as usize * step + half);
        match bits {
            2 => {
                let mut q = [_mm256_setzero_si256(); 8];
                low2(_mm256_loadu_si256(at.cast()), &mut q[..4]);
                low2(_mm256_loadu_si256(at.add(64).cast()), &mut q[4..]);
                (q, None)
            }
            3 => {
                let mut q = [_mm256_setzero_si256(); 8];
                low2(_mm256_loadu_si256(at.cast()), &mut q[..4]);
                low2(_mm256_loadu_si256(at.add(64).cast()), &mut q[4..]);
                // Bit j of each byte is bit 2 of quad j's code.
                let high = bit_planes::<2>(_mm256_loadu_si256(at.add(128).cast()));
                for (qj, hj) in q.iter_mut().zip(high) {
                    *qj = _mm256_or_si256(*qj, hj);
                }
                (q, None)
            }
            4 => (nibbles(at), None),
            5 => (
                nibbles(at),
                Some(bit_planes::<0>(_mm256_loadu_si256(at.add(256).cast()))),
            ),
            6 => {
                let mut high = [_mm256_setzero_si256(); 8];
                low2(_mm256_loadu_si256(at.add(256).cast()), &mut high[..4]);
                low2(_mm256_loadu_si256(at.add(320).cast()), &mut high[4..]);
                (nibbles(at), Some(high))
            }
            _ => (nibbles(at), Some(nibbles(at.add(256)))),
        }
    }
}

/// Per token `t`, `sums[t] += Σ_j codes[j] · a_t(quad j)` over 8 quads at activation
/// offset `a_at` of token `t0 + t`, summed in 16 bits then widened (codes ≤ 15).
///
/// # Safety
/// AVX2 is available and `act` holds rows `t0..t0 + T` of `act_row` bytes, each with 32
/// bytes at `a_at`.
#[inline(always)]
unsafe fn dot_step<const T: usize, const SHIFT: i32>(
    codes: &[__m256i; 8],
    act: &[u8],
    act_row: usize,
    t0: usize,
    a_at: usize,
    sums: &mut [__m256i; T],
) {
    // SAFETY: the caller guarantees AVX2 and the 32 activation bytes of each token read.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        for (t, sum) in sums.iter_mut().enumerate() {
            let a = act.as_ptr().add((t0 + t) * act_row + a_at);
            let mut pairs = _mm256_setzero_si256();
            for (j, &qj) in codes.iter().enumerate() {
                let quad = std::ptr::read_unaligned(a.add(4 * j).cast::<i32>());
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(qj, _mm256_set1_epi32(quad)));
            }
            let widened = _mm256_madd_epi16(pairs, ones);
            *sum = _mm256_add_epi32(*sum, _mm256_slli_epi32::<SHIFT>(widened));
        }
    }
}

/// Rows `8h..8h + 8` of group `g` × tokens `t0..t0 + T`.
///
/// # Safety
/// As [`matmul_avx2`], with `g` a group inside `r0..r1`, `t0 + T ≤ n_tok`, and `x_deq`
/// holding the dequantized activation rows whenever the group has outlier slots.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn half_tile<const T: usize>(
    m: &EfqMatrix<'_>,
    g: usize,
    h: usize,
    t0: usize,
    act: &[u8],
    act_row: usize,
    x_deq: &[f32],
    out: *mut f32,
    out_stride: usize,
    r0: usize,
) {
    // SAFETY: the caller guarantees AVX2, FMA and F16C, that `m` was checked by
    // `EfqMatrix::parse` (so each tile holds its scales, zeros and `tile_cols / 32` steps of
    // codes, and every slot column is `< n_in`), that `act` holds rows `t0..t0 + T` of
    // `act_row` bytes, `x_deq` those rows dequantized when `g` has slots, and that `out` has
    // rows `8h..8h + 8` of group `g` for each token at `(t0 + t) · out_stride + 16g + 8h − r0`.
    unsafe {
        let d_rows = _mm256_cvtph_ps(_mm_loadu_si128(
            m.row_scale_bytes(g).as_ptr().add(2 * HALF_ROWS * h).cast(),
        ));
        let mut acc = [_mm256_setzero_ps(); T];
        for ti in 0..m.n_tiles() {
            let (tile, bits) = (m.tile(g, ti), m.width(g, ti));
            // Same product as the scalar `tile[r] as f32 * row_scales[r]`.
            let scales = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    tile.as_ptr().add(HALF_ROWS * h).cast(),
                ))),
                d_rows,
            );
            let zeros = if bits <= 4 {
                // Row r's zero is nibble r / 8 of byte r % 8: this half's are nibble h of
                // bytes 0..8.
                let z8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(tile.as_ptr().add(TILE_ROWS).cast()));
                _mm256_and_si256(
                    _mm256_srlv_epi32(z8, _mm256_set1_epi32(4 * h as i32)),
                    _mm256_set1_epi32(0xF),
                )
            } else {
                // One byte per row.
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    tile.as_ptr().add(TILE_ROWS + HALF_ROWS * h).cast(),
                ))
            };
            let codes = tile.as_ptr().add(codes_offset(bits));
            let mut isum = [_mm256_setzero_si256(); T];
            for step in 0..tile_cols(m.n_in, ti) / 32 {
                let (q, high) = decode_step(bits, codes, step, h);
                let a_at = ti * ActQ8::BLOCK_BYTES + 8 + 32 * step;
                dot_step::<T, 0>(&q, act, act_row, t0, a_at, &mut isum);
                if let Some(high) = high {
                    dot_step::<T, 4>(&high, act, act_row, t0, a_at, &mut isum);
                }
            }
            for (t, (sum, acc)) in isum.iter().zip(acc.iter_mut()).enumerate() {
                let block = act
                    .as_ptr()
                    .add((t0 + t) * act_row + ti * ActQ8::BLOCK_BYTES);
                let d_a = std::ptr::read_unaligned(block.cast::<f32>());
                let sum_a = std::ptr::read_unaligned(block.add(4).cast::<i32>());
                let centered =
                    _mm256_sub_epi32(*sum, _mm256_mullo_epi32(zeros, _mm256_set1_epi32(sum_a)));
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(centered), _mm256_set1_ps(d_a));
                *acc = _mm256_fmadd_ps(scaled, scales, *acc);
            }
        }
        let slots = m.slots(g);
        if !slots.is_empty() {
            let gs = _mm256_set1_ps(m.outlier_scale(g));
            for slot in slots.chunks_exact(SLOT_BYTES) {
                let cols = _mm256_cvtepu16_epi32(_mm_loadu_si128(
                    slot.as_ptr().add(2 * HALF_ROWS * h).cast(),
                ));
                let vals = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    slot.as_ptr().add(2 * TILE_ROWS + HALF_ROWS * h).cast(),
                )));
                let weights = _mm256_mul_ps(vals, gs);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let x = x_deq.as_ptr().add((t0 + t) * m.n_in);
                    // SAFETY: `parse` checked every slot column is < n_in.
                    let xs = _mm256_i32gather_ps::<4>(x, cols);
                    *acc = _mm256_fmadd_ps(weights, xs, *acc);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(
                out.add((t0 + t) * out_stride + g * TILE_ROWS + HALF_ROWS * h - r0),
                *acc,
            );
        }
    }
}

/// Group `g` × tokens `t0..t0 + T`, one 8-row half after the other.
///
/// # Safety
/// As [`half_tile`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group_tile<const T: usize>(
    m: &EfqMatrix<'_>,
    g: usize,
    t0: usize,
    act: &[u8],
    act_row: usize,
    x_deq: &[f32],
    out: *mut f32,
    out_stride: usize,
    r0: usize,
) {
    // SAFETY: `h` is 0 or 1, and the caller guarantees the rest of `half_tile`'s contract.
    unsafe {
        for h in 0..2 {
            half_tile::<T>(m, g, h, t0, act, act_row, x_deq, out, out_stride, r0);
        }
    }
}

/// See [`crate::efq::matmul_on`].
///
/// # Safety
/// AVX2, FMA and F16C are available; `m` was checked by `EfqMatrix::parse`; `r0..r1` are
/// 16-aligned rows of `m`; `act` holds `n_tok` [`ActQ8`] rows of `m.n_in`; `out` holds
/// `(n_tok − 1) · out_stride + (r1 − r0)` values; `x_deq` holds the `n_tok`
/// rows of `act` dequantized `(n_tok, n_in)` when any group in `r0..r1` has outlier slots.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_avx2(
    m: &EfqMatrix<'_>,
    r0: usize,
    r1: usize,
    act: &[u8],
    n_tok: usize,
    x_deq: &[f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let act_row = ActQ8::row_bytes(m.n_in);
    let out = out.as_mut_ptr();
    for g in r0 / TILE_ROWS..r1 / TILE_ROWS {
        let mut t = 0;
        while t < n_tok {
            // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (efq.rs asserts the ISA
            // is runnable); the caller's contract covers group g (inside r0..r1) and tokens
            // t..t + T (each arm's T ≤ n_tok − t); `x_deq` holds the dequantized
            // activations when any group has slots (also the caller's contract).
            let tokens = unsafe {
                match n_tok - t {
                    left if left >= TILE_TOKENS => {
                        group_tile::<TILE_TOKENS>(
                            m, g, t, act, act_row, x_deq, out, out_stride, r0,
                        );
                        TILE_TOKENS
                    }
                    left if left >= 4 => {
                        group_tile::<4>(m, g, t, act, act_row, x_deq, out, out_stride, r0);
                        4
                    }
                    3 => {
                        group_tile::<3>(m, g, t, act, act_row, x_deq, out, out_stride, r0);
                        3
                    }
                    2 => {
                        group_tile::<2>(m, g, t, act, act_row, x_deq, out, out_stride, r0);
                        2
                    }
                    _ => {
                        group_tile::<1>(m, g, t, act, act_row, x_deq, out, out_stride, r0);
                        1
                    }
                }
            };
            t += tokens;
        }
    }
}

const _: () =
    assert!(TILE_COLS.is_multiple_of(32) && TILE_ROWS == 2 * HALF_ROWS && TILE_TOKENS >= 4);
