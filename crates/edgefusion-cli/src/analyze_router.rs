//! `edgefusion analyze-router`: what a `train` run's router chose, layer by layer, and what
//! it saves against the dense model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use edgefusion_model::LayerType;
use edgefusion_train::analysis::RouterAnalysis;
use edgefusion_train::TrainConfig;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion analyze-router --checkpoint runs/smollm2\n  \
    edgefusion analyze-router --checkpoint runs/smollm2 --plot router.png\n  \
    edgefusion analyze-router --checkpoint runs/smollm2/checkpoints/step_000040 --json\n\n\
    For each layer: its gate g = σ(a/τ) (the share of SSM output in the mix), the branch\n\
    it keeps after hardening, the gate's entropy in bits (0 = decided, 1 = undecided), its\n\
    marginal cost ∂KL/∂g (nats per token that moving it to SSM costs the distillation loss;\n\
    the router sends the cheapest layers to SSM) and stage 2's held-out error of its SSM\n\
    against its attention. Then ssm_frac and the mean entropy, and parameters, GFLOPs per\n\
    token and KV cache + SSM state bytes of the dense model and the hybrid at several\n\
    context lengths, counted from the shapes.\n\n\
    --checkpoint takes a run folder (its hardened result, else its newest checkpoint),\n\
    its checkpoint_final/, or one of its checkpoints/step_NNNNNN/. The plot shows the\n\
    gates per layer and ssm_frac, mean gate entropy and λ over training (metrics.jsonl).")]
