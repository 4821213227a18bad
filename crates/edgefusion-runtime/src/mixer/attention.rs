//! Softmax attention at inference, in two spans:
//! - **full**: every new token attends to every position up to its own, over a KV cache that
//!   grows with the context ([`KvCache`], one slot per position);
//! - **windowed**: a token at position `p` attends to the first `sink` positions and the last
//!   `window` ones (`max(sink, p − window + 1) ..= p`), over a [`WindowCache`] whose size does
//!   not grow: the sink, a ring buffer of the window, and a staging area for a step's new
//!   tokens.
//!
//! Both use the same kernels (query-key scores, softmax, probability-weighted values) and the
//! same split of work into tasks ([`AttnPlan`]); the windowed span masks the slots a token
//! does not see. Keys are stored rotated (RoPE at their true positions), so a score does not
//! depend on the slot; the sums over keys (softmax's and the values') do in their last bits,
//! so the windowed span lays its slots out in position order for them ([`window_key_order`]),
//! which makes a window that covers the context add exactly as full attention does, and as
//! llama.cpp, whose cache slot is the position.

use edgefusion_kernels::attention::{self, KvElement};
use edgefusion_kernels::f32ops;
use edgefusion_model::{Attention, ModelConfig};
use half::f16;

use super::MixerIo;
use crate::engine::{rms_norm_in_place, LinearInput};
use crate::parallel::Threads;

/// Storage type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// llama.cpp's default: half the memory of f32, and the same rounding, which keeps greedy
    /// decoding token-identical to it.
    F16,
    /// Exact keys and values (reference comparisons).
    F32,
}

/// Keys and values of one layer for `n_slots` positions, in the layouts of the attention
/// kernels: keys `(n_kv_heads, n_slots_padded / 16, head_dim, 16)` (panels of 16 slots),
/// values `(n_kv_heads, n_slots, head_dim)`.
#[derive(Debug, Clone)]
pub(crate) struct KvSlots<T> {
    keys: Vec<T>,
    values: Vec<T>,
    n_slots: usize,
}

impl<T: KvElement> KvSlots<T> {
    fn new(cfg: &ModelConfig, n_slots: usize) -> Self {
        let (keys, values) = slot_lens(cfg, n_slots);
        // Zeroed allocations: the OS maps pages as positions are used, so a long context
        // costs memory only once it is filled.
        KvSlots {
            keys: vec![T::default(); keys],
            values: vec![T::default(); values],
            n_slots,
        }
    }

    fn keys_per_head(&self, cfg: &ModelConfig) -> usize {
        self.keys.len() / cfg.n_kv_heads
    }

    /// Writes the rotated key and the value of KV head `g` into `slot`.
    fn store(&mut self, cfg: &ModelConfig, g: usize, slot: usize, key: &[f32], value: &[f32]) {
        let hd = cfg.head_dim;
        let per_head = self.keys_per_head(cfg);
        attention::store_key(
            &mut self.keys[g * per_head..(g + 1) * per_head],
            hd,
            slot,
            key,
        );
        let row = (g * self.n_slots + slot) * hd;
        T::store_slice(value, &mut self.values[row..row + hd]);
    }

    /// The first `n` slots of every head, copied into a cache of `n` slots.
    fn prefix(&self, cfg: &ModelConfig, n: usize) -> Self {
        let mut out = KvSlots::new(cfg, n);
        let (keys_out, hd) = (out.keys_per_head(cfg), cfg.head_dim);
        let keys_in = self.keys_per_head(cfg);
        for g in 0..cfg.n_kv_heads {
            out.keys[g * keys_out..(g + 1) * keys_out]
                .copy_from_slice(&self.keys[g * keys_in..g * keys_in + keys_out]);
            out.values[g * n * hd..(g + 1) * n * hd]
                .copy_from_slice(&self.values[g * self.n_slots * hd..][..n * hd]);
        }
        out
    }

    /// Overwrites the first `src.n_slots` slots of every head with `src`'s.
    fn set_prefix(&mut self, cfg: &ModelConfig, src: &Self) {
        let (keys_src, hd, n) = (src.keys_per_head(cfg), cfg.head_dim, src.n_slots);
        let keys_dst = self.keys_per_head(cfg);
        for g in 0..cfg.n_kv_heads {
            self.keys[g * keys_dst..g * keys_dst + keys_src]
                .copy_from_slice(&src.keys[g * keys_src..(g + 1) * keys_src]);
            self.values[g * self.n_slots * hd..][..n * hd]
                .copy_from_slice(&src.values[g * n * hd..(g + 1) * n * hd]);
        }
    }
}

/// Elements of one layer's key and value caches for `n_slots` positions.
fn slot_lens(cfg: &ModelConfig, n_slots: usize) -> (usize, usize) {
    (
        cfg.n_kv_heads * attention::key_cache_len(n_slots, cfg.head_dim),
        cfg.n_kv_heads * n_slots * cfg.head_dim,
    )
}

/// One layer's keys and values, in the session's cache type.
#[derive(Debug, Clone)]
pub(crate) enum KvCache {
    F16(KvSlots<f16>),
    F32(KvSlots<f32>),
}

impl KvCache {
    pub(crate) fn new(cfg: &ModelConfig, n_slots: usize, kv_type: KvType) -> Self {
        match kv_type {
            KvType::F16 => KvCache::F16(KvSlots::new(cfg, n_slots)),
            KvType::F32 => KvCache::F32(KvSlots::new(cfg, n_slots)),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            KvCache::F16(c) => (c.keys.len() + c.values.len()) * 2,
            KvCache::F32(c) => (c.keys.len() + c.values.len()) * 4,
        }
    }

    fn prefix(&self, cfg: &ModelConfig, n: usize) -> Self {
        match self {
            KvCache::F16(c) => KvCache::F16(c.prefix(cfg, n)),
            KvCache::F32(c) => KvCache::F32(c.prefix(cfg, n)),
        }
    }

