//! Passkey retrieval: a five-digit number hidden early in about `--passkey-ctx` tokens of
//! filler text, asked for at the end (Mohtashami & Jaggi 2023, "Landmark Attention", the
//! long-context check that LongLoRA and many later papers reuse).
//!
//! It measures what perplexity and the short tasks cannot: whether the model still reads
//! information far behind the current position. The key sits at 10–40% of the filler, more
//! than a thousand tokens back at the default window, so a layer that attends to a sink and
//! the last 64 positions cannot see it; a hybrid retrieves it only through its full-attention
//! layers or what its SSM state kept.
//!
//! Items are generated from their index (no data file): the key and its depth come from a
//! SplitMix64 stream seeded by the index, the amount of filler from the model's own tokenizer,
//! so that prompt and answer fill the window. Scoring is greedy decoding of [`ANSWER_TOKENS`]
//! tokens; an item is correct when the generation, leading whitespace stripped, starts with
//! the key and no further digit follows ([`is_correct`]).

use edgefusion_runtime::tokenizer::Tokenizer;

use crate::lm::{prompt_tokens, LmError};
use crate::prompts::GenRequest;

/// Bump when the prompt text, the key or depth draws, or the filler fitting change: cached
/// results of another version are not reused.
pub const PASSKEY_PROMPT_VERSION: u32 = 1;

/// `--passkey-ctx` default: prompt and answer in 2048 tokens.
pub const DEFAULT_CTX: usize = 2048;

/// Items scored when `--limit` does not say.
pub const DEFAULT_ITEMS: usize = 20;

/// Tokens generated per item, and kept free at the end of the window for them: room for the
/// five digits (one token each in SmolLM2's tokenizer) with a leading space and a stop.
pub const ANSWER_TOKENS: usize = 8;

/// Where the key sentence is placed, as a fraction of the filler before it: drawn uniformly
/// in this range per item.
pub const DEPTH_RANGE: (f64, f64) = (0.10, 0.40);

/// The task description that opens every prompt.
pub const HEADER: &str = "There is important info hidden inside a lot of irrelevant text. \
Find it and memorize it. I will quiz you about the important information there.\n\n";

/// One group of filler, repeated to fill the window.
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// The question that ends every prompt; the model answers by continuing it.
pub const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// What can fail while building items.
#[derive(Debug, thiserror::Error)]
pub enum PasskeyError {
    #[error("--passkey-ctx 0: the passkey prompt needs a window of tokens; give e.g. {DEFAULT_CTX} (the default)")]
    ZeroCtx,
    #[error("--passkey-ctx {ctx} exceeds the model's context window of {model_ctx} tokens; give at most {model_ctx}")]
    ExceedsModel { ctx: usize, model_ctx: usize },
    #[error("--passkey-ctx {ctx} exceeds this session's window of {n_ctx} tokens")]
    ExceedsSession { ctx: usize, n_ctx: usize },
    #[error(
        "--passkey-ctx {ctx} is too small: the passkey prompt's fixed text and one filler group \
         take {prompt} tokens with this model's tokenizer, and the answer {ANSWER_TOKENS} more; \
         give at least {}{}",
        prompt + ANSWER_TOKENS,
        model_hint(*prompt, *model_ctx)
    )]
    TooSmall {
        ctx: usize,
        prompt: usize,
        model_ctx: Option<usize>,
    },
    #[error(transparent)]
    Lm(#[from] LmError),
}

fn model_hint(prompt: usize, model_ctx: Option<usize>) -> String {
    match model_ctx {
        Some(m) if prompt + ANSWER_TOKENS > m => {
            format!(" (more than the model's context window of {m}: this model cannot run passkey)")
        }
        _ => String::new(),
    }
}

/// Checks `--passkey-ctx` against the model's context window (`n_ctx_train`): not 0, not
/// beyond it. Whether the prompt fits is [`item`]'s check, which needs the tokenizer.
pub fn check_ctx(ctx: usize, model_ctx: usize) -> Result<(), PasskeyError> {
    if ctx == 0 {
        return Err(PasskeyError::ZeroCtx);
    }
    if ctx > model_ctx {
        return Err(PasskeyError::ExceedsModel { ctx, model_ctx });
    }
    Ok(())
}

