//! AVX-512 VNNI kernel for EFQ matrices (format: [`crate::efq`]).
//!
//! A step decodes 8 quads (32 columns) of a tile's 16 rows into eight registers of unsigned
//! codes (up to 255: `vpdpbusd` takes the whole byte, so wide tiles cost only their decode),
//! then runs eight `vpdpbusd` per token against broadcast 4-byte activation quads.
//! After a tile, one `vpmulld` takes the zero points back out (`z · Σa`), and one multiply
//! and one FMA apply the activation and block scales. Outliers are one gather + FMA per
//! slot. Float operations follow the scalar reference's order exactly.

use std::arch::x86_64::*;

use crate::efq::{codes_offset, tile_cols, ActQ8, EfqMatrix, SLOT_BYTES, TILE_COLS, TILE_ROWS};

/// Tokens per tile: each step's eight code registers are reused across them.
const TILE_TOKENS: usize = 4;

/// Quads 0..4 of a 2-bit chunk: bits `2j..2j+2` of each byte.
///
/// # Safety
/// AVX-512 F/BW must be available; `q` must have at least 4 elements.
#[inline(always)]
unsafe fn low2(chunk: __m512i, q: &mut [__m512i]) {
    // SAFETY: the caller guarantees AVX-512 F/BW (this fn's contract); only registers are
    // touched, and `q` is indexed within its length 4 (checked by the slice indexing).
    unsafe {
        let two = _mm512_set1_epi8(0b11);
        q[0] = _mm512_and_si512(chunk, two);
        q[1] = _mm512_and_si512(_mm512_srli_epi16::<2>(chunk), two);
        q[2] = _mm512_and_si512(_mm512_srli_epi16::<4>(chunk), two);
        q[3] = _mm512_and_si512(_mm512_srli_epi16::<6>(chunk), two);
    }
}

/// Quads 0..8 of four 4-bit chunks at `at`: low nibbles quads 0, 2, 4, 6; high 1, 3, 5, 7.
///
/// # Safety
/// AVX-512 F/BW must be available; `at` must be readable for 256 bytes.
#[inline(always)]
unsafe fn nibbles(at: *const u8) -> [__m512i; 8] {
    // SAFETY: the caller guarantees AVX-512 F/BW and 256 readable bytes at `at`: the four
    // 64-byte loads cover exactly those.
    unsafe {
        let mut q = [_mm512_setzero_si512(); 8];
        let low4 = _mm512_set1_epi8(0x0F);
        for i in 0..4 {
            let chunk = _mm512_loadu_si512(at.add(64 * i).cast());
            q[2 * i] = _mm512_and_si512(chunk, low4);
            q[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(chunk), low4);
        }
        q
    }
}

/// Adds `add` to quad j's codes wherever bit j of `plane`'s bytes is set.
///
/// # Safety
/// AVX-512 F/BW must be available.
#[inline(always)]
unsafe fn add_bit_plane(q: &mut [__m512i; 8], plane: __m512i, add: i8) {
    // SAFETY: the caller guarantees AVX-512 F/BW; only registers are touched.
    unsafe {
        let add = _mm512_set1_epi8(add);
        for (j, qj) in q.iter_mut().enumerate() {
            let bit = _mm512_test_epi8_mask(plane, _mm512_set1_epi8((1u8 << j) as i8));
            *qj = _mm512_mask_add_epi8(*qj, bit, *qj, add);
        }
    }
}

/// Codes of 8 quads (columns `32 · step ..`) of a tile with `bits`-bit codes at `codes`.
///
/// # Safety
/// AVX-512 F/BW must be available and `codes` must point at a tile's code area holding at
/// least `step + 1` steps of `bits`-bit codes (see [`crate::efq::code`]).
#[inline(always)]
unsafe fn decode_step(bits: u8, codes: *const u8, step: usize) -> [__m512i; 8] {
    // SAFETY: the caller guarantees AVX-512 F/BW and that `codes` is a tile's code area
    // holding at least `step + 1` steps of `bits`-bit codes: `64 · bits` bytes per step,
    // which is exactly the span read from `codes + step · 64 · bits`.
    unsafe {
        let mut q = [_mm512_setzero_si512(); 8];
        match bits {
            2 => {
                let at = codes.add(128 * step);
                low2(_mm512_loadu_si512(at.cast()), &mut q[..4]);
                low2(_mm512_loadu_si512(at.add(64).cast()), &mut q[4..]);
            }
            3 => {
                let at = codes.add(192 * step);
                low2(_mm512_loadu_si512(at.cast()), &mut q[..4]);
                low2(_mm512_loadu_si512(at.add(64).cast()), &mut q[4..]);
                add_bit_plane(&mut q, _mm512_loadu_si512(at.add(128).cast()), 4);
            }
            4 => q = nibbles(codes.add(256 * step)),
            5 => {
                let at = codes.add(320 * step);
                q = nibbles(at);
                add_bit_plane(&mut q, _mm512_loadu_si512(at.add(256).cast()), 16);
            }
            6 => {
                let at = codes.add(384 * step);
                q = nibbles(at);
                let mut high = [_mm512_setzero_si512(); 8];
                low2(_mm512_loadu_si512(at.add(256).cast()), &mut high[..4]);
                low2(_mm512_loadu_si512(at.add(320).cast()), &mut high[4..]);
                for (qj, hj) in q.iter_mut().zip(high) {
                    *qj = _mm512_or_si512(*qj, _mm512_slli_epi16::<4>(hj));
                }
            }
            _ => {
                let at = codes.add(512 * step);
                q = nibbles(at);
                for (qj, hj) in q.iter_mut().zip(nibbles(at.add(256))) {
                    *qj = _mm512_or_si512(*qj, _mm512_slli_epi16::<4>(hj));
                }
            }
        }
        q
    }
}

