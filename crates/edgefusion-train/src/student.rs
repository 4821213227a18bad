//! The routed student on candle for stage 3: every layer carries its attention block and
//! its SSM side by side, mixed by a learned gate `g = σ(a/τ)`:
//! `x ← x + g·SSM(norm x) + (1 − g)·Attn(norm x)`, then the feed-forward block.
//!
//! The dense weights are constants (frozen base, the default) or, after
//! [`Student::unfreeze_base`], variables too (full fine-tuning); the SSMs and the gate
//! logits are always variables. A layer can also be pinned to one branch (hardened), which
//! is how the hybrid is evaluated once the gates have chosen.

use candle_core::{Device, IndexOp, Result, Tensor, Var};
use edgefusion_io::names::TensorRole;
use edgefusion_model::{LayerType, Linear, Mixer, Model, ModelConfig, RopeStyle};

use crate::attention::span_attention;
use crate::distill::{tensors_of, to_vars};
use crate::frozen::frozen_linear;
use crate::init::{SsmWeights, TunedTensor};
use crate::lora::LoraAdapter;
use crate::ssm::{forward_chunked, SsmDims};

/// One layer of the student.
#[derive(Debug)]
pub struct StudentLayer {
    /// (d)
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
    /// (q_dim, d), (kv_dim, d), (kv_dim, d), (d, q_dim)
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    /// (d_ff, d), (d_ff, d), (d, d_ff)
    pub ffn_gate: Tensor,
    pub ffn_up: Tensor,
    pub ffn_down: Tensor,
    /// The SSM's variables, in [`to_vars`] order.
    pub ssm: Vec<Var>,
    /// (1): the gate's logit `a`; `σ(a/τ)` is the SSM's share.
    pub gate_logit: Var,
    /// Low-rank adapters on `ffn_gate`, `ffn_up`, `ffn_down` (in that order), after
    /// [`Student::add_ffn_lora`].
    pub ffn_lora: Option<[LoraAdapter; 3]>,
}

/// How a layer mixes its two branches in a forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    /// `g·SSM + (1 − g)·Attn` with `g = σ(a/τ)`.
    Soft { tau: f64 },
    /// Only the branch of each layer's type.
    Hard,
    /// Attention everywhere except the given layer, on SSM (`None`: attention everywhere,
    /// the dense model): what converting one layer alone costs.
    AttentionExcept(Option<usize>),
}

/// The routed student.
#[derive(Debug)]
pub struct Student {
    pub cfg: ModelConfig,
    pub dims: SsmDims,
    /// (vocab, d)
    pub embd: Tensor,
    /// (vocab, d): the output head (the embedding when tied).
    pub head: Tensor,
    /// (d)
    pub out_norm: Tensor,
    pub layers: Vec<StudentLayer>,
    /// Branch of each layer for [`Route::Hard`].
    pub layer_types: Vec<LayerType>,
    /// The base weights as variables, by GGUF name, after [`Student::unfreeze_base`] (full
    /// fine-tuning); empty while the base is frozen.
    pub base: Vec<(String, Var)>,
    /// The output head is the embedding.
    tied: bool,
    /// (max_len, rope_dim / 2)
    cos: Tensor,
    sin: Tensor,
}

fn matrix(w: &Linear<'_>, device: &Device) -> Result<Tensor> {
    let mut out = vec![0.0f32; w.n_out * w.n_in];
    for (r, row) in out.chunks_mut(w.n_in).enumerate() {
        w.dequantize_row_into(r, row);
    }
    Tensor::from_vec(out, (w.n_out, w.n_in), device)
}

