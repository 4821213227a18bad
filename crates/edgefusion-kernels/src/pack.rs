//! Activation packing and the register-tile driver of the x86 `matmul` kernels.
//!
//! For the 32-wide integer formats the activation rows are re-laid ("packed") once per
//! `matmul` call into a form the SIMD kernels read without any per-block decoding: codes in
//! the order the weight nibbles unpack to, scales already in f32 and spread over the lanes
//! they multiply, and the constant part of the integer dot (`−8·Σa` for Q4_0, `−128·Σa` for
//! the unsigned trick of Q8_0) precomputed per 4-byte lane. The pack costs O(k) per token
//! and is then read by every row, so decode (one token, hundreds of rows) amortizes it.
//!
//! The kernels walk register tiles of `R` rows × `T` tokens ([`Tiles`]): an unpacked weight
//! group is reused for `T` tokens, a packed activation group for `R` rows.

use std::cell::RefCell;

use crate::formats::{f16_to_f32, QK};
use crate::GgmlType;

/// Blocks per packed group of the nibble formats (Q4_0, Q4_1, Q5_0, Q5_1): one 512-bit
/// register of codes.
pub(crate) const NIBBLE_GROUP_BLOCKS: usize = 4;
/// Blocks per packed group of Q8_0 weights: one 512-bit register of codes.
pub(crate) const BYTE_GROUP_BLOCKS: usize = 2;

/// Four activation blocks (Q8_0 or Q8_1) laid out for the Q4_0 / Q4_1 / Q5_0 / Q5_1 kernels.
///
/// Block `b` (0..4) of the group owns 128-bit lane `b` of each 512-bit field, so that a
/// register of weight codes whose lane `b` holds block `b`'s sixteen packed bytes lines up
/// with `lo` after masking the low nibbles and with `hi` after shifting the high ones down.
/// A missing block (past the row end) is all zeros and adds nothing.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct NibbleGroup {
    /// `lo[16b + i] = a_b[i]`, i in 0..16: partners of the low nibbles.
    pub lo: [i8; 64],
    /// `hi[16b + i] = a_b[16 + i]`: partners of the high nibbles.
    pub hi: [i8; 64],
    /// Dword lane `4b + j` = −8 · Σ_{i in 4j..4j+4} (a_b[i] + a_b[16 + i]) for Q4_0 (so the
    /// unsigned codes q give Σ (q − 8)·a exactly; Q5_0 kernels double it for q − 16); zero
    /// for Q4_1 / Q5_1.
    pub corr: [i32; 16],
    /// The activation scale d_b of block `b`, in lanes `4b..4b+4`.
    pub da: [f32; 16],
    /// Q4_1 only: the activation's `s_b = d_b · Σ a_b` in lane `4b`, zero elsewhere.
    pub sa: [f32; 16],
}

impl NibbleGroup {
    const ZERO: NibbleGroup = NibbleGroup {
        lo: [0; 64],
        hi: [0; 64],
        corr: [0; 16],
        da: [0.0; 16],
        sa: [0.0; 16],
    };
}

/// Two Q8_0 activation blocks laid out for the Q8_0-weight kernels.
///
/// Block `b` (0..2) owns the 256-bit half `b` of each 512-bit field.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BytePair {
    /// `qs[32b + i] = a_b[i]`.
    pub qs: [i8; 64],
    /// Dword lane `8b + j` = −128 · Σ_{i in 4j..4j+4} a_b[i]: with weights biased to unsigned
    /// (w + 128) the unsigned × signed dot plus this lane gives Σ w·a exactly.
    pub corr: [i32; 16],
    /// The activation scale d_b of block `b`, in lanes `8b..8b+8`.
    pub da: [f32; 16],
}

impl BytePair {
    const ZERO: BytePair = BytePair {
        qs: [0; 64],
        corr: [0; 16],
        da: [0.0; 16],
    };
}

thread_local! {
    // Reused across calls so a decode step allocates nothing after its first matmul.
    pub(crate) static NIBBLE_SCRATCH: RefCell<Vec<NibbleGroup>> = const { RefCell::new(Vec::new()) };
    pub(crate) static BYTE_SCRATCH: RefCell<Vec<BytePair>> = const { RefCell::new(Vec::new()) };
    pub(crate) static SCALE_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The activation blocks the nibble kernels pair with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum NibbleAct {
    /// Q8_0 blocks, for Q4_0 / Q5_0 weights (codes biased by 8 / 16).
    Q8_0,
    /// Q8_1 blocks, for Q4_1 / Q5_1 weights (offset term from `s`).
    Q8_1,
}

/// The weight formats the nibble kernels read: 4-bit codes in Q4_0's nibble layout, plus a
/// 32-bit `qh` word of fifth bits for Q5_0 / Q5_1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum NibbleWeights {
    /// Codes 0..16, value q − 8; pairs with Q8_0.
    Q4_0,
    /// Codes 0..16 with an offset `m`; pairs with Q8_1.
    Q4_1,
    /// Codes 0..32, value q − 16 (twice Q4_0's correction); pairs with Q8_0.
    Q5_0,
    /// Codes 0..32 with an offset `m`; pairs with Q8_1.
    Q5_1,
}

