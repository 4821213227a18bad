//! `edgefusion perplexity`: llama-perplexity's method, so the numbers compare one to one
//! (the method: `edgefusion_eval::perplexity`), with bits per byte beside it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use edgefusion_eval::perplexity::{perplexity, PerplexityOptions};
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
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Tokens per forward step.
    #[arg(short = 'b', long = "batch", default_value_t = 512)]
    pub batch: usize,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let n_threads = common::threads(args.threads)?;
    let text = common::read_text(&args.file)?;
    let source = args.model.open()?;
    let model = common::load_model(&source)?;
    let tokenizer = common::load_tokenizer(&source)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} windows [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    eprintln!(
        "{}: scoring windows of {} tokens ({n_threads} threads)",
        args.file.display(),
        args.ctx
    );
    let result = perplexity(
        &model,
        &tokenizer,
        &text,
        &PerplexityOptions {
            ctx: args.ctx,
            chunks: args.chunks,
            batch: args.batch,
            threads: n_threads,
        },
        &mut |done, total, ppl| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("PPL {ppl:.4}"));
        },
    )
    .with_context(|| format!("perplexity of {}", args.file.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "{} tokens in the text; scored {} tokens of {} windows ({:.1} tok/s evaluated); {:.4} bits per byte",
        result.text_tokens, result.tokens_scored, result.windows, result.tokens_per_s, result.bits_per_byte
    );
    println!(
        "Final estimate: PPL = {:.4} +/- {:.5}",
        result.ppl, result.ppl_stderr
    );
    Ok(())
}
