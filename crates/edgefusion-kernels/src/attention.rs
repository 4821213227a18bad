//! Attention over a KV cache as two small GEMMs: query-key scores, then the
//! probability-weighted sum of values.
//!
//! Cache layouts, per layer and KV head:
//! - keys in panels of [`KEY_PANEL`] positions, `(n_panels, head_dim, KEY_PANEL)`: position `p`
//!   is column `p % 16` of panel `p / 16`. The d-th components of 16 consecutive keys are one
//!   vector load, so a decode score kernel broadcasts a query component and multiply-adds it
//!   into 8 scores at once; and the cache fills panel by panel (page by page) as positions grow.
//! - values row-major, `(n_ctx, head_dim)`: the weighted sum broadcasts one probability and
//!   multiply-adds it into a whole output row.
//!
//! Each kernel has a scalar reference (`*_scalar`), AVX-512 and AVX2 (+FMA, F16C) versions
//! chosen at run time through [`cpu::isa`], and an `_on(isa, ..)` twin. Each output adds its
//! products in a [`SumOrder`] (llama.cpp's for the step), the same in every version, so the
//! SIMD kernels reproduce the scalar reference bit for bit. AVX2's prompt kernels (the 8-lane
//! order) turn key panels into key rows and value rows into columns and run register tiles
//! of query rows × keys (or output components), tinyBLAS's layout; on aarch64 the scalar
//! reference runs.

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
    /// `dst[i] = src[i]` as f32 (exact).
    ///
    /// # Panics
    /// If the lengths differ.
    fn load_slice(src: &[Self], dst: &mut [f32]);
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
    fn load_slice(src: &[f32], dst: &mut [f32]) {
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
    fn load_slice(src: &[f16], dst: &mut [f32]) {
        f32ops::f16_to_f32(src, dst);
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

/// The order in which a score or a weighted sum adds its products. llama.cpp's CPU backend
/// runs one of two kernels for the products with the f16/f32 cache, and the attention kernels
/// here add in the same order as the one it would run for the same step, so that results
/// agree to the last bit (a last-bit difference flips near-tie greedy tokens downstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumOrder {
    /// llamafile's tinyBLAS, which llama.cpp runs when a step has two or more query rows:
    /// product `i` goes to lane `i % 8`, each lane one chain of fused multiply-adds in order,
    /// and the lanes are added as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`. Needs a
    /// length that is a multiple of 8 (tinyBLAS declines others; [`SumOrder::for_step`]).
    Lanes8,
    /// `ggml_vec_dot_f16`, which llama.cpp runs for a step of one query row: product `i` goes
    /// to partial sum `i % 32` (four 8-lane accumulators), the accumulators are added as
    /// `(a0 + a2) + (a1 + a3)`, its 8 lanes as `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 +
    /// l7))`; for a score, products past the last whole 32 (a head_dim that is not a multiple
    /// of 32) are added one by one in f64, as its f16 dot does. A weighted sum runs over
    /// llama.cpp's key rows padded to a multiple of 256 with probability 0, so keys are never
    /// left over there: key `j` always goes to partial sum `j % 32` (and to lane `j % 8` in
    /// [`SumOrder::Lanes8`]).
    Lanes32,
    /// One chain of fused multiply-adds in element order: the plainest reference, which no
    /// step of the runtime uses (one chain is bound by the latency of its adds).
    Chain,
}

impl SumOrder {
    /// The order for a step of `n_rows` query rows (tokens) with heads of `head_dim`:
    /// llama.cpp's AVX2 build's, except that AVX-512 machines take the 8-lane order for one
    /// row too. llama.cpp's AVX-512 build runs 16-lane versions of the two kernels, which are
    /// not reproduced (its other AVX-512 sums are not either), so AVX-512 machines run the
    /// AVX2 kernels, in one order for every step size: a token's attention is then the same
    /// to the bit whether it is prefilled among others or fed alone (as a server re-feeds a
    /// cached prompt's last token), and a seeded request repeats its text.
    pub fn for_step(isa: Isa, n_rows: usize, head_dim: usize) -> SumOrder {
        if (n_rows >= 2 || isa.has_avx512()) && head_dim.is_multiple_of(8) {
            SumOrder::Lanes8
        } else {
            SumOrder::Lanes32
        }
    }
}

/// A value row a weighted sum's key does not have ([`ValueRows::Listed`]).
pub const NO_ROW: usize = usize::MAX;

/// Which rows of a value cache a weighted sum's keys `0..n_keys` are. Key `j`'s partial sum
/// (lane) is chosen by `j` in every [`SumOrder`], so the listing decides the lanes.
#[derive(Debug, Clone, Copy)]
pub enum ValueRows<'a> {
    /// Keys `0..n` are rows `0..n`.
    Leading(usize),
    /// Key `j` is row `rows[j]`, or no key where that is [`NO_ROW`] (its probability must be
    /// 0). Window layers list their ring slots in position order, so that each key takes the
    /// lane its position takes in llama.cpp's cache, whose slot is the position.
    Listed(&'a [usize]),
}

impl ValueRows<'_> {
    /// Keys of the sum.
    pub fn n_keys(&self) -> usize {
        match *self {
            ValueRows::Leading(n) => n,
            ValueRows::Listed(rows) => rows.len(),
        }
    }

    /// Rows the value cache must hold.
    fn rows_needed(&self) -> usize {
        match *self {
            ValueRows::Leading(n) => n,
            ValueRows::Listed(rows) => rows
                .iter()
                .filter(|&&r| r != NO_ROW)
                .max()
                .map_or(0, |&r| r + 1),
        }
    }
}

