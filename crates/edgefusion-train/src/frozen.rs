//! `x·Wᵀ` by a frozen matrix `W`, whose backward pass returns only the gradient of `x`.
//! candle's matmul backward also computes the gradient of its right-hand side even when it
//! is a constant: for a student whose base weights are frozen (the SSM, router and KL
//! stages) that is a third of the backward's work, the output head's (vocab × d) the
//! largest part, thrown away.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};

struct FrozenLinear {
    /// (n_out, n_in)
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = storage.as_slice::<f32>()?;
        let x = match layout.contiguous_offsets() {
            Some((start, end)) => {
                Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)?
            }
            None => {
                let gathered: Vec<f32> = strided_offsets(layout).map(|i| values[i]).collect();
                Tensor::from_vec(gathered, layout.shape(), &Device::Cpu)?
            }
        };
        let y = x.broadcast_matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let (out, _) = y.storage_and_layout();
        match &*out {
            Storage::Cpu(cpu) => Ok((cpu.clone(), shape)),
            _ => candle_core::bail!("frozen-linear: the product left the CPU"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.broadcast_matmul(&self.w)?))
    }
}

/// The storage offsets of `layout`'s elements in row-major order.
fn strided_offsets(layout: &Layout) -> impl Iterator<Item = usize> + '_ {
    let (dims, stride) = (layout.dims(), layout.stride());
    let n = layout.shape().elem_count();
    (0..n).map(move |mut flat| {
        let mut offset = layout.start_offset();
        for (&d, &s) in dims.iter().zip(stride).rev() {
            offset += (flat % d) * s;
            flat /= d;
        }
        offset
    })
}

/// `x (…, n_in) · w (n_out, n_in)ᵀ` → `(…, n_out)`, no gradient for `w` (which must not be
/// a variable). Off the CPU, the plain matmul.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return x.broadcast_matmul(&w.t()?);
    }
    let w = w.detach();
    x.apply_op1(FrozenLinear { w })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::Var;

    #[test]
    fn matches_matmul_forward_and_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(
            (0..15).map(|i| (i as f32 * 0.37).sin()).collect(),
            (5, 3),
            &dev,
        )
        .unwrap();
        let x = Var::from_vec(
            (0..12).map(|i| (i as f32 * 0.71).cos()).collect(),
            (4, 3),
            &dev,
        )
        .unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_linear(x.as_tensor(), &w).unwrap();
        assert!(max_abs_diff(&plain, &frozen) < 1e-6);
        // A loss that weighs each output differently, so the gradient is not uniform.
        let weights =
            Tensor::from_vec((0..20).map(|i| i as f32 - 7.0).collect(), (4, 5), &dev).unwrap();
        let g_plain = (plain * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_frozen = (frozen * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g_plain.get(x.as_tensor()).unwrap(),
            g_frozen.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, b) < 1e-5);
        // A transposed (strided) input takes the gather path.
        let xt = Var::from_vec((0..12).map(|i| i as f32 * 0.1).collect(), (3, 4), &dev).unwrap();
        let strided = xt.as_tensor().t().unwrap();
        let got = frozen_linear(&strided, &w).unwrap();
        assert!(max_abs_diff(&got, &strided.matmul(&w.t().unwrap()).unwrap()) < 1e-6);
    }
}
