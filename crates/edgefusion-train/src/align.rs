//! Stage 2, stage-wise: the converted layers are trained bottom-up, each on the hidden
//! states that the model converted so far produces, so that its SSM learns the inputs it
//! will see rather than the dense model's and errors stop compounding.
//!
//! For converted layer `l`, with `x_s` the student's residual stream entering it (layers
//! below converted) and `x_t` the dense teacher's, `h = norm(x_s)`:
//!
//! ```text
//! target   T = (1 − β) · Attn(h)  +  β · (x_t + Attn_t(norm x_t) − x_s)
//! student  y = Win(h) + SSM(h)        Win: the layer's own softmax over the sink + window
//! SSM fits r = T − Win(h)             (relative MSE; 0 = exact, 1 = no better than Win alone)
//! ```
//!
//! β = 0 is attention transfer on student inputs (each layer reproduces what its dense
//! attention would output for them); β = 1 aligns hidden states (the layer's output
//! stream should match the teacher's, correcting what the layers below got wrong). With no
//! window (`window = 0`), `Win = 0` and the SSM carries the whole mixer.
//!
//! Everything but the SSM's own training runs on the inference engine: the streams move
//! between layers by [`Session::forward_hidden`], and the targets are the read-outs of
//! attention layers observed on the way (`LinearInput::AttentionOutput`).

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::Tensor;
use edgefusion_model::{LayerType, Linear, Model, ModelConfig, Ssm};
use edgefusion_runtime::{LinearInput, Session, SessionOptions};
use serde::{Deserialize, Serialize};

use crate::distill::{distill_layer, DistillOptions};
use crate::init::{dequantized, SsmWeights};
use crate::TrainError;

/// How the stage runs.
#[derive(Debug, Clone)]
pub struct AlignOptions {
    /// Tokens per sequence; the streams hold `n_windows` of them.
    pub seq_len: usize,
    pub n_windows: usize,
    /// β: 0 trains on attention transfer, 1 on hidden-state alignment.
    pub hidden_alignment: f64,
    /// The SSM's training (its `seq_len` is this stage's).
    pub fit: DistillOptions,
    /// Threads of the inference engine that moves the streams.
    pub threads: usize,
}

/// What aligning one layer did (held-out windows).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlignReport {
    pub layer: usize,
    /// `|T − Win|² / |T|²`: the error of the window alone.
    pub window_error: f64,
    /// `|T − Win − SSM|² / |T|²`: the error of the converted layer.
    pub layer_error: f64,
    /// The SSM's relative loss on `r` before and after training.
    pub val_loss_init: f64,
    pub val_loss: f64,
    pub steps: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// What the stage tells the caller as it goes.
#[derive(Debug, Clone)]
pub enum AlignEvent {
    /// The streams reached layer `layer` and its targets are being observed.
    Targets {
        layer: usize,
    },
    /// One optimizer step of layer `layer`'s SSM.
    Step {
        layer: usize,
        step: usize,
        total: usize,
        loss: f64,
    },
    Done(AlignReport),
}

fn numeric(what: impl std::fmt::Display) -> TrainError {
    TrainError::Numeric {
        what: what.to_string(),
    }
}

/// `a (n, k) · wᵀ` for `w (m, k)` row-major: `(n, m)`.
pub fn times_transpose(a: &[f32], w: &[f32], k: usize) -> candle_core::Result<Vec<f32>> {
    let dev = candle_core::Device::Cpu;
    let a = Tensor::from_slice(a, (a.len() / k, k), &dev)?;
    let w = Tensor::from_slice(w, (w.len() / k, k), &dev)?;
    a.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()
}

/// The SSM weights as the runtime reads them (f32 matrices).
pub fn runtime_ssm(cfg: &ModelConfig, w: &SsmWeights) -> Ssm<'static> {
    let dims = cfg.ssm_dims();
    w.map_parts(
        |name, m: &Vec<f32>| {
            let (rows, cols) = dims.matrix_shape(name).expect("a matrix");
            Ok::<_, std::convert::Infallible>(Linear::from_f32(name, cols, rows, m))
        },
        |_, v: &Vec<f32>| Ok(v.clone()),
    )
    .unwrap_or_else(|e| match e {})
}

