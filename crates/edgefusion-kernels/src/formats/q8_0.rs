//! Q8_0: 32 weights per block, one f16 scale `d`, signed 8-bit codes; w = d · q.
//! Also the activation partner of Q4_0, Q5_0 and Q8_0 weights.

use super::{blocks, blocks_mut, f16_to_f32, f32_to_f16, n_blocks, Block, QK};
use crate::GgmlType;

/// `block_q8_0`: `d` (f16), then `qs[32]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8_0 {
    /// Scale, f16 bits little-endian.
    pub d: [u8; 2],
    /// Codes, weight j in byte j.
    pub qs: [i8; QK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
}

impl BlockQ8_0 {
    /// The block scale.
    #[inline]
    pub fn d(&self) -> f32 {
        f16_to_f32(self.d)
    }

    /// One block as llama.cpp's x86 and ARM kernels quantize activations: d = max|x| / 127,
    /// q = x · (127 / max|x|) rounded half to even. (Its `_ref` C code rounds half away from
    /// zero and scales by 1/d instead; the SIMD paths that real inference runs do not, and
    /// Q8_0 inputs — dequantized embeddings — hit exact ties often, so we follow them.)
    pub fn quantize(x: &[f32; QK]) -> Self {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut block = BlockQ8_0 {
            d: f32_to_f16(d),
            qs: [0; QK],
        };
        for (q, &v) in block.qs.iter_mut().zip(x) {
            *q = crate::f32ops::nearest_int(v * id) as i8;
        }
        block
    }
}

/// Quantizes `x` (a multiple of 32 long) into Q8_0 blocks in `out`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `out` is shorter than the row.
pub fn quantize_row_q8_0_ref(x: &[f32], out: &mut [u8]) {
    let nb = n_blocks(x.len());
    for (block, xb) in blocks_mut::<BlockQ8_0>(out, nb)
        .iter_mut()
        .zip(x.chunks_exact(QK))
    {
        *block = BlockQ8_0::quantize(xb.try_into().expect("chunks_exact yields 32"));
    }
}

/// Expands the Q8_0 row in `src` into `out` (its length sets the row length).
///
/// # Panics
/// If `out.len()` is not a multiple of 32 or `src` is shorter than the row.
pub fn dequantize_row_q8_0(src: &[u8], out: &mut [f32]) {
    let nb = n_blocks(out.len());
    for (block, yb) in blocks::<BlockQ8_0>(src, nb)
        .iter()
        .zip(out.chunks_exact_mut(QK))
    {
        let d = block.d();
        for (y, &q) in yb.iter_mut().zip(&block.qs) {
            *y = q as f32 * d;
        }
    }
}

/// Σ w_q · a_q over one block pair, exact.
#[inline]
pub fn block_dot_q8_0_q8_0(w: &BlockQ8_0, a: &BlockQ8_0) -> i32 {
    w.qs.iter()
        .zip(&a.qs)
        .map(|(&x, &y)| x as i32 * y as i32)
        .sum()
}

/// Scalar reference of Q8_0 · Q8_0 over `n` weights: Σ_blocks d_w · d_a · Σ q_w · q_a.
///
/// # Panics
/// If `n` is not a multiple of 32 or a row is shorter than `n` weights.
pub fn vec_dot_q8_0_q8_0_scalar(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n_blocks(n);
    blocks::<BlockQ8_0>(w, nb)
        .iter()
        .zip(blocks::<BlockQ8_0>(act, nb))
        .map(|(wb, ab)| (wb.d() * ab.d()) * block_dot_q8_0_q8_0(wb, ab) as f32)
        .sum()
}
