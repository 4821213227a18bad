//! Stages 3 and 4 through the library on the tiny fixture: non-finite losses are skipped
//! and, repeated, stop the run with a checkpoint; any kept checkpoint hardens at any share
//! and the written hybrid carries its `layer_types`.

use std::path::{Path, PathBuf};

use edgefusion_io::gguf::GgufFile;
use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model, ModelConfig};
use edgefusion_testkit::fixture;
use edgefusion_train::run::{
    distill_stages, harden_checkpoint, router_stages, DistillOutcome, Event, LayerChoice,
    RouterOutcome, RunOptions, MAX_BAD_STEPS,
};
use edgefusion_train::{TrainConfig, TrainError};

fn config() -> TrainConfig {
    let text = format!(
        "model:\n  base: {model}\ndata:\n  train: unused.txt\n  seq_len: 32\n  batch_size: 2\n\
         ssm:\n  d_state: 12\n  d_conv: 4\n  init: attention\n\
         router:\n  target_ssm_fraction: 0.5\n  tau_start: 1.0\n  tau_end: 0.2\n\
         optimizer:\n  lr: 0.001\n  weight_decay: 0.0\n  betas: [0.9, 0.95]\n  warmup_steps: 2\n  \
         total_steps: 12\n  grad_clip: 1.0\n  dtype: f32\n\
         stages:\n  teacher_tokens: 512\n  teacher_top_k: 16\n  distill_epochs: 1\n  router_steps: 12\n\
         quantization:\n  bpw: 3.5\n  block: 128\n  outliers: 0.005\n  calib: none\n  calib_tokens: 256\n  embedding_bits: 4\n\
         logging:\n  log_every: 4\ncheckpointing:\n  every: 4\n  keep_last: 3\nseed: 1\n",
        model = fixture("tiny-llama-f32.gguf").display()
    );
    TrainConfig::parse(&text, "tiny.yaml").unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgefusion-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn tokens(cfg: &ModelConfig) -> Vec<u32> {
    (0..600u32)
        .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
        .collect()
}

fn ssm_count(types: &[LayerType]) -> usize {
    types.iter().filter(|&&t| t == LayerType::Ssm).count()
}

/// The tiny fixture, opened.
fn tiny() -> ModelSource {
    ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap()
}

fn gguf_of(source: &ModelSource) -> &GgufFile {
    let ModelSource::Gguf(gguf) = source else {
        unreachable!("the fixture is a GGUF file")
    };
    gguf
}

/// Stages 1 to 4 (no quantization) into `out`, with `edit` applied to the distilled SSMs
/// before the router trains.
fn run_stages(
    config: &TrainConfig,
    source: &ModelSource,
    model: &Model<'_>,
    out: &Path,
    edit: impl FnOnce(&mut DistillOutcome),
    events: &mut dyn FnMut(Event),
) -> Result<RouterOutcome, TrainError> {
    let gguf = gguf_of(source);
    let tokens = tokens(&model.config);
    let mut outcome =
        distill_stages(config, gguf, model, &tokens, "ids", out, 1, &mut |_| {}).unwrap();
    edit(&mut outcome);
    let opts = RunOptions {
        skip_quantization: true,
        ..RunOptions::default()
    };
    router_stages(config, gguf, model, &outcome, out, 1, &opts, events)
}

#[test]
fn non_finite_losses_are_skipped_then_stop_with_a_checkpoint() {
    let config = config();
    let source = tiny();
    let model = Model::load(&source).unwrap();
    let out = temp_dir("nan");
    let mut skipped = Vec::new();
    // Every output projection poisoned: every step's loss is NaN.
    let poison = |outcome: &mut DistillOutcome| {
        for ssm in &mut outcome.ssms {
            ssm.wo.fill(f32::NAN);
        }
    };
    let err = run_stages(&config, &source, &model, &out, poison, &mut |e| {
        if let Event::SkippedStep { step } = e {
            skipped.push(step);
        }
    })
    .unwrap_err();
    assert!(matches!(err, TrainError::Numeric { .. }), "{err}");
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert_eq!(skipped, (1..=MAX_BAD_STEPS).collect::<Vec<_>>());
    let saved = out.join(format!("checkpoints/step_{MAX_BAD_STEPS:06}"));
    assert!(saved.join("state.json").exists(), "{err}");
    assert!(
        err.to_string().contains(&saved.display().to_string()),
        "{err}"
    );
    assert!(!out.join("checkpoint_final").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn kept_checkpoints_harden_at_any_share_and_layer_types_round_trip() {
    let config = config();
    let source = tiny();
    let gguf = gguf_of(&source);
    let model = Model::load(&source).unwrap();
    let n = model.config.n_layers;
    let out = temp_dir("harden");
    let routed = run_stages(&config, &source, &model, &out, |_| {}, &mut |_| {}).unwrap();
    let kept = edgefusion_train::checkpoint::list(&out.join("checkpoints"));
    let names: Vec<String> = kept
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step_000004", "step_000008", "step_000012"]);

    let load_types = |path: &Path| {
        let source = ModelSource::open(path).unwrap();
        ModelConfig::from_source(&source).unwrap().layer_types
    };
    // The last checkpoint at the configured target is stage 4's own choice.
    let last = out.join("last.gguf");
    let hardened = harden_checkpoint(
        &config,
        gguf,
        &model,
        &kept[2],
        LayerChoice::Configured,
        &last,
    )
    .unwrap();
    assert_eq!(hardened.step, 12);
    assert_eq!(hardened.layer_types, routed.layer_types);
    assert_eq!(load_types(&last), hardened.layer_types);
    assert_eq!(
        ssm_count(&hardened.layer_types),
        (0.5 * n as f64).round() as usize
    );
    // Any share, any kept step: all-SSM, all-attention.
    for (share, expected) in [(1.0, n), (0.0, 0)] {
        let path = out.join(format!("share{share}.gguf"));
        let h = harden_checkpoint(
            &config,
            gguf,
            &model,
            &kept[0],
            LayerChoice::Share(share),
            &path,
        )
        .unwrap();
        assert_eq!(h.step, 4);
        assert_eq!(ssm_count(&h.layer_types), expected);
        assert_eq!(load_types(&path), h.layer_types);
    }
    // Named layers, whatever their gates; a layer that does not exist is refused.
    let one = out.join("one.gguf");
    let h = harden_checkpoint(
        &config,
        gguf,
        &model,
        &kept[1],
        LayerChoice::Layers(&[n - 1]),
        &one,
    )
    .unwrap();
    assert_eq!(ssm_count(&h.layer_types), 1);
    assert_eq!(load_types(&one)[n - 1], LayerType::Ssm);
    let err = harden_checkpoint(
        &config,
        gguf,
        &model,
        &kept[1],
        LayerChoice::Layers(&[n]),
        &one,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("layer {n} does not exist")),
        "{err}"
    );
    // A checkpoint from another configuration is refused.
    let mut other = config.clone();
    other.seed += 1;
    let err = harden_checkpoint(
        &other,
        gguf,
        &model,
        &kept[2],
        LayerChoice::Configured,
        &out.join("x.gguf"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("another configuration"), "{err}");
    assert!(!out.join("x.gguf").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn full_fine_tuning_trains_and_writes_the_base_weights() {
    let mut config = config();
    config.stages.freeze_base = false;
    let source = tiny();
    let gguf = gguf_of(&source);
    let model = Model::load(&source).unwrap();
    let out = temp_dir("unfrozen");
    let routed = run_stages(&config, &source, &model, &out, |_| {}, &mut |_| {}).unwrap();
    let tensor = |path: &Path, name: &str| -> Vec<u8> {
        let source = ModelSource::open(path).unwrap();
        let ModelSource::Gguf(g) = &source else {
            unreachable!()
        };
        let info = g.tensors.iter().find(|t| t.name == name).unwrap();
        g.view(info).data.to_vec()
    };
    let base = fixture("tiny-llama-f32.gguf");
    let name = "blk.0.ffn_up.weight";
    let tuned = tensor(&routed.final_model, name);
    assert_eq!(tuned.len(), tensor(&base, name).len());
    assert_ne!(tuned, tensor(&base, name), "the base weights did not train");
    // The last checkpoint holds the same fine-tuned weights.
    let last = edgefusion_train::checkpoint::list(&out.join("checkpoints"))
        .pop()
        .unwrap();
    let again = out.join("again.gguf");
    harden_checkpoint(
        &config,
        gguf,
        &model,
        &last,
        LayerChoice::Configured,
        &again,
    )
    .unwrap();
    for name in [
        "blk.0.ffn_up.weight",
        "token_embd.weight",
        "output_norm.weight",
    ] {
        assert_eq!(
            tensor(&again, name),
            tensor(&routed.final_model, name),
            "{name}"
        );
    }
    // The frozen configuration refuses this run's checkpoints.
    let mut frozen = config.clone();
    frozen.stages.freeze_base = true;
    assert!(harden_checkpoint(
        &frozen,
        gguf,
        &model,
        &last,
        LayerChoice::Configured,
        &again
    )
    .is_err());
    let _ = std::fs::remove_dir_all(&out);
}
