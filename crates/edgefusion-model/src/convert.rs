//! Hugging Face folder → GGUF: what `edgefusion convert` writes, and what `quantize` and
//! `train` read when they are given a folder.
//!
//! - Metadata: the architecture's keys from [`ModelConfig::gguf_metadata`].
//! - Tokenizer: `tokenizer.json` verbatim under GGUF's `tokenizer.huggingface.json`, with
//!   `tokenizer_config.json` and `generation_config.json` (BOS/EOS, `add_bos_token`, end
//!   ids, the chat template) under [`TOKENIZER_CONFIG_KEY`] and [`GENERATION_CONFIG_KEY`].
//!   Nothing is lost or re-derived, so the tokenizer read back is the folder's own.
//! - Tensors: renamed to GGUF names, data copied unchanged (F32/F16/BF16), except Llama's
//!   q/k projections, whose rows are permuted within each head from the NeoX pairing
//!   Hugging Face stores (`x[i]` with `x[i + d/2]`) to GGUF llama's adjacent pairs, the
//!   layout llama.cpp's converter writes. Tensors that no role names (rotary buffers) are
//!   left out and reported. Llama 3 RoPE scaling becomes the per-frequency factors of
//!   `rope_freqs.weight`, as llama.cpp's converter writes it.

use std::path::Path;

use edgefusion_io::gguf::{GgufWriter, MetaValue};
use edgefusion_io::names::{parse_hf_name, TensorRole};
use edgefusion_io::safetensors_dir::SafetensorsDir;

use edgefusion_kernels::GgmlType;

use crate::config::ROPE_FREQS_TENSOR;
use crate::{Arch, ModelConfig, ModelError, RopeStyle};

/// GGUF's standard key for a whole Hugging Face `tokenizer.json`.
pub const TOKENIZER_JSON_KEY: &str = "tokenizer.huggingface.json";
/// `tokenizer_config.json` of the source folder, verbatim.
pub const TOKENIZER_CONFIG_KEY: &str = "edgefusion.tokenizer.tokenizer_config_json";
/// `generation_config.json` of the source folder, verbatim.
pub const GENERATION_CONFIG_KEY: &str = "edgefusion.tokenizer.generation_config_json";

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub config: ModelConfig,
    pub n_tensors: usize,
    /// Names of source tensors that are not model weights and were left out.
    pub skipped: Vec<String>,
    /// q/k matrices whose rows were permuted to GGUF llama's RoPE pairing.
    pub permuted: usize,
}

/// Writes the folder `dir` as one GGUF file at `output` (atomically: a failure leaves no
/// file behind).
pub fn hf_to_gguf(dir: &SafetensorsDir, output: &Path) -> Result<ConvertReport, ModelError> {
    let folder = dir.dir.display().to_string();
    let invalid = |what: String| ModelError::Invalid {
        file: folder.clone(),
        what,
    };
    let tied = !dir.contains(&TensorRole::Output.hf_name(None));
    let config_file = dir.dir.join("config.json").display().to_string();
    let config = ModelConfig::from_hf_config(dir.config(), &config_file, tied)?;

    let mut writer = GgufWriter::new();
    for (key, value) in config.gguf_metadata(&config_file)? {
        writer.add_metadata(key, value);
    }
    for (key, value) in tokenizer_metadata(dir)? {
        writer.add_metadata(key, value);
    }

    // Llama's q/k in GGUF use adjacent RoPE pairs; Qwen2 GGUF keeps the NeoX layout.
    let permute = config.arch == Arch::Llama && config.rope_style == RopeStyle::NeoX;
    if permute && config.rope_dim != config.head_dim {
        return Err(invalid(format!(
            "RoPE over {} of {} head dims cannot be permuted to GGUF llama's layout",
            config.rope_dim, config.head_dim
        )));
    }
    let views = dir.tensors();
    let mut skipped: Vec<String> = dir
        .unsupported()
        .into_iter()
        .map(|(name, _)| name.to_string())
        .collect();
    let mut entries = Vec::new();
    let mut owned: Vec<Vec<u8>> = Vec::new();
    for view in &views {
        let Some((role, layer)) = parse_hf_name(view.name) else {
            skipped.push(view.name.to_string());
            continue;
        };
        let heads = match role {
            TensorRole::AttnQ if permute => Some(config.n_heads),
            TensorRole::AttnK if permute => Some(config.n_kv_heads),
            _ => None,
        };
        match heads {
            Some(heads) => {
                let data = permute_rope_rows(view.data, view.n_rows(), heads, config.head_dim)
                    .ok_or_else(|| {
                        invalid(format!(
                            "tensor '{}' has {} rows, not {heads} heads of {}",
                            view.name,
                            view.n_rows(),
                            config.head_dim
                        ))
                    })?;
                entries.push((role.gguf_name(layer), *view, Some(owned.len())));
                owned.push(data);
            }
            None => entries.push((role.gguf_name(layer), *view, None)),
        }
    }
    for (name, view, data) in &entries {
        let bytes = data.map_or(view.data, |i| owned[i].as_slice());
        writer.add_tensor(name.clone(), view.dtype, view.shape, bytes);
    }
    // Llama 3 RoPE scaling travels as per-frequency factors, as llama.cpp's converter writes.
    let factors = config.rope_freq_factors();
    if let Some(factors) = &factors {
        let bytes: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
        writer.add_tensor(ROPE_FREQS_TENSOR, GgmlType::F32, &[factors.len()], bytes);
    }
    writer.write(output)?;
    Ok(ConvertReport {
        config,
        n_tensors: entries.len() + usize::from(factors.is_some()),
        skipped,
        permuted: owned.len(),
    })
}

