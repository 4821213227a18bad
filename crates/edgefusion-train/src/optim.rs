//! AdamW with decoupled weight decay, global-norm gradient clipping and the warmup + cosine
//! schedule. Ours rather than candle-nn's so that the moments can be checkpointed and a
//! resumed run continues exactly.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// AdamW over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    pub vars: Vec<Var>,
    /// First and second moments, one per variable.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Steps taken (the bias corrections use it).
    pub t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, betas: [f64; 2], weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(zeros).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            beta1: betas[0],
            beta2: betas[1],
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update at learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let bias1 = 1.0 - self.beta1.powi(self.t as i32);
        let bias2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient may carry the graph of the step that made it, which
            // the moments must not keep alive.
            let g = g.detach();
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let step = ((&self.m[i] / bias1)? / ((&self.v[i] / bias2)?.sqrt()? + self.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (step * lr)?)?)?;
        }
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars`; when it exceeds `max_norm` (> 0) every
/// gradient is scaled down to that norm. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sum = 0.0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / norm;
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Learning rate at `step` (0-based): linear warmup over `warmup` steps, then cosine decay
/// to 10% of `peak` at `total`.
pub fn warmup_cosine(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn adamw_minimises_a_quadratic() {
        let target = Tensor::new(&[1.5f32, -2.0, 0.25], &Device::Cpu).unwrap();
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![x.clone()], [0.9, 0.999], 0.0).unwrap();
        for _ in 0..500 {
            let loss = (x.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let mut grads = loss.backward().unwrap();
            clip_grad_norm(&mut grads, &opt.vars.clone(), 1.0).unwrap();
            opt.step(&grads, 0.05).unwrap();
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip([1.5f32, -2.0, 0.25]) {
            assert!((g - w).abs() < 1e-2, "{got:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_bound() {
        let x = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let loss = (x.as_tensor() * x.as_tensor()).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        // gradient 2x = (6, 8): norm 10
        let norm = clip_grad_norm(&mut grads, std::slice::from_ref(&x), 1.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-5);
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        assert!((warmup_cosine(0, 4, 40, 1.0) - 0.25).abs() < 1e-12);
        assert!((warmup_cosine(3, 4, 40, 1.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(40, 4, 40, 1.0) - 0.1).abs() < 1e-12);
        assert!(warmup_cosine(20, 4, 40, 1.0) < 1.0);
    }
}
