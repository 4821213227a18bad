//! Several sequences on one session. A [`Sequence`] holds every layer's state of one
//! sequence (KV cache, sink and window, SSM state) and its position; the session holds the
//! weights' scratch and the threads. [`Session::forward`] continues the session's current
//! sequence, which [`Session::swap_sequence`] exchanges with another;
//! [`Session::forward_batch`] advances many sequences in one step, each by its own number of
//! tokens (a prompt chunk beside other sequences' next tokens; [`Session::decode_batch`]: one
//! each), whose linear layers are one matmul over all of them: the weights are read once for
//! the whole batch, which is where a server's aggregate throughput comes from.

use std::ops::Range;

use edgefusion_model::{Model, ModelConfig};

use crate::engine::{KvType, RecurrentState, Session, SessionOptions};
use crate::mixer::LayerState;
use crate::RuntimeError;

/// One sequence's state in every layer, and how many positions it holds.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// One per layer, matching its mixer.
    pub(crate) layers: Vec<LayerState>,
    pub(crate) n_past: usize,
    /// The layers the positions so far went through (all of them unless
    /// [`Session::forward_hidden`] ran a range).
    pub(crate) layers_run: Range<usize>,
    /// What the states were sized for: only a session of the same shape may run them.
    shape: SequenceShape,
}

/// The session properties a sequence's buffers depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SequenceShape {
    /// Address and depth of the model (sequences of another model have other layers).
    model: usize,
    n_layers: usize,
    n_ctx: usize,
    /// Staging slots of the window caches.
    max_batch: usize,
    kv_type: KvType,
}

impl SequenceShape {
    fn of(model: &Model<'_>, opts: &SessionOptions) -> Self {
        SequenceShape {
            model: model as *const Model<'_> as usize,
            n_layers: model.layers.len(),
            n_ctx: opts.n_ctx,
            max_batch: opts.max_batch,
            kv_type: opts.kv_type,
        }
    }
}

impl Sequence {
    /// An empty sequence for a session of `model` with (clamped) options `opts`.
    pub(crate) fn new(model: &Model<'_>, opts: &SessionOptions) -> Self {
        let cfg = &model.config;
        Sequence {
            layers: model
                .layers
                .iter()
                .map(|l| LayerState::new(cfg, &l.mixer, opts.n_ctx, opts.max_batch, opts.kv_type))
                .collect(),
            n_past: 0,
            layers_run: 0..cfg.n_layers,
            shape: SequenceShape::of(model, opts),
        }
    }

    /// Positions the sequence holds.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Forgets every position: the next token starts a new sequence.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Whether some layer keeps a constant-size state (SSM, sink + window) that summarizes
    /// the past and so cannot be cut back ([`Sequence::truncate`]), only saved and restored.
    pub fn has_recurrent_state(&self) -> bool {
        self.layers.iter().any(LayerState::is_recurrent)
    }

    /// Forgets every position from `n` on, keeping the prefix (prefix reuse).
    ///
    /// # Errors
    /// On a model with SSM or windowed layers when `0 < n < n_past`: their states do not
    /// rewind.
    pub fn truncate(&mut self, n: usize) -> Result<(), RuntimeError> {
        if n > 0 && n < self.n_past && self.has_recurrent_state() {
            return Err(RuntimeError::InvalidOption(format!(
                "cannot truncate a hybrid model's session from {} to {n} positions: SSM and window states do not rewind",
                self.n_past
            )));
        }
        self.n_past = self.n_past.min(n);
        Ok(())
    }

    /// A copy of every layer's constant-size state after the positions so far.
    pub(crate) fn save_recurrent(&self, cfg: &ModelConfig) -> RecurrentState {
        RecurrentState {
            n_past: self.n_past,
            layers: self.layers.iter().map(|l| l.save(cfg)).collect(),
            shape: self.shape,
        }
    }

    /// Returns to `state`, saved from this sequence at or before its current position: the
    /// full-attention layers keep their first `state.n_past()` positions, which must still
    /// hold the tokens they held when it was saved.
    pub(crate) fn restore_recurrent(
        &mut self,
        cfg: &ModelConfig,
        state: &RecurrentState,
    ) -> Result<(), RuntimeError> {
        if state.shape != self.shape {
            return Err(RuntimeError::InvalidOption(
                "the state was saved by a sequence of another session (model, context, max_batch or KV type differ)".into(),
            ));
        }
        if state.n_past > self.n_past {
            return Err(RuntimeError::InvalidOption(format!(
                "a state saved at position {} does not fit this sequence (position {})",
                state.n_past, self.n_past
            )));
        }
        for (layer, saved) in self.layers.iter_mut().zip(&state.layers) {
            layer.restore(cfg, saved);
        }
        self.n_past = state.n_past;
        Ok(())
    }

