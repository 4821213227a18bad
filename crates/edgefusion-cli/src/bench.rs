//! `edgefusion bench`: llama-bench's method — pp (a prompt of p tokens in one batch, from an
//! empty cache) and tg (n tokens decoded one at a time, from an empty cache), each repeated
//! r times after one warm-up run, reported as mean ± sample standard deviation of tokens/s.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use edgefusion_runtime::profile::mean_sd;
use edgefusion_runtime::sampler::Rng;
use edgefusion_runtime::{Logits, Session, SessionOptions};
use serde::Serialize;

use crate::common::{self, ModelArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutputFormat {
    Md,
    Json,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths to test (comma-separated; 0 skips pp).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (comma-separated; 0 skips tg).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Thread counts to test (comma-separated) [default: physical cores].
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Md)]
    pub output: OutputFormat,
}

#[derive(Serialize)]
struct BenchRow {
    model: String,
    size_bytes: usize,
    params: usize,
    backend: &'static str,
    threads: usize,
    test: String,
    n_prompt: usize,
    n_gen: usize,
    avg_ts: f64,
    stddev_ts: f64,
    samples_ts: Vec<f64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let threads = if args.threads.is_empty() {
        vec![common::threads(None)?]
    } else {
        args.threads
            .iter()
            .map(|&t| common::threads(Some(t)))
            .collect::<Result<Vec<_>>>()?
    };
    let source = args.model.open()?;
    let model = common::load_model(&source)?;
    let cfg = &model.config;
    let vocab = cfg.vocab_size as u64;
    let max_tokens = args
        .n_prompt
        .iter()
        .chain(args.n_gen.iter())
        .copied()
        .max()
        .unwrap_or(0);
    if max_tokens > cfg.n_ctx_train {
        bail!(
            "a test of {max_tokens} tokens exceeds the model's context of {}",
            cfg.n_ctx_train
        );
    }
    let n_ctx = max_tokens.max(1);
    let name = args
        .model
        .path()
        .file_name()
        .map_or_else(|| cfg.name.clone(), |f| f.to_string_lossy().into_owned());
    let mut rows = Vec::new();
    for &n_threads in &threads {
        let mut opts = SessionOptions::new(n_ctx, n_threads);
        opts.max_batch = 512;
        let mut session = Session::new(&model, opts)?;
        let mut rng = Rng::new(42);
        let mut random_tokens =
            |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };
        let mut tests: Vec<(String, usize, usize)> = Vec::new();
        tests.extend(
            args.n_prompt
                .iter()
                .filter(|&&p| p > 0)
                .map(|&p| (format!("pp{p}"), p, 0)),
        );
        tests.extend(
            args.n_gen
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| (format!("tg{n}"), 0, n)),
        );
        for (test, n_prompt, n_gen) in tests {
            let prompt = random_tokens(n_prompt.max(1));
            let mut samples = Vec::with_capacity(args.repetitions);
            // The first run warms caches and page-ins and is not counted.
            for rep in 0..=args.repetitions {
                session.reset();
                let start = Instant::now();
                if n_prompt > 0 {
                    session.forward(&prompt, Logits::Last)?;
                } else {
                    let mut token = prompt[0];
                    for _ in 0..n_gen {
                        let logits = session.forward(&[token], Logits::Last)?;
                        token = edgefusion_runtime::sampler::argmax(logits);
                    }
                }
                let secs = start.elapsed().as_secs_f64();
                if rep > 0 {
                    samples.push((n_prompt + n_gen) as f64 / secs);
                }
            }
            let (avg, sd) = mean_sd(&samples);
            let row = BenchRow {
                model: name.clone(),
                size_bytes: model.weight_bytes(),
                params: cfg.n_params(),
                backend: "CPU",
                threads: n_threads,
                test,
                n_prompt,
                n_gen,
                avg_ts: avg,
                stddev_ts: sd,
                samples_ts: samples,
            };
            if matches!(args.output, OutputFormat::Md) {
                if rows.is_empty() {
                    println!("| model | size | params | backend | threads | test | t/s |");
                    println!("| ----- | ---: | -----: | ------- | ------: | ---: | --: |");
                }
                println!(
                    "| {} | {:.2} MiB | {:.2} M | {} | {} | {} | {:.2} ± {:.2} |",
                    row.model,
                    common::mib(row.size_bytes),
                    row.params as f64 / 1e6,
                    row.backend,
                    row.threads,
                    row.test,
                    row.avg_ts,
                    row.stddev_ts
                );
            }
            rows.push(row);
        }
    }
    if matches!(args.output, OutputFormat::Json) {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}
