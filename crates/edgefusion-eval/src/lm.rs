//! The model as the tasks see it: log-likelihoods of continuations after a context, and
//! greedy generation with stop sequences, on one runtime session.
//!
//! Contexts are computed once and reused. The session remembers the tokens it holds; a new
//! context that shares a prefix with them only computes the rest: a dense model's KV cache
//! is cut back to the shared prefix, and a hybrid's SSM state (which cannot be rewound) is
//! restored from a snapshot taken where the last two contexts parted ways — the few-shot
//! preamble that MMLU and GSM8K prompts share. Every ending of a question then starts from
//! the question's state.

use edgefusion_model::Model;
use edgefusion_runtime::tokenizer::{TokenStreamer, Tokenizer};
use edgefusion_runtime::{Logits, RecurrentState, RuntimeError, Session, SessionOptions};

use crate::prompts::{fit_generation, fit_loglikelihood, split_trailing_whitespace, PromptError};

/// What can fail while scoring.
#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Prompt(#[from] PromptError),
}

/// One continuation's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContinuationScore {
    /// Sum of the natural-log probabilities of its tokens.
    pub loglik: f64,
    /// Whether every token was the model's argmax (the harness's `is_greedy`).
    pub is_greedy: bool,
    pub n_tokens: usize,
}

/// The scores of one question's continuations.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub choices: Vec<ContinuationScore>,
    /// Context tokens cut from the left to fit the window (0 when it fit).
    pub dropped: usize,
}

/// A greedy generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The text, cut before the earliest stop sequence.
    pub text: String,
    pub n_tokens: usize,
    /// Prompt tokens cut from the left to fit the window.
    pub dropped: usize,
}

/// Snapshot of a hybrid's recurrent state after `tokens` (SSM and window states do not
/// rewind).
struct Snapshot {
    tokens: Vec<u32>,
    state: RecurrentState,
}

/// Positions of logits one forward pass returns.
const MAX_LOGITS: usize = 256;

/// Shared prefixes shorter than this are recomputed rather than snapshotted.
const MIN_SNAPSHOT: usize = 32;

/// Scores and generates on one session of `model`.
pub struct LanguageModel<'m> {
    session: Session<'m>,
    tokenizer: &'m Tokenizer,
    vocab: usize,
    /// The context length the model was trained for (`n_ctx_train`).
    model_ctx: usize,
    /// Tokens the session holds, in order (positions 0..len).
    held: Vec<u32>,
    /// The logits after the last held token, when `held` ends a context.
    last_logits: Vec<f32>,
    /// Hybrids: the state at the end of the preamble shared by recent contexts.
    snapshot: Option<Snapshot>,
    /// Hybrids: the state at the end of the current context, restored before each ending.
    context_state: Option<RecurrentState>,
    hybrid: bool,
    min_snapshot: usize,
    /// Tokens run through the model (for throughput reports).
    pub tokens_evaluated: usize,
    /// One row of logits, exponentiated in place by [`log_prob_in_place`].
    scratch: Vec<f32>,
}