    /// Empties the SSM states (a new sequence starts from zero).
    pub(crate) fn clear_recurrent(&mut self) {
        for layer in &mut self.layers {
            if let LayerState::Ssm { ssm, .. } = layer {
                ssm.clear();
            }
        }
    }
}

impl Session<'_> {
    /// A new, empty sequence that this session can run: with [`Session::swap_sequence`]
    /// (then [`Session::forward`]), [`Session::forward_batch`] or [`Session::decode_batch`]. Its caches take the memory
    /// of the session's own (a full KV cache of `n_ctx` positions per attention layer, mapped
    /// as positions are used).
    pub fn new_sequence(&self) -> Sequence {
        Sequence::new(self.model(), self.options())
    }

    /// Exchanges the session's current sequence with `seq`, without copying: `forward` then
    /// continues what was `seq`.
    ///
    /// # Errors
    /// If `seq` was made by a session of another model, context, batch size or cache type.
    pub fn swap_sequence(&mut self, seq: &mut Sequence) -> Result<(), RuntimeError> {
        if !self.fits(seq) {
            return Err(RuntimeError::InvalidOption(
                "the sequence was made for another session (model, context, max_batch or KV type differ): make it with this session's new_sequence".into(),
            ));
        }
        std::mem::swap(&mut self.seq, seq);
        Ok(())
    }

    /// The constant-size state of every layer of `seq` (SSM states, sinks and windows) after
    /// its positions so far: [`Session::restore_sequence_state`] returns `seq` to it later,
    /// once it has gone on (prefix reuse for hybrid models, whose states do not rewind).
    pub fn sequence_state(&self, seq: &Sequence) -> RecurrentState {
        seq.save_recurrent(&self.model().config)
    }

    /// Returns `seq` to `state`, saved by [`Session::sequence_state`] of `seq` at or before
    /// its current position. The full-attention layers keep their first `state.n_past()`
    /// positions: the caller makes sure `state` is `seq`'s own and that `seq` was not cut
    /// back below it since (which would let later tokens overwrite them); a state of another
    /// sequence of this session is not detected.
    ///
    /// # Errors
    /// If `seq` or the state was made by another session (another model, context, batch
    /// size or KV type), or the state is beyond `seq`'s position.
    pub fn restore_sequence_state(
        &self,
        seq: &mut Sequence,
        state: &RecurrentState,
    ) -> Result<(), RuntimeError> {
        if !self.fits(seq) {
            return Err(RuntimeError::InvalidOption(
                "the sequence was made for another session: make it with this session's new_sequence".into(),
            ));
        }
        seq.restore_recurrent(&self.model().config, state)
    }

    /// One step of several sequences: `tokens[r]` is the next token of `seqs[r]`. Returns
    /// the logits after each, `(seqs.len(), vocab_size)` row-major, and advances each
    /// sequence by one position. Equal (to float rounding) to one [`Session::forward`] per
    /// sequence, but the weights are read once for all of them.
    ///
    /// # Errors
    /// As [`Session::forward_batch`].
    pub fn decode_batch(
        &mut self,
        seqs: &mut [&mut Sequence],
        tokens: &[u32],
    ) -> Result<&[f32], RuntimeError> {
        if seqs.len() != tokens.len() {
            return Err(RuntimeError::InvalidOption(format!(
                "a decode step takes one token per sequence: {} tokens for {} sequences",
                tokens.len(),
                seqs.len()
            )));
        }
        self.batch_step(seqs, tokens, || std::iter::repeat_n(1, tokens.len()))
    }

    /// One step of several sequences, each with its own number of new tokens: `seqs[s]`
    /// takes the next `lens[s]` tokens of `tokens` (in order), so a prompt's prefill chunk and
    /// other sequences' decode tokens share one pass over the weights. Returns the logits
    /// after each sequence's last token, `(seqs.len(), vocab_size)`.
    ///
    /// # Errors
    /// When the lengths do not add up or one is 0, there are more tokens than the session's
    /// `max_batch` or more sequences than its `max_logits`, a sequence would overflow its
    /// context or was made by another session, or a token is out of the vocabulary.
    /// Nothing is changed then.
    pub fn forward_batch(
        &mut self,
        seqs: &mut [&mut Sequence],
        tokens: &[u32],
        lens: &[usize],
    ) -> Result<&[f32], RuntimeError> {
        if lens.len() != seqs.len()
            || lens.contains(&0)
            || lens.iter().sum::<usize>() != tokens.len()
        {
            return Err(RuntimeError::InvalidOption(format!(
                "{} tokens do not split into {} sequences of {lens:?} (each at least 1)",
                tokens.len(),
                seqs.len()
            )));
        }
        self.batch_step(seqs, tokens, || lens.iter().copied())
    }

    fn batch_step<I: Iterator<Item = usize>>(
        &mut self,
        seqs: &mut [&mut Sequence],
        tokens: &[u32],
        lens: impl Fn() -> I,
    ) -> Result<&[f32], RuntimeError> {
        let cfg = &self.model().config;
        let (n_seq, n_tok) = (seqs.len(), tokens.len());
        let (vocab, n_layers) = (cfg.vocab_size, cfg.n_layers);
        if n_seq == 0 {
            return Err(RuntimeError::InvalidOption(
                "a batch step needs at least one sequence".into(),
            ));
        }
        let opts = self.options();
        if n_tok > opts.max_batch || n_seq > opts.max_logits {
            return Err(RuntimeError::InvalidOption(format!(
                "{n_tok} tokens of {n_seq} sequences in one step but the session takes at most {} tokens (max_batch) of {} sequences (max_logits)",
                opts.max_batch, opts.max_logits
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(RuntimeError::TokenOutOfRange {
                token: bad,
                vocab_size: vocab,
            });
        }
        for (i, (seq, len)) in seqs.iter().zip(lens()).enumerate() {
            self.check_shape(seq, i)?;
            if seq.n_past + len > opts.n_ctx {
                return Err(RuntimeError::ContextFull {
                    n_past: seq.n_past,
                    n_new: len,
                    n_ctx: opts.n_ctx,
                });
            }
            if seq.n_past > 0 && seq.layers_run != (0..n_layers) {
                return Err(RuntimeError::InvalidOption(format!(
                    "sequence {i}: its {} positions went through layers {:?} only: reset it first",
                    seq.n_past, seq.layers_run
                )));
            }
        }
        for seq in seqs.iter_mut() {
            seq.layers_run = 0..n_layers;
        }
        self.set_spans(seqs, lens());
        self.embed(tokens);
        self.run_layers(n_tok, 0..n_layers, Some(seqs));
        self.gather_last_rows(n_seq);
        self.head(0, n_seq, 0);
        Ok(self.logits(n_seq))
    }

    fn fits(&self, seq: &Sequence) -> bool {
        seq.shape == SequenceShape::of(self.model(), self.options())
    }

    fn check_shape(&self, seq: &Sequence, index: usize) -> Result<(), RuntimeError> {
        if !self.fits(seq) {
            return Err(RuntimeError::InvalidOption(format!(
                "sequence {index} was made for another session (model, context, max_batch or KV type differ): make it with this session's new_sequence"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Logits;
    use edgefusion_io::ModelSource;
    use edgefusion_testkit::fixture;

    /// Prompts of different lengths prefilled one alone and three in one uneven step, then
    /// decoded together: every step's logits equal each sequence run alone, on every mixer (full attention,
    /// sink + window, SSM beside a window, Gemma 3's local layers with their own RoPE).
    ///
    /// On AVX2 (and AVX-512, which runs the same batch kernels), K-quant products add in an
    /// order that depends on the batch, as in llama.cpp's AVX2 build (Q4_K tokens in groups
    /// of 4, Q6_K tiled from 8; `kquants::KDotOrder`), so a batched
    /// token's activations can differ from its lone run in the last bit; on the Q4_K_M model
    /// one such bit moved an 8-bit activation code across a rounding boundary and the logits
    /// after it by 1.8% (the other sequences stayed within 5e-7). A bookkeeping error (a
    /// wrong cache row or position) moves logits by far more than either bound.
    #[test]
    fn decode_batch_equals_each_sequence_alone() {
        let isa = edgefusion_kernels::cpu::isa();
        let k_quant_bound = if isa.has_avx2() { 5e-2 } else { 2e-3 };
        for (name, bound) in [
            ("tiny-llama-q4_1", 2e-3),
            ("tiny-llama256-q4_k_m", k_quant_bound),
            ("tiny-llama-f32", 2e-3),
            ("tiny-qwen3-f32", 2e-3),
            ("tiny-gemma3-f32", 2e-3),
            ("tiny-hybrid-f32", 2e-3),
            ("tiny-window-f32", 2e-3),
        ] {
            let source = ModelSource::open(fixture(&format!("{name}.gguf"))).unwrap();
            let model = Model::load(&source).unwrap();
            let vocab = model.config.vocab_size as u32;
            let prompts: Vec<Vec<u32>> = [5usize, 1, 17, 9]
                .iter()
                .enumerate()
                .map(|(k, &len)| {
                    (0..len)
                        .map(|i| (i * 7 + k * 13 + 3) as u32 % vocab)
                        .collect()
                })
                .collect();
            let steps = 12;
            let next = |k: usize, step: usize| ((k * 31 + step * 11 + 1) as u32) % vocab;
            let mut opts = SessionOptions::new(48, 2);
            opts.adapt_threads = false;
            opts.max_logits = 4;

            // Alone: each sequence prefilled, then one token at a time.
            let mut alone = Vec::new();
            let mut session = Session::new(&model, opts.clone()).unwrap();
            for (k, prompt) in prompts.iter().enumerate() {
                session.reset();
                let mut rows = session.forward(prompt, Logits::Last).unwrap().to_vec();
                for step in 0..steps {
                    rows.extend_from_slice(
                        session.forward(&[next(k, step)], Logits::Last).unwrap(),
                    );
                }
                alone.push(rows);
            }

            // Together: the first prefilled through swap_sequence, the others in one step of
            // uneven lengths, then all decoded in one batch.
            let mut session = Session::new(&model, opts).unwrap();
            let mut seqs: Vec<Sequence> = prompts.iter().map(|_| session.new_sequence()).collect();
            let mut together: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
            session.swap_sequence(&mut seqs[0]).unwrap();
            together[0].extend_from_slice(session.forward(&prompts[0], Logits::Last).unwrap());
            session.swap_sequence(&mut seqs[0]).unwrap();
            let lens: Vec<usize> = prompts[1..].iter().map(Vec::len).collect();
            let mut refs: Vec<&mut Sequence> = seqs[1..].iter_mut().collect();
            let logits = session
                .forward_batch(&mut refs, &prompts[1..].concat(), &lens)
                .unwrap();
            for (k, row) in logits.chunks(vocab as usize).enumerate() {
                together[k + 1].extend_from_slice(row);
            }
            for step in 0..steps {
                // A sequence that has finished leaves the batch (the second after step 5).
                let members: Vec<usize> =
                    (0..prompts.len()).filter(|&k| k != 1 || step < 5).collect();
                let tokens: Vec<u32> = members.iter().map(|&k| next(k, step)).collect();
                let mut refs: Vec<&mut Sequence> = seqs
                    .iter_mut()
                    .enumerate()
                    .filter(|(k, _)| members.contains(k))
                    .map(|(_, s)| s)
                    .collect();
                let logits = session.decode_batch(&mut refs, &tokens).unwrap();
                for (row, &k) in logits.chunks(vocab as usize).zip(&members) {
                    together[k].extend_from_slice(row);
                }
            }
            for (k, (a, b)) in alone.iter().zip(&together).enumerate() {
                let n = b.len();
                let err = edgefusion_testkit::max_rel_error(&b[..], &a[..n]);
                assert!(err <= bound, "{name}, sequence {k}: relative error {err}");
                assert_eq!(seqs[k].n_past(), prompts[k].len() + n / vocab as usize - 1);
            }
        }
    }

    /// A sequence's states saved after a shared prefix in a batched step, then restored after
    /// a detour of other tokens (beside another sequence), continue as a fresh run of the
    /// whole; a state of a longer past, or a sequence of another session, is refused.
    #[test]
    fn a_restored_sequence_state_continues_as_a_fresh_run() {
        for name in ["tiny-hybrid-f32", "tiny-window-f32", "tiny-gemma3-f32"] {
            let source = ModelSource::open(fixture(&format!("{name}.gguf"))).unwrap();
            let model = Model::load(&source).unwrap();
            let vocab = model.config.vocab_size as u32;
            let tokens: Vec<u32> = (0..30).map(|i| (i * 17 + 5) % vocab).collect();
            let (prefix, rest) = tokens.split_at(19);
            let mut opts = SessionOptions::new(48, 2);
            opts.adapt_threads = false;
            opts.max_logits = 2;
            let mut session = Session::new(&model, opts.clone()).unwrap();
            let (mut seq, mut other) = (session.new_sequence(), session.new_sequence());
            session
                .forward_batch(
                    &mut [&mut seq, &mut other],
                    &[prefix, &rest[..3]].concat(),
                    &[19, 3],
                )
                .unwrap();
            let saved = session.sequence_state(&seq);
            assert_eq!(saved.n_past(), 19);
            // A detour past the window that overwrites the ring, beside the other sequence.
            let detour: Vec<u32> = (0..20).map(|i| (i * 3 + 1) % vocab).collect();
            session
                .forward_batch(
                    &mut [&mut other, &mut seq],
                    &[&rest[..2], &detour[..]].concat(),
                    &[2, 20],
                )
                .unwrap();
            assert!(seq.truncate(19).is_err());
            let longer = session.sequence_state(&seq);
            session.restore_sequence_state(&mut seq, &saved).unwrap();
            assert_eq!(seq.n_past(), 19);
            assert!(session.restore_sequence_state(&mut seq, &longer).is_err());
            let restored = session
                .forward_batch(&mut [&mut seq], rest, &[rest.len()])
                .unwrap()
                .to_vec();
            let mut fresh = Session::new(&model, opts.clone()).unwrap();
            let direct = fresh.forward(&tokens, Logits::Last).unwrap();
            let err = edgefusion_testkit::max_rel_error(&restored, direct);
            assert!(err <= 1e-4, "{name}: restored vs fresh {err}");
            let foreign = Session::new(&model, SessionOptions::new(16, 1)).unwrap();
            assert!(foreign.restore_sequence_state(&mut seq, &saved).is_err());
            // A state of another session's sequence, of the same model and layers.
            let foreign_state = foreign.sequence_state(&foreign.new_sequence());
            let err = session
                .restore_sequence_state(&mut seq, &foreign_state)
                .unwrap_err();
            assert!(err.to_string().contains("another session"), "{err}");
        }
    }

    #[test]
    fn decode_batch_refuses_bad_batches_and_changes_nothing() {
        let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
        let model = Model::load(&source).unwrap();
        let mut opts = SessionOptions::new(8, 1);
        opts.max_logits = 2;
        let mut session = Session::new(&model, opts.clone()).unwrap();
        let (mut a, mut b, mut c) = (
            session.new_sequence(),
            session.new_sequence(),
            session.new_sequence(),
        );
        let err = |r: Result<&[f32], RuntimeError>| r.unwrap_err().to_string();
        assert!(
            err(session.decode_batch(&mut [&mut a], &[1, 2])).contains("one token per sequence")
        );
        assert!(
            err(session.decode_batch(&mut [&mut a, &mut b, &mut c], &[1, 2, 3]))
                .contains("max_logits")
        );
        assert!(
            err(session.forward_batch(&mut [&mut a, &mut b], &[1, 2], &[2, 0]))
                .contains("at least 1")
        );
        assert!(err(session.decode_batch(&mut [&mut a], &[u32::MAX]))
            .contains("outside the vocabulary"));
        // A sequence of another session's shape.
        let other = Session::new(&model, SessionOptions::new(16, 1)).unwrap();
        let mut foreign = other.new_sequence();
        assert!(err(session.decode_batch(&mut [&mut foreign], &[1])).contains("another session"));
        assert!(session.swap_sequence(&mut foreign).is_err());
        // A full sequence.
        for _ in 0..8 {
            session.decode_batch(&mut [&mut a], &[1]).unwrap();
        }
        assert!(matches!(
            session.decode_batch(&mut [&mut a, &mut b], &[1, 1]),
            Err(RuntimeError::ContextFull { .. })
        ));
        assert_eq!((a.n_past(), b.n_past()), (8, 0));
    }
}
