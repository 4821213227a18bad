//! The stages of `edgefusion train` with `conversion.layer_choice: greedy`, resumable like
//! the router's ([`crate::run`]):
//!
//! 1. **choice** — every layer starts as sink + window attention and full attention is
//!    restored one layer at a time where it lowers the KL to the dense model most, until
//!    the target share stays converted ([`crate::choose::greedy_restore`]); scored on
//!    windows at the end of the training text, and with `choice_copy_windows` also on
//!    copy windows (a span repeated from far back: the layers that retrieve stay attention);
//! 2. **fine-tune** — end-to-end KL to the dense model on windows from the start of the
//!    training text, with low-rank adapters on every feed-forward block and, with
//!    `ssm_beside_window`, each converted layer's SSM beside its window
//!    ([`crate::finetune`]);
//! 3. **write** — the hybrid with the adapters merged, then quantized (stage 4 of the
//!    router's path).
//!
//! Output folder:
//! - `choice.json`: what the choice measured ([`ChoiceRecord`]), reused when what it was
//!   scored on is unchanged;
//! - `finetune/step_NNNNNN.safetensors` and `.json`: the newest (at most two) checkpoints of
//!   the KL stage (the trained tensors and the optimizer's moments);
//! - `metrics.jsonl`: `"stage": "choice"` per round, `"stage": "finetune"` per logged step;
//! - `config.yaml`, `checkpoint_final/` and `checkpoint_quantized/` as in [`crate::run`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use edgefusion_io::gguf::GgufFile;
use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model};
use serde::{Deserialize, Serialize};

use crate::choose::{
    copy_windows, greedy_restore_by, kl_to_teacher, teacher_windows, teacher_windows_from,
    LayerChoice,
};
use crate::config::SsmInit;
use crate::distill::from_vars;
use crate::finetune::{finetune_kl, finetune_optimizer, FinetuneOptions, FinetuneStep};
use crate::init::{hybrid_layout, ssm_from_attention, ssm_random, write_hybrid_tuned};
use crate::init::{SsmInitSource, SsmWeights};
use crate::optim::AdamW;
use crate::run::{
    drop_metrics_from, finish, hybrid_config, io_error, log_metrics, write_atomic, Event,
    RouterSummary, RunOptions, RUN_CONFIG,
};
use crate::student::Student;
use crate::{TrainConfig, TrainError};

/// The choice's record in the run folder.
pub const CHOICE_FILE: &str = "choice.json";
const FINETUNE_DIR: &str = "finetune";
/// Tokens a copy window repeats (see [`copy_windows`]).
pub const COPY_SPAN: usize = 32;

/// Candidates re-scored per round after the first (see [`crate::choose::greedy_restore`]).
pub const CHOICE_CANDIDATES: usize = 6;

/// What a choice was scored on: a cached choice is reused only when all of it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceScope {
    pub model: String,
    pub text: String,
    pub text_tokens: usize,
    pub window: usize,
    pub sink: usize,
    pub n_converted: usize,
    pub choice_ctx: usize,
    pub choice_windows: usize,
    /// Copy windows scored beside the prose and their weight (0 and 0 when none).
    #[serde(default)]
    pub copy_windows: usize,
    #[serde(default)]
    pub copy_weight: f64,
}

/// The contents of [`CHOICE_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChoiceRecord {
    pub scope: ChoiceScope,
    pub choice: LayerChoice,
}

/// What the greedy stages produced.
#[derive(Debug, Clone)]
pub struct GreedyOutcome {
    pub choice: LayerChoice,
    /// The fine-tuning steps this run trained (none when resumed past the last).
    pub finetune: Vec<FinetuneStep>,
    pub layer_types: Vec<LayerType>,
    /// `checkpoint_final/model.gguf`.
    pub final_model: PathBuf,
    /// `checkpoint_quantized/model.gguf`, unless quantization was skipped.
    pub quantized: Option<PathBuf>,
}

