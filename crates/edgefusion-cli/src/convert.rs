//! `edgefusion convert`: a Hugging Face folder into one GGUF file, a quantized GGUF file
//! into its F16 dequantization, or chosen layers of a GGUF file into sink + window attention.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use edgefusion_io::ModelSource;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion convert --model ./SmolLM2-135M-Instruct --output smollm2-f32.gguf\n  \
    edgefusion quantize --model ./SmolLM2-135M-Instruct --output smollm2.efq.gguf   # converts on the way\n  \
    edgefusion convert --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2-f16.gguf\n  \
    edgefusion convert --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --window-layers 4-9,14-17,20-29 \\\n      \
    --window 64 --sink 4 --output smollm2-window.gguf\n  \
    edgefusion convert --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --window-layers auto --convert 20 \\\n      \
    --output smollm2-window-auto.gguf\n\n\
    From a folder, weights keep their dtype (F32, F16 or BF16); Llama q/k rows are reordered\n\
    to GGUF's RoPE pairing, as llama.cpp's convert_hf_to_gguf.py does. The tokenizer\n\
    (tokenizer.json, tokenizer_config.json, generation_config.json) is stored whole, so the\n\
    file runs alone. From a quantized GGUF file, every quantized matrix is dequantized to\n\
    F16 (the \"full precision\" of a model that exists only quantized); the rest is copied.\n\
    With --window-layers, the listed attention layers of a GGUF file attend only to the first\n\
    --sink positions and the last --window ones, so they keep a constant-size cache: a\n\
    conversion without training (the Window-only baseline of docs/HYBRID.md); the weights\n\
    are copied unchanged. `--window-layers auto` chooses the --convert layers jointly:\n\
    every layer starts windowed and full attention is given back one layer at a time, each\n\
    round to the layer whose return lowers the KL divergence from the model itself most\n\
    (scored on --choice-windows windows of --choice-ctx tokens of --choice-text; for 20 of\n\
    SmolLM2's 30 layers, 85 passes over them). Converting many layers costs more than their\n\
    costs alone suggest; only the joint measurement sees it.")]
pub struct ConvertArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a
    /// quantized GGUF file to dequantize to F16.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// GGUF file to write (atomically: all or nothing).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Attention layers to turn into sink + window attention, e.g. `4-9,14-17,20-29`, or
    /// `auto` to choose --convert of them by their joint cost.
    #[arg(long = "window-layers", value_name = "LIST|auto")]
    pub window_layers: Option<String>,
    /// With `--window-layers auto`: how many layers to convert [default: two thirds].
    #[arg(long, requires = "window_layers")]
    pub convert: Option<usize>,
    /// With `--window-layers auto`: text the choice is scored on (never the evaluation text).
    #[arg(long, default_value = crate::common::CALIBRATION_TEXT, requires = "window_layers")]
    pub choice_text: PathBuf,
    /// With `--window-layers auto`: windows of the text the choice scores.
    #[arg(long, default_value_t = 2, requires = "window_layers")]
    pub choice_windows: usize,
    /// With `--window-layers auto`: tokens per scored window (at most the model's context).
    #[arg(long, default_value_t = 1024, requires = "window_layers")]
    pub choice_ctx: usize,
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Most recent positions (the current one included) a windowed layer attends to.
    #[arg(long, default_value_t = 64, requires = "window_layers")]
    pub window: usize,
    /// First positions a windowed layer always attends to (attention sinks).
    #[arg(long, default_value_t = 4, requires = "window_layers")]
    pub sink: usize,
}