/// SplitMix64 (Steele, Lea & Flood 2014, the seeding generator of xoshiro): a small
/// generator whose stream its seed fixes on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Item `index`'s pass key (10000..=99999) and depth (in [`DEPTH_RANGE`]).
pub fn draw(index: usize) -> (u32, f64) {
    let mut rng = SplitMix64(index as u64);
    // The modulo's bias (2^64 mod 90000 of 2^64) is immaterial here.
    let key = 10_000 + (rng.next_u64() % 90_000) as u32;
    let (low, high) = DEPTH_RANGE;
    let depth = low + (high - low) * rng.next_unit();
    (key, depth)
}

/// The sentence that carries the key.
pub fn key_sentence(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key. ")
}

/// The prompt with `before` filler groups ahead of the key sentence and `after` behind it.
pub fn prompt(key: u32, before: usize, after: usize) -> String {
    let mut text =
        String::with_capacity(HEADER.len() + (before + after + 1) * FILLER.len() + QUESTION.len());
    text.push_str(HEADER);
    for _ in 0..before {
        text.push_str(FILLER);
    }
    text.push_str(&key_sentence(key));
    for _ in 0..after {
        text.push_str(FILLER);
    }
    // The last sentence's trailing space would end the paragraph before the question.
    text.truncate(text.trim_end().len());
    text.push_str(QUESTION);
    text
}

/// One passkey item.
#[derive(Debug, Clone, PartialEq)]
pub struct PasskeyItem {
    pub index: usize,
    pub key: u32,
    /// The drawn depth: the share of the filler that comes before the key sentence.
    pub depth: f64,
    /// Filler groups before and after the key sentence (`before ≈ depth × total`).
    pub filler_before: usize,
    pub filler_after: usize,
    pub prompt: String,
    /// The prompt's tokens as the model runs it (BOS included when the model adds one):
    /// at most the window less [`ANSWER_TOKENS`], and one more filler group would exceed it.
    pub n_tokens: usize,
}

impl PasskeyItem {
    /// The greedy generation request of this item.
    pub fn request(&self) -> GenRequest {
        GenRequest {
            prompt: self.prompt.clone(),
            stop: Vec::new(),
            max_gen_tokens: ANSWER_TOKENS,
            target: self.key.to_string(),
        }
    }
}

/// Builds item `index` for a window of `ctx` tokens: the most filler groups whose prompt,
/// tokenized by `tokenizer` as the model runs it, leaves [`ANSWER_TOKENS`] free. `model_ctx`
/// (the model's context window, when known) only sharpens the error message.
pub fn item(
    index: usize,
    tokenizer: &Tokenizer,
    ctx: usize,
    model_ctx: Option<usize>,
) -> Result<PasskeyItem, PasskeyError> {
    let (key, depth) = draw(index);
    let split = |groups: usize| {
        let before = ((depth * groups as f64).round() as usize).min(groups);
        (before, groups - before)
    };
    let n_tokens = |groups: usize| -> Result<usize, PasskeyError> {
        let (before, after) = split(groups);
        Ok(prompt_tokens(tokenizer, &prompt(key, before, after))?.len())
    };
    let budget = ctx.saturating_sub(ANSWER_TOKENS);
    let least = n_tokens(1)?;
    if least > budget {
        return Err(PasskeyError::TooSmall {
            ctx,
            prompt: least,
            model_ctx,
        });
    }
    // The largest group count that fits: bracket it from an estimate (one group's tokens),
    // then bisect. `fits` holds for `low` and fails for `high`.
    let per_group = tokenizer
        .encode(&FILLER.repeat(16), false)
        .map_err(|e| LmError::Tokenizer(e.to_string()))?
        .len()
        .div_ceil(16)
        .max(1);
    let mut low = 1;
    let mut high = 2 + (budget - least) / per_group;
    while n_tokens(high)? <= budget {
        low = high;
        high *= 2;
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if n_tokens(mid)? <= budget {
            low = mid;
        } else {
            high = mid;
        }
    }
    let (filler_before, filler_after) = split(low);
    let prompt = prompt(key, filler_before, filler_after);
    let n_tokens = prompt_tokens(tokenizer, &prompt)?.len();
    Ok(PasskeyItem {
        index,
        key,
        depth,
        filler_before,
        filler_after,
        prompt,
        n_tokens,
    })
}

