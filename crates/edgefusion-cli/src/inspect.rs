//! `edgefusion inspect`: what a model file holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use edgefusion_io::gguf::MetaValue;
use edgefusion_io::names;
use edgefusion_io::ModelSource;
use edgefusion_model::ModelConfig;

use crate::common::mib;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file or Hugging Face model folder.
    pub model: PathBuf,
    /// Also list every tensor.
    #[arg(long)]
    pub tensors: bool,
    /// Also print every metadata key (long arrays abbreviated).
    #[arg(long)]
    pub metadata: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    let config = ModelConfig::from_source(&source);
    println!("file: {}", args.model.display());
    match &source {
        ModelSource::Gguf(gguf) => println!("format: GGUF v{}", gguf.version),
        ModelSource::HfDir(_) => println!("format: Hugging Face folder (safetensors)"),
    }
    match &config {
        Ok(c) => {
            println!("architecture: {} ({})", c.arch.name(), c.name);
            println!(
                "layers {} | d_model {} | heads {} (kv {}) × {} | d_ff {} | vocab {} | context {}",
                c.n_layers,
                c.d_model,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.d_ff,
                c.vocab_size,
                c.n_ctx_train
            );
            println!(
                "rope: base {} dim {} {:?} scaling {:?} | rms eps {:e} | tied head: {}",
                c.rope_base, c.rope_dim, c.rope_style, c.rope_scaling, c.rms_eps, c.tied_embeddings
            );
            println!(
                "params {:.2} M | {:.3} GFLOP/token at position 0",
                c.n_params() as f64 / 1e6,
                c.flops_per_token(0) / 1e9
            );
        }
        Err(e) => println!("architecture: not runnable here: {e}"),
    }
    if args.metadata {
        if let ModelSource::Gguf(gguf) = &source {
            println!("\nmetadata:");
            for (key, value) in &gguf.metadata {
                println!("  {key} = {}", summarize(value));
            }
        }
    }

    let tensors = source.tensors();
    // role -> (weights, bytes, types seen)
    let mut by_role: BTreeMap<&'static str, (usize, usize, BTreeMap<&'static str, usize>)> =
        BTreeMap::new();
    let (mut total_weights, mut total_bytes) = (0usize, 0usize);
    if args.tensors {
        println!(
            "\n{:<36} {:>6} {:>18} {:>12} {:>6}",
            "tensor", "type", "shape", "bytes", "bpw"
        );
    }
    for t in &tensors {
        let n: usize = t.shape.iter().product();
        let bytes = t.data.len();
        total_weights += n;
        total_bytes += bytes;
        let role = names::parse_gguf_name(t.name)
            .or_else(|| names::parse_hf_name(t.name))
            .map_or("other", |(r, _)| r.short());
        let entry = by_role.entry(role).or_default();
        entry.0 += n;
        entry.1 += bytes;
        *entry.2.entry(t.dtype.name()).or_default() += 1;
        if args.tensors {
            println!(
                "{:<36} {:>6} {:>18} {:>12} {:>6.2}",
                t.name,
                t.dtype.name(),
                format!("{:?}", t.shape),
                bytes,
                bytes as f64 * 8.0 / n.max(1) as f64
            );
        }
    }
    println!(
        "\n{:<12} {:>12} {:>10} {:>7}  types",
        "role", "weights", "MiB", "bpw"
    );
    for (role, (n, bytes, types)) in &by_role {
        let types: Vec<String> = types.iter().map(|(t, c)| format!("{t}×{c}")).collect();
        println!(
            "{:<12} {:>12} {:>10.2} {:>7.3}  {}",
            role,
            n,
            mib(*bytes),
            *bytes as f64 * 8.0 / (*n).max(1) as f64,
            types.join(" ")
        );
    }
    println!(
        "{:<12} {:>12} {:>10.2} {:>7.3}  ({} tensors)",
        "total",
        total_weights,
        mib(total_bytes),
        total_bytes as f64 * 8.0 / total_weights.max(1) as f64,
        tensors.len()
    );
    Ok(())
}

/// A metadata value on one line: arrays show their length and first items.
fn summarize(value: &MetaValue) -> String {
    match value {
        MetaValue::String(s) => {
            let one_line: String = s
                .chars()
                .take(80)
                .map(|c| if c == '\n' { ' ' } else { c })
                .collect();
            if s.chars().count() > 80 {
                format!("{one_line:?}…")
            } else {
                format!("{one_line:?}")
            }
        }
        MetaValue::Array(items) => {
            let head: Vec<String> = items.iter().take(5).map(summarize).collect();
            let more = if items.len() > 5 { ", …" } else { "" };
            format!("[{}{more}] ({} items)", head.join(", "), items.len())
        }
        MetaValue::U8(v) => v.to_string(),
        MetaValue::I8(v) => v.to_string(),
        MetaValue::U16(v) => v.to_string(),
        MetaValue::I16(v) => v.to_string(),
        MetaValue::U32(v) => v.to_string(),
        MetaValue::I32(v) => v.to_string(),
        MetaValue::U64(v) => v.to_string(),
        MetaValue::I64(v) => v.to_string(),
        MetaValue::F32(v) => v.to_string(),
        MetaValue::F64(v) => v.to_string(),
        MetaValue::Bool(v) => v.to_string(),
    }
}