/// The `--convert` layers whose joint conversion to sink + window costs least
/// (`edgefusion_train::choose::greedy_restore`), with a progress bar.
fn choose_layers(args: &ConvertArgs, source: &ModelSource) -> Result<Vec<usize>> {
    use edgefusion_train::choose::{greedy_restore, teacher_windows};
    let threads = crate::common::threads(args.threads)?;
    let teacher = edgefusion_model::Model::load(source)?;
    let cfg = &teacher.config;
    if cfg.is_hybrid() {
        anyhow::bail!(
            "{} is already a hybrid; --window-layers auto chooses among the layers of a dense model",
            args.model.display()
        );
    }
    let n_convert = args.convert.unwrap_or((2 * cfg.n_layers).div_ceil(3));
    if n_convert == 0 || n_convert > cfg.n_layers {
        anyhow::bail!(
            "--convert {n_convert}: the model has {} layers to choose from",
            cfg.n_layers
        );
    }
    let ctx = args.choice_ctx.min(cfg.n_ctx_train);
    if ctx <= args.window + args.sink {
        anyhow::bail!(
            "--choice-ctx {ctx} must exceed --window {} + --sink {}: shorter windows cannot tell a windowed layer from full attention",
            args.window,
            args.sink
        );
    }
    let tokenizer = crate::common::load_tokenizer(source)?;
    let text = crate::common::read_text(&args.choice_text)?;
    let tokens = tokenizer.encode(&text, false)?;
    if tokens.len() < ctx {
        anyhow::bail!(
            "--choice-text {} has {} tokens, fewer than one window of {ctx}",
            args.choice_text.display(),
            tokens.len()
        );
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_prefix("teacher");
    let windows = teacher_windows(&teacher, &tokens, ctx, args.choice_windows, 64, threads)?;
    let mut student = edgefusion_model::Model::load(source)?;
    student.config.window = args.window;
    student.config.sink = args.sink;
    bar.set_prefix("choice");
    let choice = greedy_restore(
        &mut student,
        &windows,
        n_convert,
        6,
        threads,
        &mut |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        },
    )?;
    bar.finish_and_clear();
    println!(
        "chose {} of {} layers by joint KL on {} windows of {ctx} tokens of {} ({} forward passes): {:.4} nats/token with every layer windowed, {:.4} with the choice",
        choice.converted.len(),
        cfg.n_layers,
        windows.n_windows(),
        args.choice_text.display(),
        choice.evaluations,
        choice.kl_all_converted,
        choice.kl_final
    );
    println!(
        "full attention given back, in order: {}",
        choice
            .steps
            .iter()
            .map(|s| format!("{} ({:.4})", s.restored, s.kl))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(choice.converted)
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    if let Some(list) = &args.window_layers {
        let ModelSource::Gguf(gguf) = &source else {
            anyhow::bail!(
                "--window-layers reads a GGUF file; convert the folder {} first",
                args.model.display()
            );
        };
        let layers = if list == "auto" {
            choose_layers(&args, &source)?
        } else {
            edgefusion_model::convert::parse_layer_list(list)
                .map_err(|e| anyhow::anyhow!("--window-layers: {e}"))?
        };
        let cfg = edgefusion_model::convert::window_gguf(
            gguf,
            &layers,
            args.window,
            args.sink,
            &args.output,
        )?;
        println!(
            "wrote {}: {} of {} layers ({}) attend to the first {} and the last {} positions; K+V at 4096 positions {:.1} MiB (dense {:.1} MiB)",
            args.output.display(),
            layers.len(),
            cfg.n_layers,
            compact_list(&layers),
            args.sink,
            args.window,
            cfg.context_state_bytes(4096) as f64 / (1 << 20) as f64,
            (cfg.n_layers * 2 * cfg.kv_dim() * 2 * 4096) as f64 / (1 << 20) as f64,
        );
        return Ok(());
    }
    let dir = match &source {
        ModelSource::HfDir(dir) => dir,
        ModelSource::Gguf(gguf) => {
            let report = edgefusion_model::convert::dequantize_gguf(gguf, &args.output)?;
            println!(
                "wrote {}: {} tensors, {} of them dequantized to F16, {:.1} MiB",
                args.output.display(),
                report.n_tensors,
                report.dequantized,
                std::fs::metadata(&args.output).map_or(0, |m| m.len()) as f64 / (1 << 20) as f64
            );
            return Ok(());
        }
    };
    let report = edgefusion_model::convert::hf_to_gguf(dir, &args.output)?;
    let bytes = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "wrote {}: {} ({} layers, d_model {}), {} tensors, {:.1} MiB; {} q/k matrices reordered for RoPE",
        args.output.display(),
        report.config.arch.name(),
        report.config.n_layers,
        report.config.d_model,
        report.n_tensors,
        bytes as f64 / (1 << 20) as f64,
        report.permuted,
    );
    if !report.skipped.is_empty() {
        println!(
            "left out (not model weights): {}",
            report.skipped.join(", ")
        );
    }
    Ok(())
}

/// `0-2,5,9-14` for `[0, 1, 2, 5, 9, …, 14]` (sorted), as `--window-layers` reads it.
fn compact_list(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    parts.join(",")
}
