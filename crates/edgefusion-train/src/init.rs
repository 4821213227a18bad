//! SSM weights initialised from a layer's attention weights (the linear-attention view of
//! "The Mamba in the Llama", docs/HYBRID.md), and hybrid GGUF files built from a dense one.
//!
//! `C ← W_q`, `B ← W_k` (the N lowest-frequency RoPE dimensions of each head: they carry
//! content rather than position, which a position-free SSM can keep), `x ← W_v`,
//! `out ← W_o`; the convolution passes the current token through (last tap 1), the gate is
//! open (`w_gate = 0`, so `2σ(0) = 1`), no skip (`D = 0`), and each KV group gets a step
//! size from a log-spaced range so that the groups start with short and long memories.

use std::collections::HashMap;
use std::path::Path;

use edgefusion_io::gguf::{GgufFile, GgufWriter, MetaValue};
use edgefusion_io::names::{parse_gguf_name, TensorRole};
use edgefusion_kernels::GgmlType;
use edgefusion_model::config::{
    LAYER_TYPES_KEY, SINK_KEY, SSM_D_CONV_KEY, SSM_D_STATE_KEY, WINDOW_KEY,
};
use edgefusion_model::{LayerType, Linear, Mixer, Model, ModelConfig, RopeStyle};

use crate::TrainError;

/// Step sizes Δ of the KV groups at initialisation: log-spaced over this range (Mamba's
/// default `dt_min`, `dt_max`).
pub const DT_RANGE: (f32, f32) = (0.001, 0.1);

/// An SSM's weights as floats, shapes as in docs/HYBRID.md (row-major `(out, in)`; the
/// convolution `(channels, d_conv)`).
pub type SsmWeights = edgefusion_model::SsmParams<Vec<f32>>;

/// Dimensions of a head (of `head_dim`) that C and B keep: the `n` with the lowest RoPE
/// frequencies, in increasing order.
pub fn kept_dims(style: RopeStyle, head_dim: usize, n: usize) -> Vec<usize> {
    let n = n.min(head_dim);
    match style {
        // Pairs (2i, 2i + 1) rotate at base^(−2i/P): the last dims turn slowest.
        RopeStyle::Normal => (head_dim - n..head_dim).collect(),
        // Pairs (i, i + P/2): take the slowest pairs, both halves.
        RopeStyle::NeoX => {
            let half = head_dim / 2;
            let (lo, hi) = (n / 2, n - n / 2);
            let mut dims: Vec<usize> = (half - hi..half).collect();
            dims.extend(head_dim - lo..head_dim);
            dims.sort_unstable();
            dims
        }
    }
}

/// A matrix as floats `(n_out, n_in)`.
pub fn dequantized(w: &Linear<'_>) -> Vec<f32> {
    let mut out = vec![0.0f32; w.n_out * w.n_in];
    for (r, row) in out.chunks_mut(w.n_in).enumerate() {
        w.dequantize_row_into(r, row);
    }
    out
}

/// Rows `dims` of every head of `w` `(n_heads · head_dim, d)`, as `(n_heads · dims, d)`.
fn head_rows(w: &[f32], n_heads: usize, head_dim: usize, d: usize, dims: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(n_heads * dims.len() * d);
    for h in 0..n_heads {
        for &k in dims {
            out.extend_from_slice(&w[(h * head_dim + k) * d..][..d]);
        }
    }
    out
}

/// The SSM of `cfg` (whose `ssm_d_state`, `ssm_d_conv` are set) initialised from attention
/// weights `wq, wk, wv, wo`.
pub fn ssm_from_attention(
    cfg: &ModelConfig,
    wq: &Linear<'_>,
    wk: &Linear<'_>,
    wv: &Linear<'_>,
    wo: &Linear<'_>,
) -> SsmWeights {
    let (d, p, n) = (cfg.d_model, cfg.head_dim, cfg.ssm_d_state);
    let dims = kept_dims(cfg.rope_style, p, n);
    let groups = cfg.n_kv_heads;
    let k = cfg.ssm_d_conv;
    let mut conv = vec![0.0f32; cfg.ssm_channels() * k];
    for taps in conv.chunks_exact_mut(k) {
        taps[k - 1] = 1.0;
    }
    let dt_bias = (0..groups)
        .map(|j| {
            let t = if groups > 1 {
                j as f32 / (groups - 1) as f32
            } else {
                0.5
            };
            let dt = (DT_RANGE.0.ln() + t * (DT_RANGE.1.ln() - DT_RANGE.0.ln())).exp();
            // softplus⁻¹(dt) = ln(eᵈᵗ − 1)
            dt.exp_m1().ln()
        })
        .collect();
    SsmWeights {
        wc: head_rows(&dequantized(wq), cfg.n_heads, p, d, &dims),
        wb: head_rows(&dequantized(wk), groups, p, d, &dims),
        wx: dequantized(wv),
        wdt: vec![0.0; groups * d],
        wgate: vec![0.0; groups * d],
        wo: dequantized(wo),
        dt_bias,
        a_log: vec![0.0; groups],
        d: vec![0.0; cfg.n_heads],
        conv,
    }
}