    fn set_prefix(&mut self, cfg: &ModelConfig, src: &Self) {
        match (self, src) {
            (KvCache::F16(dst), KvCache::F16(src)) => dst.set_prefix(cfg, src),
            (KvCache::F32(dst), KvCache::F32(src)) => dst.set_prefix(cfg, src),
            _ => unreachable!("a saved window has its session's cache type"),
        }
    }
}

/// The constant-size cache of a windowed layer. Slots `0..sink` hold positions `0..sink`;
/// slots `sink..sink + window` are a ring holding the last positions (position `p ≥ sink` at
/// slot `sink + (p − sink) % window`); the last `max_batch` slots stage a step's new tokens,
/// which the step's tokens attend to before the ring takes the newest of them.
#[derive(Debug, Clone)]
pub(crate) struct WindowCache {
    kv: KvCache,
    sink: usize,
    window: usize,
}

/// A slot that holds no position (masked for every token); in a key order, a position no
/// slot holds.
const EMPTY: usize = attention::NO_ROW;

/// The period of the kernels' lane assignment over keys (key `j` goes to lane `j % 32` or
/// `j % 8`, and softmax sums keys in aligned groups of 8 on AVX2 and in 16 f64 lanes on
/// AVX-512): a multiple of every one of them, which [`window_sub_block_keys`] relies on.
const LANE_PERIOD: usize = 32;

impl WindowCache {
    pub(crate) fn new(cfg: &ModelConfig, max_batch: usize, kv_type: KvType) -> Self {
        WindowCache {
            kv: KvCache::new(cfg, cfg.sink + cfg.window + max_batch, kv_type),
            sink: cfg.sink,
            window: cfg.window,
        }
    }

    /// Bytes of the state a sequence keeps: the sink and the ring (the staging slots are
    /// scratch of one step).
    pub(crate) fn state_bytes(&self, cfg: &ModelConfig) -> usize {
        let (keys, values) = slot_lens(cfg, self.sink + self.window);
        let element = match self.kv {
            KvCache::F16(_) => 2,
            KvCache::F32(_) => 4,
        };
        (keys + values) * element
    }

    /// A copy of the sink and the ring.
    pub(crate) fn save(&self, cfg: &ModelConfig) -> KvCache {
        self.kv.prefix(cfg, self.sink + self.window)
    }

    /// Returns to a copy made by [`WindowCache::save`].
    pub(crate) fn restore(&mut self, cfg: &ModelConfig, saved: &KvCache) {
        self.kv.set_prefix(cfg, saved);
    }
}

/// The position each slot of a [`WindowCache`] holds during a step of `n_tok` tokens after
/// `n_past` ([`EMPTY`] where none): the sink (including new tokens below `sink`), the ring as
/// left by the previous steps, and the staging slots (new tokens at or past `sink`).
pub(crate) fn window_slot_positions(
    sink: usize,
    window: usize,
    n_past: usize,
    n_tok: usize,
    out: &mut [usize],
) {
    let (sink_slots, rest) = out.split_at_mut(sink);
    let (ring, staging) = rest.split_at_mut(window);
    for (s, slot) in sink_slots.iter_mut().enumerate() {
        *slot = if s < n_past + n_tok { s } else { EMPTY };
    }
    ring.fill(EMPTY);
    if n_past > sink {
        // The newest position of each residue class modulo `window` below n_past.
        let last = n_past - 1;
        let offset = (last - sink) % window;
        for (r, slot) in ring.iter_mut().enumerate() {
            let back = (offset + window - r) % window;
            if last - sink >= back {
                *slot = last - back;
            }
        }
    }
    for (t, slot) in staging[..n_tok].iter_mut().enumerate() {
        let pos = n_past + t;
        *slot = if pos >= sink { pos } else { EMPTY };
    }
}

/// The slots of a [`WindowCache`] step (positions as [`window_slot_positions`] gives them) in
/// position order, for the sums over keys: entry `j` is the slot of the `j`-th key, with
/// `j ≡ position (mod LANE_PERIOD)`; [`EMPTY`] entries fill what lies between (the start, and
/// the gap between the sink and the window, shortened by whole periods). Every lane then
/// adds the same keys in the same order as over a cache whose slot is the position, and the
/// empty entries (probability 0) add nothing.
pub(crate) fn window_key_order(
    sink: usize,
    window: usize,
    n_past: usize,
    n_tok: usize,
    out: &mut Vec<usize>,
) {
    out.clear();
    let staging = sink + window;
    let end = n_past + n_tok;
    // (position, slot) in position order: the sink, the ring, the staged new tokens.
    let sink_keys = (0..sink.min(end)).map(|p| (p, p));
    let ring_keys =
        (n_past.saturating_sub(window).max(sink)..n_past).map(|p| (p, sink + (p - sink) % window));
    let new_keys = (n_past.max(sink)..end).map(|p| (p, staging + p - n_past));
    let mut next = 0;
    for (pos, slot) in sink_keys.chain(ring_keys).chain(new_keys) {
        // `next` is the position entry `out.len()` stands for; skip whole periods of a gap.
        let skip = (pos - next) % LANE_PERIOD;
        out.resize(out.len() + skip, EMPTY);
        out.push(slot);
        next = pos + 1;
    }
}

/// The slots of a [`WindowCache`] whose scores the tokens `..s1` of a step after `n_past`
/// may need: the sink, the ring where it holds keys (after `n_past > sink`), and the staging
/// slots of those tokens. Each range starts on a key panel (a multiple of
/// [`attention::KEY_PANEL`]), so the first may reach back into slots no token needs.
pub(crate) fn window_score_slots(
    sink: usize,
    window: usize,
    n_past: usize,
    s1: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let staging = sink + window;
    let cached_end = if n_past > sink { staging } else { sink };
    let staged_start = staging / attention::KEY_PANEL * attention::KEY_PANEL;
    let end = staging + s1;
    let (first, second) = if cached_end >= staged_start {
        (0..end, 0..0)
    } else {
        (0..cached_end, staged_start..end)
    };
    [first, second].into_iter().filter(|r| !r.is_empty())
}

