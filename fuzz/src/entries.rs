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
