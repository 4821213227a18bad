//! The SSM mixer of docs/HYBRID.md on candle tensors, differentiable by candle's autograd:
//! a chunked form for training (Mamba-2's "SSD" decomposition: within a chunk the scan is a
//! masked, decay-weighted attention-like product; across chunks a state is carried) and the
//! token-by-token recurrence it is tested against. The runtime's own f32 scan
//! (`edgefusion_runtime::ssm`) is a third, independent implementation.

use candle_core::{DType, Device, Result, Tensor};

pub use edgefusion_model::SsmDims;

/// An SSM's parameters as candle tensors (shapes as in docs/HYBRID.md, matrices
/// `(out, in)`, the convolution `(channels, d_conv)`).
pub type SsmTensors = edgefusion_model::SsmParams<Tensor>;

/// What the scan reads, computed from the normalized input.
struct Inputs {
    /// (T, H, N)
    c: Tensor,
    /// (T, G, N)
    b: Tensor,
    /// (T, G, P)
    x: Tensor,
    /// (T, G): Δ after bias and softplus
    dt: Tensor,
    /// (T, G): log of the decay, −Δ·A
    log_decay: Tensor,
    /// (T, G): 2σ(gate)
    gate: Tensor,
}

/// `ln(1 + eˣ)` without overflow: `relu(x) + ln(1 + e^−|x|)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

fn inputs(p: &SsmTensors, dims: &SsmDims, h: &Tensor) -> Result<Inputs> {
    let (t, _) = h.dims2()?;
    let (hn, gn) = (dims.n_heads * dims.d_state, dims.n_kv_heads * dims.d_state);
    let k = dims.d_conv;
    // (T, channels)
    let xbc = Tensor::cat(
        &[
            h.matmul(&p.wc.t()?)?,
            h.matmul(&p.wb.t()?)?,
            h.matmul(&p.wx.t()?)?,
        ],
        1,
    )?;
    // Causal depthwise convolution: tap k multiplies the input k − (K − 1) steps back.
    let padded = xbc.pad_with_zeros(0, k - 1, 0)?;
    let mut acc = padded
        .narrow(0, 0, t)?
        .broadcast_mul(&p.conv.narrow(1, 0, 1)?.t()?)?;
    for tap in 1..k {
        acc = (acc
            + padded
                .narrow(0, tap, t)?
                .broadcast_mul(&p.conv.narrow(1, tap, 1)?.t()?)?)?;
    }
    let act = acc.silu()?;
    let c = act
        .narrow(1, 0, hn)?
        .reshape((t, dims.n_heads, dims.d_state))?;
    let b = act
        .narrow(1, hn, gn)?
        .reshape((t, dims.n_kv_heads, dims.d_state))?;
    let x = act
        .narrow(1, hn + gn, dims.n_kv_heads * dims.head_dim)?
        .reshape((t, dims.n_kv_heads, dims.head_dim))?;
    let dt = softplus(&h.matmul(&p.wdt.t()?)?.broadcast_add(&p.dt_bias)?)?;
    let log_decay = dt.broadcast_mul(&p.a_log.exp()?)?.neg()?;
    let gate = ((h.matmul(&p.wgate.t()?)?.neg()?.exp()? + 1.0)?.recip()? * 2.0)?;
    Ok(Inputs {
        c,
        b,
        x,
        dt,
        log_decay,
        gate,
    })
}

/// The mixer by its recurrence, one token at a time (the reference; slow).
///
/// # Shapes
/// `h`: (T, d) normalized input → (T, d).
pub fn forward_recurrent(p: &SsmTensors, dims: &SsmDims, h: &Tensor) -> Result<Tensor> {
    let (t, _) = h.dims2()?;
    let i = inputs(p, dims, h)?;
    let (n, pd, g) = (dims.d_state, dims.head_dim, dims.group());
    let scale = 1.0 / (n as f64).sqrt();
    let mut states: Vec<Tensor> = (0..dims.n_kv_heads)
        .map(|_| Tensor::zeros((n, pd), h.dtype(), h.device()))
        .collect::<Result<_>>()?;
    let mut rows = Vec::with_capacity(t);
    for step in 0..t {
        let mut heads = Vec::with_capacity(dims.n_heads);
        for (j, state) in states.iter_mut().enumerate() {
            let decay = i.log_decay.get(step)?.get(j)?.exp()?;
            let dt = i.dt.get(step)?.get(j)?;
            let b = i.b.get(step)?.get(j)?.reshape((n, 1))?;
            let x = i.x.get(step)?.get(j)?.reshape((1, pd))?;
            *state = (state.broadcast_mul(&decay)? + b.matmul(&x)?.broadcast_mul(&dt)?)?;
            let gate = i.gate.get(step)?.get(j)?;
            for head in j * g..(j + 1) * g {
                let c = i.c.get(step)?.get(head)?.reshape((1, n))?;
                let read = (c.matmul(state)? * scale)?;
                let skip = x.broadcast_mul(&p.d.get(head)?)?;
                heads.push((read + skip)?.broadcast_mul(&gate)?);
            }
        }
        rows.push(Tensor::cat(&heads, 1)?);
    }
    Tensor::cat(&rows, 0)?.matmul(&p.wo.t()?)
}