impl NibbleWeights {
    /// The activation blocks these weights pair with.
    pub(crate) fn act(self) -> NibbleAct {
        match self {
            NibbleWeights::Q4_0 | NibbleWeights::Q5_0 => NibbleAct::Q8_0,
            NibbleWeights::Q4_1 | NibbleWeights::Q5_1 => NibbleAct::Q8_1,
        }
    }
}

/// Packs `n_tok` activation rows of `nb` blocks each into `out` (`n_tok · ⌈nb/4⌉` groups,
/// token-major).
pub(crate) fn pack_nibble(
    kind: NibbleAct,
    act: &[u8],
    act_row_bytes: usize,
    n_tok: usize,
    nb: usize,
    out: &mut Vec<NibbleGroup>,
) {
    let n_groups = nb.div_ceil(NIBBLE_GROUP_BLOCKS);
    let block_bytes = match kind {
        NibbleAct::Q8_0 => GgmlType::Q8_0.type_size(),
        NibbleAct::Q8_1 => GgmlType::Q8_1.type_size(),
    };
    // Both partners start with `d`; Q8_1 has `s` next, then the codes.
    let qs_offset = block_bytes - QK;
    out.clear();
    out.resize(n_tok * n_groups, NibbleGroup::ZERO);
    for t in 0..n_tok {
        let row = &act[t * act_row_bytes..];
        for b in 0..nb {
            let block = &row[b * block_bytes..(b + 1) * block_bytes];
            let group = &mut out[t * n_groups + b / NIBBLE_GROUP_BLOCKS];
            let lane = b % NIBBLE_GROUP_BLOCKS;
            let qs = &block[qs_offset..];
            let d = f16_to_f32([block[0], block[1]]);
            for i in 0..QK / 2 {
                group.lo[16 * lane + i] = qs[i] as i8;
                group.hi[16 * lane + i] = qs[QK / 2 + i] as i8;
            }
            for j in 0..4 {
                group.da[4 * lane + j] = d;
                if kind == NibbleAct::Q8_0 {
                    let sum: i32 = (4 * j..4 * j + 4)
                        .map(|i| qs[i] as i8 as i32 + qs[QK / 2 + i] as i8 as i32)
                        .sum();
                    group.corr[4 * lane + j] = -8 * sum;
                }
            }
            if kind == NibbleAct::Q8_1 {
                group.sa[4 * lane] = f16_to_f32([block[2], block[3]]);
            }
        }
    }
}

/// The scales of `n_tok` activation rows of `nb` blocks each, as f32, for the kernels that
/// read the codes in place (llama.cpp's order): `out[b · n_tok + t]` = block `b`'s `d` of row
/// `t`, then `out[(nb + b) · n_tok + t]` = its `s` (Q8_1; 0 for Q8_0). Token-minor, so one
/// load gives several tokens' values.
pub(crate) fn pack_act_scales(
    kind: NibbleAct,
    act: &[u8],
    act_row_bytes: usize,
    n_tok: usize,
    nb: usize,
    out: &mut Vec<f32>,
) {
    let block_bytes = match kind {
        NibbleAct::Q8_0 => GgmlType::Q8_0.type_size(),
        NibbleAct::Q8_1 => GgmlType::Q8_1.type_size(),
    };
    out.clear();
    out.resize(2 * nb * n_tok, 0.0);
    let (d, s) = out.split_at_mut(nb * n_tok);
    for t in 0..n_tok {
        let row = &act[t * act_row_bytes..];
        for b in 0..nb {
            let block = &row[b * block_bytes..];
            d[b * n_tok + t] = f16_to_f32([block[0], block[1]]);
            if kind == NibbleAct::Q8_1 {
                s[b * n_tok + t] = f16_to_f32([block[2], block[3]]);
            }
        }
    }
}

