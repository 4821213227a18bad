//! The forward pass: batched prefill and single-token decode. Per layer: norm → mixer
//! (attention, windowed attention, SSM; [`crate::mixer`]) → residual → norm → feed-forward →
//! residual; then the head. Each layer keeps its own state of the sequence
//! ([`crate::mixer::LayerState`]).
//!
//! Every buffer is allocated once in [`Session::new`]; `forward` allocates nothing.

use edgefusion_kernels::{f32ops, GgmlType};
use edgefusion_model::{ActFormat, FfnAct, Linear, Mixer, Model};

use crate::batch::{Sequence, SequenceShape};
use crate::mixer::attention::{self, AttnScratch};
use crate::mixer::ssm::{self, SsmScratch};
use crate::mixer::{LayerState, MixerIo, SavedLayer};
use crate::parallel::Threads;
use crate::rope::RopeTable;
use crate::RuntimeError;

pub use crate::mixer::attention::KvType;

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
    /// Context size: the KV caches of full attention layers hold this many positions.
    pub n_ctx: usize,
    /// Threads of the pool (the most a layer uses).
    pub n_threads: usize,
    /// Whether layers may use fewer threads while that is faster (a busy machine; see
    /// `tuner.rs`). Default: on, unless `EDGEFUSION_ADAPT_THREADS=0`.
    pub adapt_threads: bool,
    /// Tokens processed per forward step; longer inputs are split into steps of this size.
    pub max_batch: usize,
    /// Largest number of positions whose logits one `forward` call returns, and of
    /// sequences in one [`Session::forward_batch`] step.
    pub max_logits: usize,
    pub kv_type: KvType,
}

impl SessionOptions {
    pub fn new(n_ctx: usize, n_threads: usize) -> Self {
        SessionOptions {
            n_ctx,
            n_threads,
            adapt_threads: std::env::var("EDGEFUSION_ADAPT_THREADS").map_or(true, |v| v != "0"),
            max_batch: 512,
            max_logits: 1,
            kv_type: KvType::F16,
        }
    }
}

/// Activations quantized to each format a weight may ask for, computed once per input.
pub(crate) struct ActCache {
    /// One buffer per activation format, each `max_batch` rows of the widest input.
    bufs: [(ActFormat, Vec<u8>, bool); 6],
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
                buf(ActFormat::EfqQ8Rotated),
            ],
        }
    }

    pub(crate) fn invalidate(&mut self) {
        for b in &mut self.bufs {
            b.2 = false;
        }
    }

    /// The rows of `x (n_tok, width)` in `w`'s activation format, quantizing them on first use.
    pub(crate) fn get(
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
    /// Normalised input of a sub-block (max_batch, d_model)
    xn: Vec<f32>,
    /// (max_batch, d_model): output of the mixer or `down`, added to `x`
    proj: Vec<f32>,
    /// (max_batch, d_model): the windowed attention's output in layers that add it to an
    /// SSM's (empty without such layers)
    proj_window: Vec<f32>,
    /// (max_batch, d_ff)
    gate: Vec<f32>,
    /// (max_batch, d_ff)
    up: Vec<f32>,
    /// (max_logits, vocab_size)
    logits: Vec<f32>,
    act: ActCache,
    attn: AttnScratch,
    ssm: SsmScratch,
    /// Position of each row in a step of several sequences (max_batch)
    pub(crate) positions: Vec<usize>,
    /// The rows of each sequence in such a step (max_logits)
    pub(crate) spans: Vec<std::ops::Range<usize>>,
}

/// One inference session over a model: each layer's state of the sequence, scratch and
/// thread pool.
pub struct Session<'m> {
    model: &'m Model<'m>,
    opts: SessionOptions,
    threads: Threads,
    state: RunState,
    /// The sequence `forward` continues ([`Session::swap_sequence`] exchanges it).
    pub(crate) seq: Sequence,
    rope: RopeTable,
    /// Angles of `window` layers that rotate with their own base (Gemma 3's local layers).
    rope_window: Option<RopeTable>,
    observer: Option<Observer<'m>>,
}

