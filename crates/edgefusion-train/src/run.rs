//! The stages of `edgefusion train` in order, resumable: each finished piece is written
//! atomically into the output folder and found again by the next run.
//!
//! Output folder:
//! - `teacher/`: stage 1's cache ([`crate::teacher`]);
//! - `distill/layerNN.safetensors` and `distill/layerNN.json`: stage 2's SSM of each layer
//!   and its report;
//! - `metrics.jsonl`: one JSON object per logged step;
//! - `hybrid_distill.gguf`: the hybrid with the configured share of layers on SSM, chosen by
//!   lowest distillation loss (the stand-in for the router until stage 3 runs);
//! - `config.yaml`: the configuration as run (stage 3 writes it);
//! - `checkpoints/step_NNNNNN/`: stage 3's checkpoints ([`crate::checkpoint`]);
//! - `checkpoint_final/model.gguf` and `router.json`: the hardened hybrid;
//! - `checkpoint_quantized/model.gguf`: it quantized.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use edgefusion_io::gguf::GgufFile;
use edgefusion_model::{LayerType, Mixer, Model, ModelConfig};

use crate::distill::{
    distill_layer, from_vars, to_vars, DistillOptions, DistillReport, SSM_TENSOR_NAMES,
};
use crate::init::{
    hybrid_layout, ssm_from_attention, write_hybrid_tuned, write_hybrid_with, SsmInitSource,
    SsmWeights,
};
use crate::router::{router_step, RouterOptions, RouterState, RouterStep, Targets};
use crate::student::Student;
use crate::teacher::{
    cache_teacher, existing, read_layer, read_targets, TeacherMeta, TEACHER_FORMAT,
};
use crate::{TrainConfig, TrainError};

/// What the stages tell the caller as they go.
#[derive(Debug, Clone)]
pub enum Event {
    /// Stage 1 found a matching cache and skips.
    TeacherCached,
    TeacherProgress {
        done: usize,
        total: usize,
    },
    /// Stage 2 starts `layer` (or finds it done: `resumed`).
    LayerStart {
        layer: usize,
        resumed: bool,
    },
    DistillStep {
        layer: usize,
        step: usize,
        total: usize,
        loss: f64,
    },
    LayerDone(DistillReport),
    /// Stage 3: one router step.
    RouterStep(Box<RouterStep>),
    /// Stage 3 skipped this step: its loss was not finite (NaN or ∞), no weight changed.
    SkippedStep {
        step: usize,
    },
    /// Stage 3 continues from the checkpoint of this step.
    Resumed {
        step: usize,
    },
    /// Greedy conversion: the choice found in the run folder, reused.
    ChoiceCached,
    /// Greedy conversion: forward passes of the choice so far.
    Choosing {
        done: usize,
        total: usize,
    },
    /// Greedy conversion: the layers chosen.
    ChoiceDone(Box<crate::choose::LayerChoice>),
    /// Greedy conversion: one step of end-to-end KL.
    FinetuneStep(crate::finetune::FinetuneStep),
    /// Stage 4: quantization progress over matrices.
    Quantizing {
        done: usize,
        total: usize,
    },
}

const TEACHER_DIR: &str = "teacher";

/// What stages 1 and 2 produced.
#[derive(Debug, Clone)]
pub struct DistillOutcome {
    pub reports: Vec<DistillReport>,
    /// Each layer's distilled SSM.
    pub ssms: Vec<SsmWeights>,
    pub hybrid: PathBuf,
    pub layer_types: Vec<LayerType>,
}

pub(crate) fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        what: format!("{what}: {e}"),
    }
}

/// Appends one line to `metrics.jsonl`.
pub(crate) fn log_metrics(out_dir: &Path, line: &serde_json::Value) -> Result<(), TrainError> {
    let path = out_dir.join("metrics.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io_error(&path, "opening", e))?;
    writeln!(file, "{line}").map_err(|e| io_error(&path, "writing", e))
}

/// `path` written through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_error(&tmp, "writing", e))?;
    edgefusion_io::durable::commit_rename(&tmp, path).map_err(|e| io_error(path, "renaming", e))
}