impl<'m> LanguageModel<'m> {
    /// A session of `n_ctx` positions on `n_threads` threads.
    pub fn new(
        model: &'m Model<'m>,
        tokenizer: &'m Tokenizer,
        n_ctx: usize,
        n_threads: usize,
    ) -> Result<Self, LmError> {
        let mut opts = SessionOptions::new(n_ctx, n_threads);
        // Logits of a continuation come back in pieces of this many positions (a full
        // window of them would be n_ctx × vocab floats: 400 MB for SmolLM2 at 2048).
        opts.max_logits = n_ctx.min(MAX_LOGITS);
        let session = Session::new(model, opts)?;
        let hybrid = session.has_recurrent_state();
        Ok(LanguageModel {
            session,
            tokenizer,
            vocab: model.config.vocab_size,
            model_ctx: model.config.n_ctx_train,
            held: Vec::new(),
            last_logits: Vec::new(),
            snapshot: None,
            context_state: None,
            hybrid,
            min_snapshot: MIN_SNAPSHOT,
            tokens_evaluated: 0,
            scratch: vec![0.0; model.config.vocab_size],
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.session.n_ctx()
    }

    /// The context length the model was trained for (its GGUF `context_length`); the
    /// session may be longer.
    pub fn model_ctx(&self) -> usize {
        self.model_ctx
    }

    pub fn tokenizer(&self) -> &'m Tokenizer {
        self.tokenizer
    }

    /// The context's tokens ([`prompt_tokens`]).
    fn context_tokens(&self, context: &str) -> Result<Vec<u32>, LmError> {
        prompt_tokens(self.tokenizer, context)
    }

    /// Brings the session to hold exactly `context` (non-empty), with `last_logits` the
    /// logits after its last token; computes only what it does not already hold.
    fn load_context(&mut self, context: &[u32]) -> Result<(), LmError> {
        assert!(
            !context.is_empty(),
            "contexts start with at least one token"
        );
        if self.held == context && !self.last_logits.is_empty() {
            if self.hybrid {
                let state = self
                    .context_state
                    .as_ref()
                    .expect("a held context of a hybrid has its state saved");
                self.session.set_recurrent_state(state)?;
            } else {
                self.session.truncate(context.len())?;
            }
            return Ok(());
        }
        let shared = common_prefix(&self.held, context);
        // The last context token is always fed, for its logits.
        let keep = shared.min(context.len() - 1);
        let start = if !self.hybrid {
            self.session.truncate(keep)?;
            keep
        } else {
            let snapshot_len = self
                .snapshot
                .as_ref()
                .filter(|s| s.tokens.len() <= keep && context[..s.tokens.len()] == s.tokens[..])
                .map(|s| s.tokens.len());
            match (snapshot_len, &self.snapshot) {
                (Some(n), Some(s)) => {
                    self.session.set_recurrent_state(&s.state)?;
                    n
                }
                _ => {
                    // A new preamble: computed from the start, its end snapshotted when it
                    // is long enough to be worth keeping.
                    self.session.reset();
                    if keep >= self.min_snapshot {
                        self.run(&context[..keep], Logits::Last)?;
                        self.snapshot = Some(Snapshot {
                            tokens: context[..keep].to_vec(),
                            state: self.session.recurrent_state(),
                        });
                        keep
                    } else {
                        0
                    }
                }
            }
        };
        let logits = self.run(&context[start..], Logits::Last)?;
        self.last_logits = logits;
        self.held = context.to_vec();
        if self.hybrid {
            self.context_state = Some(self.session.recurrent_state());
        }
        Ok(())
    }

    /// Runs `tokens` from the session's position; returns the requested logits.
    fn run(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, LmError> {
        self.tokens_evaluated += tokens.len();
        Ok(self.session.forward(tokens, logits)?.to_vec())
    }

    /// The log-likelihood of each of `continuations` after `context` (lm-evaluation-harness
    /// `loglikelihood` requests): the continuation's tokens are those of `context +
    /// continuation` after the context's own; a window too short for both drops context
    /// tokens from the left.
    pub fn score(&mut self, context: &str, continuations: &[String]) -> Result<Scored, LmError> {
        let pairs: Vec<(&str, &str)> = continuations
            .iter()
            .map(|continuation| (context, continuation.as_str()))
            .collect();
        self.score_pairs(&pairs)
    }

    /// [`LanguageModel::score`] for requests whose contexts differ too (WinoGrande's
    /// choices fill the blank in the context and share the continuation): the
    /// log-likelihood of each `(context, continuation)`'s continuation. Consecutive
    /// contexts still reuse the prefix they share.
    pub fn score_pairs<S: AsRef<str>>(&mut self, pairs: &[(S, S)]) -> Result<Scored, LmError> {
        let mut choices = Vec::with_capacity(pairs.len());
        let mut dropped = 0;
        for (context, continuation) in pairs {
            let (context, continuation) =
                split_trailing_whitespace(context.as_ref(), continuation.as_ref());
            let context_tokens = self.context_tokens(&context)?;
            let whole = self.context_tokens(&format!("{context}{continuation}"))?;
            let n_context = context_tokens.len();
            // As the harness: the whole encoding after as many tokens as the context's own
            // encoding has (a merge across the boundary is the tokenizer's business).
            let continuation_tokens = whole.get(n_context..).unwrap_or_default().to_vec();
            let scored = self.score_tokens(&context_tokens, &[continuation_tokens])?;
            dropped = dropped.max(scored.dropped);
            choices.extend(scored.choices);
        }
        Ok(Scored { choices, dropped })
    }

    /// [`LanguageModel::score`] on token ids: the log-likelihood of each continuation after
    /// `context` (the context cut from the left where context and continuation exceed the
    /// window).
    pub fn score_tokens(
        &mut self,
        context: &[u32],
        continuations: &[Vec<u32>],
    ) -> Result<Scored, LmError> {
        let mut choices = Vec::with_capacity(continuations.len());
        let mut dropped = 0;
        for continuation in continuations {
            let fitted = fit_loglikelihood(context, continuation, self.n_ctx())?;
            dropped = dropped.max(fitted.dropped);
            let fitted_context = fitted.tokens.to_vec();
            choices.push(self.score_one(&fitted_context, continuation)?);
        }
        Ok(Scored { choices, dropped })
    }

    /// Shared prefixes of at least `n` tokens are snapshotted on hybrids (default
    /// 32; tests lower it to exercise the snapshots on short prompts).
    pub fn with_min_snapshot(mut self, n: usize) -> Self {
        self.min_snapshot = n.max(1);
        self
    }

    fn score_one(
        &mut self,
        context: &[u32],
        continuation: &[u32],
    ) -> Result<ContinuationScore, LmError> {
        self.load_context(context)?;
        let (mut loglik, mut is_greedy) = (0.0f64, true);
        self.scratch.copy_from_slice(&self.last_logits);
        let (lp, greedy) = log_prob_in_place(&mut self.scratch, continuation[0]);
        loglik += lp;
        is_greedy &= greedy;
        if continuation.len() > 1 {
            // Rows 0..n-1 predict continuation tokens 1..n; the last token is never fed.
            let fed = &continuation[..continuation.len() - 1];
            let piece = MAX_LOGITS.min(self.n_ctx());
            for (i, part) in fed.chunks(piece).enumerate() {
                self.tokens_evaluated += part.len();
                let logits = self.session.forward(part, Logits::From(0))?;
                let targets = &continuation[1 + i * piece..1 + i * piece + part.len()];
                for (row, &target) in logits.chunks(self.vocab).zip(targets) {
                    self.scratch.copy_from_slice(row);
                    let (lp, greedy) = log_prob_in_place(&mut self.scratch, target);
                    loglik += lp;
                    is_greedy &= greedy;
                }
            }
        }
        Ok(ContinuationScore {
            loglik,
            is_greedy,
            n_tokens: continuation.len(),
        })
    }

    /// Greedy generation after `prompt` until a stop sequence, an end-of-sequence token or
    /// `max_tokens`; the text is cut before the earliest stop sequence.
    pub fn generate(
        &mut self,
        prompt: &str,
        stop: &[String],
        max_tokens: usize,
    ) -> Result<Generated, LmError> {
        let prompt_tokens = self.context_tokens(prompt)?;
        let fitted = fit_generation(&prompt_tokens, self.n_ctx(), max_tokens)?;
        let dropped = fitted.dropped;
        let context = fitted.tokens.to_vec();
        self.load_context(&context)?;
        let mut streamer: TokenStreamer<'_> = self.tokenizer.streamer();
        let mut text = String::new();
        let mut logits = self.last_logits.clone();
        // The session now holds the context and then each generated token that is run.
        let mut held = context;
        let mut n_tokens = 0;
        while n_tokens < max_tokens {
            let token = argmax(&logits);
            if self.tokenizer.is_eos(token) {
                break;
            }
            n_tokens += 1;
            if let Some(piece) = streamer
                .push(token)
                .map_err(|e| LmError::Tokenizer(e.to_string()))?
            {
                text.push_str(&piece);
            }
            if crate::prompts::find_stop(&text, stop).is_some() || n_tokens == max_tokens {
                break;
            }
            logits = self.run(&[token], Logits::Last)?;
            held.push(token);
        }
        if let Some(rest) = streamer.finish() {
            text.push_str(&rest);
        }
        // The generated tokens follow the context in the session: the next context still
        // shares its prefix (a few-shot preamble), but no context ends where the session does.
        self.held = held;
        self.last_logits.clear();
        if let Some(at) = crate::prompts::find_stop(&text, stop) {
            text.truncate(at);
        }
        Ok(Generated {
            text,
            n_tokens,
            dropped,
        })
    }
}

/// The tokens a context or prompt is run as: BOS when the model adds one, then the text
/// (an empty text conditions on BOS alone, as the harness does).
pub fn prompt_tokens(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, LmError> {
    let mut tokens = Vec::new();
    if let Some(bos) = tokenizer.bos_id() {
        if tokenizer.add_bos() || text.is_empty() {
            tokens.push(bos);
        }
    }
    tokens.extend(
        tokenizer
            .encode(text, false)
            .map_err(|e| LmError::Tokenizer(e.to_string()))?,
    );
    Ok(tokens)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// [`log_prob`] with the runtime's SIMD exponential, overwriting `logits` with
/// `exp(logits − max)`: the vocabulary-wide softmax sum is most of the scoring time
/// otherwise (49,152 exponentials per scored token on SmolLM2).
pub fn log_prob_in_place(logits: &mut [f32], target: u32) -> (f64, bool) {
    use edgefusion_kernels::f32ops;
    let t = target as usize;
    let max = f32ops::max(logits);
    let at = logits[t];
    // The first maximum, as `torch.argmax`: the target is greedy when it is a maximum and
    // no earlier entry is.
    let greedy = at == max && !logits[..t].contains(&max);
    let sum = f32ops::exp_sub_max_sum(logits, max);
    ((at - max) as f64 - sum.ln(), greedy)
}

/// `log softmax(logits)[target]` (summed in f64 over the vocabulary) and whether `target`
/// is the argmax (the first maximum, as `torch.argmax`).
pub fn log_prob(logits: &[f32], target: u32) -> (f64, bool) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lp = (logits[target as usize] - max) as f64 - sum.ln();
    (lp, argmax(logits) == target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_of_uniform_logits_is_minus_log_n() {
        let (lp, greedy) = log_prob(&[0.5; 8], 3);
        assert!((lp + 8f64.ln()).abs() < 1e-12);
        // Ties go to the first maximum.
        assert!(!greedy);
        assert!(log_prob(&[0.5; 8], 0).1);
        let (lp, greedy) = log_prob(&[0.0, 1000.0], 1);
        assert!(lp.abs() < 1e-9 && greedy);
    }

    #[test]
    fn the_simd_log_prob_equals_the_f64_one() {
        let row: Vec<f32> = (0..49_157)
            .map(|i| ((i as f32 * 0.37).sin() * 9.0) - (i % 7) as f32)
            .collect();
        for target in [0u32, 17, 4096, 49_156] {
            let (want, want_greedy) = log_prob(&row, target);
            let (got, got_greedy) = log_prob_in_place(&mut row.clone(), target);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );
            assert_eq!(got_greedy, want_greedy);
        }
        let mut ties = vec![1.0f32, 3.0, 3.0, 0.0];
        assert!(log_prob_in_place(&mut ties.clone(), 1).1);
        assert!(!log_prob_in_place(&mut ties, 2).1);
    }

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2]), 2);
    }
}
