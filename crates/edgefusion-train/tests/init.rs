//! SSMs initialised from attention: the hybrid file loads and runs, and it reproduces the
//! dense model better than SSMs of random weights with the same norms.

use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model};
use edgefusion_runtime::{Logits, Session, SessionOptions};
use edgefusion_testkit::fixture;
use edgefusion_train::init::write_hybrid;

fn logits(model: &Model<'_>, tokens: &[u32]) -> Vec<f32> {
    let opts = SessionOptions {
        max_logits: tokens.len(),
        ..SessionOptions::new(64, 1)
    };
    let mut session = Session::new(model, opts).unwrap();
    session.forward(tokens, Logits::From(0)).unwrap().to_vec()
}

/// Relative RMS distance of `a` from `b`.
fn distance(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn attention_initialised_ssm_beats_random_and_runs() {
    let input = fixture("tiny-llama-f32.gguf");
    let source = ModelSource::open(&input).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        unreachable!()
    };
    let dense = Model::load(&source).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
    let reference = logits(&dense, &tokens);
    let dir = std::env::temp_dir().join(format!("ef-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let types = [LayerType::Ssm, LayerType::Attention];
    // head_dim 16: N = 12 keeps the SSM below attention's parameter count.
    let mut distances = Vec::new();
    for (name, seed) in [("attention", None), ("random", Some(7u64))] {
        let out = dir.join(format!("{name}.gguf"));
        write_hybrid(gguf, &dense, &types, 12, 4, seed, &out).unwrap();
        let hybrid_source = ModelSource::open(&out).unwrap();
        let hybrid = Model::load(&hybrid_source).unwrap();
        assert!(hybrid.config.is_hybrid());
        let d = distance(&logits(&hybrid, &tokens), &reference);
        eprintln!("SSM from {name}: relative logit distance {d:.4}");
        distances.push(d);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        distances[0] < distances[1],
        "attention init {} not closer than random {}",
        distances[0],
        distances[1]
    );
}