/// [`ssm_from_attention`] with the four projections replaced by Gaussian noise of the same
/// RMS (the `random` initialisation, and the baseline attention's is measured against).
pub fn ssm_random(mut w: SsmWeights, seed: u64) -> SsmWeights {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    for m in [&mut w.wc, &mut w.wb, &mut w.wx, &mut w.wo] {
        let rms = (m.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / m.len() as f64).sqrt();
        for v in m.iter_mut() {
            // Box–Muller
            let g = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
            *v = (g * rms) as f32;
        }
    }
    w
}

/// Writes a hybrid copy of the dense GGUF model `gguf` (loaded as `model`) to `output`:
/// layers whose `layer_types` entry is SSM get SSMs (f32; from attention, or random with
/// `random_seed`) in place of their attention tensors; everything else is copied as
/// stored. Written atomically.
#[allow(clippy::too_many_arguments)]
pub fn write_hybrid(
    gguf: &GgufFile,
    model: &Model<'_>,
    layer_types: &[LayerType],
    d_state: usize,
    d_conv: usize,
    random_seed: Option<u64>,
    output: &Path,
) -> Result<(), TrainError> {
    let init = match random_seed {
        Some(seed) => SsmInitSource::Random(seed),
        None => SsmInitSource::Attention,
    };
    let hybrid = hybrid_layout(&model.config, layer_types, d_state, d_conv, 0, 0);
    write_hybrid_with(gguf, model, &hybrid, init, output)
}

/// The dense `config` with `layer_types`, the SSM sizes and the window: the config of the
/// hybrid the writers produce.
pub fn hybrid_layout(
    config: &ModelConfig,
    layer_types: &[LayerType],
    d_state: usize,
    d_conv: usize,
    window: usize,
    sink: usize,
) -> ModelConfig {
    ModelConfig {
        layer_types: layer_types.to_vec(),
        ssm_d_state: d_state,
        ssm_d_conv: d_conv,
        window,
        sink,
        ..config.clone()
    }
}

/// Where the SSM weights of [`write_hybrid_with`] come from.
#[derive(Debug, Clone, Copy)]
pub enum SsmInitSource<'a> {
    /// [`ssm_from_attention`] of each layer.
    Attention,
    /// [`ssm_random`] with this seed (plus the layer index).
    Random(u64),
    /// Trained weights by layer; layers missing from the map start from attention.
    Trained(&'a std::collections::HashMap<usize, SsmWeights>),
}

/// Writes the hybrid `hybrid` (the dense model's config with its layer types, SSM sizes and
/// window: [`hybrid_layout`]) with the SSM weights from `init`.
pub fn write_hybrid_with(
    gguf: &GgufFile,
    model: &Model<'_>,
    hybrid: &ModelConfig,
    init: SsmInitSource<'_>,
    output: &Path,
) -> Result<(), TrainError> {
    write_hybrid_tuned(gguf, model, hybrid, init, &[], output)
}

/// A base weight after full fine-tuning, to be written in f32 in place of the base's.
#[derive(Debug, Clone)]
pub struct TunedTensor {
    /// GGUF name (`blk.3.ffn_up.weight`).
    pub name: String,
    /// GGUF shape (fastest dimension first).
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl TunedTensor {
    /// The tensor `t` (candle's dimensions, slowest first) under the GGUF name `name`.
    pub fn of(name: &str, t: &candle_core::Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            name: name.to_string(),
            shape: t.dims().iter().rev().copied().collect(),
            values: t.flatten_all()?.to_vec1::<f32>()?,
        })
    }
}

