//! The candle student against the runtime, which is an independent implementation: the
//! dense student gives the runtime's logits, and a student with a hardened SSM layer gives
//! the logits of the hybrid file written from the same weights.

use std::collections::HashMap;
use std::path::PathBuf;

use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Mixer, Model};
use edgefusion_runtime::{KvType, Logits, Session, SessionOptions};
use edgefusion_testkit::{fixture, max_rel_error};
use edgefusion_train::init::{
    hybrid_layout, ssm_from_attention, ssm_random, write_hybrid_with, SsmInitSource,
};
use edgefusion_train::student::{top_k_tail_kl, Route, Student};

fn runtime_logits(model: &Model<'_>, tokens: &[u32]) -> Vec<f32> {
    let opts = SessionOptions {
        max_logits: tokens.len(),
        kv_type: KvType::F32,
        ..SessionOptions::new(64, 1)
    };
    let mut session = Session::new(model, opts).unwrap();
    session.forward(tokens, Logits::From(0)).unwrap().to_vec()
}

#[test]
fn student_matches_the_runtime_dense_and_hardened() {
    let path = fixture("tiny-llama-f32.gguf");
    let source = ModelSource::open(&path).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        unreachable!()
    };
    let dense = Model::load(&source).unwrap();
    let mut cfg = dense.config.clone();
    cfg.ssm_d_state = 12;
    cfg.ssm_d_conv = 4;
    // Random SSMs so that every parameter matters.
    let ssms: Vec<_> = dense
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let Mixer::Attention(a) = &layer.mixer else {
                unreachable!()
            };
            let mut w = ssm_random(
                ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo),
                l as u64,
            );
            w.d.iter_mut().for_each(|d| *d = 0.3);
            w.wdt
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = ((i % 7) as f32 - 3.0) * 0.05);
            w
        })
        .collect();
    let tokens: Vec<u32> = (0..37).map(|i| (i * 41 + 3) % 512).collect();
    let mut student = Student::new(&dense, &cfg, &ssms, 0.0, 64).unwrap();

    let (logits, _) = student.forward(&tokens, Route::Hard).unwrap();
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = runtime_logits(&dense, &tokens);
    let diff = max_rel_error(&got, &want);
    assert!(diff < 1e-4, "dense student vs runtime: {diff}");

    student.layer_types = vec![LayerType::Ssm, LayerType::Attention];
    let trained: HashMap<_, _> = ssms.iter().cloned().enumerate().collect();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("student-hybrid.gguf");
    write_hybrid_with(
        gguf,
        &dense,
        &hybrid_layout(&dense.config, &student.layer_types, 12, 4, 0, 0),
        SsmInitSource::Trained(&trained),
        &out,
    )
    .unwrap();
    let hybrid_source = ModelSource::open(&out).unwrap();
    let hybrid = Model::load(&hybrid_source).unwrap();
    let (logits, _) = student.forward(&tokens, Route::Hard).unwrap();
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = runtime_logits(&hybrid, &tokens);
    let diff = max_rel_error(&got, &want);
    assert!(diff < 1e-4, "hardened student vs runtime hybrid: {diff}");

    // Soft routing with a gate pinned near 0 is the dense model; the KL of a model to its
    // own top-k (and tail) is 0, and grows against another model.
    for l in &student.layers {
        l.gate_logit
            .set(&candle_core::Tensor::new(&[-30.0f32], &candle_core::Device::Cpu).unwrap())
            .unwrap();
    }
    let (soft, _) = student.forward(&tokens, Route::Soft { tau: 1.0 }).unwrap();
    let soft_v = soft.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(max_rel_error(&soft_v, &runtime_logits(&dense, &tokens)) < 1e-4);
    let k = 16;
    let (idx, vals) = top_k(&soft_v, 512, k);
    let idx_t =
        candle_core::Tensor::from_vec(idx, (tokens.len(), k), &candle_core::Device::Cpu).unwrap();
    let val_t =
        candle_core::Tensor::from_vec(vals, (tokens.len(), k), &candle_core::Device::Cpu).unwrap();
    let self_kl = top_k_tail_kl(&soft, &idx_t, &val_t)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (hard, _) = student.forward(&tokens, Route::Hard).unwrap();
    let other_kl = top_k_tail_kl(&hard, &idx_t, &val_t)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(self_kl.abs() < 1e-4, "{self_kl}");
    assert!(other_kl > self_kl + 1e-3, "{other_kl} vs {self_kl}");
}

