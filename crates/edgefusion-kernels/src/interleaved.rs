//! Weight rows regrouped sixteen at a time ("interleaved"), for the AVX-512 VNNI matmul.
//!
//! In GGUF order a block's 32 codes sit together and rows follow one another, so a SIMD dot
//! product ends each row with a horizontal sum and applies each block scale to a whole
//! register for the sake of one row. The interleaved layout stores, per group of 16 rows and
//! block index, the 16 rows' scales first and then their codes arranged so that one 64-byte
//! register holds the same four-code quad of all 16 rows. One `vpdpbusd` against a broadcast
//! quad of the activation adds four products to each row's sum; after eight of them a
//! register holds 16 finished block sums, scaled with one multiply and one FMA. That is about
//! a third of the instructions of the row-wise kernels (llama.cpp repacks Q4_0 for AVX-512
//! in the same spirit).
//!
//! Bytes per (group of 16 rows, block), all little-endian, groups and blocks in order:
//! ```text
//! Q4_0: d[16] f16 |                        codes 4 × 64 B  = 288 B = 16 × 18
//! Q4_1: d[16] f16 | m[16] f16 |            codes 4 × 64 B  = 320 B = 16 × 20
//! Q5_0: d[16] f16 |             qh 8 × u64 | codes 4 × 64 B  = 352 B = 16 × 22
//! Q5_1: d[16] f16 | m[16] f16 | qh 8 × u64 | codes 4 × 64 B  = 384 B = 16 × 24
//! Q8_0: d[16] f16 |                        codes 8 × 64 B  = 544 B = 16 × 34
//! ```
//! Nibble formats: byte `4r + i` of code chunk `c` holds row r's code `8c + i` in its low
//! nibble and code `8c + 4 + i` in its high nibble (quads `2c` and `2c + 1`). Bit `4r + i` of
//! qh word `q` is the fifth bit of row r's code `4q + i`. Q8_0: byte `4r + i` of chunk `q` is
//! row r's code `4q + i` plus 128, so codes are unsigned as `vpdpbusd` wants them; the bias
//! comes back out through the activation's block sum, as the nibble formats' −8 / −16 do.
//!
//! A matrix is interleaved only when its row count is a multiple of 16; the total size is
//! the GGUF size, and `rows r0..r1` of a 16-aligned range are the same byte range.

use crate::cpu::Isa;
use crate::formats::{f16_to_f32, QK};
use crate::GgmlType;

/// Rows per interleaved group.
pub const GROUP_ROWS: usize = 16;

/// True when `ty` has an interleaved layout.
pub fn has_layout(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
    )
}

/// True when `matmul_interleaved` has a fast kernel for `ty` on `isa`, that is, when
/// interleaving a matrix of `ty` pays off on this machine.
pub fn is_fast_on(isa: Isa, ty: GgmlType) -> bool {
    has_layout(ty) && isa == Isa::Avx512Vnni
}

/// Where the parts of one (group, block) lie, in bytes from its start.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    pub has_min: bool,
    pub has_qh: bool,
    pub byte_codes: bool,
    pub min_offset: usize,
    pub qh_offset: usize,
    pub codes_offset: usize,
    pub bytes: usize,
}

impl Geometry {
    pub(crate) fn of(ty: GgmlType) -> Geometry {
        let has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        let has_qh = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
        let byte_codes = ty == GgmlType::Q8_0;
        let min_offset = 2 * GROUP_ROWS;
        let qh_offset = min_offset + if has_min { 2 * GROUP_ROWS } else { 0 };
        let codes_offset = qh_offset + if has_qh { 64 } else { 0 };
        let bytes = codes_offset + if byte_codes { 8 * 64 } else { 4 * 64 };
        debug_assert_eq!(bytes, GROUP_ROWS * ty.type_size());
        Geometry {
            has_min,
            has_qh,
            byte_codes,
            min_offset,
            qh_offset,
            codes_offset,
            bytes,
        }
    }
}

/// The −bias · Σa that turns unsigned codes back into the format's signed values (0 when
/// the format has a min instead).
pub(crate) fn code_bias(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q8_0 => 128,
        _ => 0,
    }
}

/// One GGUF block split into scale, min and unsigned codes (value = d · (code − bias) + m).
struct PlainBlock {
    d: [u8; 2],
    m: [u8; 2],
    codes: [u8; QK],
}

