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
    --window 64 --sink 4 --output smollm2-window.gguf\n\n\
    From a folder, weights keep their dtype (F32, F16 or BF16); Llama q/k rows are reordered\n\
    to GGUF's RoPE pairing, as llama.cpp's convert_hf_to_gguf.py does. The tokenizer\n\
    (tokenizer.json, tokenizer_config.json, generation_config.json) is stored whole, so the\n\
    file runs alone. From a quantized GGUF file, every quantized matrix is dequantized to\n\
    F16 (the \"full precision\" of a model that exists only quantized); the rest is copied.\n\
    With --window-layers, the listed attention layers of a GGUF file attend only to the first\n\
    --sink positions and the last --window ones, so they keep a constant-size cache: a\n\
    conversion without training (the Window-only baseline of docs/HYBRID.md); the weights\n\
    are copied unchanged.")]
pub struct ConvertArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a
    /// quantized GGUF file to dequantize to F16.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// GGUF file to write (atomically: all or nothing).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Attention layers to turn into sink + window attention, e.g. `4-9,14-17,20-29`.
    #[arg(long = "window-layers", value_name = "LIST")]
    pub window_layers: Option<String>,
    /// Most recent positions (the current one included) a windowed layer attends to.
    #[arg(long, default_value_t = 64, requires = "window_layers")]
    pub window: usize,
    /// First positions a windowed layer always attends to (attention sinks).
    #[arg(long, default_value_t = 4, requires = "window_layers")]
    pub sink: usize,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    if let Some(list) = &args.window_layers {
        let layers = edgefusion_model::convert::parse_layer_list(list)
            .map_err(|e| anyhow::anyhow!("--window-layers: {e}"))?;
        let ModelSource::Gguf(gguf) = &source else {
            anyhow::bail!(
                "--window-layers reads a GGUF file; convert the folder {} first",
                args.model.display()
            );
        };
        let cfg = edgefusion_model::convert::window_gguf(
            gguf,
            &layers,
            args.window,
            args.sink,
            &args.output,
        )?;
        println!(
            "wrote {}: {} of {} layers attend to the first {} and the last {} positions; K+V at 4096 positions {:.1} MiB (dense {:.1} MiB)",
            args.output.display(),
            layers.len(),
            cfg.n_layers,
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
