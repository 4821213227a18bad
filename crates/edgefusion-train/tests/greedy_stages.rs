//! The greedy conversion through the library on the tiny fixture (2 layers, context 64):
//! choice, end-to-end KL with adapters and SSMs, the written hybrid; a run stopped and
//! resumed writes the model an unbroken run writes, and the choice is reused.

mod common;

use std::path::{Path, PathBuf};

use edgefusion_io::gguf::GgufFile;
use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model};
use edgefusion_runtime::{KvType, Logits, Session, SessionOptions};
use edgefusion_train::convert::{greedy_stages, ChoiceRecord, GreedyOutcome, CHOICE_FILE};
use edgefusion_train::run::{Event, RunOptions};
use edgefusion_train::{TrainConfig, TrainError};

use common::{fixture, tokens};

/// The seed of this file's token stream.
const SEED: u64 = 0x2545_f491_4f6c_dd1d;

fn config(extra: &str) -> TrainConfig {
    let text = format!(
        "model:\n  base: {model}\ndata:\n  train: ids\n  seq_len: 32\n  batch_size: 2\n\
         ssm:\n  d_state: 12\n  d_conv: 4\n  init: attention\n\
         router:\n  target_ssm_fraction: 0.5\n  tau_start: 1.0\n  tau_end: 0.2\n\
         optimizer:\n  lr: 0.01\n  weight_decay: 0.0\n  betas: [0.9, 0.95]\n  warmup_steps: 2\n  \
         total_steps: 12\n  grad_clip: 1.0\n  dtype: f32\n\
         stages:\n  teacher_tokens: 512\n  teacher_top_k: 16\n  distill_epochs: 1\n  router_steps: 12\n\
         conversion:\n  layer_choice: greedy\n  window: 4\n  sink: 1\n  choice_ctx: 48\n  \
         choice_windows: 2\n  finetune_steps: 8\n  finetune_seq_len: 32\n  lora_rank: 4\n  lora_alpha: 4\n{extra}\
         quantization:\n  bpw: 3.5\n  block: 128\n  outliers: 0.005\n  calib_tokens: 256\n  embedding_bits: 4\n\
         logging:\n  log_every: 1\ncheckpointing:\n  every: 4\n  keep_last: 2\nseed: 1\n",
        model = fixture("tiny-llama-f32.gguf").display()
    );
    TrainConfig::parse(&text, "tiny.yaml").unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgefusion-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn gguf_of(source: &ModelSource) -> &GgufFile {
    let ModelSource::Gguf(gguf) = source else {
        unreachable!("the fixture is a GGUF file")
    };
    gguf
}

fn run(
    config: &TrainConfig,
    out: &Path,
    opts: RunOptions,
    events: &mut dyn FnMut(Event),
) -> Result<GreedyOutcome, TrainError> {
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let teacher = Model::load(&source).unwrap();
    greedy_stages(
        config,
        &source,
        gguf_of(&source),
        &teacher,
        &tokens(8 * 32 + 96, SEED),
        "ids",
        out,
        1,
        &opts,
        events,
    )
}

fn logits(path: &Path) -> Vec<f32> {
    let source = ModelSource::open(path).unwrap();
    let model = Model::load(&source).unwrap();
    let toks = tokens(40, SEED);
    let opts = SessionOptions {
        max_logits: toks.len(),
        kv_type: KvType::F32,
        ..SessionOptions::new(64, 1)
    };
    let mut session = Session::new(&model, opts).unwrap();
    session.forward(&toks, Logits::From(0)).unwrap().to_vec()
}

fn skip_quantization() -> RunOptions {
    RunOptions {
        skip_quantization: true,
        ..RunOptions::default()
    }
}

#[test]
fn a_stopped_run_resumes_to_the_model_an_unbroken_run_writes() {
    let config = config("  ssm_beside_window: true\n");
    let whole_dir = temp_dir("greedy-whole");
    let whole = run(&config, &whole_dir, skip_quantization(), &mut |_| {}).unwrap();
    assert_eq!(whole.finetune.len(), 8);
    assert_eq!(whole.choice.converted.len(), 1, "half of 2 layers");
    let converted = whole.choice.converted[0];
    assert_eq!(whole.layer_types[converted], LayerType::Ssm);
    assert_eq!(whole.layer_types[1 - converted], LayerType::Attention);
    let record: ChoiceRecord =
        serde_json::from_str(&std::fs::read_to_string(whole_dir.join(CHOICE_FILE)).unwrap())
            .unwrap();
    assert_eq!(record.choice.converted, whole.choice.converted);
    assert!(whole.finetune.iter().all(|s| s.kl.is_finite()));
    let file = Model::load(&ModelSource::open(&whole.final_model).unwrap())
        .unwrap()
        .config;
    assert_eq!((file.window, file.sink), (4, 1));
    assert_eq!(file.layer_types, whole.layer_types);
    // analyze-router reads the choice: the restored layer in round 0, both layers' KL.
    let analysis = edgefusion_train::analysis::analyze(&whole_dir, None).unwrap();
    assert_eq!(analysis.ssm_frac(), 0.5);
    let restored = &analysis.layers[1 - converted];
    assert_eq!(restored.restored_in_round, Some(0));
    assert_eq!(restored.restore_kl, Some(whole.choice.kl_final));
    assert!(analysis.layers[converted].restore_kl.unwrap() >= whole.choice.kl_final);
    assert_eq!(analysis.step, 8);

    let dir = temp_dir("greedy-resumed");
    let stopped = run(
        &config,
        &dir,
        RunOptions {
            stop_after: Some(3),
            ..skip_quantization()
        },
        &mut |_| {},
    );
    assert!(matches!(stopped, Err(TrainError::Stopped { step: 3 })));
    // A checkpoint is there: going on needs --resume.
    let err = run(&config, &dir, skip_quantization(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    let mut seen = Vec::new();
    let resumed = run(
        &config,
        &dir,
        RunOptions {
            resume: true,
            ..skip_quantization()
        },
        &mut |e| match e {
            Event::ChoiceCached => seen.push("cached".to_string()),
            Event::Resumed { step } => seen.push(format!("resumed {step}")),
            _ => {}
        },
    )
    .unwrap();
    assert_eq!(seen, ["cached", "resumed 3"]);
    assert_eq!(resumed.finetune.len(), 5);
    for (a, b) in resumed.finetune.iter().zip(&whole.finetune[3..]) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.kl - b.kl).abs() < 1e-5,
            "step {}: {} vs {}",
            a.step,
            a.kl,
            b.kl
        );
    }
    let (a, b) = (logits(&resumed.final_model), logits(&whole.final_model));
    let diff = edgefusion_testkit::max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "resumed vs unbroken logits differ by {diff}");
    // The log reads as one run: each fine-tuning step once.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "finetune")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..8).collect::<Vec<_>>());
    // Only the newest `keep_last` checkpoints stay.
    let kept = std::fs::read_dir(dir.join("finetune")).unwrap().count();
    assert_eq!(kept, 2 * 2, "two checkpoints of a .json and a .safetensors");
    let _ = std::fs::remove_dir_all(&whole_dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn window_only_without_training_and_a_short_text_refused() {
    let config = config("");
    let mut untrained = config.clone();
    untrained.conversion.finetune_steps = 0;
    let dir = temp_dir("greedy-untrained");
    let out = run(&untrained, &dir, skip_quantization(), &mut |_| {}).unwrap();
    assert!(out.finetune.is_empty());
    assert_eq!(out.layer_types[out.choice.converted[0]], LayerType::Window);
    // No training: the file is the dense model with one layer windowed.
    let file = Model::load(&ModelSource::open(&out.final_model).unwrap())
        .unwrap()
        .config;
    assert_eq!(file.layer_types, out.layer_types);

    let mut long_choice = config.clone();
    long_choice.conversion.choice_windows = 9;
    let err = run(
        &long_choice,
        &temp_dir("greedy-short"),
        skip_quantization(),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ids") && err.contains("data.train"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
