//! NEON kernel for EFQ matrices (format: [`crate::efq`]).
//!
//! A 64-byte code chunk holds one quad (4 columns) of all 16 rows, byte `4r + i` = row r;
//! its 16-byte quarter `h` is therefore rows `4h..4h + 4` × 4 columns, which is one NEON
//! register. Per quarter, a step decodes 8 quads (32 columns) into eight registers of
//! unsigned codes (≤ 15, so they fit i8; wide tiles' codes, 5 to 8 bits, as two such sets,
//! the low nibbles and the high bits, whose sums are added with a shift of 4), then for each token multiplies them with the
//! broadcast 4-byte activation quads: `vmull_s8` / `vmlal_high_s8` collect one product per
//! quad in each i16 lane (row, column-in-quad), and every 16 quads `vpadalq_s16` widens
//! pairs into i32. After a tile, `vpaddq_s32` folds the two halves into one i32 per row,
//! the zero points come back out (`z · Σa`) and one multiply and one FMA apply the
//! activation and block scales. Outliers are a 4-lane load from the dequantized activation
//! and one FMA per slot. Float operations follow the scalar reference's order exactly.
//!
//! Only baseline Advanced SIMD is used (no `dotprod`).

use std::arch::aarch64::*;

use crate::efq::{codes_offset, tile_cols, ActQ8, EfqMatrix, SLOT_BYTES, TILE_COLS, TILE_ROWS};

/// Tokens per tile: each step's eight code registers are reused across them.
const TILE_TOKENS: usize = 4;

/// Quads 0..4 of the 2-bit chunk quarter `v`: bits `2j..2j+2` of each byte.
///
/// # Safety
/// NEON must be available; `q` must have at least 4 elements.
#[inline(always)]
unsafe fn low2(v: uint8x16_t, q: &mut [uint8x16_t]) {
    // SAFETY: the caller guarantees NEON (this fn's contract); only registers are touched,
    // and `q` is indexed within its length 4 (checked by the slice indexing).
    unsafe {
        let two = vdupq_n_u8(0b11);
        q[0] = vandq_u8(v, two);
        q[1] = vandq_u8(vshrq_n_u8::<2>(v), two);
        q[2] = vandq_u8(vshrq_n_u8::<4>(v), two);
        q[3] = vshrq_n_u8::<6>(v);
    }
}

/// Quads 0..8 from four 4-bit chunk quarters at `at`, `at + 64`, …: low nibbles quads 0,
/// 2, 4, 6; high nibbles 1, 3, 5, 7.
///
/// # Safety
/// NEON must be available; `at + 64 · i` must be readable for 16 bytes, i in 0..4.
#[inline(always)]
unsafe fn nibbles(at: *const u8) -> [uint8x16_t; 8] {
    // SAFETY: the caller guarantees NEON and the four 16-byte spans that are loaded.
    unsafe {
        let mut q = [vdupq_n_u8(0); 8];
        let low4 = vdupq_n_u8(0x0F);
        for i in 0..4 {
            let v = vld1q_u8(at.add(64 * i));
            q[2 * i] = vandq_u8(v, low4);
            q[2 * i + 1] = vshrq_n_u8::<4>(v);
        }
        q
    }
}

/// Bit j of each byte of `plane`, for quads j = 0..8, as 0 or `value`.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn bit_planes(plane: uint8x16_t, value: u8) -> [uint8x16_t; 8] {
    // SAFETY: the caller guarantees NEON; only registers are touched.
    unsafe {
        let value = vdupq_n_u8(value);
        std::array::from_fn(|j| vandq_u8(vtstq_u8(plane, vdupq_n_u8(1 << j)), value))
    }
}

/// Codes of 8 quads (columns `32 · step ..`) of rows `4h..4h + 4` of a tile with `bits`-bit
/// codes; `codes` points at quarter `h` of the tile's first chunk (code area + `16 · h`).
/// Returns the codes (≤ 15) and, for tiles wider than 4 bits, their bits above the fourth
/// (≤ 15) as a second set.
///
/// # Safety
/// NEON must be available and `codes` must point at quarter `h` (offset `16 · h`) of a tile's
/// code area holding at least `step + 1` steps of `bits`-bit codes (see
/// [`crate::efq::code`]).
#[inline(always)]
unsafe fn decode_step(
    bits: u8,
    codes: *const u8,
    step: usize,
) -> ([uint8x16_t; 8], Option<[uint8x16_t; 8]>) {
    // SAFETY: the caller guarantees NEON and that `codes` is quarter `h` of a tile's code
    // area holding at least `step + 1` steps of `bits`-bit codes: `64 · bits` bytes per step;
    // every 16-byte load at `codes + 64 · i` stays inside them.
    unsafe {
        let at = codes.add(64 * bits as usize * step);
        match bits {
            2 => {
                let mut q = [vdupq_n_u8(0); 8];
                low2(vld1q_u8(at), &mut q[..4]);
                low2(vld1q_u8(at.add(64)), &mut q[4..]);
                (q, None)
            }
            3 => {
                let mut q = [vdupq_n_u8(0); 8];
                low2(vld1q_u8(at), &mut q[..4]);
                low2(vld1q_u8(at.add(64)), &mut q[4..]);
                for (qj, hj) in q.iter_mut().zip(bit_planes(vld1q_u8(at.add(128)), 4)) {
                    *qj = vorrq_u8(*qj, hj);
                }
                (q, None)
            }
            4 => (nibbles(at), None),
            5 => (nibbles(at), Some(bit_planes(vld1q_u8(at.add(256)), 1))),
            6 => {
                let mut high = [vdupq_n_u8(0); 8];
                low2(vld1q_u8(at.add(256)), &mut high[..4]);
                low2(vld1q_u8(at.add(320)), &mut high[4..]);
                (nibbles(at), Some(high))
            }
            _ => (nibbles(at), Some(nibbles(at.add(256)))),
        }
    }
}