/// The copy of the configuration a run was made with, in its folder.
pub const RUN_CONFIG: &str = "config.yaml";

/// The configuration saved in the run folder `out_dir` by `train` (overrides applied).
pub fn run_config(out_dir: &Path) -> Result<TrainConfig, TrainError> {
    TrainConfig::load(&out_dir.join(RUN_CONFIG))
}

/// Where `train` converts a Hugging Face base model to GGUF inside the run folder (the
/// stages write GGUF files; `harden` reads the same file later).
pub fn converted_base(out_dir: &Path) -> PathBuf {
    out_dir.join("base.gguf")
}

/// The dense model's config with the SSM sizes of the training config.
pub fn hybrid_config(dense: &ModelConfig, config: &TrainConfig) -> ModelConfig {
    let mut cfg = dense.clone();
    cfg.ssm_d_state = config.ssm.d_state;
    cfg.ssm_d_conv = config.ssm.d_conv;
    cfg
}

fn save_layer(
    dir: &Path,
    layer: usize,
    w: &SsmWeights,
    cfg: &ModelConfig,
    report: &DistillReport,
) -> Result<(), TrainError> {
    let dims = cfg.ssm_dims();
    let vars = to_vars(w, &dims).map_err(|e| io_error(dir, "saving", e))?;
    let map: HashMap<String, Tensor> = SSM_TENSOR_NAMES
        .iter()
        .zip(&vars)
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect();
    let path = dir.join(format!("layer{layer:02}.safetensors"));
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp).map_err(|e| io_error(&tmp, "writing", e))?;
    edgefusion_io::durable::commit_rename(&tmp, &path)
        .map_err(|e| io_error(&path, "renaming", e))?;
    let json = serde_json::to_string_pretty(report).expect("plain struct");
    write_atomic(&dir.join(format!("layer{layer:02}.json")), json.as_bytes())
}

fn load_layer(dir: &Path, layer: usize) -> Option<(SsmWeights, DistillReport)> {
    let report: DistillReport = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("layer{layer:02}.json"))).ok()?,
    )
    .ok()?;
    let tensors = candle_core::safetensors::load(
        dir.join(format!("layer{layer:02}.safetensors")),
        crate::device(),
    )
    .ok()?;
    let vars = SSM_TENSOR_NAMES
        .iter()
        .map(|n| candle_core::Var::from_tensor(tensors.get(*n)?).ok())
        .collect::<Option<Vec<_>>>()?;
    Some((from_vars(&vars).ok()?, report))
}