fn read_block(ty: GgmlType, src: &[u8]) -> PlainBlock {
    let mut block = PlainBlock {
        d: [src[0], src[1]],
        m: [0; 2],
        codes: [0; QK],
    };
    let (qh, qs) = match ty {
        GgmlType::Q4_0 => (0, &src[2..18]),
        GgmlType::Q4_1 => {
            block.m = [src[2], src[3]];
            (0, &src[4..20])
        }
        GgmlType::Q5_0 => (
            u32::from_le_bytes([src[2], src[3], src[4], src[5]]),
            &src[6..22],
        ),
        GgmlType::Q5_1 => {
            block.m = [src[2], src[3]];
            (
                u32::from_le_bytes([src[4], src[5], src[6], src[7]]),
                &src[8..24],
            )
        }
        _ => {
            debug_assert_eq!(ty, GgmlType::Q8_0);
            for (c, &q) in block.codes.iter_mut().zip(&src[2..34]) {
                *c = q ^ 0x80;
            }
            return block;
        }
    };
    for (j, &q) in qs.iter().enumerate() {
        block.codes[j] = (q & 0x0F) | (((qh >> j) & 1) << 4) as u8;
        block.codes[j + QK / 2] = (q >> 4) | (((qh >> (j + QK / 2)) & 1) << 4) as u8;
    }
    block
}

