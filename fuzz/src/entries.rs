//! What each fuzz target does with its input. Every reader must return (an error or a
//! value) for any input: a panic, an abort, a hang or an allocation out of proportion to the
//! input is a bug. This file is also compiled into the stable regression test
//! (`crates/edgefusion-cli/tests/fuzz_regressions.rs`), which replays every input kept in
//! `fuzz/regressions/<target>/`.

use std::path::{Path, PathBuf};

/// A scratch file for readers that take a path (tmpfs when there is one).
fn scratch(name: &str) -> PathBuf {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("edgefusion-fuzz-{}-{name}", std::process::id()))
}

/// A GGUF file: header, metadata, tensor table and data bounds; then, when it opens, the
/// model config (hybrid layer keys included), the vocabulary and the weights bound to
/// their roles.
pub fn gguf(data: &[u8]) {
    let path = scratch("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(source) = edgefusion_io::ModelSource::open(&path) {
        if let edgefusion_io::ModelSource::Gguf(gguf) = &source {
            if let Ok(tokenizer) = edgefusion_runtime::tokenizer::Tokenizer::from_gguf(gguf) {
                if let Ok(ids) = tokenizer.encode("Hello, world! 123 ünïcödé", true) {
                    let _ = tokenizer.decode(&ids);
                }
            }
        }
        let _ = edgefusion_model::Model::load(&source);
    }
    let _ = std::fs::remove_file(&path);
}

/// A training configuration (YAML) and its validation.
pub fn train_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = edgefusion_train::config::TrainConfig::parse(&text, "fuzz.yaml");
}

