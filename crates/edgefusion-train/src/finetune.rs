//! End-to-end KL fine-tuning of a converted model: the student (its converted layers
//! fixed, hard routes) reads windows of the training text and learns to match the dense
//! teacher's next-token distribution, KL(teacher ‖ student) over the teacher's top-k and
//! the tail ([`crate::choose::tail_kl`]), with only small parts trainable: low-rank
//! adapters on the feed-forward blocks (and whatever else the caller passes, e.g. the
//! SSMs). Layer-local fits do not compose over 20 layers
//! (docs/HYBRID.md); this stage corrects what the layers do together, where it shows.

use std::time::Instant;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::choose::TeacherWindows;
use crate::optim::{clip_grad_norm, warmup_cosine, AdamW};
use crate::student::{top_k_tail_kl, Route, Student};
use crate::TrainError;

/// How [`finetune_kl`] trains.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// Optimizer steps, one teacher window each (cycling when there are fewer windows).
    pub steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub grad_clip: f64,
    pub betas: [f64; 2],
    /// The share of steps that shrink the window beside each SSM ([`window_of_step`]).
    pub window_dropout: f64,
    /// Seeds the steps' window draws.
    pub seed: u64,
}

/// The window beside each SSM at `step`: `window` on most steps; on a `dropout` share of
/// them a length drawn uniformly from 1 to `window − 1`, so that what leaves the short
/// window must come through the SSM (published hybrids otherwise learn to ignore it). The
/// draw depends on `(seed, step)` alone: a resumed run draws what an unbroken one does.
pub fn window_of_step(window: usize, dropout: f64, seed: u64, step: usize) -> usize {
    if window < 2 || dropout <= 0.0 {
        return window;
    }
    // splitmix64 of (seed, step): two independent uniform draws.
    let mut z = seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    };
    let coin = (next() >> 11) as f64 / (1u64 << 53) as f64;
    if coin >= dropout {
        return window;
    }
    1 + (next() % (window as u64 - 1)) as usize
}

/// One step of [`finetune_kl`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneStep {
    pub step: usize,
    /// KL per scored position, nats, before this step's update.
    pub kl: f64,
    /// The window beside each SSM this step ([`window_of_step`]).
    #[serde(default)]
    pub window: usize,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training tokens read per second so far.
    pub tokens_per_s: f64,
}

/// A fresh optimizer over `vars` for [`finetune_kl`] (with no weight decay: the adapters
/// start at zero and the SSMs from attention, and both should move only as the KL asks).
pub fn finetune_optimizer(vars: Vec<Var>, opts: &FinetuneOptions) -> Result<AdamW, TrainError> {
    if vars.is_empty() {
        return Err(TrainError::Numeric {
            what: "KL fine-tuning was given nothing to train".into(),
        });
    }
    AdamW::new(vars, opts.betas, 0.0).map_err(TrainError::from)
}

