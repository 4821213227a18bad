//! The training configuration (`configs/*.yaml`): every field typed, unknown fields refused,
//! every value range-checked with a message that names the file, the field and the rule.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// A whole `edgefusion train` configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub ssm: SsmSection,
    pub router: RouterSection,
    pub optimizer: OptimizerSection,
    pub stages: StagesSection,
    pub quantization: QuantizationSection,
    /// How layers are chosen and trained (absent: the learned router, stages 2–4).
    #[serde(default)]
    pub conversion: ConversionSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub checkpointing: CheckpointingSection,
    /// Seed of every random choice (initialization, data order).
    #[serde(default)]
    pub seed: u64,
}

/// The dense model to convert: a file the runtime loads, or (for planning without weights)
/// its architecture.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// GGUF file or Hugging Face folder (`--base-model` overrides it).
    pub base: Option<PathBuf>,
    /// Shapes of a Llama-style model, when no weights are at hand (`--dry-run` only).
    pub architecture: Option<Architecture>,
}

/// Shapes of a Llama-style decoder.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub tied_embeddings: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// UTF-8 training text (never the evaluation text).
    pub train: PathBuf,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SsmSection {
    /// State width N per KV group (docs/HYBRID.md).
    pub d_state: usize,
    /// Taps of the causal depthwise convolution.
    pub d_conv: usize,
    /// `attention`: start from the layer's attention weights; `random`.
    #[serde(default = "default_init")]
    pub init: SsmInit,
}

fn default_init() -> SsmInit {
    SsmInit::Attention
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SsmInit {
    Attention,
    Random,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// Share of layers that should end on the SSM path; λ then adapts by dual ascent.
    pub target_ssm_fraction: Option<f64>,
    /// A fixed sparsity weight λ on the attention gates (when no target is given).
    pub router_sparsity_lambda: Option<f64>,
    /// Gate temperature at the start and end of router training (annealed).
    pub tau_start: f64,
    pub tau_end: f64,
    /// Rate of the running average of the layers' marginal costs that sets λ (0 to 1;
    /// see `router.rs`).
    #[serde(default = "default_dual_lr")]
    pub dual_lr: f64,
    /// Learning rate of the gate logits (Adam): gates must travel from 0 to about ±1 in
    /// the few router steps a CPU affords.
    #[serde(default = "default_gate_lr")]
    pub gate_lr: f64,
}

fn default_dual_lr() -> f64 {
    0.5
}

fn default_gate_lr() -> f64 {
    0.1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub warmup_steps: usize,
    /// Steps of the whole schedule (cosine decay after the warmup).
    pub total_steps: usize,
    pub grad_clip: f64,
    /// `f32` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: TrainDtype,
}

fn default_dtype() -> TrainDtype {
    TrainDtype::F32
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TrainDtype {
    F32,
    Bf16,
}

impl TrainDtype {
    pub fn bytes(self) -> usize {
        match self {
            TrainDtype::F32 => 4,
            TrainDtype::Bf16 => 2,
        }
    }
}

/// How many tokens each stage reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StagesSection {
    /// Stage 1: tokens the dense teacher reads once; its per-layer mixer inputs and outputs
    /// and top-k logits are cached (16-bit) for the later stages.
    pub teacher_tokens: usize,
    /// Logits kept per position in the cache.
    #[serde(default = "default_top_k")]
    pub teacher_top_k: usize,
    /// Stage 2: passes of layer-local distillation over the cached tokens.
    pub distill_epochs: usize,
    /// Stage 3: router training steps (each `batch_size × seq_len` tokens).
    pub router_steps: usize,
    /// Stage 3 trains only the SSMs and the gates (the default); `false` fine-tunes every
    /// base weight too (`train --freeze-base false`), which the hybrid then stores in f32.
    #[serde(default = "default_freeze_base")]
    pub freeze_base: bool,
}

fn default_freeze_base() -> bool {
    true
}

fn default_top_k() -> usize {
    64
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationSection {
    pub bpw: f64,
    pub block: usize,
    pub outliers: f64,
    /// Calibration text (never the evaluation text).
    pub calib: Option<PathBuf>,
    #[serde(default = "default_calib_tokens")]
    pub calib_tokens: usize,
    #[serde(default = "default_embedding_bits")]
    pub embedding_bits: u8,
    /// Store matrices rotated by EFQ v2's randomized Hadamard transform (see
    /// `edgefusion quantize --no-rotate`).
    #[serde(default = "default_rotate")]
    pub rotate: bool,
}

fn default_rotate() -> bool {
    true
}

fn default_calib_tokens() -> usize {
    16384
}

fn default_embedding_bits() -> u8 {
    4
}

/// How the converted layers are chosen: `greedy` measures it (every layer starts converted,
/// full attention is restored one layer at a time where it lowers the KL to the dense
/// model most), `gates` learns it (the router of stages 2–4).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LayerChoiceMethod {
    Greedy,
    Gates,
}

/// The converted layer and, for `layer_choice: greedy`, the stages that make it: the joint
/// choice, then end-to-end KL with low-rank adapters on the feed-forward blocks
/// (docs/HYBRID.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionSection {
    pub layer_choice: LayerChoiceMethod,
    /// Last positions a converted layer's softmax attention sees (0: none, a pure SSM).
    #[serde(default)]
    pub window: usize,
    /// First positions it always sees (attention sinks).
    #[serde(default)]
    pub sink: usize,
    /// Greedy: an SSM beside each window (trained in the KL stage), or the window alone.
    #[serde(default)]
    pub ssm_beside_window: bool,
    /// Greedy: tokens per window the choice scores (read from the end of `data.train`).
    #[serde(default = "default_choice_ctx")]
    pub choice_ctx: usize,
    /// Greedy: windows the choice scores.
    #[serde(default = "default_choice_windows")]
    pub choice_windows: usize,
    /// Greedy: copy windows the choice also scores (`choose::copy_windows`: a span of 32
    /// tokens repeated from far back, read from just before the choice's text), so that
    /// the layers that retrieve from far back stay attention. 0: prose KL alone.
    #[serde(default)]
    pub choice_copy_windows: usize,
    /// Greedy: the choice minimises prose KL + this × KL on the copy windows.
    #[serde(default = "default_choice_copy_weight")]
    pub choice_copy_weight: f64,
    /// Greedy: optimizer steps of end-to-end KL, one window of `finetune_seq_len` tokens of
    /// `data.train` each (0: convert without training).
    #[serde(default)]
    pub finetune_steps: usize,
    #[serde(default = "default_finetune_seq_len")]
    pub finetune_seq_len: usize,
    /// Rank of the adapters on the gate, up and down projections (0: none).
    #[serde(default = "default_lora_rank")]
    pub lora_rank: usize,
    /// Adapter scale α (the update is α/rank · B A).
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    /// Greedy with `ssm_beside_window`: the share of KL steps that shrink the window beside
    /// each SSM to a random length below `window` (window dropout: the SSM must then carry
    /// what leaves it). 0 trains at the full window.
    #[serde(default)]
    pub window_dropout: f64,
}

