//! AVX-512 VNNI matmul over interleaved weights (layout: [`crate::interleaved`]).
//!
//! A tile is one group of 16 rows × up to `T` tokens. Per block the group's codes are
//! unpacked once into eight registers (quad q of all 16 rows), then for each token eight
//! `vpdpbusd` against the broadcast activation quads leave 16 block sums in one register,
//! which one multiply (activation scale) and one FMA (weight scales) add to the token's
//! accumulator. Rows finish in lanes, so a tile ends with a plain 16-float store.

use std::arch::x86_64::*;

use crate::formats::QK;
use crate::interleaved::{act_blocks, act_geometry, ActBlock, Geometry, GROUP_ROWS};
use crate::GgmlType;

std::thread_local! {
    /// Per-call activation block sums and scales, reused across calls.
    static ACT_INFO: std::cell::RefCell<Vec<ActBlock>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tokens per tile: the group's codes (8 registers) are reused across them.
const TILE_TOKENS: usize = 4;

/// One (group, block)'s unpacked codes and scales.
struct GroupBlock {
    codes: [__m512i; 8],
    d: __m512,
    m: __m512,
}

/// The shapes one call works over.
struct Operands {
    geo: Geometry,
    w: *const u8,
    nb: usize,
    act: *const u8,
    act_block_bytes: usize,
    qs_at: usize,
    info: *const ActBlock,
}

impl Operands {
    /// Unpacks block `b` of group `g`.
    ///
    /// # Safety
    /// AVX-512 F/BW and F16C must be available; `g < n_rows / 16` and `b < nb` of the weights
    /// `self` was built over.
    #[inline(always)]
    unsafe fn load(&self, g: usize, b: usize) -> GroupBlock {
        // SAFETY: the caller guarantees AVX-512 F/BW and F16C, `g < n_rows / 16` and `b < nb`;
        // `w` holds `n_rows / 16` groups of `nb` blocks of `geo.bytes` each, so `src` is block
        // `b` of group `g`, and every read (16 f16 scales, the `m` scales, the codes and the `qh`
        // masks at their `Geometry` offsets) lies inside that block's `geo.bytes` bytes.
        unsafe {
            let geo = &self.geo;
            let src = self.w.add((g * self.nb + b) * geo.bytes);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(src.cast()));
            let m = if geo.has_min {
                _mm512_cvtph_ps(_mm256_loadu_si256(src.add(geo.min_offset).cast()))
            } else {
                _mm512_setzero_ps()
            };
            let codes_at = src.add(geo.codes_offset);
            let mut codes = [_mm512_setzero_si512(); 8];
            if geo.byte_codes {
                for (q, c) in codes.iter_mut().enumerate() {
                    *c = _mm512_loadu_si512(codes_at.add(64 * q).cast());
                }
            } else {
                let low4 = _mm512_set1_epi8(0x0F);
                for c in 0..4 {
                    let packed = _mm512_loadu_si512(codes_at.add(64 * c).cast());
                    codes[2 * c] = _mm512_and_si512(packed, low4);
                    codes[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low4);
                }
                if geo.has_qh {
                    let qh = src.add(geo.qh_offset);
                    let sixteen = _mm512_set1_epi8(16);
                    for (q, c) in codes.iter_mut().enumerate() {
                        let bits: __mmask64 = std::ptr::read_unaligned(qh.add(8 * q).cast());
                        *c = _mm512_mask_add_epi8(*c, bits, *c, sixteen);
                    }
                }
            }
            GroupBlock { codes, d, m }
        }
    }

    /// Adds block `b` of token `t` against `gb` into `acc` (and `acc_min`).
    ///
    /// # Safety
    /// AVX-512 F/BW and VNNI must be available; `t < n_tok` and `b < nb` of the activations
    /// `self` was built over.
    #[inline(always)]
    unsafe fn accumulate(
        &self,
        gb: &GroupBlock,
        t: usize,
        b: usize,
        acc: &mut __m512,
        acc_min: &mut __m512,
    ) {
        // SAFETY: the caller guarantees AVX-512 F/BW/VNNI, `t < n_tok` and `b < nb`; `info` holds
        // `n_tok · nb` entries and `act` `n_tok · nb` blocks of `act_block_bytes`, whose 32 codes
        // start at `qs_at`, so the 8 quads read at `a + 4q` stay inside block `b` of token `t`.
        unsafe {
            let info = &*self.info.add(t * self.nb + b);
            let a = self
                .act
                .add((t * self.nb + b) * self.act_block_bytes + self.qs_at);
            let mut isum = if self.geo.has_min {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(info.corr)
            };
            for (q, &c) in gb.codes.iter().enumerate() {
                let quad = _mm512_set1_epi32(std::ptr::read_unaligned(a.add(4 * q).cast::<i32>()));
                isum = _mm512_dpbusd_epi32(isum, c, quad);
            }
            let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(info.d));
            *acc = _mm512_fmadd_ps(scaled, gb.d, *acc);
            if self.geo.has_min {
                *acc_min = _mm512_fmadd_ps(gb.m, _mm512_set1_ps(info.s), *acc_min);
            }
        }
    }

    /// Group `g` × tokens `t0..t0 + T` into `out`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI and F16C must be available; `g < n_rows / 16`, `t0 + T ≤ n_tok`, and
    /// `out` must hold `(n_tok − 1) · out_stride + n_rows` values.
    #[inline(always)]
    unsafe fn tile<const T: usize>(&self, g: usize, t0: usize, out: *mut f32, out_stride: usize) {
        // SAFETY: the caller guarantees AVX-512 F/BW/VNNI and F16C, `g < n_rows / 16`,
        // `t0 + T ≤ n_tok`, and that `out` holds `(n_tok − 1) · out_stride + n_rows` values, so
        // each store of 16 rows of group `g` for token `t0 + t` is in bounds; `b < nb` by the loop.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); T];
            let mut acc_min = [_mm512_setzero_ps(); T];
            for b in 0..self.nb {
                let gb = self.load(g, b);
                for t in 0..T {
                    self.accumulate(&gb, t0 + t, b, &mut acc[t], &mut acc_min[t]);
                }
            }
            for t in 0..T {
                let sum = if self.geo.has_min {
                    _mm512_add_ps(acc[t], acc_min[t])
                } else {
                    acc[t]
                };
                _mm512_storeu_ps(out.add((t0 + t) * out_stride + g * GROUP_ROWS), sum);
            }
        }
    }
}