/// Packs `n_tok` Q8_0 activation rows of `nb` blocks each into `out` (`n_tok · ⌈nb/2⌉`
/// pairs, token-major).
pub(crate) fn pack_byte(
    act: &[u8],
    act_row_bytes: usize,
    n_tok: usize,
    nb: usize,
    out: &mut Vec<BytePair>,
) {
    let n_pairs = nb.div_ceil(BYTE_GROUP_BLOCKS);
    let block_bytes = GgmlType::Q8_0.type_size();
    out.clear();
    out.resize(n_tok * n_pairs, BytePair::ZERO);
    for t in 0..n_tok {
        let row = &act[t * act_row_bytes..];
        for b in 0..nb {
            let block = &row[b * block_bytes..(b + 1) * block_bytes];
            let pair = &mut out[t * n_pairs + b / BYTE_GROUP_BLOCKS];
            let half = b % BYTE_GROUP_BLOCKS;
            let qs = &block[2..];
            let d = f16_to_f32([block[0], block[1]]);
            for (dst, &src) in pair.qs[32 * half..32 * half + QK].iter_mut().zip(qs) {
                *dst = src as i8;
            }
            for j in 0..8 {
                let sum: i32 = (4 * j..4 * j + 4).map(|i| qs[i] as i8 as i32).sum();
                pair.corr[8 * half + j] = -128 * sum;
                pair.da[8 * half + j] = d;
            }
        }
    }
}

/// A SIMD kernel that computes register tiles of dot products.
pub(crate) trait Tiles {
    /// `[r][t]` = dot of weight row `r0 + r` with activation row `t0 + t`.
    ///
    /// # Safety
    /// The caller guarantees `r0 + R ≤ n_rows` and `t0 + T ≤ n_tok` of the data the kernel
    /// was built over, and that the kernel's ISA is available.
    unsafe fn tile<const R: usize, const T: usize>(&self, r0: usize, t0: usize) -> [[f32; T]; R];
}

/// Bytes of weight rows kept hot in L1 while a token tile sweeps over them (prefill).
const CHUNK_BYTES: usize = 16 * 1024;

/// Walks all `n_rows × n_tok` dots with `kernel`'s tiles: row by row for decode, 2 rows ×
/// up to 4 tokens for prefill, over row chunks that stay in L1.
///
/// # Safety
/// `kernel` was built over `n_rows` weight rows and `n_tok` activation rows, its ISA is
/// available, and `out` holds `(n_tok − 1) · out_stride + n_rows` values.
#[inline(always)]
pub(crate) unsafe fn drive<K: Tiles>(
    kernel: &K,
    n_rows: usize,
    n_tok: usize,
    row_bytes: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: the caller guarantees the kernel's ISA and that it was built over `n_rows`
    // rows and `n_tok` tokens. Decode tiles are `(r, 0)` with `r < n_rows` (the loop runs over
    // `out[..n_rows]`) and `n_tok = 1`; prefill tiles are rows inside `rc..rc_end ≤ n_rows`
    // and tokens `t..t + T` with `T ≤ n_tok − t`, as `drive_rows` requires.
    unsafe {
        if n_tok == 1 {
            // Decode streams each row once from memory: reading rows one after another keeps
            // the access purely sequential, which the hardware prefetchers follow. (Tiles of
            // several rows read them interleaved and measured ~2x slower from DRAM, and no
            // faster from L2.)
            for (r, o) in out[..n_rows].iter_mut().enumerate() {
                *o = kernel.tile::<1, 1>(r, 0)[0][0];
            }
            return;
        }
        let chunk_rows = ((CHUNK_BYTES / row_bytes.max(1)).max(2) / 2) * 2;
        let mut rc = 0;
        while rc < n_rows {
            let rc_end = (rc + chunk_rows).min(n_rows);
            let mut t = 0;
            while t < n_tok {
                match n_tok - t {
                    1 => drive_rows::<K, 1>(kernel, rc, rc_end, t, out, out_stride),
                    2 => drive_rows::<K, 2>(kernel, rc, rc_end, t, out, out_stride),
                    3 => drive_rows::<K, 3>(kernel, rc, rc_end, t, out, out_stride),
                    _ => drive_rows::<K, 4>(kernel, rc, rc_end, t, out, out_stride),
                }
                t += 4;
            }
            rc = rc_end;
        }
    }
}

