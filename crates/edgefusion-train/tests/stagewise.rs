//! The joint layer choice and the stage-wise alignment on the tiny Llama fixture
//! (2 layers, context 64) with a window of 4 positions and a sink of 1.

mod common;

use std::collections::HashMap;

use edgefusion_io::names::TensorRole;
use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Linear, Model};
use edgefusion_runtime::{Logits, Session, SessionOptions};
use edgefusion_train::align::{align_layers, AlignEvent, AlignOptions};
use edgefusion_train::choose::{
    copy_windows, greedy_restore, greedy_restore_by, kl_to_teacher, teacher_windows,
};
use edgefusion_train::distill::DistillOptions;
use edgefusion_train::init::{
    hybrid_layout, ssm_from_attention, write_hybrid_tuned, SsmInitSource,
};

use common::{fixture, tokens};

/// The seed of this file's token stream.
const SEED: u64 = 0x2545_f491_4f6c_dd1d;

fn with_window(model: &mut Model<'_>, window: usize, sink: usize) {
    model.config.window = window;
    model.config.sink = sink;
    model.config.ssm_d_state = 12;
    model.config.ssm_d_conv = 4;
}

/// Stage-wise options over `n_windows` sequences of 32 tokens.
fn align_options(
    n_windows: usize,
    hidden_alignment: f64,
    batch_size: usize,
    epochs: usize,
    lr: f64,
) -> AlignOptions {
    AlignOptions {
        seq_len: 32,
        n_windows,
        hidden_alignment,
        fit: DistillOptions {
            seq_len: 32,
            batch_size,
            epochs,
            lr,
            betas: [0.9, 0.95],
            weight_decay: 0.0,
            warmup_steps: 1,
            grad_clip: 1.0,
            chunk: 8,
            seed: 1,
        },
        threads: 1,
    }
}

/// Layer `l`'s SSM from its attention; with `silent_out` its output starts at zero, so the
/// converted layer starts as the window alone.
fn attention_init(
    teacher: &Model<'_>,
    cfg: &edgefusion_model::ModelConfig,
    l: usize,
    silent_out: bool,
) -> edgefusion_train::init::SsmWeights {
    let a = teacher.layers[l].mixer.attention().unwrap();
    let mut w = ssm_from_attention(cfg, &a.wq, &a.wk, &a.wv, &a.wo);
    if silent_out {
        w.wo.iter_mut().for_each(|v| *v = 0.0);
    }
    w
}

/// A layer whose attention output is zeroed costs nothing to convert: of two layers with
/// one to convert, the greedy restore gives attention back to the other, whichever it is.
#[test]
fn greedy_choice_converts_the_layer_that_costs_nothing() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    for silent in [0, 1] {
        let mut teacher = Model::load(&source).unwrap();
        let wo = teacher
            .linear_mut(TensorRole::AttnOutput, Some(silent))
            .unwrap();
        *wo = Linear::from_f32(
            "silent wo",
            wo.n_in,
            wo.n_out,
            &vec![0.0; wo.n_in * wo.n_out],
        );
        let text = tokens(4 * 48, SEED);
        let windows = teacher_windows(&teacher, &text, 48, 4, 16, 1).unwrap();
        // Against its own top-16 the teacher scores −log(top-16 mass): the floor.
        let floor = kl_to_teacher(&teacher, &windows, 1).unwrap();
        let mut student = Model::load(&source).unwrap();
        *student
            .linear_mut(TensorRole::AttnOutput, Some(silent))
            .unwrap() = Linear::from_f32(
            "silent wo",
            teacher.config.q_dim(),
            teacher.config.d_model,
            &vec![0.0; teacher.config.q_dim() * teacher.config.d_model],
        );
        with_window(&mut student, 4, 1);
        let choice = greedy_restore(&mut student, &windows, 1, 0, 1, &mut |_, _| {}).unwrap();
        assert_eq!(choice.converted, vec![silent], "{choice:?}");
        assert_eq!(choice.steps[0].restored, 1 - silent);
        assert!(
            (choice.kl_final - floor).abs() < 1e-4 * floor.max(1.0),
            "{choice:?}"
        );
        assert!(
            choice.kl_all_converted > choice.kl_final + 1e-3,
            "{choice:?}"
        );
        assert_eq!(student.config.layer_types[silent], LayerType::Window);
        assert_eq!(student.config.layer_types[1 - silent], LayerType::Attention);
    }
}