/// Runs stages 1 and 2 on `model` (opened from `gguf`) over `tokens` of the training text,
/// and writes the hybrid chosen by distillation loss. Finished work in `out_dir` is reused.
#[allow(clippy::too_many_arguments)]
pub fn distill_stages(
    config: &TrainConfig,
    gguf: &GgufFile,
    model: &Model<'_>,
    tokens: &[u32],
    text_name: &str,
    out_dir: &Path,
    threads: usize,
    events: &mut dyn FnMut(Event),
) -> Result<DistillOutcome, TrainError> {
    std::fs::create_dir_all(out_dir).map_err(|e| io_error(out_dir, "creating", e))?;
    let dense = &model.config;
    let cfg = hybrid_config(dense, config);
    let seq_len = config.data.seq_len;
    let n_tokens = (config.stages.teacher_tokens.min(tokens.len()) / seq_len) * seq_len;

    // Stage 1.
    let meta = TeacherMeta {
        model: gguf.path.display().to_string(),
        text: text_name.to_string(),
        n_tokens,
        seq_len,
        n_layers: dense.n_layers,
        d_model: dense.d_model,
        q_dim: dense.q_dim(),
        top_k: config.stages.teacher_top_k.min(dense.vocab_size),
        format: TEACHER_FORMAT,
    };
    let teacher_dir = out_dir.join(TEACHER_DIR);
    if existing(&teacher_dir, &meta).is_some() {
        events(Event::TeacherCached);
    } else {
        cache_teacher(
            model,
            tokens,
            &meta,
            &teacher_dir,
            threads,
            &mut |done, total| events(Event::TeacherProgress { done, total }),
        )?;
    }

    // Stage 2.
    let distill_dir = out_dir.join("distill");
    std::fs::create_dir_all(&distill_dir).map_err(|e| io_error(&distill_dir, "creating", e))?;
    let opts = DistillOptions {
        seq_len,
        batch_size: config.data.batch_size,
        epochs: config.stages.distill_epochs,
        lr: config.optimizer.lr,
        betas: config.optimizer.betas,
        weight_decay: config.optimizer.weight_decay,
        warmup_steps: config.optimizer.warmup_steps,
        grad_clip: config.optimizer.grad_clip,
        chunk: 64,
        seed: config.seed,
    };
    let mut trained = HashMap::new();
    let mut reports = Vec::new();
    for (layer, block) in model.layers.iter().enumerate() {
        if let Some((w, report)) = load_layer(&distill_dir, layer) {
            events(Event::LayerStart {
                layer,
                resumed: true,
            });
            trained.insert(layer, w);
            reports.push(report);
            continue;
        }
        events(Event::LayerStart {
            layer,
            resumed: false,
        });
        let Mixer::Attention(a) = &block.mixer else {
            return Err(TrainError::Config {
                file: meta.model.clone(),
                what: format!("layer {layer} is not attention; the base must be dense"),
            });
        };
        let init = ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo);
        let (input, readout) = read_layer(&teacher_dir, &meta, layer)?;
        // The attention's output: the read-out through `wo (d_model, q_dim)`.
        let target =
            crate::align::times_transpose(&readout, &init.wo, cfg.q_dim()).map_err(|e| {
                TrainError::Numeric {
                    what: format!("layer {layer}: {e}"),
                }
            })?;
        let log_every = config.logging.log_every.max(1);
        let mut metric_error = None;
        let (w, report) = distill_layer(
            &cfg,
            layer,
            &init,
            &input,
            &target,
            &opts,
            &mut |step, total, loss| {
                events(Event::DistillStep {
                    layer,
                    step,
                    total,
                    loss,
                });
                if step % log_every == 0 || step + 1 == total {
                    let line = serde_json::json!({
                        "stage": "distill", "layer": layer, "step": step,
                        "loss": loss, "total_steps": total,
                    });
                    if let Err(e) = log_metrics(out_dir, &line) {
                        metric_error.get_or_insert(e);
                    }
                }
            },
        )?;
        if let Some(e) = metric_error {
            return Err(e);
        }
        save_layer(&distill_dir, layer, &w, &cfg, &report)?;
        events(Event::LayerDone(report.clone()));
        trained.insert(layer, w);
        reports.push(report);
    }

    // The stand-in router: the layers whose SSM came closest to their attention.
    let fraction = config.router.target_ssm_fraction.unwrap_or(2.0 / 3.0);
    let layer_types = layers_by_loss(&reports, fraction);
    let hybrid = out_dir.join("hybrid_distill.gguf");
    write_hybrid_with(
        gguf,
        model,
        &hybrid_layout(&cfg, &layer_types, cfg.ssm_d_state, cfg.ssm_d_conv, 0, 0),
        SsmInitSource::Trained(&trained),
        &hybrid,
    )?;
    let ssms = (0..model.layers.len())
        .map(|l| trained[&l].clone())
        .collect();
    Ok(DistillOutcome {
        reports,
        ssms,
        hybrid,
        layer_types,
    })
}

/// SSM for the `round(fraction · n)` layers of lowest held-out distillation loss.
pub fn layers_by_loss(reports: &[DistillReport], fraction: f64) -> Vec<LayerType> {
    let mut scores = vec![f64::NEG_INFINITY; reports.len()];
    for r in reports {
        scores[r.layer] = -r.val_loss;
    }
    top_share(&scores, fraction)
}

