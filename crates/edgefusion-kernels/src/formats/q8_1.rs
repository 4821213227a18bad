//! Q8_1: Q8_0 plus `s = d · Σq` per block, so that a dot with an offset format (Q4_1, Q5_1)
//! gets its `m · Σa` term without touching the codes. Used only as an activation format.

use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, n_blocks, Block, QK};
use crate::GgmlType;

/// `block_q8_1`: `d` (f16), `s` (f16, d · Σ qs), then `qs[32]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8_1 {
    /// Scale, f16 bits little-endian.
    pub d: [u8; 2],
    /// d · Σ qs, f16 bits little-endian.
    pub s: [u8; 2],
    /// Codes, value j in byte j.
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

impl Block for BlockQ8_1 {
    const TYPE: GgmlType = GgmlType::Q8_1;
}

impl BlockQ8_1 {
    /// The block scale.
    #[inline]
    pub fn d(&self) -> f32 {
        f16_to_f32(self.d)
    }

    /// The stored d · Σ qs.
    #[inline]
    pub fn s(&self) -> f32 {
        f16_to_f32(self.s)
    }

    /// One block as llama.cpp's SIMD kernels quantize it: Q8_0's codes (see
    /// [`super::q8_0::BlockQ8_0::quantize`]), and `s` from the f32 (not yet rounded to f16)
    /// scale times the integer code sum.
    pub fn quantize(x: &[f32; QK]) -> Self {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = crate::f32ops::nearest_int(v * id) as i8;
            sum += *q as i32;
        }
        BlockQ8_1 {
            d: f32_to_f16(d),
            s: f32_to_f16(sum as f32 * d),
            qs,
        }
    }
}

/// Quantizes `x` (a multiple of 32 long) into Q8_1 blocks in `out`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `out` is shorter than the row.
pub fn quantize_row_q8_1_ref(x: &[f32], out: &mut [u8]) {
    let nb = n_blocks(x.len());
    for (block, xb) in blocks_mut::<BlockQ8_1>(out, nb)
        .iter_mut()
        .zip(x.chunks_exact(QK))
    {
        *block = BlockQ8_1::quantize(xb.try_into().expect("chunks_exact yields 32"));
    }
}

/// Expands the Q8_1 row in `src` into `out` (its length sets the row length).
///
/// # Panics
/// If `out.len()` is not a multiple of 32 or `src` is shorter than the row.
pub fn dequantize_row_q8_1(src: &[u8], out: &mut [f32]) {
    let nb = n_blocks(out.len());
    for (block, yb) in blocks::<BlockQ8_1>(src, nb)
        .iter()
        .zip(out.chunks_exact_mut(QK))
    {
        let d = block.d();
        for (y, &q) in yb.iter_mut().zip(&block.qs) {
            *y = q as f32 * d;
        }
    }
}

/// Scalar reference of Q8_1 · Q8_1 (what `vec_dot` does for a Q8_1 weight row, which only
/// test code and requantization produce): Σ_blocks d_w · d_a · Σ q_w · q_a.
///
/// # Panics
/// If `n` is not a multiple of 32 or a row is shorter than `n` weights.
pub fn vec_dot_q8_1_q8_1_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n_blocks(n);
    blocks::<BlockQ8_1>(w, nb)
        .iter()
        .zip(blocks::<BlockQ8_1>(act, nb))
        .map(|(wb, ab)| {
            let sumi: i32 = wb
                .qs
                .iter()
                .zip(&ab.qs)
                .map(|(&x, &y)| x as i32 * y as i32)
                .sum();
            (wb.d() * ab.d()) * sumi as f32
        })
        .sum()
}