/// A Hugging Face `tokenizer.json`; when it loads, the rest of the input is encoded and
/// the ids decoded back.
pub fn tokenizer_json(data: &[u8]) {
    let dir = scratch("tokenizer");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let path = dir.join("tokenizer.json");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(tokenizer) = edgefusion_runtime::tokenizer::Tokenizer::from_tokenizer_json(&path)
        {
            let text = String::from_utf8_lossy(&data[data.len() / 2..]);
            if let Ok(ids) = tokenizer.encode(&text, true) {
                let _ = tokenizer.decode(&ids);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chat template (Jinja) rendered over a short conversation.
pub fn chat_template(data: &[u8]) {
    use edgefusion_runtime::chat::{render_chat, ChatMessage};
    let template = String::from_utf8_lossy(data);
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "hi {{ x }} {% if %}".into(),
        },
    ];
    let _ = render_chat(&template, &messages, true, "<s>", "</s>");
}

/// The separator between the files of a multi-file input (`hf_folder`).
pub const PART_SEPARATOR: &[u8] = b"\n%%edgefusion-fuzz-part%%\n";

/// A Hugging Face model folder: `config.json` (hybrid layer keys included), then either one
/// `model.safetensors` or a `model.safetensors.index.json` followed by its shards, named
/// `s0.safetensors`, `s1.safetensors`, … in input order. The parts are separated by
/// [`PART_SEPARATOR`]; a second part that starts with `{` is the index. When the folder
/// opens, the model is loaded and run for two tokens.
pub fn hf_folder(data: &[u8]) {
    let dir = scratch("hf");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    if hf_folder_files(data)
        .iter()
        .all(|(name, bytes)| std::fs::write(dir.join(name), bytes).is_ok())
    {
        if let Ok(source) = edgefusion_io::ModelSource::open(&dir) {
            if let Ok(model) = edgefusion_model::Model::load(&source) {
                run_two_tokens(&model);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The files of an [`hf_folder`] input: (file name, contents).
pub fn hf_folder_files(data: &[u8]) -> Vec<(String, &[u8])> {
    let parts = split_parts(data);
    let mut files = vec![("config.json".to_string(), parts[0])];
    match parts.get(1) {
        Some(p) if p.first() == Some(&b'{') => {
            files.push(("model.safetensors.index.json".into(), p));
            for (i, shard) in parts[2..].iter().enumerate() {
                files.push((format!("s{i}.safetensors"), shard));
            }
        }
        Some(p) => files.push(("model.safetensors".into(), p)),
        None => {}
    }
    files
}

fn split_parts(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest
        .windows(PART_SEPARATOR.len())
        .position(|w| w == PART_SEPARATOR)
    {
        parts.push(&rest[..at]);
        rest = &rest[at + PART_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// A forward pass of two tokens over a small context, when the model is small enough to
/// run within the fuzzer's limits.
fn run_two_tokens(model: &edgefusion_model::Model) {
    use edgefusion_runtime::{Logits, Session, SessionOptions};
    let cfg = &model.config;
    if cfg.d_model.saturating_mul(cfg.vocab_size) > 1 << 22 || cfg.n_layers > 8 {
        return;
    }
    if let Ok(mut session) = Session::new(model, SessionOptions::new(8, 1)) {
        let last = (cfg.vocab_size.saturating_sub(1)) as u32;
        let _ = session.forward(&[0, last], Logits::Last);
    }
}

/// An EFQ matrix blob. When it parses, every row is dequantized and the matrix is
/// multiplied by an activation row on every ISA this CPU runs, which must agree with the
/// scalar reference bit for bit (the kernels promise one order of float operations).
pub fn efq_blob(data: &[u8]) {
    use edgefusion_kernels::cpu::Isa;
    use edgefusion_kernels::efq::{matmul_on, ActQ8, EfqMatrix};
    let Ok(m) = EfqMatrix::parse(data) else {
        return;
    };
    let mut row = vec![0f32; m.n_in];
    for r in 0..m.n_out {
        m.dequantize_row(r, &mut row);
    }
    let x: Vec<f32> = (0..m.n_in)
        .map(|c| ((c * 7 % 13) as f32 - 6.0) / 4.0)
        .collect();
    let mut act = vec![0u8; ActQ8::row_bytes(m.n_in)];
    if m.rotation != 0 {
        ActQ8::quantize_row_rotated(&x, &mut act);
    } else {
        ActQ8::quantize_row(&x, &mut act);
    }
    let mut scalar = vec![0f32; m.n_out];
    matmul_on(Isa::Scalar, &m, 0, m.n_out, &act, 1, &mut scalar, m.n_out);
    for isa in edgefusion_kernels::cpu::available_isas() {
        let mut simd = vec![0f32; m.n_out];
        matmul_on(isa, &m, 0, m.n_out, &act, 1, &mut simd, m.n_out);
        let same = simd
            .iter()
            .zip(&scalar)
            .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(
            same,
            "EFQ {} kernels disagree with the scalar reference",
            isa.name()
        );
    }
}

/// A task file (jsonl). The first byte picks the item type (HellaSwag, ARC, MMLU, GSM8K,
/// GSM8K shots); when the rest parses, the first items are turned into the harness's
/// requests with every item after the first as few-shot examples.
pub fn task_jsonl(data: &[u8]) {
    use edgefusion_eval::prompts;
    use edgefusion_eval::tasks::{ArcItem, Gsm8kItem, Gsm8kShot, HellaswagItem, MmluItem};
    use edgefusion_eval::TaskItem;
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Ok(items) = HellaswagItem::parse("fuzz.jsonl", body) {
                for item in items.iter().take(4) {
                    let _ = prompts::hellaswag_request(item, &items[1..]).continuations();
                }
            }
        }
        1 => {
            if let Ok(items) = ArcItem::parse("fuzz.jsonl", body) {
                for item in items.iter().take(4) {
                    let _ = prompts::arc_request(item, &items[1..]).continuations();
                }
            }
        }
        2 => {
            if let Ok(items) = MmluItem::parse("fuzz.jsonl", body) {
                for item in items.iter().take(4) {
                    let _ = prompts::mmlu_request(item, &items[1..]).continuations();
                }
            }
        }
        3 => {
            if let Ok(items) = Gsm8kItem::parse("fuzz.jsonl", body) {
                let shots = prompts::gsm8k_cot_shots();
                for item in items.iter().take(4) {
                    let request = prompts::gsm8k_cot_request(item, &shots);
                    let _ = request.cut(&item.solution);
                    let _ = edgefusion_eval::gsm8k::score(&item.solution, &item.target);
                }
            }
        }
        _ => {
            if let Ok(shots) = Gsm8kShot::parse("fuzz.jsonl", body) {
                if let Some(item) = Gsm8kItem::parse("fuzz.jsonl", body)
                    .ok()
                    .and_then(|i| i.into_iter().next())
                {
                    let _ = prompts::gsm8k_cot_request(&item, &shots);
                }
            }
        }
    }
}
