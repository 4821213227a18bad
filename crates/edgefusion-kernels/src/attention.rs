//! Attention over a KV cache as two small GEMMs: query-key scores, then the
//! probability-weighted sum of values.
//!
//! Cache layouts, per layer and KV head:
//! - keys in panels of [`KEY_PANEL`] positions, `(n_panels, head_dim, KEY_PANEL)`: position `p`
//!   is column `p % 16` of panel `p / 16`. The d-th components of 16 consecutive keys are one
//!   vector load, so the score kernel broadcasts a query component and multiply-adds it into
//!   16 scores at once, with no horizontal sums; and the cache fills panel by panel (page by
//!   page) as positions grow.
//! - values row-major, `(n_ctx, head_dim)`: the weighted sum broadcasts one probability and
//!   multiply-adds it into a whole output row.
//!
//! Each kernel has a scalar reference (`*_scalar`), AVX-512 and AVX2 (+FMA, F16C) versions
//! chosen at run time through [`cpu::isa`], and an `_on(isa, ..)` twin. Every output is one
//! chain of fused multiply-adds in the same order in all versions (over `d` for a score, over
//! keys for a weighted sum), so the SIMD kernels reproduce the scalar reference; on aarch64 the
//! scalar reference runs.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::cpu::{self, Isa};
use crate::f32ops;

/// Positions per key panel.
pub const KEY_PANEL: usize = 16;

/// Which element type a [`KvElement`] is (the SIMD kernels load each differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    F32,
    F16,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// A type the KV cache may hold: `f32` or `f16`.
