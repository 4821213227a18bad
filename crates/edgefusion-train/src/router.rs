//! Stage 3: router training. The student mixes attention and SSM in every layer by
//! `g = σ(a/τ)`; the loss is the KL divergence to the teacher's cached top-k distribution
//! plus `λ · Σ(1 − g)`, the L1 norm of the attention gates. τ anneals geometrically from
//! `tau_start` to `tau_end`, which hardens the gates.
//!
//! With a target SSM share, λ is the Lagrange multiplier of the constraint
//! `mean g = target`, set from the KKT condition instead of swept: each step's backward
//! pass gives every layer's marginal cost `c_l = ∂KL/∂g_l` (nats per token for moving the
//! layer toward SSM); the penalty pushes gate `l` toward SSM exactly when `λ > c_l`, so the
//! multiplier that sends the `target` share of layers to SSM lies between the
//! `round(target·n)`-th and the next smallest cost. The costs are averaged over steps
//! (rate `dual_lr`), which makes this dual ascent with a step that knows the scale of the
//! costs: a plain `λ += η·(target − share)` lags the gates, winds up and overshoots in the
//! few dozen steps a CPU affords (measured on SmolLM2: 0.93 SSM share for a 0.68 target).
//!
//! The relaxation alone does not make the gates decide. Near the teacher (every layer on
//! attention) the KL is at its minimum, so a layer's KL grows like `½κ_l g²` and its
//! marginal cost `κ_l g` vanishes as `g → 0`: against the linear pull `λ`, the optimum
//! `g* = λ/κ_l` lies inside (0, 1) for every layer, whatever τ (measured on SmolLM2: mean
//! entropy 0.19 bits after 80 steps and 27 of 30 gates above ½ for a target of 20;
//! halfway, gates resting at 0.02–0.1 and 0.5–0.7 while τ fell). So the second half of
//! training *commits*. As it starts, each layer's switching cost is measured — the KL
//! increase when that layer alone runs its SSM ([`measure_switch_costs`]), the finite
//! difference that the marginal cost only approximates — and the `round(target·n)`
//! cheapest layers become the target `z` (1 for SSM, 0 for attention; with a fixed λ,
//! each gate's nearer end). The gates are pulled toward `z` by `ρ·Σ|g − z|`, ρ ramping
//! from 0 at half the steps to twice the largest `|c_l − λ|` at three quarters: past
//! `ρ > max |c_l − λ|` every gate's pull toward `z` beats its KL, so the gates end at `z`
//! (the hardening itself, reached gradually, with the SSMs trained in the hybrid they will
//! serve), with exactly the target share. On SmolLM2, from the same first 40 of 80 steps,
//! committing to the largest gates ended at PPL 128.2 and to the cheapest measured layers
//! at 120.9 (Moby-Dick, ctx 512, 10 windows).

use candle_core::Tensor;

use crate::optim::{clip_grad_norm, warmup_cosine, AdamW};
use crate::student::{gate_entropy_bits, top_k_tail_kl, Route, Student};
use crate::TrainError;

/// How the router is trained.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Learning rate of the SSMs (0 freezes them).
    pub lr: f64,
    /// Learning rate of the gate logits.
    pub gate_lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub grad_clip: f64,
    pub tau_start: f64,
    pub tau_end: f64,
    /// Target SSM share (dual ascent) or, without it, the fixed `lambda`.
    pub target: Option<f64>,
    pub lambda: f64,
    pub dual_lr: f64,
    pub seed: u64,
}

/// One logged step.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RouterStep {
    pub step: usize,
    pub kl: f64,
    pub loss: f64,
    pub lambda: f64,
    /// Weight ρ of the pull toward the projected gates (0 before the commit phase).
    #[serde(default)]
    pub commit: f64,
    pub tau: f64,
    /// Share of layers whose gate is above ½.
    pub ssm_frac: f64,
    /// Mean gate `g`.
    pub mean_gate: f64,
    pub gate_entropy_bits: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub gates: Vec<f64>,
    /// Each layer's averaged marginal KL cost `∂KL/∂g` (target mode; `None` before the
    /// first estimate).
    pub costs: Vec<Option<f64>>,
    /// Measured at this step (the first of the commit phase): each layer's switching cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_costs: Option<Vec<f64>>,
}

