//! Perplexity with llama-perplexity's method, so the numbers compare one to one, and bits
//! per byte, so that models with different tokenizers compare too.
//!
//! The text is tokenized once (with BOS if the model adds one), cut into non-overlapping
//! windows of `ctx` tokens whose first token is replaced by BOS; each window is evaluated
//! from an empty cache and only its second half is scored (every scored token then has at
//! least ctx/2 tokens of context). PPL = exp(mean NLL); the ± is the standard error of the
//! mean NLL times PPL, as llama.cpp prints it. Bits per byte = the scored tokens' NLL in
//! bits over the bytes those tokens decode to.

use edgefusion_model::Model;
use edgefusion_runtime::tokenizer::Tokenizer;
use edgefusion_runtime::{Logits, RuntimeError, Session, SessionOptions};
use serde::Serialize;

use crate::lm::log_prob_in_place;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Invalid(String),
}

/// How to score.
#[derive(Debug, Clone)]
pub struct PerplexityOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Score at most this many windows (`None`: every window that fits).
    pub chunks: Option<usize>,
    /// Tokens per forward step.
    pub batch: usize,
    pub threads: usize,
}

/// The result over the scored windows.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of the PPL (of the mean NLL, times PPL).
    pub ppl_stderr: f64,
    pub bits_per_byte: f64,
    /// Sum of the scored tokens' NLL, in nats.
    pub nll_sum: f64,
    pub tokens_scored: usize,
    pub bytes_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    /// Tokens of the whole text.
    pub text_tokens: usize,
    /// Tokens evaluated (windows × ctx) per second.
    pub tokens_per_s: f64,
}

/// Scores `text` with `model`; `progress(done, total, ppl_so_far)` after each window.
pub fn perplexity(
    model: &Model<'_>,
    tokenizer: &Tokenizer,
    text: &str,
    opts: &PerplexityOptions,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<Perplexity, PerplexityError> {
    let invalid = |what: String| Err(PerplexityError::Invalid(what));
    let n_ctx = opts.ctx;
    if n_ctx < 4 {
        return invalid(format!("ctx must be at least 4 (got {n_ctx})"));
    }
    if opts.chunks == Some(0) {
        return invalid("chunks must be at least 1".into());
    }
    if opts.batch == 0 {
        return invalid("batch must be at least 1".into());
    }
    let cfg = &model.config;
    if n_ctx > cfg.n_ctx_train {
        return invalid(format!(
            "ctx {n_ctx} exceeds the model's training context {}",
            cfg.n_ctx_train
        ));
    }
    let tokens = tokenizer
        .encode(text, true)
        .map_err(|e| PerplexityError::Tokenizer(e.to_string()))?;
    if tokens.len() < 2 * n_ctx {
        return invalid(format!(
            "the text has {} tokens; at least 2 × ctx = {} are needed (lower ctx)",
            tokens.len(),
            2 * n_ctx
        ));
    }
    let max_chunks = tokens.len() / n_ctx;
    let n_chunks = opts.chunks.map_or(max_chunks, |c| c.min(max_chunks));
    let first = n_ctx / 2;
    let mut session_opts = SessionOptions::new(n_ctx, opts.threads);
    session_opts.max_batch = opts.batch;
    session_opts.max_logits = n_ctx - first;
    let mut session = Session::new(model, session_opts)?;
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    let vocab = cfg.vocab_size;

    let mut window = vec![0u32; n_ctx];
    let mut scratch = vec![0f32; vocab];
    let (mut nll, mut nll2, mut count, mut bytes) = (0.0f64, 0.0f64, 0usize, 0usize);
    let start = std::time::Instant::now();
    for chunk in 0..n_chunks {
        let span = &tokens[chunk * n_ctx..(chunk + 1) * n_ctx];
        window.copy_from_slice(span);
        if let Some(bos) = bos {
            window[0] = bos;
        }
        session.reset();
        // Logit rows first..n_ctx-1 predict tokens first+1..n_ctx.
        let logits = session.forward(&window, Logits::From(first))?;
        for (row, &target) in logits.chunks(vocab).zip(&span[first + 1..]) {
            scratch.copy_from_slice(row);
            let loss = -log_prob_in_place(&mut scratch, target).0;
            nll += loss;
            nll2 += loss * loss;
            count += 1;
            bytes += tokenizer.token_bytes(target).map_or(0, <[u8]>::len);
        }
        progress(chunk + 1, n_chunks, (nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_stderr,
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
        nll_sum: nll,
        tokens_scored: count,
        bytes_scored: bytes,
        windows: n_chunks,
        ctx: n_ctx,
        text_tokens: tokens.len(),
        tokens_per_s: (n_chunks * n_ctx) as f64 / start.elapsed().as_secs_f64(),
    })
}