fn vector(v: &[f32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(v, v.len(), device)
}

impl Student {
    /// The dense `model` (attention everywhere) with the SSMs `ssms` (one per layer) and
    /// every gate logit at `gate_init`. `cfg` carries the SSM sizes; `max_len` bounds the
    /// sequence length.
    pub fn new(
        model: &Model<'_>,
        cfg: &ModelConfig,
        ssms: &[SsmWeights],
        gate_init: f32,
        max_len: usize,
    ) -> Result<Self> {
        let dev = crate::device().clone();
        let dims = cfg.ssm_dims();
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, layer) in model.layers.iter().enumerate() {
            let Mixer::Attention(a) = &layer.mixer else {
                candle_core::bail!("layer {l} of the base model is not attention")
            };
            layers.push(StudentLayer {
                attn_norm: vector(&layer.attn_norm, &dev)?,
                ffn_norm: vector(&layer.ffn_norm, &dev)?,
                wq: matrix(&a.wq, &dev)?,
                wk: matrix(&a.wk, &dev)?,
                wv: matrix(&a.wv, &dev)?,
                wo: matrix(&a.wo, &dev)?,
                ffn_gate: matrix(&layer.ffn.gate, &dev)?,
                ffn_up: matrix(&layer.ffn.up, &dev)?,
                ffn_down: matrix(&layer.ffn.down, &dev)?,
                ssm: to_vars(&ssms[l], &dims)?,
                gate_logit: Var::from_slice(&[gate_init], 1, &dev)?,
                ffn_lora: None,
            });
        }
        let embd = matrix(&model.token_embd, &dev)?;
        let head = match &model.output {
            Some(w) => matrix(w, &dev)?,
            None => embd.clone(),
        };
        let half = cfg.rope_dim / 2;
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for pos in 0..max_len {
            for i in 0..half {
                let freq = (cfg.rope_base as f64).powf(-2.0 * i as f64 / cfg.rope_dim as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        if !matches!(cfg.rope_scaling, edgefusion_model::RopeScaling::None) {
            candle_core::bail!("RoPE scaling is not supported in training yet");
        }
        Ok(Self {
            cfg: cfg.clone(),
            dims,
            embd,
            head,
            out_norm: vector(&model.output_norm, &dev)?,
            layers,
            layer_types: vec![LayerType::Attention; model.layers.len()],
            base: Vec::new(),
            tied: model.output.is_none(),
            cos: Tensor::from_vec(cos, (max_len, half), &dev)?,
            sin: Tensor::from_vec(sin, (max_len, half), &dev)?,
        })
    }

    /// Makes every base weight (embedding, norms, attention, feed-forward, head) a variable
    /// for full fine-tuning; [`Student::base`] lists them by GGUF name.
    pub fn unfreeze_base(&mut self) -> Result<()> {
        if !self.base.is_empty() {
            return Ok(());
        }
        let mut vars = Vec::new();
        let mut make = |t: &mut Tensor, name: String| -> Result<()> {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            vars.push((name, var));
            Ok(())
        };
        make(&mut self.embd, TensorRole::TokenEmbd.gguf_name(None))?;
        if self.tied {
            self.head = self.embd.clone();
        } else {
            make(&mut self.head, TensorRole::Output.gguf_name(None))?;
        }
        make(&mut self.out_norm, TensorRole::OutputNorm.gguf_name(None))?;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (role, t) in [
                (TensorRole::AttnNorm, &mut layer.attn_norm),
                (TensorRole::FfnNorm, &mut layer.ffn_norm),
                (TensorRole::AttnQ, &mut layer.wq),
                (TensorRole::AttnK, &mut layer.wk),
                (TensorRole::AttnV, &mut layer.wv),
                (TensorRole::AttnOutput, &mut layer.wo),
                (TensorRole::FfnGate, &mut layer.ffn_gate),
                (TensorRole::FfnUp, &mut layer.ffn_up),
                (TensorRole::FfnDown, &mut layer.ffn_down),
            ] {
                make(t, role.gguf_name(Some(l)))?;
            }
        }
        self.base = vars;
        Ok(())
    }

    /// The base variables' current values by GGUF name, with their GGUF shapes (the
    /// tensor's dimensions reversed): what hardening writes in place of the base weights.
    pub fn tuned_base(&self) -> Result<Vec<TunedTensor>> {
        self.base
            .iter()
            .map(|(name, var)| TunedTensor::of(name, var.as_tensor()))
            .collect()
    }

    /// The base variables (empty while the base is frozen).
    pub fn base_vars(&self) -> Vec<Var> {
        self.base.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Every trainable variable: the SSMs', then the gate logits.
    pub fn ssm_vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.ssm.iter().cloned())
            .collect()
    }

    pub fn gate_vars(&self) -> Vec<Var> {
        self.layers.iter().map(|l| l.gate_logit.clone()).collect()
    }

    /// The gate logits as floats.
    pub fn gate_logits(&self) -> Result<Vec<f32>> {
        self.layers
            .iter()
            .map(|l| l.gate_logit.as_tensor().i(0)?.to_scalar::<f32>())
            .collect()
    }

    /// `x·wᵀ` by a base weight: without its gradient while the base is frozen.
    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.base.is_empty() {
            frozen_linear(x, w)
        } else {
            x.matmul(&w.t()?)
        }
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(1)?;
        x.broadcast_div(&(ms + self.cfg.rms_eps as f64)?.sqrt()?)?
            .broadcast_mul(w)
    }

    /// RoPE on `x (T, heads, head_dim)` at positions 0..T.
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        let (t, heads, p) = x.dims3()?;
        let half = self.cfg.rope_dim / 2;
        let cos = self.cos.narrow(0, 0, t)?.reshape((t, 1, half))?;
        let sin = self.sin.narrow(0, 0, t)?.reshape((t, 1, half))?;
        let rot = |x0: &Tensor, x1: &Tensor| -> Result<(Tensor, Tensor)> {
            let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Ok((r0, r1))
        };
        let rotated = match self.cfg.rope_style {
            RopeStyle::Normal => {
                let pairs = x.narrow(2, 0, 2 * half)?.reshape((t, heads, half, 2))?;
                let (x0, x1) = (pairs.i((.., .., .., 0))?, pairs.i((.., .., .., 1))?);
                let (r0, r1) = rot(&x0, &x1)?;
                Tensor::stack(&[r0, r1], 3)?.reshape((t, heads, 2 * half))?
            }
            RopeStyle::NeoX => {
                let (x0, x1) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
                let (r0, r1) = rot(&x0, &x1)?;
                Tensor::cat(&[r0, r1], 2)?
            }
        };
        if 2 * half == p {
            Ok(rotated)
        } else {
            Tensor::cat(&[rotated, x.narrow(2, 2 * half, p - 2 * half)?], 2)
        }
    }

    /// Causal grouped-query attention of `h (T, d)` → (T, d); with a `window` > 0, position
    /// `t` sees only the first `cfg.sink` positions and the last `window` (itself included),
    /// as the runtime's windowed layers do; with 0, every earlier position.
    fn attention(&self, layer: &StudentLayer, h: &Tensor, window: usize) -> Result<Tensor> {
        let (t, _) = h.dims2()?;
        let cfg = &self.cfg;
        let (nh, ng, p) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let q = self.rope(&self.linear(h, &layer.wq)?.reshape((t, nh, p))?)?;
        let k = self.rope(&self.linear(h, &layer.wk)?.reshape((t, ng, p))?)?;
        let v = self.linear(h, &layer.wv)?.reshape((t, ng, p))?;
        let sink = if window > 0 { cfg.sink } else { 0 };
        let out = span_attention(&q, &k, &v, window, sink)?.reshape((t, nh * p))?;
        self.linear(&out, &layer.wo)
    }

    fn ffn(&self, layer: &StudentLayer, h: &Tensor) -> Result<Tensor> {
        let linear = |w: &Tensor, i: usize, x: &Tensor| match &layer.ffn_lora {
            Some(adapters) => adapters[i].forward(w, x),
            None => self.linear(x, w),
        };
        let gate = linear(&layer.ffn_gate, 0, h)?.silu()?;
        let up = linear(&layer.ffn_up, 1, h)?;
        linear(&layer.ffn_down, 2, &(gate * up)?)
    }

    /// The converted branch of `layer` on `h (T, d)`: its SSM, plus sink + `window`
    /// attention beside it when the model has a window.
    fn converted(&self, layer: &StudentLayer, h: &Tensor, window: usize) -> Result<Tensor> {
        let ssm = forward_chunked(&tensors_of(&layer.ssm), &self.dims, h, 64)?;
        if self.cfg.window > 0 {
            ssm + self.attention(layer, h, window)?
        } else {
            Ok(ssm)
        }
    }

    /// Puts low-rank adapters of rank `rank` on every layer's feed-forward matrices: `A`
    /// random (seeded by `seed` and the layer), `B` zero, so the student starts as it was.
    pub fn add_ffn_lora(&mut self, rank: usize, alpha: f64, seed: u64) -> Result<()> {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let seed = seed.wrapping_add(3 * l as u64);
            layer.ffn_lora = Some([
                LoraAdapter::new(&layer.ffn_gate, rank, alpha, seed)?,
                LoraAdapter::new(&layer.ffn_up, rank, alpha, seed + 1)?,
                LoraAdapter::new(&layer.ffn_down, rank, alpha, seed + 2)?,
            ]);
        }
        Ok(())
    }

    /// The adapters' variables (empty without [`Student::add_ffn_lora`]).
    pub fn lora_vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.ffn_lora.iter().flatten())
            .flat_map(|a| a.vars())
            .collect()
    }

    /// The feed-forward matrices with their adapters merged, by GGUF name: what the hybrid
    /// is written with after KL fine-tuning.
    pub fn merged_ffn(&self) -> Result<Vec<TunedTensor>> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(adapters) = &layer.ffn_lora else {
                continue;
            };
            for ((role, w), adapter) in [
                (TensorRole::FfnGate, &layer.ffn_gate),
                (TensorRole::FfnUp, &layer.ffn_up),
                (TensorRole::FfnDown, &layer.ffn_down),
            ]
            .into_iter()
            .zip(adapters)
            {
                out.push(TunedTensor::of(
                    &role.gguf_name(Some(l)),
                    &adapter.merged(w)?,
                )?);
            }
        }
        Ok(out)
    }

    /// Logits `(T, vocab)` of one sequence, and each layer's SSM share `g` (1 or 0 when
    /// hard).
    pub fn forward(&self, tokens: &[u32], route: Route) -> Result<(Tensor, Vec<Tensor>)> {
        self.forward_with_window(tokens, route, self.cfg.window)
    }

    /// [`Student::forward`] with the window of the layers whose SSM sits beside it
    /// ([`LayerType::Ssm`]) shrunk to `ssm_window` positions (1..=`cfg.window`): window
    /// dropout, which makes the SSM carry what leaves the window. Window-only layers keep
    /// `cfg.window`.
    pub fn forward_with_window(
        &self,
        tokens: &[u32],
        route: Route,
        ssm_window: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if self.cfg.window > 0 && !(1..=self.cfg.window).contains(&ssm_window) {
            candle_core::bail!(
                "a window of {ssm_window} for converted layers of window {}",
                self.cfg.window
            );
        }
        let dev = self.embd.device();
        let ids = Tensor::from_slice(tokens, tokens.len(), dev)?;
        let mut x = self.embd.index_select(&ids, 0)?;
        let mut shares = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let mixed = match route {
                Route::Soft { tau } => {
                    let g = (layer.gate_logit.as_tensor() / tau)?
                        .neg()?
                        .exp()?
                        .affine(1.0, 1.0)?
                        .recip()?;
                    let ssm = self.converted(layer, &h, ssm_window)?;
                    let attn = self.attention(layer, &h, 0)?;
                    let mixed =
                        (ssm.broadcast_mul(&g)? + attn.broadcast_mul(&g.affine(-1.0, 1.0)?)?)?;
                    shares.push(g);
                    mixed
                }
                Route::Hard | Route::AttentionExcept(_) => {
                    let kind = match route {
                        Route::AttentionExcept(only) if only == Some(l) => LayerType::Ssm,
                        Route::AttentionExcept(_) => LayerType::Attention,
                        _ => self.layer_types[l],
                    };
                    let converted = kind != LayerType::Attention;
                    shares.push(Tensor::new(&[if converted { 1.0f32 } else { 0.0 }], dev)?);
                    match kind {
                        LayerType::Attention => self.attention(layer, &h, 0)?,
                        LayerType::Window => self.attention(layer, &h, self.cfg.window)?,
                        LayerType::Ssm => self.converted(layer, &h, ssm_window)?,
                    }
                }
            };
            x = (x + mixed)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            x = (&x + self.ffn(layer, &h)?)?;
        }
        let h = self.rms_norm(&x, &self.out_norm)?;
        Ok((self.linear(&h, &self.head)?, shares))
    }
}