/// The teacher's targets for stage 3 (see `teacher::read_targets`).
#[derive(Debug, Clone)]
pub struct Targets {
    pub tokens: Vec<u32>,
    /// (n_tokens, top_k): the teacher's most probable tokens and their log-probabilities
    /// under its full softmax.
    pub idx: Vec<u32>,
    pub logp: Vec<f32>,
    pub top_k: usize,
    pub seq_len: usize,
}

impl Targets {
    pub fn n_windows(&self) -> usize {
        self.tokens.len() / self.seq_len
    }
}

/// Mutable state of a router run, everything a resume needs besides the student.
#[derive(Debug)]
pub struct RouterState {
    pub step: usize,
    pub lambda: f64,
    /// Running average of each layer's marginal KL cost `∂KL/∂g` (target mode).
    pub costs: Vec<f64>,
    pub rng: u64,
    pub ssm_opt: AdamW,
    pub gate_opt: AdamW,
    /// The base weights' optimizer when they train too (full fine-tuning).
    pub base_opt: Option<AdamW>,
    /// Each layer's measured switching cost (target mode, from the commit phase on): the KL
    /// increase when that layer alone runs its SSM, see [`measure_switch_costs`].
    pub switch_costs: Option<Vec<f64>>,
}

impl RouterState {
    pub fn new(student: &Student, opts: &RouterOptions) -> candle_core::Result<Self> {
        Ok(Self {
            step: 0,
            lambda: if opts.target.is_some() {
                0.0
            } else {
                opts.lambda
            },
            costs: Vec::new(),
            rng: opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            ssm_opt: AdamW::new(student.ssm_vars(), opts.betas, opts.weight_decay)?,
            gate_opt: AdamW::new(student.gate_vars(), opts.betas, 0.0)?,
            base_opt: if student.base.is_empty() {
                None
            } else {
                Some(AdamW::new(
                    student.base_vars(),
                    opts.betas,
                    opts.weight_decay,
                )?)
            },
            switch_costs: None,
        })
    }
}

/// τ at `step` of `steps`.
pub fn tau_at(step: usize, steps: usize, start: f64, end: f64) -> f64 {
    if steps <= 1 {
        return end;
    }
    start * (end / start).powf(step as f64 / (steps - 1) as f64)
}

/// The gates `σ(a/τ)` of the gate logits `a`.
pub fn gates_at(logits: &[f32], tau: f64) -> Vec<f64> {
    logits
        .iter()
        .map(|&a| 1.0 / (1.0 + (-(a as f64) / tau).exp()))
        .collect()
}

/// Ramp of the commit weight at `step` of `steps`: 0 until half the steps, rising linearly
/// to 1 at three quarters, then 1.
pub fn commit_ramp(step: usize, steps: usize) -> f64 {
    let progress = step as f64 / steps.max(1) as f64;
    ((progress - 0.5) / 0.25).clamp(0.0, 1.0)
}

/// Where the commit phase pulls the gates: with a target, 1 for the `round(target·n)`
/// layers with the smallest measured switching costs (see [`measure_switch_costs`]; before
/// they are measured, the largest gates), 0 for the others, ties to the lower layer;
/// without a target, each gate rounded to its nearer end.
pub fn commit_targets(
    gates: &[f64],
    target: Option<f64>,
    switch_costs: Option<&[f64]>,
) -> Vec<f64> {
    let Some(target) = target else {
        return gates
            .iter()
            .map(|&g| if g > 0.5 { 1.0 } else { 0.0 })
            .collect();
    };
    let n = gates.len();
    let k = ((target * n as f64).round() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    match switch_costs {
        Some(c) if c.len() == n => order.sort_by(|&a, &b| c[a].total_cmp(&c[b]).then(a.cmp(&b))),
        _ => order.sort_by(|&a, &b| gates[b].total_cmp(&gates[a]).then(a.cmp(&b))),
    }
    let mut z = vec![0.0; n];
    for &l in &order[..k] {
        z[l] = 1.0;
    }
    z
}

/// Windows of the teacher cache on which switching costs are measured (the last ones).
pub const SWITCH_WINDOWS: usize = 2;

/// Window `w` of the teacher's targets: its tokens, top-k indices and log-probabilities
/// `(L, k)`.
fn window<'t>(
    targets: &'t Targets,
    w: usize,
    dev: &candle_core::Device,
) -> Result<(&'t [u32], Tensor, Tensor), TrainError> {
    let (l, k) = (targets.seq_len, targets.top_k);
    let tokens = &targets.tokens[w * l..(w + 1) * l];
    let idx = Tensor::from_slice(&targets.idx[w * l * k..(w + 1) * l * k], (l, k), dev)?;
    let logp = Tensor::from_slice(&targets.logp[w * l * k..(w + 1) * l * k], (l, k), dev)?;
    Ok((tokens, idx, logp))
}