fn write_block(ty: GgmlType, block: &PlainBlock, dst: &mut [u8]) {
    dst[..2].copy_from_slice(&block.d);
    let (qh_at, qs_at) = match ty {
        GgmlType::Q4_0 => (None, 2),
        GgmlType::Q4_1 => {
            dst[2..4].copy_from_slice(&block.m);
            (None, 4)
        }
        GgmlType::Q5_0 => (Some(2), 6),
        GgmlType::Q5_1 => {
            dst[2..4].copy_from_slice(&block.m);
            (Some(4), 8)
        }
        _ => {
            for (q, &c) in dst[2..34].iter_mut().zip(&block.codes) {
                *q = c ^ 0x80;
            }
            return;
        }
    };
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let (lo, hi) = (block.codes[j], block.codes[j + QK / 2]);
        dst[qs_at + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
        qh |= (((lo >> 4) & 1) as u32) << j;
        qh |= (((hi >> 4) & 1) as u32) << (j + QK / 2);
    }
    if let Some(at) = qh_at {
        dst[at..at + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Byte offset, inside a (group, block), of row `r`'s code `j`, and whether it is the high
/// nibble (nibble formats) — the one place that encodes the interleaved code order.
fn code_position(geo: &Geometry, r: usize, j: usize) -> (usize, bool) {
    let (quad, i) = (j / 4, j % 4);
    if geo.byte_codes {
        (geo.codes_offset + 64 * quad + 4 * r + i, false)
    } else {
        (
            geo.codes_offset + 64 * (quad / 2) + 4 * r + i,
            quad % 2 == 1,
        )
    }
}

/// Regroups `n_rows` GGUF rows of `k` weights of `ty` into the interleaved layout.
///
/// # Panics
/// If `ty` has no interleaved layout, `n_rows` is not a multiple of 16, `k` not a multiple
/// of 32, or `w` is shorter than the rows.
pub fn interleave(ty: GgmlType, k: usize, w: &[u8], n_rows: usize) -> Vec<u8> {
    check(ty, k, w, n_rows);
    let geo = Geometry::of(ty);
    let (nb, bb) = (k / QK, ty.type_size());
    let row_bytes = nb * bb;
    let mut out = vec![0u8; n_rows * row_bytes];
    for g in 0..n_rows / GROUP_ROWS {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * geo.bytes..][..geo.bytes];
            let mut qh = [0u64; 8];
            for r in 0..GROUP_ROWS {
                let row = g * GROUP_ROWS + r;
                let block = read_block(ty, &w[row * row_bytes + b * bb..][..bb]);
                dst[2 * r..2 * r + 2].copy_from_slice(&block.d);
                if geo.has_min {
                    dst[geo.min_offset + 2 * r..][..2].copy_from_slice(&block.m);
                }
                // Quad by quad (see `code_position`): four codes move as one 32-bit word.
                for (q, quad) in block.codes.chunks_exact(4).enumerate() {
                    let quad = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
                    let (at, word) = if geo.byte_codes {
                        (geo.codes_offset + 64 * q + 4 * r, quad)
                    } else {
                        let word = (quad & 0x0F0F_0F0F) << (4 * (q % 2));
                        (geo.codes_offset + 64 * (q / 2) + 4 * r, word)
                    };
                    let old = u32::from_le_bytes(dst[at..at + 4].try_into().unwrap());
                    dst[at..at + 4].copy_from_slice(&(old | word).to_le_bytes());
                    // Fifth bits: bit i of each byte's bit 4 → bit 4r + i of qh word q.
                    let fifth = (quad >> 4) & 0x0101_0101;
                    let nibble = (fifth | fifth >> 7 | fifth >> 14 | fifth >> 21) & 0xF;
                    qh[q] |= (nibble as u64) << (4 * r);
                }
            }
            if geo.has_qh {
                for (q, word) in qh.iter().enumerate() {
                    dst[geo.qh_offset + 8 * q..][..8].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
    }
    out
}

/// Reads one (group, block) back: row `r`'s block as plain parts.
fn read_interleaved(geo: &Geometry, src: &[u8], r: usize) -> PlainBlock {
    let mut block = PlainBlock {
        d: [src[2 * r], src[2 * r + 1]],
        m: [0; 2],
        codes: [0; QK],
    };
    if geo.has_min {
        block.m = [src[geo.min_offset + 2 * r], src[geo.min_offset + 2 * r + 1]];
    }
    for (j, code) in block.codes.iter_mut().enumerate() {
        let (at, high) = code_position(geo, r, j);
        *code = if geo.byte_codes {
            src[at]
        } else if high {
            src[at] >> 4
        } else {
            src[at] & 0x0F
        };
        if geo.has_qh {
            let bit = 4 * r + j % 4;
            *code |= ((src[geo.qh_offset + 8 * (j / 4) + bit / 8] >> (bit % 8)) & 1) << 4;
        }
    }
    block
}

/// Block `b` of row `row` of an interleaved matrix back in GGUF bytes, into `out` (one block).
fn deinterleave_block(
    ty: GgmlType,
    geo: &Geometry,
    w: &[u8],
    nb: usize,
    row: usize,
    b: usize,
    out: &mut [u8],
) {
    let (g, r) = (row / GROUP_ROWS, row % GROUP_ROWS);
    let src = &w[(g * nb + b) * geo.bytes..][..geo.bytes];
    write_block(ty, &read_interleaved(geo, src, r), out);
}

/// Row `row` of an interleaved matrix as `k` floats, block by block (no allocation).
///
/// # Panics
/// If `ty` has no interleaved layout, `k` is not a multiple of 32, or a buffer is shorter
/// than the row.
pub fn dequantize_row(ty: GgmlType, k: usize, w: &[u8], row: usize, out: &mut [f32]) {
    assert!(has_layout(ty), "{} has no interleaved layout", ty.name());
    assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
    let geo = Geometry::of(ty);
    let bb = ty.type_size();
    // One GGUF block of the widest interleaved type (Q8_0).
    let mut block = [0u8; 2 + QK];
    for (b, values) in out[..k].chunks_exact_mut(QK).enumerate() {
        deinterleave_block(ty, &geo, w, k / QK, row, b, &mut block[..bb]);
        crate::dequantize_row(ty, &block[..bb], values);
    }
}

fn check(ty: GgmlType, k: usize, w: &[u8], n_rows: usize) {
    assert!(has_layout(ty), "{} has no interleaved layout", ty.name());
    assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
    assert!(
        n_rows.is_multiple_of(GROUP_ROWS),
        "interleaved matrices hold a multiple of {GROUP_ROWS} rows, got {n_rows}"
    );
    let bytes = n_rows * (k / QK) * ty.type_size();
    assert!(
        w.len() >= bytes,
        "{n_rows} rows need {bytes} bytes, got {}",
        w.len()
    );
}

/// What the kernels need of one activation block: its scale `d`, `-bias · Σq` for the
/// weight format's code bias, and (Q8_1) `s = d · Σq`.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct ActBlock {
    pub d: f32,
    pub corr: i32,
    pub s: f32,
}

/// Activation row layout for weights of `ty`: (block bytes, offset of the codes).
pub(crate) fn act_geometry(ty: GgmlType) -> (usize, usize) {
    // Q8_0 (d, qs[32]) or Q8_1 (d, s, qs[32]): the codes end the block.
    let block = crate::vec_dot_type(ty).type_size();
    (block, block - QK)
}

/// Fills `info (n_tok, nb)` from `n_tok` activation rows of `nb` blocks.
pub(crate) fn act_blocks(
    ty: GgmlType,
    act: &[u8],
    n_tok: usize,
    nb: usize,
    info: &mut Vec<ActBlock>,
) {
    let (block_bytes, qs_at) = act_geometry(ty);
    let bias = code_bias(ty);
    info.clear();
    for t in 0..n_tok {
        for b in 0..nb {
            let block = &act[(t * nb + b) * block_bytes..][..block_bytes];
            // Formats with a min have no code bias, so no use for the sum.
            let sum: i32 = if bias == 0 {
                0
            } else {
                block[qs_at..qs_at + QK]
                    .iter()
                    .map(|&q| q as i8 as i32)
                    .sum()
            };
            info.push(ActBlock {
                d: f16_to_f32([block[0], block[1]]),
                corr: -bias * sum,
                s: if qs_at == 4 {
                    f16_to_f32([block[2], block[3]])
                } else {
                    0.0
                },
            });
        }
    }
}

/// `out[t · out_stride + r] = Σ_b d_w · d_a · Σ (code − bias) · a (+ m_w · s_a)` for interleaved
/// weights, in the kernels' order of float operations: per block `(isum · d_a) · d_w` added
/// with one fused multiply-add, mins in a second accumulator added at the end. The scalar
/// twin of the SIMD kernels, which it equals bit for bit.
#[allow(clippy::too_many_arguments)]
fn matmul_scalar(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let geo = Geometry::of(ty);
    let nb = k / QK;
    let (act_block_bytes, qs_at) = act_geometry(ty);
    let mut info = Vec::new();
    act_blocks(ty, act, n_tok, nb, &mut info);
    for g in 0..n_rows / GROUP_ROWS {
        for t in 0..n_tok {
            let mut acc = [0.0f32; GROUP_ROWS];
            let mut acc_min = [0.0f32; GROUP_ROWS];
            for b in 0..nb {
                let src = &w[(g * nb + b) * geo.bytes..][..geo.bytes];
                let a = &act[(t * nb + b) * act_block_bytes + qs_at..][..QK];
                let ab = info[t * nb + b];
                for r in 0..GROUP_ROWS {
                    let block = read_interleaved(&geo, src, r);
                    let dot: i32 = block
                        .codes
                        .iter()
                        .zip(a)
                        .map(|(&c, &q)| c as i32 * q as i8 as i32)
                        .sum();
                    let isum = if geo.has_min { dot } else { dot + ab.corr };
                    acc[r] = (isum as f32 * ab.d).mul_add(f16_to_f32(block.d), acc[r]);
                    if geo.has_min {
                        acc_min[r] = f16_to_f32(block.m).mul_add(ab.s, acc_min[r]);
                    }
                }
            }
            for r in 0..GROUP_ROWS {
                out[t * out_stride + g * GROUP_ROWS + r] = acc[r] + acc_min[r];
            }
        }
    }
}

/// `matmul` over interleaved weights (see [`crate::matmul`] for the shapes: `out[t ·
/// out_stride + r]` for `n_rows` rows and `n_tok` activation rows in `vec_dot_type(ty)`), on
/// the detected ISA.
#[allow(clippy::too_many_arguments)]
pub fn matmul_interleaved(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    matmul_interleaved_on(
        crate::cpu::isa(),
        ty,
        k,
        w,
        n_rows,
        act,
        n_tok,
        out,
        out_stride,
    );
}

/// [`matmul_interleaved`] with the kernels of `isa` (scalar where `isa` has none).
///
/// # Panics
/// If `isa` cannot run here, `ty` has no interleaved layout, `n_rows` is not a multiple of
/// 16, or a buffer is shorter than the shapes require.
#[allow(clippy::too_many_arguments)]
pub fn matmul_interleaved_on(
    isa: Isa,
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(
        crate::cpu::is_runnable(isa),
        "matmul_interleaved_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    check(ty, k, w, n_rows);
    // Interleaving keeps the byte count, so the row-layout shape checks apply as they are.
    crate::matmul::check_shapes(ty, k, w, n_rows, act, n_tok, out, out_stride);
    if n_rows == 0 || n_tok == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni {
        // SAFETY: VNNI is runnable (asserted above) and the buffers were checked: `w` holds
        // `n_rows / 16` groups of `k / 32` blocks, `act` `n_tok` rows, `out` every output.
        unsafe {
            crate::x86::interleaved::matmul_vnni(ty, k, w, n_rows, act, n_tok, out, out_stride)
        };
        return;
    }
    matmul_scalar(ty, k, w, n_rows, act, n_tok, out, out_stride);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Row `row` of an interleaved matrix back in GGUF bytes (`out` holds one row).
    fn deinterleave_row(ty: GgmlType, k: usize, w: &[u8], row: usize, out: &mut [u8]) {
        let (geo, bb) = (Geometry::of(ty), ty.type_size());
        for b in 0..k / QK {
            deinterleave_block(ty, &geo, w, k / QK, row, b, &mut out[b * bb..][..bb]);
        }
    }

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                // A few large values so scales and outlier codes vary between rows.
                let v = (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn quantized(ty: GgmlType, k: usize, n: usize, seed: u32) -> Vec<u8> {
        let row_bytes = ty.row_bytes(k).unwrap();
        let x = values(k * n, seed);
        let mut out = vec![0u8; row_bytes * n];
        for (src, dst) in x.chunks(k).zip(out.chunks_mut(row_bytes)) {
            crate::quantize_row_ref(ty, src, dst);
        }
        out
    }

    proptest! {
        /// interleave → deinterleave_row gives back every GGUF row byte for byte.
        #[test]
        fn rows_round_trip(ty_i in 0usize..5, nb in 1usize..6, groups in 1usize..3, seed in any::<u32>()) {
            let ty = TYPES[ty_i];
            let (k, n_rows) = (nb * QK, groups * GROUP_ROWS);
            let w = quantized(ty, k, n_rows, seed);
            let il = interleave(ty, k, &w, n_rows);
            prop_assert_eq!(il.len(), w.len());
            let row_bytes = ty.row_bytes(k).unwrap();
            let mut row = vec![0u8; row_bytes];
            for r in 0..n_rows {
                deinterleave_row(ty, k, &il, r, &mut row);
                prop_assert_eq!(&row[..], &w[r * row_bytes..(r + 1) * row_bytes]);
                let (mut got, mut expected) = (vec![0.0; k], vec![0.0; k]);
                dequantize_row(ty, k, &il, r, &mut got);
                crate::dequantize_row(ty, &row, &mut expected);
                prop_assert_eq!(got, expected);
            }
        }
    }

    /// The interleaved matmul equals `vec_dot` on the GGUF rows, per ISA, for token counts
    /// that leave tile remainders; SIMD kernels equal the scalar twin exactly.
    #[test]
    fn matmul_equals_vec_dot_and_scalar_twin() {
        for ty in TYPES {
            for (nb, groups) in [(1, 1), (18, 2), (5, 3)] {
                let (k, n_rows) = (nb * QK, groups * GROUP_ROWS);
                let w = quantized(ty, k, n_rows, 7 + nb as u32);
                let il = interleave(ty, k, &w, n_rows);
                let act_ty = crate::vec_dot_type(ty);
                let act_row = act_ty.row_bytes(k).unwrap();
                let row_bytes = ty.row_bytes(k).unwrap();
                for n_tok in [1, 2, 3, 4, 5, 7, 9] {
                    let x = values(k * n_tok, 99 + n_tok as u32);
                    let mut act = vec![0u8; act_row * n_tok];
                    for (src, dst) in x.chunks(k).zip(act.chunks_mut(act_row)) {
                        crate::quantize_row_ref(act_ty, src, dst);
                    }
                    let stride = n_rows + 3;
                    let mut scalar = vec![f32::NAN; n_tok * stride];
                    matmul_interleaved_on(
                        Isa::Scalar,
                        ty,
                        k,
                        &il,
                        n_rows,
                        &act,
                        n_tok,
                        &mut scalar,
                        stride,
                    );
                    for t in 0..n_tok {
                        for r in 0..n_rows {
                            let expected = crate::vec_dot_on(
                                Isa::Scalar,
                                ty,
                                k,
                                &w[r * row_bytes..(r + 1) * row_bytes],
                                &act[t * act_row..(t + 1) * act_row],
                            );
                            let got = scalar[t * stride + r];
                            // Absolute slack for Q4_1/Q5_1, whose min term cancels most
                            // of the code term: both sums are summed in another order.
                            assert!(
                                (got - expected).abs() <= 1e-4 + 1e-5 * expected.abs(),
                                "{} nb {nb} n_tok {n_tok}: [{t}][{r}] = {got}, vec_dot {expected}",
                                ty.name()
                            );
                        }
                    }
                    for isa in crate::cpu::available_isas() {
                        let mut got = vec![f32::NAN; n_tok * stride];
                        matmul_interleaved_on(
                            isa, ty, k, &il, n_rows, &act, n_tok, &mut got, stride,
                        );
                        for t in 0..n_tok {
                            assert_eq!(
                                got[t * stride..t * stride + n_rows]
                                    .iter()
                                    .map(|v| v.to_bits())
                                    .collect::<Vec<_>>(),
                                scalar[t * stride..t * stride + n_rows]
                                    .iter()
                                    .map(|v| v.to_bits())
                                    .collect::<Vec<_>>(),
                                "{} on {}: nb {nb} n_tok {n_tok} token {t}",
                                ty.name(),
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