/// The leading entries of a [`window_key_order`] of `n_entries` for a step of `n_tok` tokens
/// that the step's tokens `..s1` may see: the last `n_tok - s1` tokens are the last keys in
/// key order and none of those tokens sees them. The count is rounded up to a whole
/// [`LANE_PERIOD`] (or all entries), so that every sum over the kept keys, the softmax's lanes
/// included, adds the same values in the same order as over all of them (the rest add 0;
/// with an f32 cache, a weighted-sum component that is −0 over the kept keys stays −0 where
/// the +0 products of the dropped ones would have made it +0).
pub(crate) fn window_sub_block_keys(n_entries: usize, n_tok: usize, s1: usize) -> usize {
    (n_entries - (n_tok - s1))
        .next_multiple_of(LANE_PERIOD)
        .min(n_entries)
}

/// Entries a [`window_key_order`] may have over a cache of `n_slots` slots: one per slot, and
/// fewer than a period of padding (before the first key without a sink, or in the gap after
/// the sink with one).
fn window_key_order_cap(n_slots: usize) -> usize {
    n_slots + LANE_PERIOD - 1
}

/// Score columns per query row that attention over a windowed cache of `n_slots` slots needs
/// in its scratch: the scores by slot, then in key order.
fn window_score_columns(n_slots: usize) -> usize {
    n_slots + window_key_order_cap(n_slots)
}

/// The score columns per query row of each kind of cache a session of `n_ctx` positions and
/// steps of up to `max_batch` tokens holds: the full cache's slots, and the windowed
/// layers' columns (see [`AttnScratch::new`]).
pub(crate) fn score_columns(cfg: &ModelConfig, n_ctx: usize, max_batch: usize) -> Vec<usize> {
    let mut columns = vec![n_ctx];
    if cfg.n_window_layers() > 0 {
        columns.push(window_score_columns(cfg.window_positions() + max_batch));
    }
    columns
}

/// Which cached positions each new token attends to.
#[derive(Debug, Clone, Copy)]
enum KeySpan<'a> {
    /// Every position up to the token's own; slot = position.
    Causal,
    /// Slot `s` holds position `positions[s]`; a token at `p` sees it when it is at most `p`
    /// and is a sink position or one of the last `window` (see [`window_slot_positions`]).
    /// The sums over keys run over `key_order` ([`window_key_order`]).
    Window {
        positions: &'a [usize],
        key_order: &'a [usize],
        sink: usize,
        window: usize,
    },
}

/// Scratch of the attention mixers for one step of up to `max_batch` tokens.
pub(crate) struct AttnScratch {
    /// (max_batch, q_dim)
    q: Vec<f32>,
    /// (max_batch, kv_dim)
    k: Vec<f32>,
    /// (max_batch, kv_dim)
    v: Vec<f32>,
    /// Attention output before `wo`: (max_batch, q_dim)
    att: Vec<f32>,
    /// Attention output as the tasks write it, one slot per task (see [`AttnPlan`]):
    /// (n_chunks, tasks_per_chunk, block_tokens, gqa_group, head_dim)
    att_tasks: Vec<f32>,
    /// Per attention chunk: a task's queries rounded to the cache type
    /// `(block_tokens · gqa_group, head_dim)`, then the scores and probabilities of one
    /// sub-block `(sub_block_tokens · gqa_group, score_columns)` (see [`AttnPlan`]; a
    /// windowed layer's columns are its scores by slot, then by key order).
    attn_scratch: Vec<f32>,
    /// The position of each windowed-cache slot in this step (same for every windowed
    /// layer of one sequence; a batch step recomputes it per sequence):
    /// (sink + window + max_batch)
    window_positions: Vec<usize>,
    /// The windowed-cache slots in position order ([`window_key_order`]), computed with
    /// `window_positions`.
    window_key_order: Vec<usize>,
}

impl AttnScratch {
    /// Scratch for steps of up to `max_batch` tokens over caches whose attention needs each
    /// of `score_columns` columns per query row (a full cache's slots;
    /// [`window_score_columns`] for a windowed one).
    pub(crate) fn new(
        cfg: &ModelConfig,
        max_batch: usize,
        n_threads: usize,
        score_columns: &[usize],
    ) -> Self {
        // A smaller cache may take longer sub-blocks, and fewer threads longer blocks: the
        // largest need over every size and every thread count a layer may run on.
        let most = |f: &dyn Fn(usize, usize) -> usize| {
            (1..=n_threads.max(1))
                .flat_map(|t| score_columns.iter().map(move |&n| (t, n)))
                .map(|(t, n)| f(t, n))
                .max()
                .unwrap_or(0)
        };
        AttnScratch {
            q: vec![0.0; max_batch * cfg.q_dim()],
            k: vec![0.0; max_batch * cfg.kv_dim()],
            v: vec![0.0; max_batch * cfg.kv_dim()],
            att: vec![0.0; max_batch * cfg.q_dim()],
            att_tasks: vec![0.0; most(&|t, n| AttnPlan::max_out_len(cfg, max_batch, t, n))],
            // Zeroed: only the rows a context of the current length uses get mapped.
            attn_scratch: vec![0.0; most(&|t, n| AttnPlan::max_scratch_len(cfg, max_batch, t, n))],
            window_positions: vec![EMPTY; cfg.window_positions() + max_batch],
            window_key_order: Vec::with_capacity(window_key_order_cap(
                cfg.window_positions() + max_batch,
            )),
        }
    }

    /// Prepares the windowed layers' slot positions for a step.
    pub(crate) fn begin_step(&mut self, cfg: &ModelConfig, n_past: usize, n_tok: usize) {
        if cfg.window > 0 {
            let n = cfg.window_positions() + n_tok;
            window_slot_positions(
                cfg.sink,
                cfg.window,
                n_past,
                n_tok,
                &mut self.window_positions[..n],
            );
            window_key_order(
                cfg.sink,
                cfg.window,
                n_past,
                n_tok,
                &mut self.window_key_order,
            );
        }
    }
}

