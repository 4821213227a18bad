//! Stage 3 checkpoints: everything a resumed run needs to continue exactly — the SSM
//! weights and gate logits, both optimizers' moments and step counts, λ, the per-layer
//! cost averages, the data RNG and the step — written as `checkpoints/step_NNNNNN/` through
//! a temporary folder and a rename, the last `keep_last` kept.
//!
//! A checkpoint records a fingerprint of the configuration that shaped it; resuming with
//! another configuration is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::router::RouterState;
use crate::student::Student;
use crate::{TrainConfig, TrainError};

/// The scalars of a checkpoint (`state.json`); the tensors are in `state.safetensors`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub fingerprint: String,
    pub step: usize,
    pub lambda: f64,
    pub rng: u64,
    /// `None` where no estimate exists yet.
    pub costs: Vec<Option<f64>>,
    pub ssm_opt_t: usize,
    pub gate_opt_t: usize,
    /// Each layer's measured switching cost, once the commit phase has measured them.
    #[serde(default)]
    pub switch_costs: Option<Vec<f64>>,
}

/// FNV-1a of the configuration fields that shape training (not logging or checkpointing).
pub fn fingerprint(config: &TrainConfig) -> String {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        config.data,
        config.ssm,
        config.router,
        config.optimizer,
        config.stages,
        config.conversion,
        config.seed
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        what: format!("{what}: {e}"),
    }
}

/// The tensors of the student and optimizer state, by name.
fn named_tensors(student: &Student, state: &RouterState) -> HashMap<String, Tensor> {
    let mut map = HashMap::new();
    for (l, layer) in student.layers.iter().enumerate() {
        for (i, var) in layer.ssm.iter().enumerate() {
            map.insert(format!("ssm.{l}.{i}"), var.as_tensor().clone());
        }
        map.insert(format!("gate.{l}"), layer.gate_logit.as_tensor().clone());
    }
    for (name, var) in &student.base {
        map.insert(format!("base.{name}"), var.as_tensor().clone());
    }
    let opts = [
        ("ssm_opt", Some(&state.ssm_opt)),
        ("gate_opt", Some(&state.gate_opt)),
        ("base_opt", state.base_opt.as_ref()),
    ];
    for (name, opt) in opts.into_iter().filter_map(|(n, o)| Some((n, o?))) {
        for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
            map.insert(format!("{name}.m.{i}"), m.clone());
            map.insert(format!("{name}.v.{i}"), v.clone());
        }
    }
    map
}

/// The checkpoint folders in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    list_steps(dir, |name| !name.ends_with(".tmp"))
}

/// The entries `step_*` of `dir` whose name passes `keep`, oldest first (the step is
/// zero-padded, so the name order is the step order).
pub fn list_steps(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step_") && keep(n))
        })
        .collect();
    found.sort();
    found
}

/// Writes the checkpoint of `state` into `dir/step_NNNNNN` and deletes all but the last
/// `keep_last`.
pub fn save(
    dir: &Path,
    config: &TrainConfig,
    student: &Student,
    state: &RouterState,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating", e))?;
    let final_dir = dir.join(format!("step_{:06}", state.step));
    let tmp = dir.join(format!("step_{:06}.tmp", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, "creating", e))?;
    candle_core::safetensors::save(
        &named_tensors(student, state),
        tmp.join("state.safetensors"),
    )
    .map_err(|e| io_error(&tmp, "writing state.safetensors", e))?;
    let meta = CheckpointMeta {
        fingerprint: fingerprint(config),
        step: state.step,
        lambda: state.lambda,
        rng: state.rng,
        costs: state
            .costs
            .iter()
            .map(|c| c.is_finite().then_some(*c))
            .collect(),
        ssm_opt_t: state.ssm_opt.t,
        gate_opt_t: state.gate_opt.t,
        switch_costs: state.switch_costs.clone(),
    };
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(&meta).expect("plain struct"),
    )
    .map_err(|e| io_error(&tmp, "writing state.json", e))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    edgefusion_io::durable::commit_rename(&tmp, &final_dir)
        .map_err(|e| io_error(&final_dir, "renaming", e))?;
    let all = list(dir);
    for old in &all[..all.len().saturating_sub(keep_last.max(1))] {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// What hardening needs from one checkpoint folder (`checkpoints/step_NNNNNN`): its
/// scalars, each layer's gate logit `a` and each layer's trained SSM.
pub struct Routing {
    pub meta: CheckpointMeta,
    pub gate_logits: Vec<f32>,
    pub ssms: HashMap<usize, crate::init::SsmWeights>,
    /// Fine-tuned base weights by GGUF name with their GGUF shapes (empty when the base
    /// was frozen).
    pub tuned_base: Vec<crate::init::TunedTensor>,
}

impl Routing {
    /// Each layer's gate `σ(a/τ)` at the τ of the step that led to this checkpoint.
    pub fn gates(&self, config: &TrainConfig) -> Vec<f64> {
        let r = &config.router;
        let tau = crate::router::tau_at(
            self.meta.step.saturating_sub(1),
            config.stages.router_steps,
            r.tau_start,
            r.tau_end,
        );
        crate::router::gates_at(&self.gate_logits, tau)
    }
}

/// Reads the routing of the checkpoint folder `path` for a model of `n_layers`, refusing
/// one written under another configuration.
pub fn read_routing(
    path: &Path,
    config: &TrainConfig,
    n_layers: usize,
) -> Result<Routing, TrainError> {
    let meta = read_meta(path, config)?;
    let state = StateTensors::load(path)?;
    let mut gate_logits = Vec::with_capacity(n_layers);
    let mut ssms = HashMap::new();
    for l in 0..n_layers {
        let a = state
            .get(&format!("gate.{l}"))?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())?;
        gate_logits.push(a.first().copied().unwrap_or(0.0));
        let parts = (0..crate::distill::SSM_TENSOR_NAMES.len())
            .map(|i| state.get(&format!("ssm.{l}.{i}")).cloned())
            .collect::<Result<Vec<_>, _>>()?;
        ssms.insert(l, crate::distill::from_tensors(&parts)?);
    }
    let mut tuned_base = state
        .tensors
        .iter()
        .filter_map(|(name, t)| Some((name.strip_prefix("base.")?, t)))
        .map(|(name, t)| crate::init::TunedTensor::of(name, t))
        .collect::<candle_core::Result<Vec<_>>>()?;
    tuned_base.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Routing {
        meta,
        gate_logits,
        ssms,
        tuned_base,
    })
}