pub trait KvElement: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    const KIND: KvKind;
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i]` converted to this type (round to nearest even).
    ///
    /// # Panics
    /// If the lengths differ.
    fn store_slice(src: &[f32], dst: &mut [Self]);
    /// Rounds every value to this type's precision in place. llama.cpp converts the other
    /// operand of a product with the cache (queries for keys, probabilities for values) to
    /// the cache's type; this is that rounding.
    fn round_slice(x: &mut [f32]);
}

impl KvElement for f32 {
    const KIND: KvKind = KvKind::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    fn store_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn round_slice(_x: &mut [f32]) {}
}

impl KvElement for f16 {
    const KIND: KvKind = KvKind::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn store_slice(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    fn round_slice(x: &mut [f32]) {
        f32ops::round_f16(x);
    }
}

/// Elements of one KV head's key cache holding `n_ctx` positions: whole panels.
pub fn key_cache_len(n_ctx: usize, head_dim: usize) -> usize {
    n_ctx.div_ceil(KEY_PANEL) * KEY_PANEL * head_dim
}

/// Index of position `pos`'s first element (dimension 0) in a key cache
/// `(n_panels, head_dim, KEY_PANEL)`; dimension `d` is `KEY_PANEL · d` further.
fn key_col(head_dim: usize, pos: usize) -> usize {
    pos / KEY_PANEL * KEY_PANEL * head_dim + pos % KEY_PANEL
}

/// Writes `key (head_dim)` as position `pos` of one KV head's key cache
/// `(n_panels, head_dim, KEY_PANEL)`.
///
/// # Panics
/// If `pos` is outside `keys`.
pub fn store_key<T: KvElement>(keys: &mut [T], head_dim: usize, pos: usize, key: &[f32]) {
    assert_eq!(key.len(), head_dim, "store_key: key length != head_dim");
    let col0 = key_col(head_dim, pos);
    assert!(
        col0 + head_dim.saturating_sub(1) * KEY_PANEL < keys.len(),
        "store_key: position {pos} outside a cache of {} elements",
        keys.len()
    );
    // Convert in bulk (F16C for f16), then scatter down the panel column.
    let mut converted = [T::default(); 64];
    for (c, part) in key.chunks(64).enumerate() {
        T::store_slice(part, &mut converted[..part.len()]);
        for (i, &v) in converted[..part.len()].iter().enumerate() {
            keys[col0 + (c * 64 + i) * KEY_PANEL] = v;
        }
    }
}

/// `out[i * ld + j] = scale · (q_i · key_j)` for query rows `q (m, head_dim)` and keys
/// `j < n_keys` of one head's key cache `(n_panels, head_dim, KEY_PANEL)`. Columns
/// `n_keys..ld` of `out` are left alone.
///
/// # Panics
/// If `head_dim` is 0 or does not divide `q.len()`, `ld < n_keys`, `out` is shorter than
/// `(m - 1) · ld + n_keys`, or `keys` holds fewer than `ceil(n_keys / 16)` whole panels.
#[inline]
pub fn scores<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
) {
    scores_impl(cpu::isa(), q, head_dim, keys, n_keys, scale, out, ld)
}

/// [`scores`] with the kernel of `isa`.
///
/// # Panics
/// As [`scores`], or if `isa` cannot run on this machine.
#[allow(clippy::too_many_arguments)]
pub fn scores_on<T: KvElement>(
    isa: Isa,
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
) {
    assert!(
        cpu::is_runnable(isa),
        "scores_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    scores_impl(isa, q, head_dim, keys, n_keys, scale, out, ld)
}

/// Scalar reference of [`scores`]: one fused multiply-add chain over `d` per score.
pub fn scores_scalar<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
) {
    let m = check_scores(q, head_dim, keys, n_keys, out, ld);
    let panel_len = KEY_PANEL * head_dim;
    for (i, q_row) in q.chunks_exact(head_dim).enumerate().take(m) {
        // A panel at a time: its 16 keys are independent chains over `d`, which the
        // compiler vectorizes (each score is still one fused multiply-add chain over `d`).
        for (p, panel) in keys[..n_keys.div_ceil(KEY_PANEL) * panel_len]
            .chunks_exact(panel_len)
            .enumerate()
        {
            let mut acc = [0.0f32; KEY_PANEL];
            for (&qd, column) in q_row.iter().zip(panel.chunks_exact(KEY_PANEL)) {
                for (a, &k) in acc.iter_mut().zip(column) {
                    *a = qd.mul_add(k.to_f32(), *a);
                }
            }
            let j0 = p * KEY_PANEL;
            let n = (n_keys - j0).min(KEY_PANEL);
            for (o, a) in out[i * ld + j0..][..n].iter_mut().zip(&acc) {
                *o = a * scale;
            }
        }
    }
}

/// `out[i] = Σ_{j < n_keys} probs[i * ld + j] · value_j` for rows `out (m, head_dim)` and one
/// head's value cache `values (n_ctx, head_dim)`.
///
/// # Panics
/// If `head_dim` is 0 or does not divide `out.len()`, `ld < n_keys`, `probs` is shorter than
/// `(m - 1) · ld + n_keys`, or `values` holds fewer than `n_keys` rows.
#[inline]
pub fn weighted_sum<T: KvElement>(
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    n_keys: usize,
    out: &mut [f32],
) {
    weighted_sum_impl(cpu::isa(), probs, ld, values, head_dim, n_keys, out)
}

/// [`weighted_sum`] with the kernel of `isa`.
///
/// # Panics
/// As [`weighted_sum`], or if `isa` cannot run on this machine.
pub fn weighted_sum_on<T: KvElement>(
    isa: Isa,
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    n_keys: usize,
    out: &mut [f32],
) {
    assert!(
        cpu::is_runnable(isa),
        "weighted_sum_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    weighted_sum_impl(isa, probs, ld, values, head_dim, n_keys, out)
}

/// Scalar reference of [`weighted_sum`]: one fused multiply-add chain over keys per output.
pub fn weighted_sum_scalar<T: KvElement>(
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    n_keys: usize,
    out: &mut [f32],
) {
    check_weighted_sum(probs, ld, values, head_dim, n_keys, out);
    for (i, out_row) in out.chunks_exact_mut(head_dim).enumerate() {
        out_row.fill(0.0);
        for j in 0..n_keys {
            let p = probs[i * ld + j];
            let value = &values[j * head_dim..(j + 1) * head_dim];
            for (o, v) in out_row.iter_mut().zip(value) {
                *o = p.mul_add(v.to_f32(), *o);
            }
        }
    }
}

/// Validates a `scores` call; returns the number of query rows.
fn check_scores<T>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    out: &[f32],
    ld: usize,
) -> usize {
    assert!(head_dim > 0, "scores: head_dim is 0");
    assert!(
        q.len().is_multiple_of(head_dim),
        "scores: {} query floats are not whole rows of {head_dim}",
        q.len()
    );
    let m = q.len() / head_dim;
    assert!(ld >= n_keys, "scores: ld {ld} < n_keys {n_keys}");
    let panels = key_cache_len(n_keys, head_dim);
    assert!(
        keys.len() >= panels,
        "scores: {n_keys} keys need {panels} cache elements (whole panels), got {}",
        keys.len()
    );
    if m > 0 && n_keys > 0 {
        assert!(
            out.len() >= (m - 1) * ld + n_keys,
            "scores: out holds {} floats, {m} rows of stride {ld} need {}",
            out.len(),
            (m - 1) * ld + n_keys
        );
    }
    m
}

/// Validates a `weighted_sum` call; returns the number of output rows.
fn check_weighted_sum<T>(
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    n_keys: usize,
    out: &[f32],
) -> usize {
    assert!(head_dim > 0, "weighted_sum: head_dim is 0");
    assert!(
        out.len().is_multiple_of(head_dim),
        "weighted_sum: {} output floats are not whole rows of {head_dim}",
        out.len()
    );
    let m = out.len() / head_dim;
    assert!(ld >= n_keys, "weighted_sum: ld {ld} < n_keys {n_keys}");
    assert!(
        values.len() >= n_keys * head_dim,
        "weighted_sum: {n_keys} value rows of {head_dim} need {} elements, got {}",
        n_keys * head_dim,
        values.len()
    );
    if m > 0 && n_keys > 0 {
        assert!(
            probs.len() >= (m - 1) * ld + n_keys,
            "weighted_sum: probs holds {} floats, {m} rows of stride {ld} need {}",
            probs.len(),
            (m - 1) * ld + n_keys
        );
    }
    m
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn scores_impl<T: KvElement>(
    isa: Isa,
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx2 => {
            let m = check_scores(q, head_dim, keys, n_keys, out, ld);
            let (q, out) = (q.as_ptr(), out.as_mut_ptr());
            let args = x86::ScoresArgs {
                q,
                m,
                head_dim,
                n_keys,
                scale,
                out,
                ld,
            };
            // SAFETY: `isa` was detected or checked runnable; `check_scores` bounded every
            // access (whole key panels, `m` rows of `out` at stride `ld`); `T::KIND` names
            // `T` exactly (the trait is sealed), so the pointer casts keep the element type.
            unsafe {
                match (isa, T::KIND) {
                    (Isa::Avx2, KvKind::F16) => {
                        x86::scores_avx2::<f16>(&args, keys.as_ptr().cast())
                    }
                    (Isa::Avx2, KvKind::F32) => {
                        x86::scores_avx2::<f32>(&args, keys.as_ptr().cast())
                    }
                    (_, KvKind::F16) => x86::scores_avx512::<f16>(&args, keys.as_ptr().cast()),
                    (_, KvKind::F32) => x86::scores_avx512::<f32>(&args, keys.as_ptr().cast()),
                }
            }
        }
        _ => scores_scalar(q, head_dim, keys, n_keys, scale, out, ld),
    }
}

#[inline]
fn weighted_sum_impl<T: KvElement>(
    isa: Isa,
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    n_keys: usize,
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx2 => {
            let m = check_weighted_sum(probs, ld, values, head_dim, n_keys, out);
            let args = x86::SumArgs {
                probs: probs.as_ptr(),
                ld,
                m,
                n_keys,
                head_dim,
                out: out.as_mut_ptr(),
            };
            // SAFETY: `isa` was detected or checked runnable; `check_weighted_sum` bounded
            // every access (`n_keys` value rows, `m` probability rows at stride `ld`, `m`
            // output rows); `T::KIND` names `T` exactly (sealed trait), so the casts keep the
            // element type.
            unsafe {
                match (isa, T::KIND) {
                    (Isa::Avx2, KvKind::F16) => {
                        x86::weighted_sum_avx2::<f16>(&args, values.as_ptr().cast())
                    }
                    (Isa::Avx2, KvKind::F32) => {
                        x86::weighted_sum_avx2::<f32>(&args, values.as_ptr().cast())
                    }
                    (_, KvKind::F16) => {
                        x86::weighted_sum_avx512::<f16>(&args, values.as_ptr().cast())
                    }
                    (_, KvKind::F32) => {
                        x86::weighted_sum_avx512::<f32>(&args, values.as_ptr().cast())
                    }
                }
            }
        }
        _ => weighted_sum_scalar(probs, ld, values, head_dim, n_keys, out),
    }
}

/// AVX-512 and AVX2 kernels. Tiles are `const`-generic in their row and column counts so
/// that their accumulators stay in registers; every tile shape is instantiated inside the
/// `#[target_feature]` entry points.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::KEY_PANEL;
    use crate::x86::avx2::{F16Row, F32Row, FloatRow8};
    use crate::x86::avx512::FloatRow16;
    use half::f16;
    use std::arch::x86_64::*;

    /// A cache element type and the crate's float-row loaders for it (the ones the float
    /// matmul kernels use), reached through typed pointers.
    pub(super) trait Lanes: Copy {
        type Row: FloatRow16 + FloatRow8;
    }

    impl Lanes for f32 {
        type Row = F32Row;
    }

    impl Lanes for f16 {
        type Row = F16Row;
    }

    /// 16 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX-512F (plus BW/VL for f16) must be available and `p` readable for 16 elements.
    #[inline(always)]
    unsafe fn load16<E: Lanes>(p: *const E) -> __m512 {
        // SAFETY: the caller guarantees the ISA of `E::Row` and that `p` is readable for 16
        // elements of type `E`, which is `load16`'s contract for `E::Row`'s byte size.
        unsafe { E::Row::load16(p.cast()) }
    }

    /// The elements of `p[..16]` selected by `mask` (others read as 0, never touched).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be available and the elements selected by `mask` readable at `p`.
    #[inline(always)]
    unsafe fn load16_masked<E: Lanes>(p: *const E, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees the ISA of `E::Row` and that the elements of `p[..16]`
        // selected by `mask` are readable; masked-off lanes are not accessed.
        unsafe { E::Row::load_masked(p.cast(), mask) }
    }

    /// 8 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX2 (and F16C for f16) must be available and `p` readable for 8 elements.
    #[inline(always)]
    unsafe fn load8<E: Lanes>(p: *const E) -> __m256 {
        // SAFETY: the caller guarantees AVX2 (and F16C for f16) and that `p` is readable for 8
        // elements of type `E`, which is `load8`'s contract for `E::Row`'s byte size.
        unsafe { E::Row::load8(p.cast()) }
    }

    /// One element at `p` as f32.
    ///
    /// # Safety
    /// F16C must be available for f16, and `p` readable for one element.
    #[inline(always)]
    unsafe fn load1<E: Lanes>(p: *const E) -> f32 {
        // SAFETY: the caller guarantees F16C (for f16) and that `p` is readable for one element
        // of type `E`, which is `load1`'s contract for `E::Row`'s byte size.
        unsafe { E::Row::load1(p.cast()) }
    }

    /// A checked `scores` call: `q (m, head_dim)`, `out` rows at stride `ld`.
    pub(super) struct ScoresArgs {
        pub q: *const f32,
        pub m: usize,
        pub head_dim: usize,
        pub n_keys: usize,
        pub scale: f32,
        pub out: *mut f32,
        pub ld: usize,
    }

    /// A checked `weighted_sum` call: `probs` rows at stride `ld`, `out (m, head_dim)`.
    pub(super) struct SumArgs {
        pub probs: *const f32,
        pub ld: usize,
        pub m: usize,
        pub n_keys: usize,
        pub head_dim: usize,
        pub out: *mut f32,
    }

    /// Mask of the low `n` (≤ 16) lanes.
    #[inline(always)]
    fn low_lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    // -------------------------------------------------------------------------------------
    // AVX-512

    /// Scores of `R` query rows against `P` key panels (16 keys each): `R × P` zmm
    /// accumulators, each the FMA chain over `d` of 16 scores.
    ///
    /// `q` points at the tile's first query row, `keys` at its first panel, `out` at its
    /// first score; `n_cols` (> 16·(P−1)) keys of the tile are stored.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, FMA and F16C must be available; `q` must hold `R` query rows, `keys`
    /// `P` whole key panels of type `E`, and `out` `R` rows at stride `a.ld` with room for
    /// `n_cols` (> 16·(P−1)) scores each.
    #[inline(always)]
    unsafe fn scores_tile_512<E: Lanes, const R: usize, const P: usize>(
        a: &ScoresArgs,
        q: *const f32,
        keys: *const E,
        out: *mut f32,
        n_cols: usize,
    ) {
        // SAFETY: the caller guarantees AVX-512 F/BW/VL, FMA and F16C and a tile inside the
        // bounds `check_scores` checked: `q` has `R` rows of `head_dim`, `keys` `P` whole panels of
        // `head_dim · 16` elements (the cache holds whole panels), and `out` `R` rows at stride
        // `ld` with `n_cols` stored scores; the last panel's store is masked to its `cols` keys.
        unsafe {
            let hd = a.head_dim;
            let panel = hd * KEY_PANEL;
            let mut acc = [[_mm512_setzero_ps(); P]; R];
            for d in 0..hd {
                let mut k = [_mm512_setzero_ps(); P];
                for (p, kp) in k.iter_mut().enumerate() {
                    *kp = load16(keys.add(p * panel + d * KEY_PANEL));
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let qv = _mm512_set1_ps(*q.add(r * hd + d));
                    for p in 0..P {
                        acc_r[p] = _mm512_fmadd_ps(qv, k[p], acc_r[p]);
                    }
                }
            }
            let scale = _mm512_set1_ps(a.scale);
            for (r, acc_r) in acc.iter().enumerate() {
                for (p, &acc_rp) in acc_r.iter().enumerate() {
                    let dst = out.add(r * a.ld + p * KEY_PANEL);
                    let v = _mm512_mul_ps(acc_rp, scale);
                    let cols = n_cols - p * KEY_PANEL;
                    if cols >= KEY_PANEL {
                        _mm512_storeu_ps(dst, v);
                    } else {
                        _mm512_mask_storeu_ps(dst, low_lanes(cols), v);
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL, FMA and F16C must be available; `a` must have passed `check_scores`,
    /// `keys` must point at elements of type `E`, and `r0 + R ≤ a.m`.
    #[inline(always)]
    unsafe fn scores_rows_512<E: Lanes, const R: usize>(a: &ScoresArgs, keys: *const E, r0: usize) {
        // SAFETY: the caller guarantees the ISA and `r0 + R ≤ m` of arguments that passed
        // `check_scores`; each tile covers panels `p0..p0 + P` with `P ≤ n_panels − p0`, the
        // first `n_keys − 16·p0` scores of the rows, as `scores_tile_512` requires.
        unsafe {
            let n_panels = a.n_keys.div_ceil(KEY_PANEL);
            let q = a.q.add(r0 * a.head_dim);
            let mut p0 = 0;
            while p0 < n_panels {
                let k = keys.add(p0 * a.head_dim * KEY_PANEL);
                let out = a.out.add(r0 * a.ld + p0 * KEY_PANEL);
                let n_cols = a.n_keys - p0 * KEY_PANEL;
                match n_panels - p0 {
                    1 => scores_tile_512::<E, R, 1>(a, q, k, out, n_cols),
                    2 => scores_tile_512::<E, R, 2>(a, q, k, out, n_cols),
                    3 => scores_tile_512::<E, R, 3>(a, q, k, out, n_cols),
                    _ => scores_tile_512::<E, R, 4>(a, q, k, out, n_cols),
                }
                p0 += 4;
            }
        }
    }

    /// `scores` with AVX-512: tiles of up to 4 query rows × 4 key panels (64 keys).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, FMA and F16C must be available; the arguments must have passed
    /// `check_scores` and `keys` must point at elements of type `E`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn scores_avx512<E: Lanes>(a: &ScoresArgs, keys: *const E) {
        // SAFETY: the ISA is guaranteed by the caller (attention.rs checks `cpu::isa()`), `a`
        // passed `check_scores` and `keys` points at `E`s; each arm's `R ≤ m − r0`, as
        // `scores_rows_512` requires.
        unsafe {
            if a.n_keys == 0 {
                return;
            }
            let mut r0 = 0;
            while r0 < a.m {
                match a.m - r0 {
                    1 => scores_rows_512::<E, 1>(a, keys, r0),
                    2 => scores_rows_512::<E, 2>(a, keys, r0),
                    3 => scores_rows_512::<E, 3>(a, keys, r0),
                    _ => scores_rows_512::<E, 4>(a, keys, r0),
                }
                r0 += 4;
            }
        }
    }

    /// Weighted sums of `R` rows over `C` zmm of output columns: per key, `C` value loads
    /// (the last one masked to `last_mask`) and `R` broadcast probabilities.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, FMA and F16C must be available; `probs` must hold `R` rows at stride
    /// `a.ld`, and `values` / `out` must have `16·(C−1)` columns plus those of `last_mask`
    /// readable / writable in every value row and output row from the tile's first column.
    #[inline(always)]
    unsafe fn sum_tile_512<E: Lanes, const R: usize, const C: usize>(
        a: &SumArgs,
        probs: *const f32,
        values: *const E,
        out: *mut f32,
        last_mask: __mmask16,
    ) {
        // SAFETY: the caller guarantees AVX-512 F/BW/VL, FMA and F16C and a tile inside the
        // bounds `check_weighted_sum` checked: `values` has `n_keys` rows of `head_dim` from this
        // tile's first column, `probs` `R` rows at stride `ld` with `n_keys` entries, and `out` `R`
        // rows of `head_dim`; the last column vector's loads and stores are masked to `last_mask`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for j in 0..a.n_keys {
                let row = values.add(j * a.head_dim);
                let mut v = [_mm512_setzero_ps(); C];
                for (c, vc) in v.iter_mut().enumerate() {
                    *vc = if c + 1 == C {
                        load16_masked(row.add(c * 16), last_mask)
                    } else {
                        load16(row.add(c * 16))
                    };
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let pv = _mm512_set1_ps(*probs.add(r * a.ld + j));
                    for c in 0..C {
                        acc_r[c] = _mm512_fmadd_ps(pv, v[c], acc_r[c]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (c, &acc_rc) in acc_r.iter().enumerate() {
                    let dst = out.add(r * a.head_dim + c * 16);
                    if c + 1 == C {
                        _mm512_mask_storeu_ps(dst, last_mask, acc_rc);
                    } else {
                        _mm512_storeu_ps(dst, acc_rc);
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 F/BW/VL, FMA and F16C must be available; `a` must have passed
    /// `check_weighted_sum`, `values` must point at elements of type `E`, and `r0 + R ≤ a.m`.
    #[inline(always)]
    unsafe fn sum_rows_512<E: Lanes, const R: usize>(a: &SumArgs, values: *const E, r0: usize) {
        // SAFETY: the caller guarantees the ISA and `r0 + R ≤ m` of arguments that passed
        // `check_weighted_sum`; each tile covers column vectors `c0..c0 + cols` of `n_vecs`, with
        // the last vector of the row masked to the `head_dim − 16·(n_vecs − 1)` columns it has.
        unsafe {
            let n_vecs = a.head_dim.div_ceil(16);
            let tail = low_lanes(a.head_dim - (n_vecs - 1) * 16);
            let probs = a.probs.add(r0 * a.ld);
            let mut c0 = 0;
            while c0 < n_vecs {
                let cols = (n_vecs - c0).min(4);
                let mask = if c0 + cols == n_vecs { tail } else { 0xffff };
                let v = values.add(c0 * 16);
                let out = a.out.add(r0 * a.head_dim + c0 * 16);
                match cols {
                    1 => sum_tile_512::<E, R, 1>(a, probs, v, out, mask),
                    2 => sum_tile_512::<E, R, 2>(a, probs, v, out, mask),
                    3 => sum_tile_512::<E, R, 3>(a, probs, v, out, mask),
                    _ => sum_tile_512::<E, R, 4>(a, probs, v, out, mask),
                }
                c0 += 4;
            }
        }
    }

    /// `weighted_sum` with AVX-512: tiles of up to 4 rows × 64 output columns.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, FMA and F16C must be available; the arguments must have passed
    /// `check_weighted_sum` and `values` must point at elements of type `E`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum_avx512<E: Lanes>(a: &SumArgs, values: *const E) {
        // SAFETY: the ISA is guaranteed by the caller (attention.rs checks `cpu::isa()`), `a`
        // passed `check_weighted_sum` and `values` points at `E`s; each arm's `R ≤ m − r0`, as
        // `sum_rows_512` requires.
        unsafe {
            let mut r0 = 0;
            while r0 < a.m {
                match a.m - r0 {
                    1 => sum_rows_512::<E, 1>(a, values, r0),
                    2 => sum_rows_512::<E, 2>(a, values, r0),
                    3 => sum_rows_512::<E, 3>(a, values, r0),
                    _ => sum_rows_512::<E, 4>(a, values, r0),
                }
                r0 += 4;
            }
        }
    }

    // -------------------------------------------------------------------------------------
    // AVX2 (16 ymm registers: tiles of 4 rows × one 16-key panel, or 4 rows × 16 columns)

    /// Scores of `R` query rows against one key panel: `R × 2` ymm accumulators.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `q` must hold `R` query rows, `keys` one whole key
    /// panel of type `E`, and `out` `R` rows at stride `a.ld` with room for `min(n_cols, 16)`
    /// scores each.
    #[inline(always)]
    unsafe fn scores_tile_256<E: Lanes, const R: usize>(
        a: &ScoresArgs,
        q: *const f32,
        keys: *const E,
        out: *mut f32,
        n_cols: usize,
    ) {
        // SAFETY: the caller guarantees AVX2, FMA and F16C and a tile inside the bounds
        // `check_scores` checked: `q` has `R` rows of `head_dim`, `keys` one whole panel of
        // `head_dim · 16` elements, and `out` `R` rows at stride `ld` with `n_cols` scores; a
        // partial panel goes through `tmp` and copies only its `n_cols` (< 16) scores.
        unsafe {
            let hd = a.head_dim;
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for d in 0..hd {
                let k0 = load8(keys.add(d * KEY_PANEL));
                let k1 = load8(keys.add(d * KEY_PANEL + 8));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let qv = _mm256_set1_ps(*q.add(r * hd + d));
                    acc_r[0] = _mm256_fmadd_ps(qv, k0, acc_r[0]);
                    acc_r[1] = _mm256_fmadd_ps(qv, k1, acc_r[1]);
                }
            }
            let scale = _mm256_set1_ps(a.scale);
            for (r, acc_r) in acc.iter().enumerate() {
                let lo = _mm256_mul_ps(acc_r[0], scale);
                let hi = _mm256_mul_ps(acc_r[1], scale);
                let dst = out.add(r * a.ld);
                if n_cols >= KEY_PANEL {
                    _mm256_storeu_ps(dst, lo);
                    _mm256_storeu_ps(dst.add(8), hi);
                } else {
                    let mut tmp = [0.0f32; KEY_PANEL];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n_cols);
                }
            }
        }
    }

    /// `scores` with AVX2.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; the arguments must have passed `check_scores`
    /// and `keys` must point at elements of type `E`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores_avx2<E: Lanes>(a: &ScoresArgs, keys: *const E) {
        // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (attention.rs checks
        // `cpu::isa()`), `a` passed `check_scores` and `keys` points at `E`s: rows `r0..r0 + R`
        // with `R ≤ m − r0`, and panel `p < n_panels` holding `n_keys − 16p` stored keys.
        unsafe {
            let n_panels = a.n_keys.div_ceil(KEY_PANEL);
            let mut r0 = 0;
            while r0 < a.m {
                let q = a.q.add(r0 * a.head_dim);
                for p in 0..n_panels {
                    let k = keys.add(p * a.head_dim * KEY_PANEL);
                    let out = a.out.add(r0 * a.ld + p * KEY_PANEL);
                    let n_cols = a.n_keys - p * KEY_PANEL;
                    match a.m - r0 {
                        1 => scores_tile_256::<E, 1>(a, q, k, out, n_cols),
                        2 => scores_tile_256::<E, 2>(a, q, k, out, n_cols),
                        3 => scores_tile_256::<E, 3>(a, q, k, out, n_cols),
                        _ => scores_tile_256::<E, 4>(a, q, k, out, n_cols),
                    }
                }
                r0 += 4;
            }
        }
    }

    /// Weighted sums of `R` rows over `C` ymm (8 columns each) of output.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `probs` must hold `R` rows at stride `a.ld`, and
    /// every value row and output row must have `8C` readable / writable columns from the
    /// tile's first column.
    #[inline(always)]
    unsafe fn sum_tile_256<E: Lanes, const R: usize, const C: usize>(
        a: &SumArgs,
        probs: *const f32,
        values: *const E,
        out: *mut f32,
    ) {
        // SAFETY: the caller guarantees AVX2, FMA and F16C and a tile inside the bounds
        // `check_weighted_sum` checked: `values` has `n_keys` rows of `head_dim` with `8C` columns
        // from this tile's first one, `probs` `R` rows at stride `ld` with `n_keys` entries, and
        // `out` `R` rows of `head_dim` with `8C` columns from the tile's first one.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for j in 0..a.n_keys {
                let row = values.add(j * a.head_dim);
                let mut v = [_mm256_setzero_ps(); C];
                for (c, vc) in v.iter_mut().enumerate() {
                    *vc = load8(row.add(c * 8));
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let pv = _mm256_set1_ps(*probs.add(r * a.ld + j));
                    for c in 0..C {
                        acc_r[c] = _mm256_fmadd_ps(pv, v[c], acc_r[c]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (c, &acc_rc) in acc_r.iter().enumerate() {
                    _mm256_storeu_ps(out.add(r * a.head_dim + c * 8), acc_rc);
                }
            }
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `a` must have passed `check_weighted_sum`,
    /// `values` must point at elements of type `E`, and `r0 + R ≤ a.m`.
    #[inline(always)]
    unsafe fn sum_rows_256<E: Lanes, const R: usize>(a: &SumArgs, values: *const E, r0: usize) {
        // SAFETY: the caller guarantees the ISA and `r0 + R ≤ m` of arguments that passed
        // `check_weighted_sum`; tiles cover whole 8-column vectors `c0..c0 + C ≤ n_vecs`, and the
        // scalar tail reads and writes columns `8·n_vecs..head_dim` of the same rows.
        unsafe {
            let n_vecs = a.head_dim / 8;
            let probs = a.probs.add(r0 * a.ld);
            let mut c0 = 0;
            while c0 < n_vecs {
                let v = values.add(c0 * 8);
                let out = a.out.add(r0 * a.head_dim + c0 * 8);
                if n_vecs - c0 >= 2 {
                    sum_tile_256::<E, R, 2>(a, probs, v, out);
                } else {
                    sum_tile_256::<E, R, 1>(a, probs, v, out);
                }
                c0 += 2;
            }
            // Columns past the last whole ymm: the scalar chain, in the same order.
            for r in 0..R {
                for col in n_vecs * 8..a.head_dim {
                    let mut acc = 0.0f32;
                    for j in 0..a.n_keys {
                        let v = load1(values.add(j * a.head_dim + col));
                        acc = (*probs.add(r * a.ld + j)).mul_add(v, acc);
                    }
                    *a.out.add((r0 + r) * a.head_dim + col) = acc;
                }
            }
        }
    }

    /// `weighted_sum` with AVX2: tiles of up to 4 rows × 16 output columns.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; the arguments must have passed
    /// `check_weighted_sum` and `values` must point at elements of type `E`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum_avx2<E: Lanes>(a: &SumArgs, values: *const E) {
        // SAFETY: AVX2, FMA and F16C are guaranteed by the caller (attention.rs checks
        // `cpu::isa()`), `a` passed `check_weighted_sum` and `values` points at `E`s; each arm's
        // `R ≤ m − r0`, as `sum_rows_256` requires.
        unsafe {
            let mut r0 = 0;
            while r0 < a.m {
                match a.m - r0 {
                    1 => sum_rows_256::<E, 1>(a, values, r0),
                    2 => sum_rows_256::<E, 2>(a, values, r0),
                    3 => sum_rows_256::<E, 3>(a, values, r0),
                    _ => sum_rows_256::<E, 4>(a, values, r0),
                }
                r0 += 4;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIMD against scalar, relative to Σ|terms| of each output: both are the same FMA chain
    /// in the same order, so in practice they agree exactly; the bound leaves room for a
    /// kernel that reorders the sum.
    const REL_TOL: f32 = 1e-5;

    /// Deterministic values in [-1, 1) (xorshift).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// A key cache of `n_ctx` positions holding `keys (n_ctx, head_dim)`.
    fn key_cache<T: KvElement>(keys: &[f32], head_dim: usize) -> Vec<T> {
        let n_ctx = keys.len() / head_dim;
        let mut cache = vec![T::default(); key_cache_len(n_ctx, head_dim)];
        for (pos, key) in keys.chunks(head_dim).enumerate() {
            store_key(&mut cache, head_dim, pos, key);
        }
        cache
    }

    fn simd_isas() -> Vec<Isa> {
        cpu::available_isas()
            .into_iter()
            .filter(|&isa| isa != Isa::Scalar)
            .collect()
    }

    fn scores_match<T: KvElement>() {
        for head_dim in [64, 40, 72, 8, 3] {
            let keys_f32 = values(70 * head_dim, head_dim as u64);
            let cache = key_cache::<T>(&keys_f32, head_dim);
            for m in 1..=7 {
                let q = values(m * head_dim, 100 + m as u64);
                for n_keys in 0..=70 {
                    let ld = n_keys + 3;
                    let len = m * ld;
                    let mut want = vec![f32::NAN; len];
                    scores_scalar(&q, head_dim, &cache, n_keys, 0.125, &mut want, ld);
                    for isa in simd_isas() {
                        let mut got = vec![f32::NAN; len];
                        scores_on(isa, &q, head_dim, &cache, n_keys, 0.125, &mut got, ld);
                        for i in 0..m {
                            for j in 0..ld {
                                let (g, w) = (got[i * ld + j], want[i * ld + j]);
                                if j >= n_keys {
                                    assert!(g.is_nan(), "{}: wrote past n_keys", isa.name());
                                    continue;
                                }
                                let l1: f32 = (0..head_dim)
                                    .map(|d| {
                                        let col = key_col(head_dim, j);
                                        (q[i * head_dim + d] * cache[col + d * KEY_PANEL].to_f32())
                                            .abs()
                                    })
                                    .sum();
                                assert!(
                                    (g - w).abs() <= REL_TOL * 0.125 * l1 + 1e-30,
                                    "{} {:?} hd {head_dim} m {m} n_keys {n_keys} [{i}][{j}]: {g} vs {w}",
                                    isa.name(),
                                    T::KIND
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn weighted_sums_match<T: KvElement>() {
        for head_dim in [64, 40, 72, 8, 3, 128] {
            let mut cache = vec![T::default(); 70 * head_dim];
            T::store_slice(&values(70 * head_dim, 7 + head_dim as u64), &mut cache);
            for m in 1..=7 {
                for n_keys in 0..=70 {
                    let ld = n_keys + 5;
                    let probs: Vec<f32> = values(m * ld, (m * 1000 + n_keys) as u64)
                        .iter()
                        .map(|p| p.abs())
                        .collect();
                    let mut want = vec![f32::NAN; m * head_dim];
                    weighted_sum_scalar(&probs, ld, &cache, head_dim, n_keys, &mut want);
                    for isa in simd_isas() {
                        let mut got = vec![f32::NAN; m * head_dim];
                        weighted_sum_on(isa, &probs, ld, &cache, head_dim, n_keys, &mut got);
                        for i in 0..m {
                            for c in 0..head_dim {
                                let l1: f32 = (0..n_keys)
                                    .map(|j| {
                                        (probs[i * ld + j] * cache[j * head_dim + c].to_f32()).abs()
                                    })
                                    .sum();
                                let (g, w) = (got[i * head_dim + c], want[i * head_dim + c]);
                                assert!(
                                    (g - w).abs() <= REL_TOL * l1 + 1e-30,
                                    "{} {:?} hd {head_dim} m {m} n_keys {n_keys} [{i}][{c}]: {g} vs {w}",
                                    isa.name(),
                                    T::KIND
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_scores_simd_match_scalar_f32() {
        scores_match::<f32>();
    }

    #[test]
    fn attention_scores_simd_match_scalar_f16() {
        scores_match::<f16>();
    }

    #[test]
    fn attention_weighted_sum_simd_match_scalar_f32() {
        weighted_sums_match::<f32>();
    }

    #[test]
    fn attention_weighted_sum_simd_match_scalar_f16() {
        weighted_sums_match::<f16>();
    }

    /// The scalar references against plain f64 attention arithmetic.
    #[test]
    fn attention_scalar_references_compute_dot_products() {
        let head_dim = 24;
        let keys = values(37 * head_dim, 3);
        let cache = key_cache::<f32>(&keys, head_dim);
        let q = values(2 * head_dim, 4);
        let mut out = vec![0.0; 2 * 37];
        scores_scalar(&q, head_dim, &cache, 37, 0.5, &mut out, 37);
        for i in 0..2 {
            for j in 0..37 {
                let want: f64 = (0..head_dim)
                    .map(|d| q[i * head_dim + d] as f64 * keys[j * head_dim + d] as f64)
                    .sum::<f64>()
                    * 0.5;
                assert!((out[i * 37 + j] as f64 - want).abs() < 1e-5, "[{i}][{j}]");
            }
        }
        let probs = values(2 * 37, 5);
        let mut sums = vec![0.0; 2 * head_dim];
        weighted_sum_scalar(&probs, 37, &keys, head_dim, 37, &mut sums);
        for i in 0..2 {
            for c in 0..head_dim {
                let want: f64 = (0..37)
                    .map(|j| probs[i * 37 + j] as f64 * keys[j * head_dim + c] as f64)
                    .sum();
                assert!(
                    (sums[i * head_dim + c] as f64 - want).abs() < 1e-5,
                    "[{i}][{c}]"
                );
            }
        }
    }

    #[test]
    fn attention_store_key_fills_panel_columns() {
        let head_dim = 5;
        let mut cache = vec![0.0f32; key_cache_len(20, head_dim)];
        assert_eq!(cache.len(), 2 * 16 * 5);
        let key = [1.0, 2.0, 3.0, 4.0, 5.0];
        store_key(&mut cache, head_dim, 17, &key);
        for (d, &k) in key.iter().enumerate() {
            assert_eq!(cache[16 * 5 + d * 16 + 1], k);
        }
        assert_eq!(cache.iter().filter(|&&v| v != 0.0).count(), 5);
    }
}
