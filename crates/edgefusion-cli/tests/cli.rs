//! The binary end to end on the tiny fixture models: output, and one-line errors for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn edgefusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgefusion"))
        .args(args)
        .env_remove("EDGEFUSION_MODEL")
        .output()
        .expect("run edgefusion")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failing run: non-zero exit, an `error:` line mentioning every `needles`, no panic.
fn assert_fails_with(args: &[&str], needles: &[&str]) {
    let out = edgefusion(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(
            err.contains(n),
            "{args:?}: error should mention {n:?}: {err}"
        );
    }
}

#[test]
fn run_generates_and_profiles() {
    let model = fixture("tiny-llama-f32.gguf");
    let out = edgefusion(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The old teacher",
        "-n",
        "8",
        "--temp",
        "0",
        "--profile",
        "-t",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("The old teacher"), "{text}");
    let err = stderr(&out);
    for field in [
        "time to 1st token",
        "prefill",
        "decode",
        "peak RSS",
        "weights",
        "KV cache",
        "GFLOP/token",
    ] {
        assert!(err.contains(field), "profile lacks {field}: {err}");
    }
}

#[test]
fn chat_mode_uses_the_template() {
    let model = fixture("tiny-llama-q8_0.gguf");
    let out = edgefusion(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
        "-n",
        "4",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn inspect_bench_and_help() {
    let model = fixture("tiny-llama-q4_0.gguf");
    let m = model.to_str().unwrap();
    let out = edgefusion(&["inspect", m, "--tensors"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("attn_q") && text.contains("Q4_0") && text.contains("total"),
        "{text}"
    );

    let out = edgefusion(&[
        "bench", "--model", m, "-p", "16", "-n", "4", "-t", "1,2", "-r", "1", "-o", "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench json");
    assert_eq!(rows.as_array().map(|r| r.len()), Some(4));

    let out = edgefusion(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("perplexity"));
    let out = edgefusion(&["--version"]);
    assert!(out.status.success());
}

#[test]
fn bad_input_gives_one_line_errors() {
    let model = fixture("tiny-llama-f32.gguf");
    let m = model.to_str().unwrap();
    assert_fails_with(
        &["run", "--model", "/nonexistent/model.gguf", "--prompt", "x"],
        &["/nonexistent/model.gguf"],
    );
    let dir = std::env::temp_dir().join(format!("edgefusion-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An empty directory is neither a GGUF file nor a Hugging Face folder.
    assert_fails_with(
        &["run", "--model", dir.to_str().unwrap(), "--prompt", "x"],
        &["config.json"],
    );
    // A truncated GGUF.
    let bytes = std::fs::read(&model).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    assert_fails_with(&["inspect", cut.to_str().unwrap()], &["cut.gguf"]);
    // Not a GGUF at all.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    assert_fails_with(
        &["run", "--model", junk.to_str().unwrap(), "--prompt", "x"],
        &["junk.gguf"],
    );
    assert_fails_with(
        &["run", "--model", m, "--prompt", "x", "-t", "0"],
        &["threads"],
    );
    // The fixture's context is 64 tokens.
    let long_prompt = "word ".repeat(200);
    assert_fails_with(
        &["run", "--model", m, "--prompt", &long_prompt],
        &["context"],
    );
    assert_fails_with(
        &["perplexity", "--model", m, "--file", "/nonexistent.txt"],
        &["/nonexistent.txt"],
    );
    assert_fails_with(
        &["perplexity", "--model", m, "--file", dir.to_str().unwrap()],
        &["directory"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn perplexity_on_a_small_text() {
    let model = fixture("tiny-llama-f32.gguf");
    let dir = std::env::temp_dir().join(format!("edgefusion-ppl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let out = edgefusion(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--ctx",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ppl: f64 = stdout
        .split("PPL = ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no PPL in {stdout}"));
    // A random model over a 512-token vocabulary: finite and not absurdly far from uniform.
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 5000.0, "{ppl}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn quantize_writes_a_model_the_other_commands_load() {
    let dir = std::env::temp_dir().join(format!("ef-cli-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-f32.gguf");
    let output = dir.join("tiny.efq.gguf");
    let (input, out_s) = (input.to_str().unwrap(), output.to_str().unwrap());
    let q = edgefusion(&[
        "quantize", "-m", input, "-o", out_s, "--bpw", "3.6", "--calib", "none",
    ]);
    assert!(q.status.success(), "{}", stderr(&q));
    let stdout = String::from_utf8_lossy(&q.stdout);
    assert!(
        stdout.contains("bits/weight") && stdout.contains("tile widths"),
        "{stdout}"
    );
    let run = edgefusion(&["run", "-m", out_s, "-p", "hello", "-n", "4", "--temp", "0"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let inspect = edgefusion(&["inspect", out_s]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    // Bad options and inputs: one-line errors, nothing written.
    let never = dir.join("never.gguf");
    let never = never.to_str().unwrap();
    assert_fails_with(
        &["quantize", "-m", input, "-o", never, "--bpw", "1.5"],
        &["--bpw"],
    );
    assert_fails_with(
        &[
            "quantize", "-m", input, "-o", never, "--method", "rtn", "--bits", "5",
        ],
        &["--bits"],
    );
    assert_fails_with(
        &["quantize", "-m", out_s, "-o", never],
        &["already an EFQ model"],
    );
    assert_fails_with(
        &["quantize", "-m", "/nonexistent.gguf", "-o", never],
        &["/nonexistent.gguf"],
    );
    assert!(!std::path::Path::new(never).exists());
    std::fs::remove_dir_all(&dir).ok();
}
