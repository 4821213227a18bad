//! The 32-wide block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1) and the plain float rows
//! (F32, F16, BF16): block structs laid out byte for byte like llama.cpp's `block_q*`
//! (ggml-common.h), and the scalar reference of every operation.
//!
//! Each format file holds the block struct, `quantize_row_*_ref` (llama.cpp's rounding),
//! `dequantize_row_*` and `vec_dot_*_scalar` against the format's activation partner. The
//! scalar functions are the definition every SIMD kernel is tested against.
//!
//! Block structs hold only byte arrays (alignment 1, no padding): GGUF rows are only 2-byte
//! aligned and test buffers may be less, so rows are viewed in place with [`blocks`] and the
//! f16 fields are decoded with `from_le_bytes`.

use crate::GgmlType;

pub mod float;
pub mod q4_0;
pub mod q4_1;
pub mod q5_0;
pub mod q5_1;
pub mod q8_0;
pub mod q8_1;

pub use q4_0::BlockQ4_0;
pub use q4_1::BlockQ4_1;
pub use q5_0::BlockQ5_0;
pub use q5_1::BlockQ5_1;
pub use q8_0::BlockQ8_0;
pub use q8_1::BlockQ8_1;

/// Weights per block of every format in this module.
pub const QK: usize = 32;

/// A block struct that may be viewed in place over raw row bytes.
///
/// `Pod` (derived, so checked by the compiler: `repr(C)`, no padding, every bit pattern
/// valid) makes the view safe; the structs hold byte arrays only, so their alignment is 1
/// and any row slice can be viewed. [`blocks`] asserts both (alignment 1, `size_of::<Self>()`
/// equal to `TYPE.type_size()`) at compile time for every struct it views.
pub trait Block: bytemuck::Pod {
    /// The GGML type whose blocks this struct describes.
    const TYPE: GgmlType;
}

/// Number of 32-weight blocks in a row of `n` weights.
///
/// # Panics
/// If `n` is not a multiple of 32 (a caller bug: tensor shapes are validated on load).
#[inline]
pub fn n_blocks(n: usize) -> usize {
    assert!(
        n.is_multiple_of(QK),
        "32-wide block rows hold a multiple of {QK} weights, got {n}"
    );
    n / QK
}

/// The first `n_blocks` blocks of a raw row.
///
/// # Panics
/// If `bytes` is shorter than `n_blocks` blocks.
#[inline]
pub fn blocks<B: Block>(bytes: &[u8], n_blocks: usize) -> &[B] {
    let needed = n_blocks * std::mem::size_of::<B>();
    assert!(
        bytes.len() >= needed,
        "{} row of {n_blocks} blocks needs {needed} bytes, got {}",
        B::TYPE.name(),
        bytes.len()
    );
    // Byte arrays only, so any row slice is aligned for the view (cast_slice would panic
    // otherwise), and one struct per block of the GGML type table.
    const {
        assert!(std::mem::align_of::<B>() == 1);
        assert!(std::mem::size_of::<B>() == B::TYPE.type_size());
    };
    bytemuck::cast_slice(&bytes[..needed])
}

/// Mutable twin of [`blocks`], for quantizers writing rows in place.
///
/// # Panics
/// If `bytes` is shorter than `n_blocks` blocks.
#[inline]
pub fn blocks_mut<B: Block>(bytes: &mut [u8], n_blocks: usize) -> &mut [B] {
    let needed = n_blocks * std::mem::size_of::<B>();
    assert!(
        bytes.len() >= needed,
        "{} row of {n_blocks} blocks needs {needed} bytes, got {}",
        B::TYPE.name(),
        bytes.len()
    );
    const {
        assert!(std::mem::align_of::<B>() == 1);
        assert!(std::mem::size_of::<B>() == B::TYPE.type_size());
    };
    bytemuck::cast_slice_mut(&mut bytes[..needed])
}

/// IEEE half (stored little-endian) to f32; exact.
#[inline]
pub fn f16_to_f32(bits: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(bits)).to_f32()
}

/// f32 to IEEE half bytes, round to nearest even (as `GGML_FP32_TO_FP16`).
#[inline]
pub fn f32_to_f16(value: f32) -> [u8; 2] {
    half::f16::from_f32(value).to_bits().to_le_bytes()
}

/// f32 to IEEE half bits, round to nearest even.
#[inline]
pub fn f16_bits(value: f32) -> u16 {
    half::f16::from_f32(value).to_bits()
}

/// The greatest |x| of a block and the signed value that has it (first one on ties), as
/// llama.cpp's Q4_0/Q5_0 quantizers pick it.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The least and greatest value of a block, as llama.cpp's Q4_1/Q5_1 quantizers find them.
#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_structs_match_the_ggml_type_table() {
        use std::mem::{align_of, size_of};
        fn check<B: Block>() {
            assert_eq!(size_of::<B>(), B::TYPE.type_size(), "{}", B::TYPE.name());
            assert_eq!(align_of::<B>(), 1, "{}", B::TYPE.name());
            assert_eq!(B::TYPE.block_size(), QK);
        }
        check::<BlockQ4_0>();
        check::<BlockQ4_1>();
        check::<BlockQ5_0>();
        check::<BlockQ5_1>();
        check::<BlockQ8_0>();
        check::<BlockQ8_1>();
    }

    #[test]
    fn blocks_view_any_alignment() {
        // An odd offset into a buffer still views in place (alignment 1).
        let mut buf = [0u8; 1 + 2 * 18];
        buf[1..3].copy_from_slice(&f32_to_f16(0.5));
        buf[3] = 0x21;
        let view = blocks::<BlockQ4_0>(&buf[1..], 2);
        assert_eq!(view[0].d(), 0.5);
        assert_eq!((view[0].code(0), view[0].code(16)), (1, 2));
    }

    #[test]
    #[should_panic(expected = "needs 36 bytes")]
    fn short_rows_are_rejected() {
        blocks::<BlockQ4_0>(&[0u8; 35], 2);
    }

    #[test]
    fn signed_absmax_keeps_the_first_extreme_and_its_sign() {
        assert_eq!(signed_absmax(&[1.0, -3.0, 3.0, 2.0]), -3.0);
        assert_eq!(signed_absmax(&[0.0, 0.0]), 0.0);
        assert_eq!(min_max(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
    }
}