/// The digits the generation answers with: its leading run of ASCII digits after leading
/// whitespace (empty when it does not start with one).
pub fn answer(generation: &str) -> &str {
    let text = generation.trim_start();
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    &text[..end]
}

/// Whether a generation retrieves `key`: after leading whitespace it starts with the key's
/// digits, and no digit follows (" 68217." is right; "6821", "68218" and "682170" are not).
pub fn is_correct(generation: &str, key: &str) -> bool {
    !key.is_empty() && answer(generation) == key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use edgefusion_io::ModelSource;

    fn tokenizer_of(path: PathBuf) -> Tokenizer {
        let ModelSource::Gguf(gguf) = ModelSource::open(&path).unwrap() else {
            unreachable!("a GGUF file")
        };
        Tokenizer::from_gguf(&gguf).unwrap()
    }

    /// The tiny fixtures' byte-level BPE (512 tokens), always present.
    fn tiny_tokenizer() -> Tokenizer {
        tokenizer_of(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/tiny-llama-f32.gguf"),
        )
    }

    /// SmolLM2's tokenizer from assets/ (skipped when absent, unless
    /// EDGEFUSION_REQUIRE_ASSETS=1).
    fn smollm2_tokenizer() -> Option<Tokenizer> {
        edgefusion_testkit::asset("models/SmolLM2-135M-Instruct.Q4_1.gguf", "--model")
            .map(tokenizer_of)
    }

    #[test]
    fn draws_are_deterministic_five_digit_keys_at_early_depths() {
        // Pinned: a change here changes every item (bump PASSKEY_PROMPT_VERSION with it).
        assert_eq!(SplitMix64(0).next_u64(), 0xe220_a839_7b1d_cdaf);
        let draws: Vec<(u32, f64)> = (0..500).map(draw).collect();
        assert_eq!(draws, (0..500).map(draw).collect::<Vec<_>>());
        for &(key, depth) in &draws {
            assert!((10_000..=99_999).contains(&key), "{key}");
            assert!((0.10..0.40).contains(&depth), "{depth}");
        }
        // Keys and depths vary from item to item and cover their ranges.
        let keys: std::collections::BTreeSet<u32> = draws.iter().map(|d| d.0).collect();
        assert!(keys.len() > 490, "{}", keys.len());
        let depths: Vec<f64> = draws.iter().map(|d| d.1).collect();
        let min = depths.iter().copied().fold(1.0, f64::min);
        let max = depths.iter().copied().fold(0.0, f64::max);
        assert!(min < 0.12 && max > 0.38, "{min}..{max}");
    }

    #[test]
    fn the_prompt_has_the_classic_layout() {
        let text = prompt(68217, 2, 1);
        let filler = FILLER.repeat(2);
        assert_eq!(
            text,
            format!(
                "{HEADER}{filler}The pass key is 68217. Remember it. 68217 is the pass key. \
                 {}{QUESTION}",
                FILLER.trim_end()
            )
        );
        assert!(text.starts_with("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\nThe grass is green."));
        assert!(text.ends_with("There and back again.\n\nWhat is the pass key? The pass key is"));
        assert!(prompt(12345, 0, 0)
            .ends_with("is the pass key.\n\nWhat is the pass key? The pass key is"));
    }

    /// Items of `tokenizer` at `ctx`: deterministic, within the budget and filling it, the key
    /// at its drawn depth and far more than a sink + 64 window from the end.
    fn check_items(tokenizer: &Tokenizer, ctx: usize) {
        for index in 0..6 {
            let item = item(index, tokenizer, ctx, None).unwrap();
            assert_eq!(item, super::item(index, tokenizer, ctx, None).unwrap());
            let (key, depth) = draw(index);
            assert_eq!((item.key, item.depth), (key, depth));
            assert_eq!(
                item.n_tokens,
                prompt_tokens(tokenizer, &item.prompt).unwrap().len()
            );
            // Within the budget, and one more filler group would not be.
            assert!(
                item.n_tokens + ANSWER_TOKENS <= ctx,
                "{} of {ctx}",
                item.n_tokens
            );
            let groups = item.filler_before + item.filler_after;
            let one_more = prompt(key, item.filler_before, item.filler_after + 1);
            assert!(prompt_tokens(tokenizer, &one_more).unwrap().len() + ANSWER_TOKENS > ctx);
            // The split is the drawn depth, to the nearest group.
            let share = item.filler_before as f64 / groups as f64;
            assert!(
                (share - depth).abs() <= 0.5 / groups as f64,
                "{share} vs {depth}"
            );
            // In tokens: the key sentence starts at about that depth of the filler, and
            // far behind the last 4 + 64 positions.
            let at = item.prompt.find("The pass key is").unwrap();
            assert!(item.prompt[..at].ends_with(FILLER) || item.filler_before == 0);
            assert_eq!(item.prompt.matches(&key.to_string()).count(), 2);
            let header = prompt_tokens(tokenizer, HEADER).unwrap().len();
            let before = prompt_tokens(tokenizer, &item.prompt[..at]).unwrap().len();
            let sentence = tokenizer.encode(&key_sentence(key), false).unwrap().len();
            let question = tokenizer.encode(QUESTION, false).unwrap().len();
            let filler = item.n_tokens - header - sentence - question;
            let token_depth = (before - header) as f64 / filler as f64;
            assert!(
                (token_depth - depth).abs() < 0.02 + 1.0 / groups as f64,
                "item {index}: key at {token_depth:.3} of the filler, drawn {depth:.3}"
            );
            assert!(
                item.n_tokens - before > 4 * (4 + 64),
                "item {index}: key {} tokens from the end",
                item.n_tokens - before
            );
        }
    }

    #[test]
    fn items_fill_the_window_with_the_key_at_its_depth_tiny_tokenizer() {
        let tokenizer = tiny_tokenizer();
        check_items(&tokenizer, 2048);
        check_items(&tokenizer, 1000);
    }

    #[test]
    fn items_fill_the_window_with_the_key_at_its_depth_smollm2_tokenizer() {
        let Some(tokenizer) = smollm2_tokenizer() else {
            return;
        };
        check_items(&tokenizer, DEFAULT_CTX);
        let item = item(0, &tokenizer, DEFAULT_CTX, None).unwrap();
        // "About --passkey-ctx tokens": within one filler group (about 22 tokens).
        assert!(
            item.n_tokens + ANSWER_TOKENS > DEFAULT_CTX - 40,
            "{}",
            item.n_tokens
        );
    }

    #[test]
    fn a_window_too_small_or_too_large_names_the_flag() {
        let tokenizer = tiny_tokenizer();
        let message = item(0, &tokenizer, 64, Some(64)).unwrap_err().to_string();
        assert!(
            message.starts_with("--passkey-ctx 64 is too small"),
            "{message}"
        );
        assert!(message.contains("give at least"), "{message}");
        assert!(
            message.contains("this model cannot run passkey"),
            "{message}"
        );
        let message = check_ctx(0, 64).unwrap_err().to_string();
        assert!(message.starts_with("--passkey-ctx 0"), "{message}");
        let message = check_ctx(4096, 2048).unwrap_err().to_string();
        assert_eq!(
            message,
            "--passkey-ctx 4096 exceeds the model's context window of 2048 tokens; give at most 2048"
        );
        assert!(check_ctx(2048, 2048).is_ok());
    }

    #[test]
    fn the_scorer_wants_the_key_and_nothing_but_it() {
        for good in [
            " 68217.",
            "68217",
            "\n68217 is the pass key",
            " 68217. Remember it.",
        ] {
            assert!(is_correct(good, "68217"), "{good:?}");
        }
        for bad in [
            "6821",
            "68218",
            " 682170",
            " 6 8217",
            " The pass key is 68217",
            "",
            " x68217",
        ] {
            assert!(!is_correct(bad, "68217"), "{bad:?}");
        }
        assert_eq!(answer(" 68217."), "68217");
        assert_eq!(answer(" six"), "");
        assert!(!is_correct("", ""));
    }
}