/// SSM for the `round(fraction · n)` layers of highest `scores`, attention for the rest.
fn top_share(scores: &[f64], fraction: f64) -> Vec<LayerType> {
    let n = scores.len();
    let k = ((fraction * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut types = vec![LayerType::Attention; n];
    for &l in &order[..k] {
        types[l] = LayerType::Ssm;
    }
    types
}

/// Non-finite router steps in a row after which training stops (with a checkpoint).
pub const MAX_BAD_STEPS: usize = 3;

/// Choices of a run beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after writing `checkpoint_final/`.
    pub skip_quantization: bool,
    /// Continue stage 3 from the newest checkpoint in `checkpoints/`.
    pub resume: bool,
    /// Write a checkpoint and stop after this router step (tests of resuming).
    pub stop_after: Option<usize>,
}

/// `checkpoint_final/router.json`: what hardening chose.
pub const ROUTER_SUMMARY: &str = "router.json";

/// The contents of [`ROUTER_SUMMARY`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RouterSummary {
    /// `attention` or `ssm` for each layer.
    pub layer_types: Vec<String>,
    /// Each layer's final gate `σ(a/τ)` (none when no router step ran).
    pub gates: Option<Vec<f64>>,
    pub ssm_frac: f64,
    pub lambda: f64,
    /// Router steps trained.
    pub steps: usize,
}

/// What stages 3 and 4 produced.
#[derive(Debug, Clone)]
pub struct RouterOutcome {
    pub steps: Vec<RouterStep>,
    pub layer_types: Vec<LayerType>,
    /// `checkpoint_final/model.gguf`: the hardened hybrid.
    pub final_model: PathBuf,
    /// `checkpoint_quantized/model.gguf`, unless quantization was skipped.
    pub quantized: Option<PathBuf>,
}