/// Each layer's switching cost: the KL to the teacher when that layer alone runs its SSM
/// (every other layer on attention), minus the KL of the all-attention student, averaged
/// over the last [`SWITCH_WINDOWS`] windows of the cache. This is the finite difference
/// that the gates' gradient only approximates: near the teacher the marginal cost
/// `∂KL/∂g` vanishes with `g` (see the module comment); committing to the layers it ranks
/// cheapest gave a better SmolLM2 hybrid than committing to the largest gates (PPL 120.9
/// against 128.2). One forward pass per layer and window, without gradients.
pub fn measure_switch_costs(student: &Student, targets: &Targets) -> Result<Vec<f64>, TrainError> {
    let dev = crate::device().clone();
    let n_windows = targets.n_windows();
    let windows: Vec<usize> = (n_windows.saturating_sub(SWITCH_WINDOWS)..n_windows).collect();
    let kl_of = |except: Option<usize>| -> Result<f64, TrainError> {
        let mut sum = 0.0;
        for &w in &windows {
            let (tokens, idx, logp) = window(targets, w, &dev)?;
            let (logits, _) = student.forward(tokens, Route::AttentionExcept(except))?;
            let kl = top_k_tail_kl(&logits.detach(), &idx, &logp)?;
            sum += kl.to_scalar::<f32>()? as f64;
        }
        Ok(sum / windows.len().max(1) as f64)
    };
    let dense = kl_of(None)?;
    (0..student.layers.len())
        .map(|l| Ok(kl_of(Some(l))? - dense))
        .collect()
}

/// The commit weight ρ for this step: the ramp times twice the largest gap between a
/// layer's averaged cost and λ (0 while some layer has no estimate yet).
fn commit_weight(state: &RouterState, opts: &RouterOptions) -> f64 {
    let ramp = commit_ramp(state.step, opts.steps);
    if ramp == 0.0 || state.costs.is_empty() || state.costs.iter().any(|c| !c.is_finite()) {
        return 0.0;
    }
    let gap = state
        .costs
        .iter()
        .map(|c| (c - state.lambda).abs())
        .fold(0.0, f64::max);
    ramp * 2.0 * gap
}

