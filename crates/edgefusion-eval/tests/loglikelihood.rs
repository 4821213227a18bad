//! Log-likelihoods and generations of the runtime-backed language model against the
//! independent float64 numpy reference of the tiny fixtures (scripts/make-tiny-models.py):
//! the reference's logits of a 12-token prompt give the log-likelihood of any split of it
//! into context and continuation. Prefix reuse (a dense model's KV cache cut back, a
//! hybrid's SSM snapshots) must not change any score.

use edgefusion_eval::lm::{log_prob, LanguageModel};
use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::tokenizer::Tokenizer;
use edgefusion_testkit::fixture;

struct Reference {
    tokens: Vec<u32>,
    /// (positions, vocab): row i predicts token i + 1.
    logits: Vec<Vec<f32>>,
    prompt: String,
    greedy: Vec<u32>,
}

fn reference(stem: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(&format!("{stem}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    Reference {
        tokens: ids("tokens"),
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect(),
        prompt: v["prompt"].as_str().unwrap().to_string(),
        greedy: ids("greedy_continuation"),
    }
}

/// The reference log-likelihood of tokens[k..] after tokens[..k], and whether it is greedy.
fn reference_score(r: &Reference, k: usize) -> (f64, bool) {
    let (mut ll, mut greedy) = (0.0, true);
    for i in k..r.tokens.len() {
        let (lp, g) = log_prob(&r.logits[i - 1], r.tokens[i]);
        ll += lp;
        greedy &= g;
    }
    (ll, greedy)
}

fn load(stem: &str) -> (ModelSource, Reference) {
    let source = ModelSource::open(fixture(&format!("{stem}.gguf"))).unwrap();
    (source, reference(stem))
}

fn tokenizer_of(source: &ModelSource) -> Tokenizer {
    let ModelSource::Gguf(gguf) = source else {
        unreachable!("fixtures are GGUF files")
    };
    Tokenizer::from_gguf(gguf).unwrap()
}

#[test]
fn continuation_scores_match_the_numpy_reference_with_prefix_reuse() {
    for stem in ["tiny-llama-f32", "tiny-hybrid-f32"] {
        let (source, r) = load(stem);
        let model = Model::load(&source).unwrap();
        let tokenizer = tokenizer_of(&source);
        let mut lm = LanguageModel::new(&model, &tokenizer, 64, 1)
            .unwrap()
            .with_min_snapshot(3);
        // Splits in an order that makes the session reuse, cut back and restore.
        for k in [6, 6, 4, 9, 1, 11, 5, 5, 10, 3] {
            let (context, continuation) = r.tokens.split_at(k);
            let scored = lm
                .score_tokens(
                    context,
                    &[continuation.to_vec(), continuation[..1].to_vec()],
                )
                .unwrap();
            let (want, greedy) = reference_score(&r, k);
            let got = scored.choices[0];
            assert!(
                (got.loglik - want).abs() < 1e-3 * (1.0 + want.abs()),
                "{stem} k={k}: {} vs reference {want}",
                got.loglik
            );
            assert_eq!(got.is_greedy, greedy, "{stem} k={k}");
            assert_eq!(got.n_tokens, r.tokens.len() - k);
            let first = log_prob(&r.logits[k - 1], r.tokens[k]).0;
            assert!((scored.choices[1].loglik - first).abs() < 1e-3 * (1.0 + first.abs()));
            assert_eq!(scored.dropped, 0);
        }
    }
}

/// A window too short for context and continuation drops context from the left, as the
/// harness does: the score is that of the kept tokens alone.
#[test]
fn long_contexts_are_cut_from_the_left() {
    let (source, r) = load("tiny-llama-f32");
    let model = Model::load(&source).unwrap();
    let tokenizer = tokenizer_of(&source);
    let mut short = LanguageModel::new(&model, &tokenizer, 8, 1).unwrap();
    let mut wide = LanguageModel::new(&model, &tokenizer, 64, 1).unwrap();
    let (context, continuation) = r.tokens.split_at(9);
    let cut = short
        .score_tokens(context, &[continuation.to_vec()])
        .unwrap();
    // 8 positions hold 6 context tokens and the continuation's first two.
    assert_eq!(cut.dropped, 3);
    let kept = wide
        .score_tokens(&context[3..], &[continuation.to_vec()])
        .unwrap();
    assert!((cut.choices[0].loglik - kept.choices[0].loglik).abs() < 1e-4);
}

#[test]
fn greedy_generation_equals_the_reference_continuation() {
    for stem in ["tiny-llama-f32", "tiny-hybrid-f32"] {
        let (source, r) = load(stem);
        let model = Model::load(&source).unwrap();
        let tokenizer = tokenizer_of(&source);
        assert_eq!(tokenizer.encode(&r.prompt, false).unwrap(), r.tokens);
        let mut lm = LanguageModel::new(&model, &tokenizer, 64, 1).unwrap();
        let want = tokenizer.decode(&r.greedy).unwrap();
        let generated = lm.generate(&r.prompt, &[], r.greedy.len()).unwrap();
        assert_eq!(generated.n_tokens, r.greedy.len(), "{stem}");
        assert_eq!(generated.text, want, "{stem}");
        // A stop sequence cuts the text before it; scoring afterwards starts afresh.
        let stop = want.chars().skip(2).take(2).collect::<String>();
        let before = lm.tokens_evaluated;
        let cut = lm
            .generate(&r.prompt, std::slice::from_ref(&stop), r.greedy.len())
            .unwrap();
        if stem == "tiny-llama-f32" {
            // The prompt is still in the KV cache after the first generation: only its
            // last token (for its logits) and the generated tokens but the last are run.
            assert_eq!(lm.tokens_evaluated - before, cut.n_tokens, "{stem}");
        }
        assert!(
            want.starts_with(&cut.text) && !cut.text.contains(&stop),
            "{stem}: {cut:?}"
        );
        let (context, continuation) = r.tokens.split_at(7);
        let scored = lm.score_tokens(context, &[continuation.to_vec()]).unwrap();
        let want = reference_score(&r, 7).0;
        assert!((scored.choices[0].loglik - want).abs() < 1e-3 * (1.0 + want.abs()));
    }
}
