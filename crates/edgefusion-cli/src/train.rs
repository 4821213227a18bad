//! `edgefusion train`: convert a dense model into an attention/SSM hybrid.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgefusion_io::ModelSource;
use edgefusion_model::ModelConfig;
use edgefusion_train::plan::{config_from_architecture, measure_gflops};
use edgefusion_train::TrainConfig;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion train --config configs/smollm2_135m.yaml --output-dir runs/smollm2\n  \
    edgefusion train --config configs/smollm2_135m.yaml --output-dir runs/smollm2 --dry-run\n  \
    edgefusion train --config configs/edgefusion_7b.yaml --output-dir runs/7b --dry-run\n\n\
    --dry-run validates the configuration, reads the base model's shapes (or the config's\n\
    `architecture` when there are no weights) and prints the plan: parameters dense and\n\
    hybrid, GFLOP/token, bytes at the configured bits per weight, KV cache against SSM state\n\
    at several context lengths, whether the hybrid fits 4 GB, and the time of each stage on\n\
    this machine.\n\n\
    conversion.layer_choice picks the method. `greedy` (configs/smollm2_135m.yaml): 1 the\n\
    joint layer choice (every layer starts as sink + window softmax, full attention is\n\
    given back one layer at a time where the KL to the dense model falls most), 2\n\
    end-to-end KL to the dense model with low-rank adapters on the feed-forward blocks (and\n\
    the SSM beside each window with ssm_beside_window), 3 quantize. It writes choice.json,\n\
    finetune/ (checkpoints), metrics.jsonl, checkpoint_final/model.gguf (adapters merged)\n\
    and checkpoint_quantized/model.gguf; a second run reuses the choice, --resume continues\n\
    the fine-tuning. `gates`: 1 teacher cache, 2 layer-local SSM distillation, 3 router\n\
    training (λ adapts to reach target_ssm_fraction), 4 harden and quantize, writing\n\
    teacher/ (stage 1's 16-bit cache), distill/ (each layer's SSM), hybrid_distill.gguf\n\
    (layers chosen by distillation error alone), checkpoints/, metrics.jsonl,\n\
    checkpoint_final/model.gguf (with router.json) and checkpoint_quantized/model.gguf; a\n\
    second run reuses the teacher cache and distilled layers.")]