/// The constant-size state of every layer after `n_past` positions (SSM states, sinks and
/// windows), saved by [`Session::recurrent_state`] to return to later.
#[derive(Debug, Clone)]
pub struct RecurrentState {
    pub(crate) n_past: usize,
    pub(crate) layers: Vec<SavedLayer>,
    /// The session shape of the sequence it was saved from.
    pub(crate) shape: SequenceShape,
}

impl RecurrentState {
    /// Positions the state summarizes.
    pub fn n_past(&self) -> usize {
        self.n_past
    }
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
        let threads = Threads::new(opts.n_threads, opts.adapt_threads).map_err(|e| {
            RuntimeError::InvalidOption(format!("cannot start {} threads: {e}", opts.n_threads))
        })?;
        let widest = cfg.d_model.max(cfg.q_dim()).max(cfg.d_ff);
        let combined = model.layers.iter().any(|l| {
            matches!(
                &l.mixer,
                Mixer::Ssm {
                    window: Some(_),
                    ..
                }
            )
        });
        let score_columns = attention::score_columns(cfg, opts.n_ctx, max_batch);
        let state = RunState {
            x: vec![0.0; max_batch * cfg.d_model],
            xn: vec![0.0; max_batch * cfg.d_model],
            proj: vec![0.0; max_batch * cfg.d_model],
            proj_window: vec![0.0; if combined { max_batch * cfg.d_model } else { 0 }],
            gate: vec![0.0; max_batch * cfg.d_ff],
            up: vec![0.0; max_batch * cfg.d_ff],
            logits: vec![0.0; max_logits * cfg.vocab_size],
            act: ActCache::new(max_batch, widest.max(cfg.ssm_channels())),
            attn: AttnScratch::new(cfg, max_batch, threads.max_threads(), &score_columns),
            ssm: SsmScratch::new(cfg, max_batch),
            positions: vec![0; max_batch],
            spans: vec![0..0; max_logits],
        };
        let rope = RopeTable::new(cfg, opts.n_ctx);
        let rope_window = RopeTable::for_window_layers(cfg, opts.n_ctx);
        Ok(Session {
            model,
            threads,
            state,
            seq: Sequence::new(model, &opts),
            rope,
            rope_window,
            observer: None,
            opts,
        })
    }

    pub fn model(&self) -> &'m Model<'m> {
        self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.opts.n_ctx
    }

    /// Threads of the session's pool.
    pub fn n_threads(&self) -> usize {
        self.threads.max_threads()
    }

    /// Threads the layers settled on: fewer than [`Session::n_threads`] while the machine
    /// is so busy that fewer run faster.
    pub fn settled_threads(&self) -> usize {
        self.threads.settled_threads()
    }

    /// Positions already processed.
    pub fn n_past(&self) -> usize {
        self.seq.n_past
    }

    /// Forgets every position: the next token starts a new sequence.
    pub fn reset(&mut self) {
        self.seq.reset();
    }

    /// The options the session was made with (`max_batch` and `max_logits` clamped).
    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }

    /// Sets the rows of a step of several sequences: sequence `s` takes the next `lens[s]`
    /// rows, at its next positions.
    pub(crate) fn set_spans(&mut self, seqs: &[&mut Sequence], lens: impl Iterator<Item = usize>) {
        let st = &mut self.state;
        let mut row = 0;
        for ((span, seq), len) in st.spans.iter_mut().zip(seqs).zip(lens) {
            *span = row..row + len;
            for (t, pos) in st.positions[row..row + len].iter_mut().enumerate() {
                *pos = seq.n_past + t;
            }
            row += len;
        }
    }

    /// After a step of several sequences: the final stream of each one's last row moves to
    /// row `s`, so that one head matmul gives all their logits.
    pub(crate) fn gather_last_rows(&mut self, n_seq: usize) {
        let d = self.model.config.d_model;
        let st = &mut self.state;
        for s in 0..n_seq {
            let last = st.spans[s].end - 1;
            if last != s {
                st.x.copy_within(last * d..(last + 1) * d, s * d);
            }
        }
    }

    /// The first `n` rows of logits the last step wrote, `(n, vocab_size)`.
    pub(crate) fn logits(&self, n: usize) -> &[f32] {
        &self.state.logits[..n * self.model.config.vocab_size]
    }

    /// Whether some layer keeps a constant-size state (SSM, sink + window) that summarizes
    /// the past and so cannot be cut back ([`Session::truncate`]), only saved and restored.
    pub fn has_recurrent_state(&self) -> bool {
        self.seq.has_recurrent_state()
    }

    /// Forgets every position from `n` on, keeping the prefix (prefix reuse).
    ///
    /// # Errors
    /// On a model with SSM or windowed layers when `0 < n < n_past`: their states do not
    /// rewind (save and restore them with [`Session::recurrent_state`] and
    /// [`Session::set_recurrent_state`] instead).
    pub fn truncate(&mut self, n: usize) -> Result<(), RuntimeError> {
        self.seq.truncate(n)
    }

    /// Bytes of all SSM layers' recurrent state (constant in the context length).
    pub fn ssm_state_bytes(&self) -> usize {
        self.seq
            .layers
            .iter()
            .map(|l| match l {
                LayerState::Ssm { ssm, .. } => ssm.bytes(),
                _ => 0,
            })
            .sum()
    }

    /// Bytes of every layer's constant-size state: SSM states, and the sink and window
    /// keys and values of windowed layers.
    pub fn recurrent_state_bytes(&self) -> usize {
        let cfg = &self.model.config;
        self.seq.layers.iter().map(|l| l.recurrent_bytes(cfg)).sum()
    }

    /// The constant-size state of every layer after the positions so far, to return to with
    /// [`Session::set_recurrent_state`].
    pub fn recurrent_state(&self) -> RecurrentState {
        self.seq.save_recurrent(&self.model.config)
    }

    /// Returns to a state saved by [`Session::recurrent_state`] of this session: the full
    /// attention layers keep their first `n_past` positions (they must not have been
    /// overwritten since).
    ///
    /// # Errors
    /// If the state is beyond the current position.
    pub fn set_recurrent_state(&mut self, state: &RecurrentState) -> Result<(), RuntimeError> {
        self.seq.restore_recurrent(&self.model.config, state)
    }

    /// Bytes of full-attention KV cache per context position.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.kv_bytes() / self.opts.n_ctx
    }

    /// Bytes held by the full-attention KV caches at full context.
    pub fn kv_bytes(&self) -> usize {
        self.seq
            .layers
            .iter()
            .map(|l| match l {
                LayerState::Kv(kv) => kv.bytes(),
                _ => 0,
            })
            .sum()
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
        if self.seq.n_past + tokens.len() > self.opts.n_ctx {
            return Err(RuntimeError::ContextFull {
                n_past: self.seq.n_past,
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
        let all = 0..cfg.n_layers;
        if self.seq.n_past > 0 && self.seq.layers_run != all {
            return Err(RuntimeError::InvalidOption(format!(
                "the {} positions so far went through layers {:?} only: reset the session first",
                self.seq.n_past, self.seq.layers_run
            )));
        }
        self.seq.layers_run = all;
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

    /// Runs the residual stream `x (n_tok, d_model)` at the input of layer `layers.start`
    /// through the layers `layers` at positions `n_past..`, leaving in `x` the stream at the
    /// output of layer `layers.end − 1` (training reads and writes the stream between
    /// layers). Only those layers see the positions, so a sequence runs through one range:
    /// [`Session::reset`] before another range, or before [`Session::forward`].
    ///
    /// # Errors
    /// When the positions exceed the context, the layers are not the model's, or the
    /// positions so far went through other layers.
    pub fn forward_hidden(
        &mut self,
        x: &mut [f32],
        layers: std::ops::Range<usize>,
    ) -> Result<(), RuntimeError> {
        let cfg = &self.model.config;
        let d = cfg.d_model;
        if x.is_empty() || !x.len().is_multiple_of(d) {
            return Err(RuntimeError::InvalidOption(format!(
                "a residual stream of {} floats is not whole rows of {d}",
                x.len()
            )));
        }
        if layers.start > layers.end || layers.end > cfg.n_layers {
            return Err(RuntimeError::InvalidOption(format!(
                "layers {layers:?} are not within the model's {}",
                cfg.n_layers
            )));
        }
        if self.seq.n_past > 0 && self.seq.layers_run != layers {
            return Err(RuntimeError::InvalidOption(format!(
                "the {} positions so far went through layers {:?}, not {layers:?}: reset the session to run another range",
                self.seq.n_past, self.seq.layers_run
            )));
        }
        self.seq.layers_run = layers.clone();
        let n_tok = x.len() / d;
        if self.seq.n_past + n_tok > self.opts.n_ctx {
            return Err(RuntimeError::ContextFull {
                n_past: self.seq.n_past,
                n_new: n_tok,
                n_ctx: self.opts.n_ctx,
            });
        }
        for rows in x.chunks_mut(self.opts.max_batch * d) {
            self.state.x[..rows.len()].copy_from_slice(rows);
            self.run_layers(rows.len() / d, layers.clone(), None);
            rows.copy_from_slice(&self.state.x[..rows.len()]);
        }
        Ok(())
    }

    /// One forward step of at most `max_batch` tokens through every layer; leaves the final
    /// residual stream in `state.x`.
    fn step(&mut self, tokens: &[u32]) {
        self.embed(tokens);
        let n_layers = self.model.config.n_layers;
        self.run_layers(tokens.len(), 0..n_layers, None);
    }

    /// The embeddings of `tokens` into the first rows of `state.x`.
    pub(crate) fn embed(&mut self, tokens: &[u32]) {
        let cfg = &self.model.config;
        let d = cfg.d_model;
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &mut self.state.x[t * d..(t + 1) * d];
            self.model.token_embd.dequantize_row_into(tok as usize, row);
            if cfg.block.embed_scale != 1.0 {
                for v in row.iter_mut() {
                    *v *= cfg.block.embed_scale;
                }
            }
        }
    }

    /// `n_tok` rows of the residual stream in `state.x` through `layer_range`: positions
    /// `n_past..` of the session's sequence, or with `batch`, rows `state.spans[s]` the next
    /// tokens of `batch[s]` (see [`Session::set_spans`]); observes the head's input when the
    /// last layer ran.
    pub(crate) fn run_layers(
        &mut self,
        n_tok: usize,
        layer_range: std::ops::Range<usize>,
        batch: Option<&mut [&mut Sequence]>,
    ) {
        let Session {
            model,
            threads,
            state: st,
            seq,
            rope,
            rope_window,
            observer,
            ..
        } = self;
        let model: &Model<'_> = model;
        let observing = observer.is_some() && layer_range.end == model.config.n_layers;
        let mut observe = |site: LinearInput, x: &[f32], n: usize| {
            if let Some(f) = observer.as_mut() {
                f(site, x, n);
            }
        };
        let cfg = &model.config;
        let d = cfg.d_model;
        let mut seqs = match batch {
            Some(seqs) => Rows::Batch(seqs),
            None => Rows::One(seq),
        };
        seqs.for_each(|seq| {
            if seq.n_past == 0 {
                // A new sequence starts from empty recurrent states.
                seq.clear_recurrent();
            }
        });
        if let Rows::One(seq) = &seqs {
            st.attn.begin_step(cfg, seq.n_past, n_tok);
        }

        let first = layer_range.start;
        let n_layers = layer_range.len();
        threads.begin_layers(n_layers);
        for (li, layer) in model.layers[layer_range.clone()]
            .iter()
            .enumerate()
            .map(|(i, layer)| (first + i, layer))
        {
            let started = threads.begin_layer(li - first);
            rms_norm(
                &st.x[..n_tok * d],
                &layer.attn_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            let rope = match (&layer.mixer, rope_window.as_ref()) {
                (Mixer::Window(_), Some(local)) => local,
                _ => &*rope,
            };
            let mut io = MixerIo {
                cfg,
                threads,
                act: &mut st.act,
                xn: &st.xn[..n_tok * d],
                rope,
                layer: li,
                n_past: 0,
                positions: None,
                n_tok,
                observer: &mut observe,
                act_holds_input: false,
            };
            let mut out = MixerOut {
                attn: &mut st.attn,
                ssm: &mut st.ssm,
                proj: &mut st.proj,
                proj_window: &mut st.proj_window,
            };
            match &mut seqs {
                Rows::One(seq) => {
                    io.n_past = seq.n_past;
                    mix(&mut io, &layer.mixer, &mut seq.layers[li], &mut out);
                }
                Rows::Batch(batch) => {
                    io.positions = Some(&st.positions[..n_tok]);
                    let spans = &st.spans[..batch.len()];
                    mix_batch(&mut io, &layer.mixer, batch, spans, &mut out);
                }
            }
            add_normed(
                &mut st.x[..n_tok * d],
                &mut st.proj[..n_tok * d],
                layer.attn_post_norm.as_deref(),
                cfg.rms_eps,
            );

            rms_norm(
                &st.x[..n_tok * d],
                &layer.ffn_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            st.act.invalidate();
            observe(
                LinearInput::FeedForward { layer: li },
                &st.xn[..n_tok * d],
                n_tok,
            );
            let ffn = &layer.ffn;
            let (act, act_row) = st.act.get(threads, &ffn.gate, &st.xn, n_tok);
            threads.linear(&ffn.gate, act, act_row, n_tok, &mut st.gate);
            let (act, act_row) = st.act.get(threads, &ffn.up, &st.xn, n_tok);
            threads.linear(&ffn.up, act, act_row, n_tok, &mut st.up);
            let (gate, up) = (&mut st.gate[..n_tok * cfg.d_ff], &st.up[..n_tok * cfg.d_ff]);
            match cfg.block.ffn_act {
                FfnAct::Silu => f32ops::silu_mul(gate, up),
                FfnAct::GeluTanh => f32ops::gelu_mul(gate, up),
            }
            st.act.invalidate();
            observe(
                LinearInput::FeedForwardDown { layer: li },
                &st.gate[..n_tok * cfg.d_ff],
                n_tok,
            );
            let (act, act_row) = st.act.get(threads, &ffn.down, &st.gate, n_tok);
            threads.linear(&ffn.down, act, act_row, n_tok, &mut st.proj);
            add_normed(
                &mut st.x[..n_tok * d],
                &mut st.proj[..n_tok * d],
                layer.ffn_post_norm.as_deref(),
                cfg.rms_eps,
            );
            threads.end_layer(li - first, &layer.mixer, started);
        }
        threads.end_layers(n_layers);
        if observing {
            rms_norm(
                &st.x[..n_tok * d],
                &model.output_norm,
                cfg.rms_eps,
                &mut st.xn[..n_tok * d],
            );
            observe(LinearInput::Head, &st.xn[..n_tok * d], n_tok);
        }
        match seqs {
            Rows::One(seq) => seq.n_past += n_tok,
            Rows::Batch(batch) => {
                for (seq, span) in batch.iter_mut().zip(&st.spans) {
                    seq.n_past += span.len();
                }
            }
        }
    }

    /// Final norm and output head for step rows `row0..row0 + n`, into logits rows `dst_row..`.
    pub(crate) fn head(&mut self, row0: usize, n: usize, dst_row: usize) {
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

/// The sequences a step's rows belong to.
enum Rows<'a, 'b> {
    /// Consecutive positions of one sequence.
    One(&'a mut Sequence),
    /// Rows `state.spans[s]`: the next tokens of sequence `s`.
    Batch(&'a mut [&'b mut Sequence]),
}

impl Rows<'_, '_> {
    fn for_each(&mut self, mut f: impl FnMut(&mut Sequence)) {
        match self {
            Rows::One(seq) => f(seq),
            Rows::Batch(batch) => batch.iter_mut().for_each(|seq| f(seq)),
        }
    }
}

/// Where a mixer writes: its scratch and its output `(n_tok, d_model)`.
struct MixerOut<'a> {
    attn: &'a mut AttnScratch,
    ssm: &'a mut SsmScratch,
    proj: &'a mut [f32],
    /// The windowed attention's output in layers that add it to an SSM's.
    proj_window: &'a mut [f32],
}

/// The mixer of layer `io.layer` over the step's rows of one sequence, whose state of that
/// layer is `state`; output into `out.proj`.
fn mix(io: &mut MixerIo<'_>, mixer: &Mixer<'_>, state: &mut LayerState, out: &mut MixerOut<'_>) {
    let d = io.cfg.d_model;
    match (mixer, state) {
        (Mixer::Attention(w), LayerState::Kv(cache)) => {
            attention::forward_full(io, w, cache, out.attn, out.proj);
        }
        (Mixer::Window(w), LayerState::Window(cache)) => {
            attention::forward_windowed(io, w, cache, out.attn, out.proj);
        }
        (
            Mixer::Ssm { ssm: w, window },
            LayerState::Ssm {
                ssm: state,
                window: cache,
            },
        ) => {
            ssm::forward(io, w, state, out.ssm, out.proj);
            if let (Some(w), Some(cache)) = (window, cache) {
                attention::forward_windowed(io, w, cache, out.attn, out.proj_window);
                let n = io.n_tok * d;
                add_assign(&mut out.proj[..n], &out.proj_window[..n]);
            }
        }
        _ => unreachable!("each layer's state is made for its mixer"),
    }
}

/// The mixer of layer `io.layer` where rows `spans[s]` are the next tokens of `batch[s]`:
/// every projection is one matmul over all the rows, and each sequence's rows attend over
/// its own cache or continue its own SSM state.
fn mix_batch(
    io: &mut MixerIo<'_>,
    mixer: &Mixer<'_>,
    batch: &mut [&mut Sequence],
    spans: &[std::ops::Range<usize>],
    out: &mut MixerOut<'_>,
) {
    let (cfg, li) = (io.cfg, io.layer);
    match mixer {
        Mixer::Attention(w) | Mixer::Window(w) => {
            attention_batch(io, w, batch, spans, out.attn, out.proj);
        }
        Mixer::Ssm { ssm: w, window } => {
            ssm::project(io, w, out.ssm);
            for (seq, span) in batch.iter_mut().zip(spans) {
                let LayerState::Ssm { ssm: state, .. } = &mut seq.layers[li] else {
                    unreachable!("each layer's state is made for its mixer")
                };
                ssm::scan_rows(cfg, w, out.ssm, state, span.clone());
            }
            ssm::project_out(io, w, out.ssm, out.proj);
            if let Some(w) = window {
                attention_batch(io, w, batch, spans, out.attn, out.proj_window);
                let n = io.n_tok * cfg.d_model;
                add_assign(&mut out.proj[..n], &out.proj_window[..n]);
            }
        }
    }
}

/// Attention `w` of layer `io.layer` over rows of several sequences: q, k, v and the output
/// projection one matmul each over all the rows, each sequence's rows attending over its
/// own cache (full, or sink + window alone or beside an SSM); `wo`'s output into `out`.
fn attention_batch(
    io: &mut MixerIo<'_>,
    w: &edgefusion_model::Attention<'_>,
    batch: &mut [&mut Sequence],
    spans: &[std::ops::Range<usize>],
    attn: &mut AttnScratch,
    out: &mut [f32],
) {
    let (cfg, threads, li) = (io.cfg, io.threads, io.layer);
    attention::project_qkv(io, w, attn);
    for (seq, span) in batch.iter_mut().zip(spans) {
        let rows = attention::StepRows {
            rows: span.clone(),
            n_past: seq.n_past,
        };
        match &mut seq.layers[li] {
            LayerState::Kv(cache) => attention::attend_full(cfg, threads, cache, attn, rows),
            LayerState::Window(cache)
            | LayerState::Ssm {
                window: Some(cache),
                ..
            } => attention::attend_window(cfg, threads, cache, attn, rows),
            LayerState::Ssm { window: None, .. } => {
                unreachable!("each layer's state is made for its mixer")
            }
        }
    }
    attention::project_out(io, w, attn, out);
}

/// `out[t] = x[t] / rms(x[t]) * weight` for each row of `x (n, d)`.
///
/// The arithmetic is llama.cpp's (`ggml_compute_forward_rms_norm_f32` then `ggml_mul`): squares
/// in f32 summed in f64, the mean rounded to f32, then `(x * scale) * weight` in f32. The next
/// step quantizes these values to 8 bits, and inputs that come from a quantized embedding hit
/// exact rounding ties, so the last bit here decides tokens downstream.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let scale = rms_scale(row, eps);
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

/// [`rms_norm`] of each row of `x (n, d)` in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_mut(weight.len()) {
        let scale = rms_scale(row, eps);
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}

/// `1 / sqrt(mean(row²) + eps)` with [`rms_norm`]'s rounding.
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let sum_sq: f64 = row.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum_sq / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `x += post_norm(y)` (Gemma 3's post-norms), or `x += y` without one; `y` is scratch.
fn add_normed(x: &mut [f32], y: &mut [f32], post_norm: Option<&[f32]>, eps: f32) {
    if let Some(weight) = post_norm {
        rms_norm_in_place(y, weight, eps);
    }
    add_assign(x, y);
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefusion_io::ModelSource;
    use edgefusion_testkit::fixture;

    /// Which threads run a layer does not change a result: with half of each forward's
    /// layers on one thread count and half on another (a tuner's trial), prefill in uneven
    /// steps and then decode give the logits of a single thread, bit for bit where the
    /// weights are quantized (integer dot products), to rounding where they are floats (whose
    /// prefill kernels sum a tile of tokens in another order than a lone token).
    #[test]
    fn layers_on_any_thread_count_give_the_same_logits() {
        for (name, bitwise) in [
            ("tiny-llama-q4_1", true),
            ("tiny-llama256-q4_k_m", true),
            ("tiny-llama-q8_0", true),
            ("tiny-llama-f32", false),
            ("tiny-llama-f16", false),
            ("tiny-hybrid-f32", false),
            ("tiny-window-f32", false),
        ] {
            let source = ModelSource::open(fixture(&format!("{name}.gguf"))).unwrap();
            let model = Model::load(&source).unwrap();
            let vocab = model.config.vocab_size;
            let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) as u32 % vocab as u32).collect();
            let logits_of = |threads: Option<Threads>| {
                let mut opts = SessionOptions::new(64, 1);
                opts.adapt_threads = false;
                opts.max_batch = 7;
                opts.max_logits = 64;
                let mut session = Session::new(&model, opts).unwrap();
                if let Some(threads) = threads {
                    session.threads = threads;
                }
                let mut out = session
                    .forward(&tokens[..30], Logits::From(0))
                    .unwrap()
                    .to_vec();
                for &t in &tokens[30..] {
                    out.extend_from_slice(session.forward(&[t], Logits::Last).unwrap());
                }
                out
            };
            let single = logits_of(None);
            assert_eq!(single.len(), 40 * vocab);
            for (n_threads, trial) in [(2, 2), (2, 1), (3, 2), (3, 1)] {
                let mixed = logits_of(Some(Threads::trying(n_threads, trial)));
                let case = format!("{name}, {n_threads} threads trying {trial}");
                if bitwise {
                    let differ = single
                        .iter()
                        .zip(&mixed)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    assert_eq!(differ, 0, "{case}: {differ} logits differ");
                } else {
                    // Which layers take which thread count follows their timings, so the
                    // summation order varies run to run; the SSM's recurrence carries such
                    // differences along the sequence (a CI run saw 1.3e-4 on the hybrid).
                    let err = edgefusion_testkit::max_rel_error(&mixed, &single);
                    assert!(err <= 1e-3, "{case}: relative error {err}");
                }
            }
        }
    }
}