/// `out = rms_norm(x) · weight` per row of `x (n, d)`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let mean = (row.iter().map(|&v| (v * v) as f64).sum::<f64>() / d as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
    out
}

fn mean_square(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64
}

/// Runs the streams `x (n_windows · seq_len, d)` through `layers` of `model`, window by
/// window from position 0, and returns what the observer saw of layer `observe`'s attention
/// read-out `(n_windows · seq_len, q_dim)` (empty when `None`).
fn run_streams(
    model: &Model<'_>,
    x: &mut [f32],
    layers: std::ops::Range<usize>,
    seq_len: usize,
    observe: Option<usize>,
    threads: usize,
) -> Result<Vec<f32>, TrainError> {
    if layers.is_empty() {
        return Ok(Vec::new());
    }
    let d = model.config.d_model;
    let opts = SessionOptions::new(seq_len, threads.max(1));
    let mut session = Session::new(model, opts).map_err(numeric)?;
    let seen = Rc::new(RefCell::new(Vec::new()));
    if let Some(layer) = observe {
        let sink = seen.clone();
        session.set_observer(Some(Box::new(move |site, rows, _| {
            if site == (LinearInput::AttentionOutput { layer }) {
                sink.borrow_mut().extend_from_slice(rows);
            }
        })));
    }
    for window in x.chunks_mut(seq_len * d) {
        session.reset();
        session
            .forward_hidden(window, layers.clone())
            .map_err(numeric)?;
    }
    session.set_observer(None);
    drop(session);
    Ok(Rc::try_unwrap(seen)
        .map(RefCell::into_inner)
        .unwrap_or_default())
}