/// Stage 3 (router training against the teacher's top-k) and stage 4 (hardening: each
/// layer keeps the branch its gate chose; then quantization unless `skip_quantization`).
#[allow(clippy::too_many_arguments)]
pub fn router_stages(
    config: &TrainConfig,
    gguf: &GgufFile,
    model: &Model<'_>,
    distilled: &DistillOutcome,
    out_dir: &Path,
    threads: usize,
    run: &RunOptions,
    events: &mut dyn FnMut(Event),
) -> Result<RouterOutcome, TrainError> {
    let cfg = hybrid_config(&model.config, config);
    let teacher_dir = out_dir.join(TEACHER_DIR);
    let meta_text = std::fs::read_to_string(teacher_dir.join("meta.json"))
        .map_err(|e| io_error(&teacher_dir, "reading meta.json", e))?;
    let meta: TeacherMeta =
        serde_json::from_str(&meta_text).map_err(|e| io_error(&teacher_dir, "meta.json", e))?;
    if meta.format != TEACHER_FORMAT {
        return Err(TrainError::Io {
            path: teacher_dir.join("meta.json").display().to_string(),
            what: format!(
                "format: the teacher cache is of format {}, this version reads {TEACHER_FORMAT}; `edgefusion train` remakes it in its teacher stage",
                meta.format
            ),
        });
    }
    let (tokens, idx, logp) = read_targets(&teacher_dir, &meta)?;
    let targets = Targets {
        tokens,
        idx,
        logp,
        top_k: meta.top_k,
        seq_len: meta.seq_len,
    };
    let mut student = Student::new(model, &cfg, &distilled.ssms, 0.0, meta.seq_len)?;
    if !config.stages.freeze_base {
        student.unfreeze_base()?;
    }
    let r = &config.router;
    let opts = RouterOptions {
        steps: config.stages.router_steps,
        batch_size: config.data.batch_size,
        seq_len: meta.seq_len,
        lr: config.optimizer.lr,
        gate_lr: r.gate_lr,
        betas: config.optimizer.betas,
        weight_decay: config.optimizer.weight_decay,
        warmup_steps: config.optimizer.warmup_steps,
        grad_clip: config.optimizer.grad_clip,
        tau_start: r.tau_start,
        tau_end: r.tau_end,
        target: r.target_ssm_fraction,
        lambda: r.router_sparsity_lambda.unwrap_or(0.0),
        dual_lr: r.dual_lr,
        seed: config.seed,
    };
    let mut state = RouterState::new(&student, &opts)?;
    let ckpt_dir = out_dir.join("checkpoints");
    let existing = crate::checkpoint::list(&ckpt_dir);
    if run.resume {
        if let Some(step) = crate::checkpoint::restore(&ckpt_dir, config, &student, &mut state)? {
            events(Event::Resumed { step });
            drop_metrics_from(out_dir, "router", step + 1)?;
        }
    } else if let Some(newest) = existing.last() {
        return Err(TrainError::Config {
            file: newest.display().to_string(),
            what: "a router checkpoint is already here: pass --resume to continue it, or use a fresh --output-dir".into(),
        });
    }
    // The configuration as run (overrides applied), so that `harden` and `analyze-router`
    // read the run from its folder alone.
    write_atomic(&out_dir.join(RUN_CONFIG), config.to_yaml().as_bytes())?;
    let mut steps = Vec::new();
    let mut bad_steps = 0;
    let log_every = config.logging.log_every.max(1);
    let save = |state: &RouterState| {
        let keep_last = config.checkpointing.keep_last;
        crate::checkpoint::save(&ckpt_dir, config, &student, state, keep_last)
    };
    while state.step < opts.steps {
        let record = router_step(&student, &mut state, &targets, &opts)?;
        if record.loss.is_nan() {
            bad_steps += 1;
            events(Event::SkippedStep { step: record.step });
            if bad_steps >= MAX_BAD_STEPS {
                // The weights are those of the last finite step: keep them for --resume.
                let saved = save(&state)?;
                return Err(TrainError::Numeric {
                    what: format!(
                        "{bad_steps} router steps in a row had a non-finite loss (last: step {}); \
                         the weights before them are saved in {} — lower optimizer.lr or \
                         router.gate_lr and --resume",
                        record.step,
                        saved.display()
                    ),
                });
            }
        } else {
            bad_steps = 0;
        }
        if record.step % log_every == 0 || record.step == opts.steps || record.step == 1 {
            let mut line = serde_json::to_value(&record).expect("plain struct");
            line["stage"] = serde_json::json!("router");
            log_metrics(out_dir, &line)?;
        }
        events(Event::RouterStep(Box::new(record.clone())));
        steps.push(record);
        let every = config.checkpointing.every.max(1);
        let stop = run.stop_after == Some(state.step);
        if state.step % every == 0 || stop {
            save(&state)?;
        }
        if stop {
            return Err(TrainError::Stopped { step: state.step });
        }
    }

    // Stage 4: harden.
    // The gates after the last update, at the τ of the last step (as `harden` reads a
    // checkpoint); before any router step, distillation's choice stands.
    let gates = if state.step > 0 {
        let tau = crate::router::tau_at(state.step - 1, opts.steps, r.tau_start, r.tau_end);
        let logits = student.gate_logits()?;
        Some(crate::router::gates_at(&logits, tau))
    } else {
        None
    };
    let layer_types: Vec<LayerType> = match &gates {
        Some(g) => harden(g, r.target_ssm_fraction),
        None => distilled.layer_types.clone(),
    };
    let mut trained = HashMap::new();
    for (l, layer) in student.layers.iter().enumerate() {
        trained.insert(l, from_vars(&layer.ssm)?);
    }
    let final_dir = out_dir.join("checkpoint_final");
    std::fs::create_dir_all(&final_dir).map_err(|e| io_error(&final_dir, "creating", e))?;
    let final_model = final_dir.join("model.gguf");
    write_hybrid_tuned(
        gguf,
        model,
        &hybrid_layout(&cfg, &layer_types, cfg.ssm_d_state, cfg.ssm_d_conv, 0, 0),
        SsmInitSource::Trained(&trained),
        &student.tuned_base()?,
        &final_model,
    )?;
    let summary = RouterSummary {
        layer_types: layer_types.iter().map(|t| t.name().to_string()).collect(),
        gates,
        ssm_frac: layer_types.iter().filter(|t| **t == LayerType::Ssm).count() as f64
            / layer_types.len() as f64,
        lambda: state.lambda,
        steps: state.step,
    };
    let quantized = finish(
        config,
        &summary,
        &final_model,
        out_dir,
        threads,
        run,
        events,
    )?;
    Ok(RouterOutcome {
        steps,
        layer_types,
        final_model,
        quantized,
    })
}

