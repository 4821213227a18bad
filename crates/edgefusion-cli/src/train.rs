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
    edgefusion train --config configs/smollm2_135m.yaml --output-dir runs/smollm2 --dry-run\n  \
    edgefusion train --config configs/edgefusion_7b.yaml --output-dir runs/7b --dry-run\n\n\
    --dry-run validates the configuration, reads the base model's shapes (or the config's\n\
    `architecture` when there are no weights) and prints the plan: parameters dense and\n\
    hybrid, GFLOP/token, bytes at the configured bits per weight, KV cache against SSM state\n\
    at several context lengths, whether the hybrid fits 4 GB, and the time of each stage on\n\
    this machine. The stages: 1 teacher cache, 2 layer-local SSM distillation, 3 router\n\
    training (λ adapts to reach target_ssm_fraction), 4 harden and quantize.")]
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
    /// Threads [default: physical cores].
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let config = TrainConfig::load(&args.config)?;
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
        bail!(
            "this build plans conversions (--dry-run) but does not run the training stages yet; \
             see `edgefusion train --help`"
        );
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
