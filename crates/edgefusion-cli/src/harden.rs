//! `edgefusion harden`: stage 4 of `train` again, at another router checkpoint or share.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgefusion_io::ModelSource;
use edgefusion_model::LayerType;
use edgefusion_train::checkpoint::step_of;
use edgefusion_train::run::LayerChoice;
use edgefusion_train::TrainConfig;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion harden --config configs/smollm2_135m.yaml --output-dir runs/smollm2 -o h68.gguf\n  \
    edgefusion harden --config configs/smollm2_135m.yaml --output-dir runs/smollm2 --step 40 -o s40.gguf\n  \
    edgefusion harden --config configs/smollm2_135m.yaml --output-dir runs/smollm2 --ssm-fraction 0.5 -o h50.gguf\n\n\
    `train` hardens its last router step at the configured target. This command does the\n\
    same from any checkpoint the run kept (OUTPUT_DIR/checkpoints/step_NNNNNN, every\n\
    `checkpointing.every` steps): the layers with the largest gates take the SSM branch, the\n\
    others keep attention, and the checkpoint's trained SSMs are written with the base\n\
    model's other weights. Use it for a curve of quality against training tokens, or for\n\
    hybrids at several shares from one run (--ssm-fraction 1 gives the all-SSM model), or\n\
    the cost of single layers (--ssm-layers 7: only layer 7 on SSM).\n\
    The output is unquantized; `edgefusion quantize` takes it.")]
pub struct HardenArgs {
    /// The training configuration the run was made with [default: the copy `train` keeps
    /// in the run folder, OUTPUT_DIR/config.yaml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The run's folder (as given to `train --output-dir`).
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Router step of the checkpoint [default: the newest kept].
    #[arg(long)]
    pub step: Option<usize>,
    /// Share of layers on SSM, in [0, 1] [default: the config's target_ssm_fraction; with a
    /// fixed λ, each gate above ½].
    #[arg(long, conflicts_with = "ssm_layers")]
    pub ssm_fraction: Option<f64>,
    /// Exactly these layers on SSM, comma-separated (e.g. 3,7,12), whatever their gates.
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    pub ssm_layers: Option<Vec<usize>>,
    /// The run was made with `train --debug` (its small slice of the config).
    #[arg(long)]
    pub debug: bool,
    /// The run was made with `train --freeze-base false`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub freeze_base: Option<bool>,
    /// Base model (overrides the config's model.base, as in `train`).
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Where to write the hybrid GGUF (atomically).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

pub fn run(args: HardenArgs) -> Result<()> {
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| args.output_dir.join(edgefusion_train::run::RUN_CONFIG));
    let config = TrainConfig::load(&config_path)?.with_overrides(args.freeze_base, args.debug);
    if let Some(f) = args.ssm_fraction {
        if !(0.0..=1.0).contains(&f) {
            bail!("--ssm-fraction {f} must be in [0, 1]");
        }
    }
    let ckpt_dir = args.output_dir.join("checkpoints");
    let kept = edgefusion_train::checkpoint::list(&ckpt_dir);
    if kept.is_empty() {
        bail!(
            "{}: no router checkpoint (train writes one every checkpointing.every steps)",
            ckpt_dir.display()
        );
    }
    let checkpoint = match args.step {
        None => kept.last().cloned().expect("not empty"),
        Some(step) => match kept.iter().find(|p| step_of(p) == Some(step)) {
            Some(p) => p.clone(),
            None => bail!(
                "{}: no checkpoint of step {step}; kept: {}",
                ckpt_dir.display(),
                kept.iter()
                    .filter_map(|p| step_of(p))
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    // A Hugging Face base was converted by `train` inside the run folder.
    let mut base = args
        .base_model
        .clone()
        .or_else(|| config.model.base.clone())
        .with_context(|| {
            format!(
                "{}: set model.base or pass --base-model",
                config_path.display()
            )
        })?;
    if base.is_dir() {
        base = edgefusion_train::run::converted_base(&args.output_dir);
    }
    let source =
        ModelSource::open(&base).with_context(|| format!("base model {}", base.display()))?;
    let ModelSource::Gguf(gguf) = &source else {
        bail!("base model {}: expected a GGUF file", base.display());
    };
    let model = edgefusion_model::Model::load(&source)?;
    if model.config.is_hybrid() {
        bail!(
            "base model {} is already a hybrid; give the dense model the run was trained from",
            base.display()
        );
    }
    let hardened = edgefusion_train::run::harden_checkpoint(
        &config,
        gguf,
        &model,
        &checkpoint,
        match (&args.ssm_layers, args.ssm_fraction) {
            (Some(layers), _) => LayerChoice::Layers(layers),
            (None, Some(share)) => LayerChoice::Share(share),
            (None, None) => LayerChoice::Configured,
        },
        &args.output,
    )?;
    let n = hardened.layer_types.len();
    let ssm: Vec<String> = hardened
        .layer_types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == LayerType::Ssm)
        .map(|(i, _)| i.to_string())
        .collect();
    println!(
        "step {}: {} of {n} layers on SSM (ssm_frac {:.3}): {}",
        hardened.step,
        ssm.len(),
        ssm.len() as f64 / n.max(1) as f64,
        ssm.join(" ")
    );
    println!(
        "gates: {}",
        hardened
            .gates
            .iter()
            .map(|g| format!("{g:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("wrote {}", args.output.display());
    Ok(())
}
