//! What a router run decided, for `edgefusion analyze-router`: each layer's gate, route,
//! gate entropy and marginal cost; the share of SSM layers; parameters, FLOPs and memory
//! against the dense model, counted from the architecture; and the router's curves from
//! `metrics.jsonl`.
//!
//! A run folder holds everything: `checkpoint_final/router.json` (what hardening chose),
//! `checkpoint_final/model.gguf` (the hybrid's shapes), `checkpoints/step_NNNNNN/` (gate
//! logits, λ and costs at that step), `distill/layerNN.json` (stage 2's held-out errors),
//! `metrics.jsonl` and `config.yaml` (the configuration as run).

use std::path::{Path, PathBuf};

use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, ModelConfig};

use crate::distill::DistillReport;
use crate::router::RouterStep;
use crate::run::{harden, hybrid_config, RouterSummary, ROUTER_SUMMARY};
use crate::student::gate_entropy_bits;
use crate::{TrainConfig, TrainError};

/// Context lengths at which the dense model and the hybrid are compared.
pub const CONTEXTS: [usize; 4] = [512, 2048, 4096, 8192];

/// One layer's routing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerRoute {
    pub layer: usize,
    /// The gate `g = σ(a/τ)`: the layer's share of SSM output.
    pub gate: f64,
    /// The branch the layer keeps after hardening.
    pub route: LayerType,
    /// Binary entropy of the gate, in bits (0: decided, 1: undecided).
    pub entropy_bits: f64,
    /// Averaged marginal cost `∂KL/∂g` in nats per token (what moving this layer to SSM
    /// costs the distillation loss; target mode only).
    pub cost: Option<f64>,
    /// The KL increase, in nats per token, when this layer alone runs its SSM, measured as
    /// the commit phase starts (what hardening ranks the layers by).
    pub switch_cost: Option<f64>,
    /// Stage 2's held-out relative error of the layer's SSM against its attention.
    pub distill_error: Option<f64>,
    /// Greedy choice: the round in which the layer was given its full attention back.
    pub restored_in_round: Option<usize>,
    /// Greedy choice: KL per token with this layer restored, in the last round that tried
    /// it (for a restored layer, the round that restored it): what keeping it converted
    /// cost against the alternatives.
    pub restore_kl: Option<f64>,
}

/// A model's size and per-token work, counted from its shapes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Footprint {
    pub params: usize,
    /// GFLOPs for the token at each of [`CONTEXTS`] (attention reads that many positions).
    pub gflops_per_token: Vec<f64>,
    /// KV cache (f16) plus SSM state (f32) of one sequence at each of [`CONTEXTS`].
    pub state_bytes: Vec<usize>,
}

impl Footprint {
    pub fn of(cfg: &ModelConfig) -> Self {
        Footprint {
            params: cfg.n_params(),
            gflops_per_token: CONTEXTS
                .iter()
                .map(|&n| cfg.flops_per_token(n - 1) / 1e9)
                .collect(),
            state_bytes: CONTEXTS
                .iter()
                .map(|&n| cfg.context_state_bytes(n))
                .collect(),
        }
    }
}

/// The analysis of one router state (the hardened result, or a kept checkpoint).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouterAnalysis {
    /// The run folder.
    pub run_dir: PathBuf,
    /// What was read: `checkpoint_final/` or `checkpoints/step_NNNNNN/`.
    pub source: PathBuf,
    /// Router steps behind it.
    pub step: usize,
    pub lambda: f64,
    pub target_ssm_fraction: Option<f64>,
    pub layers: Vec<LayerRoute>,
    pub contexts: Vec<usize>,
    pub dense: Footprint,
    pub hybrid: Footprint,
    /// The router's logged steps, oldest first.
    pub history: Vec<RouterStep>,
    /// The greedy choice of a `layer_choice: greedy` run (`choice.json`).
    pub choice: Option<crate::choose::LayerChoice>,
    /// The weight of the copy KL in the choice's score, when it scored copy windows (its
    /// `kl` fields then hold prose KL + weight × copy KL).
    pub choice_copy_weight: Option<f64>,
}