/// [`write_hybrid_with`], with the base tensors named in `tuned` replaced by their f32
/// values: the base weights of a fully fine-tuned run. With a window, SSM layers keep their
/// attention tensors (they attend over the sink and the window beside the SSM), and
/// `window` layers keep theirs with no SSM.
pub fn write_hybrid_tuned(
    gguf: &GgufFile,
    model: &Model<'_>,
    hybrid: &ModelConfig,
    init: SsmInitSource<'_>,
    tuned: &[TunedTensor],
    output: &Path,
) -> Result<(), TrainError> {
    let layer_types = &hybrid.layer_types[..];
    let (d_state, d_conv) = (hybrid.ssm_d_state, hybrid.ssm_d_conv);
    let file = gguf.path.display().to_string();
    let fail = |what: String| TrainError::Config {
        file: file.clone(),
        what,
    };
    let dense = &model.config;
    if dense.is_hybrid() {
        return Err(fail("is already a hybrid".into()));
    }
    if layer_types.len() != dense.n_layers {
        return Err(fail(format!(
            "{} layer types given for {} layers",
            layer_types.len(),
            dense.n_layers
        )));
    }
    let cfg = hybrid.clone();
    if cfg.window == 0 && cfg.ssm_params() > cfg.attention_params() {
        return Err(fail(format!(
            "d_state {d_state} makes the SSM larger than the attention it replaces"
        )));
    }

    let mut writer = GgufWriter::new();
    for (key, value) in &gguf.metadata {
        writer.add_metadata(key.clone(), value.clone());
    }
    writer.add_metadata(
        LAYER_TYPES_KEY,
        MetaValue::Array(
            layer_types
                .iter()
                .map(|t| MetaValue::String(t.name().into()))
                .collect(),
        ),
    );
    writer.add_metadata(SSM_D_STATE_KEY, MetaValue::U32(d_state as u32));
    writer.add_metadata(SSM_D_CONV_KEY, MetaValue::U32(d_conv as u32));
    if cfg.window > 0 {
        writer.add_metadata(WINDOW_KEY, MetaValue::U32(cfg.window as u32));
        writer.add_metadata(SINK_KEY, MetaValue::U32(cfg.sink as u32));
    }

    // Layers that lose their attention: SSM layers without a window.
    let is_ssm = |layer: Option<usize>| layer.is_some_and(|l| !cfg.has_attention_weights(l));
    let attention_roles = [
        TensorRole::AttnQ,
        TensorRole::AttnK,
        TensorRole::AttnV,
        TensorRole::AttnOutput,
        TensorRole::AttnQBias,
        TensorRole::AttnKBias,
        TensorRole::AttnVBias,
    ];
    // The SSMs' bytes, kept alive until the writer is done.
    let mut ssm_tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        if layer_types[l] != LayerType::Ssm {
            continue;
        }
        let Mixer::Attention(a) = &layer.mixer else {
            unreachable!("the dense model has attention everywhere")
        };
        if a.bq.is_some() && cfg.window == 0 {
            return Err(fail(format!(
                "layer {l} has q/k/v biases, which the SSM initialisation does not carry"
            )));
        }
        let w = match init {
            SsmInitSource::Trained(trained) if trained.contains_key(&l) => trained[&l].clone(),
            SsmInitSource::Random(seed) => ssm_random(
                ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo),
                seed.wrapping_add(l as u64),
            ),
            _ => ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo),
        };
        let (d, n, g) = (cfg.d_model, d_state, cfg.n_kv_heads);
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (role, shape, values) in [
            (TensorRole::SsmC, vec![d, cfg.n_heads * n], &w.wc),
            (TensorRole::SsmB, vec![d, g * n], &w.wb),
            (TensorRole::SsmX, vec![d, cfg.kv_dim()], &w.wx),
            (TensorRole::SsmDt, vec![d, g], &w.wdt),
            (TensorRole::SsmDtBias, vec![g], &w.dt_bias),
            (TensorRole::SsmALog, vec![g], &w.a_log),
            (TensorRole::SsmD, vec![cfg.n_heads], &w.d),
            (TensorRole::SsmGate, vec![d, g], &w.wgate),
            (
                TensorRole::SsmConv,
                vec![d_conv, cfg.ssm_channels()],
                &w.conv,
            ),
            (TensorRole::SsmOut, vec![cfg.q_dim(), d], &w.wo),
        ] {
            ssm_tensors.push((role.gguf_name(Some(l)), shape, bytes(values)));
        }
    }
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tuned: HashMap<&str, (&[usize], Vec<u8>)> = tuned
        .iter()
        .map(|t| (t.name.as_str(), (t.shape.as_slice(), bytes(&t.values))))
        .collect();
    for t in &gguf.tensors {
        let dropped = parse_gguf_name(&t.name)
            .is_some_and(|(role, layer)| attention_roles.contains(&role) && is_ssm(layer));
        if dropped {
            continue;
        }
        let view = gguf.view(t);
        match tuned.get(t.name.as_str()) {
            Some((shape, data)) => {
                if *shape != view.shape {
                    return Err(fail(format!(
                        "tuned tensor '{}' has shape {shape:?}, the base {:?}",
                        t.name, view.shape
                    )));
                }
                writer.add_tensor(t.name.clone(), GgmlType::F32, shape, data.as_slice())
            }
            None => writer.add_tensor(t.name.clone(), view.dtype, view.shape, view.data),
        };
    }
    if let Some(name) = tuned
        .keys()
        .find(|name| !gguf.tensors.iter().any(|t| t.name == **name))
    {
        return Err(fail(format!(
            "tuned tensor '{name}' is not in the base model"
        )));
    }
    for (name, shape, data) in &ssm_tensors {
        writer.add_tensor(name.clone(), GgmlType::F32, shape, data.as_slice());
    }
    writer
        .write(output)
        .map_err(|e| fail(format!("writing {}: {e}", output.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_dims_are_the_slowest_rope_pairs() {
        assert_eq!(kept_dims(RopeStyle::Normal, 8, 4), vec![4, 5, 6, 7]);
        assert_eq!(kept_dims(RopeStyle::NeoX, 8, 4), vec![2, 3, 6, 7]);
        assert_eq!(
            kept_dims(RopeStyle::Normal, 8, 8),
            (0..8).collect::<Vec<_>>()
        );
    }
}