/// Partial sums `lane(0..LANES)` added in the order of `LANES`: 1 (a chain), 8
/// ([`SumOrder::Lanes8`]: `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`) or 32
/// ([`SumOrder::Lanes32`]).
#[inline(always)]
fn add_lanes<const LANES: usize>(lane: impl Fn(usize) -> f32) -> f32 {
    match LANES {
        1 => lane(0),
        8 => {
            ((lane(0) + lane(4)) + (lane(2) + lane(6)))
                + ((lane(1) + lane(5)) + (lane(3) + lane(7)))
        }
        _ => {
            // Accumulators 0 + 2 and 1 + 3 (8 lanes each), then together, then the lanes.
            let y = |r: usize| (lane(r) + lane(16 + r)) + (lane(8 + r) + lane(24 + r));
            let t = |r: usize| y(r) + y(r + 4);
            (t(0) + t(1)) + (t(2) + t(3))
        }
    }
}

/// `out[i * ld + j] = scale · (q_i · key_j)` for query rows `q (m, head_dim)` and keys
/// `j < n_keys` of one head's key cache `(n_panels, head_dim, KEY_PANEL)`, each dot product
/// added in `order`. Columns `n_keys..ld` of `out` are left alone.
///
/// # Panics
/// If `head_dim` is 0 or does not divide `q.len()`, `ld < n_keys`, `out` is shorter than
/// `(m - 1) · ld + n_keys`, `keys` holds fewer than `ceil(n_keys / 16)` whole panels, or the
/// order is [`SumOrder::Lanes8`] and `head_dim` is not a multiple of 8.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn scores<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
    order: SumOrder,
) {
    scores_impl(cpu::isa(), q, head_dim, keys, n_keys, scale, out, ld, order)
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
    order: SumOrder,
) {
    assert!(
        cpu::is_runnable(isa),
        "scores_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    scores_impl(isa, q, head_dim, keys, n_keys, scale, out, ld, order)
}

/// Scalar reference of [`scores`]: the body the SIMD builds compile with their features (AVX2's
/// 8- and 32-lane orders have their own intrinsic kernels, equal to it bit for bit).
#[allow(clippy::too_many_arguments)]
pub fn scores_scalar<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
    order: SumOrder,
) {
    let m = check_scores(q, head_dim, keys, n_keys, out, ld, order);
    scores_in_order(order, q, head_dim, keys, n_keys, scale, out, ld, m)
}

/// `out[i] = Σ_{j < n_keys} probs[i * ld + j] · value_j` for rows `out (m, head_dim)` and one
/// head's value cache `values (n_ctx, head_dim)`, where key `j` is the value row `rows` says,
/// each sum over keys added in `order`.
///
/// # Panics
/// If `head_dim` is 0 or does not divide `out.len()`, `ld < n_keys`, `probs` is shorter than
/// `(m - 1) · ld + n_keys`, or `values` lacks a row that `rows` names.
#[inline]
pub fn weighted_sum<T: KvElement>(
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    out: &mut [f32],
    order: SumOrder,
) {
    weighted_sum_impl(cpu::isa(), probs, ld, values, head_dim, rows, out, order)
}

