//! End-to-end KL fine-tuning on the tiny Llama fixture (2 layers, context 64): the student
//! with windowed layers computes what the runtime computes from the written file, and LoRA
//! on the feed-forward blocks lowers the KL to the dense teacher, in the student and in the
//! file it writes.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model, ModelConfig};
use edgefusion_runtime::{KvType, Logits, Session, SessionOptions};
use edgefusion_train::choose::{kl_to_teacher, teacher_windows_from, TeacherWindows};
use edgefusion_train::finetune::{finetune_kl, finetune_optimizer, FinetuneOptions};
use edgefusion_train::init::{
    hybrid_layout, ssm_from_attention, ssm_random, write_hybrid_tuned, SsmInitSource, SsmWeights,
    TunedTensor,
};
use edgefusion_train::student::{top_k_tail_kl, Route, Student};

use common::{fixture, tokens};
use edgefusion_testkit::max_rel_error;

/// The seed of this file's token stream.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

fn out_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn runtime_logits(model: &Model<'_>, tokens: &[u32]) -> Vec<f32> {
    let opts = SessionOptions {
        max_logits: tokens.len(),
        kv_type: KvType::F32,
        ..SessionOptions::new(64, 1)
    };
    let mut session = Session::new(model, opts).unwrap();
    session.forward(tokens, Logits::From(0)).unwrap().to_vec()
}

fn student_logits(student: &Student, tokens: &[u32]) -> Vec<f32> {
    let (logits, _) = student.forward(tokens, Route::Hard).unwrap();
    logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The dense config with a window of `window` and a sink of `sink`, and each layer's SSM
/// (random, so that every SSM parameter matters).
fn windowed(dense: &Model<'_>, window: usize, sink: usize) -> (ModelConfig, Vec<SsmWeights>) {
    let mut cfg = dense.config.clone();
    cfg.window = window;
    cfg.sink = sink;
    cfg.ssm_d_state = 12;
    cfg.ssm_d_conv = 4;
    let ssms = (0..cfg.n_layers)
        .map(|l| {
            let a = dense.layers[l].mixer.attention().unwrap();
            ssm_random(
                ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo),
                5 + l as u64,
            )
        })
        .collect();
    (cfg, ssms)
}

/// Writes the dense fixture as the hybrid `cfg` with `layer_types`, the SSMs `ssms` and the
/// base tensors `tuned` replaced, to `name`.
fn write(
    dense: &Model<'_>,
    cfg: &ModelConfig,
    layer_types: &[LayerType],
    ssms: &[SsmWeights],
    tuned: &[TunedTensor],
    name: &str,
) -> PathBuf {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        unreachable!()
    };
    let trained: HashMap<usize, SsmWeights> = ssms.iter().cloned().enumerate().collect();
    let hybrid = hybrid_layout(&dense.config, layer_types, 12, 4, cfg.window, cfg.sink);
    let out = out_path(name);
    write_hybrid_tuned(
        gguf,
        dense,
        &hybrid,
        SsmInitSource::Trained(&trained),
        tuned,
        &out,
    )
    .unwrap();
    out
}

#[test]
fn windowed_student_matches_the_runtime() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let dense = Model::load(&source).unwrap();
    let (cfg, ssms) = windowed(&dense, 5, 2);
    let toks = tokens(40, SEED);
    let mut student = Student::new(&dense, &cfg, &ssms, 0.0, 64).unwrap();
    let dense_logits = student_logits(&student, &toks);
    // SSM beside the window, then the window alone.
    student.layer_types = vec![LayerType::Ssm, LayerType::Window];
    let got = student_logits(&student, &toks);
    assert!(
        max_rel_error(&got, &dense_logits) > 1e-2,
        "40 tokens past a window of 5 must change the logits"
    );
    let path = write(
        &dense,
        &cfg,
        &student.layer_types,
        &ssms,
        &[],
        "student-window.gguf",
    );
    let hybrid_source = ModelSource::open(&path).unwrap();
    let hybrid = Model::load(&hybrid_source).unwrap();
    let diff = max_rel_error(&got, &runtime_logits(&hybrid, &toks));
    assert!(diff < 1e-4, "windowed student vs runtime: {diff}");
}

