//! The forward pass: batched prefill and single-token decode over a KV cache.
//!
//! Every buffer is allocated once in [`Session::new`]; `forward` allocates nothing.

use edgefusion_kernels::{f32ops, GgmlType};
use edgefusion_model::{Linear, Mixer, Model, ModelConfig, RopeScaling, RopeStyle};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::parallel::Threads;
use crate::RuntimeError;

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token of the batch (generation).
    Last,
    /// Every token from batch index `start` on (perplexity, scoring continuations).
    From(usize),
}

#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context size: the KV cache holds this many positions.
    pub n_ctx: usize,
    pub n_threads: usize,
    /// Tokens processed per forward step; longer inputs are split into steps of this size.
    pub max_batch: usize,
    /// Largest number of positions whose logits one `forward` call returns.
    pub max_logits: usize,
    pub kv_type: KvType,
}

impl SessionOptions {
    pub fn new(n_ctx: usize, n_threads: usize) -> Self {
        SessionOptions {
            n_ctx,
            n_threads,
            max_batch: 512,
            max_logits: 1,
            kv_type: KvType::F16,
        }
    }
}

/// Activations quantized to each format a weight may ask for, computed once per input.
struct ActCache {
    /// One buffer per activation format, each `max_batch` rows of the widest input.
    bufs: [(GgmlType, Vec<u8>, bool); 4],
}

impl ActCache {
    fn new(max_rows: usize, max_width: usize) -> Self {
        let buf = |ty: GgmlType| {
            let row = ty.row_bytes(max_width).unwrap_or(max_width * 4);
            (ty, vec![0u8; max_rows * row], false)
        };
        ActCache {
            bufs: [
                buf(GgmlType::F32),
                buf(GgmlType::Q8_0),
                buf(GgmlType::Q8_1),
                buf(GgmlType::Q8K),
            ],
        }
    }

    fn invalidate(&mut self) {
        for b in &mut self.bufs {
            b.2 = false;
        }
    }

    /// The rows of `x (n_tok, width)` in `w`'s activation format, quantizing them on first use.
    fn get(
        &mut self,
        threads: &Threads,
        w: &Linear<'_>,
        x: &[f32],
        n_tok: usize,
    ) -> (&[u8], usize) {
        let ty = w.act_type();
        let width = w.n_in;
        let row_bytes = ty.row_bytes(width).unwrap_or(width * 4);
        let Some(entry) = self.bufs.iter_mut().find(|b| b.0 == ty) else {
            unreachable!("activation format {} has no buffer", ty.name())
        };
        if !entry.2 {
            let dst = &mut entry.1[..n_tok * row_bytes];
            let src = &x[..n_tok * width];
            if n_tok == 1 {
                edgefusion_kernels::quantize_row(ty, src, dst);
            } else {
                threads.for_chunks(dst, row_bytes, |t, d| {
                    edgefusion_kernels::quantize_row(ty, &src[t * width..(t + 1) * width], d);
                });
            }
            entry.2 = true;
        }
        (&entry.1[..n_tok * row_bytes], row_bytes)
    }
}

/// Scratch for one forward step of up to `max_batch` tokens.
struct RunState {
    /// Residual stream (max_batch, d_model)
    x: Vec<f32>,
    /// Normalised input of a sub-block (max_batch, max(d_model, q_dim))
    xn: Vec<f32>,
    /// (max_batch, q_dim)
    q: Vec<f32>,
    /// (max_batch, kv_dim)
    k: Vec<f32>,
    /// (max_batch, kv_dim)
    v: Vec<f32>,
    /// Attention output before `wo`: (max_batch, q_dim)
    att: Vec<f32>,
    /// (max_batch, d_model): output of `wo` or `down`, added to `x`
    proj: Vec<f32>,
    /// (max_batch, d_ff)
    gate: Vec<f32>,
    /// (max_batch, d_ff)
    up: Vec<f32>,
    /// (max_logits, vocab_size)
    logits: Vec<f32>,
    act: ActCache,
    /// Per attention task: scores `(gqa_group, n_ctx)`, then the f16-rounded queries
    /// `(gqa_group, head_dim)`, then one key or value row `(head_dim)`.
    attn_scratch: Vec<f32>,
}

/// Storage type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    /// llama.cpp's default: half the memory of f32, and the same rounding, which keeps greedy
    /// decoding token-identical to it.
    F16,
    /// Exact keys and values (reference comparisons).
    F32,
}