/// The mixer in chunks of `chunk` tokens: within a chunk, `y = (C Bᵀ ⊙ decay ⊙ causal) (Δ x)`
/// plus the carried state's read-out; the state is carried to the next chunk.
///
/// # Shapes
/// `h`: (T, d) normalized input → (T, d).
pub fn forward_chunked(p: &SsmTensors, dims: &SsmDims, h: &Tensor, chunk: usize) -> Result<Tensor> {
    let (t, _) = h.dims2()?;
    let i = inputs(p, dims, h)?;
    let (n, pd, g, groups) = (dims.d_state, dims.head_dim, dims.group(), dims.n_kv_heads);
    let scale = 1.0 / (n as f64).sqrt();
    let (dtype, device) = (h.dtype(), h.device());
    // (G, N, P)
    let mut state = Tensor::zeros((groups, n, pd), dtype, device)?;
    // (G, g, 1, 1)
    let skip = p.d.reshape((groups, g, 1, 1))?;
    let mut outputs = Vec::new();
    let mut t0 = 0;
    while t0 < t {
        let l = chunk.min(t - t0);
        // (G, g·l, N): heads of a group one after another, each over the chunk's tokens
        let c =
            i.c.narrow(0, t0, l)?
                .reshape((l, groups, g, n))?
                .permute((1, 2, 0, 3))?
                .reshape((groups, g * l, n))?;
        let b = i.b.narrow(0, t0, l)?.transpose(0, 1)?.contiguous()?; // (G, l, N)
        let x = i.x.narrow(0, t0, l)?.transpose(0, 1)?.contiguous()?; // (G, l, P)
        let dt = i.dt.narrow(0, t0, l)?.t()?.contiguous()?; // (G, l)
        let cum = i.log_decay.narrow(0, t0, l)?.t()?.contiguous()?.cumsum(1)?; // (G, l)
                                                                               // decay[t, s] = exp(L_t − L_s) for s ≤ t, else 0: (G, l, l)
        let diff = cum.unsqueeze(2)?.broadcast_sub(&cum.unsqueeze(1)?)?;
        let causal = causal_mask(l, device)?.broadcast_as((groups, l, l))?;
        let minus_inf = Tensor::full(f64::NEG_INFINITY, (groups, l, l), device)?.to_dtype(dtype)?;
        let decay = causal.where_cond(&diff, &minus_inf)?.exp()?;
        // Δ x: (G, l, P)
        let u = x.broadcast_mul(&dt.unsqueeze(2)?)?;
        let scores = c
            .matmul(&b.transpose(1, 2)?.contiguous()?)? // (G, g·l, l)
            .reshape((groups, g, l, l))?
            .broadcast_mul(&decay.unsqueeze(1)?)?
            .reshape((groups, g * l, l))?;
        let intra = (scores.matmul(&u)? * scale)?; // (G, g·l, P)
                                                   // The carried state, decayed to each position: exp(L_t) · c_t S.
        let carried = (c.matmul(&state)? * scale)?
            .reshape((groups, g, l, pd))?
            .broadcast_mul(&cum.exp()?.reshape((groups, 1, l, 1))?)?;
        let y = (intra.reshape((groups, g, l, pd))? + carried)?
            .broadcast_add(&skip.broadcast_mul(&x.unsqueeze(1)?)?)?
            .broadcast_mul(
                &i.gate
                    .narrow(0, t0, l)?
                    .t()?
                    .contiguous()?
                    .reshape((groups, 1, l, 1))?,
            )?;
        // (l, H·P)
        outputs.push(
            y.permute((2, 0, 1, 3))?
                .contiguous()?
                .reshape((l, dims.n_heads * pd))?,
        );
        // S ← exp(L_end) S + Σ_s exp(L_end − L_s) b_s ⊗ (Δ x)_s
        let end = cum.narrow(1, l - 1, 1)?; // (G, 1)
        let weights = end.broadcast_sub(&cum)?.exp()?; // (G, l)
        let weighted_b = b.broadcast_mul(&weights.unsqueeze(2)?)?; // (G, l, N)
        state = (state.broadcast_mul(&end.exp()?.unsqueeze(2)?)?
            + weighted_b.transpose(1, 2)?.contiguous()?.matmul(&u)?)?;
        t0 += l;
    }
    Tensor::cat(&outputs, 0)?.matmul(&p.wo.t()?)
}

/// (l, l) u8: 1 where s ≤ t.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<u8> = (0..l * l).map(|i| u8::from(i % l <= i / l)).collect();
    Tensor::from_vec(mask, (l, l), device)
}

