//! Which layers the passkey lives in: the log-likelihood of the key (and whether greedy
//! decoding reads it back) for the dense model, for the model with the given layers turned
//! into sink + window attention, and for that model with each of those layers restored to
//! full attention alone. A continuous signal where 20 items of accuracy are too coarse.
//!
//! `cargo run --release -p edgefusion-eval --example passkey_layers -- MODEL.gguf LAYERS
//! [items=8] [ctx=2048] [window=64] [sink=4] [threads=2] [scan=1]`, LAYERS e.g.
//! `0-2,5-6,9-14`; `scan=0` skips the one-layer restorations.

use edgefusion_eval::lm::LanguageModel;
use edgefusion_eval::passkey;
use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model};
use edgefusion_runtime::tokenizer::Tokenizer;

/// Mean log-likelihood of the key after each prompt, and how many keys greedy decoding
/// would produce exactly.
fn score(
    model: &Model<'_>,
    tok: &Tokenizer,
    items: &[passkey::PasskeyItem],
    ctx: usize,
    threads: usize,
) -> (f64, usize) {
    let mut lm = LanguageModel::new(model, tok, ctx, threads).unwrap();
    let (mut sum, mut hits) = (0.0, 0);
    for item in items {
        let scored = lm.score(&item.prompt, &[format!(" {}", item.key)]).unwrap();
        sum += scored.choices[0].loglik;
        hits += scored.choices[0].is_greedy as usize;
    }
    (sum / items.len() as f64, hits)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |key: &str, default: usize| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{key}=")))
            .map_or(default, |v| v.parse().unwrap())
    };
    let (n_items, ctx, window, sink, threads) = (
        opt("items", 8),
        opt("ctx", 2048),
        opt("window", 64),
        opt("sink", 4),
        opt("threads", 2),
    );
    let scan = opt("scan", 1) == 1;
    let source = ModelSource::open(&args[0]).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        panic!("{}: a GGUF file", args[0])
    };
    let tok = Tokenizer::from_gguf(gguf).unwrap();
    let converted = edgefusion_model::convert::parse_layer_list(&args[1]).unwrap();
    let mut model = Model::load(&source).unwrap();
    let items: Vec<_> = (0..n_items)
        .map(|i| passkey::item(i, &tok, ctx, None).unwrap())
        .collect();
    let report = |name: &str, (ll, hits): (f64, usize)| {
        println!("{name:>24}: key log-likelihood {ll:8.3}, greedy {hits}/{n_items}");
    };
    report("dense", score(&model, &tok, &items, ctx, threads));
    model.config.window = window;
    model.config.sink = sink;
    for &l in &converted {
        model.set_layer(l, LayerType::Window, None).unwrap();
    }
    report("all converted", score(&model, &tok, &items, ctx, threads));
    for &l in converted.iter().filter(|_| scan) {
        model.set_layer(l, LayerType::Attention, None).unwrap();
        report(
            &format!("layer {l} restored"),
            score(&model, &tok, &items, ctx, threads),
        );
        model.set_layer(l, LayerType::Window, None).unwrap();
    }
}