/// A copy window is prose and then the span that stood a tenth of the way into it; only
/// the repeat is scored; a window too short for the repeat is an error.
#[test]
fn copy_windows_repeat_a_far_span_and_score_the_repeat() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let teacher = Model::load(&source).unwrap();
    let text = tokens(3 * 56, SEED);
    let copies = copy_windows(&teacher, &text, 60, 3, 4, 8, 1).unwrap();
    assert_eq!(copies.n_windows(), 3);
    assert_eq!(copies.first_scored, 56);
    assert_eq!(copies.top_ids.len(), 3 * 4 * 8);
    for w in 0..3 {
        let window = &copies.tokens[w * 60..(w + 1) * 60];
        assert_eq!(&window[..56], &text[w * 56..(w + 1) * 56]);
        assert_eq!(&window[56..], &window[5..9]);
    }
    assert!(copy_windows(&teacher, &text, 60, 3, 8, 8, 1).is_err());
}

/// The greedy restore follows whatever score it is given: a score that only layer 1's
/// attention lowers restores layer 1 first, whatever the KL says.
#[test]
fn greedy_restore_by_follows_its_score() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let mut student = Model::load(&source).unwrap();
    with_window(&mut student, 4, 1);
    let choice = greedy_restore_by(&mut student, 1, 0, &mut |_, _| {}, &mut |m| {
        Ok(match m.config.layer_types[1] {
            LayerType::Attention => 0.5,
            _ => 1.0,
        })
    })
    .unwrap();
    assert_eq!(choice.converted, vec![0]);
    assert_eq!((choice.kl_all_converted, choice.kl_final), (1.0, 0.5));
}

/// Both layers converted bottom-up: each SSM ends no worse than the window alone on the
/// held-out windows, the student in memory is what the written hybrid file runs, and a
/// window of 0 (pure SSM layers) takes the same path.
#[test]
fn stagewise_alignment_converts_layers_and_writes_what_it_trained() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        unreachable!()
    };
    let teacher = Model::load(&source).unwrap();
    let text = tokens(10 * 32, SEED);
    for window in [4, 0] {
        let mut student = Model::load(&source).unwrap();
        with_window(&mut student, window, usize::from(window > 0));
        let cfg = student.config.clone();
        let opts = align_options(10, 0.5, 3, 3, 3e-3);
        let init = |l: usize| attention_init(&teacher, &cfg, l, window > 0);
        let mut targets_seen = Vec::new();
        let results = align_layers(
            &teacher,
            &mut student,
            &text,
            &[0, 1],
            &opts,
            &init,
            &mut |e| {
                if let AlignEvent::Targets { layer } = e {
                    targets_seen.push(layer);
                }
            },
        )
        .unwrap();
        assert_eq!(targets_seen, [0, 1]);
        for (_, r) in &results {
            assert!(r.window_error > 0.0, "{r:?}");
            // The SSM is kept only when it lowers the held-out loss (f32 sums: 1e-4).
            assert!(r.layer_error <= r.window_error * (1.0 + 1e-4), "{r:?}");
        }
        assert_eq!(student.config.layer_types, [LayerType::Ssm, LayerType::Ssm]);
        let trained: HashMap<usize, _> = results
            .into_iter()
            .enumerate()
            .map(|(l, (w, _))| (l, w))
            .collect();
        let hybrid = hybrid_layout(
            &teacher.config,
            &student.config.layer_types,
            12,
            4,
            window,
            cfg.sink,
        );
        let out =
            std::env::temp_dir().join(format!("ef-stagewise-{window}-{}.gguf", std::process::id()));
        write_hybrid_tuned(
            gguf,
            &teacher,
            &hybrid,
            SsmInitSource::Trained(&trained),
            &[],
            &out,
        )
        .unwrap();
        let written_source = ModelSource::open(&out).unwrap();
        let written = Model::load(&written_source).unwrap();
        assert_eq!(written.config.window, window);
        let logits = |model: &Model<'_>| {
            let opts = SessionOptions {
                max_logits: 40,
                ..SessionOptions::new(64, 1)
            };
            let mut session = Session::new(model, opts).unwrap();
            session
                .forward(&text[..40], Logits::From(0))
                .unwrap()
                .to_vec()
        };
        assert_eq!(logits(&student), logits(&written));
        let _ = std::fs::remove_file(&out);
    }
}

/// With a window that covers every sequence the windowed layer is the dense one: with β = 1
/// both streams stay equal and each layer has nothing left to fit (the teacher's stream
/// must pass each layer once, not twice).
#[test]
fn a_window_covering_the_sequence_leaves_nothing_to_fit() {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let teacher = Model::load(&source).unwrap();
    let mut student = Model::load(&source).unwrap();
    with_window(&mut student, 60, 0);
    let cfg = student.config.clone();
    let opts = align_options(4, 1.0, 2, 1, 1e-3);
    let init = |l: usize| attention_init(&teacher, &cfg, l, true);
    let results = align_layers(
        &teacher,
        &mut student,
        &tokens(4 * 32, SEED),
        &[0, 1],
        &opts,
        &init,
        &mut |_| {},
    )
    .unwrap();
    for (_, r) in &results {
        assert!(r.window_error < 1e-6, "{r:?}");
    }
}
