//! A Llama-family decoder stack with its weights bound to their roles.

use edgefusion_io::names::TensorRole;
use edgefusion_io::ModelSource;
use edgefusion_kernels::GgmlType;

use crate::config::{LayerType, ModelConfig, WINDOW_KEY};
use crate::linear::{vector_from_view, Linear};
use crate::ModelError;

/// The tensor role of the SSM parameter `name` ([`SsmParams::NAMES`]).
pub fn ssm_role(name: &str) -> TensorRole {
    match name {
        "wc" => TensorRole::SsmC,
        "wb" => TensorRole::SsmB,
        "wx" => TensorRole::SsmX,
        "wdt" => TensorRole::SsmDt,
        "wgate" => TensorRole::SsmGate,
        "wo" => TensorRole::SsmOut,
        "dt_bias" => TensorRole::SsmDtBias,
        "a_log" => TensorRole::SsmALog,
        "d" => TensorRole::SsmD,
        "conv" => TensorRole::SsmConv,
        other => unreachable!("no SSM parameter is named {other}"),
    }
}

/// A load error of a windowed layer's attention weights, with the rule that asked for them.
fn window_context(e: ModelError, file: &str, layer: usize, why: &str) -> ModelError {
    ModelError::Invalid {
        file: file.to_string(),
        what: format!("layer {layer}: {why}, but its attention weights do not load: {e}"),
    }
}

/// Metadata key and version of EFQ-quantized GGUF files (written by `edgefusion quantize`).
pub const EFQ_VERSION_KEY: &str = "edgefusion.efq.version";
pub const EFQ_VERSION: u32 = 3;
/// EFQ file versions this build reads: 1 (blobs "EFQ1"), 2 (blobs "EFQ1" or "EFQ2", whose
/// input dimension may be rotated) and 3 (as 2, and a linear matrix may be its source's
/// tensor in its own GGUF type instead of a blob). Each matrix loads by its tensor type.
pub const EFQ_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=EFQ_VERSION;

/// Attention weights of one layer: `q = Wq x (+ bq)`, etc.
#[derive(Debug)]
pub struct Attention<'a> {
    /// (q_dim, d_model)
    pub wq: Linear<'a>,
    /// (kv_dim, d_model)
    pub wk: Linear<'a>,
    /// (kv_dim, d_model)
    pub wv: Linear<'a>,
    /// (d_model, q_dim)
    pub wo: Linear<'a>,
    /// Biases (Qwen2): (q_dim), (kv_dim), (kv_dim).
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// RMS norm weights of every query and key head before RoPE (Qwen3, Gemma 3): (head_dim)
    /// each.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

impl Attention<'static> {
    /// Weights of no shape, to hold a layer's place while its mixer is moved.
    fn placeholder() -> Self {
        let empty = || Linear::from_f32("placeholder", 0, 0, &[]);
        Attention {
            wq: empty(),
            wk: empty(),
            wv: empty(),
            wo: empty(),
            bq: None,
            bk: None,
            bv: None,
            q_norm: None,
            k_norm: None,
        }
    }
}

/// An SSM mixer's parameters by name (the selective SSM of docs/HYBRID.md), whatever holds
/// them: [`Linear`] matrices and float vectors at run time ([`Ssm`]), candle tensors or
/// variables in training, plain floats in checkpoints. N is `ssm_d_state`; heads are laid out
/// like attention's: `n_heads` read-out heads (C) over `n_kv_heads` groups, each with its own
/// B, x, Δ, decay and gate. Shapes: [`crate::SsmDims::param_shapes`].
#[derive(Debug, Clone, PartialEq)]
pub struct SsmParams<M, V = M> {
    /// (n_heads · N, d_model)
    pub wc: M,
    /// (n_kv_heads · N, d_model)
    pub wb: M,
    /// (kv_dim, d_model)
    pub wx: M,
    /// (n_kv_heads, d_model): step size Δ before its bias and softplus.
    pub wdt: M,
    /// (n_kv_heads, d_model): output gate before `2σ`.
    pub wgate: M,
    /// (d_model, q_dim)
    pub wo: M,
    /// (n_kv_heads)
    pub dt_bias: V,
    /// (n_kv_heads): decay rates `A = exp(a_log)`, so that the decay is `exp(−Δ·A)`.
    pub a_log: V,
    /// (n_heads): skip weights.
    pub d: V,
    /// (channels, d_conv): causal depthwise convolution over the C, B and x channels, in
    /// that order; tap `d_conv − 1` multiplies the current token.
    pub conv: V,
}

