//! `edgefusion bench`: llama-bench's method — pp (a prompt of p tokens in one batch, from an
//! empty cache) and tg (n tokens decoded one at a time, from an empty cache), each repeated
//! r times after one warm-up run, reported as mean ± sample standard deviation of tokens/s.
//! With `--ctx`, also decode speed deep in a context (tg n ending at position C, after an
//! untimed prefill of C − n tokens), with the process's resident memory and the bytes of KV
//! cache and SSM state at that depth: where hybrids and dense models part ways.
//! With `--parallel`, also tg with B sequences decoded together in one batched step per token
//! (what `serve` does with B busy slots), reported as the aggregate tokens/s of all B.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use edgefusion_model::Model;
use edgefusion_runtime::profile::mean_sd;
use edgefusion_runtime::sampler::Rng;
use edgefusion_runtime::{Logits, Sequence, Session, SessionOptions};
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
    /// Thread counts to test (comma-separated) [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// Context lengths for decode-at-depth tests (comma-separated, e.g. 512,2048,4096,8192):
    /// tg n (the first --n-gen) ending at each position.
    #[arg(long = "ctx", value_delimiter = ',')]
    pub ctx: Vec<usize>,
    /// Sequences decoded together (comma-separated, e.g. 1,4,16): tg n (the first
    /// --n-gen) for each of B sequences in one batched step per token, as `serve` decodes
    /// B busy slots; aggregate tokens/s.
    #[arg(long = "parallel", value_delimiter = ',')]
    pub parallel: Vec<usize>,
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
    /// Decode-at-depth tests: the context position the decode ends at, resident memory
    /// after the test, and bytes of KV cache used plus SSM state.
    #[serde(skip_serializing_if = "Option::is_none")]
    ctx: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_bytes: Option<u64>,
    /// The process's peak resident memory so far (loading included).
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_bytes: Option<usize>,
}