/// Trains the variables of `opt` (variables of `student`) from step `opt.t` to `opts.steps`
/// by KL to `teacher`, step `s` reading window `s mod n_windows` (so a resumed run reads
/// what an unbroken one would), the student on [`Route::Hard`]. `on_step` sees each step
/// and the optimizer after it (to checkpoint); an error from it stops training.
pub fn finetune_kl(
    student: &Student,
    teacher: &TeacherWindows,
    opt: &mut AdamW,
    opts: &FinetuneOptions,
    on_step: &mut dyn FnMut(&FinetuneStep, &AdamW) -> Result<(), TrainError>,
) -> Result<Vec<FinetuneStep>, TrainError> {
    let dev = student.embd.device().clone();
    let (seq, first, k) = (teacher.seq_len, teacher.first_scored, teacher.top_k);
    let per_window = seq - first;
    let first_step = opt.t;
    let mut history = Vec::with_capacity(opts.steps.saturating_sub(first_step));
    let start = Instant::now();
    for step in first_step..opts.steps {
        let w = step % teacher.n_windows();
        let tokens = &teacher.tokens[w * seq..(w + 1) * seq];
        let rows = w * per_window * k..(w + 1) * per_window * k;
        let ids = Tensor::from_slice(&teacher.top_ids[rows.clone()], (per_window, k), &dev);
        let logp = Tensor::from_slice(&teacher.top_logp[rows], (per_window, k), &dev);
        let window = window_of_step(student.cfg.window, opts.window_dropout, opts.seed, step);
        let (logits, _) = student.forward_with_window(tokens, Route::Hard, window)?;
        let loss = top_k_tail_kl(&logits.narrow(0, first, per_window)?, &ids?, &logp?)?;
        let kl = loss.to_scalar::<f32>()? as f64;
        if !kl.is_finite() {
            return Err(TrainError::Numeric {
                what: format!("KL fine-tuning diverged at step {step} (loss {kl})"),
            });
        }
        let mut grads = loss.backward()?;
        let grad_norm = clip_grad_norm(&mut grads, &opt.vars, opts.grad_clip)?;
        let lr = warmup_cosine(step, opts.warmup_steps, opts.steps, opts.lr);
        opt.step(&grads, lr)?;
        let report = FinetuneStep {
            step,
            kl,
            window,
            lr,
            grad_norm,
            tokens_per_s: ((step + 1 - first_step) * seq) as f64 / start.elapsed().as_secs_f64(),
        };
        on_step(&report, opt)?;
        history.push(report);
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::choose::tail_kl;
    use candle_core::Device;

    /// No dropout keeps the window; dropout 1 always shrinks it, to every length below it;
    /// a share in between shrinks about that share of steps; the seed changes the draws.
    #[test]
    fn window_of_step_shrinks_the_asked_share_of_steps() {
        assert!((0..100).all(|s| window_of_step(64, 0.0, 1, s) == 64));
        assert!((0..100).all(|s| window_of_step(1, 1.0, 1, s) == 1));
        let all: Vec<usize> = (0..2000).map(|s| window_of_step(8, 1.0, 1, s)).collect();
        assert!(all.iter().all(|w| (1..8).contains(w)));
        assert!((1..8).all(|w| all.contains(&w)));
        let shrunk = (0..4000)
            .filter(|&s| window_of_step(64, 0.25, 3, s) < 64)
            .count();
        assert!((900..1100).contains(&shrunk), "{shrunk} of 4000 at 0.25");
        let other_seed =
            (0..64).filter(|&s| window_of_step(64, 0.5, 9, s) != window_of_step(64, 0.5, 10, s));
        assert!(other_seed.count() > 10, "the seed changes the draws");
    }
    fn log_softmax(z: &[f32]) -> Vec<f64> {
        let max = z.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
        let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        z.iter().map(|&v| v as f64 - lse).collect()
    }

    /// The candle loss against the f64 one; 0 for the teacher itself; the exact KL when the
    /// top k is the whole vocabulary; and the tail counts: a student that puts the tail's
    /// mass on the top k scores worse than one that keeps it.
    #[test]
    fn tail_kl_in_candle_and_in_f64_agree_and_keep_the_tail() {
        let vocab = 12;
        let teacher: Vec<f32> = (0..vocab)
            .map(|i| ((i * 7 % 5) as f32) * 0.6 - 1.0)
            .collect();
        let student: Vec<f32> = (0..vocab)
            .map(|i| ((i * 3 % 7) as f32) * 0.4 - 0.5)
            .collect();
        let (lp, lq) = (log_softmax(&teacher), log_softmax(&student));
        let mut ids: Vec<u32> = (0..vocab as u32).collect();
        ids.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
        for k in [4, vocab] {
            let top: Vec<u32> = ids[..k].to_vec();
            let top_lp: Vec<f32> = top.iter().map(|&i| lp[i as usize] as f32).collect();
            let top_lq: Vec<f64> = top.iter().map(|&i| lq[i as usize]).collect();
            let want = tail_kl(&top_lp, &top_lq);
            let dev = Device::Cpu;
            let logits = Tensor::from_slice(&student, (1, vocab), &dev).unwrap();
            let idx = Tensor::from_slice(&top, (1, k), &dev).unwrap();
            let logp = Tensor::from_slice(&top_lp, (1, k), &dev).unwrap();
            let got = top_k_tail_kl(&logits, &idx, &logp)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "k {k}: candle {got}, f64 {want}"
            );
            let own: Vec<f64> = top_lp.iter().map(|&v| v as f64).collect();
            assert!(tail_kl(&top_lp, &own).abs() < 1e-6);
            if k == vocab {
                let exact: f64 = lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum();
                assert!((want - exact).abs() < 1e-4, "{want} vs {exact}");
            }
        }
        // The teacher's own top 4 renormalised (no tail) against the teacher itself.
        let top_lp: Vec<f32> = ids[..4].iter().map(|&i| lp[i as usize] as f32).collect();
        let mass: f64 = top_lp.iter().map(|&v| (v as f64).exp()).sum();
        let drained: Vec<f64> = top_lp.iter().map(|&v| v as f64 - mass.ln()).collect();
        let kept: Vec<f64> = top_lp.iter().map(|&v| v as f64).collect();
        assert!(tail_kl(&top_lp, &drained) > tail_kl(&top_lp, &kept) + 0.1);
    }
}