/// `narrow += codes · a` per (row, column in quad) over 8 quads at `a`: `narrow[0]` rows
/// `4h, 4h + 1`, `narrow[1]` rows `4h + 2, 4h + 3`.
///
/// # Safety
/// NEON must be available and `a` readable for 32 bytes.
#[inline(always)]
unsafe fn mac(narrow: &mut [int16x8_t; 2], codes: &[uint8x16_t; 8], a: *const u8) {
    // SAFETY: the caller guarantees NEON and the 32 bytes read at `a`.
    unsafe {
        let [lo, hi] = narrow;
        for (j, &qj) in codes.iter().enumerate() {
            let quad = std::ptr::read_unaligned(a.add(4 * j).cast::<u32>());
            let quad = vreinterpretq_s8_u32(vdupq_n_u32(quad));
            let qj = vreinterpretq_s8_u8(qj);
            *lo = vmlal_s8(*lo, vget_low_s8(qj), vget_low_s8(quad));
            *hi = vmlal_high_s8(*hi, qj, quad);
        }
    }
}

/// Widens `narrow` into `wide` (pairs of i16 into i32) and clears it.
///
/// # Safety
/// NEON must be available.
#[inline(always)]
unsafe fn widen(wide: &mut [int32x4_t; 2], narrow: &mut [int16x8_t; 2]) {
    // SAFETY: the caller guarantees NEON; only registers are touched.
    unsafe {
        wide[0] = vpadalq_s16(wide[0], narrow[0]);
        wide[1] = vpadalq_s16(wide[1], narrow[1]);
        *narrow = [vdupq_n_s16(0); 2];
    }
}

