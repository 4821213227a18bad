//! Q5_1: 32 weights per block, f16 scale `d` and offset `m`, 5-bit codes q in 0..32;
//! w = d · q + m. Bit packing as Q5_0. Activation partner: Q8_1.

use super::q8_1::BlockQ8_1;
use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, min_max, n_blocks, Block, QK};
use crate::GgmlType;

/// `block_q5_1`: `d` (f16), `m` (f16), `qh[4]`, then `qs[16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5_1 {
    /// Scale, f16 bits little-endian.
    pub d: [u8; 2],
    /// Offset (the block minimum), f16 bits little-endian.
    pub m: [u8; 2],
    /// Fifth bits: bit j (of the u32, little-endian) belongs to weight j.
    pub qh: [u8; 4],
    /// Low four bits: low nibble weight j, high nibble weight j + 16.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
}

impl BlockQ5_1 {
    /// The block scale.
    #[inline]
    pub fn d(&self) -> f32 {
        f16_to_f32(self.d)
    }

    /// The block offset.
    #[inline]
    pub fn m(&self) -> f32 {
        f16_to_f32(self.m)
    }

    /// The 5-bit code (0..32) of weight `j` (0..32).
    #[inline]
    pub fn code(&self, j: usize) -> u8 {
        let low = if j < QK / 2 {
            self.qs[j] & 0x0F
        } else {
            self.qs[j - QK / 2] >> 4
        };
        let high = ((u32::from_le_bytes(self.qh) >> j) & 1) as u8;
        low | (high << 4)
    }

    /// llama.cpp's `quantize_row_q5_1_ref` for one block: d = (max − min) / 31, m = min,
    /// q = trunc((x − min) / d + 0.5), clamped to 31 (which the reference only reaches by
    /// rounding, so the clamp never changes a code it produces).
    pub fn quantize(x: &[f32; QK]) -> Self {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0u8; QK / 2];
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let lo = (((x[j] - min) * id + 0.5) as u8).min(31);
            let hi = (((x[j + QK / 2] - min) * id + 0.5) as u8).min(31);
            qs[j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
            qh |= ((lo as u32 & 0x10) >> 4) << j;
            qh |= ((hi as u32 & 0x10) >> 4) << (j + QK / 2);
        }
        BlockQ5_1 {
            d: f32_to_f16(d),
            m: f32_to_f16(min),
            qh: qh.to_le_bytes(),
            qs,
        }
    }
}

/// Quantizes `x` (a multiple of 32 long) into Q5_1 blocks in `out`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `out` is shorter than the row.
pub fn quantize_row_q5_1_ref(x: &[f32], out: &mut [u8]) {
    let nb = n_blocks(x.len());
    for (block, xb) in blocks_mut::<BlockQ5_1>(out, nb)
        .iter_mut()
        .zip(x.chunks_exact(QK))
    {
        *block = BlockQ5_1::quantize(xb.try_into().expect("chunks_exact yields 32"));
    }
}

/// Expands the Q5_1 row in `src` into `out` (its length sets the row length).
///
/// # Panics
/// If `out.len()` is not a multiple of 32 or `src` is shorter than the row.
pub fn dequantize_row_q5_1(src: &[u8], out: &mut [f32]) {
    let nb = n_blocks(out.len());
    for (block, yb) in blocks::<BlockQ5_1>(src, nb)
        .iter()
        .zip(out.chunks_exact_mut(QK))
    {
        let (d, m) = (block.d(), block.m());
        for (j, y) in yb.iter_mut().enumerate() {
            *y = block.code(j) as f32 * d + m;
        }
    }
}

/// Σ q_w · a over one block pair, exact (the offset term is added in float from `s`).
#[inline]
pub fn block_dot_q5_1_q8_1(w: &BlockQ5_1, a: &BlockQ8_1) -> i32 {
    (0..QK).map(|j| w.code(j) as i32 * a.qs[j] as i32).sum()
}

/// Scalar reference of Q5_1 · Q8_1 over `n` weights:
/// Σ_blocks d_w · d_a · Σ q_w · a + m_w · s_a.
///
/// # Panics
/// If `n` is not a multiple of 32 or a row is shorter than `n` weights.
pub fn vec_dot_q5_1_q8_1_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n_blocks(n);
    blocks::<BlockQ5_1>(w, nb)
        .iter()
        .zip(blocks::<BlockQ8_1>(act, nb))
        .map(|(wb, ab)| (wb.d() * ab.d()) * block_dot_q5_1_q8_1(wb, ab) as f32 + wb.m() * ab.s())
        .sum()
}