impl RouterAnalysis {
    /// Share of layers converted (SSM or sink + window attention).
    pub fn ssm_frac(&self) -> f64 {
        let n_ssm = self
            .layers
            .iter()
            .filter(|l| l.route != LayerType::Attention)
            .count();
        n_ssm as f64 / self.layers.len().max(1) as f64
    }

    pub fn mean_gate(&self) -> f64 {
        self.layers.iter().map(|l| l.gate).sum::<f64>() / self.layers.len().max(1) as f64
    }

    pub fn mean_entropy_bits(&self) -> f64 {
        let gates: Vec<f32> = self.layers.iter().map(|l| l.gate as f32).collect();
        gate_entropy_bits(&gates)
    }
}

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        what: format!("{what}: {e}"),
    }
}

/// Where a routing lives inside a run folder.
#[derive(Debug, Clone, PartialEq)]
enum RoutingSource {
    /// `checkpoint_final/` (with `router.json`).
    Final(PathBuf),
    /// `checkpoints/step_NNNNNN/`.
    Step(PathBuf),
}

/// The run folder and routing that `path` names: a run folder (its hardened result, else
/// its newest checkpoint), its `checkpoint_final/`, or one of its `checkpoints/step_NNNNNN/`.
fn locate(path: &Path) -> Result<(PathBuf, RoutingSource), TrainError> {
    let parent = |p: &Path, up: usize| -> PathBuf {
        let mut p = p.to_path_buf();
        for _ in 0..up {
            p = p.parent().map(Path::to_path_buf).unwrap_or_default();
        }
        if p.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            p
        }
    };
    if !path.is_dir() {
        return Err(io_error(
            path,
            "reading",
            "not a folder (give a train --output-dir, its checkpoint_final/ or a checkpoints/step_NNNNNN/)",
        ));
    }
    if path.join(ROUTER_SUMMARY).is_file() {
        return Ok((parent(path, 1), RoutingSource::Final(path.to_path_buf())));
    }
    if path.join("state.json").is_file() {
        return Ok((parent(path, 2), RoutingSource::Step(path.to_path_buf())));
    }
    let final_dir = path.join("checkpoint_final");
    if final_dir.join(ROUTER_SUMMARY).is_file() {
        return Ok((path.to_path_buf(), RoutingSource::Final(final_dir)));
    }
    if let Some(newest) = crate::checkpoint::list(&path.join("checkpoints")).pop() {
        return Ok((path.to_path_buf(), RoutingSource::Step(newest)));
    }
    Err(io_error(
        path,
        "reading",
        "no router result here: expected checkpoint_final/router.json, checkpoints/step_NNNNNN/, \
         or to be one of those (has the run reached stage 3?)",
    ))
}

/// The router lines of `metrics.jsonl` in `run_dir` (none when it is missing). A line that
/// does not parse is an error naming it, except a cut-off last line (a killed run).
pub fn read_history(run_dir: &Path) -> Result<Vec<RouterStep>, TrainError> {
    let path = run_dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut steps = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err(io_error(&path, &format!("line {}", i + 1), e)),
        };
        if value["stage"] != "router" {
            continue;
        }
        let step: RouterStep = serde_json::from_value(value)
            .map_err(|e| io_error(&path, &format!("line {} (a router step)", i + 1), e))?;
        steps.push(step);
    }
    Ok(steps)
}

/// Stage 2's held-out error of each layer, where its report is in `run_dir/distill/`.
fn distill_errors(run_dir: &Path, n_layers: usize) -> Vec<Option<f64>> {
    (0..n_layers)
        .map(|l| {
            let path = run_dir.join("distill").join(format!("layer{l:02}.json"));
            let text = std::fs::read_to_string(path).ok()?;
            let report: DistillReport = serde_json::from_str(&text).ok()?;
            Some(report.val_loss)
        })
        .collect()
}

/// The dense base model's shapes, from the configuration's `model.base` (a Hugging Face
/// folder was converted by `train` into the run folder).
fn dense_config(config: &TrainConfig, run_dir: &Path) -> Result<ModelConfig, TrainError> {
    let Some(mut base) = config.model.base.clone() else {
        return Err(TrainError::Config {
            file: run_dir.join(crate::run::RUN_CONFIG).display().to_string(),
            what: "model.base is not set: the base model's shapes are needed".into(),
        });
    };
    if base.is_dir() {
        base = crate::run::converted_base(run_dir);
    }
    let source = ModelSource::open(&base).map_err(|e| io_error(&base, "opening", e))?;
    ModelConfig::from_source(&source).map_err(|e| io_error(&base, "reading", e))
}

