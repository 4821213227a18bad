//! `edgefusion compare`: the paper's table from one base model — Dense, GPTQ-4bit,
//! Mamba-pure, Window-only and EdgeFusion — each built (or found from an earlier run),
//! evaluated and measured the same way.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use edgefusion_eval::compare::{CompareReport, VariantResult};
use edgefusion_io::{Backing, ModelSource};
use edgefusion_model::{LayerType, ModelConfig};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion compare --base assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --config configs/smollm2_135m.yaml --limit 200 -o runs/compare\n  \
    edgefusion compare --base M --config C --run runs/smollm2 --tasks ppl,hellaswag -o runs/compare\n\n\
    The five variants, written under OUTPUT/models/ (each reused when present):\n  \
    Dense        the base model; a quantized GGUF is dequantized to F16 first\n  \
    GPTQ-4bit    `quantize --method gptq --bits 4` of the dense model (16×128 tiles,\n               \
    calibrated on the config's calibration text)\n  \
    Mamba-pure   every layer on SSM: the run's last router checkpoint hardened at share 1\n               \
    (a `layer_choice: gates` run only; a greedy conversion has no router)\n  \
    Window-only  the dense model with EdgeFusion's converted layers as sink + window softmax\n               \
    (no SSM, no training): the baseline every hybrid must beat\n  \
    EdgeFusion   the run's checkpoint_quantized/model.gguf (hybrid at the target share,\n               \
    EFQ at the config's bits per weight)\n\
    The run is `train --config C --output-dir RUN` (default OUTPUT/run); it is trained here\n\
    first when it has no checkpoint_quantized/ yet (about 45 min for SmolLM2 on 2 cores).\n\
    Each variant is evaluated like `edgefusion evaluate` (its per-item cache in OUTPUT/cache/,\n\
    so an interrupted comparison resumes), then measured by `edgefusion bench` processes\n\
    (peak memory and decode speed at --bench-ctx) in 3 rounds, the variants taking turns.\n\
    OUTPUT gets compare.md, compare.json and compare.png (quality against memory).")]
pub struct CompareArgs {
    /// The dense base model (GGUF file or Hugging Face folder).
    #[arg(long)]
    pub base: PathBuf,
    /// The training configuration of the hybrid conversion.
    #[arg(long)]
    pub config: PathBuf,
    /// The conversion run's folder [default: OUTPUT/run].
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Score only the first N items of each task (of each MMLU subject): `200`, or per
    /// task, `200,mmlu=10,gsm8k=50` (as `evaluate --limit`).
    #[arg(long, value_parser = edgefusion_eval::runner::Limits::parse)]
    pub limit: Option<edgefusion_eval::runner::Limits>,
    /// Tasks to evaluate (as `evaluate --tasks`).
    #[arg(long, default_value = "ppl,mmlu,hellaswag,arc_challenge,gsm8k")]
    pub tasks: String,
    /// Perplexity windows [default: all of the file].
    #[arg(long)]
    pub ppl_chunks: Option<usize>,
    /// Text for perplexity (as `evaluate --ppl-file`).
    #[arg(long, default_value = "assets/text/moby-dick.txt")]
    pub ppl_file: PathBuf,
    /// Perplexity window in tokens.
    #[arg(long, default_value_t = 512)]
    pub ppl_ctx: usize,
    /// Folder of the task jsonl files.
    #[arg(long, default_value = "assets/tasks")]
    pub tasks_dir: PathBuf,
    /// Context window of the task prompts.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Longest generation (GSM8K) in tokens [default: the harness's 256].
    #[arg(long)]
    pub max_gen_tokens: Option<usize>,
    /// Context position of the speed, memory and FLOP rows.
    #[arg(long, default_value_t = 512)]
    pub bench_ctx: usize,
    /// Tokens decoded per speed measurement (ending at --bench-ctx).
    #[arg(long, default_value_t = 64)]
    pub bench_tokens: usize,
    /// Window of the Window-only row when the hybrid has none of its own.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Sink of the Window-only row when the hybrid has no window of its own.
    #[arg(long, default_value_t = 4)]
    pub sink: usize,
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Folder for the variants, caches and the table.
    #[arg(short = 'o', long = "output", default_value = "runs/compare")]
    pub output: PathBuf,
}

const BENCH_REPETITIONS: usize = 3;

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// Runs one `edgefusion …` subcommand in this process.
fn subcommand(argv: &[String]) -> Result<()> {
    let mut full = vec!["edgefusion".to_string()];
    full.extend_from_slice(argv);
    crate::run_argv(&full)
}

/// Peak memory and decode speed from a separate `edgefusion bench` process (one run), so
/// that the memory is this model's alone.
fn measure(model: &Path, ctx: usize, n_gen: usize, threads: usize) -> Result<(Option<u64>, f64)> {
    let exe = std::env::current_exe().context("finding the edgefusion binary")?;
    let out = std::process::Command::new(exe)
        .args([
            "bench",
            "-m",
            &arg(model),
            "-p",
            "0",
            "-n",
            &n_gen.to_string(),
            "--ctx",
            &ctx.to_string(),
            "-t",
            &threads.to_string(),
            "-r",
            "1",
            "-o",
            "json",
        ])
        .output()
        .context("running edgefusion bench")?;
    if !out.status.success() {
        bail!(
            "bench of {} failed: {}",
            model.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bench of {}: unreadable output", model.display()))?;
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["ctx"].as_u64() == Some(ctx as u64)))
        .with_context(|| format!("bench of {}: no row at ctx {ctx}", model.display()))?;
    Ok((
        row["peak_rss_bytes"].as_u64(),
        row["avg_ts"].as_f64().unwrap_or(0.0),
    ))
}

pub fn run(args: CompareArgs) -> Result<()> {
    let threads = crate::common::threads(args.threads)?;
    edgefusion_eval::Task::parse_list(&args.tasks)?;
    if args.bench_tokens == 0 || args.bench_tokens >= args.bench_ctx {
        bail!(
            "--bench-tokens {} must be at least 1 and below --bench-ctx {}",
            args.bench_tokens,
            args.bench_ctx
        );
    }
    let config = edgefusion_train::TrainConfig::load(&args.config)?;
    let models = args.output.join("models");
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let run_dir = args.run.clone().unwrap_or_else(|| args.output.join("run"));

    // Dense: the base itself when it holds floats, else its F16 dequantization.
    let base_source = ModelSource::open(&args.base)
        .with_context(|| format!("base model {}", args.base.display()))?;
    let dense = match &base_source {
        ModelSource::Gguf(g) if g.tensors.iter().any(|t| t.dtype.is_quantized()) => {
            let path = models.join("dense-f16.gguf");
            if !path.exists() {
                eprintln!("compare: dequantizing {} to F16", args.base.display());
                edgefusion_model::convert::dequantize_gguf(g, &path)?;
            }
            path
        }
        _ => args.base.clone(),
    };
    let calib = config
        .quantization
        .calib
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::common::CALIBRATION_TEXT));
    let gptq = models.join("gptq4.gguf");
    if !gptq.exists() {
        eprintln!("compare: GPTQ 4-bit of the dense model");
        subcommand(&[
            "quantize".into(),
            "-m".into(),
            arg(&dense),
            "-o".into(),
            arg(&gptq),
            "--method".into(),
            "gptq".into(),
            "--bits".into(),
            "4".into(),
            "--calib".into(),
            arg(&calib),
            "--calib-tokens".into(),
            config.quantization.calib_tokens.to_string(),
            "-t".into(),
            threads.to_string(),
        ])?;
    }
    let hybrid = run_dir.join("checkpoint_quantized/model.gguf");
    if !hybrid.exists() {
        eprintln!(
            "compare: no {} yet: training the conversion",
            hybrid.display()
        );
        let mut argv = vec![
            "train".to_string(),
            "--config".into(),
            arg(&args.config),
            "--output-dir".into(),
            arg(&run_dir),
            "--base-model".into(),
            arg(&args.base),
            "-t".into(),
            threads.to_string(),
        ];
        if run_dir.join("checkpoints").is_dir() || run_dir.join("finetune").is_dir() {
            argv.push("--resume".into());
        }
        subcommand(&argv)?;
    }
    let pure = models.join("mamba-pure.gguf");
    // Mamba-pure hardens a router checkpoint: a greedy conversion has none.
    let has_router = !edgefusion_train::checkpoint::list(&run_dir.join("checkpoints")).is_empty();
    if !has_router && !pure.exists() {
        eprintln!(
            "compare: no Mamba-pure row: {} has no router checkpoint (conversion.layer_choice greedy trains none)",
            run_dir.display()
        );
    }
    if has_router && !pure.exists() {
        eprintln!("compare: Mamba-pure from the run's last checkpoint");
        subcommand(&[
            "harden".into(),
            "--output-dir".into(),
            arg(&run_dir),
            "--base-model".into(),
            arg(&args.base),
            "--ssm-fraction".into(),
            "1".into(),
            "-o".into(),
            arg(&pure),
        ])?;
    }

    // Window-only: EdgeFusion's converted layers, attending over the sink and the window
    // alone, in the dense model.
    let hybrid_cfg = ModelConfig::from_source(&ModelSource::open_with(&hybrid, Backing::Mapped)?)?;
    let converted: Vec<usize> = (0..hybrid_cfg.n_layers)
        .filter(|&l| hybrid_cfg.layer_types[l] != LayerType::Attention)
        .collect();
    let (window, sink) = if hybrid_cfg.window > 0 {
        (hybrid_cfg.window, hybrid_cfg.sink)
    } else {
        (args.window, args.sink)
    };
    let window_only = models.join(format!("window-only-{window}-{sink}.gguf"));
    if !window_only.exists() && !converted.is_empty() {
        eprintln!("compare: Window-only (layers {converted:?}, sink {sink} + window {window})");
        // Each tensor is read once into the new file: the source stays mapped.
        let ModelSource::Gguf(g) = &ModelSource::open_with(&dense, Backing::Mapped)? else {
            bail!("the dense model {} is not a GGUF file", dense.display());
        };
        edgefusion_model::convert::window_gguf(g, &converted, window, sink, &window_only)?;
    }

    let q = &config.quantization;
    let mut variants = vec![
        (
            "Dense",
            dense.clone(),
            if dense == args.base {
                "the base model".to_string()
            } else {
                format!("{} dequantized to F16", args.base.display())
            },
        ),
        (
            "GPTQ-4bit",
            gptq,
            format!(
                "GPTQ, 4-bit codes in 16×128 tiles, calibrated on {} tokens of {}",
                q.calib_tokens,
                calib.display()
            ),
        ),
        (
            "Mamba-pure",
            pure,
            "every layer on SSM: the conversion's SSMs after router training in f32, the other weights as in the base"
                .to_string(),
        ),
        (
            "Window-only",
            window_only,
            format!(
                "the dense model with EdgeFusion's {} converted layers attending to the first {sink} and the last {window} positions only: no SSM, no training",
                converted.len()
            ),
        ),
        (
            "EdgeFusion",
            hybrid,
            format!(
                "{}, EFQ at {} bits per weight ({}% outliers at 6 bits)",
                match config.conversion.layer_choice {
                    edgefusion_train::config::LayerChoiceMethod::Greedy => format!(
                        "{} converted layers chosen jointly{}, end-to-end KL with rank-{} adapters on the feed-forward blocks ({} steps)",
                        converted.len(),
                        if config.conversion.ssm_beside_window { ", SSM beside the window" } else { "" },
                        config.conversion.lora_rank,
                        config.conversion.finetune_steps
                    ),
                    edgefusion_train::config::LayerChoiceMethod::Gates => format!(
                        "hybrid at target share {}",
                        config.router.target_ssm_fraction.unwrap_or(0.0)
                    ),
                },
                q.bpw,
                100.0 * q.outliers
            ),
        ),
    ];
    if converted.is_empty() {
        variants.retain(|v| v.0 != "Window-only");
    }
    variants.retain(|v| v.0 != "Mamba-pure" || v.1.exists());
    let mut report = CompareReport {
        base: arg(&args.base),
        threads,
        bench_ctx: args.bench_ctx,
        bench_tokens: args.bench_tokens,
        bench_repetitions: BENCH_REPETITIONS,
        limit: args.limit.clone(),
        variants: Vec::new(),
    };
    let cache_dir = args.output.join("cache");
    for (name, model, description) in variants {
        eprintln!("compare: evaluating {name} ({})", model.display());
        let mut argv = vec![
            "edgefusion".to_string(),
            "evaluate".into(),
            "-m".into(),
            arg(&model),
            "--tasks".into(),
            args.tasks.clone(),
            "-t".into(),
            threads.to_string(),
            "--cache".into(),
            arg(&cache_dir.join(format!("{name}.jsonl"))),
            "--ppl-file".into(),
            arg(&args.ppl_file),
            "--ppl-ctx".into(),
            args.ppl_ctx.to_string(),
            "--tasks-dir".into(),
            arg(&args.tasks_dir),
            "--ctx".into(),
            args.ctx.to_string(),
        ];
        if let Some(n) = args.max_gen_tokens {
            argv.extend(["--max-gen-tokens".into(), n.to_string()]);
        }
        if let Some(l) = &args.limit {
            argv.extend(["--limit".into(), l.to_arg()]);
        }
        if let Some(c) = args.ppl_chunks {
            argv.extend(["--ppl-chunks".into(), c.to_string()]);
        }
        let eval_args = crate::parse_evaluate(&argv)?;
        let eval = crate::evaluate::evaluate(&eval_args)?;
        let source = ModelSource::open(&model)?;
        let cfg = ModelConfig::from_source(&source)?;
        report.variants.push(VariantResult {
            name: name.into(),
            description,
            model: arg(&model),
            file_bytes: std::fs::metadata(&model).map_or(0, |m| m.len()),
            n_layers: cfg.n_layers,
            n_converted_layers: cfg.n_layers - cfg.n_attention_layers(),
            eval,
            // Measured below, once every variant is evaluated.
            peak_rss_bytes: None,
            decode_tokens_per_s: 0.0,
            gflops_per_token: cfg.flops_per_token(args.bench_ctx - 1) / 1e9,
        });
        // The table so far, so that a long comparison shows its progress.
        write_tables(&args.output, &report)?;
    }
    // Speed and memory in rounds, the variants taking turns (A B C D A B C D …), so that
    // the noise of a shared machine falls on all of them alike.
    eprintln!(
        "compare: decode speed and peak memory, {BENCH_REPETITIONS} rounds over the {} variants",
        report.variants.len()
    );
    for _ in 0..BENCH_REPETITIONS {
        for v in &mut report.variants {
            let (peak, tps) = measure(
                Path::new(&v.model),
                args.bench_ctx,
                args.bench_tokens,
                threads,
            )?;
            v.peak_rss_bytes = v.peak_rss_bytes.max(peak);
            v.decode_tokens_per_s += tps / BENCH_REPETITIONS as f64;
        }
    }
    write_tables(&args.output, &report)?;
    let markdown = report.to_markdown();
    print!("{markdown}");
    let png = args.output.join("compare.png");
    crate::plot::compare_chart(&report, &png)?;
    eprintln!(
        "wrote {}, {} and {}",
        args.output.join("compare.md").display(),
        args.output.join("compare.json").display(),
        png.display()
    );
    Ok(())
}

fn write_tables(dir: &Path, report: &CompareReport) -> Result<()> {
    crate::common::write_atomic(&dir.join("compare.md"), report.to_markdown().as_bytes())?;
    crate::common::write_atomic(
        &dir.join("compare.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )
}
