//! `edgefusion perplexity`: llama-perplexity's method, so the numbers compare one to one.
//!
//! The text is tokenized once (with BOS if the model adds one), cut into non-overlapping
//! windows of `ctx` tokens whose first token is replaced by BOS; each window is evaluated from
//! an empty cache and only its second half is scored (every scored token then has at least
//! ctx/2 tokens of context). PPL = exp(mean NLL); the ± is the standard error of the mean NLL
//! times PPL, as llama.cpp prints it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use edgefusion_runtime::{Logits, Session, SessionOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{self, ModelArgs};

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text file to score (e.g. assets/text/moby-dick.txt).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Window length in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows [default: all that fit in the text].
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Threads [default: physical cores].
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Tokens per forward step.
    #[arg(short = 'b', long = "batch", default_value_t = 512)]
    pub batch: usize,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let n_threads = common::threads(args.threads)?;
    if args.ctx < 4 {
        bail!("--ctx must be at least 4 (got {})", args.ctx);
    }
    if args.chunks == Some(0) {
        bail!("--chunks must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let text = common::read_text(&args.file)?;
    let source = args.model.open()?;
    let model = common::load_model(&source)?;
    let tokenizer = common::load_tokenizer(&source)?;
    let cfg = &model.config;
    if args.ctx > cfg.n_ctx_train {
        bail!(
            "--ctx {} exceeds the model's training context {}",
            args.ctx,
            cfg.n_ctx_train
        );
    }
    let tokenize_start = Instant::now();
    let tokens = tokenizer.encode(&text, true)?;
    let n_ctx = args.ctx;
    if tokens.len() < 2 * n_ctx {
        bail!(
            "{} has {} tokens; at least 2 × ctx = {} are needed (lower --ctx)",
            args.file.display(),
            tokens.len(),
            2 * n_ctx
        );
    }
    let max_chunks = tokens.len() / n_ctx;
    let n_chunks = args.chunks.map_or(max_chunks, |c| c.min(max_chunks));
    eprintln!(
        "{}: {} tokens in {:.2} s; scoring {n_chunks} windows of {n_ctx} tokens ({} threads)",
        args.file.display(),
        tokens.len(),
        tokenize_start.elapsed().as_secs_f64(),
        n_threads
    );

    let first = n_ctx / 2;
    let mut opts = SessionOptions::new(n_ctx, n_threads);
    opts.max_batch = args.batch;
    opts.max_logits = n_ctx - first;
    let mut session = Session::new(&model, opts)?;
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    let vocab = cfg.vocab_size;

    let bar = ProgressBar::new(n_chunks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} windows [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut window = vec![0u32; n_ctx];
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let start = Instant::now();
    for chunk in 0..n_chunks {
        window.copy_from_slice(&tokens[chunk * n_ctx..(chunk + 1) * n_ctx]);
        if let Some(bos) = bos {
            window[0] = bos;
        }
        session.reset();
        // Logit rows first..n_ctx-1 predict tokens first+1..n_ctx.
        let logits = session.forward(&window, Logits::From(first))?;
        for (row, &target) in logits
            .chunks(vocab)
            .zip(&tokens[chunk * n_ctx + first + 1..(chunk + 1) * n_ctx])
        {
            let loss = -log_softmax_at(row, target as usize);
            nll += loss;
            nll2 += loss * loss;
            count += 1;
        }
        bar.set_message(format!("PPL {:.4}", (nll / count as f64).exp()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "scored {count} tokens in {secs:.1} s ({:.1} tok/s evaluated)",
        (n_chunks * n_ctx) as f64 / secs
    );
    println!("Final estimate: PPL = {ppl:.4} +/- {stderr:.5}");
    Ok(())
}

/// `log softmax(logits)[target]`, accumulated in f64 for a stable sum over a large vocabulary.
fn log_softmax_at(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (logits[target] - max) as f64 - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_uniform_logits_is_minus_log_n() {
        let l = vec![0.5f32; 8];
        assert!((log_softmax_at(&l, 3) + (8f64).ln()).abs() < 1e-12);
        let l = [0.0f32, 1000.0];
        assert!(log_softmax_at(&l, 1).abs() < 1e-9);
    }
}
