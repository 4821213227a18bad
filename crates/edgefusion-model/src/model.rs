//! A Llama-family decoder stack with its weights bound to their roles.

use edgefusion_io::names::TensorRole;
use edgefusion_io::ModelSource;
use edgefusion_kernels::GgmlType;

use crate::config::{LayerType, ModelConfig};
use crate::linear::{vector_from_view, Linear};
use crate::ModelError;

/// Metadata key and version of EFQ-quantized GGUF files (written by `edgefusion quantize`).
pub const EFQ_VERSION_KEY: &str = "edgefusion.efq.version";
pub const EFQ_VERSION: u32 = 1;

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
}

/// SSM mixer weights of one hybrid layer (the selective SSM of docs/HYBRID.md). N is
/// `ssm_d_state`; heads are laid out like attention's: `n_heads` read-out heads (C) over
/// `n_kv_heads` groups, each with its own B, x, Δ, decay and gate.
#[derive(Debug)]
pub struct Ssm<'a> {
    /// (n_heads · N, d_model)
    pub wc: Linear<'a>,
    /// (n_kv_heads · N, d_model)
    pub wb: Linear<'a>,
    /// (kv_dim, d_model)
    pub wx: Linear<'a>,
    /// (n_kv_heads, d_model): step size Δ before its bias and softplus.
    pub wdt: Linear<'a>,
    /// (n_kv_heads, d_model): output gate before `2σ`.
    pub wgate: Linear<'a>,
    /// (d_model, q_dim)
    pub wo: Linear<'a>,
    /// (n_kv_heads)
    pub dt_bias: Vec<f32>,
    /// (n_kv_heads): decay rates `A = exp(a_log)`, so that the decay is `exp(−Δ·A)`.
    pub a: Vec<f32>,
    /// (n_heads): skip weights.
    pub d: Vec<f32>,
    /// (channels, d_conv): causal depthwise convolution over the C, B and x channels, in
    /// that order; tap `d_conv − 1` multiplies the current token.
    pub conv: Vec<f32>,
}

/// The token mixer of a layer. Attention keeps a KV cache; an SSM keeps a constant-size
/// recurrent state.
// One per layer, built once at load: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Mixer<'a> {
    Attention(Attention<'a>),
    Ssm(Ssm<'a>),
}

/// SwiGLU feed-forward: `down(silu(gate x) * up x)`.
#[derive(Debug)]
pub struct FeedForward<'a> {
    /// (d_ff, d_model)
    pub gate: Linear<'a>,
    /// (d_ff, d_model)
    pub up: Linear<'a>,
    /// (d_model, d_ff)
    pub down: Linear<'a>,
}