impl<T> SsmParams<T, T> {
    /// Field names in the order of [`SsmParams::into_vec`] (checkpoint files use them).
    pub const NAMES: [&'static str; 10] = [
        "wc", "wb", "wx", "wdt", "wgate", "wo", "dt_bias", "a_log", "d", "conv",
    ];

    /// The ten parameters in [`SsmParams::NAMES`] order.
    pub fn into_vec(self) -> Vec<T> {
        vec![
            self.wc,
            self.wb,
            self.wx,
            self.wdt,
            self.wgate,
            self.wo,
            self.dt_bias,
            self.a_log,
            self.d,
            self.conv,
        ]
    }

    /// The parameters from ten values in [`SsmParams::NAMES`] order (`None` for another
    /// count).
    pub fn from_vec(values: Vec<T>) -> Option<Self> {
        let [wc, wb, wx, wdt, wgate, wo, dt_bias, a_log, d, conv]: [T; 10] =
            values.try_into().ok()?;
        Some(SsmParams {
            wc,
            wb,
            wx,
            wdt,
            wgate,
            wo,
            dt_bias,
            a_log,
            d,
            conv,
        })
    }
}

impl<M, V> SsmParams<M, V> {
    /// The matrices and the vectors through their own functions.
    pub fn map_parts<M2, V2, E>(
        &self,
        mut matrix: impl FnMut(&'static str, &M) -> Result<M2, E>,
        mut vector: impl FnMut(&'static str, &V) -> Result<V2, E>,
    ) -> Result<SsmParams<M2, V2>, E> {
        Ok(SsmParams {
            wc: matrix("wc", &self.wc)?,
            wb: matrix("wb", &self.wb)?,
            wx: matrix("wx", &self.wx)?,
            wdt: matrix("wdt", &self.wdt)?,
            wgate: matrix("wgate", &self.wgate)?,
            wo: matrix("wo", &self.wo)?,
            dt_bias: vector("dt_bias", &self.dt_bias)?,
            a_log: vector("a_log", &self.a_log)?,
            d: vector("d", &self.d)?,
            conv: vector("conv", &self.conv)?,
        })
    }
}

/// SSM mixer weights of one hybrid layer as the runtime reads them: matrices as stored
/// (quantized or not), vectors and convolution taps as floats.
pub type Ssm<'a> = SsmParams<Linear<'a>, Vec<f32>>;

/// The token mixer of a layer. Attention keeps a KV cache that grows with the context; the
/// others keep a constant-size state.
// One per layer, built once at load: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Mixer<'a> {
    /// Causal softmax attention over every position.
    Attention(Attention<'a>),
    /// Softmax attention over the first `sink` and the last `window` positions only.
    Window(Attention<'a>),
    /// The selective SSM; with sink + window attention beside it when the model's `window`
    /// is positive (the two outputs add).
    Ssm {
        ssm: Ssm<'a>,
        window: Option<Attention<'a>>,
    },
}

impl<'a> Mixer<'a> {
    /// The attention weights of the layer, full or windowed.
    pub fn attention(&self) -> Option<&Attention<'a>> {
        match self {
            Mixer::Attention(a) | Mixer::Window(a) => Some(a),
            Mixer::Ssm { window, .. } => window.as_ref(),
        }
    }

    fn attention_mut(&mut self) -> Option<&mut Attention<'a>> {
        match self {
            Mixer::Attention(a) | Mixer::Window(a) => Some(a),
            Mixer::Ssm { window, .. } => window.as_mut(),
        }
    }

    /// The SSM of the layer.
    pub fn ssm(&self) -> Option<&Ssm<'a>> {
        match self {
            Mixer::Ssm { ssm, .. } => Some(ssm),
            _ => None,
        }
    }
}