/// See [`crate::interleaved::matmul_interleaved_on`].
///
/// # Safety
/// AVX-512 F/BW and VNNI are available; `w` holds `n_rows / 16` interleaved groups of `k / 32`
/// blocks of `ty`, `act` `n_tok` rows of `vec_dot_type(ty)`, and `out` at least
/// `(n_tok − 1) · out_stride + n_rows` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_vnni(
    ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    // SAFETY: AVX-512 F/BW/VL/VNNI and F16C are guaranteed by the caller (interleaved.rs
    // asserts the ISA is runnable), as are the sizes of `w`, `act` and `out`; `info` holds the
    // `n_tok · nb` block sums `act_blocks` just computed; `g < n_rows / 16` and each arm's
    // `T ≤ n_tok − t`, as `Operands::tile` requires.
    unsafe {
        let nb = k / QK;
        let (act_block_bytes, qs_at) = act_geometry(ty);
        ACT_INFO.with_borrow_mut(|info| {
            act_blocks(ty, act, n_tok, nb, info);
            let ops = Operands {
                geo: Geometry::of(ty),
                w: w.as_ptr(),
                nb,
                act: act.as_ptr(),
                act_block_bytes,
                qs_at,
                info: info.as_ptr(),
            };
            let out = out.as_mut_ptr();
            for g in 0..n_rows / GROUP_ROWS {
                let mut t = 0;
                while t < n_tok {
                    match n_tok - t {
                        1 => ops.tile::<1>(g, t, out, out_stride),
                        2 => ops.tile::<2>(g, t, out, out_stride),
                        3 => ops.tile::<3>(g, t, out, out_stride),
                        _ => ops.tile::<TILE_TOKENS>(g, t, out, out_stride),
                    }
                    t += TILE_TOKENS;
                }
            }
        });
    }
}