/// Analyzes the routing at `path` (see [`locate`]). `config` is the run's configuration;
/// without it, the copy `train` saved in the run folder is read (a checkpoint needs it for
/// its τ and the base model; the hardened result does not).
pub fn analyze(path: &Path, config: Option<&TrainConfig>) -> Result<RouterAnalysis, TrainError> {
    let (run_dir, source) = locate(path)?;
    let saved;
    let config = match config {
        Some(c) => Some(c),
        None => match crate::run::run_config(&run_dir) {
            Ok(c) => {
                saved = c;
                Some(&saved)
            }
            Err(_) => None,
        },
    };
    let history = read_history(&run_dir)?;
    let measured = history.iter().rev().find_map(|s| s.switch_costs.clone());
    let (source_dir, step, lambda, gates, routes, costs, switch_costs, hybrid) = match &source {
        RoutingSource::Final(dir) => {
            let summary_path = dir.join(ROUTER_SUMMARY);
            let text = std::fs::read_to_string(&summary_path)
                .map_err(|e| io_error(&summary_path, "reading", e))?;
            let summary: RouterSummary =
                serde_json::from_str(&text).map_err(|e| io_error(&summary_path, "parsing", e))?;
            let routes = summary
                .layer_types
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    LayerType::parse(name).ok_or_else(|| {
                        io_error(
                            &summary_path,
                            &format!("layer_types[{i}]"),
                            format!("'{name}' is not 'attention', 'ssm' or 'window'"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let model_path = dir.join("model.gguf");
            let model =
                ModelSource::open(&model_path).map_err(|e| io_error(&model_path, "opening", e))?;
            let hybrid = ModelConfig::from_source(&model)
                .map_err(|e| io_error(&model_path, "reading", e))?;
            if hybrid.layer_types != routes {
                return Err(io_error(
                    &summary_path,
                    "layer_types",
                    format!("disagree with {}", model_path.display()),
                ));
            }
            // Without router steps the gates are the hard choice itself.
            let gates = summary.gates.clone().unwrap_or_else(|| {
                routes
                    .iter()
                    .map(|t| if *t == LayerType::Attention { 0.0 } else { 1.0 })
                    .collect()
            });
            let costs = history
                .iter()
                .rev()
                .find(|s| s.step == summary.steps)
                .map(|s| s.costs.clone())
                .unwrap_or_default();
            (
                dir.clone(),
                summary.steps,
                summary.lambda,
                gates,
                routes,
                costs,
                measured,
                hybrid,
            )
        }
        RoutingSource::Step(dir) => {
            let Some(config) = config else {
                return Err(io_error(
                    &run_dir.join(crate::run::RUN_CONFIG),
                    "reading",
                    "a checkpoint is read with the run's configuration: pass --config",
                ));
            };
            let dense = dense_config(config, &run_dir)?;
            let routing = crate::checkpoint::read_routing(dir, config, dense.n_layers)?;
            let gates = routing.gates(config);
            let routes = harden(&gates, config.router.target_ssm_fraction);
            let mut hybrid = hybrid_config(&dense, config);
            hybrid.layer_types = routes.clone();
            (
                dir.clone(),
                routing.meta.step,
                routing.meta.lambda,
                gates,
                routes,
                routing.meta.costs.clone(),
                routing.meta.switch_costs.clone(),
                hybrid,
            )
        }
    };
    let n_layers = routes.len();
    if gates.len() != n_layers {
        return Err(io_error(
            &source_dir,
            "gates",
            format!("{} gates for {n_layers} layers", gates.len()),
        ));
    }
    let errors = distill_errors(&run_dir, n_layers);
    let record = std::fs::read_to_string(run_dir.join(crate::convert::CHOICE_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<crate::convert::ChoiceRecord>(&t).ok())
        .filter(|r| r.choice.converted.iter().all(|&l| l < n_layers));
    let choice_copy_weight = record
        .as_ref()
        .filter(|r| r.scope.copy_windows > 0)
        .map(|r| r.scope.copy_weight);
    let choice = record.map(|r| r.choice);
    let mut restored_in_round = vec![None; n_layers];
    let mut restore_kl = vec![None; n_layers];
    for (round, step) in choice.iter().flat_map(|c| c.steps.iter().enumerate()) {
        for &(l, kl) in &step.tried {
            if l < n_layers && restored_in_round[l].is_none() {
                restore_kl[l] = Some(kl);
            }
        }
        if step.restored < n_layers {
            restored_in_round[step.restored] = Some(round);
        }
    }
    let layers = (0..n_layers)
        .map(|l| LayerRoute {
            layer: l,
            gate: gates[l],
            route: routes[l],
            entropy_bits: gate_entropy_bits(&[gates[l] as f32]),
            cost: costs.get(l).copied().flatten(),
            switch_cost: switch_costs.as_ref().and_then(|c| c.get(l).copied()),
            distill_error: errors[l],
            restored_in_round: restored_in_round[l],
            restore_kl: restore_kl[l],
        })
        .collect();
    let mut dense = hybrid.clone();
    dense.layer_types = vec![LayerType::Attention; n_layers];
    Ok(RouterAnalysis {
        run_dir,
        source: source_dir,
        step,
        lambda,
        target_ssm_fraction: config.and_then(|c| c.router.target_ssm_fraction),
        layers,
        contexts: CONTEXTS.to_vec(),
        dense: Footprint::of(&dense),
        hybrid: Footprint::of(&hybrid),
        history,
        choice,
        choice_copy_weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgefusion-analysis-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn locate_accepts_the_run_its_final_folder_and_a_checkpoint() {
        let run = temp_dir("locate");
        assert!(locate(&run).is_err());
        assert!(locate(&run.join("missing")).is_err());
        let step = run.join("checkpoints/step_000010");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("state.json"), "{}").unwrap();
        assert_eq!(
            locate(&run).unwrap(),
            (run.clone(), RoutingSource::Step(step.clone()))
        );
        assert_eq!(
            locate(&step).unwrap(),
            (run.clone(), RoutingSource::Step(step.clone()))
        );
        let final_dir = run.join("checkpoint_final");
        std::fs::create_dir_all(&final_dir).unwrap();
        std::fs::write(final_dir.join(ROUTER_SUMMARY), "{}").unwrap();
        assert_eq!(
            locate(&run).unwrap(),
            (run.clone(), RoutingSource::Final(final_dir.clone()))
        );
        assert_eq!(
            locate(&final_dir).unwrap(),
            (run.clone(), RoutingSource::Final(final_dir.clone()))
        );
        let _ = std::fs::remove_dir_all(&run);
    }

    #[test]
    fn history_keeps_router_lines_and_names_a_bad_one() {
        let run = temp_dir("history");
        let step = |n: usize| {
            format!(
                r#"{{"stage":"router","step":{n},"kl":0.5,"loss":0.6,"lambda":0.1,"tau":0.5,"ssm_frac":0.5,"mean_gate":0.5,"gate_entropy_bits":0.9,"lr":0.001,"tokens_per_s":40.0,"gates":[0.4,0.6],"costs":[null,0.2]}}"#
            )
        };
        let distill = r#"{"stage":"distill","layer":0,"step":3,"loss":0.2,"total_steps":4}"#;
        // A killed run's cut-off last line is ignored.
        let text = format!("{distill}\n{}\n{}\n{{\"stage\":\"rou", step(1), step(2));
        std::fs::write(run.join("metrics.jsonl"), text).unwrap();
        let history = read_history(&run).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].step, 2);
        assert_eq!(history[1].costs, vec![None, Some(0.2)]);
        std::fs::write(
            run.join("metrics.jsonl"),
            format!("{}\nnot json\n{}\n", step(1), step(2)),
        )
        .unwrap();
        let message = read_history(&run).unwrap_err().to_string();
        assert!(
            message.contains("metrics.jsonl") && message.contains("line 2"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&run);
    }
}