/// Runs one optimizer step (the state advances by one) and returns its record. A step
/// whose loss is not finite changes no weight and is returned with `loss` NaN.
pub fn router_step(
    student: &Student,
    state: &mut RouterState,
    targets: &Targets,
    opts: &RouterOptions,
) -> Result<RouterStep, TrainError> {
    let start = std::time::Instant::now();
    let tau = tau_at(state.step, opts.steps, opts.tau_start, opts.tau_end);
    let l = targets.seq_len;
    let dev = crate::device().clone();
    let batch = opts.batch_size.max(1);
    let lambda = state.lambda;
    // Each layer's weight on its attention gate `1 − g`: λ, plus or minus the commit pull
    // toward the projected gates (see the module comment).
    let commit = commit_weight(state, opts);
    // The commit phase's targets come from measured switching costs, taken once as it
    // starts.
    let mut measured = None;
    if commit > 0.0 && opts.target.is_some() && state.switch_costs.is_none() {
        let costs = measure_switch_costs(student, targets)?;
        state.switch_costs = Some(costs.clone());
        measured = Some(costs);
    }
    let gates_now = gates_at(&student.gate_logits()?, tau);
    let weights: Vec<f64> = commit_targets(&gates_now, opts.target, state.switch_costs.as_deref())
        .iter()
        .map(|z| lambda + commit * (2.0 * z - 1.0))
        .collect();
    let weights_tensor = Tensor::from_vec(
        weights.iter().map(|&w| w as f32).collect::<Vec<_>>(),
        weights.len(),
        &dev,
    )?;
    // Windows are back-propagated one at a time and their gradients summed, so that the
    // graph of one window (not of the batch) is alive at once.
    // SSMs and base first: the clipped ones.
    let clipped: Vec<candle_core::Var> = student
        .ssm_vars()
        .into_iter()
        .chain(student.base_vars())
        .collect();
    let vars: Vec<candle_core::Var> = clipped.iter().cloned().chain(student.gate_vars()).collect();
    let mut summed: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut grads = None;
    let (mut kl_value, mut loss_value) = (0.0f64, 0.0f64);
    let mut gate_values = Vec::new();
    for b in 0..batch {
        state.rng ^= state.rng << 13;
        state.rng ^= state.rng >> 7;
        state.rng ^= state.rng << 17;
        let w = (state.rng % targets.n_windows() as u64) as usize;
        let (tokens, idx, logp) = window(targets, w, &dev)?;
        let (logits, shares) = student.forward(tokens, Route::Soft { tau })?;
        let kl = (top_k_tail_kl(&logits, &idx, &logp)? / batch as f64)?;
        let mut loss = kl.clone();
        if b == 0 {
            // L1 on the attention gates: Σ w_l (1 − g_l), so that λ weighs each layer's
            // choice against that layer's cost in KL (nats per token) whatever the depth.
            // The gates do not depend on the input: counted once per step.
            let gates = Tensor::cat(&shares, 0)?;
            let attention_weight = gates
                .affine(-1.0, 1.0)
                .and_then(|t| t * &weights_tensor)
                .and_then(|t| t.sum_all())?;
            loss = (&loss + attention_weight)?;
            gate_values = gates.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        }
        kl_value += kl.to_scalar::<f32>()? as f64;
        let value = loss.to_scalar::<f32>()? as f64;
        loss_value += value;
        if !value.is_finite() {
            break;
        }
        let window_grads = loss.backward()?;
        for (sum, var) in summed.iter_mut().zip(&vars) {
            if let Some(g) = window_grads.get(var.as_tensor()) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    None => g,
                    Some(acc) => (acc + g)?,
                });
            }
        }
        grads = Some(window_grads);
    }
    let n = gate_values.len() as f64;
    let lr = warmup_cosine(state.step, opts.warmup_steps, opts.steps, opts.lr);
    // The gates keep their full rate after the warmup: they must travel far enough for
    // σ(a/τ) to saturate by the end, which a decayed rate does not allow.
    let gate_lr =
        opts.gate_lr * ((state.step + 1) as f64 / opts.warmup_steps.max(1) as f64).min(1.0);
    if let (true, Some(mut grads)) = (loss_value.is_finite(), grads) {
        for (sum, var) in summed.into_iter().zip(&vars) {
            if let Some(sum) = sum {
                grads.insert(var.as_tensor(), sum);
            }
        }
        update_costs(
            state,
            &grads,
            &gate_values,
            &weights,
            tau,
            opts.dual_lr,
            &student.gate_vars(),
        )?;
        if let Some(target) = opts.target {
            set_multiplier(state, target);
        }
        clip_grad_norm(&mut grads, &clipped, opts.grad_clip)?;
        if opts.lr > 0.0 {
            state.ssm_opt.step(&grads, lr)?;
            if let Some(base_opt) = &mut state.base_opt {
                base_opt.step(&grads, lr)?;
            }
        }
        state.gate_opt.step(&grads, gate_lr)?;
    }
    let mean_gate = gate_values.iter().sum::<f64>() / n;
    state.step += 1;
    let hard = gate_values.iter().filter(|&&g| g > 0.5).count() as f64 / n;
    let as_f32: Vec<f32> = gate_values.iter().map(|&g| g as f32).collect();
    Ok(RouterStep {
        step: state.step,
        kl: kl_value,
        loss: if loss_value.is_finite() {
            loss_value
        } else {
            f64::NAN
        },
        lambda: state.lambda,
        commit,
        tau,
        ssm_frac: hard,
        mean_gate,
        gate_entropy_bits: gate_entropy_bits(&as_f32),
        lr,
        tokens_per_s: (batch * l) as f64 / start.elapsed().as_secs_f64(),
        gates: gate_values,
        costs: state
            .costs
            .iter()
            .map(|c| c.is_finite().then_some(*c))
            .collect(),
        switch_costs: measured,
    })
}