/// Gated feed-forward: `down(act(gate x) * up x)`, `act` SiLU or GELU
/// ([`crate::FfnAct`]).
#[derive(Debug)]
pub struct FeedForward<'a> {
    /// (d_ff, d_model)
    pub gate: Linear<'a>,
    /// (d_ff, d_model)
    pub up: Linear<'a>,
    /// (d_model, d_ff)
    pub down: Linear<'a>,
}

/// Pre-norm residual block: `x += mixer(norm(x)); x += ffn(norm(x))`; with post-norms
/// (Gemma 3) `x += post_norm(mixer(norm(x)))` and likewise for the feed-forward.
#[derive(Debug)]
pub struct DecoderLayer<'a> {
    /// (d_model)
    pub attn_norm: Vec<f32>,
    pub mixer: Mixer<'a>,
    /// (d_model)
    pub attn_post_norm: Option<Vec<f32>>,
    /// (d_model)
    pub ffn_norm: Vec<f32>,
    pub ffn: FeedForward<'a>,
    /// (d_model)
    pub ffn_post_norm: Option<Vec<f32>>,
}

#[derive(Debug)]
pub struct Model<'a> {
    pub config: ModelConfig,
    /// (vocab_size, d_model)
    pub token_embd: Linear<'a>,
    /// (vocab_size, d_model); `None` when the head is tied to `token_embd`.
    pub output: Option<Linear<'a>>,
    /// (d_model)
    pub output_norm: Vec<f32>,
    pub layers: Vec<DecoderLayer<'a>>,
}

