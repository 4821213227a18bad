//! The forward pass: batched prefill and single-token decode over a KV cache.
//!
//! Every buffer is allocated once in [`Session::new`]; `forward` allocates nothing.

use edgefusion_kernels::attention::{self, KvElement};
use edgefusion_kernels::{f32ops, GgmlType};
use edgefusion_model::{ActFormat, Linear, Mixer, Model, ModelConfig, RopeScaling, RopeStyle};
use half::f16;

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
    bufs: [(ActFormat, Vec<u8>, bool); 5],
}

impl ActCache {
    fn new(max_rows: usize, max_width: usize) -> Self {
        let buf = |format: ActFormat| {
            (
                format,
                vec![0u8; max_rows * format.row_bytes(max_width)],
                false,
            )
        };
        ActCache {
            bufs: [
                buf(ActFormat::Ggml(GgmlType::F32)),
                buf(ActFormat::Ggml(GgmlType::Q8_0)),
                buf(ActFormat::Ggml(GgmlType::Q8_1)),
                buf(ActFormat::Ggml(GgmlType::Q8K)),
                buf(ActFormat::EfqQ8),
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
        let format = w.act_format();
        let width = w.n_in;
        let row_bytes = format.row_bytes(width);
        let Some(entry) = self.bufs.iter_mut().find(|b| b.0 == format) else {
            unreachable!("activation format {format:?} has no buffer")
        };
        if !entry.2 {
            let dst = &mut entry.1[..n_tok * row_bytes];
            let src = &x[..n_tok * width];
            if n_tok == 1 {
                format.quantize_row(src, dst);
            } else {
                threads.for_chunks(dst, row_bytes, |t, d| {
                    format.quantize_row(&src[t * width..(t + 1) * width], d);
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
    /// Attention output as the tasks write it, one slot per task (see [`AttnPlan`]):
    /// (n_chunks, tasks_per_chunk, block_tokens, gqa_group, head_dim)
    att_tasks: Vec<f32>,
    /// (max_batch, d_model): output of `wo` or `down`, added to `x`
    proj: Vec<f32>,
    /// (max_batch, d_ff)
    gate: Vec<f32>,
    /// (max_batch, d_ff)
    up: Vec<f32>,
    /// (max_logits, vocab_size)
    logits: Vec<f32>,
    act: ActCache,
    /// SSM layers (empty without): C (max_batch, n_heads · N), B (max_batch, n_kv_heads · N),
    /// x (max_batch, kv_dim), Δ and gate (max_batch, n_kv_heads).
    ssm_c: Vec<f32>,
    ssm_b: Vec<f32>,
    ssm_x: Vec<f32>,
    ssm_dt: Vec<f32>,
    ssm_gate: Vec<f32>,
    /// Per attention chunk: a task's queries rounded to the cache type
    /// `(block_tokens · gqa_group, head_dim)`, then the scores and probabilities of one
    /// sub-block `(sub_block_tokens · gqa_group, n_keys)` (see [`AttnPlan`]).
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

/// Keys and values of every attention layer, in the layouts of the attention kernels:
/// keys `(n_attention_layers, n_kv_heads, n_ctx_padded / 16, head_dim, 16)` (panels of 16
/// positions), values `(n_attention_layers, n_kv_heads, n_ctx, head_dim)`.
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
    /// Recurrent state of every SSM layer, `ModelConfig::ssm_state_floats` each: the
    /// `(n_kv_heads, N, head_dim)` state matrices, then the convolution's last
    /// `d_conv − 1` inputs `(d_conv − 1, channels)`, oldest first.
    ssm: Vec<f32>,
    rope: RopeTable,
    n_past: usize,
    observer: Option<Observer<'m>>,
}

/// Which linear layers a batch of inputs feeds (what calibration collects statistics of).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// The normalized residual stream entering q, k and v of attention layer `layer`.
    Attention { layer: usize },
    /// The attention output entering `wo`.
    AttentionOutput { layer: usize },
    /// The normalized residual stream entering the C, B, x, Δ and gate projections of SSM
    /// layer `layer`.
    Ssm { layer: usize },
    /// The gated SSM read-out entering its output projection.
    SsmOutput { layer: usize },
    /// The normalized residual stream entering `gate` and `up`.
    FeedForward { layer: usize },
    /// `silu(gate) · up` entering `down`.
    FeedForwardDown { layer: usize },
    /// The final normalized stream entering the output head (every position, not only the
    /// ones whose logits are returned).
    Head,
}

/// Called with each linear input `(n_tok, n_in)` as a forward step computes it.
pub type Observer<'m> = Box<dyn FnMut(LinearInput, &[f32], usize) + 'm>;

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
            act: ActCache::new(max_batch, widest.max(cfg.ssm_channels())),
            ssm_c: ssm_buffer(cfg, max_batch * cfg.n_heads * cfg.ssm_d_state),
            ssm_b: ssm_buffer(cfg, max_batch * cfg.n_kv_heads * cfg.ssm_d_state),
            ssm_x: ssm_buffer(cfg, max_batch * cfg.kv_dim()),
            ssm_dt: ssm_buffer(cfg, max_batch * cfg.n_kv_heads),
            ssm_gate: ssm_buffer(cfg, max_batch * cfg.n_kv_heads),
            att_tasks: vec![
                0.0;
                AttnPlan::max_out_len(cfg, max_batch, threads.n_threads(), opts.n_ctx)
            ],
            // Zeroed: only the rows a context of the current length uses get mapped.
            attn_scratch: vec![
                0.0;
                AttnPlan::max_scratch_len(
                    cfg,
                    max_batch,
                    threads.n_threads(),
                    opts.n_ctx
                )
            ],
        };
        let n_attention = model
            .layers
            .iter()
            .filter(|l| matches!(l.mixer, Mixer::Attention(_)))
            .count();
        let (layer_keys, layer_values) = layer_cache_lens(cfg, opts.n_ctx);
        let (keys_len, values_len) = (n_attention * layer_keys, n_attention * layer_values);
        let kv = match opts.kv_type {
            // Zeroed allocations: the OS maps pages as positions are used, so a long context
            // costs memory only once it is filled.
            KvType::F16 => KvCache::F16 {
                keys: bytemuck::zeroed_vec(keys_len),
                values: bytemuck::zeroed_vec(values_len),
            },
            KvType::F32 => KvCache::F32 {
                keys: vec![0.0; keys_len],
                values: vec![0.0; values_len],
            },
        };
        let rope = RopeTable::new(cfg, opts.n_ctx);
        let n_ssm = cfg.n_layers - n_attention;
        Ok(Session {
            model,
            opts,
            threads,
            state,
            kv,
            ssm: vec![0.0; n_ssm * cfg.ssm_state_floats()],
            rope,
            n_past: 0,
            observer: None,
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

    /// Empties the KV cache and the SSM states.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Forgets every position from `n` on, keeping the prefix (prefix reuse).
    ///
    /// # Errors
    /// On a model with SSM layers when `0 < n < n_past`: a recurrent state cannot be
    /// rewound (save and restore it with [`Session::ssm_state`] and
    /// [`Session::set_ssm_state`] instead).
    pub fn truncate(&mut self, n: usize) -> Result<(), RuntimeError> {
        if n > 0 && n < self.n_past && !self.ssm.is_empty() {
            return Err(RuntimeError::InvalidOption(format!(
                "cannot truncate a hybrid model's session from {} to {n} positions: SSM states do not rewind",
                self.n_past
            )));
        }
        self.n_past = self.n_past.min(n);
        Ok(())
    }

    /// Bytes of all SSM layers' recurrent state (constant in the context length).
    pub fn ssm_state_bytes(&self) -> usize {
        self.ssm.len() * 4
    }

    /// The SSM layers' recurrent state after the positions so far (empty without SSM
    /// layers), with `n_past`, to restore later with [`Session::set_ssm_state`].
    pub fn ssm_state(&self) -> (usize, &[f32]) {
        (self.n_past, &self.ssm)
    }

    /// Returns to the state saved by [`Session::ssm_state`] at `n_past` positions: the KV
    /// cache keeps its first `n_past` positions (they must not have been overwritten since).
    ///
    /// # Errors
    /// If `state` has the wrong length or `n_past` is beyond the current position.
    pub fn set_ssm_state(&mut self, n_past: usize, state: &[f32]) -> Result<(), RuntimeError> {
        if state.len() != self.ssm.len() || n_past > self.n_past {
            return Err(RuntimeError::InvalidOption(format!(
                "SSM state of {} floats at position {n_past} does not fit this session ({} floats, position {})",
                state.len(),
                self.ssm.len(),
                self.n_past
            )));
        }
        self.ssm.copy_from_slice(state);
        self.n_past = n_past;
        Ok(())
    }

    /// Bytes of KV cache per context position.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.kv.bytes() / self.opts.n_ctx
    }

    /// Bytes held by the KV cache at full context.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Calls `observer(site, inputs (n_tok, n_in), n_tok)` with the input of every linear layer
    /// during later `forward` calls (calibration); `None` stops it. Observing costs one
    /// extra normalization per step for the head's input.
    pub fn set_observer(&mut self, observer: Option<Observer<'m>>) {
        self.observer = observer;
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
            ssm,
            rope,
            n_past,
            observer,
        } = self;
        if *n_past == 0 {
            // A new sequence starts from empty recurrent states.
            ssm.fill(0.0);
        }
        let model: &Model<'_> = model;
        let n_tok = tokens.len();
        let observing = observer.is_some();
        let mut observe = |site: LinearInput, x: &[f32], width: usize| {
            if let Some(f) = observer.as_mut() {
                f(site, &x[..n_tok * width], n_tok);
            }
        };
        let cfg = &model.config;
        let d = cfg.d_model;

        for (t, &tok) in tokens.iter().enumerate() {
            model
                .token_embd
                .dequantize_row_into(tok as usize, &mut st.x[t * d..(t + 1) * d]);
        }

        let mut attn_index = 0;
        let mut ssm_states = ssm.chunks_exact_mut(cfg.ssm_state_floats().max(1));
        for (li, layer) in model.layers.iter().enumerate() {
            rms_norm(
                &st.x[..n_tok * d],
                &layer.attn_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            st.act.invalidate();
            match &layer.mixer {
                Mixer::Attention(attn) => {
                    observe(LinearInput::Attention { layer: li }, &st.xn, d);
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
                    let n_ctx = opts.n_ctx;
                    match kv {
                        KvCache::F16 { keys, values } => {
                            let layer_kv = KvLayer::new(cfg, keys, values, attn_index, n_ctx);
                            attention(cfg, threads, st, layer_kv, rope, *n_past, n_tok);
                        }
                        KvCache::F32 { keys, values } => {
                            let layer_kv = KvLayer::new(cfg, keys, values, attn_index, n_ctx);
                            attention(cfg, threads, st, layer_kv, rope, *n_past, n_tok);
                        }
                    }
                    st.act.invalidate();
                    observe(
                        LinearInput::AttentionOutput { layer: li },
                        &st.att,
                        cfg.q_dim(),
                    );
                    let (act, act_row) = st.act.get(threads, &attn.wo, &st.att, n_tok);
                    threads.linear(&attn.wo, act, act_row, n_tok, &mut st.proj);
                    attn_index += 1;
                }
                Mixer::Ssm(w) => {
                    observe(LinearInput::Ssm { layer: li }, &st.xn, d);
                    for (lin, out) in [
                        (&w.wc, &mut st.ssm_c),
                        (&w.wb, &mut st.ssm_b),
                        (&w.wx, &mut st.ssm_x),
                        (&w.wdt, &mut st.ssm_dt),
                        (&w.wgate, &mut st.ssm_gate),
                    ] {
                        let (act, act_row) = st.act.get(threads, lin, &st.xn, n_tok);
                        threads.linear(lin, act, act_row, n_tok, out);
                    }
                    let state = ssm_states.next().expect("one state per SSM layer");
                    let projections = crate::ssm::Projections {
                        c: &mut st.ssm_c,
                        b: &mut st.ssm_b,
                        x: &mut st.ssm_x,
                        dt: &st.ssm_dt,
                        gate: &st.ssm_gate,
                    };
                    crate::ssm::scan(cfg, w, projections, state, n_tok, &mut st.att);
                    st.act.invalidate();
                    observe(LinearInput::SsmOutput { layer: li }, &st.att, cfg.q_dim());
                    let (act, act_row) = st.act.get(threads, &w.wo, &st.att, n_tok);
                    threads.linear(&w.wo, act, act_row, n_tok, &mut st.proj);
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
            observe(LinearInput::FeedForward { layer: li }, &st.xn, d);
            let ffn = &layer.ffn;
            let (act, act_row) = st.act.get(threads, &ffn.gate, &st.xn, n_tok);
            threads.linear(&ffn.gate, act, act_row, n_tok, &mut st.gate);
            let (act, act_row) = st.act.get(threads, &ffn.up, &st.xn, n_tok);
            threads.linear(&ffn.up, act, act_row, n_tok, &mut st.up);
            f32ops::silu_mul(&mut st.gate[..n_tok * cfg.d_ff], &st.up[..n_tok * cfg.d_ff]);
            st.act.invalidate();
            observe(
                LinearInput::FeedForwardDown { layer: li },
                &st.gate,
                cfg.d_ff,
            );
            let (act, act_row) = st.act.get(threads, &ffn.down, &st.gate, n_tok);
            threads.linear(&ffn.down, act, act_row, n_tok, &mut st.proj);
            add_assign(&mut st.x[..n_tok * d], &st.proj[..n_tok * d]);
        }
        if observing {
            rms_norm(
                &st.x[..n_tok * d],
                &model.output_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            observe(LinearInput::Head, &st.xn, d);
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

/// A zero-length buffer for models without SSM layers.
fn ssm_buffer(cfg: &ModelConfig, len: usize) -> Vec<f32> {
    if cfg.is_hybrid() {
        vec![0.0; len]
    } else {
        Vec::new()
    }
}

/// One attention layer's slice of the KV cache.
struct KvLayer<'a, T> {
    /// (n_kv_heads, n_ctx_padded / 16, head_dim, 16)
    keys: &'a mut [T],
    /// (n_kv_heads, n_ctx, head_dim)
    values: &'a mut [T],
    n_ctx: usize,
}

impl<'a, T: KvElement> KvLayer<'a, T> {
    /// Attention layer `index` (counting attention layers only) of the whole cache.
    fn new(
        cfg: &ModelConfig,
        keys: &'a mut [T],
        values: &'a mut [T],
        index: usize,
        n_ctx: usize,
    ) -> Self {
        let (keys_len, values_len) = layer_cache_lens(cfg, n_ctx);
        KvLayer {
            keys: &mut keys[index * keys_len..(index + 1) * keys_len],
            values: &mut values[index * values_len..(index + 1) * values_len],
            n_ctx,
        }
    }
}

/// Elements of one attention layer's key and value caches for `n_ctx` positions:
/// keys `(n_kv_heads, n_ctx_padded / 16, head_dim, 16)`, values `(n_kv_heads, n_ctx, head_dim)`.
fn layer_cache_lens(cfg: &ModelConfig, n_ctx: usize) -> (usize, usize) {
    (
        cfg.n_kv_heads * attention::key_cache_len(n_ctx, cfg.head_dim),
        cfg.n_kv_heads * n_ctx * cfg.head_dim,
    )
}

/// Chunks per thread: enough to balance uneven work (causal rows differ in length).
const ATTN_CHUNKS_PER_THREAD: usize = 4;
/// Most new tokens per task.
const ATTN_MAX_BLOCK: usize = 32;
/// Most new tokens whose rows a task scores, normalizes and sums together. They all score
/// keys up to the last one's position (earlier tokens zero their masked tail), so the causal
/// waste is under this many keys per row.
const ATTN_MAX_SUB_BLOCK: usize = 4;
/// Bound on one sub-block's scores, `(sub_block · gqa_group, n_ctx)` floats, so that they stay
/// in L2 between the score, softmax and weighted-sum passes (long contexts get sub-blocks of
/// fewer tokens; one token's rows are the floor).
const ATTN_MAX_SCORE_BYTES: usize = 1 << 20;

/// How one attention call splits into tasks. A task is one KV head over a block of
/// consecutive new tokens; its query rows are the head's GQA group for each token of the
/// block, `(block_tokens, gqa_group)`, so each key and value element loaded serves them all.
/// Tasks are dealt round-robin to at most `ATTN_CHUNKS_PER_THREAD · n_threads` chunks (one
/// scratch slice each): every chunk gets early (short) and late (long) causal rows alike.
#[derive(Debug, Clone, Copy)]
struct AttnPlan {
    /// New tokens per task (the last block may be shorter).
    block: usize,
    /// New tokens per sub-block of a task.
    sub_block: usize,
    n_tasks: usize,
    n_chunks: usize,
    tasks_per_chunk: usize,
}

impl AttnPlan {
    fn new(cfg: &ModelConfig, n_tok: usize, n_threads: usize, n_ctx: usize) -> Self {
        let n_kv = cfg.n_kv_heads;
        let max_chunks = ATTN_CHUNKS_PER_THREAD * n_threads;
        // Enough blocks for one task per chunk where n_tok allows.
        let balanced = n_tok.div_ceil(max_chunks.div_ceil(n_kv));
        let block = balanced.clamp(1, ATTN_MAX_BLOCK);
        let n_tasks = n_kv * n_tok.div_ceil(block);
        let n_chunks = n_tasks.min(max_chunks);
        let token_scores = cfg.gqa_group() * n_ctx * std::mem::size_of::<f32>();
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
    fn max_out_len(cfg: &ModelConfig, max_batch: usize, n_threads: usize, n_ctx: usize) -> usize {
        (1..=max_batch)
            .map(|n| Self::new(cfg, n, n_threads, n_ctx).out_len(cfg))
            .max()
            .unwrap_or(0)
    }

    /// Largest scratch of all chunks over steps of 1..=max_batch tokens, at full context.
    fn max_scratch_len(
        cfg: &ModelConfig,
        max_batch: usize,
        n_threads: usize,
        n_ctx: usize,
    ) -> usize {
        (1..=max_batch)
            .map(|n| {
                let plan = Self::new(cfg, n, n_threads, n_ctx);
                plan.n_chunks * plan.scratch_len(cfg, n_ctx)
            })
            .max()
            .unwrap_or(0)
    }
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
    let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
    let group_width = cfg.gqa_group() * hd;
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
    let keys_per_head = kv.keys.len() / n_kv;
    let values_per_head = kv.n_ctx * hd;
    for t in 0..n_tok {
        let pos = n_past + t;
        for g in 0..n_kv {
            let new = t * kv_dim + g * hd..t * kv_dim + (g + 1) * hd;
            let keys = &mut kv.keys[g * keys_per_head..(g + 1) * keys_per_head];
            attention::store_key(keys, hd, pos, &st.k[new.clone()]);
            let row = g * values_per_head + pos * hd;
            T::store_slice(&st.v[new], &mut kv.values[row..row + hd]);
        }
    }

    let plan = AttnPlan::new(cfg, n_tok, threads.n_threads(), kv.n_ctx);
    let slot_len = plan.slot_len(cfg);
    let inputs = AttnInputs {
        cfg,
        q: &st.q[..n_tok * q_dim],
        keys: &*kv.keys,
        values: &*kv.values,
        n_ctx: kv.n_ctx,
        n_past,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    threads.for_chunks_with_scratch(
        &mut st.att_tasks[..plan.out_len(cfg)],
        plan.tasks_per_chunk * slot_len,
        &mut st.attn_scratch,
        plan.scratch_len(cfg, n_past + n_tok),
        |c, slots, scratch| {
            for (k, slot) in slots.chunks_mut(slot_len).enumerate() {
                let task = c + k * plan.n_chunks;
                if task >= plan.n_tasks {
                    break;
                }
                let (g, t0, t1) = plan.task(task, n_kv, n_tok);
                attend_block(&inputs, g, t0..t1, plan.sub_block, scratch, slot);
            }
        },
    );
    // Each task's rows `(block, group, head_dim)` to their place in `att (n_tok, q_dim)`.
    let att = &mut st.att[..n_tok * q_dim];
    for task in 0..plan.n_tasks {
        let (g, t0, t1) = plan.task(task, n_kv, n_tok);
        let slot = &st.att_tasks[plan.slot(task) * slot_len..][..(t1 - t0) * group_width];
        for (t, rows) in (t0..t1).zip(slot.chunks_exact(group_width)) {
            let dst = t * q_dim + g * group_width;
            att[dst..dst + group_width].copy_from_slice(rows);
        }
    }
}

/// What every attention task of one layer reads.
struct AttnInputs<'a, T> {
    cfg: &'a ModelConfig,
    /// Rotated queries of the step: (n_tok, q_dim)
    q: &'a [f32],
    /// (n_kv_heads, n_ctx_padded / 16, head_dim, 16)
    keys: &'a [T],
    /// (n_kv_heads, n_ctx, head_dim)
    values: &'a [T],
    n_ctx: usize,
    n_past: usize,
    /// 1 / √head_dim
    scale: f32,
}

/// Causal softmax attention of KV head `g`'s query heads for the new tokens `t0..t1` over
/// every cached position up to each token's own, `sub_block` tokens at a time, into
/// `out (t1 - t0, gqa_group, head_dim)`.
///
/// Numerics follow llama.cpp's CPU path: queries rounded to the cache's type for the key
/// products, scores and softmax in f32 (the sum in f64), probabilities rounded to the cache's
/// type before weighting the values.
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
    let values = &inp.values[g * inp.n_ctx * hd..(g + 1) * inp.n_ctx * hd];

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
        // Keys up to the sub-block's last token; earlier tokens mask their tail.
        let n_keys = inp.n_past + s1;
        // (s1 - s0, group, n_keys)
        let probs = &mut probs[..rows.len() * n_keys];
        let q_sub = &q_rows[rows.start * hd..rows.end * hd];
        attention::scores(q_sub, hd, keys, n_keys, inp.scale, probs, n_keys);
        for (i, row) in probs.chunks_exact_mut(n_keys).enumerate() {
            let pos = inp.n_past + s0 + i / group;
            let (seen, masked) = row.split_at_mut(pos + 1);
            let max = f32ops::max(seen);
            let sum = f32ops::exp_sub_max_sum(seen, max);
            f32ops::scale(seen, (1.0 / sum) as f32);
            T::round_slice(seen);
            masked.fill(0.0);
        }
        let out_sub = &mut out[rows.start * hd..rows.end * hd];
        attention::weighted_sum(probs, n_keys, values, hd, n_keys, out_sub);
        s0 = s1;
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

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_model::Arch;

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
            layer_types: vec![edgefusion_model::LayerType::Attention],
            ssm_d_state: 0,
            ssm_d_conv: 0,
        }
    }

    /// Every (token, KV head) pair belongs to exactly one task; each task's output slot lies
    /// in the chunk that runs it; and the buffers sized in `Session::new` hold every step.
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
}