/// The tokenizer files of `dir` as GGUF metadata; the folder must have a `tokenizer.json`.
fn tokenizer_metadata(dir: &SafetensorsDir) -> Result<Vec<(String, MetaValue)>, ModelError> {
    let folder = dir.dir.display().to_string();
    let Some(path) = dir.tokenizer_json() else {
        return Err(ModelError::Invalid {
            file: folder,
            what: "has no tokenizer.json; a GGUF file carries its tokenizer".into(),
        });
    };
    let read = |path: &Path| -> Result<Option<String>, ModelError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
                    ModelError::Invalid {
                        file: path.display().to_string(),
                        what: format!("invalid JSON: {e}"),
                    }
                })?;
                Ok(Some(text))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ModelError::Invalid {
                file: path.display().to_string(),
                what: format!("cannot be read: {e}"),
            }),
        }
    };
    let mut meta = Vec::new();
    if let Some(text) = read(path)? {
        meta.push((TOKENIZER_JSON_KEY.to_string(), MetaValue::String(text)));
    }
    let config_path = dir.dir.join("tokenizer_config.json");
    if let Some(text) = read(&config_path)? {
        meta.push((TOKENIZER_CONFIG_KEY.to_string(), MetaValue::String(text)));
    }
    if let Some(text) = read(&dir.dir.join("generation_config.json"))? {
        meta.push((GENERATION_CONFIG_KEY.to_string(), MetaValue::String(text)));
    }
    Ok(meta)
}

/// Rows of a `(heads · head_dim, n_in)` matrix reordered within each head from Hugging
/// Face's halves (row `j · head_dim/2 + i`) to adjacent pairs (row `2i + j`). `None` when the
/// row count does not match.
pub fn permute_rope_rows(
    data: &[u8],
    n_rows: usize,
    heads: usize,
    head_dim: usize,
) -> Option<Vec<u8>> {
    if n_rows != heads * head_dim || !head_dim.is_multiple_of(2) || n_rows == 0 {
        return None;
    }
    let row_bytes = data.len() / n_rows;
    if row_bytes * n_rows != data.len() {
        return None;
    }
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + j * half + i;
                let dst = h * head_dim + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_pairs_each_dim_with_its_partner_half_a_head_away() {
        // One byte per row: the row's old index. Two heads of 4.
        let data: Vec<u8> = (0..8).collect();
        let out = permute_rope_rows(&data, 8, 2, 4).unwrap();
        assert_eq!(out, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(permute_rope_rows(&data, 8, 3, 4).is_none());
    }
}

/// What [`dequantize_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct DequantizeReport {
    pub n_tensors: usize,
    /// Tensors that were stored quantized and are now `F16`.
    pub dequantized: usize,
}

/// Writes `gguf` with every quantized matrix dequantized to F16 — "full precision" for a
/// model that only exists quantized, the dense baseline of a comparison — and everything
/// else (F32 norms, F16/BF16 tensors, metadata, tokenizer) copied unchanged. EFQ files
/// (their matrices are blobs, not ggml types) are refused: dequantize their source instead.
pub fn dequantize_gguf(
    gguf: &edgefusion_io::gguf::GgufFile,
    output: &Path,
) -> Result<DequantizeReport, ModelError> {
    use edgefusion_kernels::GgmlType;
    let file = gguf.path.display().to_string();
    if gguf.get(crate::model::EFQ_VERSION_KEY).is_some() {
        return Err(ModelError::Invalid {
            file,
            what: "an EFQ file: its matrices are EFQ blobs; dequantize the model it was quantized from".into(),
        });
    }
    if !gguf.tensors.iter().any(|t| t.dtype.is_quantized()) {
        return Err(ModelError::Invalid {
            file,
            what: "no quantized tensor to dequantize: convert reads a Hugging Face folder or a quantized GGUF file".into(),
        });
    }
    let mut writer = GgufWriter::new();
    for (key, value) in &gguf.metadata {
        // llama.cpp's file type: 1 = mostly F16.
        let value = if key == "general.file_type" {
            MetaValue::U32(1)
        } else {
            value.clone()
        };
        writer.add_metadata(key.clone(), value);
    }
    let mut dequantized = 0;
    for t in &gguf.tensors {
        let data = gguf.tensor_data(t);
        match t.dtype {
            ty if !ty.is_quantized() => {
                writer.add_tensor(t.name.clone(), t.dtype, &t.shape, data);
            }
            ty => {
                let row_len = t.shape.first().copied().unwrap_or(0);
                let row_bytes = ty.row_bytes(row_len).ok_or_else(|| ModelError::Invalid {
                    file: file.clone(),
                    what: format!(
                        "tensor {}: rows of {row_len} are not whole {} blocks",
                        t.name,
                        ty.name()
                    ),
                })?;
                let mut row = vec![0f32; row_len];
                let mut out = Vec::with_capacity(t.n_elements() * 2);
                for src in data.chunks(row_bytes.max(1)) {
                    edgefusion_kernels::dequantize_row(ty, src, &mut row);
                    for &x in &row {
                        out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                    }
                }
                writer.add_tensor(t.name.clone(), GgmlType::F16, &t.shape, out);
                dequantized += 1;
            }
        }
    }
    writer.write(output)?;
    Ok(DequantizeReport {
        n_tensors: gguf.tensors.len(),
        dequantized,
    })
}

