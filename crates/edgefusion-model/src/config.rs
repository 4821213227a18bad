//! Hyperparameters of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`, with the sizes derived from them.

use edgefusion_io::gguf::{GgufFile, MetaValue};
use edgefusion_io::names::TensorRole;
use edgefusion_io::ModelSource;
use serde::Serialize;

use crate::ModelError;

/// Architectures the runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    /// Llama, Mistral, SmolLM and friends: no attention biases.
    Llama,
    /// Qwen2: Llama with q/k/v biases.
    Qwen2,
    /// Qwen3: Llama with RMS norms on every query and key head, NeoX RoPE.
    Qwen3,
    /// Gemma 3: Llama with the changes of [`BlockVariant::gemma3`], local (sliding-window)
    /// layers between global ones, and a SentencePiece vocabulary.
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RopeStyle {
    /// Rotates adjacent pairs `(x[2i], x[2i+1])` (GGUF llama: q/k were permuted by the converter).
    Normal,
    /// Rotates `(x[i], x[i + d/2])` (GPT-NeoX, Qwen2, and Hugging Face Llama weights as stored).
    NeoX,
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`rope.scaling.type = linear`).
    Linear {
        factor: f32,
    },
    /// Llama 3.1 style: per-frequency factors, smooth between the low and high frequency bands.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// Per-frequency divisors of the angle, `rope_dim / 2` of them: GGUF's `rope_freqs.weight`,
    /// which is how llama.cpp's converter stores Llama 3 scaling.
    Factors(Vec<f32>),
}

impl RopeScaling {
    /// The divisor of frequency `i` of `n = rope_dim / 2`, whose undivided frequency is
    /// `freq` (radians per position).
    pub fn divisor(&self, i: usize, freq: f32) -> f32 {
        match self {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => *factor,
            RopeScaling::Factors(f) => f[i],
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                let low_wavelen = *original_context as f32 / low_freq_factor;
                let high_wavelen = *original_context as f32 / high_freq_factor;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    *factor
                } else {
                    let smooth = (*original_context as f32 / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            }
        }
    }
}

/// GGUF tensor of per-frequency RoPE divisors ([`RopeScaling::Factors`]).
pub const ROPE_FREQS_TENSOR: &str = "rope_freqs.weight";

/// Activation of the gated feed-forward block `down(act(gate x) · up x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FfnAct {
    /// SwiGLU (Llama, Qwen2).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// How a block departs from Llama's; [`BlockVariant::default`] is Llama's block.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BlockVariant {
    /// Factor on the token embedding's rows before layer 0 (Gemma: √d_model).
    pub embed_scale: f32,
    /// Scale of query-key scores; `None`: 1/√head_dim.
    pub attn_scale: Option<f32>,
    pub ffn_act: FfnAct,
    /// RMS norm on every query and key head before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMS norm on the attention's and the feed-forward's outputs before each joins the
    /// residual stream (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// RoPE base of `window` layers, unscaled, where it differs from the global layers'
    /// (Gemma 3's local layers); `None`: every layer rotates alike.
    pub window_rope_base: Option<f32>,
}

impl Default for BlockVariant {
    fn default() -> Self {
        BlockVariant {
            embed_scale: 1.0,
            attn_scale: None,
            ffn_act: FfnAct::Silu,
            qk_norm: false,
            post_norms: false,
            window_rope_base: None,
        }
    }
}

impl BlockVariant {
    /// The block of an architecture whose shapes alone define it: Llama's, with QK-norm for
    /// Qwen3 (Gemma 3's needs its sizes: [`BlockVariant::gemma3`]).
    pub fn of_llama_family(arch: Arch) -> Self {
        BlockVariant {
            qk_norm: arch == Arch::Qwen3,
            ..Self::default()
        }
    }

    /// Gemma 3 as llama.cpp runs it (`src/models/gemma3.cpp`): embedding × √d_model, QK-norm,
    /// post-norms, GeGLU, local layers' RoPE base `window_rope_base`, and queries scaled by
    /// 1/√head_dim except in the 27B model (62 layers), where Gemma's reference scales by
    /// 1/√(d_model / n_heads).
    pub fn gemma3(
        d_model: usize,
        n_heads: usize,
        head_dim: usize,
        n_layers: usize,
        window_rope_base: f32,
    ) -> Self {
        let query_width = if n_layers == 62 {
            d_model / n_heads.max(1)
        } else {
            head_dim
        };
        BlockVariant {
            embed_scale: (d_model as f32).sqrt(),
            attn_scale: Some(1.0 / (query_width as f32).sqrt()),
            ffn_act: FfnAct::GeluTanh,
            qk_norm: true,
            post_norms: true,
            window_rope_base: Some(window_rope_base),
        }
    }
}

/// Every `GEMMA3_SWA_PATTERN`-th layer of Gemma 3 (the last of each group) attends globally,
/// the others over a sliding window (llama.cpp's default when the file does not say).
pub const GEMMA3_SWA_PATTERN: usize = 6;

/// The token mixer of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerType {
    /// Softmax attention with a KV cache.
    Attention,
    /// The selective SSM of docs/HYBRID.md, with a constant-size recurrent state; when the
    /// model's `window` is positive, softmax attention over the first `sink` and the last
    /// `window` positions runs beside it and the two outputs add.
    Ssm,
    /// Softmax attention over the first `sink` and the last `window` positions only: the
    /// training-free baseline a converted layer must beat.
    Window,
}

