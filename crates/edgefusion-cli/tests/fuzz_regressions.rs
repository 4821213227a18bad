//! Replays, on stable and in plain `cargo test`, every input the fuzzers kept
//! (`fuzz/regressions/<target>/`: crashes found and fixed, and hand-made hostile inputs),
//! and the fixture files as seeds, through the fuzz targets' own entry points: each must
//! return without a panic.

#[path = "../../../fuzz/src/entries.rs"]
mod entries;

use edgefusion_testkit::workspace_root as root;
use std::path::{Path, PathBuf};

/// Files of `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"));
    files.sort();
    files
}

fn replay(target: &str, entry: fn(&[u8]), seeds: &[PathBuf]) -> usize {
    let mut inputs = files(&root().join("fuzz/regressions").join(target));
    inputs.extend_from_slice(seeds);
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let outcome = std::panic::catch_unwind(|| entry(&data));
        assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
    }
    inputs.len()
}

#[test]
fn gguf_inputs_never_panic() {
    let fixtures: Vec<PathBuf> = files(&root().join("tests/fixtures"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    assert!(fixtures.len() >= 5, "the GGUF fixtures are the seeds");
    // Every fixture cut short at a few points, too.
    for path in &fixtures {
        let data = std::fs::read(path).unwrap();
        for cut in [7, 24, 100, data.len() / 2, data.len() - 1] {
            entries::gguf(&data[..cut.min(data.len())]);
        }
    }
    replay("gguf", entries::gguf, &fixtures);
}

#[test]
fn train_configs_never_panic() {
    let configs = files(&root().join("configs"));
    assert!(!configs.is_empty());
    replay("train_config", entries::train_config, &configs);
}

#[test]
fn tokenizer_json_inputs_never_panic() {
    replay("tokenizer_json", entries::tokenizer_json, &[]);
}

#[test]
fn chat_templates_never_panic() {
    replay("chat_template", entries::chat_template, &[]);
}