impl Default for ConversionSection {
    fn default() -> Self {
        ConversionSection {
            layer_choice: LayerChoiceMethod::Gates,
            window: 0,
            sink: 0,
            ssm_beside_window: false,
            choice_ctx: default_choice_ctx(),
            choice_windows: default_choice_windows(),
            choice_copy_windows: 0,
            choice_copy_weight: default_choice_copy_weight(),
            finetune_steps: 0,
            finetune_seq_len: default_finetune_seq_len(),
            lora_rank: default_lora_rank(),
            lora_alpha: default_lora_alpha(),
            window_dropout: 0.0,
        }
    }
}

fn default_choice_ctx() -> usize {
    1024
}

fn default_choice_windows() -> usize {
    2
}

fn default_choice_copy_weight() -> f64 {
    0.1
}

fn default_finetune_seq_len() -> usize {
    512
}

fn default_lora_rank() -> usize {
    8
}

fn default_lora_alpha() -> f64 {
    8.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    #[serde(default = "default_log_every")]
    pub log_every: usize,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            log_every: default_log_every(),
        }
    }
}

fn default_log_every() -> usize {
    100
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointingSection {
    /// Steps between checkpoints.
    #[serde(default = "default_every")]
    pub every: usize,
    /// Checkpoints kept (older ones are deleted).
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
}

impl Default for CheckpointingSection {
    fn default() -> Self {
        CheckpointingSection {
            every: default_every(),
            keep_last: default_keep_last(),
        }
    }
}

fn default_every() -> usize {
    500
}

fn default_keep_last() -> usize {
    3
}

/// Router steps of a `--debug` run.
pub const DEBUG_STEPS: usize = 100;

impl TrainConfig {
    /// The same run on a small slice, to check a setup end to end in minutes (`--debug`):
    /// sequences of at most 64 tokens, one per step, a teacher cache of 32 sequences, one
    /// distillation pass, [`DEBUG_STEPS`] router steps (warmup at most 10, checkpoints every
    /// 50) and calibration on at most 2048 tokens; a greedy conversion scores one window of
    /// at most twice the converted layer's span (≥ 128) and fine-tunes at most 10 steps of
    /// at most 128 tokens. Model, SSM, router and quantization
    /// settings are kept.
    pub fn debug_slice(&self) -> Self {
        let mut c = self.clone();
        c.data.seq_len = c.data.seq_len.min(64);
        c.data.batch_size = 1;
        c.stages.teacher_tokens = c.stages.teacher_tokens.min(32 * c.data.seq_len);
        c.stages.distill_epochs = 1;
        c.stages.router_steps = DEBUG_STEPS;
        c.optimizer.total_steps = DEBUG_STEPS;
        c.optimizer.warmup_steps = c.optimizer.warmup_steps.min(10);
        c.quantization.calib_tokens = c.quantization.calib_tokens.min(2048);
        c.logging.log_every = c.logging.log_every.min(10);
        c.checkpointing.every = 50;
        let conv = &mut c.conversion;
        conv.choice_ctx = conv.choice_ctx.min(2 * (conv.window + conv.sink).max(64));
        conv.choice_windows = 1;
        // Copy windows need a long window (a repeat from far outside the attention window).
        conv.choice_copy_windows = 0;
        conv.finetune_steps = conv.finetune_steps.min(10);
        conv.finetune_seq_len = conv.finetune_seq_len.min(128);
        c
    }

    /// The configuration a run was made with, given the command-line overrides that
    /// `train` and `harden` share: `--freeze-base` (replaces `stages.freeze_base`) and
    /// `--debug` ([`TrainConfig::debug_slice`]).
    pub fn with_overrides(mut self, freeze_base: Option<bool>, debug: bool) -> Self {
        if let Some(freeze) = freeze_base {
            self.stages.freeze_base = freeze;
        }
        if debug {
            self.debug_slice()
        } else {
            self
        }
    }

    /// Reads and validates `path`. Relative paths inside the file stay as written (they
    /// are resolved against the working directory, like the CLI's own paths).
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Config {
            file: file.clone(),
            what: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &file)
    }

    /// The configuration as YAML that [`TrainConfig::parse`] reads back to the same value.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a config of plain fields serializes")
    }

    /// Parses and validates YAML `text` (`file` names it in errors).
    pub fn parse(text: &str, file: &str) -> Result<Self, TrainError> {
        let config: TrainConfig =
            serde_yaml_ng::from_str(text).map_err(|e| TrainError::Config {
                file: file.to_string(),
                what: e.to_string(),
            })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), TrainError> {
        let fail = |field: &str, rule: String| {
            Err(TrainError::Config {
                file: file.to_string(),
                what: format!("{field}: {rule}"),
            })
        };
        if self.model.base.is_none() && self.model.architecture.is_none() {
            return fail(
                "model",
                "give `base` (a model file) or `architecture` (shapes, for --dry-run)".into(),
            );
        }
        if let Some(a) = &self.model.architecture {
            for (field, v) in [
                ("model.architecture.n_layers", a.n_layers),
                ("model.architecture.d_model", a.d_model),
                ("model.architecture.n_heads", a.n_heads),
                ("model.architecture.n_kv_heads", a.n_kv_heads),
                ("model.architecture.d_ff", a.d_ff),
                ("model.architecture.vocab_size", a.vocab_size),
            ] {
                if v == 0 {
                    return fail(field, "must be positive".into());
                }
            }
            if a.d_model % a.n_heads != 0 {
                return fail(
                    "model.architecture.n_heads",
                    format!("{} does not divide d_model {}", a.n_heads, a.d_model),
                );
            }
            if a.n_heads % a.n_kv_heads != 0 {
                return fail(
                    "model.architecture.n_kv_heads",
                    format!("{} does not divide n_heads {}", a.n_kv_heads, a.n_heads),
                );
            }
        }
        if !(8..=1 << 16).contains(&self.data.seq_len) {
            return fail(
                "data.seq_len",
                format!("{} must be in 8..=65536", self.data.seq_len),
            );
        }
        if self.data.batch_size == 0 {
            return fail("data.batch_size", "must be at least 1".into());
        }
        if !(1..=1024).contains(&self.ssm.d_state) {
            return fail(
                "ssm.d_state",
                format!("{} must be in 1..=1024", self.ssm.d_state),
            );
        }
        if !(1..=16).contains(&self.ssm.d_conv) {
            return fail(
                "ssm.d_conv",
                format!("{} must be in 1..=16", self.ssm.d_conv),
            );
        }
        match (
            self.router.target_ssm_fraction,
            self.router.router_sparsity_lambda,
        ) {
            (None, None) => return fail(
                "router",
                "give target_ssm_fraction (λ adapts itself) or router_sparsity_lambda (fixed λ)"
                    .into(),
            ),
            (Some(t), _) if !(0.0..=1.0).contains(&t) => {
                return fail(
                    "router.target_ssm_fraction",
                    format!("{t} must be in [0, 1]"),
                )
            }
            (_, Some(l)) if !(l >= 0.0 && l.is_finite()) => {
                return fail(
                    "router.router_sparsity_lambda",
                    format!("{l} must be a finite number ≥ 0"),
                )
            }
            _ => {}
        }
        let r = &self.router;
        if !(r.tau_start > 0.0 && r.tau_end > 0.0 && r.tau_end <= r.tau_start) {
            return fail(
                "router.tau_start, router.tau_end",
                format!(
                    "temperatures {} → {} must be positive and not increase",
                    r.tau_start, r.tau_end
                ),
            );
        }
        if !(r.gate_lr > 0.0 && r.gate_lr.is_finite()) {
            return fail("router.gate_lr", format!("{} must be positive", r.gate_lr));
        }
        if !(r.dual_lr > 0.0 && r.dual_lr <= 1.0) {
            return fail("router.dual_lr", format!("{} must be in (0, 1]", r.dual_lr));
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr < 1.0) {
            return fail("optimizer.lr", format!("{} must be in (0, 1)", o.lr));
        }
        if !(0.0..1.0).contains(&o.weight_decay) {
            return fail(
                "optimizer.weight_decay",
                format!("{} must be in [0, 1)", o.weight_decay),
            );
        }
        if !o.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return fail(
                "optimizer.betas",
                format!("{:?} must both be in [0, 1)", o.betas),
            );
        }
        if o.total_steps == 0 || o.warmup_steps >= o.total_steps {
            return fail(
                "optimizer.warmup_steps, optimizer.total_steps",
                format!(
                    "warmup {} must be below total {} (and total positive)",
                    o.warmup_steps, o.total_steps
                ),
            );
        }
        if !(o.grad_clip > 0.0 && o.grad_clip.is_finite()) {
            return fail(
                "optimizer.grad_clip",
                format!("{} must be positive", o.grad_clip),
            );
        }
        let s = &self.stages;
        if s.teacher_tokens < self.data.seq_len {
            return fail(
                "stages.teacher_tokens",
                format!(
                    "{} is less than one sequence (data.seq_len {})",
                    s.teacher_tokens, self.data.seq_len
                ),
            );
        }
        if s.teacher_top_k == 0 {
            return fail("stages.teacher_top_k", "must be at least 1".into());
        }
        if s.router_steps == 0 || s.router_steps > o.total_steps {
            return fail(
                "stages.router_steps",
                format!(
                    "{} must be in 1..=optimizer.total_steps ({})",
                    s.router_steps, o.total_steps
                ),
            );
        }
        let q = &self.quantization;
        if !(2.0..=8.0).contains(&q.bpw) {
            return fail(
                "quantization.bpw",
                format!("{} must be in 2.0..=8.0", q.bpw),
            );
        }
        if q.block != 128 {
            return fail(
                "quantization.block",
                format!("{}: EFQ stores blocks of 128 columns only", q.block),
            );
        }
        if !(0.0..0.1).contains(&q.outliers) {
            return fail(
                "quantization.outliers",
                format!("{} must be in [0, 0.1)", q.outliers),
            );
        }
        if !edgefusion_kernels::efq::WIDTHS.contains(&q.embedding_bits) {
            return fail(
                "quantization.embedding_bits",
                format!(
                    "{} is not an EFQ tile width ({:?})",
                    q.embedding_bits,
                    edgefusion_kernels::efq::WIDTHS
                ),
            );
        }
        let c = &self.conversion;
        if c.sink > 0 && c.window == 0 {
            return fail(
                "conversion.sink",
                format!("{} needs a window (conversion.window is 0)", c.sink),
            );
        }
        if c.layer_choice == LayerChoiceMethod::Greedy {
            if c.window == 0 {
                return fail(
                    "conversion.window",
                    "layer_choice greedy converts layers to sink + window attention: give a window"
                        .into(),
                );
            }
            if c.choice_ctx <= c.window + c.sink {
                return fail(
                    "conversion.choice_ctx",
                    format!(
                        "{} must exceed window {} + sink {}: shorter windows cannot tell a converted layer from full attention",
                        c.choice_ctx, c.window, c.sink
                    ),
                );
            }
            if c.choice_windows == 0 {
                return fail("conversion.choice_windows", "must be at least 1".into());
            }
            if c.choice_copy_windows > 64 {
                return fail(
                    "conversion.choice_copy_windows",
                    format!("{} must be at most 64", c.choice_copy_windows),
                );
            }
            // The repeat must come from outside the window, or the copy KL cannot tell a
            // converted layer from full attention.
            let span = crate::convert::COPY_SPAN;
            if c.choice_copy_windows > 0 {
                match crate::choose::copy_layout(c.choice_ctx, span) {
                    None => {
                        return fail(
                            "conversion.choice_copy_windows",
                            format!(
                                "copy windows repeat {span} tokens from a tenth of the way in: choice_ctx {} must be at least {}",
                                c.choice_ctx,
                                11 * span
                            ),
                        )
                    }
                    Some((text, from)) if text - from <= c.window + c.sink => {
                        return fail(
                            "conversion.choice_copy_windows",
                            format!(
                                "copy windows of choice_ctx {} repeat from {} tokens back, within window {} + sink {}: raise choice_ctx",
                                c.choice_ctx,
                                text - from,
                                c.window,
                                c.sink
                            ),
                        )
                    }
                    Some(_) => {}
                }
            }
            if !(c.choice_copy_weight >= 0.0 && c.choice_copy_weight.is_finite()) {
                return fail(
                    "conversion.choice_copy_weight",
                    format!("{} must be 0 or positive", c.choice_copy_weight),
                );
            }
            if !(8..=1 << 16).contains(&c.finetune_seq_len) {
                return fail(
                    "conversion.finetune_seq_len",
                    format!("{} must be in 8..=65536", c.finetune_seq_len),
                );
            }
            if c.finetune_steps > 0 && c.lora_rank == 0 && !c.ssm_beside_window {
                return fail(
                    "conversion.finetune_steps",
                    "nothing to train: give lora_rank > 0 or ssm_beside_window: true".into(),
                );
            }
            if !(c.lora_alpha > 0.0 && c.lora_alpha.is_finite()) {
                return fail(
                    "conversion.lora_alpha",
                    format!("{} must be positive", c.lora_alpha),
                );
            }
            if !(0.0..=1.0).contains(&c.window_dropout) {
                return fail(
                    "conversion.window_dropout",
                    format!("{} must be a share in 0..=1", c.window_dropout),
                );
            }
            if c.window_dropout > 0.0 && c.finetune_steps == 0 {
                return fail(
                    "conversion.window_dropout",
                    "acts in the KL stage: give finetune_steps > 0".into(),
                );
            }
            if c.window_dropout > 0.0 && !(c.ssm_beside_window && c.window >= 2) {
                return fail(
                    "conversion.window_dropout",
                    "shrinks the window beside an SSM: needs ssm_beside_window: true and a window of at least 2".into(),
                );
            }
        } else if c.ssm_beside_window
            || c.finetune_steps > 0
            || c.window_dropout != 0.0
            || c.choice_copy_windows > 0
        {
            return fail(
                "conversion",
                "ssm_beside_window, finetune_steps, window_dropout and choice_copy_windows belong to layer_choice: greedy"
                    .into(),
            );
        }
        if self.logging.log_every == 0 {
            return fail("logging.log_every", "must be at least 1".into());
        }
        if self.checkpointing.every == 0 || self.checkpointing.keep_last == 0 {
            return fail(
                "checkpointing",
                "every and keep_last must be at least 1".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = include_str!("../../../configs/smollm2_135m.yaml");

    fn error_of(yaml: &str) -> String {
        TrainConfig::parse(yaml, "test.yaml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_configs_are_valid() {
        TrainConfig::parse(VALID, "smollm2_135m.yaml").unwrap();
        TrainConfig::parse(
            include_str!("../../../configs/edgefusion_7b.yaml"),
            "edgefusion_7b.yaml",
        )
        .unwrap();
    }

    /// The copy a run keeps in its folder reads back as the same configuration (the
    /// checkpoint fingerprint covers every field that shapes training).
    #[test]
    fn yaml_round_trip_keeps_the_fingerprint() {
        for config in [
            TrainConfig::parse(VALID, "smollm2_135m.yaml").unwrap(),
            TrainConfig::parse(VALID, "smollm2_135m.yaml")
                .unwrap()
                .with_overrides(Some(false), true),
        ] {
            let back = TrainConfig::parse(&config.to_yaml(), "copy.yaml").unwrap();
            assert_eq!(
                crate::checkpoint::fingerprint(&back),
                crate::checkpoint::fingerprint(&config)
            );
            assert_eq!(back.model.base, config.model.base);
            assert_eq!(back.quantization.calib, config.quantization.calib);
            assert_eq!(back.logging.log_every, config.logging.log_every);
        }
    }

    #[test]
    fn debug_slices_of_the_shipped_configs_are_valid_and_small() {
        for (name, text) in [
            ("smollm2_135m.yaml", VALID),
            (
                "edgefusion_7b.yaml",
                include_str!("../../../configs/edgefusion_7b.yaml"),
            ),
        ] {
            let full = TrainConfig::parse(text, name).unwrap();
            let debug = full.debug_slice();
            debug.validate(name).unwrap();
            assert_eq!(debug.stages.router_steps, DEBUG_STEPS);
            assert!(debug.data.seq_len <= 64 && debug.data.batch_size == 1);
            assert!(debug.stages.teacher_tokens <= 32 * 64);
            assert_eq!(debug.ssm.d_state, full.ssm.d_state);
            assert_eq!(
                debug.router.target_ssm_fraction,
                full.router.target_ssm_fraction
            );
        }
    }

    #[test]
    fn bad_configs_name_the_file_field_and_rule() {
        // (edit of the valid file, words the error must contain)
        let cases: [(&str, &str, &[&str]); 17] = [
            (
                "  d_state: 32",
                "  d_state: 0",
                &["test.yaml", "ssm.d_state", "1..=1024"],
            ),
            (
                "  d_conv: 4",
                "  d_conv: 4\n  colour: red",
                &["test.yaml", "unknown field `colour`"],
            ),
            ("  lr: 0.001", "  lr: 2.0", &["optimizer.lr", "(0, 1)"]),
            (
                "  block: 128",
                "  block: 64",
                &["quantization.block", "128"],
            ),
            (
                "  target_ssm_fraction: 0.68",
                "  target_ssm_fraction: 1.5",
                &["target_ssm_fraction", "[0, 1]"],
            ),
            (
                "  seq_len: 256",
                "  seq_len: many",
                &["test.yaml", "seq_len"],
            ),
            (
                "  tau_end: 0.02",
                "  tau_end: 5.0",
                &["tau_start", "not increase"],
            ),
            (
                "  dual_lr: 0.5",
                "  dual_lr: 2.0",
                &["router.dual_lr", "(0, 1]"],
            ),
            (
                "  gate_lr: 0.1",
                "  gate_lr: -1",
                &["router.gate_lr", "positive"],
            ),
            (
                "  window: 64 ",
                "  window: 0 ",
                &["test.yaml", "conversion.sink", "needs a window"],
            ),
            (
                "  choice_ctx: 1024",
                "  choice_ctx: 60",
                &["conversion.choice_ctx", "window 64 + sink 4"],
            ),
            (
                "  layer_choice: greedy",
                "  layer_choice: gates",
                &["conversion", "belong to layer_choice: greedy"],
            ),
            (
                "  window: 64",
                "  window: 900",
                &["conversion.choice_copy_windows", "within window 900"],
            ),
            (
                "  choice_copy_weight: 0.1",
                "  choice_copy_weight: -1",
                &["conversion.choice_copy_weight", "positive"],
            ),
            (
                "  choice_ctx: 1024",
                "  choice_ctx: 300",
                &["conversion.choice_copy_windows", "at least 352"],
            ),
            (
                "  lora_alpha: 8",
                "  lora_alpha: 8\n  window_dropout: 1.5",
                &["conversion.window_dropout", "0..=1"],
            ),
            (
                "  ssm_beside_window: true",
                "  window_dropout: 0.2\n  ssm_beside_window: false",
                &["conversion.window_dropout", "ssm_beside_window: true"],
            ),
        ];
        for (from, to, words) in cases {
            assert!(VALID.contains(from), "{from}");
            let message = error_of(&VALID.replacen(from, to, 1));
            for w in words {
                assert!(message.contains(w), "'{message}' lacks '{w}'");
            }
        }
        assert!(error_of("model: [").contains("test.yaml"));
    }
}