/// Full causal attention of layer `io.layer` over its KV cache (slot = position): appends the
/// step's keys and values, and writes `wo`'s output `(n_tok, d_model)` into `out`.
pub(crate) fn forward_full(
    io: &mut MixerIo<'_>,
    w: &Attention<'_>,
    cache: &mut KvCache,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    project_qkv(io, w, scratch);
    let rows = StepRows {
        rows: 0..io.n_tok,
        n_past: io.n_past,
    };
    attend_full(io.cfg, io.threads, cache, scratch, rows);
    project_out(io, w, scratch, out);
}

/// Step rows `rows.rows` of q, k and v (already projected), the tokens at positions
/// `rows.n_past..` of one sequence: appends their keys and values to that sequence's `cache`
/// and writes their attention output into the same rows of the scratch's `att`.
pub(crate) fn attend_full(
    cfg: &ModelConfig,
    threads: &Threads,
    cache: &mut KvCache,
    scratch: &mut AttnScratch,
    rows: StepRows,
) {
    match cache {
        KvCache::F16(kv) => {
            store_causal(cfg, kv, scratch, &rows);
            attend(cfg, threads, kv, KeySpan::Causal, scratch, &rows);
        }
        KvCache::F32(kv) => {
            store_causal(cfg, kv, scratch, &rows);
            attend(cfg, threads, kv, KeySpan::Causal, scratch, &rows);
        }
    }
}

/// [`attend_full`] over a sequence's sink and window: the step's slot positions for those
/// tokens first, then the windowed attention.
pub(crate) fn attend_window(
    cfg: &ModelConfig,
    threads: &Threads,
    cache: &mut WindowCache,
    scratch: &mut AttnScratch,
    rows: StepRows,
) {
    scratch.begin_step(cfg, rows.n_past, rows.rows.len());
    let (sink, window) = (cache.sink, cache.window);
    match &mut cache.kv {
        KvCache::F16(kv) => windowed(cfg, threads, kv, sink, window, scratch, &rows),
        KvCache::F32(kv) => windowed(cfg, threads, kv, sink, window, scratch, &rows),
    }
}

/// Rows of a step that belong to one sequence: the rows of q, k, v and `att`, and the
/// position of the first.
#[derive(Debug, Clone)]
pub(crate) struct StepRows {
    pub rows: std::ops::Range<usize>,
    pub n_past: usize,
}

/// Sink + window attention of layer `io.layer` (after [`AttnScratch::begin_step`]): the
/// step's tokens attend to the sink, the ring and each other within the window, then the
/// newest of them enter the ring; writes `wo`'s output `(n_tok, d_model)` into `out`.
pub(crate) fn forward_windowed(
    io: &mut MixerIo<'_>,
    w: &Attention<'_>,
    cache: &mut WindowCache,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    project_qkv(io, w, scratch);
    let (sink, window) = (cache.sink, cache.window);
    let rows = StepRows {
        rows: 0..io.n_tok,
        n_past: io.n_past,
    };
    match &mut cache.kv {
        KvCache::F16(kv) => windowed(io.cfg, io.threads, kv, sink, window, scratch, &rows),
        KvCache::F32(kv) => windowed(io.cfg, io.threads, kv, sink, window, scratch, &rows),
    }
    project_out(io, w, scratch, out);
}

/// Windowed attention of step rows `rows` (after [`AttnScratch::begin_step`] for them).
fn windowed<T: KvElement>(
    cfg: &ModelConfig,
    threads: &Threads,
    kv: &mut KvSlots<T>,
    sink: usize,
    window: usize,
    scratch: &mut AttnScratch,
    rows: &StepRows,
) {
    let (n_past, n_tok, kv_dim, hd) = (rows.n_past, rows.rows.len(), cfg.kv_dim(), cfg.head_dim);
    let row0 = rows.rows.start;
    let staging = sink + window;
    for t in 0..n_tok {
        let pos = n_past + t;
        let r = row0 + t;
        for g in 0..cfg.n_kv_heads {
            let new = r * kv_dim + g * hd..r * kv_dim + (g + 1) * hd;
            let (key, value) = (&scratch.k[new.clone()], &scratch.v[new]);
            if pos < sink {
                kv.store(cfg, g, pos, key, value);
            }
            kv.store(cfg, g, staging + t, key, value);
        }
    }
    let n_slots = staging + n_tok;
    let positions = std::mem::take(&mut scratch.window_positions);
    let key_order = std::mem::take(&mut scratch.window_key_order);
    attend(
        cfg,
        threads,
        kv,
        KeySpan::Window {
            positions: &positions[..n_slots],
            key_order: &key_order,
            sink,
            window,
        },
        scratch,
        rows,
    );
    scratch.window_positions = positions;
    scratch.window_key_order = key_order;
    // The newest `window` tokens of the step (at or past the sink) take their ring slots.
    for t in n_tok.saturating_sub(window)..n_tok {
        let pos = n_past + t;
        if pos < sink {
            continue;
        }
        let slot = sink + (pos - sink) % window;
        let r = row0 + t;
        for g in 0..cfg.n_kv_heads {
            let new = r * kv_dim + g * hd..r * kv_dim + (g + 1) * hd;
            kv.store(cfg, g, slot, &scratch.k[new.clone()], &scratch.v[new]);
        }
    }
}