/// Group `g` × tokens `t0..t0 + T`.
///
/// # Safety
/// As [`matmul_vnni`], with `g` a group inside `r0..r1`, `t0 + T ≤ n_tok`, and `x_deq`
/// holding the dequantized activation rows whenever the group has outlier slots.
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
    // SAFETY: the caller guarantees AVX-512 F/BW/VL/VNNI and F16C, that `m` was checked by
    // `EfqMatrix::parse` (so each tile holds its scales, zeros and `tile_cols / 32` steps of
    // codes, and every slot column is `< n_in`), that `act` holds rows `t0..t0 + T` of
    // `act_row` bytes, `x_deq` those rows dequantized when `g` has slots, and that `out` has
    // the 16 values of group `g` for tokens `t0..t0 + T` at `(t0 + t) · out_stride + 16g − r0`.
    unsafe {
        let d_rows = _mm512_cvtph_ps(_mm256_loadu_si256(m.row_scale_bytes(g).as_ptr().cast()));
        let nibble_shift = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); T];
        for ti in 0..m.n_tiles() {
            let (tile, bits) = (m.tile(g, ti), m.width(g, ti));
            let scales = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(tile.as_ptr().cast()))),
                d_rows,
            );
            let zeros = if bits <= 4 {
                // Row r's zero is nibble r / 8 of byte r % 8: lanes 0-7 low nibbles, 8-15 high.
                let z8 = std::ptr::read_unaligned(tile.as_ptr().add(TILE_ROWS).cast::<i64>());
                _mm512_and_si512(
                    _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_set1_epi64x(z8)), nibble_shift),
                    _mm512_set1_epi32(0xF),
                )
            } else {
                // One byte per row.
                _mm512_cvtepu8_epi32(_mm_loadu_si128(tile.as_ptr().add(TILE_ROWS).cast()))
            };
            let codes = tile.as_ptr().add(codes_offset(bits));
            let mut isum = [_mm512_setzero_si512(); T];
            for step in 0..tile_cols(m.n_in, ti) / 32 {
                let q = decode_step(bits, codes, step);
                for (t, sum) in isum.iter_mut().enumerate() {
                    let a = act
                        .as_ptr()
                        .add((t0 + t) * act_row + ti * ActQ8::BLOCK_BYTES + 8 + 32 * step);
                    for (j, &qj) in q.iter().enumerate() {
                        let quad = std::ptr::read_unaligned(a.add(4 * j).cast::<i32>());
                        *sum = _mm512_dpbusd_epi32(*sum, qj, _mm512_set1_epi32(quad));
                    }
                }
            }
            for (t, (sum, acc)) in isum.iter().zip(acc.iter_mut()).enumerate() {
                let block = act
                    .as_ptr()
                    .add((t0 + t) * act_row + ti * ActQ8::BLOCK_BYTES);
                let d_a = std::ptr::read_unaligned(block.cast::<f32>());
                let sum_a = std::ptr::read_unaligned(block.add(4).cast::<i32>());
                let centered =
                    _mm512_sub_epi32(*sum, _mm512_mullo_epi32(zeros, _mm512_set1_epi32(sum_a)));
                let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(centered), _mm512_set1_ps(d_a));
                *acc = _mm512_fmadd_ps(scaled, scales, *acc);
            }
        }
        let slots = m.slots(g);
        if !slots.is_empty() {
            let gs = _mm512_set1_ps(m.outlier_scale(g));
            for slot in slots.chunks_exact(SLOT_BYTES) {
                let cols = _mm512_cvtepu16_epi32(_mm256_loadu_si256(slot.as_ptr().cast()));
                let vals = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    slot.as_ptr().add(2 * TILE_ROWS).cast(),
                )));
                let weights = _mm512_mul_ps(vals, gs);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let x = x_deq.as_ptr().add((t0 + t) * m.n_in);
                    let xs = _mm512_i32gather_ps::<4>(cols, x.cast());
                    *acc = _mm512_fmadd_ps(weights, xs, *acc);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add((t0 + t) * out_stride + g * TILE_ROWS - r0), *acc);
        }
    }
}

/// See [`crate::efq::matmul_on`].
///
/// # Safety
/// AVX-512 F/BW/VL and VNNI are available; `m` was checked by `EfqMatrix::parse`; `r0..r1`
/// are 16-aligned rows of `m`; `act` holds `n_tok` [`ActQ8`] rows of `m.n_in`; `out` holds
/// `(n_tok − 1) · out_stride + (r1 − r0)` values; `x_deq` holds the `n_tok`
/// rows of `act` dequantized `(n_tok, n_in)` when any group in `r0..r1` has outlier slots.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_vnni(
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
            // SAFETY: AVX-512 F/BW/VL/VNNI and F16C are guaranteed by the caller (efq.rs
            // asserts the ISA is runnable); the caller's contract covers group g (inside
            // r0..r1) and tokens t..t + T (each arm's T ≤ n_tok − t), and `x_deq` holds the
            // dequantized activations when any group has slots (also the caller's contract).
            unsafe {
                match n_tok - t {
                    1 => group_tile::<1>(m, g, t, act, act_row, x_deq, out, out_stride, r0),
                    2 => group_tile::<2>(m, g, t, act, act_row, x_deq, out, out_stride, r0),
                    3 => group_tile::<3>(m, g, t, act, act_row, x_deq, out, out_stride, r0),
                    _ => {
                        group_tile::<TILE_TOKENS>(m, g, t, act, act_row, x_deq, out, out_stride, r0)
                    }
                }
            }
            t += TILE_TOKENS;
        }
    }
}

const _: () = assert!(TILE_COLS.is_multiple_of(32));