/// [`weighted_sum`] with the kernel of `isa`.
///
/// # Panics
/// As [`weighted_sum`], or if `isa` cannot run on this machine.
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum_on<T: KvElement>(
    isa: Isa,
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    out: &mut [f32],
    order: SumOrder,
) {
    assert!(
        cpu::is_runnable(isa),
        "weighted_sum_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    weighted_sum_impl(isa, probs, ld, values, head_dim, rows, out, order)
}

/// Scalar reference of [`weighted_sum`]: the body the SIMD builds compile with their features
/// (AVX2's 8-lane order has its own intrinsic kernel, equal to it bit for bit).
pub fn weighted_sum_scalar<T: KvElement>(
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    out: &mut [f32],
    order: SumOrder,
) {
    let m = check_weighted_sum(probs, ld, values, head_dim, rows, out);
    weighted_sum_in_order(order, probs, ld, values, head_dim, rows, out, m)
}

/// Validates a `scores` call; returns the number of query rows.
fn check_scores<T>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    out: &[f32],
    ld: usize,
    order: SumOrder,
) -> usize {
    assert!(head_dim > 0, "scores: head_dim is 0");
    assert!(
        order != SumOrder::Lanes8 || head_dim.is_multiple_of(8),
        "scores: 8-lane order needs a head_dim that is a multiple of 8, got {head_dim}"
    );
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
    rows: ValueRows<'_>,
    out: &[f32],
) -> usize {
    let n_keys = rows.n_keys();
    assert!(head_dim > 0, "weighted_sum: head_dim is 0");
    assert!(
        out.len().is_multiple_of(head_dim),
        "weighted_sum: {} output floats are not whole rows of {head_dim}",
        out.len()
    );
    let m = out.len() / head_dim;
    assert!(ld >= n_keys, "weighted_sum: ld {ld} < n_keys {n_keys}");
    let n_rows = rows.rows_needed();
    assert!(
        values.len() >= n_rows * head_dim,
        "weighted_sum: {n_rows} value rows of {head_dim} need {} elements, got {}",
        n_rows * head_dim,
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

thread_local! {
    /// Scratch of the attention kernels, reused across calls: a key panel or the value rows
    /// as f32, and the partial sums of the weighted sum (AVX2's 8-lane kernels: the turned
    /// key panel, or the value columns and padded probabilities).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Keys per step of the panel-walking score kernels ([`KeyStep`]): half a panel, so that 8
/// lanes of 8 keys stay in registers.
const KEY_STEP: usize = 8;

/// The dot products of one query row with [`KEY_STEP`] keys of a key panel, in some order.
/// Implementations are `#[inline(always)]` so that they compile with the features of the
/// `#[target_feature]` kernel that walks them.
trait KeyStep {
    /// Unscaled `q_row · key_{k0 + k}` for `k < KEY_STEP`, keys from `panel`
    /// `(head_dim, KEY_PANEL)` in f32.
    ///
    /// # Safety
    /// The ISA of the implementation must be available; `k0 + KEY_STEP ≤ KEY_PANEL` and
    /// `panel` holds `q_row.len()` rows of [`KEY_PANEL`].
    unsafe fn sums(&self, q_row: &[f32], panel: &[f32], k0: usize) -> [f32; KEY_STEP];
}

/// [`KeyStep`] in the order of `LANES` (1, 8 or 32), in plain loops over arrays that the
/// compiler vectorizes across keys; `mul_add` throughout, so every ISA's build rounds
/// identically.
struct LaneSums<const LANES: usize>;

impl<const LANES: usize> KeyStep for LaneSums<LANES> {
    #[inline(always)]
    unsafe fn sums(&self, q_row: &[f32], panel: &[f32], k0: usize) -> [f32; KEY_STEP] {
        let head_dim = q_row.len();
        let whole = head_dim - head_dim % LANES;
        // lanes[r][k]: partial sum r of key k0 + k.
        let mut lanes = [[0.0f32; KEY_STEP]; LANES];
        for d0 in (0..whole).step_by(LANES) {
            for (r, lane) in lanes.iter_mut().enumerate() {
                let qd = q_row[d0 + r];
                let col = &panel[(d0 + r) * KEY_PANEL + k0..][..KEY_STEP];
                for (a, &kv) in lane.iter_mut().zip(col) {
                    *a = qd.mul_add(kv, *a);
                }
            }
        }
        let mut sums = [0.0f32; KEY_STEP];
        for (k, s) in sums.iter_mut().enumerate() {
            *s = add_lanes::<LANES>(|r| lanes[r][k]);
        }
        add_tail_wide(&mut sums, q_row, panel, k0, whole);
        sums
    }
}

/// Adds the products of dimensions `whole..` (past the last whole group of lanes) to each
/// key's sum one by one in f64, as `ggml_vec_dot_f16` adds its leftovers.
#[inline(always)]
fn add_tail_wide(
    sums: &mut [f32; KEY_STEP],
    q_row: &[f32],
    panel: &[f32],
    k0: usize,
    whole: usize,
) {
    if whole == q_row.len() {
        return;
    }
    for (k, s) in sums.iter_mut().enumerate() {
        let mut wide = *s as f64;
        for (d, &qd) in q_row.iter().enumerate().skip(whole) {
            wide += (qd * panel[d * KEY_PANEL + k0 + k]) as f64;
        }
        *s = wide as f32;
    }
}

/// Walks the scores of [`scores`] 8 keys at a time: each key panel converted to f32 once,
/// then for every query row and every step of [`KEY_STEP`] keys, `step` gives the unscaled
/// dot products (those of keys past `n_keys` are dropped), which are scaled and stored.
///
/// # Safety
/// The ISA of `step` must be available.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scores_by_key_step<T: KvElement>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
    m: usize,
    step: impl KeyStep,
) {
    let panel_len = KEY_PANEL * head_dim;
    let mut scratch = SCRATCH.take();
    let panel_f32 = &mut scratch.0;
    panel_f32.resize(panel_len, 0.0);
    for (p, panel) in keys[..n_keys.div_ceil(KEY_PANEL) * panel_len]
        .chunks_exact(panel_len)
        .enumerate()
    {
        T::load_slice(panel, panel_f32);
        let j0 = p * KEY_PANEL;
        let n_here = (n_keys - j0).min(KEY_PANEL);
        for (i, q_row) in q.chunks_exact(head_dim).enumerate().take(m) {
            for k0 in (0..n_here).step_by(KEY_STEP) {
                // SAFETY: the caller guarantees `step`'s ISA; `k0 + 8 ≤ 16` and the panel
                // holds `head_dim` rows of 16.
                let sums = unsafe { step.sums(q_row, panel_f32, k0) };
                let n = (n_here - k0).min(KEY_STEP);
                for (o, &s) in out[i * ld + j0 + k0..][..n].iter_mut().zip(&sums) {
                    *o = s * scale;
                }
            }
        }
    }
    SCRATCH.set(scratch);
}

/// The scores of [`scores`] in the order of `LANES` (1, 8 or 32): [`LaneSums`] walked by
/// [`scores_by_key_step`]; compiled once as is (the scalar reference) and once per ISA in
/// `#[target_feature]` wrappers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores_body<T: KvElement, const LANES: usize>(
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
    m: usize,
) {
    // SAFETY: `LaneSums` is plain Rust and runs on any ISA.
    unsafe {
        scores_by_key_step(
            q,
            head_dim,
            keys,
            n_keys,
            scale,
            out,
            ld,
            m,
            LaneSums::<LANES>,
        )
    }
}

/// The sums of [`weighted_sum`] in the order of `LANES` (8 or 32), written and compiled as
/// [`scores_body`] is. Zero probabilities (masked keys) are skipped: adding their zero
/// products would not change any partial sum.
#[inline(always)]
fn weighted_sum_body<T: KvElement, const LANES: usize>(
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    out: &mut [f32],
    m: usize,
) {
    let n_keys = rows.n_keys();
    let mut scratch = SCRATCH.take();
    let (values_f32, partials) = (&mut scratch.0, &mut scratch.1);
    load_value_rows(values, head_dim, rows, values_f32, n_keys);
    // partials[r * head_dim + c]: partial sum r of output component c.
    partials.resize(LANES * head_dim, 0.0);
    for (i, out_row) in out.chunks_exact_mut(head_dim).enumerate().take(m) {
        partials.fill(0.0);
        let p_row = &probs[i * ld..i * ld + n_keys];
        for (j, (&p, value)) in p_row
            .iter()
            .zip(values_f32.chunks_exact(head_dim))
            .enumerate()
        {
            if p == 0.0 {
                continue;
            }
            let part = &mut partials[(j % LANES) * head_dim..][..head_dim];
            for (a, &v) in part.iter_mut().zip(value) {
                *a = p.mul_add(v, *a);
            }
        }
        for (c, o) in out_row.iter_mut().enumerate() {
            *o = add_lanes::<LANES>(|r| partials[r * head_dim + c]);
        }
    }
    SCRATCH.set(scratch);
}

/// [`scores_body`] for `order` (chain: one lane).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores_in_order<T: KvElement>(
    order: SumOrder,
    q: &[f32],
    head_dim: usize,
    keys: &[T],
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    ld: usize,
    m: usize,
) {
    match order {
        SumOrder::Lanes8 => scores_body::<T, 8>(q, head_dim, keys, n_keys, scale, out, ld, m),
        SumOrder::Lanes32 => scores_body::<T, 32>(q, head_dim, keys, n_keys, scale, out, ld, m),
        SumOrder::Chain => scores_body::<T, 1>(q, head_dim, keys, n_keys, scale, out, ld, m),
    }
}

