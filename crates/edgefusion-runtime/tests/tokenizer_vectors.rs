//! Our tokenizer against independent reference ids.
//!
//! - llama.cpp's tokenizer test vectors (`models/ggml-vocab-*.gguf` with `.inp` / `.out`,
//!   written by its `convert_hf_to_gguf_update.py` from the Hugging Face tokenizers),
//!   read the way `tests/test-tokenizer-0.cpp` reads them and encoded the way it encodes:
//!   no BOS/EOS, special tokens not expected in the inputs.
//! - SmolLM2-135M-Instruct's vocabulary against ids from llama.cpp itself
//!   (`tests/fixtures/smollm2_tokenizer.json`, made by `scripts/make-tokenizer-fixture.py`).
//!
//! The vocabularies and the model are assets, not in git: absent, these tests print a
//! SKIPPED line and pass; CI fetches them first.

use std::path::PathBuf;
use std::time::Instant;

use edgefusion_io::gguf::GgufFile;
use edgefusion_runtime::tokenizer::Tokenizer;

use edgefusion_testkit::{asset, fixture};

/// Splits a `.inp` file on llama.cpp's marker line and pairs each input with the ids on the
/// same-numbered line of `.out`.
fn read_vectors(inp: &str, out: &str) -> Vec<(String, Vec<u32>)> {
    const SEPARATOR: &str = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp;
    while !rest.is_empty() {
        match rest.find(SEPARATOR) {
            Some(end) => {
                inputs.push(rest[..end].to_owned());
                rest = &rest[end + SEPARATOR.len()..];
            }
            None => {
                inputs.push(rest.to_owned());
                rest = "";
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| id.parse().expect("an id in the .out file"))
                .collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        ".inp has {} inputs but .out has {} lines",
        inputs.len(),
        outputs.len()
    );
    inputs.into_iter().zip(outputs).collect()
}

/// Encodes every test input of `ggml-vocab-<name>.gguf` and lists the ones that differ.
/// `None` when the vocabulary files are not there.
fn mismatches(name: &str) -> Option<Vec<String>> {
    let gguf_path = asset(&format!("vocab/ggml-vocab-{name}.gguf"), "--vocab")?;
    let dir = gguf_path.parent().expect("a file in assets/vocab");
    let read = |ext: &str| {
        let path = dir.join(format!("ggml-vocab-{name}.gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let vectors = read_vectors(&read("inp"), &read("out"));
    let gguf = GgufFile::open(&gguf_path).unwrap();
    let started = Instant::now();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    println!(
        "{name}: {} tokens, built in {:.0} ms, {} test inputs",
        tokenizer.vocab_size(),
        started.elapsed().as_secs_f64() * 1e3,
        vectors.len()
    );
    let mut failures = Vec::new();
    for (text, expected) in &vectors {
        let ids = tokenizer.encode(text, false).unwrap();
        if &ids != expected {
            failures.push(format!(
                "{name}: {text:?}\n    expected {expected:?}\n    got      {ids:?}"
            ));
        }
    }
    Some(failures)
}

fn assert_vectors_pass(name: &str) {
    if let Some(failures) = mismatches(name) {
        assert!(
            failures.is_empty(),
            "{} mismatches:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

#[test]
fn llama_bpe() {
    assert_vectors_pass("llama-bpe");
}

#[test]
fn qwen2() {
    assert_vectors_pass("qwen2");
}

#[test]
fn gpt_2() {
    assert_vectors_pass("gpt-2");
}

#[test]
fn gpt2_family_others() {
    for name in [
        "starcoder",
        "refact",
        "command-r",
        "falcon",
        "mpt",
        "deepseek-coder",
        "deepseek-llm",
        "qwen35",
    ] {
        assert_vectors_pass(name);
    }
}

#[test]
fn sentencepiece_llama_and_phi3() {
    for name in ["llama-spm", "phi-3"] {
        assert_vectors_pass(name);
    }
}

/// Vocabulary types we do not implement are refused with the type named.
#[test]
fn unsupported_vocabularies_are_named() {
    for (name, model) in [("bert-bge", "bert"), ("gemma-4", "gemma4")] {
        let Some(path) = asset(&format!("vocab/ggml-vocab-{name}.gguf"), "--vocab") else {
            continue;
        };
        let err = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
        assert!(err.to_string().contains(&format!("`{model}`")), "{err}");
    }
}

// ---------------------------------------------------------------------------------------
// SmolLM2 against llama.cpp

#[derive(serde::Deserialize)]
struct Fixture {
    model: String,
    vocab_size: usize,
    bos_id: u32,
    eos_id: u32,
    add_bos: bool,
    add_eos: bool,
    eog_ids: Vec<u32>,
    cases: Vec<FixtureCase>,
    random_cases: Vec<RandomCase>,
}

/// Seeded random strings: special tokens, digits, odd whitespace, combining marks, emoji.
#[derive(serde::Deserialize)]
struct RandomCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct FixtureCase {
    text: String,
    ids: Vec<u32>,
    ids_add_special: Vec<u32>,
    decoded: String,
    decoded_plain: String,
}

fn read_fixture() -> Fixture {
    let path = fixture("smollm2_tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (make it with scripts/make-tokenizer-fixture.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The SmolLM2 GGUF, or `None` (after a SKIPPED line) when it has not been fetched.
fn smollm2_gguf(model_file: &str) -> Option<GgufFile> {
    let path = asset(&format!("models/{model_file}"), "--model")?;
    Some(GgufFile::open(&path).unwrap())
}

#[test]
fn smollm2_matches_llama_cpp() {
    let fixture = read_fixture();
    let Some(gguf) = smollm2_gguf(&fixture.model) else {
        return;
    };
    let started = Instant::now();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let build_ms = started.elapsed().as_secs_f64() * 1e3;
    println!("SmolLM2 tokenizer built in {build_ms:.0} ms");
    // The engine builds the tokenizer at every start. It takes ~120 ms on one idle core;
    // the bound leaves room for a CI machine busy with the other tests.
    assert!(build_ms < 2000.0, "building took {build_ms:.0} ms");

    assert_eq!(tokenizer.vocab_size(), fixture.vocab_size);
    assert_eq!(tokenizer.bos_id(), Some(fixture.bos_id));
    assert_eq!(tokenizer.eos_id(), Some(fixture.eos_id));
    assert_eq!(tokenizer.add_bos(), fixture.add_bos);
    assert_eq!(tokenizer.add_eos(), fixture.add_eos);
    assert_eq!(tokenizer.eos_ids()[0], fixture.eos_id);
    let mut eog_ids = tokenizer.eos_ids().to_vec();
    eog_ids.sort_unstable();
    assert_eq!(eog_ids, fixture.eog_ids);

    let mut failures = Vec::new();
    for case in &fixture.cases {
        let text = &case.text;
        let ids = tokenizer.encode(text, false).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "encode {text:?}: expected {:?}, got {ids:?}",
                case.ids
            ));
        }
        let with_special = tokenizer.encode(text, true).unwrap();
        if with_special != case.ids_add_special {
            failures.push(format!(
                "encode+special {text:?}: expected {:?}, got {with_special:?}",
                case.ids_add_special
            ));
        }
        let decoded = tokenizer.decode(&case.ids).unwrap();
        if decoded != case.decoded {
            failures.push(format!(
                "decode {text:?}: expected {:?}, got {decoded:?}",
                case.decoded
            ));
        }
        let plain = tokenizer.decode_with(&case.ids, true).unwrap();
        if plain != case.decoded_plain {
            failures.push(format!(
                "decode plain {text:?}: expected {:?}, got {plain:?}",
                case.decoded_plain
            ));
        }
        let mut streamer = tokenizer.streamer();
        let mut streamed = String::new();
        for &id in &case.ids {
            streamed.extend(streamer.push(id).unwrap());
        }
        streamed.extend(streamer.finish());
        if streamed != case.decoded_plain {
            failures.push(format!(
                "stream {text:?}: expected {:?}, got {streamed:?}",
                case.decoded_plain
            ));
        }
    }
    for case in &fixture.random_cases {
        let text = &case.text;
        let ids = tokenizer.encode(text, false).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "encode {text:?}: expected {:?}, got {ids:?}",
                case.ids
            ));
        }
        // Byte-level BPE loses nothing, special tokens included.
        let decoded = tokenizer.decode(&case.ids).unwrap();
        if &decoded != text {
            failures.push(format!("decode {text:?}: got {decoded:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same vocabulary through the `tokenizer.json` path: exported, loaded back beside a
/// `tokenizer_config.json` shaped like SmolLM2's, and held to the same llama.cpp ids.
#[test]
fn smollm2_tokenizer_json_matches_llama_cpp() {
    let fixture = read_fixture();
    let Some(gguf) = smollm2_gguf(&fixture.model) else {
        return;
    };
    let from_gguf = Tokenizer::from_gguf(&gguf).unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2-tokenizer-json");
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("tokenizer.json");
    std::fs::write(&json_path, from_gguf.to_tokenizer_json().unwrap()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}"#,
    )
    .unwrap();

    let tokenizer = Tokenizer::from_tokenizer_json(&json_path).unwrap();
    assert_eq!(tokenizer.vocab_size(), fixture.vocab_size);
    assert_eq!(tokenizer.bos_id(), Some(fixture.bos_id));
    assert_eq!(tokenizer.eos_id(), Some(fixture.eos_id));
    assert_eq!(tokenizer.add_bos(), fixture.add_bos);
    let mut eog_ids = tokenizer.eos_ids().to_vec();
    eog_ids.sort_unstable();
    assert_eq!(eog_ids, fixture.eog_ids);
    for case in &fixture.random_cases {
        assert_eq!(
            tokenizer.encode(&case.text, false).unwrap(),
            case.ids,
            "{:?}",
            case.text
        );
    }
    for case in &fixture.cases {
        assert_eq!(
            tokenizer.encode(&case.text, false).unwrap(),
            case.ids,
            "{:?}",
            case.text
        );
        assert_eq!(
            tokenizer.decode(&case.ids).unwrap(),
            case.decoded,
            "{:?}",
            case.text
        );
    }
}

/// The chat template stored in the GGUF renders to the prompt the fixture tokenized.
#[test]
fn smollm2_chat_template_from_gguf() {
    use edgefusion_runtime::chat::{render_chat, ChatMessage};

    let fixture = read_fixture();
    let Some(gguf) = smollm2_gguf(&fixture.model) else {
        return;
    };
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    let template = tokenizer
        .chat_template()
        .expect("SmolLM2 ships a chat template");
    let bos = tokenizer.token_str(tokenizer.bos_id().unwrap()).unwrap();
    let eos = tokenizer.token_str(tokenizer.eos_id().unwrap()).unwrap();
    let prompt = render_chat(
        template,
        &[ChatMessage::user("What is 2+2?")],
        true,
        bos,
        eos,
    )
    .unwrap();
    let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(prompt, expected);

    let case = fixture
        .cases
        .iter()
        .find(|case| case.text == expected)
        .expect("the fixture tokenizes the chat prompt");
    assert_eq!(
        tokenizer.encode(&prompt, true).unwrap(),
        case.ids_add_special
    );
}
