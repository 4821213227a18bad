//! SmolLM2-135M (Q4_1, fetched by scripts/fetch-assets.sh --model --text) quantized with the
//! default method, efq at 3.1 bits per weight, calibrated on the State of the Union text,
//! then checked on Moby-Dick (never the calibration text):
//! - perplexity on one 512-token window stays within `PPL_RATIO` of the source model's, and
//!   the top-1 token agrees with the source's at `TOP1_AGREEMENT` of its positions;
//! - the greedy continuation of a factual prompt starts with the source model's first
//!   `SHARED_TOKENS` tokens.
//!
//! Skipped with a loud message when the assets are absent, unless
//! EDGEFUSION_REQUIRE_ASSETS=1 (scripts/test.sh and CI); skipped under
//! EDGEFUSION_NO_SIMD=1, where the scalar kernels would take minutes to calibrate and the
//! kernel tests already hold every SIMD kernel to its scalar twin.

use std::path::Path;

use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_quant::pipeline::{quantize, Calibration, Method, QuantizeOptions};
use edgefusion_runtime::sampler::argmax;
use edgefusion_runtime::tokenizer::Tokenizer;
use edgefusion_runtime::{Logits, Session, SessionOptions};

/// Largest ratio of the quantized model's perplexity to the source's on the test window.
/// Measured: 1.69 (11.07 against 6.55; over 10 windows of Moby-Dick 53.5 against 24.6).
const PPL_RATIO: f64 = 2.0;
/// Least share of the window's positions where the quantized model's top-1 token is the
/// source's (teacher-forced, so one early difference does not decide the rest). Measured:
/// 0.758.
const TOP1_AGREEMENT: f64 = 0.7;
/// Greedy tokens that must equal the source model's. Measured: 5 (" Paris.\n\nThe"), with
/// the default 16384 calibration tokens; with 8192 the continuation was " a French, a
/// French": at 3.1 bits per weight a 135M model's greedy path is fragile.
const SHARED_TOKENS: usize = 3;

/// Perplexity of `tokens` (one window), scoring every token after the first, and the
/// model's top-1 choice at every position.
fn perplexity(model: &Model<'_>, tokens: &[u32]) -> (f64, Vec<u32>) {
    let opts = SessionOptions {
        max_batch: tokens.len(),
        max_logits: tokens.len(),
        ..SessionOptions::new(tokens.len(), 2)
    };
    let mut session = Session::new(model, opts).unwrap();
    let logits = session.forward(tokens, Logits::From(0)).unwrap();
    let vocab = logits.len() / tokens.len();
    let top1 = logits.chunks_exact(vocab).map(argmax).collect();
    let nll: f64 = (0..tokens.len() - 1)
        .map(|i| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            max + sum.ln() - row[tokens[i + 1] as usize] as f64
        })
        .sum();
    ((nll / (tokens.len() - 1) as f64).exp(), top1)
}

fn greedy(model: &Model<'_>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut session = Session::new(model, SessionOptions::new(prompt.len() + n, 2)).unwrap();
    let mut next = argmax(session.forward(prompt, Logits::Last).unwrap());
    let mut out = vec![next];
    while out.len() < n {
        next = argmax(session.forward(&[next], Logits::Last).unwrap());
        out.push(next);
    }
    out
}

fn load(path: &Path) -> ModelSource {
    ModelSource::open(path).unwrap()
}

#[test]
fn efq_3_1_smollm2_stays_coherent() {
    if std::env::var("EDGEFUSION_NO_SIMD").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED under EDGEFUSION_NO_SIMD=1 (scalar calibration takes minutes)");
        return;
    }
    use edgefusion_testkit::asset;
    let (Some(base), Some(calib), Some(eval)) = (
        asset("models/SmolLM2-135M-Instruct.Q4_1.gguf", "--model"),
        asset("text/sotu.txt", "--text"),
        asset("text/moby-dick.txt", "--text"),
    ) else {
        return;
    };
    let out = std::env::temp_dir().join(format!("ef-smollm2-efq-{}.gguf", std::process::id()));
    let opts = QuantizeOptions {
        method: Method::Efq,
        bpw: 3.1,
        bits: 3,
        outliers: 0.005,
        calibration: Some(Calibration {
            name: calib.display().to_string(),
            text: std::fs::read_to_string(&calib).unwrap(),
            n_tokens: 16384,
            ctx: 512,
            threads: 2,
            seed: 0,
        }),
        act_order: false,
        sensitivity: false,
        embedding_bits: 4,
        rotate: true,
        max_bits: None,
        refit: true,
        keep_source: true,
    };
    let report = quantize(&load(&base), &out, &opts, &mut |_, _, _| {}).unwrap();
    assert!(report.linear_bpw <= 3.1, "{} bpw", report.linear_bpw);

    let source = load(&base);
    let gguf = match &source {
        ModelSource::Gguf(g) => g,
        _ => unreachable!(),
    };
    let tokenizer = Tokenizer::from_gguf(gguf).unwrap();
    let text = std::fs::read_to_string(&eval).unwrap();
    let window: Vec<u32> = tokenizer.encode(&text, false).unwrap()[1000..1512].to_vec();
    let prompt = tokenizer.encode("The capital of France is", false).unwrap();

    let model = Model::load(&source).unwrap();
    let ((ppl_base, top1_base), greedy_base) =
        (perplexity(&model, &window), greedy(&model, &prompt, 8));
    let quantized_source = load(&out);
    let quantized = Model::load(&quantized_source).unwrap();
    let ((ppl_q, top1_q), greedy_q) = (
        perplexity(&quantized, &window),
        greedy(&quantized, &prompt, 8),
    );
    let _ = std::fs::remove_file(&out);
    let agree = top1_base
        .iter()
        .zip(&top1_q)
        .filter(|(a, b)| a == b)
        .count() as f64
        / window.len() as f64;
    let shared = greedy_base
        .iter()
        .zip(&greedy_q)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "efq-3.1: {:.3} bits/weight, PPL {ppl_q:.2} vs {ppl_base:.2}, top-1 agreement {agree:.3}; greedy {:?} vs {:?} ({shared} shared)",
        report.linear_bpw,
        tokenizer.decode(&greedy_q).unwrap(),
        tokenizer.decode(&greedy_base).unwrap()
    );
    assert!(
        ppl_q <= PPL_RATIO * ppl_base,
        "PPL {ppl_q} > {PPL_RATIO} × {ppl_base}"
    );
    assert!(agree >= TOP1_AGREEMENT, "top-1 agreement {agree}");
    assert!(
        shared >= SHARED_TOKENS,
        "greedy continuations share {shared} tokens"
    );
}