/// Converts `teacher` (the dense model opened from `source`, whose GGUF file is `gguf`) by
/// the greedy stages over `tokens` of the training text `text_name`, writing into
/// `out_dir`. Finished stages found there are reused; fine-tuning continues from its newest
/// checkpoint with `run.resume`.
#[allow(clippy::too_many_arguments)]
pub fn greedy_stages(
    config: &TrainConfig,
    source: &ModelSource,
    gguf: &GgufFile,
    teacher: &Model<'_>,
    tokens: &[u32],
    text_name: &str,
    out_dir: &Path,
    threads: usize,
    run: &RunOptions,
    events: &mut dyn FnMut(Event),
) -> Result<GreedyOutcome, TrainError> {
    let conv = &config.conversion;
    let dense = &teacher.config;
    let model_name = gguf.path.display().to_string();
    let fail = |file: &str, what: String| TrainError::Config {
        file: file.to_string(),
        what,
    };
    if dense.is_hybrid() {
        return Err(fail(
            &model_name,
            "is already a hybrid; the greedy conversion starts from a dense model".into(),
        ));
    }
    if conv.window + conv.sink >= dense.n_ctx_train {
        return Err(fail(
            "conversion.window",
            format!(
                "window {} + sink {} must stay below the model's context {}",
                conv.window, conv.sink, dense.n_ctx_train
            ),
        ));
    }
    let choice_ctx = conv.choice_ctx.min(dense.n_ctx_train);
    if conv.choice_copy_windows > 0 && crate::choose::copy_layout(choice_ctx, COPY_SPAN).is_none() {
        return Err(fail(
            &model_name,
            format!(
                "conversion.choice_copy_windows: the model's context ({choice_ctx} tokens) is too short for copy windows (at least {})",
                11 * COPY_SPAN
            ),
        ));
    }
    let copy_span = conv.choice_copy_windows * (choice_ctx - COPY_SPAN.min(choice_ctx));
    let choice_span = choice_ctx * conv.choice_windows + copy_span;
    let seq_len = conv.finetune_seq_len.min(dense.n_ctx_train);
    if tokens.len() < choice_span + seq_len {
        return Err(fail(
            text_name,
            format!(
                "data.train has {} tokens; the choice reads {} ({} × {choice_ctx}{}) and fine-tuning at least one window of {seq_len} more",
                tokens.len(),
                choice_span,
                conv.choice_windows,
                match copy_span {
                    0 => String::new(),
                    n => format!(", and {n} for its copy windows"),
                }
            ),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| io_error(out_dir, "creating", e))?;
    write_atomic(&out_dir.join(RUN_CONFIG), config.to_yaml().as_bytes())?;
    let n = dense.n_layers;
    let fraction = config.router.target_ssm_fraction.unwrap_or(2.0 / 3.0);
    let n_converted = ((fraction * n as f64).round() as usize).min(n);

    // 1. The choice, on the end of the text.
    let scope = ChoiceScope {
        model: model_name.clone(),
        text: text_name.to_string(),
        text_tokens: tokens.len(),
        window: conv.window,
        sink: conv.sink,
        n_converted,
        choice_ctx,
        choice_windows: conv.choice_windows,
        copy_windows: conv.choice_copy_windows,
        copy_weight: match conv.choice_copy_windows {
            0 => 0.0,
            _ => conv.choice_copy_weight,
        },
    };
    let choice_path = out_dir.join(CHOICE_FILE);
    let cached = std::fs::read_to_string(&choice_path)
        .ok()
        .and_then(|t| serde_json::from_str::<ChoiceRecord>(&t).ok())
        .filter(|r| r.scope == scope);
    let choice = match cached {
        Some(record) => {
            events(Event::ChoiceCached);
            record.choice
        }
        None => {
            let text = &tokens[tokens.len() - choice_span..];
            let (copy_text, prose_text) = text.split_at(copy_span);
            let windows = teacher_windows(
                teacher,
                prose_text,
                choice_ctx,
                conv.choice_windows,
                config.stages.teacher_top_k,
                threads,
            )?;
            let copies = match conv.choice_copy_windows {
                0 => None,
                n => Some(copy_windows(
                    teacher,
                    copy_text,
                    choice_ctx,
                    n,
                    COPY_SPAN,
                    config.stages.teacher_top_k,
                    threads,
                )?),
            };
            let mut student = Model::load(source).map_err(|e| fail(&model_name, e.to_string()))?;
            student.config.window = conv.window;
            student.config.sink = conv.sink;
            let choice = greedy_restore_by(
                &mut student,
                n_converted,
                CHOICE_CANDIDATES,
                &mut |done, total| events(Event::Choosing { done, total }),
                &mut |m| {
                    let prose = kl_to_teacher(m, &windows, threads)?;
                    Ok(match &copies {
                        Some(c) => prose + scope.copy_weight * kl_to_teacher(m, c, threads)?,
                        None => prose,
                    })
                },
            )?;
            for (round, s) in choice.steps.iter().enumerate() {
                let line = serde_json::json!({
                    "stage": "choice", "round": round, "restored": s.restored, "kl": s.kl,
                });
                log_metrics(out_dir, &line)?;
            }
            let record = ChoiceRecord {
                scope,
                choice: choice.clone(),
            };
            let json = serde_json::to_string_pretty(&record).expect("plain struct");
            write_atomic(&choice_path, json.as_bytes())?;
            choice
        }
    };
    events(Event::ChoiceDone(Box::new(choice.clone())));
    let mut layer_types = vec![LayerType::Attention; n];
    let converted_type = if conv.ssm_beside_window {
        LayerType::Ssm
    } else {
        LayerType::Window
    };
    for &l in &choice.converted {
        layer_types[l] = converted_type;
    }
    let ssm_cfg = hybrid_config(dense, config);
    let cfg = hybrid_layout(
        dense,
        &layer_types,
        ssm_cfg.ssm_d_state,
        ssm_cfg.ssm_d_conv,
        conv.window,
        conv.sink,
    );

    // 2. End-to-end KL on the start of the text.
    let ssms = initial_ssms(teacher, &cfg, config)?;
    let mut student = Student::new(teacher, &cfg, &ssms, 0.0, seq_len)?;
    student.layer_types = layer_types.clone();
    let mut history = Vec::new();
    if conv.finetune_steps > 0 {
        if conv.lora_rank > 0 {
            student.add_ffn_lora(conv.lora_rank, conv.lora_alpha, config.seed)?;
        }
        let mut vars = student.lora_vars();
        if conv.ssm_beside_window {
            for &l in &choice.converted {
                vars.extend(student.layers[l].ssm.iter().cloned());
            }
        }
        let opts = FinetuneOptions {
            steps: conv.finetune_steps,
            lr: config.optimizer.lr,
            warmup_steps: config.optimizer.warmup_steps.min(conv.finetune_steps / 2),
            grad_clip: config.optimizer.grad_clip,
            betas: config.optimizer.betas,
            window_dropout: conv.window_dropout,
            seed: config.seed,
        };
        let mut opt = finetune_optimizer(vars, &opts)?;
        let ckpt_dir = out_dir.join(FINETUNE_DIR);
        let existing = list_checkpoints(&ckpt_dir);
        if let Some(newest) = existing.last() {
            if !run.resume {
                return Err(fail(
                    &newest.display().to_string(),
                    "a fine-tuning checkpoint is already here: pass --resume to continue it, or use a fresh --output-dir".into(),
                ));
            }
            restore_checkpoint(newest, config, &mut opt)?;
            drop_metrics_from(out_dir, "finetune", opt.t)?;
            events(Event::Resumed { step: opt.t });
        }
        if opt.t < opts.steps {
            let fine_tokens = &tokens[..tokens.len() - choice_span];
            let n_windows = opts.steps.min(fine_tokens.len() / seq_len);
            let windows = teacher_windows_from(
                teacher,
                fine_tokens,
                seq_len,
                n_windows,
                0,
                config.stages.teacher_top_k,
                threads,
                &mut |done, total| events(Event::TeacherProgress { done, total }),
            )?;
            let log_every = config.logging.log_every.max(1);
            let every = config.checkpointing.every.max(1);
            // Resuming needs only the newest; each holds the adapters, the SSMs and two
            // moments of both (180 MB for SmolLM2).
            let keep_last = config.checkpointing.keep_last.min(2);
            history = finetune_kl(&student, &windows, &mut opt, &opts, &mut |s, opt| {
                if s.step % log_every == 0 || s.step + 1 == opts.steps {
                    let mut line = serde_json::to_value(s).expect("plain struct");
                    line["stage"] = serde_json::json!("finetune");
                    log_metrics(out_dir, &line)?;
                }
                events(Event::FinetuneStep(s.clone()));
                let stop = run.stop_after == Some(opt.t);
                if opt.t % every == 0 || opt.t == opts.steps || stop {
                    save_checkpoint(&ckpt_dir, config, opt, keep_last)?;
                }
                if stop {
                    return Err(TrainError::Stopped { step: opt.t });
                }
                Ok(())
            })?;
        }
    }

    // 3. The hybrid, adapters merged.
    let trained: HashMap<usize, SsmWeights> = if conv.ssm_beside_window {
        choice
            .converted
            .iter()
            .map(|&l| Ok((l, from_vars(&student.layers[l].ssm)?)))
            .collect::<Result<_, TrainError>>()?
    } else {
        HashMap::new()
    };
    let final_dir = out_dir.join("checkpoint_final");
    std::fs::create_dir_all(&final_dir).map_err(|e| io_error(&final_dir, "creating", e))?;
    let final_model = final_dir.join("model.gguf");
    let tuned = if student.layers.iter().any(|l| l.ffn_lora.is_some()) {
        student.merged_ffn()?
    } else {
        Vec::new()
    };
    write_hybrid_tuned(
        gguf,
        teacher,
        &cfg,
        SsmInitSource::Trained(&trained),
        &tuned,
        &final_model,
    )?;
    let summary = RouterSummary {
        layer_types: layer_types.iter().map(|t| t.name().to_string()).collect(),
        gates: None,
        ssm_frac: choice.converted.len() as f64 / n as f64,
        lambda: 0.0,
        steps: conv.finetune_steps,
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
    Ok(GreedyOutcome {
        choice,
        finetune: history,
        layer_types,
        final_model,
        quantized,
    })
}

/// Each layer's SSM as the KL stage starts it: from its attention (or random, as
/// `ssm.init` says) with the output projection at zero, so that a converted layer starts as
/// its window alone and the SSM adds only what the KL asks of it. The student holds one SSM
/// per layer (its routes may put any layer on SSM); only the converted layers' SSMs are
/// trained, and only with `ssm_beside_window` — the others are a few cheap matrices.
fn initial_ssms(
    teacher: &Model<'_>,
    cfg: &edgefusion_model::ModelConfig,
    config: &TrainConfig,
) -> Result<Vec<SsmWeights>, TrainError> {
    (0..cfg.n_layers)
        .map(|l| {
            let a = teacher.layers[l]
                .mixer
                .attention()
                .ok_or_else(|| TrainError::Numeric {
                    what: format!("layer {l} of the base is not attention"),
                })?;
            let mut w = ssm_from_attention(cfg, &a.wq, &a.wk, &a.wv, &a.wo);
            if config.ssm.init == SsmInit::Random {
                w = ssm_random(w, config.seed + l as u64);
            }
            w.wo.iter_mut().for_each(|v| *v = 0.0);
            Ok(w)
        })
        .collect()
}

/// The scalars of a fine-tuning checkpoint (its tensors are in the `.safetensors` beside).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FinetuneCheckpoint {
    fingerprint: String,
    /// Optimizer steps taken.
    step: usize,
    n_vars: usize,
}

/// The fine-tuning checkpoints in `dir` (their `.json`, written last), oldest first.
fn list_checkpoints(dir: &Path) -> Vec<PathBuf> {
    crate::checkpoint::list_steps(dir, |name| name.ends_with(".json"))
}

/// Writes `dir/step_NNNNNN.{safetensors,json}` (tensors first, each through a rename, so a
/// `.json` always has its tensors) and deletes all but the newest `keep_last`.
fn save_checkpoint(
    dir: &Path,
    config: &TrainConfig,
    opt: &AdamW,
    keep_last: usize,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating", e))?;
    let stem = dir.join(format!("step_{:06}", opt.t));
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (i, var) in opt.vars.iter().enumerate() {
        map.insert(format!("var.{i}"), var.as_tensor().clone());
        map.insert(format!("m.{i}"), opt.m[i].clone());
        map.insert(format!("v.{i}"), opt.v[i].clone());
    }
    let tensors = stem.with_extension("safetensors");
    let tmp = stem.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp).map_err(|e| io_error(&tmp, "writing", e))?;
    edgefusion_io::durable::commit_rename(&tmp, &tensors)
        .map_err(|e| io_error(&tensors, "renaming", e))?;
    let meta = FinetuneCheckpoint {
        fingerprint: crate::checkpoint::fingerprint(config),
        step: opt.t,
        n_vars: opt.vars.len(),
    };
    let json = serde_json::to_string_pretty(&meta).expect("plain struct");
    write_atomic(&stem.with_extension("json"), json.as_bytes())?;
    let all = list_checkpoints(dir);
    for old in &all[..all.len().saturating_sub(keep_last.max(1))] {
        let _ = std::fs::remove_file(old.with_extension("safetensors"));
        let _ = std::fs::remove_file(old);
    }
    Ok(())
}

/// Loads the checkpoint whose `.json` is `path` into `opt` (its variables, moments and
/// step), refusing one made with another configuration or other shapes.
fn restore_checkpoint(
    path: &Path,
    config: &TrainConfig,
    opt: &mut AdamW,
) -> Result<(), TrainError> {
    let file = path.display().to_string();
    let fail = |what: String| TrainError::Config {
        file: file.clone(),
        what,
    };
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, "reading", e))?;
    let meta: FinetuneCheckpoint =
        serde_json::from_str(&text).map_err(|e| fail(format!("not a checkpoint: {e}")))?;
    if meta.fingerprint != crate::checkpoint::fingerprint(config) {
        return Err(fail(
            "fingerprint: made with another configuration; resume with the one it was made with, or use a fresh --output-dir".into(),
        ));
    }
    if meta.n_vars != opt.vars.len() {
        return Err(fail(format!(
            "n_vars: holds {} tensors, this run trains {}",
            meta.n_vars,
            opt.vars.len()
        )));
    }
    let tensors_path = path.with_extension("safetensors");
    let tensors = candle_core::safetensors::load(&tensors_path, crate::device())
        .map_err(|e| io_error(&tensors_path, "reading", e))?;
    let get = |name: String, like: &Tensor| -> Result<Tensor, TrainError> {
        let t = tensors.get(&name).ok_or_else(|| TrainError::Config {
            file: tensors_path.display().to_string(),
            what: format!("{name}: missing"),
        })?;
        if t.dims() != like.dims() {
            return Err(TrainError::Config {
                file: tensors_path.display().to_string(),
                what: format!(
                    "{name}: shape {:?}, this run has {:?}",
                    t.dims(),
                    like.dims()
                ),
            });
        }
        Ok(t.clone())
    };
    for i in 0..opt.vars.len() {
        let var: &Var = &opt.vars[i];
        let value = get(format!("var.{i}"), var.as_tensor())?;
        var.set(&value)?;
        opt.m[i] = get(format!("m.{i}"), &opt.m[i])?;
        opt.v[i] = get(format!("v.{i}"), &opt.v[i])?;
    }
    opt.t = meta.step;
    Ok(())
}
