//! K-quant super-block formats (Q2_K … Q6_K) and their activation partner Q8_K.
//!
//! Every format groups `QK_K = 256` weights into one super-block whose bytes are laid out
//! exactly as llama.cpp's `block_q*_K` structs (ggml-common.h), so GGUF tensor rows can be
//! used in place. A row of `k` weights is `k / 256` consecutive super-blocks.
//!
//! Per format this module has: a scalar `dequantize_row_*`, a reference quantizer
//! `quantize_row_*_ref`, and `vec_dot_*_q8k` against an activation row quantized once with
//! [`quantize_row_q8k`]. Each `vec_dot_*` dispatches on [`cpu::isa`] to a SIMD kernel where
//! one exists (Q4_K and Q6_K: AVX2, AVX-512 BW, AVX-512 VNNI; Q2_K, Q3_K, Q5_K: AVX2) and
//! otherwise runs the `_scalar` reference, which is public so tests can hold every kernel
//! against it; `vec_dot_*_on(isa, ..)` runs a chosen ISA's kernel.
//!
//! The block structs hold only byte arrays (alignment 1): GGUF rows are only guaranteed to
//! be 2-byte aligned and Q8_K carries an `f32`, so multi-byte fields are decoded with
//! `from_le_bytes` instead of being read in place.

use crate::GgmlType;

mod fit;
mod q2_k;
mod q3_k;
mod q4_k;
mod q5_k;
mod q6_k;
mod q8_k;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

pub use q2_k::{
    dequantize_row_q2k, quantize_row_q2k_ref, vec_dot_q2k_q8k, vec_dot_q2k_q8k_on,
    vec_dot_q2k_q8k_scalar, BlockQ2K,
};
pub use q3_k::{
    dequantize_row_q3k, quantize_row_q3k_ref, vec_dot_q3k_q8k, vec_dot_q3k_q8k_on,
    vec_dot_q3k_q8k_scalar, BlockQ3K,
};
pub use q4_k::{
    dequantize_row_q4k, quantize_row_q4k_ref, vec_dot_q4k_q8k, vec_dot_q4k_q8k_on,
    vec_dot_q4k_q8k_scalar, BlockQ4K,
};
pub use q5_k::{
    dequantize_row_q5k, quantize_row_q5k_ref, vec_dot_q5k_q8k, vec_dot_q5k_q8k_on,
    vec_dot_q5k_q8k_scalar, BlockQ5K,
};
pub use q6_k::{
    dequantize_row_q6k, quantize_row_q6k_ref, vec_dot_q6k_q8k, vec_dot_q6k_q8k_on,
    vec_dot_q6k_q8k_scalar, BlockQ6K,
};
pub use q8_k::{
    dequantize_row_q8k, quantize_row_q8k, quantize_row_q8k_on, quantize_row_q8k_scalar, BlockQ8K,
};

/// The summation order of a K-quant dot product in llama.cpp's AVX2 build, which depends on
/// the batch of tokens a step multiplies at once and on a token's place in it:
/// - Q4_K matrices are repacked eight rows at a time; one token at a time they run a gemv
///   ([`KDotOrder::Single`]), and the first `batch − batch mod 4` tokens of a batch run a
///   gemm in groups of 4 ([`KDotOrder::Grouped4`]);
/// - the other K-quants run `ggml_vec_dot_*_q8_K` per token, and its tiled matmul for
///   batches of 8 tokens or more ([`KDotOrder::Tiled`]).
///
/// Reproduced for Q4_K and Q6_K (the formats of Q4_K_M files); Q2_K, Q3_K and Q5_K run their
/// one-token order in every batch, and Q4_K matrices of a row count that is not a multiple
/// of 8 (which llama.cpp does not repack) are not told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KDotOrder {
    /// One token: per super-block, as `ggml_vec_dot_*_q8_K` or the Q4_K gemv.
    Single,
    /// Q4_K's repacked gemm: one fused step per 64 weights.
    Grouped4,
    /// The tiled K-quant matmul: per super-block `d·Σ` in f32, then one fused step with the
    /// activation's scale (Q6_K).
    Tiled,
}

