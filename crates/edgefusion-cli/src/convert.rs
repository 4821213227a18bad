//! `edgefusion convert`: a Hugging Face folder into one GGUF file.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use edgefusion_io::ModelSource;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion convert --model ./SmolLM2-135M-Instruct --output smollm2-f32.gguf\n  \
    edgefusion quantize --model ./SmolLM2-135M-Instruct --output smollm2.efq.gguf   # converts on the way\n\n\
    Weights keep their dtype (F32, F16 or BF16); Llama q/k rows are reordered to GGUF's\n\
    RoPE pairing, as llama.cpp's convert_hf_to_gguf.py does. The tokenizer (tokenizer.json,\n\
    tokenizer_config.json, generation_config.json) is stored whole, so the file runs alone.")]
pub struct ConvertArgs {
    /// Hugging Face model folder: config.json, *.safetensors, tokenizer.json.
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// GGUF file to write (atomically: all or nothing).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    let ModelSource::HfDir(dir) = &source else {
        bail!(
            "{} is a GGUF file already; convert reads Hugging Face folders",
            args.model.display()
        );
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