/// Writes `gguf` (a dense model) with the attention layers `layers` turned into windowed
/// attention over the first `sink` and the last `window` positions: a training-free hybrid
/// whose converted layers keep `sink + window` keys and values whatever the context (the
/// "Window-only" baseline a trained hybrid must beat). Tensors are copied unchanged; only
/// the metadata changes (`edgefusion.layer_types`, `edgefusion.window`, `edgefusion.sink`).
pub fn window_gguf(
    gguf: &edgefusion_io::gguf::GgufFile,
    layers: &[usize],
    window: usize,
    sink: usize,
    output: &Path,
) -> Result<ModelConfig, ModelError> {
    use crate::config::{LayerType, SINK_KEY, WINDOW_KEY};
    let file = gguf.path.display().to_string();
    let invalid = |what: String| ModelError::Invalid {
        file: file.clone(),
        what,
    };
    let tied = gguf.tensor("output.weight").is_none();
    let mut cfg = ModelConfig::from_gguf(gguf, tied)?;
    if cfg.block.window_rope_base.is_some() {
        // Its window layers rotate with the local layers' RoPE base; a global layer made a
        // window would lose its own.
        return Err(invalid(format!(
            "{} models have local layers of their own; turning global layers into windows is not supported",
            cfg.arch.name()
        )));
    }
    if window == 0 {
        return Err(invalid(
            "a window of 0 positions leaves a converted layer nothing to attend to".into(),
        ));
    }
    for &l in layers {
        match cfg.layer_types.get(l) {
            None => {
                return Err(invalid(format!(
                    "layer {l} does not exist: the model has {} layers (0..{})",
                    cfg.n_layers,
                    cfg.n_layers.saturating_sub(1)
                )))
            }
            Some(LayerType::Attention) => cfg.layer_types[l] = LayerType::Window,
            Some(other) => {
                return Err(invalid(format!(
                    "layer {l} is already '{}': only attention layers turn into windows",
                    other.name()
                )))
            }
        }
    }
    if cfg.window > 0 && (cfg.window, cfg.sink) != (window, sink) {
        return Err(invalid(format!(
            "the model already attends over windows of {} (+ sink {}); one model has one window",
            cfg.window, cfg.sink
        )));
    }
    cfg.window = window;
    cfg.sink = sink;
    if window + sink > cfg.n_ctx_train {
        return Err(invalid(format!(
            "{WINDOW_KEY} {window} + {SINK_KEY} {sink} exceeds the context length {}",
            cfg.n_ctx_train
        )));
    }
    // Layer types, window and sink as `ModelConfig::gguf_metadata` writes them.
    let mut bytes = GgufWriter::new();
    for (key, value) in &gguf.metadata {
        bytes.add_metadata(key.clone(), value.clone());
    }
    for (key, value) in cfg.gguf_metadata(&file)? {
        if key.starts_with("edgefusion.") {
            bytes.add_metadata(key, value);
        }
    }
    for t in &gguf.tensors {
        bytes.add_tensor(t.name.clone(), t.dtype, &t.shape, gguf.tensor_data(t));
    }
    bytes.write(output)?;
    Ok(cfg)
}

/// Layer numbers from a list such as `4-9,14,20-29` (ranges inclusive), sorted, each once.
pub fn parse_layer_list(list: &str) -> Result<Vec<usize>, String> {
    let mut layers = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{s}' in '{list}' is not a layer number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(format!("range '{part}' runs backwards"));
                }
                layers.extend(a..=b);
            }
            None => layers.push(number(part)?),
        }
    }
    if layers.is_empty() {
        return Err(format!("'{list}' lists no layer"));
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}