pub struct TrainArgs {
    /// Training configuration (YAML; see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Folder for checkpoints, metrics.jsonl and the final model.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Base model (overrides the config's model.base).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Validate and print the plan; train nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run every stage on a small slice (100 router steps of one sequence of ≤ 64 tokens,
    /// a teacher cache of 32 sequences; or a choice on one short window and 10 fine-tuning
    /// steps of ≤ 128 tokens): a check of the whole setup in minutes.
    #[arg(long)]
    pub debug: bool,
    /// Keep the base weights frozen in router training (`false`: fine-tune them all with
    /// the SSMs, written in f32) [default: the config's stages.freeze_base, else true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub freeze_base: Option<bool>,
    /// Stop after writing checkpoint_final/ (no checkpoint_quantized/).
    #[arg(long)]
    pub skip_quantization: bool,
    /// Continue training from the newest checkpoint in OUTPUT_DIR (checkpoints/ of the
    /// router, finetune/ of a greedy conversion: weights, optimizer moments, step and data
    /// position, so the run goes on exactly).
    #[arg(long)]
    pub resume: bool,
    /// Write a checkpoint and stop after this training step (to test --resume).
    #[arg(long, hide = true)]
    pub stop_after_steps: Option<usize>,
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let config = TrainConfig::load(&args.config)?.with_overrides(args.freeze_base, args.debug);
    if args.debug {
        let c = &config.conversion;
        if c.layer_choice == edgefusion_train::config::LayerChoiceMethod::Greedy {
            println!(
                "debug: choice on {} × {} tokens, {} fine-tuning steps of {} tokens",
                c.choice_windows, c.choice_ctx, c.finetune_steps, c.finetune_seq_len
            );
        } else {
            println!(
                "debug: {} router steps of 1 × {} tokens, teacher cache {} tokens",
                config.stages.router_steps, config.data.seq_len, config.stages.teacher_tokens
            );
        }
    }
    let threads = crate::common::threads(args.threads)?;
    let base = args
        .base_model
        .clone()
        .or_else(|| config.model.base.clone());
    let dense: ModelConfig = match (&base, &config.model.architecture) {
        (Some(path), _) if path.exists() => {
            let source = ModelSource::open(path)
                .with_context(|| format!("base model {}", path.display()))?;
            let dense = ModelConfig::from_source(&source)?;
            if dense.block != edgefusion_model::BlockVariant::default() {
                bail!(
                    "base model {}: train converts Llama-style blocks (llama, qwen2); a {} model's block (QK-norm, post-norms, GeGLU, local layers) is not trained yet",
                    path.display(),
                    dense.arch.name()
                );
            }
            if dense.rope_scaling != edgefusion_model::RopeScaling::None {
                bail!(
                    "base model {}: RoPE scaling ({}) is not trained yet (the student rotates unscaled)",
                    path.display(),
                    match dense.rope_scaling {
                        edgefusion_model::RopeScaling::Factors(_) => "per-frequency factors",
                        edgefusion_model::RopeScaling::Linear { .. } => "linear",
                        _ => "llama3",
                    }
                );
            }
            if dense.is_hybrid() {
                bail!(
                    "base model {} is already a hybrid; convert its dense source",
                    path.display()
                );
            }
            if let Some(a) = &config.model.architecture {
                let expected = config_from_architecture(a);
                let same = (
                    expected.n_layers,
                    expected.d_model,
                    expected.n_heads,
                    expected.n_kv_heads,
                    expected.d_ff,
                    expected.vocab_size,
                ) == (
                    dense.n_layers,
                    dense.d_model,
                    dense.n_heads,
                    dense.n_kv_heads,
                    dense.d_ff,
                    dense.vocab_size,
                );
                if !same {
                    bail!(
                        "{}: model.architecture does not match the base model {} ({} layers, d_model {}, heads {}/{}, d_ff {}, vocab {})",
                        args.config.display(),
                        path.display(),
                        dense.n_layers,
                        dense.d_model,
                        dense.n_heads,
                        dense.n_kv_heads,
                        dense.d_ff,
                        dense.vocab_size
                    );
                }
            }
            dense
        }
        (_, Some(a)) if args.dry_run => config_from_architecture(a),
        (Some(path), _) => bail!(
            "base model {} not found (run scripts/fetch-assets.sh --model, or pass --base-model)",
            path.display()
        ),
        (None, _) => bail!(
            "{}: training needs weights: set model.base or pass --base-model",
            args.config.display()
        ),
    };
    if !args.dry_run {
        if !config.data.train.exists() {
            bail!(
                "{}: data.train {} not found (scripts/fetch-assets.sh --text)",
                args.config.display(),
                config.data.train.display()
            );
        }
        let path = base.clone().expect("a base model was found above");
        return train(&args, &config, &path, threads);
    }
    let gflops = measure_gflops(threads);
    let plan = edgefusion_train::plan(&config, &dense, gflops, threads)?;
    println!("config: {}", args.config.display());
    match &base {
        Some(p) if p.exists() => println!("base model: {}", p.display()),
        _ => println!("base model: none (planned from model.architecture)"),
    }
    println!(
        "data: {} ({}), sequences of {} × batch {}",
        config.data.train.display(),
        if config.data.train.exists() {
            "found"
        } else {
            "missing: scripts/fetch-assets.sh --text"
        },
        config.data.seq_len,
        config.data.batch_size
    );
    println!("output: {}\n", args.output_dir.display());
    print!("{}", plan.render(&config));
    Ok(())
}