impl BenchRow {
    /// A pp/tg row: tokens/s samples of `model` at `n_threads`.
    fn speed(
        name: &str,
        model: &Model<'_>,
        n_threads: usize,
        test: String,
        n_prompt: usize,
        n_gen: usize,
        samples: Vec<f64>,
    ) -> Self {
        let (avg, sd) = mean_sd(&samples);
        BenchRow {
            model: name.to_string(),
            size_bytes: model.weight_bytes(),
            params: model.config.n_params(),
            backend: "CPU",
            threads: n_threads,
            test,
            n_prompt,
            n_gen,
            avg_ts: avg,
            stddev_ts: sd,
            samples_ts: samples,
            ctx: None,
            rss_bytes: None,
            peak_rss_bytes: None,
            state_bytes: None,
        }
    }
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
        .chain(args.ctx.iter())
        .copied()
        .max()
        .unwrap_or(0);
    let depth_gen = args.n_gen.iter().copied().find(|&n| n > 0).unwrap_or(128);
    if let Some(&c) = args.ctx.iter().find(|&&c| c <= depth_gen) {
        bail!("--ctx {c} must exceed the {depth_gen} tokens decoded at depth");
    }
    if max_tokens > cfg.n_ctx_train {
        bail!(
            "a test of {max_tokens} tokens exceeds the model's context of {}",
            cfg.n_ctx_train
        );
    }
    if args.parallel.contains(&0) {
        bail!("--parallel counts must be at least 1");
    }
    let most_parallel = args.parallel.iter().copied().max().unwrap_or(1);
    // A --parallel test decodes depth_gen tokens per sequence, as many sequences as logits.
    let parallel_ctx = if args.parallel.is_empty() {
        1
    } else {
        depth_gen.max(most_parallel)
    };
    let n_ctx = max_tokens.max(parallel_ctx);
    let name = args
        .model
        .path()
        .file_name()
        .map_or_else(|| cfg.name.clone(), |f| f.to_string_lossy().into_owned());
    let mut rows = Vec::new();
    for &n_threads in &threads {
        let mut opts = SessionOptions::new(n_ctx, n_threads);
        opts.max_batch = 512.max(most_parallel);
        opts.max_logits = most_parallel;
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
            if session.settled_threads() < n_threads {
                eprintln!(
                    "{test} at {n_threads} threads: the layers settled on {} (the CPUs are busy; EDGEFUSION_ADAPT_THREADS=0 keeps every thread)",
                    session.settled_threads()
                );
            }
            let row = BenchRow::speed(&name, &model, n_threads, test, n_prompt, n_gen, samples);
            if matches!(args.output, OutputFormat::Md) {
                print_md_row(&row, rows.is_empty());
            }
            rows.push(row);
        }
        for &n_seq in &args.parallel {
            let mut seqs: Vec<Sequence> = (0..n_seq).map(|_| session.new_sequence()).collect();
            let first = random_tokens(n_seq);
            let mut samples = Vec::with_capacity(args.repetitions);
            for rep in 0..=args.repetitions {
                seqs.iter_mut().for_each(Sequence::reset);
                let mut tokens = first.clone();
                let start = Instant::now();
                for _ in 0..depth_gen {
                    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
                    let logits = session.decode_batch(&mut refs, &tokens)?;
                    for (t, row) in tokens.iter_mut().zip(logits.chunks_exact(vocab as usize)) {
                        *t = edgefusion_runtime::sampler::argmax(row);
                    }
                }
                if rep > 0 {
                    samples.push((n_seq * depth_gen) as f64 / start.elapsed().as_secs_f64());
                }
            }
            let test = format!("tg{depth_gen} x{n_seq}");
            let row = BenchRow::speed(
                &name,
                &model,
                n_threads,
                test,
                0,
                depth_gen * n_seq,
                samples,
            );
            if matches!(args.output, OutputFormat::Md) {
                print_md_row(&row, rows.is_empty());
            }
            rows.push(row);
        }
        let mut printed_header = false;
        for &ctx in &args.ctx {
            let prompt = random_tokens(ctx - depth_gen);
            let mut samples = Vec::with_capacity(args.repetitions);
            for rep in 0..=args.repetitions {
                session.reset();
                // The prefill is not timed.
                let logits = session.forward(&prompt, Logits::Last)?;
                let mut token = edgefusion_runtime::sampler::argmax(logits);
                let start = Instant::now();
                for _ in 0..depth_gen {
                    let logits = session.forward(&[token], Logits::Last)?;
                    token = edgefusion_runtime::sampler::argmax(logits);
                }
                if rep > 0 {
                    samples.push(depth_gen as f64 / start.elapsed().as_secs_f64());
                }
            }
            let (avg, sd) = mean_sd(&samples);
            let state = session.kv_bytes_per_position() * ctx + session.recurrent_state_bytes();
            let rss = edgefusion_runtime::profile::rss_bytes();
            if matches!(args.output, OutputFormat::Md) {
                if !printed_header {
                    println!();
                    println!(
                        "| model | threads | test | t/s | RSS | KV cache + SSM/window state |"
                    );
                    println!("| ----- | ------: | ---- | --: | --: | -------------------: |");
                    printed_header = true;
                }
                println!(
                    "| {name} | {n_threads} | tg{depth_gen} @ ctx {ctx} | {avg:.2} ± {sd:.2} | {} | {:.2} MiB |",
                    rss.map_or("n/a".into(), |b| format!("{:.1} MiB", common::mib(b as usize))),
                    common::mib(state)
                );
            }
            rows.push(BenchRow {
                model: name.clone(),
                size_bytes: model.weight_bytes(),
                params: cfg.n_params(),
                backend: "CPU",
                threads: n_threads,
                test: format!("tg{depth_gen}@ctx{ctx}"),
                n_prompt: ctx - depth_gen,
                n_gen: depth_gen,
                avg_ts: avg,
                stddev_ts: sd,
                samples_ts: samples,
                ctx: Some(ctx),
                rss_bytes: rss,
                peak_rss_bytes: edgefusion_runtime::profile::peak_rss_bytes(),
                state_bytes: Some(state),
            });
        }
    }
    if matches!(args.output, OutputFormat::Json) {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// One row of the markdown table of pp/tg tests, after the header when `first`.
fn print_md_row(row: &BenchRow, first: bool) {
    if first {
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
