//! `edgefusion convert`: a Hugging Face folder into one GGUF file, or a quantized GGUF file
//! into its F16 dequantization.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use edgefusion_io::ModelSource;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion convert --model ./SmolLM2-135M-Instruct --output smollm2-f32.gguf\n  \
    edgefusion quantize --model ./SmolLM2-135M-Instruct --output smollm2.efq.gguf   # converts on the way\n  \
    edgefusion convert --model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2-f16.gguf\n\n\
    From a folder, weights keep their dtype (F32, F16 or BF16); Llama q/k rows are reordered\n\
    to GGUF's RoPE pairing, as llama.cpp's convert_hf_to_gguf.py does. The tokenizer\n\
    (tokenizer.json, tokenizer_config.json, generation_config.json) is stored whole, so the\n\
    file runs alone. From a quantized GGUF file, every quantized matrix is dequantized to\n\
    F16 (the \"full precision\" of a model that exists only quantized); the rest is copied.")]
pub struct ConvertArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a
    /// quantized GGUF file to dequantize to F16.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// GGUF file to write (atomically: all or nothing).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
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
