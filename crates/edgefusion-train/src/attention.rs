//! Causal grouped-query softmax attention as one candle op, forward and backward by hand,
//! over the positions each row may see only: all earlier positions, or with a window the
//! first `sink` and the last `window`. The composite form (scores, mask, softmax, product)
//! materialises `heads × T × T` scores several times over in each direction and touches
//! every masked entry; this one recomputes each row's probabilities over its span (as
//! flash attention does) and runs the rows in parallel. The composite form stays in
//! [`crate::student`]'s tests as the reference.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use edgefusion_kernels::f32ops;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// The positions row `t` sees: `[0, sink_end)` then `[from, t]`.
fn span(t: usize, window: usize, sink: usize) -> (usize, usize) {
    if window == 0 {
        return (0, 0);
    }
    let sink_end = sink.min(t + 1);
    (sink_end, sink_end.max((t + 1).saturating_sub(window)))
}

/// Sizes of one call: `q (T, H, P)`, `k` and `v (T, G, P)`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    t: usize,
    heads: usize,
    groups: usize,
    p: usize,
}

impl Dims {
    fn positions(&self, t: usize, window: usize, sink: usize) -> impl Iterator<Item = usize> {
        let (sink_end, from) = span(t, window, sink);
        (0..sink_end).chain(from..=t)
    }
}

/// The three inputs of one call, contiguous: `q (T, H, P)`, `k` and `v (T, G, P)`.
#[derive(Clone, Copy)]
struct Qkv<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

struct SpanAttention {
    window: usize,
    sink: usize,
    dims: Dims,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("span attention: {what} must be contiguous"),
    }
}

impl SpanAttention {
    /// Row `t`, head `h`: probabilities over the span (into `probs`, in span order) and
    /// the read-out into `out (P)`.
    fn row(&self, x: Qkv<'_>, t: usize, h: usize, probs: &mut Vec<f32>, out: &mut [f32]) {
        let Qkv { q, k, v } = x;
        let Dims {
            heads, groups, p, ..
        } = self.dims;
        let g = h / (heads / groups);
        let scale = 1.0 / (p as f32).sqrt();
        let qr = &q[(t * heads + h) * p..][..p];
        probs.clear();
        for j in self.dims.positions(t, self.window, self.sink) {
            probs.push(f32ops::dot(qr, &k[(j * groups + g) * p..][..p]) * scale);
        }
        let max = f32ops::max(probs);
        let sum = f32ops::exp_sub_max_sum(probs, max) as f32;
        out.fill(0.0);
        for (pr, j) in probs
            .iter_mut()
            .zip(self.dims.positions(t, self.window, self.sink))
        {
            *pr /= sum;
            f32ops::axpy(*pr, &v[(j * groups + g) * p..][..p], out);
        }
    }
}

impl CustomOp3 for SpanAttention {
    fn name(&self) -> &'static str {
        "span-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = Qkv {
            q: slice(s1, l1, "q")?,
            k: slice(s2, l2, "k")?,
            v: slice(s3, l3, "v")?,
        };
        let Dims { t, heads, p, .. } = self.dims;
        let mut out = vec![0.0f32; t * heads * p];
        out.par_chunks_mut(ROWS_PER_TASK * heads * p)
            .enumerate()
            .for_each(|(task, rows)| {
                let mut probs = Vec::with_capacity(t);
                for (r, row) in rows.chunks_exact_mut(heads * p).enumerate() {
                    let pos = task * ROWS_PER_TASK + r;
                    for (h, o) in row.chunks_exact_mut(p).enumerate() {
                        self.row(x, pos, h, &mut probs, o);
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((t, heads, p))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        let (qv, kv, vv, ov, dov) = (flat(q)?, flat(k)?, flat(v)?, flat(res)?, flat(grad)?);
        let x = Qkv {
            q: &qv,
            k: &kv,
            v: &vv,
        };
        let Dims {
            t,
            heads,
            groups,
            p,
        } = self.dims;
        let scale = 1.0 / (p as f32).sqrt();
        let per_group = heads / groups;
        let tasks = t.div_ceil(ROWS_PER_TASK);
        // Each task: dq for its rows, and its own dk, dv over all positions, summed after.
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..tasks)
            .into_par_iter()
            .map(|task| {
                let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(t);
                let mut dq = vec![0.0f32; rows.len() * heads * p];
                let mut dk = vec![0.0f32; t * groups * p];
                let mut dv = vec![0.0f32; t * groups * p];
                let mut probs = Vec::with_capacity(t);
                let mut o = vec![0.0f32; p];
                for pos in rows.clone() {
                    for h in 0..heads {
                        let g = h / per_group;
                        self.row(x, pos, h, &mut probs, &mut o);
                        let at = (pos * heads + h) * p;
                        let (qr, dor) = (&qv[at..at + p], &dov[at..at + p]);
                        let d = f32ops::dot(dor, &ov[at..at + p]);
                        let dqr = &mut dq[((pos - rows.start) * heads + h) * p..][..p];
                        for (&pr, j) in
                            probs
                                .iter()
                                .zip(self.dims.positions(pos, self.window, self.sink))
                        {
                            let kv_at = (j * groups + g) * p;
                            let dp = f32ops::dot(dor, &vv[kv_at..kv_at + p]);
                            let ds = pr * (dp - d) * scale;
                            f32ops::axpy(ds, &kv[kv_at..kv_at + p], dqr);
                            f32ops::axpy(ds, qr, &mut dk[kv_at..kv_at + p]);
                            f32ops::axpy(pr, dor, &mut dv[kv_at..kv_at + p]);
                        }
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        let mut dq = Vec::with_capacity(t * heads * p);
        let mut dk = vec![0.0f32; t * groups * p];
        let mut dv = vec![0.0f32; t * groups * p];
        for (q_part, k_part, v_part) in parts {
            dq.extend_from_slice(&q_part);
            dk.iter_mut().zip(&k_part).for_each(|(a, b)| *a += b);
            dv.iter_mut().zip(&v_part).for_each(|(a, b)| *a += b);
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (t, heads, p), dev)?),
            Some(Tensor::from_vec(dk, (t, groups, p), dev)?),
            Some(Tensor::from_vec(dv, (t, groups, p), dev)?),
        ))
    }
}

/// [`span_attention`] composed of candle ops (scores, additive mask, softmax, product):
/// what runs off the CPU, and the reference the fused op is tested against.
pub fn composite_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
    sink: usize,
) -> Result<Tensor> {
    let (t, nh, p) = q.dims3()?;
    let ng = k.dim(1)?;
    let g = nh / ng;
    // (G, g·T, P) against (G, P, T): heads of a group share their K and V.
    let q = q
        .reshape((t, ng, g, p))?
        .permute((1, 2, 0, 3))?
        .reshape((ng, g * t, p))?;
    let k = k.transpose(0, 1)?.contiguous()?;
    let v = v.transpose(0, 1)?.contiguous()?;
    let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (p as f64).sqrt())?
        .reshape((ng, g, t, t))?;
    let mask = Tensor::from_vec(span_mask(t, window, sink), (t, t), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let max = scores.max_keepdim(3)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(3)?)?;
    probs
        .reshape((ng, g * t, t))?
        .matmul(&v)? // (G, g·T, P)
        .reshape((ng, g, t, p))?
        .permute((2, 0, 1, 3))?
        .reshape((t, nh, p))
}

