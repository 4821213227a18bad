//! The forward pass: batched prefill and single-token decode over a KV cache.
//!
//! Every buffer is allocated once in [`Session::new`]; `forward` allocates nothing.

use edgefusion_kernels::{f32ops, GgmlType};
use edgefusion_model::{Linear, Mixer, Model, ModelConfig, RopeScaling, RopeStyle};
use rayon::prelude::*;

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
}

impl SessionOptions {
    pub fn new(n_ctx: usize, n_threads: usize) -> Self {
        SessionOptions {
            n_ctx,
            n_threads,
            max_batch: 512,
            max_logits: 1,
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
    fn get(&mut self, threads: &Threads, w: &Linear<'_>, x: &[f32], n_tok: usize) -> (&[u8], usize) {
        let ty = w.act_type();
        let width = w.n_in;
        let row_bytes = ty.row_bytes(width).unwrap_or(width * 4);
        let Some(entry) = self.bufs.iter_mut().find(|b| b.0 == ty) else {
            unreachable!("activation format {} has no buffer", ty.name())
        };
        if !entry.2 {
            let dst = &mut entry.1[..n_tok * row_bytes];
            let src = &x[..n_tok * width];
            if n_tok == 1 || threads.n_threads() == 1 {
                for (d, s) in dst.chunks_mut(row_bytes).zip(src.chunks(width)) {
                    edgefusion_kernels::quantize_row(ty, s, d);
                }
            } else {
                threads.install(|| {
                    dst.par_chunks_mut(row_bytes)
                        .zip(src.par_chunks(width))
                        .for_each(|(d, s)| edgefusion_kernels::quantize_row(ty, s, d));
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
}

/// Keys and values of every attention layer, f32, `(n_layers, n_ctx, kv_dim)` each.
struct KvCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// RoPE rotation angles per position: `(n_ctx, rope_dim / 2)` cosines and sines.
struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    fn new(cfg: &ModelConfig, n_ctx: usize) -> Self {
        let half = cfg.rope_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let base = (cfg.rope_base as f64).powf(-2.0 * i as f64 / cfg.rope_dim as f64);
                match cfg.rope_scaling {
                    RopeScaling::None => base,
                    RopeScaling::Linear { factor } => base / factor as f64,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_context,
                    } => {
                        let (factor, low, high) =
                            (factor as f64, low_freq_factor as f64, high_freq_factor as f64);
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        let low_wavelen = original_context as f64 / low;
                        let high_wavelen = original_context as f64 / high;
                        if wavelen < high_wavelen {
                            base
                        } else if wavelen > low_wavelen {
                            base / factor
                        } else {
                            let smooth = (original_context as f64 / wavelen - low) / (high - low);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                }
            })
            .collect();
        let mut cos = vec![0.0f32; n_ctx * half];
        let mut sin = vec![0.0f32; n_ctx * half];
        for pos in 0..n_ctx {
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = pos as f64 * f;
                cos[pos * half + i] = angle.cos() as f32;
                sin[pos * half + i] = angle.sin() as f32;
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
        let threads = Threads::new(opts.n_threads)
            .map_err(|e| RuntimeError::InvalidOption(format!("cannot start threads: {e}")))?;
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
        };
        let n_attention = model
            .layers
            .iter()
            .filter(|l| matches!(l.mixer, Mixer::Attention(_)))
            .count();
        let kv_len = n_attention * opts.n_ctx * cfg.kv_dim();
        let kv = KvCache {
            keys: vec![0.0; kv_len],
            values: vec![0.0; kv_len],
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

    /// Bytes held by the KV cache at full context.
    pub fn kv_bytes(&self) -> usize {
        (self.kv.keys.len() + self.kv.values.len()) * std::mem::size_of::<f32>()
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
            rms_norm(&st.x[..n_tok * d], &layer.attn_norm, cfg.rms_eps, &mut st.xn[..n_tok * d]);
            st.act.invalidate();
            match &layer.mixer {
                Mixer::Attention(attn) => {
                    for (w, bias, out) in [
                        (&attn.wq, &attn.bq, &mut st.q),
                        (&attn.wk, &attn.bk, &mut st.k),
                        (&attn.wv, &attn.bv, &mut st.v),
                    ] {
                        let (act, act_row) = st.act.get(threads, w, &st.xn, n_tok);
                        threads.install(|| threads.linear(w, act, act_row, n_tok, out));
                        if let Some(bias) = bias {
                            for row in out[..n_tok * w.n_out].chunks_mut(w.n_out) {
                                add_assign(row, bias);
                            }
                        }
                    }
                    let layer_kv = KvLayer {
                        keys: &mut kv.keys,
                        values: &mut kv.values,
                        base: attn_index * opts.n_ctx * cfg.kv_dim(),
                        n_ctx: opts.n_ctx,
                    };
                    attention(cfg, threads, st, layer_kv, rope, *n_past, n_tok);
                    st.act.invalidate();
                    let (act, act_row) = st.act.get(threads, &attn.wo, &st.att, n_tok);
                    threads.install(|| threads.linear(&attn.wo, act, act_row, n_tok, &mut st.proj));
                    attn_index += 1;
                }
            }
            add_assign(&mut st.x[..n_tok * d], &st.proj[..n_tok * d]);

            rms_norm(&st.x[..n_tok * d], &layer.ffn_norm, cfg.rms_eps, &mut st.xn[..n_tok * d]);
            st.act.invalidate();
            let ffn = &layer.ffn;
            let (act, act_row) = st.act.get(threads, &ffn.gate, &st.xn, n_tok);
            threads.install(|| threads.linear(&ffn.gate, act, act_row, n_tok, &mut st.gate));
            let (act, act_row) = st.act.get(threads, &ffn.up, &st.xn, n_tok);
            threads.install(|| threads.linear(&ffn.up, act, act_row, n_tok, &mut st.up));
            swiglu(&mut st.gate[..n_tok * cfg.d_ff], &st.up[..n_tok * cfg.d_ff]);
            st.act.invalidate();
            let (act, act_row) = st.act.get(threads, &ffn.down, &st.gate, n_tok);
            threads.install(|| threads.linear(&ffn.down, act, act_row, n_tok, &mut st.proj));
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
        threads.install(|| threads.linear(head, act, act_row, n, out));
    }
}

/// One attention layer's slice of the KV cache: `(n_ctx, kv_dim)` from `base`.
struct KvLayer<'a> {
    keys: &'a mut [f32],
    values: &'a mut [f32],
    base: usize,
    n_ctx: usize,
}

/// RoPE on the step's q and k, appends k and v to the cache, then causal attention of each
/// new token over every cached position up to its own, into `state.att`.
fn attention(
    cfg: &ModelConfig,
    threads: &Threads,
    st: &mut RunState,
    kv: KvLayer<'_>,
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
    keys[new.clone()].copy_from_slice(&st.k[..n_tok * kv_dim]);
    values[new].copy_from_slice(&st.v[..n_tok * kv_dim]);
    let (keys, values) = (&*keys, &*values);

    let q = &st.q;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_task = heads_per_task(n_tok * n_heads, threads.n_threads());
    threads.install(|| {
        threads.for_chunks(&mut st.att[..n_tok * n_heads * hd], hd * per_task, |i, chunk| {
            for (j, out) in chunk.chunks_mut(hd).enumerate() {
                let item = i * per_task + j;
                let (t, h) = (item / n_heads, item % n_heads);
                let q_head = &q[item * hd..(item + 1) * hd];
                let offset = (h / group) * hd;
                attend_one_head(q_head, keys, values, kv_dim, offset, n_past + t + 1, scale, out);
            }
        });
    });
}

/// How many (token, head) pairs one parallel task takes: enough tasks to balance the threads.
fn heads_per_task(n_items: usize, n_threads: usize) -> usize {
    n_items.div_ceil(n_threads * 4).max(1)
}

/// Softmax attention of one query head over `n_pos` cached positions, with an online
/// softmax so no score buffer is needed.
/// keys, values: (n_ctx, kv_dim); the head's slice starts at `offset` in each row.
#[allow(clippy::too_many_arguments)]
fn attend_one_head(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    kv_dim: usize,
    offset: usize,
    n_pos: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    out.fill(0.0);
    let mut max_score = f32::NEG_INFINITY;
    let mut denom = 0.0f32;
    for pos in 0..n_pos {
        let row = pos * kv_dim + offset;
        let score = f32ops::dot(q, &keys[row..row + hd]) * scale;
        if score > max_score {
            let correction = (max_score - score).exp();
            denom *= correction;
            f32ops::scale(out, correction);
            max_score = score;
        }
        let weight = (score - max_score).exp();
        denom += weight;
        f32ops::axpy(weight, &values[row..row + hd], out);
    }
    f32ops::scale(out, 1.0 / denom);
}

/// `out[t] = x[t] / rms(x[t]) * weight` for each row of `x (n, d)`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
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
