//! Stage-2 distillation generalises: on windows it never trained on, its loss falls.
//!
//! The target is the output of a teacher SSM (the fixture's attention-initialised SSM with
//! its four projections redrawn at random, `ssm_random`), so a perfect student exists and any working optimizer
//! must approach it on fresh inputs too. A learning rate of zero, a sign error, or one so
//! large that training diverges leaves the held-out loss where it started (distill_layer
//! never keeps training that made it worse), and fails here.

mod common;

use candle_core::Tensor;
use edgefusion_io::ModelSource;
use edgefusion_model::{Model, ModelConfig};
use edgefusion_testkit::Rng;
use edgefusion_train::distill::{
    distill_layer, tensors_of, to_vars, DistillOptions, DistillReport,
};
use edgefusion_train::init::{ssm_from_attention, ssm_random, SsmWeights};
use edgefusion_train::ssm::forward_chunked;

use common::fixture;

const SEQ_LEN: usize = 32;

fn options(lr: f64) -> DistillOptions {
    DistillOptions {
        seq_len: SEQ_LEN,
        batch_size: 4,
        epochs: 6,
        lr,
        betas: [0.9, 0.95],
        weight_decay: 0.0,
        warmup_steps: 2,
        grad_clip: 1.0,
        chunk: 8,
        seed: 3,
    }
}

/// `windows` windows of normalized-looking inputs `(windows · SEQ_LEN, d)` and the teacher's
/// outputs on them, window by window (each window starts from a zero state, as in training).
fn data(
    cfg: &ModelConfig,
    teacher: &SsmWeights,
    windows: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let d = cfg.d_model;
    let mut rng = Rng::new(seed);
    // Uniform in ±√3: unit variance, like a normalized hidden state.
    let input: Vec<f32> = rng
        .values(windows * SEQ_LEN * d)
        .iter()
        .map(|v| v * 3f32.sqrt())
        .collect();
    let dims = cfg.ssm_dims();
    let vars = to_vars(teacher, &dims).unwrap();
    let mut target = Vec::with_capacity(input.len());
    for w in input.chunks_exact(SEQ_LEN * d) {
        let x = Tensor::from_slice(w, (SEQ_LEN, d), edgefusion_train::device()).unwrap();
        let y = forward_chunked(&tensors_of(&vars), &dims, &x, 8).unwrap();
        target.extend(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    (input, target)
}

fn setup() -> (ModelConfig, SsmWeights, SsmWeights) {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let model = Model::load(&source).unwrap();
    let mut cfg = model.config.clone();
    cfg.ssm_d_state = 12;
    cfg.ssm_d_conv = 4;
    let a = model.layers[1].mixer.attention().unwrap();
    let student = ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo);
    let teacher = ssm_random(student.clone(), 7);
    (cfg, student, teacher)
}

/// Distils the student towards the teacher over 40 windows (the last 4 held out by
/// `distill_layer`) at learning rate `lr`.
fn distill(lr: f64) -> (SsmWeights, SsmWeights, DistillReport) {
    let (cfg, student, teacher) = setup();
    let (input, target) = data(&cfg, &teacher, 40, 11);
    let (trained, report) = distill_layer(
        &cfg,
        1,
        &student,
        &input,
        &target,
        &options(lr),
        &mut |_, _, _| {},
    )
    .unwrap();
    (student, trained, report)
}

#[test]
fn distillation_lowers_the_loss_on_windows_it_never_saw() {
    let (_, _, report) = distill(3e-3);
    eprintln!(
        "held-out relative MSE {:.4} → {:.4} in {} steps",
        report.val_loss_init, report.val_loss, report.steps
    );
    assert!(report.val_loss_init.is_finite() && report.val_loss_init > 0.1);
    assert!(
        report.val_loss < 0.6 * report.val_loss_init,
        "held-out relative MSE {:.4} → {:.4}: distillation did not generalise",
        report.val_loss_init,
        report.val_loss
    );
}

#[test]
fn a_learning_rate_of_zero_learns_nothing() {
    // The same run with lr = 0 leaves the weights exactly as they were: the rate reaches the
    // optimizer, and the fall measured above is training's.
    let (student, trained, report) = distill(0.0);
    assert_eq!(report.val_loss, report.val_loss_init);
    for ((name, a), b) in SsmWeights::NAMES
        .iter()
        .zip(student.clone().into_vec())
        .zip(trained.into_vec())
    {
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same && a.len() == b.len(), "{name} changed at lr = 0");
    }
}