/// Rows `rc..rc_end` against tokens `t0..t0 + T`, two rows at a time.
///
/// # Safety
/// `kernel`'s ISA must be available and it must have been built over at least `rc_end` rows
/// and `t0 + T` tokens.
#[inline(always)]
unsafe fn drive_rows<K: Tiles, const T: usize>(
    kernel: &K,
    rc: usize,
    rc_end: usize,
    t0: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: the caller guarantees the kernel's ISA, `rc_end ≤ n_rows` and `t0 + T ≤ n_tok`;
    // every tile starts at a row `r` with `r + 2 ≤ rc_end` (or `r + 1 ≤ rc_end` for the last),
    // which is `Tiles::tile`'s contract. `out` is indexed with bounds checks.
    unsafe {
        let mut r = rc;
        while r + 2 <= rc_end {
            let sums = kernel.tile::<2, T>(r, t0);
            for (i, row) in sums.iter().enumerate() {
                for (t, &s) in row.iter().enumerate() {
                    out[(t0 + t) * out_stride + r + i] = s;
                }
            }
            r += 2;
        }
        if r < rc_end {
            let sums = kernel.tile::<1, T>(r, t0);
            for (t, &s) in sums[0].iter().enumerate() {
                out[(t0 + t) * out_stride + r] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{f32_to_f16, BlockQ8_0, BlockQ8_1};

    fn q8_block(seed: i32, d: f32) -> BlockQ8_0 {
        let mut qs = [0i8; QK];
        for (i, q) in qs.iter_mut().enumerate() {
            *q = ((i as i32 * 37 + seed * 11) % 255 - 127) as i8;
        }
        BlockQ8_0 {
            d: f32_to_f16(d),
            qs,
        }
    }

    fn bytes_of<B: crate::formats::Block>(blocks: &[B]) -> Vec<u8> {
        bytemuck::cast_slice(blocks).to_vec()
    }

    #[test]
    fn nibble_pack_places_codes_scales_and_corrections() {
        // Five blocks: one full group and a partial one whose missing lanes stay zero.
        let blocks: Vec<BlockQ8_0> = (0..5).map(|b| q8_block(b, 0.5 + b as f32)).collect();
        let row = bytes_of(&blocks);
        let mut packed = Vec::new();
        pack_nibble(NibbleAct::Q8_0, &row, row.len(), 1, 5, &mut packed);
        assert_eq!(packed.len(), 2);
        for (b, block) in blocks.iter().enumerate() {
            let (g, lane) = (&packed[b / 4], b % 4);
            assert_eq!(&g.lo[16 * lane..16 * lane + 16], &block.qs[..16]);
            assert_eq!(&g.hi[16 * lane..16 * lane + 16], &block.qs[16..]);
            let corr: i32 = g.corr[4 * lane..4 * lane + 4].iter().sum();
            let sum: i32 = block.qs.iter().map(|&q| q as i32).sum();
            assert_eq!(corr, -8 * sum);
            assert!(g.da[4 * lane..4 * lane + 4].iter().all(|&d| d == block.d()));
        }
        let tail = &packed[1];
        assert!(tail.lo[16..].iter().chain(&tail.hi[16..]).all(|&q| q == 0));
        assert!(tail.corr[4..].iter().all(|&c| c == 0) && tail.da[4..].iter().all(|&d| d == 0.0));
    }

    #[test]
    fn nibble_pack_of_q8_1_carries_s_in_lane_zero() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
        let blocks: Vec<BlockQ8_1> = x
            .chunks_exact(QK)
            .map(|c| BlockQ8_1::quantize(c.try_into().unwrap()))
            .collect();
        let row = bytes_of(&blocks);
        let mut packed = Vec::new();
        pack_nibble(NibbleAct::Q8_1, &row, row.len(), 1, 2, &mut packed);
        for (b, block) in blocks.iter().enumerate() {
            assert_eq!(packed[0].sa[4 * b], block.s());
            assert_eq!(&packed[0].sa[4 * b + 1..4 * b + 4], &[0.0; 3]);
            assert_eq!(&packed[0].corr[4 * b..4 * b + 4], &[0; 4]);
        }
    }

    #[test]
    fn byte_pack_corrections_undo_the_unsigned_bias() {
        let blocks: Vec<BlockQ8_0> = (0..3).map(|b| q8_block(b + 7, 2.0)).collect();
        let row = bytes_of(&blocks);
        let mut packed = Vec::new();
        pack_byte(&row, row.len(), 1, 3, &mut packed);
        assert_eq!(packed.len(), 2);
        // For any w: Σ (w + 128)·a + corr = Σ w·a, per 4-byte lane.
        let w: Vec<i32> = (0..QK as i32).map(|i| (i * 29) % 255 - 128).collect();
        for (b, block) in blocks.iter().enumerate() {
            let pair = &packed[b / 2];
            let half = b % 2;
            for j in 0..8 {
                let biased: i32 = (4 * j..4 * j + 4)
                    .map(|i| (w[i] + 128) * pair.qs[32 * half + i] as i32)
                    .sum();
                let plain: i32 = (4 * j..4 * j + 4).map(|i| w[i] * block.qs[i] as i32).sum();
                assert_eq!(biased + pair.corr[8 * half + j], plain);
            }
        }
    }
}