/// The end of a run: `summary` beside `final_model` (in `checkpoint_final/`), then the
/// model quantized unless `run.skip_quantization`.
pub(crate) fn finish(
    config: &TrainConfig,
    summary: &RouterSummary,
    final_model: &Path,
    out_dir: &Path,
    threads: usize,
    run: &RunOptions,
    events: &mut dyn FnMut(Event),
) -> Result<Option<PathBuf>, TrainError> {
    let final_dir = final_model.parent().unwrap_or(out_dir);
    write_atomic(
        &final_dir.join(ROUTER_SUMMARY),
        serde_json::to_string_pretty(summary)
            .expect("plain struct")
            .as_bytes(),
    )?;
    if run.skip_quantization {
        return Ok(None);
    }
    quantize_final(config, final_model, out_dir, threads, events).map(Some)
}

/// Stage 4's quantization: `final_model` to `checkpoint_quantized/model.gguf` with EFQ at the
/// configuration's budget, calibrated on `quantization.calib` when one is given.
fn quantize_final(
    config: &TrainConfig,
    final_model: &Path,
    out_dir: &Path,
    threads: usize,
    events: &mut dyn FnMut(Event),
) -> Result<PathBuf, TrainError> {
    let q = &config.quantization;
    let quant_dir = out_dir.join("checkpoint_quantized");
    std::fs::create_dir_all(&quant_dir).map_err(|e| io_error(&quant_dir, "creating", e))?;
    let output = quant_dir.join("model.gguf");
    let calibration = match &q.calib {
        None => None,
        Some(path) => Some(edgefusion_quant::pipeline::Calibration {
            name: path.display().to_string(),
            text: std::fs::read_to_string(path).map_err(|e| io_error(path, "reading", e))?,
            n_tokens: q.calib_tokens,
            ctx: 512,
            threads,
            seed: config.seed,
        }),
    };
    let opts = edgefusion_quant::pipeline::QuantizeOptions {
        method: edgefusion_quant::pipeline::Method::Efq,
        bpw: q.bpw,
        bits: 4,
        outliers: q.outliers,
        sensitivity: calibration.is_some(),
        calibration,
        act_order: true,
        embedding_bits: q.embedding_bits,
        rotate: q.rotate,
        max_bits: None,
        refit: true,
        keep_source: true,
    };
    let source = edgefusion_io::ModelSource::open(final_model)
        .map_err(|e| io_error(final_model, "opening", e))?;
    edgefusion_quant::pipeline::quantize(&source, &output, &opts, &mut |done, total, _| {
        events(Event::Quantizing { done, total })
    })
    .map_err(|e| io_error(&output, "quantizing", e))?;
    Ok(output)
}

/// Removes the lines of `stage` at step `first_dropped` and later from `metrics.jsonl`
/// (written by a run that went on past its last checkpoint), so that a resumed run's log
/// reads as one run.
pub(crate) fn drop_metrics_from(
    out_dir: &Path,
    stage: &str,
    first_dropped: usize,
) -> Result<(), TrainError> {
    let path = out_dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            !(v["stage"] == stage
                && v["step"]
                    .as_u64()
                    .is_some_and(|s| s as usize >= first_dropped))
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_atomic(&path, out.as_bytes())
}