/// q, k and v of the step (with their biases), the heads' norms where the model has them,
/// and RoPE on q and k at their positions.
pub(crate) fn project_qkv(io: &mut MixerIo<'_>, w: &Attention<'_>, scratch: &mut AttnScratch) {
    let (cfg, n_tok) = (io.cfg, io.n_tok);
    io.observe(
        LinearInput::Attention { layer: io.layer },
        io.xn,
        cfg.d_model,
    );
    for (lin, bias, out) in [
        (&w.wq, &w.bq, &mut scratch.q),
        (&w.wk, &w.bk, &mut scratch.k),
        (&w.wv, &w.bv, &mut scratch.v),
    ] {
        io.linear_of_input(lin, out);
        if let Some(bias) = bias {
            for row in out[..n_tok * lin.n_out].chunks_mut(lin.n_out) {
                for (a, b) in row.iter_mut().zip(bias) {
                    *a += b;
                }
            }
        }
    }
    let (hd, n_heads, n_kv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    for (norm, x, width) in [
        (&w.q_norm, &mut scratch.q, n_heads * hd),
        (&w.k_norm, &mut scratch.k, n_kv * hd),
    ] {
        if let Some(norm) = norm {
            rms_norm_in_place(&mut x[..n_tok * width], norm, cfg.rms_eps);
        }
    }
    for t in 0..n_tok {
        let pos = io.position(t);
        for head in scratch.q[t * n_heads * hd..(t + 1) * n_heads * hd].chunks_mut(hd) {
            io.rope.apply(head, pos, cfg.rope_style);
        }
        for head in scratch.k[t * n_kv * hd..(t + 1) * n_kv * hd].chunks_mut(hd) {
            io.rope.apply(head, pos, cfg.rope_style);
        }
    }
}

/// `out (n_tok, d_model) = wo · att`.
pub(crate) fn project_out(
    io: &mut MixerIo<'_>,
    w: &Attention<'_>,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let q_dim = io.cfg.q_dim();
    io.observe(
        LinearInput::AttentionOutput { layer: io.layer },
        &scratch.att,
        q_dim,
    );
    io.linear(&w.wo, &scratch.att, out);
}

/// Appends the keys and values of step rows `rows` at their positions.
fn store_causal<T: KvElement>(
    cfg: &ModelConfig,
    kv: &mut KvSlots<T>,
    scratch: &AttnScratch,
    rows: &StepRows,
) {
    let (kv_dim, hd) = (cfg.kv_dim(), cfg.head_dim);
    for (t, r) in rows.rows.clone().enumerate() {
        for g in 0..cfg.n_kv_heads {
            let new = r * kv_dim + g * hd..r * kv_dim + (g + 1) * hd;
            kv.store(
                cfg,
                g,
                rows.n_past + t,
                &scratch.k[new.clone()],
                &scratch.v[new],
            );
        }
    }
}

/// Attention of the queries of step rows `rows` over `kv` within `span`, into the same rows
/// of `scratch.att (max_batch, q_dim)`.
fn attend<T: KvElement>(
    cfg: &ModelConfig,
    threads: &Threads,
    kv: &KvSlots<T>,
    span: KeySpan<'_>,
    scratch: &mut AttnScratch,
    rows: &StepRows,
) {
    let (n_past, n_tok, row0) = (rows.n_past, rows.rows.len(), rows.rows.start);
    let (q_dim, n_kv) = (cfg.q_dim(), cfg.n_kv_heads);
    let group_width = cfg.gqa_group() * cfg.head_dim;
    let n_keys_max = match span {
        KeySpan::Causal => n_past + n_tok,
        // Scores by slot, then by position.
        KeySpan::Window {
            positions,
            key_order,
            ..
        } => positions.len() + key_order.len(),
    };
    let score_columns = match span {
        KeySpan::Causal => kv.n_slots,
        KeySpan::Window { .. } => window_score_columns(kv.n_slots),
    };
    let plan = AttnPlan::new(cfg, n_tok, threads.n_threads(), score_columns);
    let slot_len = plan.slot_len(cfg);
    let inputs = AttnInputs {
        cfg,
        q: &scratch.q[row0 * q_dim..(row0 + n_tok) * q_dim],
        keys: &kv.keys,
        values: &kv.values,
        n_slots: kv.n_slots,
        n_past,
        span,
        scale: cfg.attn_scale(),
        order: attention::SumOrder::for_step(edgefusion_kernels::cpu::isa(), n_tok, cfg.head_dim),
    };
    run_tasks(
        threads,
        &plan,
        &inputs,
        &mut scratch.att_tasks,
        &mut scratch.attn_scratch,
        n_keys_max,
        n_tok,
    );
    // Each task's rows `(block, group, head_dim)` to their place in `att (n_tok, q_dim)`.
    let att = &mut scratch.att[row0 * q_dim..(row0 + n_tok) * q_dim];
    for task in 0..plan.n_tasks {
        let (g, t0, t1) = plan.task(task, n_kv, n_tok);
        let slot = &scratch.att_tasks[plan.slot(task) * slot_len..][..(t1 - t0) * group_width];
        for (t, rows) in (t0..t1).zip(slot.chunks_exact(group_width)) {
            let dst = t * q_dim + g * group_width;
            att[dst..dst + group_width].copy_from_slice(rows);
        }
    }
}

fn run_tasks<T: KvElement>(
    threads: &Threads,
    plan: &AttnPlan,
    inputs: &AttnInputs<'_, T>,
    att_tasks: &mut [f32],
    attn_scratch: &mut [f32],
    n_keys_max: usize,
    n_tok: usize,
) {
    let cfg = inputs.cfg;
    let slot_len = plan.slot_len(cfg);
    threads.for_chunks_with_scratch(
        &mut att_tasks[..plan.out_len(cfg)],
        plan.tasks_per_chunk * slot_len,
        attn_scratch,
        plan.scratch_len(cfg, n_keys_max),
        |c, slots, scratch| {
            for (k, slot) in slots.chunks_mut(slot_len).enumerate() {
                let task = c + k * plan.n_chunks;
                if task >= plan.n_tasks {
                    break;
                }
                let (g, t0, t1) = plan.task(task, cfg.n_kv_heads, n_tok);
                attend_block(inputs, g, t0..t1, plan.sub_block, scratch, slot);
            }
        },
    );
}

/// Chunks per thread: enough to balance uneven work (causal rows differ in length).
const ATTN_CHUNKS_PER_THREAD: usize = 4;
/// Most new tokens per task.
const ATTN_MAX_BLOCK: usize = 32;
/// Most new tokens whose rows a task scores, normalizes and sums together. They all score
/// keys up to the last one's position (earlier tokens zero their masked tail), so the causal
/// waste is under this many keys per row.
const ATTN_MAX_SUB_BLOCK: usize = 16;
/// Bound on one sub-block's scores, `(sub_block · gqa_group, n_keys)` floats, so that they stay
/// in L2 between the score, softmax and weighted-sum passes and the scratch of long contexts
/// stays small (4 tokens at 4096 keys with 3 query heads per KV head; one token's rows are the
/// floor). Prompts of a few hundred keys get the full 16-token sub-blocks.
const ATTN_MAX_SCORE_BYTES: usize = 192 << 10;

/// How one attention call splits into tasks. A task is one KV head over a block of
/// consecutive new tokens; its query rows are the head's GQA group for each token of the
/// block, `(block_tokens, gqa_group)`, so each key and value element loaded serves them all.
/// Tasks are dealt round-robin to at most `ATTN_CHUNKS_PER_THREAD · n_threads` chunks (one
/// scratch slice each): every chunk gets early (short) and late (long) causal rows alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnPlan {
    /// New tokens per task (the last block may be shorter).
    block: usize,
    /// New tokens per sub-block of a task.
    sub_block: usize,
    n_tasks: usize,
    n_chunks: usize,
    tasks_per_chunk: usize,
}