impl KDotOrder {
    /// The order for token `token` of a batch of `batch` tokens multiplied by `ty` weights.
    pub fn for_token(ty: GgmlType, token: usize, batch: usize) -> KDotOrder {
        match ty {
            GgmlType::Q4K if token < batch - batch % 4 => KDotOrder::Grouped4,
            GgmlType::Q6K if batch >= 8 => KDotOrder::Tiled,
            _ => KDotOrder::Single,
        }
    }
}

/// `vec_dot` of a K-quant row in `order` with the kernels of `isa`; only AVX2 has orders other
/// than [`KDotOrder::Single`] (the others are what llama.cpp's AVX2 build runs), which the
/// AVX-512 ISAs run as well (see [`takes_four`]); other ISAs and formats without them fall
/// back to [`KDotOrder::Single`].
///
/// # Panics
/// If `isa` cannot run here or a row is shorter than `n` values.
pub fn vec_dot_in_order_on(
    isa: crate::cpu::Isa,
    ty: GgmlType,
    order: KDotOrder,
    n: usize,
    w: &[u8],
    act: &[u8],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && order != KDotOrder::Single {
        assert!(
            crate::cpu::is_runnable(isa),
            "{} kernels cannot run on this CPU",
            isa.name()
        );
        let nb = super_blocks(n);
        // SAFETY: `isa` has AVX2 and was checked runnable just above, so AVX2 with FMA and
        // F16C runs here; the block views hold `nb` whole blocks each.
        let dot = unsafe {
            match (ty, order) {
                (GgmlType::Q4K, KDotOrder::Grouped4) => {
                    Some(avx2::vec_dot_q4k_q8k_per_64(blocks(w, nb), blocks(act, nb)))
                }
                (GgmlType::Q6K, KDotOrder::Tiled) => {
                    Some(avx2::vec_dot_q6k_q8k_tiled(blocks(w, nb), blocks(act, nb)))
                }
                _ => None,
            }
        };
        if let Some(dot) = dot {
            return dot;
        }
    }
    crate::vec_dot_on(isa, ty, n, w, act)
}

/// Whether `isa` has a kernel taking four tokens at once for `ty` in `order`
/// ([`vec_dot4_in_order_on`]): AVX2's Q4_K [`KDotOrder::Grouped4`] and Q6_K
/// [`KDotOrder::Tiled`]. The AVX-512 ISAs take the same AVX2 kernels: unpacking each weight
/// block once for four tokens beats their one-pair dot products, and on AVX-512 machines no
/// dot product follows llama.cpp's order to the bit anyway.
pub fn takes_four(isa: crate::cpu::Isa, ty: GgmlType, order: KDotOrder) -> bool {
    cfg!(target_arch = "x86_64")
        && isa.has_avx2()
        && matches!(
            (ty, order),
            (GgmlType::Q4K, KDotOrder::Grouped4) | (GgmlType::Q6K, KDotOrder::Tiled)
        )
}