impl LayerType {
    /// Spelling in `edgefusion.layer_types` and `config.json`'s `layer_types`.
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Attention => "attention",
            LayerType::Ssm => "ssm",
            LayerType::Window => "window",
        }
    }

    /// The layer type spelled `name` (see [`LayerType::name`]).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "attention" => Some(LayerType::Attention),
            "ssm" => Some(LayerType::Ssm),
            "window" => Some(LayerType::Window),
            _ => None,
        }
    }
}

/// Metadata keys of hybrid models in GGUF files.
pub const LAYER_TYPES_KEY: &str = "edgefusion.layer_types";
pub const SSM_D_STATE_KEY: &str = "edgefusion.ssm.d_state";
pub const SSM_D_CONV_KEY: &str = "edgefusion.ssm.d_conv";
/// Positions at the end of the context that windowed attention sees (`ssm` and `window`
/// layers; 0 = none).
pub const WINDOW_KEY: &str = "edgefusion.window";
/// Positions at the start of the context ("attention sinks") that windowed attention always
/// sees beside its window.
pub const SINK_KEY: &str = "edgefusion.sink";

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub name: String,
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Hidden width of the SwiGLU feed-forward block.
    pub d_ff: usize,
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Number of leading dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    /// The output head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Token mixer of each layer (`n_layers` entries; all attention unless the model is a
    /// hybrid).
    pub layer_types: Vec<LayerType>,
    /// SSM state width N per KV group (0 without SSM layers).
    pub ssm_d_state: usize,
    /// Taps of the SSM's causal depthwise convolution (0 without SSM layers).
    pub ssm_d_conv: usize,
    /// Most recent positions (the current one included) that the windowed attention of
    /// `ssm` and `window` layers sees; 0: `ssm` layers have no attention.
    pub window: usize,
    /// First positions that windowed attention always sees beside its window.
    pub sink: usize,
    /// Where the block departs from Llama's (Gemma 3).
    pub block: BlockVariant,
}

impl ModelConfig {
    /// Reads the hyperparameters of a GGUF file or Hugging Face folder; the head counts as
    /// tied when the source has no separate output matrix.
    pub fn from_source(source: &ModelSource) -> Result<Self, ModelError> {
        let tied = source.try_tensor(TensorRole::Output, None).is_none();
        match source {
            ModelSource::Gguf(gguf) => Self::from_gguf(gguf, tied),
            ModelSource::HfDir(dir) => Self::from_hf_config(
                dir.config(),
                &dir.dir.join("config.json").display().to_string(),
                tied,
            ),
        }
    }