pub struct AnalyzeRouterArgs {
    /// A `train --output-dir` folder, its checkpoint_final/, or a checkpoints/step_NNNNNN/.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// The run's training configuration [default: the copy `train` keeps in the run folder,
    /// config.yaml]. Needed for a checkpoint (its τ and base model), not for the result.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Draw the gates per layer and ssm_frac / entropy / λ over training into this PNG.
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
    /// Print the analysis as JSON (every field, the training curves included).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: AnalyzeRouterArgs) -> Result<()> {
    if let Some(plot) = &args.plot {
        crate::plot::check_png_path(plot)?;
    }
    let config = match &args.config {
        Some(path) => Some(TrainConfig::load(path)?),
        None => None,
    };
    let analysis = edgefusion_train::analysis::analyze(&args.checkpoint, config.as_ref())
        .with_context(|| format!("analyzing {}", args.checkpoint.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print!("{}", render(&analysis));
    }
    if let Some(plot) = &args.plot {
        crate::plot::router_chart(&analysis, plot)?;
        if !args.json {
            println!("wrote {}", plot.display());
        }
    }
    Ok(())
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn human_bytes(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// A greedy choice: each round gave back full attention to the layer whose return lowered
/// the KL most; the converted layers are those never given back.
fn render_choice(
    out: &mut String,
    a: &RouterAnalysis,
    choice: &edgefusion_train::choose::LayerChoice,
) {
    use std::fmt::Write;
    let _ = writeln!(
        *out,
        "greedy choice: {} ({} forward passes; {} {:.4} with every layer converted, {:.4} as chosen; then {} fine-tuning steps)",
        a.source.display(),
        choice.evaluations,
        match a.choice_copy_weight {
            Some(w) => format!("prose KL + {w} × copy KL"),
            None => "KL per token".to_string(),
        },
        choice.kl_all_converted,
        choice.kl_final,
        a.step
    );
    let _ = writeln!(
        *out,
        "\nlayer  route       restored in round  KL if restored"
    );
    for l in &a.layers {
        let _ = writeln!(
            *out,
            "{:>5}  {:<10}  {:>17}  {:>14}",
            l.layer,
            l.route.name(),
            l.restored_in_round.map_or("-".into(), |r| r.to_string()),
            opt(l.restore_kl, 4),
        );
    }
    let converted: Vec<String> = a
        .layers
        .iter()
        .filter(|l| l.route != LayerType::Attention)
        .map(|l| l.layer.to_string())
        .collect();
    let _ = writeln!(
        *out,
        "\nconverted: {} of {} layers: {}",
        converted.len(),
        a.layers.len(),
        converted.join(" ")
    );
    let _ = writeln!(
        *out,
        "(a restored layer: the KL after its round; a converted one: the KL its return would have given in the last round that tried it — the lower, the more it cost to keep converted)"
    );
}

fn render_gates(out: &mut String, a: &RouterAnalysis) {
    use std::fmt::Write;
    let n = a.layers.len();
    let n_ssm = a
        .layers
        .iter()
        .filter(|l| l.route == LayerType::Ssm)
        .count();
    let _ = writeln!(
        *out,
        "router: {} (step {}, λ {:.4} nats/token/layer)",
        a.source.display(),
        a.step,
        a.lambda
    );
    let _ = writeln!(
        *out,
        "\nlayer   gate g  route       entropy  cost ∂KL/∂g  switch ΔKL  distill err"
    );
    for l in &a.layers {
        let _ = writeln!(
            *out,
            "{:>5}  {:>7.4}  {:<10}  {:>7.3}  {:>11}  {:>10}  {:>11}",
            l.layer,
            l.gate,
            l.route.name(),
            l.entropy_bits,
            opt(l.cost, 4),
            opt(l.switch_cost, 4),
            opt(l.distill_error, 4)
        );
    }
    let target = a
        .target_ssm_fraction
        .map_or(String::new(), |t| format!("; target {t:.2}"));
    let _ = writeln!(
        *out,
        "\nssm_frac {:.3} ({n_ssm} of {n} layers on SSM{target}); mean gate {:.3}; mean gate entropy {:.3} bits",
        a.ssm_frac(),
        a.mean_gate(),
        a.mean_entropy_bits()
    );
    let ssm_layers: Vec<String> = a
        .layers
        .iter()
        .filter(|l| l.route == LayerType::Ssm)
        .map(|l| l.layer.to_string())
        .collect();
    let _ = writeln!(out, "SSM layers: {}", ssm_layers.join(" "));
    // Which layers cost most: by measured switching cost where the run measured it,
    // else by marginal cost.
    let (label, cost_of): (
        &str,
        fn(&edgefusion_train::analysis::LayerRoute) -> Option<f64>,
    ) = if a.layers.iter().any(|l| l.switch_cost.is_some()) {
        ("switch ΔKL", |l| l.switch_cost)
    } else {
        ("∂KL/∂g", |l| l.cost)
    };
    let mut costly: Vec<(usize, f64)> = a
        .layers
        .iter()
        .filter_map(|l| Some((l.layer, cost_of(l)?)))
        .collect();
    costly.sort_by(|x, y| y.1.total_cmp(&x.1));
    if !costly.is_empty() {
        let _ = writeln!(
            *out,
            "costliest layers to convert ({label}): {}",
            costly
                .iter()
                .take(5)
                .map(|(l, c)| format!("{l} ({c:.4})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// The tables `analyze-router` prints.
pub fn render(a: &RouterAnalysis) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(choice) = &a.choice {
        render_choice(&mut out, a, choice);
    } else {
        render_gates(&mut out, a);
    }
    let saved = |dense: f64, hybrid: f64| {
        if dense > 0.0 {
            format!("{:>6.1}%", 100.0 * (1.0 - hybrid / dense))
        } else {
            "-".into()
        }
    };
    let _ = writeln!(
        out,
        "\ncounted from the shapes          dense        hybrid    saved"
    );
    let _ = writeln!(
        out,
        "{:<28} {:>10.2} M  {:>10.2} M  {}",
        "parameters",
        a.dense.params as f64 / 1e6,
        a.hybrid.params as f64 / 1e6,
        saved(a.dense.params as f64, a.hybrid.params as f64)
    );
    for (i, ctx) in a.contexts.iter().enumerate() {
        let (d, h) = (a.dense.gflops_per_token[i], a.hybrid.gflops_per_token[i]);
        let _ = writeln!(
            out,
            "{:<28} {:>12.4}  {:>12.4}  {}",
            format!("GFLOPs/token at {ctx}"),
            d,
            h,
            saved(d, h)
        );
    }
    for (i, ctx) in a.contexts.iter().enumerate() {
        let (d, h) = (a.dense.state_bytes[i], a.hybrid.state_bytes[i]);
        let _ = writeln!(
            out,
            "{:<28} {:>12}  {:>12}  {}",
            format!("KV + SSM state at {ctx}"),
            human_bytes(d),
            human_bytes(h),
            saved(d as f64, h as f64)
        );
    }
    if let (Some(first), Some(last)) = (a.history.first(), a.history.last()) {
        let _ = writeln!(
            out,
            "\ntraining (metrics.jsonl, {} logged steps): step {} → {}: kl {:.4} → {:.4}, ssm_frac {:.2} → {:.2}, entropy {:.3} → {:.3} bits, λ {:.4} → {:.4}, τ {:.3} → {:.3}",
            a.history.len(),
            first.step,
            last.step,
            first.kl,
            last.kl,
            first.ssm_frac,
            last.ssm_frac,
            first.gate_entropy_bits,
            last.gate_entropy_bits,
            first.lambda,
            last.lambda,
            first.tau,
            last.tau
        );
    }
    out
}