/// Updates each layer's averaged marginal cost from this step's gradients: `grads` hold
/// `∂(KL + Σ w_l (1 − g_l))/∂a_l = (c_l − w_l)·g_l(1 − g_l)/τ`, from which `c_l` is
/// recovered; layers whose gate is saturated (derivative below 1e-6) keep their previous
/// estimate.
fn update_costs(
    state: &mut RouterState,
    grads: &candle_core::backprop::GradStore,
    gates: &[f64],
    weights: &[f64],
    tau: f64,
    rate: f64,
    gate_vars: &[candle_core::Var],
) -> Result<(), TrainError> {
    let n = gates.len();
    if state.costs.len() != n {
        state.costs = vec![f64::NAN; n];
    }
    for (l, var) in gate_vars.iter().enumerate() {
        let Some(grad) = grads.get(var.as_tensor()) else {
            continue;
        };
        let da = grad.flatten_all().and_then(|t| t.to_vec1::<f32>())?[0] as f64;
        let slope = gates[l] * (1.0 - gates[l]) / tau;
        if slope < 1e-6 || !da.is_finite() {
            continue;
        }
        let cost = da / slope + weights[l];
        let old = state.costs[l];
        state.costs[l] = if old.is_finite() {
            (1.0 - rate) * old + rate * cost
        } else {
            cost
        };
    }
    Ok(())
}

/// Sets λ between the `round(target·n)`-th and the next smallest averaged cost (see the
/// module comment), once every layer has an estimate.
fn set_multiplier(state: &mut RouterState, target: f64) {
    let n = state.costs.len();
    let mut known: Vec<f64> = state
        .costs
        .iter()
        .copied()
        .filter(|c| c.is_finite())
        .collect();
    if known.len() < n || n == 0 {
        return;
    }
    known.sort_by(f64::total_cmp);
    let k = ((target * n as f64).round() as usize).min(n);
    state.lambda = match k {
        0 => 0.0,
        k if k == n => known[n - 1].max(0.0) * 1.5 + 1e-3,
        k => (0.5 * (known[k - 1] + known[k])).max(0.0),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_targets_take_the_cheapest_layers_once_measured() {
        let gates = [0.9, 0.2, 0.7, 0.6];
        // Before the costs are measured: the largest gates.
        assert_eq!(
            commit_targets(&gates, Some(0.5), None),
            [1.0, 0.0, 1.0, 0.0]
        );
        // Measured costs override the gates' ranking; ties go to the lower layer.
        let costs = [0.3, 0.01, 0.2, 0.01];
        assert_eq!(
            commit_targets(&gates, Some(0.5), Some(&costs)),
            [0.0, 1.0, 0.0, 1.0]
        );
        assert_eq!(
            commit_targets(&gates, Some(0.25), Some(&[0.1, 0.1, 0.1, 0.1])),
            [1.0, 0.0, 0.0, 0.0]
        );
        // Without a target each gate goes to its nearer end.
        assert_eq!(
            commit_targets(&gates, None, Some(&costs)),
            [1.0, 0.0, 1.0, 1.0]
        );
        assert_eq!(commit_targets(&gates, Some(1.0), None), [1.0; 4]);
    }

    #[test]
    fn the_commit_ramp_starts_at_half_and_is_full_at_three_quarters() {
        assert_eq!(commit_ramp(0, 80), 0.0);
        assert_eq!(commit_ramp(40, 80), 0.0);
        assert!((commit_ramp(50, 80) - 0.5).abs() < 1e-12);
        assert_eq!(commit_ramp(60, 80), 1.0);
        assert_eq!(commit_ramp(79, 80), 1.0);
    }
}