impl AttnPlan {
    /// The plan for `n_tok` new tokens whose score rows have at most `n_keys` columns.
    fn new(cfg: &ModelConfig, n_tok: usize, n_threads: usize, n_keys: usize) -> Self {
        let n_kv = cfg.n_kv_heads;
        let max_chunks = ATTN_CHUNKS_PER_THREAD * n_threads;
        // Enough blocks for one task per chunk where n_tok allows.
        let balanced = n_tok.div_ceil(max_chunks.div_ceil(n_kv));
        let block = balanced.clamp(1, ATTN_MAX_BLOCK);
        let n_tasks = n_kv * n_tok.div_ceil(block);
        let n_chunks = n_tasks.min(max_chunks);
        let token_scores = cfg.gqa_group() * n_keys * std::mem::size_of::<f32>();
        let sub_block = (ATTN_MAX_SCORE_BYTES / token_scores.max(1)).clamp(1, ATTN_MAX_SUB_BLOCK);
        AttnPlan {
            block,
            sub_block: sub_block.min(block),
            n_tasks,
            n_chunks,
            tasks_per_chunk: n_tasks.div_ceil(n_chunks),
        }
    }

    /// Floats of one task's output slot: `(block, gqa_group, head_dim)`.
    fn slot_len(&self, cfg: &ModelConfig) -> usize {
        self.block * cfg.gqa_group() * cfg.head_dim
    }

    /// Floats of every chunk's output slots.
    fn out_len(&self, cfg: &ModelConfig) -> usize {
        self.n_chunks * self.tasks_per_chunk * self.slot_len(cfg)
    }

    /// Scratch floats of one chunk when the keys reach `n_keys`: a task's queries
    /// `(block · gqa_group, head_dim)` then one sub-block's scores
    /// `(sub_block · gqa_group, n_keys)`.
    fn scratch_len(&self, cfg: &ModelConfig, n_keys: usize) -> usize {
        cfg.gqa_group() * (self.block * cfg.head_dim + self.sub_block * n_keys)
    }

    /// Task `i`: (KV head, first new token, end token).
    fn task(&self, i: usize, n_kv: usize, n_tok: usize) -> (usize, usize, usize) {
        let (b, g) = (i / n_kv, i % n_kv);
        let t0 = b * self.block;
        (g, t0, (t0 + self.block).min(n_tok))
    }

    /// Output slot of task `i`: its chunk's slots are consecutive.
    fn slot(&self, i: usize) -> usize {
        (i % self.n_chunks) * self.tasks_per_chunk + i / self.n_chunks
    }

    /// Largest [`AttnPlan::out_len`] over steps of 1..=max_batch tokens.
    pub(crate) fn max_out_len(
        cfg: &ModelConfig,
        max_batch: usize,
        n_threads: usize,
        n_keys: usize,
    ) -> usize {
        (1..=max_batch)
            .map(|n| Self::new(cfg, n, n_threads, n_keys).out_len(cfg))
            .max()
            .unwrap_or(0)
    }

    /// Largest scratch of all chunks over steps of 1..=max_batch tokens, with `n_keys` keys.
    pub(crate) fn max_scratch_len(
        cfg: &ModelConfig,
        max_batch: usize,
        n_threads: usize,
        n_keys: usize,
    ) -> usize {
        (1..=max_batch)
            .map(|n| {
                let plan = Self::new(cfg, n, n_threads, n_keys);
                plan.n_chunks * plan.scratch_len(cfg, n_keys)
            })
            .max()
            .unwrap_or(0)
    }
}

/// What every attention task of one layer reads.
struct AttnInputs<'a, T> {
    cfg: &'a ModelConfig,
    /// Rotated queries of the step: (n_tok, q_dim)
    q: &'a [f32],
    /// (n_kv_heads, n_slots_padded / 16, head_dim, 16)
    keys: &'a [T],
    /// (n_kv_heads, n_slots, head_dim)
    values: &'a [T],
    n_slots: usize,
    n_past: usize,
    span: KeySpan<'a>,
    /// 1 / √head_dim
    scale: f32,
    /// The summation order of the products with the cache: llama.cpp's for a step of
    /// `n_tok` query rows.
    order: attention::SumOrder,
}