/// Group `g` × tokens `t0..t0 + T`.
///
/// # Safety
/// As [`matmul_neon`], with `g` a group inside `r0..r1`, `t0 + T ≤ n_tok`, and `x_deq`
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
    // SAFETY: the caller guarantees NEON, that `m` was checked by `EfqMatrix::parse` (so
    // each tile holds its scales, zeros and `tile_cols / 32` steps of codes), that `act` holds
    // rows `t0..t0 + T` of `act_row` bytes, and that `out` has the 16 values of group `g` for
    // tokens `t0..t0 + T` at `(t0 + t) · out_stride + 16g − r0`. Outliers index `x_deq`
    // with bounds checks.
    unsafe {
        // The scalar reference's row scales, converted by the same function.
        let d_rows: [f32; TILE_ROWS] = std::array::from_fn(|r| m.row_scale(g * TILE_ROWS + r));
        let d_rows: [float32x4_t; 4] =
            std::array::from_fn(|h| vld1q_f32(d_rows.as_ptr().add(4 * h)));
        // acc[t][h]: token t0 + t, rows 4h..4h + 4.
        let mut acc = [[vdupq_n_f32(0.0); 4]; T];
        for ti in 0..m.n_tiles() {
            let (tile, bits) = (m.tile(g, ti), m.width(g, ti));
            let steps = tile_cols(m.n_in, ti) / 32;
            // s · d_r per row, as `tile[r] as f32 * row_scales[r]`.
            let s = vld1q_u8(tile.as_ptr());
            let (s_lo, s_hi) = (vmovl_u8(vget_low_u8(s)), vmovl_high_u8(s));
            let block_scales = [
                vcvtq_f32_u32(vmovl_u16(vget_low_u16(s_lo))),
                vcvtq_f32_u32(vmovl_high_u16(s_lo)),
                vcvtq_f32_u32(vmovl_u16(vget_low_u16(s_hi))),
                vcvtq_f32_u32(vmovl_high_u16(s_hi)),
            ];
            let scales: [float32x4_t; 4] =
                std::array::from_fn(|h| vmulq_f32(block_scales[h], d_rows[h]));
            let (z_lo, z_hi) = if bits <= 4 {
                // Row r's zero is nibble r / 8 of byte r % 8: rows 0-7 low nibbles, 8-15 high.
                let z8 = vld1_u8(tile.as_ptr().add(TILE_ROWS));
                (
                    vmovl_u8(vand_u8(z8, vdup_n_u8(0xF))),
                    vmovl_u8(vshr_n_u8::<4>(z8)),
                )
            } else {
                // One byte per row.
                let z16 = vld1q_u8(tile.as_ptr().add(TILE_ROWS));
                (vmovl_u8(vget_low_u8(z16)), vmovl_high_u8(z16))
            };
            let zeros = [
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(z_lo))),
                vreinterpretq_s32_u32(vmovl_high_u16(z_lo)),
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(z_hi))),
                vreinterpretq_s32_u32(vmovl_high_u16(z_hi)),
            ];
            let codes = tile.as_ptr().add(codes_offset(bits));
            let blocks: [*const u8; T] = std::array::from_fn(|t| {
                act.as_ptr()
                    .add((t0 + t) * act_row + ti * ActQ8::BLOCK_BYTES)
            });
            for h in 0..4 {
                // wide[t]: rows 4h, 4h+1 then 4h+2, 4h+3, each as two column-pair sums.
                let mut wide = [[vdupq_n_s32(0); 2]; T];
                // narrow[t]: the same rows as one i16 per (row, column in quad); at most 16
                // products of |code| ≤ 15 and |a| ≤ 128 (≤ 30720) before they are widened.
                let mut narrow = [[vdupq_n_s16(0); 2]; T];
                // The same for the high bits of wide tiles' codes.
                let mut wide_high = [[vdupq_n_s32(0); 2]; T];
                let mut narrow_high = [[vdupq_n_s16(0); 2]; T];
                for step in 0..steps {
                    let (q, high) = decode_step(bits, codes.add(16 * h), step);
                    for t in 0..T {
                        let a = blocks[t].add(8 + 32 * step);
                        mac(&mut narrow[t], &q, a);
                        if let Some(high) = &high {
                            mac(&mut narrow_high[t], high, a);
                        }
                        if step % 2 == 1 || step + 1 == steps {
                            widen(&mut wide[t], &mut narrow[t]);
                            if high.is_some() {
                                widen(&mut wide_high[t], &mut narrow_high[t]);
                            }
                        }
                    }
                }
                for (t, (block, acc)) in blocks.iter().zip(&mut acc).enumerate() {
                    let d_a = std::ptr::read_unaligned(block.cast::<f32>());
                    let sum_a = std::ptr::read_unaligned(block.add(4).cast::<i32>());
                    let mut dot = vpaddq_s32(wide[t][0], wide[t][1]);
                    if bits > 4 {
                        let high = vpaddq_s32(wide_high[t][0], wide_high[t][1]);
                        dot = vaddq_s32(dot, vshlq_n_s32::<4>(high));
                    }
                    let centered = vsubq_s32(dot, vmulq_s32(zeros[h], vdupq_n_s32(sum_a)));
                    let scaled = vmulq_f32(vcvtq_f32_s32(centered), vdupq_n_f32(d_a));
                    acc[h] = vfmaq_f32(acc[h], scaled, scales[h]);
                }
            }
        }
        let slots = m.slots(g);
        if !slots.is_empty() {
            let gs = vdupq_n_f32(m.outlier_scale(g));
            for slot in slots.chunks_exact(SLOT_BYTES) {
                let vals = vmovl_s8(vld1_s8(slot.as_ptr().add(2 * TILE_ROWS).cast()));
                let vals_hi = vmovl_s8(vld1_s8(slot.as_ptr().add(2 * TILE_ROWS + 8).cast()));
                let vals = [
                    vmovl_s16(vget_low_s16(vals)),
                    vmovl_high_s16(vals),
                    vmovl_s16(vget_low_s16(vals_hi)),
                    vmovl_high_s16(vals_hi),
                ];
                let cols: [usize; TILE_ROWS] = std::array::from_fn(|r| {
                    u16::from_le_bytes([slot[2 * r], slot[2 * r + 1]]) as usize
                });
                for h in 0..4 {
                    let weights = vmulq_f32(vcvtq_f32_s32(vals[h]), gs);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let x = &x_deq[(t0 + t) * m.n_in..][..m.n_in];
                        let xs: [f32; 4] = std::array::from_fn(|i| x[cols[4 * h + i]]);
                        acc[h] = vfmaq_f32(acc[h], weights, vld1q_f32(xs.as_ptr()));
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let at = out.add((t0 + t) * out_stride + g * TILE_ROWS - r0);
            for (h, &v) in acc.iter().enumerate() {
                vst1q_f32(at.add(4 * h), v);
            }
        }
    }
}

/// See [`crate::efq::matmul_on`].
///
/// # Safety
/// NEON is available; `m` was checked by `EfqMatrix::parse`; `r0..r1` are 16-aligned rows
/// of `m`; `act` holds `n_tok` [`ActQ8`] rows of `m.n_in`; `out` holds
/// `(n_tok − 1) · out_stride + (r1 − r0)` values; `x_deq` holds the `n_tok`
/// rows of `act` dequantized `(n_tok, n_in)` when any group in `r0..r1` has outlier slots.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_neon(
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
            // SAFETY: NEON is guaranteed by the caller (efq.rs asserts the ISA is runnable);
            // the caller's contract covers group g (inside r0..r1) and tokens t..t + T (each
            // arm's T ≤ n_tok − t), and `x_deq` holds the dequantized activations when any
            // group has slots (also the caller's contract).
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