/// Pre-norm residual block: `x += mixer(norm(x)); x += ffn(norm(x))`.
#[derive(Debug)]
pub struct DecoderLayer<'a> {
    /// (d_model)
    pub attn_norm: Vec<f32>,
    pub mixer: Mixer<'a>,
    /// (d_model)
    pub ffn_norm: Vec<f32>,
    pub ffn: FeedForward<'a>,
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
    /// Binds the weights of `source` (GGUF file or Hugging Face folder). Matrices stay
    /// memory-mapped except where this CPU's kernels want another layout
    /// ([`Linear::interleave_for_cpu`]): those are copied once and their mapped pages
    /// released. Norm and bias vectors are read into floats.
    pub fn load(source: &'a ModelSource) -> Result<Self, ModelError> {
        let file = source.path().display().to_string();
        let config = ModelConfig::from_source(source)?;
        if let ModelSource::Gguf(gguf) = source {
            let version = gguf.get(EFQ_VERSION_KEY).map(|v| v.as_i128());
            if let Some(v) = version {
                if v != Some(EFQ_VERSION as i128) {
                    return Err(ModelError::Invalid {
                        file,
                        what: format!(
                            "{EFQ_VERSION_KEY} is {v:?}; this EdgeFusion reads EFQ files of version {EFQ_VERSION}"
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
            let mixer = match c.layer_types[i] {
                LayerType::Attention => Mixer::Attention(Attention {
                    wq: linear(TensorRole::AttnQ, l, c.d_model, c.q_dim())?,
                    wk: linear(TensorRole::AttnK, l, c.d_model, c.kv_dim())?,
                    wv: linear(TensorRole::AttnV, l, c.d_model, c.kv_dim())?,
                    wo: linear(TensorRole::AttnOutput, l, c.q_dim(), c.d_model)?,
                    bq: optional_vector(TensorRole::AttnQBias, l, c.q_dim())?,
                    bk: optional_vector(TensorRole::AttnKBias, l, c.kv_dim())?,
                    bv: optional_vector(TensorRole::AttnVBias, l, c.kv_dim())?,
                }),
                LayerType::Ssm => {
                    let (n, groups) = (c.ssm_d_state, c.n_kv_heads);
                    let conv = linear(TensorRole::SsmConv, l, c.ssm_d_conv, c.ssm_channels())?;
                    let mut taps = vec![0.0f32; c.ssm_channels() * c.ssm_d_conv];
                    for (r, row) in taps.chunks_exact_mut(c.ssm_d_conv).enumerate() {
                        conv.dequantize_row_into(r, row);
                    }
                    let a = vector(TensorRole::SsmALog, l, groups)?
                        .iter()
                        .map(|v| v.exp())
                        .collect();
                    Mixer::Ssm(Ssm {
                        wc: linear(TensorRole::SsmC, l, c.d_model, c.n_heads * n)?,
                        wb: linear(TensorRole::SsmB, l, c.d_model, groups * n)?,
                        wx: linear(TensorRole::SsmX, l, c.d_model, c.kv_dim())?,
                        wdt: linear(TensorRole::SsmDt, l, c.d_model, groups)?,
                        wgate: linear(TensorRole::SsmGate, l, c.d_model, groups)?,
                        wo: linear(TensorRole::SsmOut, l, c.q_dim(), c.d_model)?,
                        dt_bias: vector(TensorRole::SsmDtBias, l, groups)?,
                        a,
                        d: vector(TensorRole::SsmD, l, c.n_heads)?,
                        conv: taps,
                    })
                }
            };
            layers.push(DecoderLayer {
                attn_norm: vector(TensorRole::AttnNorm, l, c.d_model)?,
                mixer,
                ffn_norm: vector(TensorRole::FfnNorm, l, c.d_model)?,
                ffn: FeedForward {
                    gate: linear(TensorRole::FfnGate, l, c.d_model, c.d_ff)?,
                    up: linear(TensorRole::FfnUp, l, c.d_model, c.d_ff)?,
                    down: linear(TensorRole::FfnDown, l, c.d_ff, c.d_model)?,
                },
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
        match (&mut l.mixer, role) {
            (Mixer::Attention(a), TensorRole::AttnQ) => Some(&mut a.wq),
            (Mixer::Attention(a), TensorRole::AttnK) => Some(&mut a.wk),
            (Mixer::Attention(a), TensorRole::AttnV) => Some(&mut a.wv),
            (Mixer::Attention(a), TensorRole::AttnOutput) => Some(&mut a.wo),
            (Mixer::Ssm(s), TensorRole::SsmC) => Some(&mut s.wc),
            (Mixer::Ssm(s), TensorRole::SsmB) => Some(&mut s.wb),
            (Mixer::Ssm(s), TensorRole::SsmX) => Some(&mut s.wx),
            (Mixer::Ssm(s), TensorRole::SsmDt) => Some(&mut s.wdt),
            (Mixer::Ssm(s), TensorRole::SsmGate) => Some(&mut s.wgate),
            (Mixer::Ssm(s), TensorRole::SsmOut) => Some(&mut s.wo),
            (_, TensorRole::FfnGate) => Some(&mut l.ffn.gate),
            (_, TensorRole::FfnUp) => Some(&mut l.ffn.up),
            (_, TensorRole::FfnDown) => Some(&mut l.ffn.down),
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
            match &layer.mixer {
                Mixer::Attention(a) => {
                    total += [&a.bq, &a.bk, &a.bv]
                        .iter()
                        .map(|b| b.as_ref().map_or(0, |b| b.len() * 4))
                        .sum::<usize>();
                }
                Mixer::Ssm(s) => {
                    total += (s.dt_bias.len() + s.a.len() + s.d.len() + s.conv.len()) * 4;
                }
            }
        }
        total
    }

    /// Every weight matrix with its tensor role and layer, in file order: the token
    /// embedding, the output head when it is not tied, then per layer q, k, v, o, gate, up,
    /// down.
    pub fn linears(&self) -> Vec<(TensorRole, Option<usize>, &Linear<'a>)> {
        let mut out = vec![(TensorRole::TokenEmbd, None, &self.token_embd)];
        if let Some(output) = &self.output {
            out.push((TensorRole::Output, None, output));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let l = Some(i);
            match &layer.mixer {
                Mixer::Attention(a) => out.extend([
                    (TensorRole::AttnQ, l, &a.wq),
                    (TensorRole::AttnK, l, &a.wk),
                    (TensorRole::AttnV, l, &a.wv),
                    (TensorRole::AttnOutput, l, &a.wo),
                ]),
                Mixer::Ssm(s) => out.extend([
                    (TensorRole::SsmC, l, &s.wc),
                    (TensorRole::SsmB, l, &s.wb),
                    (TensorRole::SsmX, l, &s.wx),
                    (TensorRole::SsmDt, l, &s.wdt),
                    (TensorRole::SsmGate, l, &s.wgate),
                    (TensorRole::SsmOut, l, &s.wo),
                ]),
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