#[test]
fn kl_finetuning_lowers_the_kl_in_the_student_and_in_the_written_file() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let dense = Model::load(&source).unwrap();
    let (cfg, ssms) = windowed(&dense, 4, 1);
    let toks = tokens(8 * 32, SEED);
    // Every position's top-16, the training targets; the KL below reads the same windows.
    let teacher = teacher_windows_from(&dense, &toks, 32, 8, 0, 16, 1, &mut |_, _| {}).unwrap();
    let types = vec![LayerType::Window; 2];
    let mut student = Student::new(&dense, &cfg, &ssms, 0.0, 32).unwrap();
    student.layer_types = types.clone();
    student.add_ffn_lora(4, 4.0, 3).unwrap();
    // B starts at zero: the adapted student is the window-only model.
    let window_path = write(&dense, &cfg, &types, &ssms, &[], "window-only.gguf");
    let window_source = ModelSource::open(&window_path).unwrap();
    let window_only = Model::load(&window_source).unwrap();
    assert!(
        max_rel_error(
            &student_logits(&student, &toks[..32]),
            &runtime_logits(&window_only, &toks[..32])
        ) < 1e-4
    );

    let opts = FinetuneOptions {
        steps: 48,
        lr: 1e-2,
        warmup_steps: 2,
        grad_clip: 1.0,
        betas: [0.9, 0.95],
        window_dropout: 0.0,
        seed: 0,
    };
    let mut opt = finetune_optimizer(student.lora_vars(), &opts).unwrap();
    let history = finetune_kl(&student, &teacher, &mut opt, &opts, &mut |_, _| Ok(())).unwrap();
    assert_eq!(history.len(), 48);
    let mean = |s: &[edgefusion_train::finetune::FinetuneStep]| {
        s.iter().map(|r| r.kl).sum::<f64>() / s.len() as f64
    };
    let (first, last) = (mean(&history[..8]), mean(&history[40..]));
    assert!(
        last < 0.8 * first,
        "KL over the first epoch {first}, the last {last}"
    );

    let tuned = student.merged_ffn().unwrap();
    assert_eq!(tuned.len(), 6, "gate, up and down of both layers");
    let tuned_path = write(&dense, &cfg, &types, &ssms, &tuned, "window-lora.gguf");
    let tuned_source = ModelSource::open(&tuned_path).unwrap();
    let tuned_model = Model::load(&tuned_source).unwrap();
    let diff = max_rel_error(
        &student_logits(&student, &toks[..32]),
        &runtime_logits(&tuned_model, &toks[..32]),
    );
    assert!(diff < 1e-4, "merged adapters vs the student: {diff}");
    let before = kl_to_teacher(&window_only, &teacher, 1).unwrap();
    let after = kl_to_teacher(&tuned_model, &teacher, 1).unwrap();
    assert!(
        after < 0.8 * before,
        "KL of the written files: {before} -> {after}"
    );

    assert!(finetune_optimizer(Vec::new(), &opts).is_err());
}

/// The student's mean KL to `teacher` over its windows with the window beside each SSM at
/// `window` positions.
fn kl_at_window(student: &Student, teacher: &TeacherWindows, window: usize) -> f64 {
    let dev = candle_core::Device::Cpu;
    let (seq, first, k) = (teacher.seq_len, teacher.first_scored, teacher.top_k);
    let per = seq - first;
    let mut sum = 0.0;
    for w in 0..teacher.n_windows() {
        let (logits, _) = student
            .forward_with_window(&teacher.tokens[w * seq..(w + 1) * seq], Route::Hard, window)
            .unwrap();
        let rows = w * per * k..(w + 1) * per * k;
        let ids = candle_core::Tensor::from_slice(&teacher.top_ids[rows.clone()], (per, k), &dev);
        let logp = candle_core::Tensor::from_slice(&teacher.top_logp[rows], (per, k), &dev);
        let kl = top_k_tail_kl(
            &logits.narrow(0, first, per).unwrap(),
            &ids.unwrap(),
            &logp.unwrap(),
        );
        sum += kl.unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    sum / teacher.n_windows() as f64
}

/// Window dropout trains the SSM beside each window for the positions a shrunk window no
/// longer sees: after the same steps, the SSMs trained with it keep a window-1 model closer
/// to the teacher than the SSMs trained at the full window only; each step's window is
/// recorded, full without dropout and shrunk (1..window) with dropout 1.
#[test]
fn window_dropout_trains_the_ssm_for_what_leaves_the_window() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let dense = Model::load(&source).unwrap();
    let (cfg, ssms) = windowed(&dense, 4, 1);
    let toks = tokens(8 * 32, SEED);
    let teacher = teacher_windows_from(&dense, &toks, 32, 8, 0, 16, 1, &mut |_, _| {}).unwrap();
    let mut at_window_1 = Vec::new();
    for dropout in [0.0, 1.0] {
        let mut student = Student::new(&dense, &cfg, &ssms, 0.0, 32).unwrap();
        student.layer_types = vec![LayerType::Ssm; 2];
        let vars = student
            .layers
            .iter()
            .flat_map(|l| l.ssm.iter().cloned())
            .collect();
        let opts = FinetuneOptions {
            steps: 40,
            lr: 1e-2,
            warmup_steps: 2,
            grad_clip: 1.0,
            betas: [0.9, 0.95],
            window_dropout: dropout,
            seed: 11,
        };
        let mut opt = finetune_optimizer(vars, &opts).unwrap();
        let history = finetune_kl(&student, &teacher, &mut opt, &opts, &mut |_, _| Ok(())).unwrap();
        let windows: Vec<usize> = history.iter().map(|r| r.window).collect();
        if dropout == 0.0 {
            assert!(windows.iter().all(|&w| w == 4), "{windows:?}");
        } else {
            assert!(windows.iter().all(|&w| (1..4).contains(&w)), "{windows:?}");
            assert!((1..4).all(|w| windows.contains(&w)), "{windows:?}");
        }
        at_window_1.push(kl_at_window(&student, &teacher, 1));
    }
    let (plain, dropped) = (at_window_1[0], at_window_1[1]);
    assert!(
        dropped < 0.9 * plain,
        "KL at window 1: trained at the full window {plain}, with window dropout {dropped}"
    );
}
