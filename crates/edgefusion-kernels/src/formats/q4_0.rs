//! Q4_0: 32 weights per block, one f16 scale `d`, 4-bit codes q in 0..16; w = d · (q − 8).
//! Byte j of `qs` holds weight j in its low nibble and weight j + 16 in its high nibble.
//! Activation partner: Q8_0.

use super::q8_0::BlockQ8_0;
use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, n_blocks, signed_absmax, Block, QK};
use crate::GgmlType;

/// `block_q4_0`: `d` (f16), then `qs[16]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4_0 {
    /// Scale, f16 bits little-endian.
    pub d: [u8; 2],
    /// Packed codes: low nibble weight j, high nibble weight j + 16.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
}

impl BlockQ4_0 {
    /// The block scale.
    #[inline]
    pub fn d(&self) -> f32 {
        f16_to_f32(self.d)
    }

    /// The 4-bit code (0..16) of weight `j` (0..32).
    #[inline]
    pub fn code(&self, j: usize) -> u8 {
        if j < QK / 2 {
            self.qs[j] & 0x0F
        } else {
            self.qs[j - QK / 2] >> 4
        }
    }

    /// llama.cpp's `quantize_row_q4_0_ref` for one block: d = max / −8 where max is the
    /// value of greatest magnitude, q = min(15, trunc(x / d + 8.5)).
    pub fn quantize(x: &[f32; QK]) -> Self {
        let max = signed_absmax(x);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut block = BlockQ4_0 {
            d: f32_to_f16(d),
            qs: [0; QK / 2],
        };
        for j in 0..QK / 2 {
            let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let hi = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            block.qs[j] = lo | (hi << 4);
        }
        block
    }
}

/// Quantizes `x` (a multiple of 32 long) into Q4_0 blocks in `out`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `out` is shorter than the row.
pub fn quantize_row_q4_0_ref(x: &[f32], out: &mut [u8]) {
    let nb = n_blocks(x.len());
    for (block, xb) in blocks_mut::<BlockQ4_0>(out, nb)
        .iter_mut()
        .zip(x.chunks_exact(QK))
    {
        *block = BlockQ4_0::quantize(xb.try_into().expect("chunks_exact yields 32"));
    }
}

/// Expands the Q4_0 row in `src` into `out` (its length sets the row length).
///
/// # Panics
/// If `out.len()` is not a multiple of 32 or `src` is shorter than the row.
pub fn dequantize_row_q4_0(src: &[u8], out: &mut [f32]) {
    let nb = n_blocks(out.len());
    for (block, yb) in blocks::<BlockQ4_0>(src, nb)
        .iter()
        .zip(out.chunks_exact_mut(QK))
    {
        let d = block.d();
        for (j, y) in yb.iter_mut().enumerate() {
            *y = (block.code(j) as i32 - 8) as f32 * d;
        }
    }
}

/// Σ (q_w − 8) · a over one block pair, exact.
#[inline]
pub fn block_dot_q4_0_q8_0(w: &BlockQ4_0, a: &BlockQ8_0) -> i32 {
    let mut sum = 0i32;
    for j in 0..QK / 2 {
        let lo = (w.qs[j] & 0x0F) as i32 - 8;
        let hi = (w.qs[j] >> 4) as i32 - 8;
        sum += lo * a.qs[j] as i32 + hi * a.qs[j + QK / 2] as i32;
    }
    sum
}

/// Scalar reference of Q4_0 · Q8_0 over `n` weights: Σ_blocks d_w · d_a · Σ (q_w − 8) · a.
///
/// # Panics
/// If `n` is not a multiple of 32 or a row is shorter than `n` weights.
pub fn vec_dot_q4_0_q8_0_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n_blocks(n);
    blocks::<BlockQ4_0>(w, nb)
        .iter()
        .zip(blocks::<BlockQ8_0>(act, nb))
        .map(|(wb, ab)| (wb.d() * ab.d()) * block_dot_q4_0_q8_0(wb, ab) as f32)
        .sum()
}