/// Random parameters of `dims` in `dtype` (tests and the `random` initialisation).
pub fn random_tensors(dims: &SsmDims, dtype: DType, device: &Device) -> Result<SsmTensors> {
    let d = dims.d_model as f64;
    let m = |rows: usize, cols: usize, std: f64| {
        Tensor::randn(0.0f64, std, (rows, cols), device)?.to_dtype(dtype)
    };
    let (hn, gn, g) = (
        dims.n_heads * dims.d_state,
        dims.n_kv_heads * dims.d_state,
        dims.n_kv_heads,
    );
    Ok(SsmTensors {
        wc: m(hn, dims.d_model, 1.0 / d.sqrt())?,
        wb: m(gn, dims.d_model, 1.0 / d.sqrt())?,
        wx: m(g * dims.head_dim, dims.d_model, 1.0 / d.sqrt())?,
        wdt: m(g, dims.d_model, 0.3 / d.sqrt())?,
        dt_bias: Tensor::randn(-2.0f64, 0.5, g, device)?.to_dtype(dtype)?,
        a_log: Tensor::randn(0.5f64, 0.5, g, device)?.to_dtype(dtype)?,
        d: Tensor::randn(0.0f64, 0.5, dims.n_heads, device)?.to_dtype(dtype)?,
        wgate: m(g, dims.d_model, 1.0 / d.sqrt())?,
        conv: (Tensor::randn(0.0f64, 0.3, (dims.channels(), dims.d_conv), device)?
            .to_dtype(dtype)?
            .broadcast_add(
                &Tensor::from_vec(
                    (0..dims.d_conv)
                        .map(|k| if k + 1 == dims.d_conv { 1.0f64 } else { 0.0 })
                        .collect::<Vec<_>>(),
                    dims.d_conv,
                    device,
                )?
                .to_dtype(dtype)?,
            ))?,
        wo: m(dims.d_model, dims.n_heads * dims.head_dim, 1.0 / d.sqrt())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    const DIMS: SsmDims = SsmDims {
        d_model: 16,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        d_state: 3,
        d_conv: 4,
    };

    /// The chunked form equals the recurrence for every chunk size, including chunks that
    /// do not divide the length and a single chunk.
    #[test]
    fn chunked_equals_recurrent() {
        let dev = Device::Cpu;
        let p = random_tensors(&DIMS, DType::F64, &dev).unwrap();
        let h = Tensor::randn(0.0f64, 1.0, (13, DIMS.d_model), &dev).unwrap();
        let reference = forward_recurrent(&p, &DIMS, &h).unwrap();
        let scale = reference
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max(1)
            .unwrap();
        let scale = scale.to_vec1::<f64>().unwrap()[0];
        assert!(scale > 1e-3, "outputs too small to compare: {scale}");
        for chunk in [1, 4, 5, 13, 64] {
            let got = forward_chunked(&p, &DIMS, &h, chunk).unwrap();
            let err = max_abs_diff(&got, &reference);
            assert!(err <= 1e-12 * scale.max(1.0), "chunk {chunk}: {err}");
        }
    }

    /// Gradients by autograd through the chunked form equal central finite differences.
    #[test]
    fn chunked_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let p = random_tensors(&DIMS, DType::F64, &dev).unwrap();
        let h = Tensor::randn(0.0f64, 1.0, (9, DIMS.d_model), &dev).unwrap();
        let probe = Tensor::randn(0.0f64, 1.0, (9, DIMS.d_model), &dev).unwrap();
        let loss = |p: &SsmTensors| -> Tensor {
            (forward_chunked(p, &DIMS, &h, 4).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        // Parameters as variables, one at a time.
        type Field = fn(&mut SsmTensors) -> &mut Tensor;
        // All ten: a parameter left out could lose its gradient unnoticed.
        let fields: [(&str, Field); 10] = [
            ("wc", |p| &mut p.wc),
            ("wb", |p| &mut p.wb),
            ("wx", |p| &mut p.wx),
            ("wdt", |p| &mut p.wdt),
            ("dt_bias", |p| &mut p.dt_bias),
            ("a_log", |p| &mut p.a_log),
            ("d", |p| &mut p.d),
            ("wgate", |p| &mut p.wgate),
            ("conv", |p| &mut p.conv),
            ("wo", |p| &mut p.wo),
        ];
        for (name, field) in fields {
            let mut q = p.clone();
            let var = candle_core::Var::from_tensor(field(&mut q)).unwrap();
            *field(&mut q) = var.as_tensor().clone();
            let grads = loss(&q).backward().unwrap();
            let grad = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let grad = grad.to_vec1::<f64>().unwrap();
            let base = field(&mut p.clone())
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let shape = field(&mut p.clone()).shape().clone();
            for index in [0, base.len() / 2, base.len() - 1] {
                let eps = 1e-6;
                let at = |delta: f64| {
                    let mut values = base.clone();
                    values[index] += delta;
                    let mut r = p.clone();
                    *field(&mut r) = Tensor::from_vec(values, shape.clone(), &dev).unwrap();
                    loss(&r).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (numeric - grad[index]).abs();
                assert!(
                    err <= 1e-6 * (1.0 + numeric.abs()),
                    "{name}[{index}]: autograd {} vs finite difference {numeric}",
                    grad[index]
                );
            }
        }
    }
}
