//! Stage 2: layer-local distillation. Each layer's SSM learns to reproduce that layer's
//! attention output from the same normalized input, read from the teacher cache; layers
//! are independent. The loss is the mean squared error relative to the target's mean
//! square, so layers of different scale read alike (0 is perfect, 1 is as bad as zero).

use candle_core::{Tensor, Var};
use edgefusion_model::ModelConfig;

use crate::init::SsmWeights;
use crate::optim::{clip_grad_norm, warmup_cosine, AdamW};
use crate::ssm::{forward_chunked, SsmDims, SsmTensors};
use crate::TrainError;

/// How one layer is trained.
#[derive(Debug, Clone)]
pub struct DistillOptions {
    pub seq_len: usize,
    /// Windows per optimizer step.
    pub batch_size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub grad_clip: f64,
    /// Tokens per chunk of the chunked scan.
    pub chunk: usize,
    /// Seeds the order of windows.
    pub seed: u64,
}

/// What training one layer did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DistillReport {
    pub layer: usize,
    /// Relative MSE on the held-out windows at initialisation and after training.
    pub val_loss_init: f64,
    pub val_loss: f64,
    pub steps: usize,
    pub seconds: f64,
}

/// Names of the variables of [`to_vars`], in order (files of stage 2).
pub const SSM_TENSOR_NAMES: [&str; 10] = SsmWeights::NAMES;

/// The weights as trainable variables, in [`SSM_TENSOR_NAMES`] order.
pub fn to_vars(w: &SsmWeights, dims: &SsmDims) -> candle_core::Result<Vec<Var>> {
    let dev = crate::device().clone();
    let vars = w.map_parts(
        |name, m: &Vec<f32>| {
            let shape = dims.matrix_shape(name).expect("a matrix");
            Var::from_slice(m, shape, &dev)
        },
        |name, v: &Vec<f32>| match name {
            "conv" => Var::from_slice(v, (dims.channels(), dims.d_conv), &dev),
            _ => Var::from_slice(v, v.len(), &dev),
        },
    )?;
    Ok(vars.into_vec())
}

/// The variables of [`to_vars`] as the tensors the forward pass reads.
pub fn tensors_of(vars: &[Var]) -> SsmTensors {
    SsmTensors::from_vec(vars.iter().map(|v| v.as_tensor().clone()).collect())
        .expect("ten SSM variables")
}

/// The variables of [`to_vars`] back as plain weights.
pub fn from_vars(vars: &[Var]) -> candle_core::Result<SsmWeights> {
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    from_tensors(&tensors)
}

/// Tensors in the order of [`to_vars`] as plain weights.
pub fn from_tensors(tensors: &[Tensor]) -> candle_core::Result<SsmWeights> {
    let values = tensors
        .iter()
        .map(|t| t.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(SsmWeights::from_vec(values).expect("ten SSM tensors"))
}

fn candle_error(layer: usize) -> impl Fn(candle_core::Error) -> TrainError {
    move |e| TrainError::Numeric {
        what: format!("layer {layer}: {e}"),
    }
}

/// Trains the SSM `init` of `layer` to map `input (T, d_model)` (the layer's normalized
/// input) to `target (T, d_model)`, in windows of `opts.seq_len`. The loss is the mean
/// squared error relative to the target's mean square (0 is perfect; 1 is what a zero
/// output scores). The last tenth of the windows (at least one) is held out to measure.
/// `log(step, total, loss)` is called every step.
pub fn distill_layer(
    cfg: &ModelConfig,
    layer: usize,
    init: &SsmWeights,
    input: &[f32],
    target: &[f32],
    opts: &DistillOptions,
    log: &mut dyn FnMut(usize, usize, f64),
) -> Result<(SsmWeights, DistillReport), TrainError> {
    let start = std::time::Instant::now();
    let err = candle_error(layer);
    let dims = cfg.ssm_dims();
    let d = cfg.d_model;
    let l = opts.seq_len;
    let windows = (input.len() / d / l).min(target.len() / d / l);
    if windows < 2 {
        return Err(TrainError::Config {
            file: "teacher cache".into(),
            what: format!("{windows} windows of {l} tokens; distillation needs at least 2"),
        });
    }
    let n_val = (windows / 10).max(1);
    let n_train = windows - n_val;
    let dev = crate::device().clone();
    let x_all =
        Tensor::from_slice(&input[..windows * l * d], (windows * l, d), &dev).map_err(&err)?;
    let target_all =
        Tensor::from_slice(&target[..windows * l * d], (windows * l, d), &dev).map_err(&err)?;
    let mean_square = target_all
        .sqr()
        .and_then(|t| t.mean_all())
        .and_then(|t| t.to_scalar::<f32>())
        .map_err(&err)? as f64;
    let mean_square = mean_square.max(1e-20);
    let vars = to_vars(init, &dims).map_err(&err)?;
    // Relative MSE of one window.
    let window_loss = |vars: &[Var], w: usize| -> candle_core::Result<Tensor> {
        let x = x_all.narrow(0, w * l, l)?;
        let target = target_all.narrow(0, w * l, l)?;
        let y = forward_chunked(&tensors_of(vars), &dims, &x, opts.chunk)?;
        (y - target)?.sqr()?.mean_all()? / mean_square
    };
    let validate = |vars: &[Var]| -> candle_core::Result<f64> {
        let mut sum = 0.0;
        for w in n_train..windows {
            sum += window_loss(vars, w)?.to_scalar::<f32>()? as f64;
        }
        Ok(sum / n_val as f64)
    };
    let val_loss_init = validate(&vars).map_err(&err)?;

    let mut opt = AdamW::new(vars.clone(), opts.betas, opts.weight_decay).map_err(&err)?;
    let batch = opts.batch_size.max(1);
    let steps_per_epoch = n_train.div_ceil(batch);
    let total = steps_per_epoch * opts.epochs.max(1);
    let mut rng = opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (layer as u64 + 1);
    let mut order: Vec<usize> = (0..n_train).collect();
    let mut step = 0;
    for _ in 0..opts.epochs.max(1) {
        // Fisher–Yates with xorshift64.
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for chunk in order.chunks(batch) {
            let mut loss: Option<Tensor> = None;
            for &w in chunk {
                let wl = window_loss(&vars, w).map_err(&err)?;
                loss = Some(match loss {
                    None => wl,
                    Some(acc) => (acc + wl).map_err(&err)?,
                });
            }
            let loss =
                (loss.expect("a chunk is never empty") / chunk.len() as f64).map_err(&err)?;
            let value = loss.to_scalar::<f32>().map_err(&err)? as f64;
            if !value.is_finite() {
                // Skip the step; the weights stay as they were.
                log(step, total, value);
                step += 1;
                continue;
            }
            let mut grads = loss.backward().map_err(&err)?;
            clip_grad_norm(&mut grads, &vars, opts.grad_clip).map_err(&err)?;
            let lr = warmup_cosine(step, opts.warmup_steps, total, opts.lr);
            opt.step(&grads, lr).map_err(&err)?;
            log(step, total, value);
            step += 1;
        }
    }
    let val_loss = validate(&vars).map_err(&err)?;
    // Training that made the held-out loss worse is not kept.
    let trained = if val_loss <= val_loss_init {
        from_vars(&vars).map_err(&err)?
    } else {
        init.clone()
    };
    Ok((
        trained,
        DistillReport {
            layer,
            val_loss_init,
            val_loss: val_loss.min(val_loss_init),
            steps: step,
            seconds: start.elapsed().as_secs_f64(),
        },
    ))
}