/// Softmax attention of KV head `g`'s query heads for the new tokens `t0..t1` over the slots
/// each token sees, `sub_block` tokens at a time, into `out (t1 - t0, gqa_group, head_dim)`.
///
/// Numerics follow llama.cpp's CPU path: queries rounded to the cache's type for the key
/// products, scores and softmax in f32 (the sum in f64), probabilities rounded to the cache's
/// type before weighting the values. Masked slots get probability exactly 0.
fn attend_block<T: KvElement>(
    inp: &AttnInputs<'_, T>,
    g: usize,
    tokens: std::ops::Range<usize>,
    sub_block: usize,
    scratch: &mut [f32],
    out: &mut [f32],
) {
    let cfg = inp.cfg;
    let (hd, group) = (cfg.head_dim, cfg.gqa_group());
    let group_width = group * hd;
    let (t0, t1) = (tokens.start, tokens.end);
    let keys_per_head = inp.keys.len() / cfg.n_kv_heads;
    let keys = &inp.keys[g * keys_per_head..(g + 1) * keys_per_head];
    let values = &inp.values[g * inp.n_slots * hd..(g + 1) * inp.n_slots * hd];

    // (rows, head_dim): row i is query head g·group + i % group of token t0 + i / group.
    let (q_rows, probs) = scratch.split_at_mut((t1 - t0) * group_width);
    for (t, dst) in (t0..t1).zip(q_rows.chunks_exact_mut(group_width)) {
        let src = t * cfg.q_dim() + g * group_width;
        dst.copy_from_slice(&inp.q[src..src + group_width]);
    }
    T::round_slice(q_rows);

    let mut s0 = t0;
    while s0 < t1 {
        let s1 = (s0 + sub_block).min(t1);
        let rows = (s0 - t0) * group..(s1 - t0) * group;
        let q_sub = &q_rows[rows.start * hd..rows.end * hd];
        let out_sub = &mut out[rows.start * hd..rows.end * hd];
        let row_pos = |i: usize| inp.n_past + s0 + i / group;
        match inp.span {
            KeySpan::Causal => {
                // Keys up to the sub-block's last token; earlier tokens mask their tail.
                let n_keys = inp.n_past + s1;
                // (s1 - s0, group, n_keys)
                let probs = &mut probs[..rows.len() * n_keys];
                attention::scores(q_sub, hd, keys, n_keys, inp.scale, probs, n_keys, inp.order);
                for (i, row) in probs.chunks_exact_mut(n_keys).enumerate() {
                    let (seen, masked) = row.split_at_mut(row_pos(i) + 1);
                    softmax_rounded::<T>(seen);
                    masked.fill(0.0);
                }
                let value_rows = attention::ValueRows::Leading(n_keys);
                attention::weighted_sum(probs, n_keys, values, hd, value_rows, out_sub, inp.order);
            }
            KeySpan::Window {
                positions,
                key_order,
                sink,
                window,
            } => {
                let n_slots = positions.len();
                let n_tok = n_slots - sink - window;
                let key_order = &key_order[..window_sub_block_keys(key_order.len(), n_tok, s1)];
                let n_keys = key_order.len();
                // Scores by slot (s1 - s0, group, n_slots), then in key order
                // (s1 - s0, group, n_keys) with the keys a token does not see at −∞.
                let (by_slot, by_key) = probs.split_at_mut(rows.len() * n_slots);
                let by_key = &mut by_key[..rows.len() * n_keys];
                for slots in window_score_slots(sink, window, inp.n_past, s1) {
                    // Slot ranges start on key panels, whose layout a panel's slice keeps.
                    let panel_len = attention::key_cache_len(attention::KEY_PANEL, hd);
                    let keys_from = &keys[slots.start / attention::KEY_PANEL * panel_len..];
                    attention::scores(
                        q_sub,
                        hd,
                        keys_from,
                        slots.len(),
                        inp.scale,
                        &mut by_slot[slots.start..],
                        n_slots,
                        inp.order,
                    );
                }
                for (i, (slot_row, row)) in by_slot
                    .chunks_exact(n_slots)
                    .zip(by_key.chunks_exact_mut(n_keys))
                    .enumerate()
                {
                    let pos = row_pos(i);
                    for (score, &slot) in row.iter_mut().zip(key_order) {
                        let key_pos = if slot == EMPTY {
                            EMPTY
                        } else {
                            positions[slot]
                        };
                        let seen = key_pos <= pos && (key_pos < sink || pos - key_pos < window);
                        *score = if seen {
                            slot_row[slot]
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                    // The token's own key is always seen, so the max is finite.
                    softmax_rounded::<T>(row);
                }
                let value_rows = attention::ValueRows::Listed(key_order);
                attention::weighted_sum(by_key, n_keys, values, hd, value_rows, out_sub, inp.order);
            }
        }
        s0 = s1;
    }
}

/// Softmax of `row` in place (−∞ scores get probability 0), rounded to the cache's type.
fn softmax_rounded<T: KvElement>(row: &mut [f32]) {
    let max = f32ops::max(row);
    let sum = f32ops::exp_sub_max_sum(row, max);
    f32ops::scale(row, (1.0 / sum) as f32);
    T::round_slice(row);
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_model::{Arch, LayerType, RopeScaling, RopeStyle};

    fn config(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            name: "attention plan test".into(),
            n_layers: 1,
            d_model: n_heads * head_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: 8,
            vocab_size: 8,
            n_ctx_train: 1 << 20,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
            rope_dim: head_dim,
            rope_style: RopeStyle::Normal,
            rope_scaling: RopeScaling::None,
            tied_embeddings: true,
            layer_types: vec![LayerType::Attention],
            ssm_d_state: 0,
            ssm_d_conv: 0,
            window: 0,
            sink: 0,
            block: Default::default(),
        }
    }

    /// Every (token, KV head) pair belongs to exactly one task; each task's output slot lies
    /// in the chunk that runs it; and the buffers sized in `AttnScratch::new` hold every step.
    #[test]
    fn attn_plan_covers_every_token_once_within_its_buffers() {
        for (n_heads, n_kv) in [(9, 3), (4, 4), (32, 8), (8, 1)] {
            let cfg = config(n_heads, n_kv, 64);
            for n_threads in [1, 2, 3, 8] {
                for n_ctx in [16, 300, 100_000] {
                    let max_batch = n_ctx.min(300);
                    let max_out = AttnPlan::max_out_len(&cfg, max_batch, n_threads, n_ctx);
                    let max_scratch = AttnPlan::max_scratch_len(&cfg, max_batch, n_threads, n_ctx);
                    for n_tok in 1..=max_batch {
                        let plan = AttnPlan::new(&cfg, n_tok, n_threads, n_ctx);
                        let case = format!("{n_heads}/{n_kv} heads, {n_threads} threads, ctx {n_ctx}, {n_tok} tokens: {plan:?}");
                        assert!(plan.out_len(&cfg) <= max_out, "{case}");
                        assert!(
                            plan.n_chunks * plan.scratch_len(&cfg, n_ctx) <= max_scratch,
                            "{case}"
                        );
                        assert!(
                            plan.n_chunks <= ATTN_CHUNKS_PER_THREAD * n_threads,
                            "{case}"
                        );
                        assert!((1..=plan.block).contains(&plan.sub_block), "{case}");
                        let sub_scores = plan.sub_block * cfg.gqa_group() * n_ctx * 4;
                        assert!(
                            plan.sub_block == 1 || sub_scores <= ATTN_MAX_SCORE_BYTES,
                            "{case}"
                        );
                        let mut covered = vec![0u32; n_tok * n_kv];
                        let mut slots = vec![false; plan.n_chunks * plan.tasks_per_chunk];
                        for task in 0..plan.n_tasks {
                            let (g, t0, t1) = plan.task(task, n_kv, n_tok);
                            assert!(t0 < t1 && t1 - t0 <= plan.block, "{case}");
                            let slot = plan.slot(task);
                            // The engine's loop: chunk c, its k-th slot, runs task c + k·n_chunks.
                            let (c, k) = (slot / plan.tasks_per_chunk, slot % plan.tasks_per_chunk);
                            assert_eq!(task, c + k * plan.n_chunks, "{case}");
                            assert!(!std::mem::replace(&mut slots[slot], true), "{case}");
                            for t in t0..t1 {
                                covered[t * n_kv + g] += 1;
                            }
                        }
                        assert!(covered.iter().all(|&n| n == 1), "{case}");
                    }
                }
            }
        }
    }

    /// Simulates the window cache slot by slot over steps of every size: the slots a token
    /// sees hold exactly the positions of its span, each once, and the key order lists them
    /// by position — before, at and well past the ring's wrap, with and without a sink.
    #[test]
    fn window_slots_hold_exactly_each_tokens_span() {
        for (sink, window) in [(0, 1), (0, 5), (4, 1), (4, 5), (2, 16), (3, 7)] {
            for step in [1, 2, 3, 5, 8, 13, 40] {
                // What each ring slot holds, simulated by the writes `windowed` makes.
                let mut ring_holds = vec![EMPTY; window];
                let mut n_past = 0;
                while n_past < 120 {
                    let n_tok = step;
                    let mut positions = vec![0; sink + window + n_tok];
                    window_slot_positions(sink, window, n_past, n_tok, &mut positions);
                    let case = format!("sink {sink} window {window} step {step} at {n_past}");
                    for (r, &held) in ring_holds.iter().enumerate() {
                        assert_eq!(positions[sink + r], held, "ring slot {r}: {case}");
                    }
                    for t in 0..n_tok {
                        let p = n_past + t;
                        let mut seen: Vec<usize> = positions
                            .iter()
                            .copied()
                            .filter(|&q| q <= p && (q < sink || q + window > p))
                            .collect();
                        seen.sort_unstable();
                        let want: Vec<usize> =
                            (0..=p).filter(|&q| q < sink || q + window > p).collect();
                        assert_eq!(seen, want, "token {p}: {case}");
                    }
                    // The key order lists every slot that holds a position once, in
                    // position order, entry j at j ≡ position (mod LANE_PERIOD).
                    let mut order = Vec::new();
                    window_key_order(sink, window, n_past, n_tok, &mut order);
                    assert!(
                        order.len() <= window_key_order_cap(positions.len()),
                        "{case}"
                    );
                    let listed: Vec<(usize, usize)> = order
                        .iter()
                        .enumerate()
                        .filter(|&(_, &slot)| slot != EMPTY)
                        .map(|(j, &slot)| (j, positions[slot]))
                        .collect();
                    let mut held: Vec<usize> =
                        positions.iter().copied().filter(|&p| p != EMPTY).collect();
                    held.sort_unstable();
                    let in_order: Vec<usize> = listed.iter().map(|&(_, p)| p).collect();
                    assert_eq!(in_order, held, "key order: {case}");
                    for (j, p) in listed {
                        assert_eq!(j % LANE_PERIOD, p % LANE_PERIOD, "entry {j}: {case}");
                    }
                    // A sub-block of tokens ..s1 finds every key it sees among the entries
                    // it keeps and that key's score among the slots it scores.
                    for s1 in 1..=n_tok {
                        let kept = window_sub_block_keys(order.len(), n_tok, s1);
                        assert!(
                            kept.is_multiple_of(LANE_PERIOD) || kept == order.len(),
                            "{case}"
                        );
                        let scored: Vec<_> = window_score_slots(sink, window, n_past, s1).collect();
                        for r in &scored {
                            assert!(
                                r.start.is_multiple_of(attention::KEY_PANEL),
                                "{r:?}: {case}"
                            );
                            assert!(r.end <= positions.len(), "{r:?}: {case}");
                        }
                        for (j, &slot) in order.iter().enumerate() {
                            let Some(&q) = positions.get(slot) else {
                                continue;
                            };
                            let p = n_past + s1 - 1;
                            let seen_by_one =
                                (n_past..=p).any(|p| q <= p && (q < sink || q + window > p));
                            if seen_by_one {
                                assert!(j < kept, "entry {j} past {kept}, s1 {s1}: {case}");
                                assert!(
                                    scored.iter().any(|r| r.contains(&slot)),
                                    "slot {slot} unscored, s1 {s1}: {case}"
                                );
                            }
                        }
                    }
                    for t in n_tok.saturating_sub(window)..n_tok {
                        let pos = n_past + t;
                        if pos >= sink {
                            ring_holds[(pos - sink) % window] = pos;
                        }
                    }
                    n_past += n_tok;
                }
            }
        }
    }
}
