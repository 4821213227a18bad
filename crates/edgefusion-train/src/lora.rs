//! Low-rank adapters (LoRA) on a frozen matrix: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `s = alpha / rank`,
//! `A (rank, n_in)` random and `B (n_out, rank)` zero at the start, so an adapted model
//! begins exactly where it was. What end-to-end KL fine-tuning trains beside the converted
//! layers: a few percent of the feed-forward's parameters, merged into it when written.

use candle_core::{Result, Tensor, Var};

use crate::frozen::frozen_linear;

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// (rank, n_in)
    pub a: Var,
    /// (n_out, rank)
    pub b: Var,
    /// alpha / rank
    pub scale: f64,
}

impl LoraAdapter {
    /// An adapter for `w (n_out, n_in)`; `A` is uniform with variance `1 / n_in` from
    /// `seed`, `B` zero.
    pub fn new(w: &Tensor, rank: usize, alpha: f64, seed: u64) -> Result<Self> {
        let (n_out, n_in) = w.dims2()?;
        if rank == 0 {
            candle_core::bail!("LoRA rank must be at least 1");
        }
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let bound = (3.0 / n_in as f64).sqrt();
        let a: Vec<f32> = (0..rank * n_in)
            .map(|_| {
                // xorshift64*: uniform in [0, 1), then to [−bound, bound)
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let u =
                    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        Ok(Self {
            a: Var::from_vec(a, (rank, n_in), w.device())?,
            b: Var::zeros((n_out, rank), w.dtype(), w.device())?,
            scale: alpha / rank as f64,
        })
    }

    /// `x (T, n_in)` → `(T, n_out)` through the frozen `w (n_out, n_in)` and the adapter.
    pub fn forward(&self, w: &Tensor, x: &Tensor) -> Result<Tensor> {
        let low = x.matmul(&self.a.as_tensor().t()?)?;
        let low = low.matmul(&self.b.as_tensor().t()?)?;
        frozen_linear(x, w)? + (low * self.scale)?
    }

    /// `W + s·B·A`: the adapted matrix, detached.
    pub fn merged(&self, w: &Tensor) -> Result<Tensor> {
        let delta = self.b.as_tensor().matmul(self.a.as_tensor())?;
        (w + (delta * self.scale)?)?.detach().contiguous()
    }

    pub fn vars(&self) -> [Var; 2] {
        [self.a.clone(), self.b.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn starts_as_the_frozen_matrix_and_merges_to_what_it_computes() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec((0..12).map(|i| i as f32 * 0.1).collect(), (3, 4), &dev).unwrap();
        let x =
            Tensor::from_vec((0..8).map(|i| 1.0 - i as f32 * 0.3).collect(), (2, 4), &dev).unwrap();
        let lora = LoraAdapter::new(&w, 2, 4.0, 7).unwrap();
        let plain = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(max_abs_diff(&lora.forward(&w, &x).unwrap(), &plain), 0.0);
        lora.b
            .set(
                &Tensor::from_vec(vec![0.5f32, -1.0, 0.25, 2.0, -0.75, 1.5], (3, 2), &dev).unwrap(),
            )
            .unwrap();
        let adapted = lora.forward(&w, &x).unwrap();
        assert!(max_abs_diff(&adapted, &plain) > 0.1, "B moves the output");
        let merged = x.matmul(&lora.merged(&w).unwrap().t().unwrap()).unwrap();
        assert!(max_abs_diff(&adapted, &merged) < 1e-5);
        assert!(LoraAdapter::new(&w, 0, 1.0, 0).is_err());
    }
}