    /// Reads the hyperparameters from a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile, tied_embeddings: bool) -> Result<Self, ModelError> {
        let arch_name = gguf.architecture()?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(ModelError::UnsupportedArch {
                    file: gguf.path.display().to_string(),
                    arch: other.to_string(),
                })
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let d_model = gguf.get_u32(&key("embedding_length"))? as usize;
        let n_heads = gguf.get_u32(&key("attention.head_count"))? as usize;
        let n_kv_heads = match gguf.get(&key("attention.head_count_kv")) {
            Some(_) => gguf.get_u32(&key("attention.head_count_kv"))? as usize,
            None => n_heads,
        };
        let head_dim = match gguf.get(&key("attention.key_length")) {
            Some(_) => gguf.get_u32(&key("attention.key_length"))? as usize,
            // A zero head count is rejected by validate().
            None => d_model.checked_div(n_heads).unwrap_or(0),
        };
        let rope_dim = match gguf.get(&key("rope.dimension_count")) {
            Some(_) => gguf.get_u32(&key("rope.dimension_count"))? as usize,
            None => head_dim,
        };
        let rope_base = match gguf.get(&key("rope.freq_base")) {
            Some(_) => gguf.get_f32(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let rope_scaling = match gguf.get(&key("rope.scaling.type")) {
            Some(_) => match gguf.get_str(&key("rope.scaling.type"))? {
                "none" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: gguf.get_f32(&key("rope.scaling.factor"))?,
                },
                other => {
                    return Err(ModelError::Invalid {
                        file: gguf.path.display().to_string(),
                        what: format!(
                            "{}: rope scaling type '{other}' is not supported (supported: none, linear)",
                            key("rope.scaling.type")
                        ),
                    })
                }
            },
            None => RopeScaling::None,
        };
        // llama.cpp reads the factors for Llama-style models only (Qwen and Gemma graphs pass
        // none), so they are ignored elsewhere as there.
        let rope_freqs = match arch {
            Arch::Llama => gguf.tensor_view(ROPE_FREQS_TENSOR),
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => None,
        };
        let rope_scaling = match rope_freqs {
            None => rope_scaling,
            Some(view) => {
                let file = gguf.path.display().to_string();
                if rope_scaling != RopeScaling::None {
                    return Err(ModelError::Invalid {
                        file,
                        what: format!(
                            "tensor {ROPE_FREQS_TENSOR}: per-frequency factors beside {} = {rope_scaling:?}: one scaling at a time",
                            key("rope.scaling.type")
                        ),
                    });
                }
                let factors = crate::linear::vector_from_view(view, &file, rope_dim / 2)?;
                if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                    return Err(ModelError::Invalid {
                        file,
                        what: format!(
                            "tensor {ROPE_FREQS_TENSOR}: factor {f} is not a positive number"
                        ),
                    });
                }
                RopeScaling::Factors(factors)
            }
        };
        let vocab_size = match gguf.get(&key("vocab_size")) {
            Some(_) => gguf.get_u32(&key("vocab_size"))? as usize,
            None => gguf
                .get_str_array("tokenizer.ggml.tokens")
                .map(|t| t.len())
                .unwrap_or(0),
        };
        let cfg = ModelConfig {
            arch,
            name: gguf
                .get_str("general.name")
                .unwrap_or("unnamed")
                .to_string(),
            n_layers: gguf.get_u32(&key("block_count"))? as usize,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: gguf.get_u32(&key("feed_forward_length"))? as usize,
            vocab_size,
            n_ctx_train: gguf.get_u32(&key("context_length"))? as usize,
            rms_eps: gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope_base,
            rope_dim,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => RopeStyle::NeoX,
            },
            rope_scaling,
            tied_embeddings,
            layer_types: Vec::new(),
            ssm_d_state: 0,
            ssm_d_conv: 0,
            window: 0,
            sink: 0,
            block: BlockVariant::default(),
        };
        let file = gguf.path.display().to_string();
        let n_layers = cfg.n_layers;
        // An optional non-negative integer key (0 when absent).
        let get = |k: &str| match gguf.get(k) {
            Some(_) => gguf
                .get_u32(k)
                .map(|v| v as usize)
                .map_err(ModelError::from),
            None => Ok(0),
        };
        // Gemma 3's sliding window; without one (missing or 0) every layer is global, as in
        // llama.cpp.
        let gemma_window = match (arch, gguf.get(&key("attention.sliding_window"))) {
            (Arch::Gemma3, Some(_)) => gguf.get_u32(&key("attention.sliding_window"))? as usize,
            _ => 0,
        };
        let cfg = match gguf.get(LAYER_TYPES_KEY) {
            None if arch == Arch::Gemma3 => {
                let pattern_key = key("attention.sliding_window_pattern");
                // Which layers are local: a per-layer array of booleans, or a period whose
                // last layer is global (llama.cpp's `set_swa_pattern`; 0 = all local).
                let local: Vec<bool> = match gguf.get(&pattern_key) {
                    _ if gemma_window == 0 => vec![false; n_layers],
                    Some(MetaValue::Array(flags)) => {
                        let flags: Option<Vec<bool>> = flags
                            .iter()
                            .map(|f| match f {
                                MetaValue::Bool(b) => Some(*b),
                                _ => None,
                            })
                            .collect();
                        match flags {
                            Some(f) if f.len() == n_layers => f,
                            _ => {
                                return Err(ModelError::Invalid {
                                    file,
                                    what: format!(
                                        "{pattern_key} must be a period or {n_layers} booleans, one per layer"
                                    ),
                                })
                            }
                        }
                    }
                    other => {
                        let pattern = match other {
                            Some(_) => gguf.get_u32(&pattern_key)? as usize,
                            None => GEMMA3_SWA_PATTERN,
                        };
                        (0..n_layers)
                            .map(|l| pattern == 0 || l % pattern < pattern - 1)
                            .collect()
                    }
                };
                let types = local
                    .iter()
                    .map(|&l| {
                        if l {
                            LayerType::Window
                        } else {
                            LayerType::Attention
                        }
                    })
                    .collect();
                cfg.with_layer_types(types, 0, 0)
            }
            None => cfg.with_layer_types(vec![LayerType::Attention; n_layers], 0, 0),
            Some(value) => {
                let names: Option<Vec<&str>> = value
                    .as_array()
                    .and_then(|a| a.iter().map(|v| v.as_str()).collect());
                let Some(names) = names else {
                    return Err(ModelError::Invalid {
                        file,
                        what: format!("{LAYER_TYPES_KEY} must be an array of strings"),
                    });
                };
                let types = parse_layer_types(&names, &file, LAYER_TYPES_KEY)?;
                cfg.with_layer_types(types, get(SSM_D_STATE_KEY)?, get(SSM_D_CONV_KEY)?)
            }
        };
        let cfg = match arch {
            Arch::Gemma3 => {
                let softcap = key("final_logit_softcapping");
                if gguf.get(&softcap).is_some() && gguf.get_f32(&softcap)? != 0.0 {
                    return Err(ModelError::Invalid {
                        file,
                        what: format!("{softcap} is set; capped logits are not supported yet"),
                    });
                }
                // Local layers see the last `sliding_window` positions, their own included
                // (none when no layer is local).
                let window = match gguf.get(WINDOW_KEY) {
                    Some(_) => get(WINDOW_KEY)?,
                    None if cfg.count_layers(LayerType::Window) == 0 => 0,
                    None => gemma_window,
                };
                let window_rope_base = match gguf.get(&key("rope.freq_base_swa")) {
                    Some(_) => gguf.get_f32(&key("rope.freq_base_swa"))?,
                    None => 10_000.0,
                };
                ModelConfig {
                    window,
                    sink: get(SINK_KEY)?,
                    block: BlockVariant::gemma3(
                        cfg.d_model,
                        cfg.n_heads,
                        cfg.head_dim,
                        cfg.n_layers,
                        window_rope_base,
                    ),
                    ..cfg
                }
            }
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => ModelConfig {
                window: get(WINDOW_KEY)?,
                sink: get(SINK_KEY)?,
                block: BlockVariant::of_llama_family(arch),
                ..cfg
            },
        };
        cfg.validate(&file)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
    /// `Qwen3ForCausalLM`).
    pub fn from_hf_config(
        json: &serde_json::Value,
        file: &str,
        tied_embeddings: bool,
    ) -> Result<Self, ModelError> {
        let invalid = |what: String| ModelError::Invalid {
            file: file.to_string(),
            what,
        };
        let get_usize = |k: &str| -> Result<usize, ModelError> {
            json.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    invalid(format!(
                        "field '{k}' is missing or not a non-negative integer"
                    ))
                })
        };
        let get_f32 = |k: &str, default: f32| -> Result<f32, ModelError> {
            match json.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| invalid(format!("field '{k}' must be a number"))),
            }
        };
        let model_type = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| invalid("field 'model_type' is missing".into()))?;
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" | "gemma3_text" => {
                return Err(invalid(format!(
                    "model_type '{model_type}': Gemma 3 runs from GGUF files only (make one with llama.cpp's convert_hf_to_gguf.py)"
                )))
            }
            other => {
                return Err(ModelError::UnsupportedArch {
                    file: file.to_string(),
                    arch: other.to_string(),
                })
            }
        };
        let d_model = get_usize("hidden_size")?;
        let n_heads = get_usize("num_attention_heads")?;
        let n_kv_heads = match json.get("num_key_value_heads") {
            Some(serde_json::Value::Null) | None => n_heads,
            Some(_) => get_usize("num_key_value_heads")?,
        };
        let head_dim = match json.get("head_dim") {
            Some(serde_json::Value::Null) | None => d_model.checked_div(n_heads).unwrap_or(0),
            Some(_) => get_usize("head_dim")?,
        };
        // transformers 5 writes RoPE as `rope_parameters` (base and scaling in one object);
        // older configs as `rope_theta` and `rope_scaling`.
        let rope_parameters = json.get("rope_parameters").filter(|v| !v.is_null());
        let rope_base = match rope_parameters.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().map(|v| v as f32).ok_or_else(|| {
                invalid("field 'rope_parameters.rope_theta' must be a number".into())
            })?,
            None => get_f32("rope_theta", 10_000.0)?,
        };
        let rope_scaling = match rope_parameters.or_else(|| json.get("rope_scaling")) {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(obj) => {
                let kind = obj
                    .get("rope_type")
                    .or_else(|| obj.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                let num =
                    |k: &str, d: f32| obj.get(k).and_then(|v| v.as_f64()).map_or(d, |v| v as f32);
                match kind {
                    "linear" => RopeScaling::Linear {
                        factor: num("factor", 1.0),
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor", 8.0),
                        low_freq_factor: num("low_freq_factor", 1.0),
                        high_freq_factor: num("high_freq_factor", 4.0),
                        original_context: num("original_max_position_embeddings", 8192.0) as usize,
                    },
                    "default" => RopeScaling::None,
                    other => {
                        return Err(invalid(format!(
                        "rope_scaling type '{other}' is not supported (supported: linear, llama3)"
                    )))
                    }
                }
            }
        };
        let cfg = ModelConfig {
            arch,
            name: json
                .get("_name_or_path")
                .and_then(|v| v.as_str())
                .unwrap_or(model_type)
                .to_string(),
            n_layers: get_usize("num_hidden_layers")?,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: get_usize("intermediate_size")?,
            vocab_size: get_usize("vocab_size")?,
            n_ctx_train: get_usize("max_position_embeddings")?,
            rms_eps: get_f32("rms_norm_eps", 1e-6)?,
            rope_base,
            rope_dim: head_dim,
            // Hugging Face stores q/k unpermuted: its rotate_half is the NeoX pairing.
            rope_style: RopeStyle::NeoX,
            rope_scaling,
            tied_embeddings,
            layer_types: Vec::new(),
            ssm_d_state: 0,
            ssm_d_conv: 0,
            window: 0,
            sink: 0,
            block: BlockVariant::of_llama_family(arch),
        };
        let n_layers = cfg.n_layers;
        let cfg = match json.get("layer_types") {
            None => cfg.with_layer_types(vec![LayerType::Attention; n_layers], 0, 0),
            Some(value) => {
                let names: Option<Vec<&str>> = value
                    .as_array()
                    .and_then(|a| a.iter().map(|v| v.as_str()).collect());
                let Some(names) = names else {
                    return Err(invalid(
                        "field 'layer_types' must be an array of strings".into(),
                    ));
                };
                // transformers' own spelling of full attention (Qwen3 and others write it).
                let names: Vec<&str> = names
                    .iter()
                    .map(|&n| {
                        if n == "full_attention" {
                            "attention"
                        } else {
                            n
                        }
                    })
                    .collect();
                let types = parse_layer_types(&names, file, "layer_types")?;
                let opt = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                cfg.with_layer_types(types, opt("ssm_d_state"), opt("ssm_d_conv"))
            }
        };
        // Optional non-negative integers: a negative or fractional value is an error.
        let opt_strict = |k: &str| -> Result<usize, ModelError> {
            match json.get(k) {
                None | Some(serde_json::Value::Null) => Ok(0),
                Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    invalid(format!(
                        "field '{k}' must be a non-negative integer, not {v}"
                    ))
                }),
            }
        };
        let cfg = ModelConfig {
            window: opt_strict("window")?,
            sink: opt_strict("sink")?,
            ..cfg
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// The GGUF metadata that [`Self::from_gguf`] reads back into this config: the
    /// architecture's keys and, for hybrids (and Gemma 3, whose local layers are windows),
    /// `edgefusion.layer_types`, the SSM sizes, window and sink.
    /// Llama 3 RoPE scaling has no GGUF key: a writer stores
    /// [`Self::rope_freq_factors`] as the tensor [`ROPE_FREQS_TENSOR`], as llama.cpp does.
    pub fn gguf_metadata(&self, file: &str) -> Result<Vec<(String, MetaValue)>, ModelError> {
        let arch = self.arch.name();
        let key = |k: &str| format!("{arch}.{k}");
        let u32_of = |what: &str, v: usize| {
            u32::try_from(v)
                .map(MetaValue::U32)
                .map_err(|_| ModelError::Invalid {
                    file: file.to_string(),
                    what: format!("{what} = {v} does not fit GGUF's 32-bit field"),
                })
        };
        let mut meta = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String(arch.into()),
            ),
            (
                "general.name".to_string(),
                MetaValue::String(self.name.clone()),
            ),
            (
                key("context_length"),
                u32_of("context length", self.n_ctx_train)?,
            ),
            (
                key("embedding_length"),
                u32_of("hidden size", self.d_model)?,
            ),
            (key("block_count"), u32_of("layer count", self.n_layers)?),
            (
                key("feed_forward_length"),
                u32_of("intermediate size", self.d_ff)?,
            ),
            (
                key("attention.head_count"),
                u32_of("head count", self.n_heads)?,
            ),
            (
                key("attention.head_count_kv"),
                u32_of("KV head count", self.n_kv_heads)?,
            ),
            (
                key("attention.key_length"),
                u32_of("head dim", self.head_dim)?,
            ),
            (
                key("attention.value_length"),
                u32_of("head dim", self.head_dim)?,
            ),
            (
                key("attention.layer_norm_rms_epsilon"),
                MetaValue::F32(self.rms_eps),
            ),
            (key("rope.freq_base"), MetaValue::F32(self.rope_base)),
            (
                key("rope.dimension_count"),
                u32_of("RoPE dims", self.rope_dim)?,
            ),
            (
                key("vocab_size"),
                u32_of("vocabulary size", self.vocab_size)?,
            ),
        ];
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                meta.push((key("rope.scaling.type"), MetaValue::String("linear".into())));
                meta.push((key("rope.scaling.factor"), MetaValue::F32(factor)));
            }
            // No metadata: these travel as the tensor of [`Self::rope_freq_factors`].
            RopeScaling::Llama3 { .. } | RopeScaling::Factors(_) => {}
        }
        if let Some(base) = self.block.window_rope_base {
            meta.push((key("rope.freq_base_swa"), MetaValue::F32(base)));
        }
        if self.arch == Arch::Gemma3 {
            meta.push((
                key("attention.sliding_window"),
                u32_of("sliding window", self.window)?,
            ));
        }
        if self.is_hybrid() {
            meta.push((
                LAYER_TYPES_KEY.to_string(),
                MetaValue::Array(
                    self.layer_types
                        .iter()
                        .map(|t| MetaValue::String(t.name().into()))
                        .collect(),
                ),
            ));
            meta.push((
                SSM_D_STATE_KEY.to_string(),
                u32_of("ssm_d_state", self.ssm_d_state)?,
            ));
            meta.push((
                SSM_D_CONV_KEY.to_string(),
                u32_of("ssm_d_conv", self.ssm_d_conv)?,
            ));
            if self.window > 0 {
                meta.push((WINDOW_KEY.to_string(), u32_of("window", self.window)?));
                meta.push((SINK_KEY.to_string(), u32_of("sink", self.sink)?));
            }
        }
        Ok(meta)
    }

    fn with_layer_types(self, layer_types: Vec<LayerType>, d_state: usize, d_conv: usize) -> Self {
        ModelConfig {
            layer_types,
            ssm_d_state: d_state,
            ssm_d_conv: d_conv,
            ..self
        }
    }

    /// Whether any layer is not full attention (an SSM or a window).
    pub fn is_hybrid(&self) -> bool {
        self.layer_types.iter().any(|&t| t != LayerType::Attention)
    }

    /// Layers with full softmax attention (and a KV cache that grows with the context).
    pub fn n_attention_layers(&self) -> usize {
        self.count_layers(LayerType::Attention)
    }

    /// Layers of type `t`.
    pub fn count_layers(&self, t: LayerType) -> usize {
        self.layer_types.iter().filter(|&&x| x == t).count()
    }

    /// Whether layer `layer` runs the SSM.
    pub fn has_ssm(&self, layer: usize) -> bool {
        self.layer_types[layer] == LayerType::Ssm
    }

    /// Whether layer `layer` runs sink + window attention (a `window` layer, or an `ssm` layer
    /// of a model with a positive `window`).
    pub fn has_window(&self, layer: usize) -> bool {
        match self.layer_types[layer] {
            LayerType::Attention => false,
            LayerType::Window => true,
            LayerType::Ssm => self.window > 0,
        }
    }

    /// Whether layer `layer` has the attention projections q, k, v and o.
    pub fn has_attention_weights(&self, layer: usize) -> bool {
        self.layer_types[layer] == LayerType::Attention || self.has_window(layer)
    }

    /// Layers that run sink + window attention.
    pub fn n_window_layers(&self) -> usize {
        (0..self.n_layers).filter(|&l| self.has_window(l)).count()
    }

    /// Positions a windowed layer keeps: the sink and the window.
    pub fn window_positions(&self) -> usize {
        self.sink + self.window
    }

    /// Channels of an SSM layer's convolution: C `(n_heads · N)`, B `(n_kv_heads · N)`,
    /// x `(n_kv_heads · head_dim)`.
    pub fn ssm_channels(&self) -> usize {
        self.ssm_dims().channels()
    }

    /// The shapes of this model's SSM mixer (the one place they are derived).
    pub fn ssm_dims(&self) -> SsmDims {
        SsmDims {
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            d_state: self.ssm_d_state,
            d_conv: self.ssm_d_conv,
        }
    }

    /// Floats of one SSM layer's recurrent state: per KV group an `(N, head_dim)` matrix,
    /// plus the convolution's last `d_conv − 1` inputs.
    pub fn ssm_state_floats(&self) -> usize {
        self.n_kv_heads * self.ssm_d_state * self.head_dim
            + self.ssm_d_conv.saturating_sub(1) * self.ssm_channels()
    }

    /// Bytes of one sequence's state at `n_ctx` positions, as the runtime keeps it by
    /// default: every attention layer's K and V in f16, every windowed layer's K and V of at
    /// most `sink + window` positions in f16, every SSM layer's recurrent state in f32.
    pub fn context_state_bytes(&self, n_ctx: usize) -> usize {
        let n_ssm = self.count_layers(LayerType::Ssm);
        self.n_attention_layers() * 2 * self.kv_dim() * 2 * n_ctx
            + self.n_window_layers() * 2 * self.kv_dim() * 2 * self.window_positions().min(n_ctx)
            + n_ssm * self.ssm_state_floats() * 4
    }

    /// The per-frequency RoPE divisors a GGUF file stores as [`ROPE_FREQS_TENSOR`] (Llama 3
    /// scaling, computed as llama.cpp's converter does: frequencies `base^(−2i/d)` in f32);
    /// `None` for the scalings that metadata describes.
    pub fn rope_freq_factors(&self) -> Option<Vec<f32>> {
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Linear { .. } => None,
            RopeScaling::Factors(f) => Some(f.clone()),
            scaling @ RopeScaling::Llama3 { .. } => Some(
                (0..self.rope_dim / 2)
                    .map(|i| {
                        let freq = 1.0 / self.rope_base.powf((2 * i) as f32 / self.rope_dim as f32);
                        scaling.divisor(i, freq)
                    })
                    .collect(),
            ),
        }
    }

    /// The RoPE base of `window` layers where they rotate apart from the others (Gemma 3's
    /// local layers, unscaled); `None` where every layer rotates alike or none is a window.
    pub fn local_rope_base(&self) -> Option<f32> {
        self.block
            .window_rope_base
            .filter(|_| self.count_layers(LayerType::Window) > 0)
    }

    /// Scale of query-key scores.
    pub fn attn_scale(&self) -> f32 {
        self.block
            .attn_scale
            .unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    /// Parameters of one attention mixer (projections and biases).
    pub fn attention_params(&self) -> usize {
        let biases = match self.arch {
            Arch::Qwen2 => self.q_dim() + 2 * self.kv_dim(),
            Arch::Llama | Arch::Qwen3 | Arch::Gemma3 => 0,
        };
        let qk_norms = if self.block.qk_norm {
            2 * self.head_dim
        } else {
            0
        };
        2 * self.d_model * (self.q_dim() + self.kv_dim()) + biases + qk_norms
    }

    /// Parameters of one SSM mixer: C, B, x, Δ, gate and output projections, the
    /// convolution, Δ bias, log A and D.
    pub fn ssm_params(&self) -> usize {
        let n = self.ssm_d_state;
        let proj_in = self.d_model * ((self.n_heads + self.n_kv_heads) * n + self.kv_dim());
        let small = 2 * self.n_kv_heads * self.d_model + 2 * self.n_kv_heads + self.n_heads;
        proj_in + self.q_dim() * self.d_model + self.ssm_channels() * self.ssm_d_conv + small
    }

    fn validate(&self, file: &str) -> Result<(), ModelError> {
        let fail = |what: String| {
            Err(ModelError::Invalid {
                file: file.to_string(),
                what,
            })
        };
        if self.n_layers == 0 || self.n_layers > 4096 {
            return fail(format!("block count {} must be in 1..=4096", self.n_layers));
        }
        if self.d_model == 0 || self.d_model > 1 << 17 {
            return fail(format!(
                "embedding length {} must be in 1..=131072",
                self.d_model
            ));
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return fail(format!(
                "head count {} must be a positive multiple of the KV head count {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > 1024 {
            return fail(format!(
                "head dimension {} must be even and in 2..=1024",
                self.head_dim
            ));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return fail(format!(
                "rope dimension {} must be even and at most the head dimension {}",
                self.rope_dim, self.head_dim
            ));
        }
        if self.d_ff == 0 || self.d_ff > 1 << 20 {
            return fail(format!(
                "feed-forward length {} must be in 1..=1048576",
                self.d_ff
            ));
        }
        if self.vocab_size == 0 || self.vocab_size > 1 << 24 {
            return fail(format!(
                "vocabulary size {} must be in 1..=16777216",
                self.vocab_size
            ));
        }
        if self.n_ctx_train == 0 {
            return fail("context length must be positive".into());
        }
        if !(self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return fail(format!(
                "RMS norm epsilon {} must be in (0, 1)",
                self.rms_eps
            ));
        }
        if !(self.rope_base > 0.0 && self.rope_base.is_finite()) {
            return fail(format!("rope base {} must be positive", self.rope_base));
        }
        if self.layer_types.len() != self.n_layers {
            return fail(format!(
                "{LAYER_TYPES_KEY} lists {} layers; the model has {}",
                self.layer_types.len(),
                self.n_layers
            ));
        }
        let n_ssm = self.count_layers(LayerType::Ssm);
        let n_window = self.count_layers(LayerType::Window);
        if n_ssm + n_window == 0 && (self.window > 0 || self.sink > 0) {
            let key = if self.window > 0 {
                WINDOW_KEY
            } else {
                SINK_KEY
            };
            return fail(format!(
                "{key} is set but no layer is 'ssm' or 'window' in {LAYER_TYPES_KEY}: only converted layers attend over a window"
            ));
        }
        if n_window > 0 && self.window == 0 {
            return fail(format!(
                "{WINDOW_KEY} is 0 (or missing) but {LAYER_TYPES_KEY} has {n_window} 'window' layers, which need a window of at least 1 position"
            ));
        }
        if self.sink > 0 && self.window == 0 {
            return fail(format!(
                "{SINK_KEY} is {} but {WINDOW_KEY} is 0: sink positions are part of windowed attention, which needs a window of at least 1 position",
                self.sink
            ));
        }
        if self.window_positions() > self.n_ctx_train {
            return fail(format!(
                "{WINDOW_KEY} {} + {SINK_KEY} {} exceeds the context length {} the model was trained for",
                self.window, self.sink, self.n_ctx_train
            ));
        }
        if n_ssm > 0 {
            if !(1..=1024).contains(&self.ssm_d_state) {
                return fail(format!(
                    "{SSM_D_STATE_KEY} {} must be in 1..=1024 for a model with SSM layers",
                    self.ssm_d_state
                ));
            }
            if !(1..=16).contains(&self.ssm_d_conv) {
                return fail(format!(
                    "{SSM_D_CONV_KEY} {} must be in 1..=16 for a model with SSM layers",
                    self.ssm_d_conv
                ));
            }
        }
        Ok(())
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads sharing one KV head.
    pub fn gqa_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Parameters of the mixers and feed-forward blocks (embedding, head and norms
    /// excluded; attention biases included).
    pub fn n_block_params(&self) -> usize {
        let n_attention_weights = (0..self.n_layers)
            .filter(|&l| self.has_attention_weights(l))
            .count();
        let mixers = n_attention_weights * self.attention_params()
            + self.count_layers(LayerType::Ssm) * self.ssm_params();
        mixers + self.n_layers * 3 * self.d_model * self.d_ff
    }

    /// All parameters (a tied head is counted once).
    pub fn n_params(&self) -> usize {
        let embd = self.vocab_size * self.d_model;
        let head = if self.tied_embeddings { 0 } else { embd };
        let norms_per_layer = if self.block.post_norms { 4 } else { 2 };
        let norms = self.n_layers * norms_per_layer * self.d_model + self.d_model;
        embd + head + norms + self.n_block_params()
    }

    /// Floating-point operations to produce one token at context position `n_past`,
    /// counted from the shapes: 2 per multiply-add in every matmul (the head included),
    /// the attention scores and weighted sum over `n_past + 1` positions (at most
    /// `sink + window` in windowed layers), and each SSM layer's convolution, state update and
    /// read-out (constant in `n_past`).
    pub fn flops_per_token(&self, n_past: usize) -> f64 {
        let matmul = 2.0 * (self.n_block_params() + self.vocab_size * self.d_model) as f64;
        let attended = |positions: usize| 2.0 * 2.0 * self.q_dim() as f64 * positions as f64;
        let attn = self.n_attention_layers() as f64 * attended(n_past + 1)
            + self.n_window_layers() as f64 * attended((n_past + 1).min(self.window_positions()));
        let n_ssm = self.count_layers(LayerType::Ssm) as f64;
        let state = (self.n_kv_heads * self.ssm_d_state * self.head_dim) as f64;
        let ssm = n_ssm
            * (2.0 * (self.ssm_channels() * self.ssm_d_conv) as f64
                + 3.0 * state
                + 2.0 * self.gqa_group() as f64 * state);
        matmul + attn + ssm
    }
}

/// Shapes of one SSM mixer, from [`ModelConfig::ssm_dims`]: heads laid out like attention's,
/// `n_heads` read-out heads over `n_kv_heads` groups of `head_dim`, state width `d_state`
/// (N), `d_conv` convolution taps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SsmDims {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_state: usize,
    pub d_conv: usize,
}

impl SsmDims {
    /// Channels of the convolution: C `(n_heads · N)`, B `(n_kv_heads · N)`,
    /// x `(n_kv_heads · head_dim)`.
    pub fn channels(&self) -> usize {
        (self.n_heads + self.n_kv_heads) * self.d_state + self.n_kv_heads * self.head_dim
    }

    /// Query heads per group.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// `(rows, cols)` of the SSM matrix `name` (`None` for a vector).
    pub fn matrix_shape(&self, name: &str) -> Option<(usize, usize)> {
        let s = self.param_shapes();
        Some(match name {
            "wc" => s.wc,
            "wb" => s.wb,
            "wx" => s.wx,
            "wdt" => s.wdt,
            "wgate" => s.wgate,
            "wo" => s.wo,
            _ => return None,
        })
    }

    /// The shape of every parameter: `(rows, cols)` of each matrix (`(out, in)`), the length
    /// of each vector (the convolution's taps as `channels · d_conv`).
    pub fn param_shapes(&self) -> crate::SsmParams<(usize, usize), usize> {
        let (d, g) = (self.d_model, self.n_kv_heads);
        crate::SsmParams {
            wc: (self.n_heads * self.d_state, d),
            wb: (g * self.d_state, d),
            wx: (g * self.head_dim, d),
            wdt: (g, d),
            wgate: (g, d),
            wo: (d, self.n_heads * self.head_dim),
            dt_bias: g,
            a_log: g,
            d: self.n_heads,
            conv: self.channels() * self.d_conv,
        }
    }
}

/// Layer types from their names, or an error naming the file, the key and the bad entry.
fn parse_layer_types(names: &[&str], file: &str, key: &str) -> Result<Vec<LayerType>, ModelError> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            LayerType::parse(name).ok_or_else(|| ModelError::Invalid {
                file: file.to_string(),
                what: format!("{key}[{i}] is '{name}'; expected 'attention', 'ssm' or 'window'"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny hybrid fixture's config (SSM layers) with a sink 1 + window 4: valid.
    fn valid() -> ModelConfig {
        let path = edgefusion_testkit::fixture("tiny-hybrid-f32.gguf");
        let source = ModelSource::open(&path).unwrap();
        let mut cfg = ModelConfig::from_source(&source).unwrap();
        assert!(
            cfg.count_layers(LayerType::Ssm) > 0,
            "the fixture has SSM layers"
        );
        (cfg.window, cfg.sink) = (4, 1);
        cfg
    }

    /// Each rule of `validate`, broken alone, is refused with the file and the rule named.
    #[test]
    fn every_validation_rule_refuses_its_own_break() {
        type Break = fn(&mut ModelConfig);
        let cases: Vec<(&str, Break, &str)> = vec![
            ("no layers", |c| c.n_layers = 0, "block count 0"),
            ("too many layers", |c| c.n_layers = 5000, "block count 5000"),
            ("zero width", |c| c.d_model = 0, "embedding length 0"),
            ("huge width", |c| c.d_model = 1 << 18, "embedding length"),
            ("no heads", |c| c.n_heads = 0, "head count 0"),
            ("no KV heads", |c| c.n_kv_heads = 0, "KV head count 0"),
            (
                "heads not a multiple of KV heads",
                |c| {
                    c.n_heads = 3;
                    c.n_kv_heads = 2
                },
                "positive multiple",
            ),
            ("odd head dim", |c| c.head_dim = 7, "head dimension 7"),
            (
                "huge head dim",
                |c| c.head_dim = 2048,
                "head dimension 2048",
            ),
            (
                "rope beyond head",
                |c| c.rope_dim = c.head_dim + 2,
                "rope dimension",
            ),
            ("odd rope", |c| c.rope_dim = 3, "rope dimension 3"),
            ("no feed-forward", |c| c.d_ff = 0, "feed-forward length 0"),
            ("no vocabulary", |c| c.vocab_size = 0, "vocabulary size 0"),
            (
                "huge vocabulary",
                |c| c.vocab_size = 1 << 25,
                "vocabulary size",
            ),
            ("no context", |c| c.n_ctx_train = 0, "context length"),
            ("zero epsilon", |c| c.rms_eps = 0.0, "RMS norm epsilon"),
            ("NaN epsilon", |c| c.rms_eps = f32::NAN, "RMS norm epsilon"),
            ("negative rope base", |c| c.rope_base = -1.0, "rope base"),
            (
                "infinite rope base",
                |c| c.rope_base = f32::INFINITY,
                "rope base",
            ),
            (
                "layer types short",
                |c| {
                    c.layer_types.pop();
                },
                LAYER_TYPES_KEY,
            ),
            (
                "window without converted layers",
                |c| {
                    c.layer_types
                        .iter_mut()
                        .for_each(|t| *t = LayerType::Attention)
                },
                "only converted layers",
            ),
            (
                "window layers without a window",
                |c| {
                    c.layer_types[0] = LayerType::Window;
                    c.window = 0;
                    c.sink = 0
                },
                "'window' layers",
            ),
            (
                "sink without a window",
                |c| {
                    c.window = 0;
                    c.sink = 2
                },
                "sink positions",
            ),
            (
                "window beyond the context",
                |c| c.window = c.n_ctx_train,
                "exceeds the context length",
            ),
            ("no SSM state", |c| c.ssm_d_state = 0, SSM_D_STATE_KEY),
            ("huge SSM state", |c| c.ssm_d_state = 2000, SSM_D_STATE_KEY),
            ("no SSM conv", |c| c.ssm_d_conv = 0, SSM_D_CONV_KEY),
            ("long SSM conv", |c| c.ssm_d_conv = 17, SSM_D_CONV_KEY),
        ];
        assert!(valid().validate("m.gguf").is_ok());
        for (name, break_it, expected) in cases {
            let mut cfg = valid();
            break_it(&mut cfg);
            match cfg.validate("m.gguf") {
                Err(ModelError::Invalid { file, what }) => {
                    assert_eq!(file, "m.gguf", "{name}");
                    assert!(
                        what.contains(expected),
                        "{name}: {what:?} lacks {expected:?}"
                    );
                }
                other => panic!("{name}: expected a refusal, got {other:?}"),
            }
        }
    }
}