impl<'a> Model<'a> {
    /// Binds the weights of `source` (GGUF file or Hugging Face folder). Matrices stay in
    /// the source's memory (its mapped file, or on Linux its copy in huge pages) except where
    /// this CPU's kernels want another layout ([`Linear::interleave_for_cpu`]): those are
    /// copied once and their pages released. Norm and bias vectors are read into floats.
    pub fn load(source: &'a ModelSource) -> Result<Self, ModelError> {
        let file = source.path().display().to_string();
        let config = ModelConfig::from_source(source)?;
        if let ModelSource::Gguf(gguf) = source {
            let version = gguf.get(EFQ_VERSION_KEY).map(|v| v.as_i128());
            if let Some(v) = version {
                if !v.is_some_and(|v| {
                    (*EFQ_VERSIONS_READ.start() as i128..=*EFQ_VERSIONS_READ.end() as i128)
                        .contains(&v)
                }) {
                    return Err(ModelError::Invalid {
                        file,
                        what: format!(
                            "{EFQ_VERSION_KEY} is {v:?}; this EdgeFusion reads EFQ files of versions {} to {}",
                            EFQ_VERSIONS_READ.start(),
                            EFQ_VERSIONS_READ.end()
                        ),
                    });
                }
            }
        }
        let tied = config.tied_embeddings;
        let c = &config;
        let linear = |role: TensorRole, layer: Option<usize>, n_in: usize, n_out: usize| {
            let view = source.tensor(role, layer)?;
            if view.dtype == GgmlType::I8 {
                return Linear::from_efq_view(view, &file, n_in, n_out);
            }
            let mapped = view.data;
            let mut linear = Linear::from_view(view, &file, n_in, n_out)?;
            if linear.interleave_for_cpu() {
                source.release(mapped);
            }
            Ok::<_, ModelError>(linear)
        };
        let vector = |role: TensorRole, layer: Option<usize>, n: usize| {
            vector_from_view(source.tensor(role, layer)?, &file, n)
        };
        let optional_vector = |role: TensorRole, layer: Option<usize>, n: usize| {
            source
                .try_tensor(role, layer)
                .map(|view| vector_from_view(view, &file, n))
                .transpose()
        };

        let token_embd = linear(TensorRole::TokenEmbd, None, c.d_model, c.vocab_size)?;
        let output = if tied {
            None
        } else {
            Some(linear(TensorRole::Output, None, c.d_model, c.vocab_size)?)
        };
        let output_norm = vector(TensorRole::OutputNorm, None, c.d_model)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let l = Some(i);
            let attention = || -> Result<Attention<'a>, ModelError> {
                Ok(Attention {
                    wq: linear(TensorRole::AttnQ, l, c.d_model, c.q_dim())?,
                    wk: linear(TensorRole::AttnK, l, c.d_model, c.kv_dim())?,
                    wv: linear(TensorRole::AttnV, l, c.d_model, c.kv_dim())?,
                    wo: linear(TensorRole::AttnOutput, l, c.q_dim(), c.d_model)?,
                    bq: optional_vector(TensorRole::AttnQBias, l, c.q_dim())?,
                    bk: optional_vector(TensorRole::AttnKBias, l, c.kv_dim())?,
                    bv: optional_vector(TensorRole::AttnVBias, l, c.kv_dim())?,
                    q_norm: c
                        .block
                        .qk_norm
                        .then(|| vector(TensorRole::AttnQNorm, l, c.head_dim))
                        .transpose()?,
                    k_norm: c
                        .block
                        .qk_norm
                        .then(|| vector(TensorRole::AttnKNorm, l, c.head_dim))
                        .transpose()?,
                })
            };
            let mixer = match c.layer_types[i] {
                LayerType::Attention => Mixer::Attention(attention()?),
                LayerType::Window => Mixer::Window(attention().map_err(|e| {
                    window_context(e, &file, i, "a 'window' layer attends over its window")
                })?),
                LayerType::Ssm => {
                    let window = if c.window > 0 {
                        Some(attention().map_err(|e| {
                            window_context(
                                e,
                                &file,
                                i,
                                &format!(
                                    "{WINDOW_KEY} = {} makes SSM layers attend over their window too",
                                    c.window
                                ),
                            )
                        })?)
                    } else {
                        if source.try_tensor(TensorRole::AttnQ, l).is_some() {
                            return Err(ModelError::Invalid {
                                file,
                                what: format!(
                                    "layer {i} is 'ssm' and has attention weights ({}), but {WINDOW_KEY} is 0 (or missing): set the window those weights attend over, or drop them",
                                    TensorRole::AttnQ.gguf_name(l)
                                ),
                            });
                        }
                        None
                    };
                    let shapes = c.ssm_dims().param_shapes();
                    let ssm = shapes.map_parts(
                        |name, &(rows, cols)| linear(ssm_role(name), l, cols, rows),
                        |name, &len| match name {
                            // Stored as a `[d_conv, channels]` matrix.
                            "conv" => {
                                let conv =
                                    linear(TensorRole::SsmConv, l, c.ssm_d_conv, c.ssm_channels())?;
                                let mut taps = vec![0.0f32; len];
                                for (r, row) in taps.chunks_exact_mut(c.ssm_d_conv).enumerate() {
                                    conv.dequantize_row_into(r, row);
                                }
                                Ok(taps)
                            }
                            _ => vector(ssm_role(name), l, len),
                        },
                    )?;
                    Mixer::Ssm { ssm, window }
                }
            };
            let post_norm = |role| {
                c.block
                    .post_norms
                    .then(|| vector(role, l, c.d_model))
                    .transpose()
            };
            layers.push(DecoderLayer {
                attn_norm: vector(TensorRole::AttnNorm, l, c.d_model)?,
                mixer,
                attn_post_norm: post_norm(TensorRole::AttnPostNorm)?,
                ffn_norm: vector(TensorRole::FfnNorm, l, c.d_model)?,
                ffn: FeedForward {
                    gate: linear(TensorRole::FfnGate, l, c.d_model, c.d_ff)?,
                    up: linear(TensorRole::FfnUp, l, c.d_model, c.d_ff)?,
                    down: linear(TensorRole::FfnDown, l, c.d_ff, c.d_model)?,
                },
                ffn_post_norm: post_norm(TensorRole::FfnPostNorm)?,
            });
        }
        Ok(Model {
            config,
            token_embd,
            output,
            output_norm,
            layers,
        })
    }

    /// Turns layer `layer` into `kind` in memory (training and layer choice try layers this
    /// way), keeping its attention weights: `Attention` and `Window` need them (from any
    /// layer that has them), `Ssm` takes `ssm` and keeps them beside it when the config's
    /// `window` is positive. Set [`ModelConfig::window`] and `sink` before, and make sessions
    /// after.
    ///
    /// # Errors
    /// When the layer has no attention weights to attend with, or `Ssm` comes without one.
    pub fn set_layer(
        &mut self,
        layer: usize,
        kind: LayerType,
        ssm: Option<Ssm<'a>>,
    ) -> Result<(), ModelError> {
        let invalid = |what: String| ModelError::Invalid {
            file: "model in memory".into(),
            what,
        };
        let window = self.config.window;
        let Some(slot) = self.layers.get_mut(layer) else {
            return Err(invalid(format!("layer {layer} does not exist")));
        };
        // Every rule first: a refused change leaves the layer as it was.
        let has_attention = slot.mixer.attention().is_some();
        match kind {
            LayerType::Attention | LayerType::Window if !has_attention => {
                return Err(invalid(format!(
                    "layer {layer} has no attention weights left to attend with"
                )))
            }
            LayerType::Window if window == 0 => {
                return Err(invalid(format!(
                    "layer {layer} cannot attend over a window of 0 positions: set the window first"
                )))
            }
            LayerType::Ssm if ssm.is_none() => {
                return Err(invalid(format!(
                    "layer {layer}: an SSM layer needs its SSM"
                )))
            }
            LayerType::Ssm if window > 0 && !has_attention => {
                return Err(invalid(format!(
                    "layer {layer} has no attention weights to attend over its window with"
                )))
            }
            _ => {}
        }
        let old = std::mem::replace(&mut slot.mixer, Mixer::Window(Attention::placeholder()));
        let attention = match old {
            Mixer::Attention(a) | Mixer::Window(a) => Some(a),
            Mixer::Ssm { window, .. } => window,
        };
        slot.mixer = match (kind, ssm) {
            (LayerType::Attention, _) => {
                Mixer::Attention(attention.expect("checked: the layer has attention"))
            }
            (LayerType::Window, _) => {
                Mixer::Window(attention.expect("checked: the layer has attention"))
            }
            (LayerType::Ssm, ssm) => Mixer::Ssm {
                ssm: ssm.expect("checked: an SSM was given"),
                window: if window > 0 { attention } else { None },
            },
        };
        self.config.layer_types[layer] = kind;
        Ok(())
    }

    /// The matrix of `role` in `layer`, to edit in place (`None` if the model has none).
    pub fn linear_mut(
        &mut self,
        role: TensorRole,
        layer: Option<usize>,
    ) -> Option<&mut Linear<'a>> {
        if role == TensorRole::TokenEmbd {
            return Some(&mut self.token_embd);
        }
        if role == TensorRole::Output {
            return self.output.as_mut();
        }
        let l = self.layers.get_mut(layer?)?;
        match role {
            TensorRole::FfnGate => return Some(&mut l.ffn.gate),
            TensorRole::FfnUp => return Some(&mut l.ffn.up),
            TensorRole::FfnDown => return Some(&mut l.ffn.down),
            _ => {}
        }
        if matches!(
            role,
            TensorRole::AttnQ | TensorRole::AttnK | TensorRole::AttnV | TensorRole::AttnOutput
        ) {
            let a = l.mixer.attention_mut()?;
            return Some(match role {
                TensorRole::AttnQ => &mut a.wq,
                TensorRole::AttnK => &mut a.wk,
                TensorRole::AttnV => &mut a.wv,
                _ => &mut a.wo,
            });
        }
        let Mixer::Ssm { ssm: s, .. } = &mut l.mixer else {
            return None;
        };
        match role {
            TensorRole::SsmC => Some(&mut s.wc),
            TensorRole::SsmB => Some(&mut s.wb),
            TensorRole::SsmX => Some(&mut s.wx),
            TensorRole::SsmDt => Some(&mut s.wdt),
            TensorRole::SsmGate => Some(&mut s.wgate),
            TensorRole::SsmOut => Some(&mut s.wo),
            _ => None,
        }
    }

    /// The matrix that maps the final hidden state to logits.
    pub fn head(&self) -> &Linear<'a> {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Bytes of all weights the forward pass reads (the tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let mut total = self.output_norm.len() * 4;
        total += self
            .linears()
            .iter()
            .map(|(_, _, w)| w.bytes().len())
            .sum::<usize>();
        for layer in &self.layers {
            total += (layer.attn_norm.len() + layer.ffn_norm.len()) * 4;
            total += [&layer.attn_post_norm, &layer.ffn_post_norm]
                .iter()
                .map(|n| n.as_ref().map_or(0, |n| n.len() * 4))
                .sum::<usize>();
            if let Some(a) = layer.mixer.attention() {
                total += [&a.bq, &a.bk, &a.bv, &a.q_norm, &a.k_norm]
                    .iter()
                    .map(|b| b.as_ref().map_or(0, |b| b.len() * 4))
                    .sum::<usize>();
            }
            if let Some(s) = layer.mixer.ssm() {
                total += (s.dt_bias.len() + s.a_log.len() + s.d.len() + s.conv.len()) * 4;
            }
        }
        total
    }

    /// Every weight matrix with its tensor role and layer, in file order: the token
    /// embedding, the output head when it is not tied, then per layer q, k, v, o (full or
    /// windowed attention), the SSM's projections, gate, up, down.
    pub fn linears(&self) -> Vec<(TensorRole, Option<usize>, &Linear<'a>)> {
        let mut out = vec![(TensorRole::TokenEmbd, None, &self.token_embd)];
        if let Some(output) = &self.output {
            out.push((TensorRole::Output, None, output));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let l = Some(i);
            if let Some(a) = layer.mixer.attention() {
                out.extend([
                    (TensorRole::AttnQ, l, &a.wq),
                    (TensorRole::AttnK, l, &a.wk),
                    (TensorRole::AttnV, l, &a.wv),
                    (TensorRole::AttnOutput, l, &a.wo),
                ]);
            }
            if let Some(s) = layer.mixer.ssm() {
                out.extend([
                    (TensorRole::SsmC, l, &s.wc),
                    (TensorRole::SsmB, l, &s.wb),
                    (TensorRole::SsmX, l, &s.wx),
                    (TensorRole::SsmDt, l, &s.wdt),
                    (TensorRole::SsmGate, l, &s.wgate),
                    (TensorRole::SsmOut, l, &s.wo),
                ]);
            }
            let ffn = &layer.ffn;
            out.extend([
                (TensorRole::FfnGate, l, &ffn.gate),
                (TensorRole::FfnUp, l, &ffn.up),
                (TensorRole::FfnDown, l, &ffn.down),
            ]);
        }
        out
    }
}