/// Each row's `k` most probable tokens and their log-probabilities (full softmax).
fn top_k(logits: &[f32], vocab: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let (mut idx, mut logp) = (Vec::new(), Vec::new());
    for row in logits.chunks(vocab) {
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let max = row[order[0]] as f64;
        let lse = max
            + row
                .iter()
                .map(|&z| (z as f64 - max).exp())
                .sum::<f64>()
                .ln();
        for &i in &order[..k] {
            idx.push(i as u32);
            logp.push((row[i] as f64 - lse) as f32);
        }
    }
    (idx, logp)
}

/// The router's two forces: with no sparsity weight the gates fall to attention (the
/// teacher's own branch), with a large fixed λ they rise to SSM, and with a target share
/// the multiplier lands the gates on it.
#[test]
fn router_gates_follow_the_kl_and_the_sparsity_weight() {
    use edgefusion_train::router::{router_step, RouterOptions, RouterState, Targets};
    let path = fixture("tiny-llama-f32.gguf");
    let source = ModelSource::open(&path).unwrap();
    let dense = Model::load(&source).unwrap();
    let mut cfg = dense.config.clone();
    cfg.ssm_d_state = 12;
    cfg.ssm_d_conv = 4;
    let ssms: Vec<_> = dense
        .layers
        .iter()
        .map(|layer| {
            let Mixer::Attention(a) = &layer.mixer else {
                unreachable!()
            };
            ssm_from_attention(&cfg, &a.wq, &a.wk, &a.wv, &a.wo)
        })
        .collect();
    // Teacher targets: the dense model's own top-k over a few windows.
    let (l, k) = (16usize, 8usize);
    let tokens: Vec<u32> = (0..4 * l as u32).map(|i| (i * 29 + 1) % 512).collect();
    let (mut idx, mut logp) = (Vec::new(), Vec::new());
    for w in tokens.chunks(l) {
        let (i, v) = top_k(&runtime_logits(&dense, w), 512, k);
        idx.extend(i);
        logp.extend(v);
    }
    let targets = Targets {
        tokens,
        idx,
        logp,
        top_k: k,
        seq_len: l,
    };
    let switch_costs: std::cell::RefCell<Option<Vec<f64>>> = std::cell::RefCell::new(None);
    let run = |lambda: f64, target: Option<f64>| {
        let student = Student::new(&dense, &cfg, &ssms, 0.0, l).unwrap();
        let opts = RouterOptions {
            steps: 30,
            batch_size: 2,
            seq_len: l,
            lr: 0.0,
            gate_lr: 0.1,
            betas: [0.9, 0.95],
            weight_decay: 0.0,
            warmup_steps: 1,
            grad_clip: 1.0,
            tau_start: 1.0,
            tau_end: 0.05,
            target,
            lambda,
            dual_lr: 0.5,
            seed: 3,
        };
        let mut state = RouterState::new(&student, &opts).unwrap();
        let mut last = None;
        for _ in 0..opts.steps {
            last = Some(router_step(&student, &mut state, &targets, &opts).unwrap());
        }
        switch_costs.replace(state.switch_costs.clone());
        last.unwrap()
    };
    let free = run(0.0, None);
    assert_eq!(free.ssm_frac, 0.0, "{:?}", free.gates);
    let pushed = run(50.0, None);
    assert_eq!(pushed.ssm_frac, 1.0, "{:?}", pushed.gates);
    // A target share: λ set from the layers' marginal costs lands on it.
    let half = run(0.0, Some(0.5));
    assert_eq!(half.ssm_frac, 0.5, "{:?} λ {}", half.gates, half.lambda);
    assert!(half.lambda > 0.0);
    // The commit phase sent the layer that is cheaper to convert alone to SSM.
    let costs = switch_costs
        .borrow()
        .clone()
        .expect("measured in target mode");
    let cheaper = if costs[0] <= costs[1] { 0 } else { 1 };
    assert!(
        half.gates[cheaper] > 0.5,
        "{:?} costs {costs:?}",
        half.gates
    );
    let all = run(0.0, Some(1.0));
    assert_eq!(all.ssm_frac, 1.0, "{:?} λ {}", all.gates, all.lambda);
    // The commit phase makes the gates decide: each ends near 0 or 1.
    for r in [&free, &pushed, &half, &all] {
        assert!(
            r.commit > 0.0 || r.lambda == 0.0 || r.ssm_frac == 1.0,
            "{r:?}"
        );
        assert!(
            r.gate_entropy_bits < 0.15,
            "entropy {} bits, gates {:?}, commit {}, λ {}",
            r.gate_entropy_bits,
            r.gates,
            r.commit,
            r.lambda
        );
    }
}