/// [`vec_dot_in_order_on`] of one weight row with four activation rows, all in `order`,
/// equal to four single calls bit for bit (the chains interleaved, each weight block read
/// once for the four).
///
/// # Panics
/// If [`takes_four`] is false for these arguments, `isa` cannot run here, or a row is
/// shorter than `n` values.
pub fn vec_dot4_in_order_on(
    isa: crate::cpu::Isa,
    ty: GgmlType,
    order: KDotOrder,
    n: usize,
    w: &[u8],
    acts: [&[u8]; 4],
) -> [f32; 4] {
    assert!(
        takes_four(isa, ty, order),
        "no four-token {} kernel for {ty:?} in {order:?}",
        isa.name()
    );
    assert!(
        crate::cpu::is_runnable(isa),
        "{} kernels cannot run on this CPU",
        isa.name()
    );
    let nb = super_blocks(n);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` has AVX2 (`takes_four`) and was checked runnable just above, so AVX2
    // with FMA and F16C runs here; the block views hold `nb` whole blocks each.
    unsafe {
        if ty == GgmlType::Q4K {
            avx2::vec_dot4_q4k_q8k_per_64(blocks(w, nb), acts.map(|a| blocks(a, nb)))
        } else {
            avx2::vec_dot4_q6k_q8k_tiled(blocks(w, nb), acts.map(|a| blocks(a, nb)))
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("takes_four is false off x86_64 ({nb} blocks)")
}

/// Weights per super-block, for every k-quant format.
pub const QK_K: usize = 256;

/// Scale bytes of Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins.
pub const K_SCALE_SIZE: usize = 12;

/// A k-quant block struct that may be viewed in place over raw row bytes: `Pod` (derived,
/// so checked by the compiler) with byte arrays only, so alignment 1. [`blocks`] asserts the
/// alignment and `size_of::<Self>() == TYPE.type_size()` at compile time for every struct
/// it views.
pub(crate) trait KBlock: bytemuck::Pod {
    const TYPE: GgmlType;
}

/// The first `n_blocks` blocks of a raw row. Panics if `bytes` is too short.
#[inline]
pub(crate) fn blocks<B: KBlock>(bytes: &[u8], n_blocks: usize) -> &[B] {
    let needed = n_blocks * std::mem::size_of::<B>();
    assert!(
        bytes.len() >= needed,
        "{} row of {} blocks needs {needed} bytes, got {}",
        B::TYPE.name(),
        n_blocks,
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
#[inline]
pub(crate) fn blocks_mut<B: KBlock>(bytes: &mut [u8], n_blocks: usize) -> &mut [B] {
    let needed = n_blocks * std::mem::size_of::<B>();
    assert!(
        bytes.len() >= needed,
        "{} row of {} blocks needs {needed} bytes, got {}",
        B::TYPE.name(),
        n_blocks,
        bytes.len()
    );
    const {
        assert!(std::mem::align_of::<B>() == 1);
        assert!(std::mem::size_of::<B>() == B::TYPE.type_size());
    };
    bytemuck::cast_slice_mut(&mut bytes[..needed])
}

/// Number of super-blocks in a row of `n` weights. Panics unless `n` is a multiple of 256.
#[inline]
pub(crate) fn super_blocks(n: usize) -> usize {
    assert!(
        n.is_multiple_of(QK_K),
        "k-quant rows hold a multiple of {QK_K} weights, got {n}"
    );
    n / QK_K
}

#[inline]
pub(crate) fn f16_to_f32(bits: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(bits)).to_f32()
}

#[inline]
pub(crate) fn f32_to_f16(value: f32) -> [u8; 2] {
    half::f16::from_f32(value).to_bits().to_le_bytes()
}

/// Unpacks the twelve Q4_K/Q5_K scale bytes into eight 6-bit scales and eight 6-bit mins.
///
/// Byte layout, sub-blocks 0..8: bytes 0-3 hold scales 0-3 in their low six bits and the
/// top two bits of scales 4-7 above them; bytes 4-7 do the same for the mins; bytes 8-11
/// hold the low nibbles of scales 4-7 (low half) and of mins 4-7 (high half).
#[inline]
pub(crate) fn unpack_scale_min_k4(packed: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = packed[j] & 63;
        mins[j] = packed[j + 4] & 63;
        scales[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        mins[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// [`unpack_scale_min_k4`] on whole words, for the SIMD kernels: returns the eight scales
/// and the eight mins as the bytes of two little-endian `u64`.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // no aarch64 k-quant kernel yet
pub(crate) fn unpack_scale_min_k4_words(packed: &[u8; K_SCALE_SIZE]) -> (u64, u64) {
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (low, mid, high) = (word(0), word(4), word(8));
    // Per byte: `>> 2` then `& 0x30` moves bits 6-7 to bits 4-5 without crossing bytes.
    let scales_03 = low & 0x3F3F_3F3F;
    let mins_03 = mid & 0x3F3F_3F3F;
    let scales_47 = (high & 0x0F0F_0F0F) | ((low >> 2) & 0x3030_3030);
    let mins_47 = ((high >> 4) & 0x0F0F_0F0F) | ((mid >> 2) & 0x3030_3030);
    (
        scales_03 as u64 | ((scales_47 as u64) << 32),
        mins_03 as u64 | ((mins_47 as u64) << 32),
    )
}

/// Inverse of [`unpack_scale_min_k4`]; every input must be below 64.
#[inline]
pub(crate) fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut packed = [0u8; K_SCALE_SIZE];
    for j in 0..4 {
        debug_assert!(scales[j] < 64 && mins[j] < 64 && scales[j + 4] < 64 && mins[j + 4] < 64);
        packed[j] = scales[j] | ((scales[j + 4] >> 4) << 6);
        packed[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6);
        packed[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4);
    }
    packed
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Deterministic inputs shared by the unit tests of the format files.

    /// A small xorshift generator: reproducible without pulling in a crate.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// Uniform in [-1, 1).
        pub fn next_f32(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        }

        pub fn fill_bytes(&mut self, out: &mut [u8]) {
            for byte in out {
                *byte = (self.next_u64() >> 56) as u8;
            }
        }
    }

    /// Weights with outliers and a per-block offset, like real weight rows.
    pub fn weight_like(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = XorShift(seed | 1);
        (0..n)
            .map(|i| {
                let base = rng.next_f32() * 0.05 + 0.01 * ((i / 256) as f32).sin();
                if i % 97 == 13 {
                    base * 8.0
                } else {
                    base
                }
            })
            .collect()
    }

    /// The fixed test vector of llama.cpp's quant tests, shifted: 0.1 + 2 cos(i + offset).
    pub fn cosine_vector(n: usize, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|i| 0.1 + 2.0 * (i as f32 + offset).cos())
            .collect()
    }

    pub fn rmse(a: &[f32], b: &[f32]) -> f32 {
        let sum: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (sum / a.len() as f64).sqrt() as f32
    }

    /// Σ|a_i b_i| in f64: the scale against which float-order differences are judged.
    pub fn abs_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x * y).abs() as f64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips_all_six_bit_values() {
        for base in 0..64u8 {
            let scales: [u8; 8] = std::array::from_fn(|j| ((base as usize + 7 * j) % 64) as u8);
            let mins: [u8; 8] = std::array::from_fn(|j| ((3 * base as usize + 11 * j) % 64) as u8);
            let packed = pack_scale_min_k4(&scales, &mins);
            assert_eq!(unpack_scale_min_k4(&packed), (scales, mins));
            let (scale_word, min_word) = unpack_scale_min_k4_words(&packed);
            assert_eq!(scale_word.to_le_bytes(), scales);
            assert_eq!(min_word.to_le_bytes(), mins);
        }
    }

    #[test]
    fn block_views_reject_short_rows() {
        let short = [0u8; 143];
        let result = std::panic::catch_unwind(|| blocks::<BlockQ4K>(&short, 1).len());
        assert!(result.is_err());
        // An odd start address is fine: the block structs have alignment 1.
        let long = [0u8; 145];
        assert_eq!(blocks::<BlockQ4K>(&long[1..], 1).len(), 1);
    }

    #[test]
    fn scalar_is_always_runnable() {
        use crate::cpu::{self, Isa};
        assert!(cpu::is_runnable(Isa::Scalar));
        assert!(cpu::is_runnable(cpu::isa()));
    }
}