/// `state.safetensors` of a checkpoint folder, read by name.
struct StateTensors {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl StateTensors {
    fn load(checkpoint: &Path) -> Result<Self, TrainError> {
        let path = checkpoint.join("state.safetensors");
        let tensors = candle_core::safetensors::load(&path, crate::device())
            .map_err(|e| io_error(&path, "reading", e))?;
        Ok(Self { path, tensors })
    }

    fn get(&self, name: &str) -> Result<&Tensor, TrainError> {
        self.tensors.get(name).ok_or_else(|| TrainError::Io {
            path: self.path.display().to_string(),
            what: format!("tensor '{name}' is missing (a checkpoint of another model?)"),
        })
    }
}

/// The router step of a checkpoint folder (`step_NNNNNN`), from its name.
pub fn step_of(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix("step_")?
        .parse()
        .ok()
}

/// `state.json` of the checkpoint folder `path`, checked against `config`.
fn read_meta(path: &Path, config: &TrainConfig) -> Result<CheckpointMeta, TrainError> {
    let meta_path = path.join("state.json");
    let text =
        std::fs::read_to_string(&meta_path).map_err(|e| io_error(&meta_path, "reading", e))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| io_error(&meta_path, "parsing", e))?;
    let expected = fingerprint(config);
    if meta.fingerprint != expected {
        return Err(TrainError::Config {
            file: path.display().to_string(),
            what: format!(
                "was written under another configuration (fingerprint {}, this config {expected}); \
                 use the config it was made with, or use a fresh --output-dir",
                meta.fingerprint
            ),
        });
    }
    Ok(meta)
}

/// Restores the newest checkpoint in `dir` into `student` and `state`; `Ok(None)` when
/// there is none. A checkpoint made under another configuration is an error.
pub fn restore(
    dir: &Path,
    config: &TrainConfig,
    student: &Student,
    state: &mut RouterState,
) -> Result<Option<usize>, TrainError> {
    let Some(newest) = list(dir).pop() else {
        return Ok(None);
    };
    let meta = read_meta(&newest, config)?;
    let state_tensors = StateTensors::load(&newest)?;
    let get = |name: &str| state_tensors.get(name);
    for (l, layer) in student.layers.iter().enumerate() {
        for (i, var) in layer.ssm.iter().enumerate() {
            var.set(get(&format!("ssm.{l}.{i}"))?)?;
        }
        layer.gate_logit.set(get(&format!("gate.{l}"))?)?;
    }
    for (name, var) in &student.base {
        var.set(get(&format!("base.{name}"))?)?;
    }
    let opts = [
        ("ssm_opt", Some(&mut state.ssm_opt)),
        ("gate_opt", Some(&mut state.gate_opt)),
        ("base_opt", state.base_opt.as_mut()),
    ];
    for (name, opt) in opts.into_iter().filter_map(|(n, o)| Some((n, o?))) {
        for i in 0..opt.m.len() {
            opt.m[i] = get(&format!("{name}.m.{i}"))?.clone();
            opt.v[i] = get(&format!("{name}.v.{i}"))?.clone();
        }
    }
    if let Some(base_opt) = &mut state.base_opt {
        // The base weights step with the SSMs.
        base_opt.t = meta.ssm_opt_t;
    }
    state.ssm_opt.t = meta.ssm_opt_t;
    state.gate_opt.t = meta.gate_opt_t;
    state.step = meta.step;
    state.lambda = meta.lambda;
    state.rng = meta.rng;
    state.costs = meta.costs.iter().map(|c| c.unwrap_or(f64::NAN)).collect();
    state.switch_costs = meta.switch_costs.clone();
    Ok(Some(meta.step))
}