/// `(t, t)` additive mask: 0 where row `i` may see column `j` (causal; with `window > 0`
/// only the first `sink` columns and the last `window` up to `i`), −∞ elsewhere.
pub fn span_mask(t: usize, window: usize, sink: usize) -> Vec<f32> {
    let mut mask = vec![f32::NEG_INFINITY; t * t];
    for (i, row) in mask.chunks_exact_mut(t).enumerate() {
        for (j, m) in row[..=i].iter_mut().enumerate() {
            if window == 0 || j < sink || j + window > i {
                *m = 0.0;
            }
        }
    }
    mask
}

/// Softmax attention `q (T, H, P)` over `k`, `v (T, G, P)` (heads `h·G/H` share group
/// `g`), scaled by `1/√P`, each row seeing the earlier positions (`window == 0`) or the
/// first `sink` and the last `window` of them: `(T, H, P)`. On the CPU in f32; callers
/// elsewhere use the composite form.
pub fn span_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: usize,
    sink: usize,
) -> Result<Tensor> {
    if !q.device().is_cpu() || q.dtype() != candle_core::DType::F32 {
        return composite_attention(q, k, v, window, sink);
    }
    let (t, heads, p) = q.dims3()?;
    let (tk, groups, pk) = k.dims3()?;
    if tk != t || pk != p || v.dims3()? != (t, groups, p) || groups == 0 || heads % groups != 0 {
        candle_core::bail!(
            "span attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let op = SpanAttention {
        window,
        sink,
        dims: Dims {
            t,
            heads,
            groups,
            p,
        },
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 1.7)
            .collect()
    }

    /// Fused against composite, forward and the three gradients, for causal and windowed
    /// spans, a partial last task of rows and a head dimension that is not a multiple of 8.
    #[test]
    fn fused_matches_composite_forward_and_backward() {
        let dev = Device::Cpu;
        for &(t, heads, groups, p, window, sink) in &[
            (37, 4, 2, 12, 0, 0),
            (37, 4, 2, 12, 5, 2),
            (20, 3, 1, 8, 4, 0),
            (20, 6, 3, 16, 30, 4),
        ] {
            let q = Var::from_vec(values(t * heads * p, 0.1), (t, heads, p), &dev).unwrap();
            let k = Var::from_vec(values(t * groups * p, 1.3), (t, groups, p), &dev).unwrap();
            let v = Var::from_vec(values(t * groups * p, 2.9), (t, groups, p), &dev).unwrap();
            let weights =
                Tensor::from_vec(values(t * heads * p, 4.2), (t, heads, p), &dev).unwrap();
            let fused =
                span_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), window, sink).unwrap();
            let reference =
                composite_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), window, sink)
                    .unwrap();
            assert!(
                max_abs_diff(&fused, &reference) < 1e-5,
                "forward {t} {window} {sink}"
            );
            let g_fused = (fused * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_ref = (reference * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (
                    g_fused.get(x.as_tensor()).unwrap(),
                    g_ref.get(x.as_tensor()).unwrap(),
                );
                assert!(
                    max_abs_diff(a, b) < 1e-4,
                    "d{name} {t} {window} {sink}: {}",
                    max_abs_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn spans_hold_the_sink_and_the_window() {
        let dims = Dims {
            t: 10,
            heads: 1,
            groups: 1,
            p: 1,
        };
        let seen = |t| dims.positions(t, 3, 2).collect::<Vec<_>>();
        assert_eq!(seen(0), vec![0]);
        assert_eq!(seen(3), vec![0, 1, 2, 3]);
        assert_eq!(seen(4), vec![0, 1, 2, 3, 4]);
        assert_eq!(seen(9), vec![0, 1, 7, 8, 9]);
        assert_eq!(dims.positions(4, 0, 0).count(), 5);
        let mask = span_mask(10, 3, 2);
        for t in 0..10 {
            let open: Vec<usize> = (0..10).filter(|&j| mask[t * 10 + j] == 0.0).collect();
            assert_eq!(open, seen(t), "row {t}");
        }
    }
}