/// The stages of `conversion.layer_choice: greedy`, with progress bars.
fn train_greedy(
    args: &TrainArgs,
    config: &TrainConfig,
    (source, gguf): (&ModelSource, &edgefusion_io::gguf::GgufFile),
    model: &edgefusion_model::Model<'_>,
    tokens: &[u32],
    threads: usize,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    use edgefusion_train::convert::greedy_stages;
    use edgefusion_train::run::{Event, RunOptions};
    let start = std::time::Instant::now();
    let conv = &config.conversion;
    let steps = conv.finetune_steps;
    let log_every = config.logging.log_every.max(1);
    let outcome = greedy_stages(
        config,
        source,
        gguf,
        model,
        tokens,
        &config.data.train.display().to_string(),
        &args.output_dir,
        threads,
        &RunOptions {
            skip_quantization: args.skip_quantization,
            resume: args.resume,
            stop_after: args.stop_after_steps,
        },
        &mut |event| match event {
            Event::ChoiceCached => println!("choice: found in the run folder, reused"),
            Event::Choosing { done, total } => {
                bar.set_prefix("1 choice");
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message("forward passes (KL with each layer restored)");
                if bar.is_hidden() && (done % 10 == 0 || done == total) {
                    println!(
                        "choice: {done}/{total} forward passes ({:.0} s)",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
            Event::ChoiceDone(choice) => {
                bar.finish_and_clear();
                bar.reset();
                let kept: Vec<String> = choice.converted.iter().map(|l| l.to_string()).collect();
                println!(
                    "choice: {} layers to sink {} + window {}: {} ({} {:.4} with all converted, {:.4} chosen; {} passes, {:.0} s)",
                    choice.converted.len(),
                    conv.sink,
                    conv.window,
                    kept.join(" "),
                    match conv.choice_copy_windows {
                        0 => "KL per token".to_string(),
                        _ => format!("prose KL + {} × copy KL", conv.choice_copy_weight),
                    },
                    choice.kl_all_converted,
                    choice.kl_final,
                    choice.evaluations,
                    start.elapsed().as_secs_f64()
                );
            }
            Event::TeacherProgress { done, total } => {
                if bar.is_hidden() && done == total {
                    println!("fine-tune: the dense model's top-k on {total} windows");
                }
                bar.set_prefix("2 teacher");
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(format!("windows of {} tokens", conv.finetune_seq_len));
                if done == total {
                    bar.reset();
                }
            }
            Event::Resumed { step } => {
                println!("fine-tune: resumed from the checkpoint of step {step}")
            }
            Event::FinetuneStep(s) => {
                bar.set_prefix("2 fine-tune");
                bar.set_length(steps as u64);
                bar.set_position(s.step as u64 + 1);
                bar.set_message(format!("kl {:.4} {:.0} tok/s", s.kl, s.tokens_per_s));
                if s.step % log_every == 0 || s.step + 1 == steps {
                    say(
                        bar,
                        format!(
                            "step {:4}: kl {:.4} grad {:.3} lr {:.2e} {:.0} tok/s{}",
                            s.step,
                            s.kl,
                            s.grad_norm,
                            s.lr,
                            s.tokens_per_s,
                            match conv.window_dropout > 0.0 {
                                true => format!(" window {}", s.window),
                                false => String::new(),
                            }
                        ),
                    );
                }
            }
            Event::Quantizing { done, total } => {
                bar.set_prefix("3 quantize");
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(String::new());
                if bar.is_hidden() && crate::common::tenth_done(done, total) {
                    println!("quantize: {done}/{total} matrices");
                }
            }
            _ => {}
        },
    )?;
    bar.finish_and_clear();
    println!(
        "hybrid: {} of {} layers converted ({}{}), {} fine-tuning steps this run",
        outcome.choice.converted.len(),
        outcome.layer_types.len(),
        if conv.ssm_beside_window {
            "SSM beside "
        } else {
            ""
        },
        format_args!("sink {} + window {}", conv.sink, conv.window),
        outcome.finetune.len()
    );
    println!("wrote {}", outcome.final_model.display());
    if let Some(q) = &outcome.quantized {
        println!("wrote {}", q.display());
    }
    println!("total {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Stages 1 and 2, with progress bars; the router (stage 3) and hardening come next.
fn train(
    args: &TrainArgs,
    config: &TrainConfig,
    base: &std::path::Path,
    threads: usize,
) -> Result<()> {
    use edgefusion_train::run::{distill_stages, router_stages, Event, RunOptions};
    use indicatif::{ProgressBar, ProgressStyle};

    let source =
        ModelSource::open(base).with_context(|| format!("base model {}", base.display()))?;
    let temp;
    let converted;
    // Stage outputs are GGUF files: a Hugging Face folder is converted first.
    let (gguf_source, gguf) = match &source {
        ModelSource::Gguf(g) => (&source, g),
        ModelSource::HfDir(dir) => {
            std::fs::create_dir_all(&args.output_dir)?;
            temp = edgefusion_train::run::converted_base(&args.output_dir);
            edgefusion_model::convert::hf_to_gguf(dir, &temp)?;
            converted = ModelSource::open(&temp)?;
            let ModelSource::Gguf(g) = &converted else {
                unreachable!("a file opens as GGUF")
            };
            (&converted, g)
        }
    };
    let model = edgefusion_model::Model::load(gguf_source)?;
    let tokenizer = crate::common::load_tokenizer(gguf_source)?;
    let text = crate::common::read_text(&config.data.train)?;
    let tokens = tokenizer
        .encode(&text, false)
        .with_context(|| format!("tokenizing {}", config.data.train.display()))?;
    let one_batch = config.data.seq_len * config.data.batch_size.max(2);
    if tokens.len() < one_batch {
        bail!(
            "{}: data.train {} has {} tokens, fewer than one batch ({} sequences of {}) plus a held-out one",
            args.config.display(),
            config.data.train.display(),
            tokens.len(),
            config.data.batch_size.max(2),
            config.data.seq_len
        );
    }
    println!(
        "base model: {} ({} layers); training text: {} ({} tokens); output: {}",
        base.display(),
        model.config.n_layers,
        config.data.train.display(),
        tokens.len(),
        args.output_dir.display()
    );
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta}) {msg}",
    )
    .unwrap()
    .progress_chars("=> ");
    let bar = ProgressBar::new(0).with_style(style);
    let n_layers = model.config.n_layers;
    let start = std::time::Instant::now();
    if config.conversion.layer_choice == edgefusion_train::config::LayerChoiceMethod::Greedy {
        return train_greedy(
            args,
            config,
            (gguf_source, gguf),
            &model,
            &tokens,
            threads,
            &bar,
        );
    }
    let outcome = distill_stages(
        config,
        gguf,
        &model,
        &tokens,
        &config.data.train.display().to_string(),
        &args.output_dir,
        threads,
        &mut |event| match event {
            Event::TeacherCached => println!("stage 1: teacher cache found, reused"),
            Event::TeacherProgress { done, total } => {
                bar.set_prefix("1 teacher");
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                if done == total {
                    bar.finish_and_clear();
                    println!("stage 1: teacher cache written ({total} sequences)");
                    bar.reset();
                }
            }
            Event::LayerStart { layer, resumed } => {
                if resumed {
                    println!("stage 2: layer {layer:2} already distilled, reused");
                } else {
                    bar.set_prefix(format!("2 layer {layer}/{n_layers}"));
                    bar.set_position(0);
                }
            }
            Event::DistillStep {
                step, total, loss, ..
            } => {
                bar.set_length(total as u64);
                bar.set_position(step as u64 + 1);
                bar.set_message(format!("loss {loss:.4}"));
            }
            Event::LayerDone(r) => {
                bar.finish_and_clear();
                bar.reset();
                println!(
                    "stage 2: layer {:2}: held-out relative error {:.4} -> {:.4} ({} steps, {:.0} s)",
                    r.layer, r.val_loss_init, r.val_loss, r.steps, r.seconds
                );
            }
            _ => {}
        },
    )?;
    bar.finish_and_clear();
    let ssm_layers = |types: &[edgefusion_model::LayerType]| -> Vec<String> {
        types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == edgefusion_model::LayerType::Ssm)
            .map(|(i, _)| i.to_string())
            .collect()
    };
    println!(
        "stage 2 done in {:.0} s; {} (by distillation error alone: SSM in layers {})",
        start.elapsed().as_secs_f64(),
        outcome.hybrid.display(),
        ssm_layers(&outcome.layer_types).join(" ")
    );
    let steps = config.stages.router_steps;
    let log_every = config.logging.log_every.max(1);
    let routed = router_stages(
        config,
        gguf,
        &model,
        &outcome,
        &args.output_dir,
        threads,
        &RunOptions {
            skip_quantization: args.skip_quantization,
            resume: args.resume,
            stop_after: args.stop_after_steps,
        },
        &mut |event| match event {
            Event::Resumed { step } => {
                println!("stage 3: resumed from the checkpoint of step {step}")
            }
            Event::SkippedStep { step } => say(
                &bar,
                format!(
                    "warning: router step {step} had a non-finite loss; skipped (no weight changed)"
                ),
            ),
            Event::RouterStep(s) => {
                if let Some(costs) = &s.switch_costs {
                    let mut order: Vec<usize> = (0..costs.len()).collect();
                    order.sort_by(|&a, &b| costs[a].total_cmp(&costs[b]));
                    let line = format!(
                        "step {:4}: commit phase: switching costs measured (ΔKL, each layer alone on SSM), cheapest first: {}",
                        s.step,
                        order
                            .iter()
                            .map(|&l| format!("{l} {:.4}", costs[l]))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    say(&bar, line);
                }
                bar.set_prefix("3 router");
                bar.set_length(steps as u64);
                bar.set_position(s.step as u64);
                bar.set_message(format!(
                    "kl {:.3} λ {:.3} τ {:.2} ssm_frac {:.2} H {:.2} bits {:.0} tok/s",
                    s.kl, s.lambda, s.tau, s.ssm_frac, s.gate_entropy_bits, s.tokens_per_s
                ));
                if s.step % log_every == 0 || s.step == steps || s.step == 1 {
                    let line = format!(
                        "step {:4}: kl {:.4} loss {:.4} λ {:.4} τ {:.3} ssm_frac {:.3} (mean g {:.3}) entropy {:.3} bits lr {:.2e} {:.0} tok/s",
                        s.step, s.kl, s.loss, s.lambda, s.tau, s.ssm_frac, s.mean_gate, s.gate_entropy_bits, s.lr, s.tokens_per_s
                    );
                    say(&bar, line);
                }
            }
            Event::Quantizing { done, total } => {
                bar.set_prefix("4 quantize");
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(String::new());
                if bar.is_hidden() && crate::common::tenth_done(done, total) {
                    println!("quantize: {done}/{total} matrices");
                }
            }
            _ => {}
        },
    )?;
    bar.finish_and_clear();
    let n_ssm = ssm_layers(&routed.layer_types).len();
    println!(
        "hardened: {n_ssm} of {n_layers} layers on SSM (ssm_frac {:.3}): {}",
        n_ssm as f64 / n_layers as f64,
        ssm_layers(&routed.layer_types).join(" ")
    );
    println!("wrote {}", routed.final_model.display());
    if let Some(q) = &routed.quantized {
        println!("wrote {}", q.display());
    }
    println!("total {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Prints `line` above the progress bar, or plainly when the bar is hidden (not a terminal):
/// log lines then still reach a redirected output.
fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}