/// [`crate::choose::tail_kl`] averaged over positions, differentiable in `logits (T,
/// vocab)`: the teacher's log-probabilities `teacher_logp (T, k)` (under its full softmax)
/// at `teacher_idx (T, k)` u32, and the rest of its mass as one more outcome.
pub fn top_k_tail_kl(
    logits: &Tensor,
    teacher_idx: &Tensor,
    teacher_logp: &Tensor,
) -> Result<Tensor> {
    let floor = crate::choose::TAIL_FLOOR;
    let max = logits.max_keepdim(1)?;
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let log_q = logits.gather(teacher_idx, 1)?.broadcast_sub(&lse)?;
    let p = teacher_logp.exp()?;
    let top = (&p * (teacher_logp - &log_q)?)?.sum_keepdim(1)?;
    let p_tail = p.sum_keepdim(1)?.affine(-1.0, 1.0)?.clamp(floor, 1.0)?;
    let q_tail = log_q
        .exp()?
        .sum_keepdim(1)?
        .affine(-1.0, 1.0)?
        .clamp(floor, 1.0)?;
    let tail = (&p_tail * (p_tail.log()? - q_tail.log()?)?)?;
    (top + tail)?.mean_all()
}

/// Mean entropy in bits of the gates `g` (each a 1-element tensor).
pub fn gate_entropy_bits(shares: &[f32]) -> f64 {
    let h = |g: f64| {
        let g = g.clamp(1e-12, 1.0 - 1e-12);
        -(g * g.log2() + (1.0 - g) * (1.0 - g).log2())
    };
    shares.iter().map(|&g| h(g as f64)).sum::<f64>() / shares.len().max(1) as f64
}