/// The value rows of keys `0..n_keys` of `rows` as f32 `(n_rows, head_dim)`, zero for
/// [`NO_ROW`] and for keys `n_keys..n_rows` (padding up to `n_rows ≥ n_keys`).
fn load_value_rows<T: KvElement>(
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    dst: &mut Vec<f32>,
    n_rows: usize,
) {
    let n_keys = rows.n_keys();
    dst.resize(n_rows * head_dim, 0.0);
    match rows {
        ValueRows::Leading(n) => T::load_slice(&values[..n * head_dim], &mut dst[..n * head_dim]),
        ValueRows::Listed(rows) => {
            for (&r, dst) in rows.iter().zip(dst.chunks_exact_mut(head_dim)) {
                if r == NO_ROW {
                    dst.fill(0.0);
                } else {
                    T::load_slice(&values[r * head_dim..(r + 1) * head_dim], dst);
                }
            }
        }
    }
    dst[n_keys * head_dim..].fill(0.0);
}

/// [`weighted_sum_body`] for `order` (chain: one lane).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn weighted_sum_in_order<T: KvElement>(
    order: SumOrder,
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    out: &mut [f32],
    m: usize,
) {
    match order {
        SumOrder::Lanes8 => weighted_sum_body::<T, 8>(probs, ld, values, head_dim, rows, out, m),
        SumOrder::Lanes32 => weighted_sum_body::<T, 32>(probs, ld, values, head_dim, rows, out, m),
        SumOrder::Chain => weighted_sum_body::<T, 1>(probs, ld, values, head_dim, rows, out, m),
    }
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
    order: SumOrder,
) {
    let m = check_scores(q, head_dim, keys, n_keys, out, ld, order);
    // The AVX2 tiles of the 8- and 32-lane orders serve the AVX-512 ISAs as well (AVX-512
    // implies AVX2, FMA and F16C here).
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable and has AVX2; the shapes passed
        // `check_scores`, which for the 8-lane order includes a head_dim that is a multiple
        // of 8.
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni if order == SumOrder::Lanes8 => unsafe {
            x86::scores_lanes8_avx2(q, head_dim, keys, n_keys, scale, out, ld, m)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni if order == SumOrder::Lanes32 => unsafe {
            x86::scores_lanes32_avx2(q, head_dim, keys, n_keys, scale, out, ld, m)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` (AVX-512 F/BW/VL, with AVX2, FMA and F16C) was detected or checked
        // runnable; the shapes passed `check_scores`.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            x86::scores_avx512(q, head_dim, keys, n_keys, scale, out, ld, order, m)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe {
            x86::scores_avx2(q, head_dim, keys, n_keys, scale, out, ld, order, m)
        },
        _ => scores_in_order(order, q, head_dim, keys, n_keys, scale, out, ld, m),
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn weighted_sum_impl<T: KvElement>(
    isa: Isa,
    probs: &[f32],
    ld: usize,
    values: &[T],
    head_dim: usize,
    rows: ValueRows<'_>,
    out: &mut [f32],
    order: SumOrder,
) {
    let m = check_weighted_sum(probs, ld, values, head_dim, rows, out);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni
            if order == SumOrder::Lanes8 && head_dim.is_multiple_of(8) =>
        {
            // SAFETY: `isa` was detected or checked runnable and has AVX2 (as do the AVX-512
            // ISAs); the tiled kernel takes whole 8-wide blocks of components, so it runs
            // only for a head_dim that is a multiple of 8 (the only one the runtime gives the
            // 8-lane order; others take the generic body, the same sums).
            unsafe { x86::weighted_sum_lanes8_avx2(probs, ld, values, head_dim, rows, out, m) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            x86::weighted_sum_avx512(probs, ld, values, head_dim, rows, out, order, m)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe {
            x86::weighted_sum_avx2(probs, ld, values, head_dim, rows, out, order, m)
        },
        _ => weighted_sum_in_order(order, probs, ld, values, head_dim, rows, out, m),
    }
}

/// The bodies compiled for AVX-512 and AVX2 (the compiler vectorizes their loops there).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KvElement, SumOrder, KEY_PANEL, KEY_STEP};
    use crate::x86::avx2::hsum_ps;
    use std::arch::x86_64::*;

    macro_rules! compiled_for {
        ($scores:ident, $sum:ident, $features:literal) => {
            /// # Safety
            /// The features named in `target_feature` must be available; the shapes must
            /// have passed `check_scores`.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $scores<T: KvElement>(
                q: &[f32],
                head_dim: usize,
                keys: &[T],
                n_keys: usize,
                scale: f32,
                out: &mut [f32],
                ld: usize,
                order: SumOrder,
                m: usize,
            ) {
                super::scores_in_order(order, q, head_dim, keys, n_keys, scale, out, ld, m)
            }

            /// # Safety
            /// The features named in `target_feature` must be available; the shapes must
            /// have passed `check_weighted_sum`.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $sum<T: KvElement>(
                probs: &[f32],
                ld: usize,
                values: &[T],
                head_dim: usize,
                rows: super::ValueRows<'_>,
                out: &mut [f32],
                order: SumOrder,
                m: usize,
            ) {
                super::weighted_sum_in_order(order, probs, ld, values, head_dim, rows, out, m)
            }
        };
    }

    compiled_for!(
        scores_avx512,
        weighted_sum_avx512,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
    );
    compiled_for!(scores_avx2, weighted_sum_avx2, "avx2,fma,f16c");

    /// [`SumOrder::Lanes32`] scores with AVX2 registers ([`Lanes32Avx2`]), equal to
    /// [`super::scores_scalar`] in that order bit for bit.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; the shapes must have passed `check_scores`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_lanes32_avx2<T: KvElement>(
        q: &[f32],
        head_dim: usize,
        keys: &[T],
        n_keys: usize,
        scale: f32,
        out: &mut [f32],
        ld: usize,
        m: usize,
    ) {
        // SAFETY: AVX2, FMA and F16C are available (this fn's contract), `Lanes32Avx2`'s ISA.
        unsafe {
            super::scores_by_key_step(q, head_dim, keys, n_keys, scale, out, ld, m, Lanes32Avx2)
        }
    }

    /// [`super::KeyStep`] in the 32-lane order (`ggml_vec_dot_f16`, one query row) with AVX2
    /// registers. The 32 lanes of 8 keys do not fit in 16 registers, so they are summed in
    /// four passes over the panel, pass `p` holding the 8 lanes that
    /// [`super::add_lanes`] folds into its `t(p) = y(p) + y(p + 4)`: lanes `p`, `p + 16`,
    /// `p + 8`, `p + 24` and the same from `p + 4`. Each lane is one chain of fused
    /// multiply-adds in dimension order and the folds are `add_lanes`'s, per key, so the
    /// results equal [`super::LaneSums`]`<32>` bit for bit.
    struct Lanes32Avx2;

    impl super::KeyStep for Lanes32Avx2 {
        #[inline(always)]
        unsafe fn sums(&self, q_row: &[f32], panel: &[f32], k0: usize) -> [f32; KEY_STEP] {
            let head_dim = q_row.len();
            let whole = head_dim - head_dim % 32;
            let mut sums = [0.0f32; KEY_STEP];
            // SAFETY: the caller guarantees AVX2 and FMA, `k0 + 8 ≤ 16`, and a panel of
            // `head_dim` rows of 16: dimension `d0 + r < whole` reads `q_row[d0 + r]` and
            // the 8 floats at `(d0 + r) · 16 + k0` of the panel.
            unsafe {
                let qp = q_row.as_ptr();
                let kp = panel.as_ptr().add(k0);
                let mut t = [_mm256_setzero_ps(); 4];
                for (p, t_p) in t.iter_mut().enumerate() {
                    let lanes = [p, p + 16, p + 8, p + 24, p + 4, p + 20, p + 12, p + 28];
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for d0 in (0..whole).step_by(32) {
                        for (a, &r) in acc.iter_mut().zip(&lanes) {
                            let qd = _mm256_set1_ps(*qp.add(d0 + r));
                            let kv = _mm256_loadu_ps(kp.add((d0 + r) * KEY_PANEL));
                            *a = _mm256_fmadd_ps(qd, kv, *a);
                        }
                    }
                    // y(p) = (l_p + l_{16+p}) + (l_{8+p} + l_{24+p}), likewise y(p + 4).
                    let y_p =
                        _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                    let y_p4 =
                        _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7]));
                    *t_p = _mm256_add_ps(y_p, y_p4);
                }
                let s = _mm256_add_ps(_mm256_add_ps(t[0], t[1]), _mm256_add_ps(t[2], t[3]));
                _mm256_storeu_ps(sums.as_mut_ptr(), s);
            }
            super::add_tail_wide(&mut sums, q_row, panel, k0, whole);
            sums
        }
    }

    /// [`SumOrder::Lanes8`] scores (two or more query rows, llamafile's tinyBLAS) with AVX2
    /// registers in tinyBLAS's own layout: each key panel is turned to key rows
    /// `(KEY_PANEL, head_dim)` in f32, and a tile of 4 query rows × 2 keys keeps one register
    /// per (row, key) whose lane `r` adds dimensions `d ≡ r (mod 8)` in order, one fused
    /// multiply-add each; each register is then added across as [`super::add_lanes`] adds 8
    /// lanes. Per score these are [`super::LaneSums`]`<8>`'s operations, so the results are
    /// equal bit for bit, while each loaded key and query vector serves several products.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; the shapes must have passed `check_scores` with
    /// [`SumOrder::Lanes8`] (`head_dim` a multiple of 8).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores_lanes8_avx2<T: KvElement>(
        q: &[f32],
        head_dim: usize,
        keys: &[T],
        n_keys: usize,
        scale: f32,
        out: &mut [f32],
        ld: usize,
        m: usize,
    ) {
        let panel_len = KEY_PANEL * head_dim;
        let mut scratch = super::SCRATCH.take();
        let (panel_f32, key_rows) = (&mut scratch.0, &mut scratch.1);
        panel_f32.resize(panel_len, 0.0);
        key_rows.resize(panel_len, 0.0);
        for (p, panel) in keys[..n_keys.div_ceil(KEY_PANEL) * panel_len]
            .chunks_exact(panel_len)
            .enumerate()
        {
            T::load_slice(panel, panel_f32);
            // SAFETY: AVX is available (this fn's contract); both hold a panel of
            // `head_dim` (a multiple of 8) × `KEY_PANEL` floats.
            unsafe { transpose(panel_f32, head_dim, KEY_PANEL, key_rows) };
            let cols = p * KEY_PANEL..(p * KEY_PANEL + KEY_PANEL).min(n_keys);
            let mut i = 0;
            // SAFETY: AVX2 and FMA are available (this fn's contract); `key_rows` holds a
            // whole panel of rows, rows `i..i + RM ≤ m` of `q` exist, `head_dim` is a multiple
            // of 8 and `cols` lies inside the panel and inside `out`'s rows (checked shapes).
            unsafe {
                while i + 4 <= m {
                    score_tile::<4>(q, head_dim, key_rows, i, cols.clone(), scale, out, ld);
                    i += 4;
                }
                while i < m {
                    score_tile::<1>(q, head_dim, key_rows, i, cols.clone(), scale, out, ld);
                    i += 1;
                }
            }
        }
        super::SCRATCH.set(scratch);
    }

    /// `dst[c · n_rows + r] = src[r · n_cols + c]`: a matrix `(n_rows, n_cols)` as
    /// `(n_cols, n_rows)`, in 8 × 8 blocks.
    ///
    /// # Safety
    /// AVX must be available; `n_rows` and `n_cols` are multiples of 8 and both slices hold
    /// `n_rows · n_cols` floats.
    #[inline(always)]
    unsafe fn transpose(src: &[f32], n_rows: usize, n_cols: usize, dst: &mut [f32]) {
        debug_assert!(src.len() >= n_rows * n_cols && dst.len() >= n_rows * n_cols);
        // SAFETY: the caller's contract: block (r0, c0) reads rows `r0..r0 + 8 ≤ n_rows` of
        // `src` at columns `c0..c0 + 8 ≤ n_cols` and writes rows `c0..c0 + 8` of `dst` at
        // columns `r0..r0 + 8`.
        unsafe {
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            for r0 in (0..n_rows).step_by(8) {
                for c0 in (0..n_cols).step_by(8) {
                    let mut r = [_mm256_setzero_ps(); 8];
                    for (j, row) in r.iter_mut().enumerate() {
                        *row = _mm256_loadu_ps(s.add((r0 + j) * n_cols + c0));
                    }
                    for (c, col) in transpose8(r).into_iter().enumerate() {
                        _mm256_storeu_ps(d.add((c0 + c) * n_rows + r0), col);
                    }
                }
            }
        }
    }

    /// Columns of an 8 × 8 block of lanes as rows: `out[i]` lane `j` is `r[j]` lane `i`.
    ///
    /// # Safety
    /// AVX must be available.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: the caller guarantees AVX; registers only.
        unsafe {
            // Pairs, then quads, then halves: the standard 8 × 8 transpose.
            let t = [
                _mm256_unpacklo_ps(r[0], r[1]),
                _mm256_unpackhi_ps(r[0], r[1]),
                _mm256_unpacklo_ps(r[2], r[3]),
                _mm256_unpackhi_ps(r[2], r[3]),
                _mm256_unpacklo_ps(r[4], r[5]),
                _mm256_unpackhi_ps(r[4], r[5]),
                _mm256_unpacklo_ps(r[6], r[7]),
                _mm256_unpackhi_ps(r[6], r[7]),
            ];
            let u = [
                _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
            ];
            [
                _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
                _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
                _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
                _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
                _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
                _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
                _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
                _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
            ]
        }
    }

    /// [`SumOrder::Lanes8`] weighted sums (several query rows) with AVX2 in tinyBLAS's
    /// layout, where llama.cpp's value cache is stored transposed: the value rows become
    /// columns `(head_dim, n_pad)` in f32 (keys padded with zeros to a multiple of 8), the
    /// probability rows are padded likewise, and a tile of 4 query rows × 2 output components
    /// keeps one register per (row, component) whose lane `r` adds keys `j ≡ r (mod 8)` in
    /// order, one fused multiply-add each; each register is then added across as
    /// [`super::add_lanes`] adds 8 lanes. These are [`super::weighted_sum_body`]'s operations
    /// per output: the products it skips have probability 0, and adding such a product
    /// (±0 for finite cache values) leaves a sum that starts at +0 unchanged. Two edge cases
    /// differ, as llama.cpp's tinyBLAS (which skips nothing) differs from the skipping order:
    /// an f32 cache whose products underflow to −0 can end at +0 where the body keeps −0, and
    /// a non-finite cache value under probability 0 gives NaN.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; the shapes must have passed
    /// `check_weighted_sum` and `head_dim` is a multiple of 8 (the 8-lane order's).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weighted_sum_lanes8_avx2<T: KvElement>(
        probs: &[f32],
        ld: usize,
        values: &[T],
        head_dim: usize,
        rows: super::ValueRows<'_>,
        out: &mut [f32],
        m: usize,
    ) {
        let n_keys = rows.n_keys();
        if n_keys == 0 {
            out[..m * head_dim].fill(0.0);
            return;
        }
        let n_pad = n_keys.next_multiple_of(8);
        let mut scratch = super::SCRATCH.take();
        let (value_rows, columns) = (&mut scratch.0, &mut scratch.1);
        super::load_value_rows(values, head_dim, rows, value_rows, n_pad);
        // columns[c * n_pad + j] = value_rows[j * head_dim + c], then the padded
        // probabilities `(m, n_pad)` after them.
        columns.resize(head_dim * n_pad + m * n_pad, 0.0);
        let (columns, probs_pad) = columns.split_at_mut(head_dim * n_pad);
        for (i, row) in probs_pad.chunks_exact_mut(n_pad).enumerate() {
            row[..n_keys].copy_from_slice(&probs[i * ld..i * ld + n_keys]);
            row[n_keys..].fill(0.0);
        }
        // SAFETY: AVX2 and FMA are available (this fn's contract); `value_rows` holds
        // `(n_pad, head_dim)` and `columns` `(head_dim, n_pad)`, both multiples of 8; tiles
        // read padded rows `i..i + RM ≤ m` and columns `c, c + 1 < head_dim` over `n_pad`
        // keys and write `out` rows `< m`.
        unsafe {
            transpose(value_rows, n_pad, head_dim, columns);
            let mut i = 0;
            while i + 4 <= m {
                sum_tile::<4>(probs_pad, columns, n_pad, head_dim, i, out);
                i += 4;
            }
            while i < m {
                sum_tile::<1>(probs_pad, columns, n_pad, head_dim, i, out);
                i += 1;
            }
        }
        super::SCRATCH.set(scratch);
    }

    /// Weighted sums of rows `i0..i0 + RM` (see [`weighted_sum_lanes8_avx2`]), two output
    /// components at a time.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `probs` holds rows `..i0 + RM` of `n_pad` (a multiple
    /// of 8), `columns` `head_dim` (even) rows of `n_pad`, and `out` rows `..i0 + RM` of
    /// `head_dim`.
    #[inline(always)]
    unsafe fn sum_tile<const RM: usize>(
        probs: &[f32],
        columns: &[f32],
        n_pad: usize,
        head_dim: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract: rows `i0..i0 + RM` of `probs` and columns `c, c + 1`
        // hold `n_pad` floats each.
        unsafe {
            let pp = probs.as_ptr().add(i0 * n_pad);
            for c in (0..head_dim).step_by(2) {
                let v0 = columns.as_ptr().add(c * n_pad);
                let sums = dot_tile::<RM>(pp, n_pad, v0, v0.add(n_pad), n_pad);
                for (i, sums_i) in sums.iter().enumerate() {
                    out[(i0 + i) * head_dim + c..][..2].copy_from_slice(sums_i);
                }
            }
        }
    }

    /// Dot products of `RM` rows `a + i · lda` with the two rows `b0`, `b1`, each `len` long
    /// (a multiple of 8), in the 8-lane order: lane `r` adds elements `≡ r (mod 8)` in order,
    /// one fused multiply-add each, then [`hsum_ps`] (the lanes added as
    /// [`super::add_lanes`] adds 8).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; each row is readable for `len` floats.
    #[inline(always)]
    unsafe fn dot_tile<const RM: usize>(
        a: *const f32,
        lda: usize,
        b0: *const f32,
        b1: *const f32,
        len: usize,
    ) -> [[f32; 2]; RM] {
        // SAFETY: the caller's contract; every load reads 8 floats at `j + 8 ≤ len`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; RM];
            for j in (0..len).step_by(8) {
                let v0 = _mm256_loadu_ps(b0.add(j));
                let v1 = _mm256_loadu_ps(b1.add(j));
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(a.add(i * lda + j));
                    acc_i[0] = _mm256_fmadd_ps(x, v0, acc_i[0]);
                    acc_i[1] = _mm256_fmadd_ps(x, v1, acc_i[1]);
                }
            }
            let mut sums = [[0.0f32; 2]; RM];
            for (s, acc_i) in sums.iter_mut().zip(&acc) {
                *s = [hsum_ps(acc_i[0]), hsum_ps(acc_i[1])];
            }
            sums
        }
    }

    /// Scores of query rows `i0..i0 + RM` with the keys `cols` of one panel, two keys at a
    /// time (see [`scores_lanes8_avx2`]).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `key_rows` holds `KEY_PANEL` rows of `head_dim` (a
    /// multiple of 8), `q` rows `..i0 + RM`, `cols` a range of at most `KEY_PANEL` columns
    /// starting at a panel boundary, and `out` rows `..i0 + RM` of stride `ld` up to
    /// `cols.end`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_tile<const RM: usize>(
        q: &[f32],
        head_dim: usize,
        key_rows: &[f32],
        i0: usize,
        cols: std::ops::Range<usize>,
        scale: f32,
        out: &mut [f32],
        ld: usize,
    ) {
        // SAFETY: the caller's contract: keys `k, k + 1 < KEY_PANEL` are rows of `key_rows`
        // (the second may be padding, computed and dropped), query rows `i0 + i < i0 + RM`
        // rows of `q`, and every load reads 8 floats at `d < head_dim`, a multiple of 8.
        unsafe {
            let qp = q.as_ptr().add(i0 * head_dim);
            let n_here = cols.len();
            for k in (0..n_here).step_by(2) {
                let k0 = key_rows.as_ptr().add(k * head_dim);
                let sums = dot_tile::<RM>(qp, head_dim, k0, k0.add(head_dim), head_dim);
                for (i, sums_i) in sums.iter().enumerate() {
                    let row = &mut out[(i0 + i) * ld + cols.start + k..];
                    for (c, &v) in sums_i.iter().enumerate().take(n_here - k) {
                        row[c] = v * scale;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The orders a head of `head_dim` can be summed in.
    fn orders(head_dim: usize) -> Vec<SumOrder> {
        let mut orders = vec![SumOrder::Lanes32, SumOrder::Chain];
        if head_dim.is_multiple_of(8) {
            orders.push(SumOrder::Lanes8);
        }
        orders
    }

    /// Every SIMD kernel equals the scalar reference bit for bit, in every order (each is
    /// the same operations in the same order per score), and writes nothing past `n_keys`.
    fn scores_match<T: KvElement>() {
        for head_dim in [64, 40, 72, 8, 3] {
            let keys_f32 = values(70 * head_dim, head_dim as u64);
            let cache = key_cache::<T>(&keys_f32, head_dim);
            for m in 1..=7 {
                let q = values(m * head_dim, 100 + m as u64);
                for n_keys in 0..=70 {
                    let ld = n_keys + 3;
                    let len = m * ld;
                    for order in orders(head_dim) {
                        let mut want = vec![f32::NAN; len];
                        scores_scalar(&q, head_dim, &cache, n_keys, 0.125, &mut want, ld, order);
                        for isa in simd_isas() {
                            let mut got = vec![f32::NAN; len];
                            scores_on(
                                isa, &q, head_dim, &cache, n_keys, 0.125, &mut got, ld, order,
                            );
                            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                                if j % ld >= n_keys {
                                    assert!(g.is_nan(), "{}: wrote past n_keys", isa.name());
                                } else {
                                    assert_eq!(
                                        g.to_bits(),
                                        w.to_bits(),
                                        "{} {:?} {order:?} hd {head_dim} m {m} n_keys {n_keys} at {j}",
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
    }

    fn weighted_sums_match<T: KvElement>() {
        for head_dim in [64, 40, 72, 8, 3, 128] {
            let mut cache = vec![T::default(); 70 * head_dim];
            T::store_slice(&values(70 * head_dim, 7 + head_dim as u64), &mut cache);
            for m in 1..=7 {
                for n_keys in 0..=70 {
                    let ld = n_keys + 5;
                    // Every fifth probability 0, as masked keys have.
                    let probs: Vec<f32> = values(m * ld, (m * 1000 + n_keys) as u64)
                        .iter()
                        .enumerate()
                        .map(|(i, p)| if i % 5 == 2 { 0.0 } else { p.abs() })
                        .collect();
                    // A weighted sum takes the 8-lane order for any head_dim.
                    for order in [SumOrder::Lanes32, SumOrder::Chain, SumOrder::Lanes8] {
                        let mut want = vec![f32::NAN; m * head_dim];
                        weighted_sum_scalar(
                            &probs,
                            ld,
                            &cache,
                            head_dim,
                            ValueRows::Leading(n_keys),
                            &mut want,
                            order,
                        );
                        for isa in simd_isas() {
                            let mut got = vec![f32::NAN; m * head_dim];
                            weighted_sum_on(
                                isa,
                                &probs,
                                ld,
                                &cache,
                                head_dim,
                                ValueRows::Leading(n_keys),
                                &mut got,
                                order,
                            );
                            for (c, (g, w)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(
                                    g.to_bits(),
                                    w.to_bits(),
                                    "{} {:?} {order:?} hd {head_dim} m {m} n_keys {n_keys} at {c}",
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

    /// Listed value rows sum as the same rows copied into key order would, on every ISA and
    /// in every order; keys with no row (probability 0) change nothing.
    #[test]
    fn listed_value_rows_equal_rows_in_key_order() {
        let head_dim = 40;
        let cache_rows = 50;
        let mut cache = vec![f16::default(); cache_rows * head_dim];
        f16::store_slice(&values(cache_rows * head_dim, 21), &mut cache);
        // Keys 0..3 have no row, then a wrapped ring: rows 30..50, then 0..30, a gap, 40..44.
        let mut rows = vec![NO_ROW; 3];
        rows.extend((30..50).chain(0..30));
        rows.extend([NO_ROW; 5]);
        rows.extend(40..44);
        let n_keys = rows.len();
        let m = 3;
        let mut probs: Vec<f32> = values(m * n_keys, 22).iter().map(|p| p.abs()).collect();
        for (j, &r) in rows.iter().enumerate() {
            if r == NO_ROW {
                for i in 0..m {
                    probs[i * n_keys + j] = 0.0;
                }
            }
        }
        let mut gathered = vec![f16::default(); n_keys * head_dim];
        for (j, &r) in rows.iter().enumerate() {
            if r != NO_ROW {
                gathered[j * head_dim..(j + 1) * head_dim]
                    .copy_from_slice(&cache[r * head_dim..(r + 1) * head_dim]);
            }
        }
        for order in orders(head_dim) {
            for isa in cpu::available_isas() {
                let mut want = vec![0.0; m * head_dim];
                let mut got = vec![0.0; m * head_dim];
                let leading = ValueRows::Leading(n_keys);
                weighted_sum_on(
                    isa, &probs, n_keys, &gathered, head_dim, leading, &mut want, order,
                );
                let listed = ValueRows::Listed(&rows);
                weighted_sum_on(
                    isa, &probs, n_keys, &cache, head_dim, listed, &mut got, order,
                );
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{} {order:?}", isa.name());
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
        for order in [SumOrder::Lanes8, SumOrder::Lanes32, SumOrder::Chain] {
            scores_scalar(&q, head_dim, &cache, 37, 0.5, &mut out, 37, order);
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
            weighted_sum_scalar(
                &probs,
                37,
                &keys,
                head_dim,
                ValueRows::Leading(37),
                &mut sums,
                order,
            );
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
    }

    /// Each order is llama.cpp's kernel written out lane by lane (tinyBLAS's 8 lanes and
    /// `hsum`; `ggml_vec_dot_f16`'s four 8-lane accumulators and `GGML_F32x8_REDUCE`), and the
    /// two orders do give different last bits on some scores (so the choice is observable).
    #[test]
    fn attention_scores_follow_llama_cpp_lane_order() {
        for head_dim in [64, 40] {
            lane_order_case(head_dim);
        }
    }

    fn lane_order_case(head_dim: usize) {
        let keys = values(40 * head_dim, 11);
        let cache = key_cache::<f32>(&keys, head_dim);
        let q = values(head_dim, 12);
        let mut got8 = vec![0.0; 40];
        let mut got32 = vec![0.0; 40];
        scores_scalar(
            &q,
            head_dim,
            &cache,
            40,
            1.0,
            &mut got8,
            40,
            SumOrder::Lanes8,
        );
        scores_scalar(
            &q,
            head_dim,
            &cache,
            40,
            1.0,
            &mut got32,
            40,
            SumOrder::Lanes32,
        );
        let mut differ = 0;
        for j in 0..40 {
            let k = &keys[j * head_dim..(j + 1) * head_dim];
            // tinyBLAS: Cv = madd(a, b, Cv) over 8-wide steps, then hsum(hi + lo).
            let mut cv = [0.0f32; 8];
            for d in (0..head_dim).step_by(8) {
                for l in 0..8 {
                    cv[l] = q[d + l].mul_add(k[d + l], cv[l]);
                }
            }
            let x: [f32; 4] = std::array::from_fn(|l| cv[l + 4] + cv[l]);
            let want8 = (x[0] + x[2]) + (x[1] + x[3]);
            assert_eq!(got8[j].to_bits(), want8.to_bits(), "lanes8 key {j}");
            // ggml_vec_dot_f16: sum[0..4] over 32-wide steps, then the reduce tree.
            let mut acc = [[0.0f32; 8]; 4];
            for d in (0..head_dim - head_dim % 32).step_by(32) {
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    for l in 0..8 {
                        acc_a[l] = q[d + 8 * a + l].mul_add(k[d + 8 * a + l], acc_a[l]);
                    }
                }
            }
            let x0: [f32; 8] = std::array::from_fn(|l| acc[0][l] + acc[2][l]);
            let x1: [f32; 8] = std::array::from_fn(|l| acc[1][l] + acc[3][l]);
            let y: [f32; 8] = std::array::from_fn(|l| x0[l] + x1[l]);
            let t: [f32; 4] = std::array::from_fn(|l| y[l] + y[l + 4]);
            // Leftovers past the last whole 32, one by one in f64.
            let mut wide = ((t[0] + t[1]) + (t[2] + t[3])) as f64;
            for d in head_dim - head_dim % 32..head_dim {
                wide += (q[d] * k[d]) as f64;
            }
            let want32 = wide as f32;
            assert_eq!(got32[j].to_bits(), want32.to_bits(), "lanes32 key {j}");
            differ += usize::from(want8 != want32);
        }
        assert!(
            differ > 0,
            "hd {head_dim}: the two orders agreed on every score"
        );
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