/// A type the KV cache can hold.
trait KvElement: Copy + Send + Sync + 'static {
    fn store(src: &[f32], dst: &mut [Self]);
    fn load(src: &[Self], dst: &mut [f32]);
    /// llama.cpp converts the other operand of a product with the cache to the cache's type
    /// (queries for keys, probabilities for values); this is that rounding.
    fn round(x: f32) -> f32;
}

impl KvElement for f32 {
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn round(x: f32) -> f32 {
        x
    }
}

impl KvElement for f16 {
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
}

/// Keys and values of every attention layer, `(n_attention_layers, n_ctx, kv_dim)` each.
enum KvCache {
    F16 { keys: Vec<f16>, values: Vec<f16> },
    F32 { keys: Vec<f32>, values: Vec<f32> },
}

impl KvCache {
    fn bytes(&self) -> usize {
        match self {
            KvCache::F16 { keys, values } => (keys.len() + values.len()) * 2,
            KvCache::F32 { keys, values } => (keys.len() + values.len()) * 4,
        }
    }
}

/// RoPE rotation angles per position: `(n_ctx, rope_dim / 2)` cosines and sines.
struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// Angles as llama.cpp computes them (`ggml_rope_cache_init`), in f32 with the
    /// frequency advanced by repeated multiplication, so positions rotate identically.
    fn new(cfg: &ModelConfig, n_ctx: usize) -> Self {
        let half = cfg.rope_dim / 2;
        let theta_scale = cfg.rope_base.powf(-2.0 / cfg.rope_dim as f32);
        // Per-frequency divisor of the angle (1 = unscaled).
        let freq_divisor: Vec<f32> = (0..half)
            .map(|i| match cfg.rope_scaling {
                RopeScaling::None => 1.0,
                RopeScaling::Linear { factor } => factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context,
                } => {
                    let freq = theta_scale.powi(i as i32);
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    let low_wavelen = original_context as f32 / low_freq_factor;
                    let high_wavelen = original_context as f32 / high_freq_factor;
                    if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let smooth = (original_context as f32 / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                }
            })
            .collect();
        let mut cos = vec![0.0f32; n_ctx * half];
        let mut sin = vec![0.0f32; n_ctx * half];
        for pos in 0..n_ctx {
            let mut theta = pos as f32;
            for i in 0..half {
                let angle = theta / freq_divisor[i];
                cos[pos * half + i] = angle.cos();
                sin[pos * half + i] = angle.sin();
                theta *= theta_scale;
            }
        }
        RopeTable { cos, sin, half }
    }

    /// Rotates one head `(head_dim)` in place for position `pos`.
    #[inline]
    fn apply(&self, head: &mut [f32], pos: usize, style: RopeStyle) {
        let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
        let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
        match style {
            RopeStyle::Normal => {
                for i in 0..self.half {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
            RopeStyle::NeoX => {
                for i in 0..self.half {
                    let (a, b) = (head[i], head[i + self.half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + self.half] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// One inference session over a model: its KV cache, scratch and thread pool.
pub struct Session<'m> {
    model: &'m Model<'m>,
    opts: SessionOptions,
    threads: Threads,
    state: RunState,
    kv: KvCache,
    rope: RopeTable,
    n_past: usize,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model<'m>, opts: SessionOptions) -> Result<Self, RuntimeError> {
        let cfg = &model.config;
        if opts.n_threads == 0 {
            return Err(RuntimeError::InvalidOption(
                "thread count must be at least 1".into(),
            ));
        }
        if opts.n_ctx == 0 {
            return Err(RuntimeError::InvalidOption(
                "context size must be at least 1".into(),
            ));
        }
        let max_batch = opts.max_batch.clamp(1, opts.n_ctx);
        let max_logits = opts.max_logits.clamp(1, opts.n_ctx);
        let opts = SessionOptions {
            max_batch,
            max_logits,
            ..opts
        };
        let threads = Threads::new(opts.n_threads).map_err(|e| {
            RuntimeError::InvalidOption(format!("cannot start {} threads: {e}", opts.n_threads))
        })?;
        let widest = cfg.d_model.max(cfg.q_dim()).max(cfg.d_ff);
        let state = RunState {
            x: vec![0.0; max_batch * cfg.d_model],
            xn: vec![0.0; max_batch * cfg.d_model.max(cfg.q_dim())],
            q: vec![0.0; max_batch * cfg.q_dim()],
            k: vec![0.0; max_batch * cfg.kv_dim()],
            v: vec![0.0; max_batch * cfg.kv_dim()],
            att: vec![0.0; max_batch * cfg.q_dim()],
            proj: vec![0.0; max_batch * cfg.d_model],
            gate: vec![0.0; max_batch * cfg.d_ff],
            up: vec![0.0; max_batch * cfg.d_ff],
            logits: vec![0.0; max_logits * cfg.vocab_size],
            act: ActCache::new(max_batch, widest),
            attn_scratch: vec![
                0.0;
                MAX_ATTN_TASKS_PER_THREAD
                    * opts.n_threads
                    * attn_task_scratch(cfg, opts.n_ctx)
            ],
        };
        let n_attention = model
            .layers
            .iter()
            .filter(|l| matches!(l.mixer, Mixer::Attention(_)))
            .count();
        let kv_len = n_attention * opts.n_ctx * cfg.kv_dim();
        let kv = match opts.kv_type {
            // Zeroed allocations: the OS maps pages as positions are used, so a long context
            // costs memory only once it is filled.
            KvType::F16 => KvCache::F16 {
                keys: bytemuck::zeroed_vec(kv_len),
                values: bytemuck::zeroed_vec(kv_len),
            },
            KvType::F32 => KvCache::F32 {
                keys: vec![0.0; kv_len],
                values: vec![0.0; kv_len],
            },
        };
        let rope = RopeTable::new(cfg, opts.n_ctx);
        Ok(Session {
            model,
            opts,
            threads,
            state,
            kv,
            rope,
            n_past: 0,
        })
    }

    pub fn model(&self) -> &'m Model<'m> {
        self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.opts.n_ctx
    }

    pub fn n_threads(&self) -> usize {
        self.threads.n_threads()
    }

    /// Positions already in the KV cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Forgets every position from `n` on, keeping the prefix (prefix reuse).
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }

    /// Bytes of KV cache per context position.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.kv.bytes() / self.opts.n_ctx
    }

    /// Bytes held by the KV cache at full context.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Largest number of positions one call to `forward` may return logits for.
    pub fn max_logits(&self) -> usize {
        self.opts.max_logits
    }

    /// Feeds `tokens` at positions `n_past..`, appends them to the KV cache and returns the
    /// requested logits, `(n, vocab_size)` row-major.
    pub fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<&[f32], RuntimeError> {
        let cfg = &self.model.config;
        if tokens.is_empty() {
            return Err(RuntimeError::InvalidOption("no tokens to process".into()));
        }
        if self.n_past + tokens.len() > self.opts.n_ctx {
            return Err(RuntimeError::ContextFull {
                n_past: self.n_past,
                n_new: tokens.len(),
                n_ctx: self.opts.n_ctx,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(RuntimeError::TokenOutOfRange {
                token: bad,
                vocab_size: cfg.vocab_size,
            });
        }
        let first_logit = match logits {
            Logits::Last => tokens.len() - 1,
            Logits::From(start) => start.min(tokens.len() - 1),
        };
        let n_logits = tokens.len() - first_logit;
        if n_logits > self.opts.max_logits {
            return Err(RuntimeError::InvalidOption(format!(
                "{n_logits} positions of logits requested but the session holds at most {}",
                self.opts.max_logits
            )));
        }
        let vocab = cfg.vocab_size;
        let mut written = 0;
        let mut t0 = 0;
        while t0 < tokens.len() {
            let t1 = (t0 + self.opts.max_batch).min(tokens.len());
            self.step(&tokens[t0..t1]);
            // Logits for batch positions first_logit.. that fall in this step.
            let from = first_logit.max(t0);
            if from < t1 {
                let n = t1 - from;
                self.head(from - t0, n, written);
                written += n;
            }
            t0 = t1;
        }
        Ok(&self.state.logits[..written * vocab])
    }

    /// One forward step of at most `max_batch` tokens through every layer; leaves the final
    /// residual stream in `state.x`.
    fn step(&mut self, tokens: &[u32]) {
        let Session {
            model,
            opts,
            threads,
            state: st,
            kv,
            rope,
            n_past,
        } = self;
        let model: &Model<'_> = model;
        let cfg = &model.config;
        let n_tok = tokens.len();
        let d = cfg.d_model;

        for (t, &tok) in tokens.iter().enumerate() {
            model
                .token_embd
                .dequantize_row_into(tok as usize, &mut st.x[t * d..(t + 1) * d]);
        }

        let mut attn_index = 0;
        for layer in &model.layers {
            rms_norm(
                &st.x[..n_tok * d],
                &layer.attn_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            st.act.invalidate();
            match &layer.mixer {
                Mixer::Attention(attn) => {
                    for (w, bias, out) in [
                        (&attn.wq, &attn.bq, &mut st.q),
                        (&attn.wk, &attn.bk, &mut st.k),
                        (&attn.wv, &attn.bv, &mut st.v),
                    ] {
                        let (act, act_row) = st.act.get(threads, w, &st.xn, n_tok);
                        threads.linear(w, act, act_row, n_tok, out);
                        if let Some(bias) = bias {
                            for row in out[..n_tok * w.n_out].chunks_mut(w.n_out) {
                                add_assign(row, bias);
                            }
                        }
                    }
                    let base = attn_index * opts.n_ctx * cfg.kv_dim();
                    let n_ctx = opts.n_ctx;
                    match kv {
                        KvCache::F16 { keys, values } => {
                            let layer_kv = KvLayer {
                                keys,
                                values,
                                base,
                                n_ctx,
                            };
                            attention(cfg, threads, st, layer_kv, rope, *n_past, n_tok);
                        }
                        KvCache::F32 { keys, values } => {
                            let layer_kv = KvLayer {
                                keys,
                                values,
                                base,
                                n_ctx,
                            };
                            attention(cfg, threads, st, layer_kv, rope, *n_past, n_tok);
                        }
                    }
                    st.act.invalidate();
                    let (act, act_row) = st.act.get(threads, &attn.wo, &st.att, n_tok);
                    threads.linear(&attn.wo, act, act_row, n_tok, &mut st.proj);
                    attn_index += 1;
                }
            }
            add_assign(&mut st.x[..n_tok * d], &st.proj[..n_tok * d]);

            rms_norm(
                &st.x[..n_tok * d],
                &layer.ffn_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            st.act.invalidate();
            let ffn = &layer.ffn;
            let (act, act_row) = st.act.get(threads, &ffn.gate, &st.xn, n_tok);
            threads.linear(&ffn.gate, act, act_row, n_tok, &mut st.gate);
            let (act, act_row) = st.act.get(threads, &ffn.up, &st.xn, n_tok);
            threads.linear(&ffn.up, act, act_row, n_tok, &mut st.up);
            swiglu(&mut st.gate[..n_tok * cfg.d_ff], &st.up[..n_tok * cfg.d_ff]);
            st.act.invalidate();
            let (act, act_row) = st.act.get(threads, &ffn.down, &st.gate, n_tok);
            threads.linear(&ffn.down, act, act_row, n_tok, &mut st.proj);
            add_assign(&mut st.x[..n_tok * d], &st.proj[..n_tok * d]);
        }
        *n_past += n_tok;
    }

    /// Final norm and output head for step rows `row0..row0 + n`, into logits rows `dst_row..`.
    fn head(&mut self, row0: usize, n: usize, dst_row: usize) {
        let model = self.model;
        let cfg = &model.config;
        let d = cfg.d_model;
        let st = &mut self.state;
        rms_norm(
            &st.x[row0 * d..(row0 + n) * d],
            &model.output_norm,
            cfg.rms_eps,
            &mut st.xn[..n * d],
        );
        st.act.invalidate();
        let head = model.head();
        let threads = &self.threads;
        let (act, act_row) = st.act.get(threads, head, &st.xn, n);
        let vocab = cfg.vocab_size;
        let out = &mut st.logits[dst_row * vocab..(dst_row + n) * vocab];
        threads.linear(head, act, act_row, n, out);
    }
}

/// One attention layer's slice of the KV cache: `(n_ctx, kv_dim)` from `base`.
struct KvLayer<'a, T> {
    keys: &'a mut [T],
    values: &'a mut [T],
    base: usize,
    n_ctx: usize,
}

/// RoPE on the step's q and k, appends k and v to the cache, then causal attention of each
/// new token over every cached position up to its own, into `state.att`.
fn attention<T: KvElement>(
    cfg: &ModelConfig,
    threads: &Threads,
    st: &mut RunState,
    kv: KvLayer<'_, T>,
    rope: &RopeTable,
    n_past: usize,
    n_tok: usize,
) {
    let (hd, n_heads, n_kv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    let kv_dim = cfg.kv_dim();
    let group = cfg.gqa_group();
    let style = cfg.rope_style;

    for t in 0..n_tok {
        let pos = n_past + t;
        for head in st.q[t * n_heads * hd..(t + 1) * n_heads * hd].chunks_mut(hd) {
            rope.apply(head, pos, style);
        }
        for head in st.k[t * n_kv * hd..(t + 1) * n_kv * hd].chunks_mut(hd) {
            rope.apply(head, pos, style);
        }
    }
    let layer = kv.base..kv.base + kv.n_ctx * kv_dim;
    let keys = &mut kv.keys[layer.clone()];
    let values = &mut kv.values[layer];
    let new = n_past * kv_dim..(n_past + n_tok) * kv_dim;
    T::store(&st.k[..n_tok * kv_dim], &mut keys[new.clone()]);
    T::store(&st.v[..n_tok * kv_dim], &mut values[new]);
    let (keys, values) = (&*keys, &*values);

    // One task per (token, KV head): the query heads of a GQA group share each key and value
    // row, so every row is converted from f16 once per group.
    let q = &st.q;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_items = n_tok * n_kv;
    let max_tasks = MAX_ATTN_TASKS_PER_THREAD * threads.n_threads();
    let per_task = n_items.div_ceil(max_tasks).max(1);
    let scratch_len = attn_task_scratch(cfg, kv.n_ctx);
    let group_width = group * hd;
    {
        threads.for_chunks_with_scratch(
            &mut st.att[..n_tok * n_heads * hd],
            group_width * per_task,
            &mut st.attn_scratch,
            scratch_len,
            |i, chunk, scratch| {
                for (j, out) in chunk.chunks_mut(group_width).enumerate() {
                    let item = i * per_task + j;
                    let (t, g) = (item / n_kv, item % n_kv);
                    let q_group =
                        &q[(t * n_heads + g * group) * hd..(t * n_heads + (g + 1) * group) * hd];
                    let rows = KvRows {
                        keys,
                        values,
                        kv_dim,
                        offset: g * hd,
                        head_dim: hd,
                    };
                    attend_group(q_group, &rows, n_past + t + 1, scale, scratch, out);
                }
            },
        );
    }
}

/// Attention tasks per thread: enough to balance uneven work (causal rows differ in length).
const MAX_ATTN_TASKS_PER_THREAD: usize = 4;

/// Scratch floats one attention task needs.
fn attn_task_scratch(cfg: &ModelConfig, n_ctx: usize) -> usize {
    cfg.gqa_group() * (n_ctx + cfg.head_dim) + cfg.head_dim
}

/// One KV head's view of a layer's cache: rows `(n_ctx, kv_dim)`, this head's slice at `offset`.
struct KvRows<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    kv_dim: usize,
    offset: usize,
    head_dim: usize,
}

/// Causal softmax attention of the query heads of one GQA group `(group, head_dim)` over the
/// first `n_pos` cached positions, into `out (group, head_dim)`.
///
/// Numerics follow llama.cpp's CPU path: queries rounded to the cache's type for the key dot
/// products, scores and softmax in f32 (the sum in f64), probabilities rounded to the cache's
/// type before weighting the values.
fn attend_group<T: KvElement>(
    q_group: &[f32],
    kv: &KvRows<'_, T>,
    n_pos: usize,
    scale: f32,
    scratch: &mut [f32],
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let group = out.len() / hd;
    let (scores, rest) = scratch.split_at_mut(group * n_pos.max(1));
    let (q16, rest) = rest.split_at_mut(group * hd);
    let row = &mut rest[..hd];
    for (dst, &src) in q16.iter_mut().zip(q_group) {
        *dst = T::round(src);
    }
    for pos in 0..n_pos {
        let start = pos * kv.kv_dim + kv.offset;
        T::load(&kv.keys[start..start + hd], row);
        for (h, q_head) in q16.chunks(hd).enumerate() {
            scores[h * n_pos + pos] = f32ops::dot(q_head, row) * scale;
        }
    }
    for h_scores in scores.chunks_mut(n_pos) {
        let max = h_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for s in h_scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let inv = (1.0 / sum) as f32;
        for s in h_scores.iter_mut() {
            *s = T::round(*s * inv);
        }
    }
    out.fill(0.0);
    for pos in 0..n_pos {
        let start = pos * kv.kv_dim + kv.offset;
        T::load(&kv.values[start..start + hd], row);
        for (h, out_head) in out.chunks_mut(hd).enumerate() {
            f32ops::axpy(scores[h * n_pos + pos], row, out_head);
        }
    }
}

/// `out[t] = x[t] / rms(x[t]) * weight` for each row of `x (n, d)`.
///
/// The arithmetic is llama.cpp's (`ggml_compute_forward_rms_norm_f32` then `ggml_mul`): squares
/// in f32 summed in f64, the mean rounded to f32, then `(x * scale) * weight` in f32. The next
/// step quantizes these values to 8 bits, and inputs that come from a quantized embedding hit
/// exact rounding ties, so the last bit here decides tokens downstream.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let sum_sq: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum_sq / d as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

/// `gate = silu(gate) * up`, elementwise.
fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