/// Converts `layers` (ascending) of `student` — a copy of the dense `teacher` with the
/// window and sink set in its config — into SSM layers one after the other, training each
/// SSM stage-wise on `tokens` of the training text (see the module docs). `init(layer)`
/// gives each SSM's starting weights. Returns each layer's trained SSM and report; the
/// student ends converted.
pub fn align_layers(
    teacher: &Model<'_>,
    student: &mut Model<'_>,
    tokens: &[u32],
    layers: &[usize],
    opts: &AlignOptions,
    init: &dyn Fn(usize) -> SsmWeights,
    events: &mut dyn FnMut(AlignEvent),
) -> Result<Vec<(SsmWeights, AlignReport)>, TrainError> {
    let cfg = teacher.config.clone();
    let (d, q_dim, seq_len) = (cfg.d_model, cfg.q_dim(), opts.seq_len);
    let threads = opts.threads;
    let n_windows = opts.n_windows.min(tokens.len() / seq_len.max(1));
    if n_windows < 2 {
        return Err(TrainError::Config {
            file: "training text".into(),
            what: format!(
                "{} tokens make {n_windows} windows of {seq_len}; alignment needs at least 2",
                tokens.len()
            ),
        });
    }
    if opts.fit.seq_len != seq_len {
        return Err(TrainError::Config {
            file: "alignment options".into(),
            what: format!(
                "the SSM trains on windows of {} tokens but the streams hold windows of {seq_len}: they must be the same",
                opts.fit.seq_len
            ),
        });
    }
    let window = student.config.window;
    let beta = opts.hidden_alignment;
    // The residual streams entering the next layer to convert: student's and teacher's.
    let mut x_student = vec![0.0f32; n_windows * seq_len * d];
    for (row, &tok) in x_student.chunks_mut(d).zip(&tokens[..n_windows * seq_len]) {
        teacher.token_embd.dequantize_row_into(tok as usize, row);
    }
    let mut x_teacher = x_student.clone();
    // Layers each stream has passed: the student's stops at the input of the layer being
    // converted (it runs it converted on the next round), the teacher's goes through it.
    let (mut student_at, mut teacher_at) = (0, 0);
    let mut out = Vec::with_capacity(layers.len());
    for &l in layers {
        let start = std::time::Instant::now();
        // Both streams to the input of layer l.
        run_streams(
            student,
            &mut x_student,
            student_at..l,
            seq_len,
            None,
            threads,
        )?;
        run_streams(
            teacher,
            &mut x_teacher,
            teacher_at..l,
            seq_len,
            None,
            threads,
        )?;
        events(AlignEvent::Targets { layer: l });
        let Some(attention) = teacher.layers[l].mixer.attention() else {
            return Err(TrainError::Config {
                file: cfg.name.clone(),
                what: format!("layer {l} of the base model is not attention"),
            });
        };
        let wo = dequantized(&attention.wo);
        // Attn(h) on the student's stream, by the dense layer.
        let mut scratch = x_student.clone();
        let full = run_streams(teacher, &mut scratch, l..l + 1, seq_len, Some(l), threads)?;
        // Win(h): the student's layer l as a window, for one pass.
        let win = if window > 0 {
            student
                .set_layer(l, LayerType::Window, None)
                .map_err(numeric)?;
            scratch.copy_from_slice(&x_student);
            let win = run_streams(student, &mut scratch, l..l + 1, seq_len, Some(l), threads);
            student
                .set_layer(l, LayerType::Attention, None)
                .map_err(numeric)?;
            win?
        } else {
            vec![0.0; n_windows * seq_len * q_dim]
        };
        drop(scratch);
        // The teacher's own mixer on its stream (β > 0), advancing it past layer l.
        let shift: Vec<f32> = x_teacher
            .iter()
            .zip(&x_student)
            .map(|(t, s)| (beta as f32) * (t - s))
            .collect();
        let teacher_full = run_streams(
            teacher,
            &mut x_teacher,
            l..l + 1,
            seq_len,
            (beta > 0.0).then_some(l),
            threads,
        )?;
        // r = W_o ((1 − β) Attn(h) + β Attn_t − Win(h)) + β (x_t − x_s)
        let readout: Vec<f32> = (0..full.len())
            .map(|i| {
                let t = if beta > 0.0 { teacher_full[i] } else { 0.0 };
                (1.0 - beta as f32) * full[i] + beta as f32 * t - win[i]
            })
            .collect();
        let mut residual = times_transpose(&readout, &wo, q_dim).map_err(numeric)?;
        for (r, s) in residual.iter_mut().zip(&shift) {
            *r += s;
        }
        let win_out = times_transpose(&win, &wo, q_dim).map_err(numeric)?;
        let target: Vec<f32> = residual.iter().zip(&win_out).map(|(r, w)| r + w).collect();
        drop((full, win, teacher_full, readout, shift, win_out));
        let input = rms_norm(&x_student, &teacher.layers[l].attn_norm, cfg.rms_eps);
        // The held-out windows are the last tenth, as distill_layer holds them out.
        let n_val = (n_windows / 10).max(1);
        let val = (n_windows - n_val) * seq_len * d..n_windows * seq_len * d;
        let target_ms = mean_square(&target[val.clone()]).max(1e-30);
        let window_error = mean_square(&residual[val]) / target_ms;
        drop(target);
        let (weights, report) = distill_layer(
            &student.config,
            l,
            &init(l),
            &input,
            &residual,
            &opts.fit,
            &mut |step, total, loss| {
                events(AlignEvent::Step {
                    layer: l,
                    step,
                    total,
                    loss,
                })
            },
        )?;
        // distill_layer's loss is relative to the residual's mean square over all windows.
        let residual_ms = mean_square(&residual);
        let report = AlignReport {
            layer: l,
            window_error,
            layer_error: report.val_loss * residual_ms / target_ms,
            val_loss_init: report.val_loss_init,
            val_loss: report.val_loss,
            steps: report.steps,
            tokens: report.steps * opts.fit.batch_size * seq_len,
            seconds: start.elapsed().as_secs_f64(),
        };
        let converted = runtime_ssm(&student.config, &weights);
        student
            .set_layer(l, LayerType::Ssm, Some(converted))
            .map_err(numeric)?;
        events(AlignEvent::Done(report.clone()));
        out.push((weights, report));
        student_at = l;
        teacher_at = l + 1;
    }
    Ok(out)
}