/// Each layer's branch from its final gate. With a target share the gates are projected
/// onto it: the `round(target·n)` layers with the largest gates take SSM, the binary choice
/// nearest to the gates among those meeting the constraint. With a fixed λ each gate
/// decides alone (`g > ½`).
pub fn harden(gates: &[f64], target: Option<f64>) -> Vec<LayerType> {
    match target {
        Some(target) => top_share(gates, target),
        None => gates
            .iter()
            .map(|&g| {
                if g > 0.5 {
                    LayerType::Ssm
                } else {
                    LayerType::Attention
                }
            })
            .collect(),
    }
}

/// What [`harden_checkpoint`] chose.
#[derive(Debug, Clone)]
pub struct Hardened {
    /// The router step of the checkpoint.
    pub step: usize,
    /// Each layer's gate `σ(a/τ)` at the checkpoint's τ.
    pub gates: Vec<f64>,
    pub layer_types: Vec<LayerType>,
}

/// Which layers [`harden_checkpoint`] puts on SSM.
#[derive(Debug, Clone, Copy)]
pub enum LayerChoice<'a> {
    /// The configured target share of the largest gates (with a fixed λ: each gate
    /// above ½), as stage 4 does.
    Configured,
    /// This share of the layers, those with the largest gates.
    Share(f64),
    /// Exactly these layers, whatever their gates (the cost of single layers, say).
    Layers(&'a [usize]),
}

/// Hardens the router checkpoint folder `checkpoint` (`checkpoints/step_NNNNNN`) into the
/// hybrid GGUF `output` with the layers `choice` picks on SSM and the checkpoint's trained
/// SSMs. This is stage 4 at another step or share: a curve of quality against training
/// tokens, hybrids at several shares from one run, or one layer at a time on SSM.
pub fn harden_checkpoint(
    config: &TrainConfig,
    gguf: &GgufFile,
    model: &Model<'_>,
    checkpoint: &Path,
    choice: LayerChoice<'_>,
    output: &Path,
) -> Result<Hardened, TrainError> {
    let cfg = hybrid_config(&model.config, config);
    let routing = crate::checkpoint::read_routing(checkpoint, config, cfg.n_layers)?;
    let gates = routing.gates(config);
    let layer_types = match choice {
        LayerChoice::Configured => harden(&gates, config.router.target_ssm_fraction),
        LayerChoice::Share(share) => harden(&gates, Some(share)),
        LayerChoice::Layers(layers) => {
            let mut types = vec![LayerType::Attention; cfg.n_layers];
            for &l in layers {
                let Some(t) = types.get_mut(l) else {
                    return Err(TrainError::Config {
                        file: checkpoint.display().to_string(),
                        what: format!(
                            "layer {l} does not exist: the model has layers 0..{}",
                            cfg.n_layers
                        ),
                    });
                };
                *t = LayerType::Ssm;
            }
            types
        }
    };
    write_hybrid_tuned(
        gguf,
        model,
        &hybrid_layout(&cfg, &layer_types, cfg.ssm_d_state, cfg.ssm_d_conv, 0, 0),
        SsmInitSource::Trained(&routing.ssms),
        &routing.tuned_base,
        output,
    )?;
    Ok(Hardened {
        step: routing.meta.step,
        gates,
        layer_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_projects_onto_the_target_share() {
        let gates = [0.9, 0.2, 0.7, 0.6, 0.55];
        let ssm = |t: &[LayerType]| t.iter().filter(|&&x| x == LayerType::Ssm).count();
        let types = harden(&gates, Some(0.4));
        assert_eq!(ssm(&types), 2);
        assert_eq!(types[0], LayerType::Ssm);
        assert_eq!(types[2], LayerType::Ssm);
        assert_eq!(ssm(&harden(&gates, None)), 4);
    }
}
