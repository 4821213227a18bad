//! The binary end to end on the tiny fixture models: output, and one-line errors for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use edgefusion_testkit::fixture;

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
        "--verbose-prompt",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The fixture has no template of its own: ChatML, with the message inside and the
    // assistant's turn opened; `<|im_start|>` is one special token, not split into pieces.
    let err = stderr(&out);
    assert!(
        err.contains(r#"prompt text: "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n""#),
        "{err}"
    );
    assert!(err.contains(r#""<|im_start|>""#), "{err}");
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
    // convert reads folders; a GGUF or an empty folder is refused by name.
    let out = dir.join("converted.gguf");
    assert_fails_with(
        &["convert", "-m", m, "-o", out.to_str().unwrap()],
        &["tiny-llama-f32.gguf", "Hugging Face"],
    );
    assert_fails_with(
        &[
            "convert",
            "-m",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["config.json"],
    );
    assert!(!out.exists());
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
    let reference = stepwise_perplexity(&model, &std::fs::read_to_string(&text).unwrap(), 32);
    assert!(
        (ppl - reference).abs() <= 1e-3 * reference,
        "edgefusion perplexity printed {ppl}, one token at a time gives {reference}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// llama-perplexity's method written out independently of `edgefusion_eval::perplexity`:
/// windows of `ctx` tokens (the first replaced by BOS), each decoded one token at a time from
/// an empty cache, the second half scored with an f64 log-softmax.
fn stepwise_perplexity(model_path: &std::path::Path, text: &str, ctx: usize) -> f64 {
    use edgefusion_io::ModelSource;
    use edgefusion_runtime::{tokenizer::Tokenizer, Logits, Session, SessionOptions};
    let source = ModelSource::open(model_path).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        unreachable!("a GGUF fixture")
    };
    let tokenizer = Tokenizer::from_gguf(gguf).unwrap();
    let model = edgefusion_model::Model::load(&source).unwrap();
    let tokens = tokenizer.encode(text, true).unwrap();
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    let mut session = Session::new(&model, SessionOptions::new(ctx, 1)).unwrap();
    let (mut nll, mut count) = (0.0f64, 0usize);
    for span in tokens.chunks_exact(ctx) {
        session.reset();
        for (pos, &token) in span.iter().enumerate().take(ctx - 1) {
            let input = if pos == 0 {
                bos.unwrap_or(token)
            } else {
                token
            };
            let logits = session.forward(&[input], Logits::Last).unwrap();
            if pos >= ctx / 2 {
                let max = logits.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
                let log_z = max
                    + logits
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                nll += log_z - logits[span[pos + 1] as usize] as f64;
                count += 1;
            }
        }
    }
    assert!(count > 0 && nll.is_finite());
    (nll / count as f64).exp()
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
            "quantize", "-m", input, "-o", never, "--method", "rtn", "--bits", "7",
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
    // --fit: a size below every plan names the smallest that fits; no unit, a context of
    // 0 and another method are refused; nothing is written.
    let fit = |extra: &[&str]| {
        let mut args = vec!["quantize", "-m", input, "-o", never, "--calib", "none"];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for (extra, needles) in [
        (
            &["--fit", "1kB"][..],
            &["below the smallest plan", "raise --fit to at least"][..],
        ),
        (&["--fit", "4"][..], &["no unit", "4GB"][..]),
        (&["--fit", "1GB", "--ctx", "0"][..], &["--ctx 0"][..]),
        (
            &["--fit", "1GB", "--method", "rtn"][..],
            &["--fit", "--method"][..],
        ),
    ] {
        let args = fit(extra);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        assert_fails_with(&args, needles);
    }
    assert!(!std::path::Path::new(never).exists());
    // The smallest size the refusal names does fit, and the plan is printed.
    let out = edgefusion(
        &fit(&["--fit", "1kB"])
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
    );
    let err = stderr(&out);
    let smallest = err
        .split("at least ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .expect("a size in the message");
    let fitted = dir.join("fitted.gguf");
    let size = format!("{smallest}MiB");
    let q = edgefusion(&[
        "quantize",
        "-m",
        input,
        "-o",
        fitted.to_str().unwrap(),
        "--calib",
        "none",
        "--fit",
        &size,
        "--ctx",
        "256",
    ]);
    assert!(q.status.success(), "{}", stderr(&q));
    assert!(
        String::from_utf8_lossy(&q.stdout).contains("plan for"),
        "{}",
        String::from_utf8_lossy(&q.stdout)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Fields of the line in `text` whose first word is `label`, after the line `after`.
fn row_after<'a>(text: &'a str, after: &str, label: &str) -> Option<Vec<&'a str>> {
    let at = text.find(after)?;
    text[at..]
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&label))
}

#[test]
fn inspect_shows_efq_weights_and_tile_widths() {
    let dir = std::env::temp_dir().join(format!("ef-cli-inspect-efq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixture("tiny-llama-f32.gguf");
    let output = dir.join("tiny.efq.gguf");
    let (input, out_s) = (input.to_str().unwrap(), output.to_str().unwrap());
    let q = edgefusion(&[
        "quantize", "-m", input, "-o", out_s, "--bpw", "3.6", "--calib", "none",
    ]);
    assert!(q.status.success(), "{}", stderr(&q));
    let q_text = String::from_utf8_lossy(&q.stdout).into_owned();
    let linear_bpw: f64 = q_text
        .split("layers' linear matrices: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no linear bpw in {q_text}"));

    let inspect = edgefusion(&["inspect", out_s, "--tensors"]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let text = String::from_utf8_lossy(&inspect.stdout).into_owned();
    assert!(
        text.contains("EFQ tile widths") && text.contains("method efq"),
        "{text}"
    );
    // The tensor listing shows EFQ matrices by their shape, not their blob length.
    let q0 = row_after(&text, "tensor", "blk.0.attn_q.weight").expect("attn_q listed");
    assert_eq!(q0[1], "EFQ", "{text}");
    // Weights are counted from the matrices' shapes: the same total as the f32 source.
    let source = edgefusion(&["inspect", input]);
    let source_text = String::from_utf8_lossy(&source.stdout).into_owned();
    let total = |t: &str| row_after(t, "role", "total").expect("total row")[1].to_string();
    assert_eq!(total(&text), total(&source_text), "{text}\n{source_text}");

    // Width table by role: the tile-width percentages of each row add up to 100.
    for role in [
        "token_embd",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
        "output",
        "all",
    ] {
        let f = row_after(&text, "EFQ tile widths", role)
            .unwrap_or_else(|| panic!("no {role} row: {text}"));
        let pct: f64 = f[2..8].iter().map(|v| v.parse::<f64>().unwrap()).sum();
        assert!((pct - 100.0).abs() < 0.2, "{role}: {pct}\n{text}");
    }
    // By layer: one row per layer, and the layers' matrices together at the bpw quantize
    // reported (8.0 if blob bytes were counted as weights).
    for layer in ["0", "1"] {
        let f = row_after(&text, "EFQ tile widths", layer).expect("layer row");
        let pct: f64 = f[2..8].iter().map(|v| v.parse::<f64>().unwrap()).sum();
        assert!((pct - 100.0).abs() < 0.2, "layer {layer}: {pct}\n{text}");
    }
    let layers = row_after(&text, "EFQ tile widths", "layers").expect("layers row");
    let bpw: f64 = layers.last().unwrap().parse().unwrap();
    assert!(
        (bpw - linear_bpw).abs() < 0.01,
        "inspect {bpw} vs quantize {linear_bpw}\n{text}"
    );

    // A corrupted blob: a one-line error naming the file and the tensor, no panic.
    let mut bytes = std::fs::read(&output).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == b"EFQ2")
        .expect("an EFQ blob");
    bytes[at + 3] = b'X';
    let bad = dir.join("bad.efq.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    assert_fails_with(
        &["inspect", bad.to_str().unwrap()],
        &["bad.efq.gguf", "tensor", ".weight", "EFQ2"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `train --dry-run` on both shipped configs (from the repository root, where their
/// relative paths point): the 7B one from its architecture alone, SmolLM2's from the
/// fetched model; a broken config and an untrainable request are one-line errors.
#[test]
fn train_dry_run_plans_both_shipped_configs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let train = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_edgefusion"))
            .arg("train")
            .args(args)
            .current_dir(&root)
            .output()
            .expect("run edgefusion")
    };
    let out = train(&[
        "--config",
        "configs/edgefusion_7b.yaml",
        "--output-dir",
        "runs/7b",
        "--dry-run",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    for words in [
        "22 of 32 layers SSM",
        "6738.42 M",
        "4 GB envelope (weights + state at 4096): hybrid fits",
        "2 layer-local distillation",
        "base frozen",
    ] {
        assert!(text.contains(words), "missing {words:?} in\n{text}");
    }
    let out = train(&[
        "--config",
        "configs/edgefusion_7b.yaml",
        "--output-dir",
        "runs/7b",
        "--dry-run",
        "--freeze-base",
        "false",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("full fine-tuning"), "{text}");

    let model = root.join("assets/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if model.exists() {
        let out = train(&[
            "--config",
            "configs/smollm2_135m.yaml",
            "--output-dir",
            "runs/smollm2",
            "--dry-run",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            text.contains("20 of 30 layers converted to sink 4 + window 64"),
            "{text}"
        );
        assert!(text.contains("134.52 M"), "{text}");
    } else if std::env::var("EDGEFUSION_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "{} missing: scripts/fetch-assets.sh --model",
            model.display()
        );
    }

    let bad = std::env::temp_dir().join(format!("ef-bad-config-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(root.join("configs/smollm2_135m.yaml")).unwrap();
    std::fs::write(&bad, text.replacen("  d_conv: 4", "  d_conv: 40", 1)).unwrap();
    let bad_path = bad.display().to_string();
    let out = train(&["--config", &bad_path, "--output-dir", "x", "--dry-run"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.starts_with("error: "), "{err}");
    assert!(
        err.contains(&bad_path) && err.contains("ssm.d_conv"),
        "{err}"
    );
    let _ = std::fs::remove_file(&bad);
}

/// `bench --ctx` decodes at depth on a hybrid and reports memory; a depth shallower than
/// the decode is refused.
#[test]
fn bench_at_depth_reports_state_bytes() {
    let model = fixture("tiny-hybrid-f32.gguf");
    let model = model.to_str().unwrap();
    let out = edgefusion(&[
        "bench", "-m", model, "-p", "0", "-n", "8", "--ctx", "16,64", "-t", "1", "-r", "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    for words in [
        "tg8 @ ctx 16",
        "tg8 @ ctx 64",
        "KV cache + SSM/window state",
        "MiB",
    ] {
        assert!(text.contains(words), "missing {words:?} in\n{text}");
    }
    assert_fails_with(
        &["bench", "-m", model, "-n", "8", "--ctx", "4"],
        &["--ctx 4", "exceed"],
    );
}

/// `train` end to end on the tiny fixture: all stages run, the hardened hybrid loads and
/// runs, metrics.jsonl logs the router, and a second run reuses the finished stages. A
/// training text shorter than one batch is refused by name.
#[test]
fn train_runs_every_stage_on_the_tiny_model() {
    let (dir, text, config) = tiny_training_dir(
        "train",
        "Four score and seven years ago our fathers brought forth on this continent a new nation. ",
        4,
        50,
    );
    let out_dir = dir.join("run");
    let args = [
        "train",
        "--config",
        config.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
    ];
    let out = edgefusion(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hardened:"), "{stdout}");
    for file in [
        "checkpoint_final/model.gguf",
        "checkpoint_final/router.json",
        "checkpoint_quantized/model.gguf",
        "hybrid_distill.gguf",
        "distill/layer01.safetensors",
    ] {
        assert!(out_dir.join(file).exists(), "{file} missing");
    }
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let router_lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["stage"] == "router")
        .collect();
    assert!(router_lines.len() >= 3, "{metrics}");
    for key in [
        "kl",
        "lambda",
        "tau",
        "ssm_frac",
        "gate_entropy_bits",
        "lr",
        "tokens_per_s",
    ] {
        assert!(router_lines[0].get(key).is_some(), "{key} not logged");
    }
    for model in [
        "checkpoint_final/model.gguf",
        "checkpoint_quantized/model.gguf",
    ] {
        let m = out_dir.join(model);
        let out = edgefusion(&[
            "run",
            "-m",
            m.to_str().unwrap(),
            "--prompt",
            "Four score",
            "-n",
            "4",
        ]);
        assert!(out.status.success(), "{model}: {}", stderr(&out));
    }

    let mut again = args.to_vec();
    again.push("--skip-quantization");
    let out = edgefusion(&again);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("teacher cache found, reused"), "{stdout}");
    assert!(stdout.contains("already distilled, reused"), "{stdout}");

    std::fs::write(&text, "too short").unwrap();
    assert_fails_with(&args, &["train.txt", "fewer than one batch"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// A fresh temporary folder holding `sentence` repeated as the training text (`train.txt`)
/// and a tiny training config reading it (`tiny.yaml`): (folder, text, config).
fn tiny_training_dir(
    name: &str,
    sentence: &str,
    log_every: usize,
    checkpoint_every: usize,
) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("edgefusion-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("train.txt");
    std::fs::write(&text, sentence.repeat(60)).unwrap();
    let config = dir.join("tiny.yaml");
    std::fs::write(
        &config,
        tiny_train_config(&text, log_every, checkpoint_every),
    )
    .unwrap();
    (dir, text, config)
}

/// A training config for the tiny fixture reading `text`.
fn tiny_train_config(text: &std::path::Path, log_every: usize, checkpoint_every: usize) -> String {
    format!(
        "model:\n  base: {model}\ndata:\n  train: {text}\n  seq_len: 32\n  batch_size: 2\n\
         ssm:\n  d_state: 12\n  d_conv: 4\n  init: attention\n\
         router:\n  target_ssm_fraction: 0.5\n  tau_start: 1.0\n  tau_end: 0.2\n  dual_lr: 0.5\n  gate_lr: 0.1\n\
         optimizer:\n  lr: 0.001\n  weight_decay: 0.0\n  betas: [0.9, 0.95]\n  warmup_steps: 2\n  total_steps: 12\n  grad_clip: 1.0\n  dtype: f32\n\
         stages:\n  teacher_tokens: 512\n  teacher_top_k: 16\n  distill_epochs: 1\n  router_steps: 12\n\
         quantization:\n  bpw: 3.5\n  block: 128\n  outliers: 0.005\n  calib: {text}\n  calib_tokens: 256\n  embedding_bits: 4\n\
         logging:\n  log_every: {log_every}\ncheckpointing:\n  every: {checkpoint_every}\n  keep_last: 2\nseed: 1\n",
        model = fixture("tiny-llama-f32.gguf").display(),
        text = text.display(),
    )
}

/// `--debug` runs every stage on a small slice: 100 router steps of one short sequence,
/// then the harden command rewrites the last checkpoint at another share.
#[test]
fn debug_training_runs_a_hundred_steps_end_to_end() {
    let (dir, _, config) = tiny_training_dir(
        "debug",
        "It was the best of times, it was the worst of times, it was the age of wisdom. ",
        4,
        50,
    );
    let out_dir = dir.join("run");
    let out = edgefusion(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--debug",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("debug: 100 router steps"), "{stdout}");
    let steps: Vec<u64> = router_metrics(&out_dir)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps.last(), Some(&100), "{steps:?}");
    assert!(out_dir.join("checkpoint_quantized/model.gguf").exists());

    let all_ssm = dir.join("all-ssm.gguf");
    let out = edgefusion(&[
        "harden",
        "--config",
        config.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--ssm-fraction",
        "1",
        "-o",
        all_ssm.to_str().unwrap(),
    ]);
    // The debug slice is another configuration: its checkpoints are refused under the
    // full one, with a message that says so.
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another configuration"),
        "{}",
        stderr(&out)
    );
    assert!(!all_ssm.exists());
    let out = edgefusion(&[
        "harden",
        "--config",
        config.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--debug",
        "--ssm-fraction",
        "1",
        "-o",
        all_ssm.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("step 100: 2 of 2 layers on SSM"),
        "{stdout}"
    );
    let out = edgefusion(&["inspect", all_ssm.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hybrid: 2 of 2 layers converted (SS;"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    analyze_router_reads_the_run(&dir, &out_dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `analyze-router` on a finished run: the hardened result and its last checkpoint agree,
/// the curves come from metrics.jsonl, the counted savings have the right sign, and the
/// chart is a PNG.
fn analyze_router_reads_the_run(dir: &std::path::Path, out_dir: &std::path::Path) {
    let analyze = |target: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["analyze-router", "--checkpoint", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = edgefusion(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plot = dir.join("router.png");
    let table = analyze(out_dir, &["--plot", plot.to_str().unwrap()]);
    for needle in [
        "gate g",
        "ssm_frac",
        "GFLOPs/token at 8192",
        "KV + SSM state at 4096",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "{} bytes", png.len());

    let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    let last = json(&analyze(out_dir, &["--json"]));
    let summary =
        json(&std::fs::read_to_string(out_dir.join("checkpoint_final/router.json")).unwrap());
    let layers = last["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (l, layer) in layers.iter().enumerate() {
        assert_eq!(layer["route"], summary["layer_types"][l]);
        assert_eq!(layer["gate"], summary["gates"][l]);
    }
    assert_eq!(last["step"], 100);
    assert_eq!(
        last["history"].as_array().unwrap().len(),
        router_metrics(out_dir).len()
    );
    // The checkpoint of the last step, read with the configuration the run saved.
    let step = json(&analyze(
        &out_dir.join("checkpoints/step_000100"),
        &["--json"],
    ));
    for (a, b) in layers.iter().zip(step["layers"].as_array().unwrap()) {
        assert_eq!(a["route"], b["route"]);
        let (ga, gb) = (a["gate"].as_f64().unwrap(), b["gate"].as_f64().unwrap());
        assert!((ga - gb).abs() < 1e-5, "{ga} vs {gb}");
    }
    let n_ssm = layers.iter().filter(|l| l["route"] == "ssm").count();
    let (dense, hybrid) = (&last["dense"], &last["hybrid"]);
    let at_8k = |f: &serde_json::Value, key: &str| f[key][3].as_f64().unwrap();
    if n_ssm > 0 {
        assert!(at_8k(hybrid, "gflops_per_token") < at_8k(dense, "gflops_per_token"));
        assert!(at_8k(hybrid, "state_bytes") < at_8k(dense, "state_bytes"));
    } else {
        assert_eq!(hybrid, dense);
    }
    assert_fails_with(
        &[
            "analyze-router",
            "--checkpoint",
            dir.join("train.txt").to_str().unwrap(),
        ],
        &["train.txt", "not a folder"],
    );
    assert_fails_with(
        &[
            "analyze-router",
            "--checkpoint",
            out_dir.join("distill").to_str().unwrap(),
        ],
        &["distill", "no router result"],
    );
    assert_fails_with(
        &[
            "analyze-router",
            "--checkpoint",
            out_dir.to_str().unwrap(),
            "--plot",
            "router.svg",
        ],
        &["router.svg", "PNG"],
    );
}

/// The router lines of a run's metrics.jsonl.
fn router_metrics(out_dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "router")
        .collect()
}

/// A run stopped mid-way and resumed logs the same router curve as one run straight
/// through: weights, optimizer moments, λ, step and data position all come back. A
/// checkpoint from another config is refused, and a second run without --resume does not
/// overwrite the checkpoints.
#[test]
fn killed_and_resumed_training_equals_the_uninterrupted_run() {
    let (dir, text, config) = tiny_training_dir(
        "resume",
        "We hold these truths to be self-evident, that all men are created equal. ",
        1,
        4,
    );
    let train = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            config.to_str().unwrap(),
            "--skip-quantization",
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        edgefusion(&args)
    };
    let straight = dir.join("straight");
    let out = train(&straight, &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    let resumed = dir.join("resumed");
    let out = train(&resumed, &["--stop-after-steps", "6"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stopped after step 6"),
        "{}",
        stderr(&out)
    );
    // Without --resume the checkpoint is not overwritten.
    let out = train(&resumed, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
    let out = train(&resumed, &["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed from the checkpoint of step 6"));

    let (a, b) = (router_metrics(&straight), router_metrics(&resumed));
    assert_eq!(a.len(), 12);
    assert_eq!(b.len(), 12);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "kl", "loss", "lambda", "gates"] {
            assert_eq!(x[key], y[key], "{key} differs at step {}", x["step"]);
        }
    }
    assert_eq!(
        std::fs::read(straight.join("checkpoint_final/model.gguf")).unwrap(),
        std::fs::read(resumed.join("checkpoint_final/model.gguf")).unwrap()
    );

    // Another configuration cannot resume these checkpoints.
    std::fs::write(
        &config,
        tiny_train_config(&text, 1, 4).replace("seed: 1", "seed: 2"),
    )
    .unwrap();
    let out = train(&resumed, &["--resume"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another configuration"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Training killed with SIGKILL at arbitrary moments (mid-stage, mid-write) and resumed
/// each time ends with the model an uninterrupted run writes: every file that a resume
/// reads was complete when it got its final name.
#[test]
fn training_killed_at_random_moments_resumes_to_the_same_model() {
    let (dir, _text, config) = tiny_training_dir(
        "sigkill",
        "Four score and seven years ago our fathers brought forth on this continent. ",
        1,
        2,
    );
    let args = |out: &std::path::Path, resume: bool| {
        let mut a = vec![
            "train".to_string(),
            "--config".into(),
            config.display().to_string(),
            "--skip-quantization".into(),
            "--output-dir".into(),
            out.display().to_string(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let straight = dir.join("straight");
    let started = std::time::Instant::now();
    let out = edgefusion(
        &args(&straight, false)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let whole = started.elapsed();

    // Kill points spread over the run (a fixed sequence: the test is reproducible in
    // where it aims, the scheduler decides where it lands).
    let killed = dir.join("killed");
    let mut kills = 0;
    for fraction in [0.05, 0.3, 0.55, 0.15, 0.8, 0.4, 0.65, 0.95, 0.25, 0.7] {
        let resume = killed.exists();
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgefusion"))
            .args(args(&killed, resume))
            .env_remove("EDGEFUSION_MODEL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn edgefusion train");
        std::thread::sleep(whole.mul_f64(fraction));
        match child.try_wait().unwrap() {
            Some(status) => {
                let out = child.wait_with_output().unwrap();
                assert!(status.success(), "{}", stderr(&out));
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL on Unix
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    // Finish what is left.
    let a = args(&killed, killed.exists());
    let out = edgefusion(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "after {kills} kills: {}",
        stderr(&out)
    );
    eprintln!("{kills} kills, the whole run {whole:?}");
    assert!(
        kills >= 2,
        "only {kills} kills landed (the run took {whole:?})"
    );
    assert_eq!(
        std::fs::read(straight.join("checkpoint_final/model.gguf")).unwrap(),
        std::fs::read(killed.join("checkpoint_final/model.gguf")).unwrap(),
        "after {kills} kills the model differs from the uninterrupted run's"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Tiny task files in the Hugging Face export layout, for `evaluate` on the tiny model.
fn tiny_tasks(dir: &std::path::Path) {
    let hellaswag = (0..3)
        .map(|i| {
            format!(
                r#"{{"ind": {i}, "activity_label": "Cooking", "ctx_a": "A man cracks eggs into a bowl.", "ctx_b": "he", "endings": ["whisks them.", "sings [title] a song.", "jumps over the dog.", "reads the paper."], "label": "{}"}}"#,
                i % 4
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let arc = (0..3)
        .map(|i| {
            format!(
                r#"{{"id": "q{i}", "question": "Which one is the sun?", "choices": {{"text": ["a star", "a planet", "a moon", "a rock"], "label": ["A", "B", "C", "D"]}}, "answerKey": "{}"}}"#,
                ["A", "B", "C"][i]
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mmlu = |n: usize| {
        (0..n)
            .map(|i| {
                format!(
                    r#"{{"question": "What is {i} plus one?", "subject": "elementary_mathematics", "choices": ["{}", "{}", "{}", "{}"], "answer": {}}}"#,
                    i + 1,
                    i + 2,
                    i,
                    i + 3,
                    i % 4
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let gsm8k = r#"{"question": "Tom has 2 apples and buys 2 more. How many apples does he have?", "answer": "2 + 2 = 4\n#### 4"}
{"question": "A box holds 3 pens. How many pens are in 2 boxes?", "answer": "2 * 3 = 6\n#### 6"}"#;
    std::fs::create_dir_all(dir).unwrap();
    for (file, text) in [
        ("hellaswag_validation.jsonl", hellaswag),
        ("arc_challenge_test.jsonl", arc),
        ("mmlu_dev.jsonl", mmlu(5)),
        ("mmlu_test.jsonl", mmlu(3)),
        ("gsm8k_test.jsonl", gsm8k.to_string()),
    ] {
        std::fs::write(dir.join(file), text + "\n").unwrap();
    }
}

/// `evaluate` runs every task on the tiny model, writes its report, resumes from its cache
/// (also after a run killed mid-record) with the same scores, and names bad input.
#[test]
fn evaluate_scores_every_task_and_resumes_from_its_cache() {
    let dir = std::env::temp_dir().join(format!("edgefusion-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tasks = dir.join("tasks");
    tiny_tasks(&tasks);
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let report = dir.join("report.json");
    let model = fixture("tiny-llama-f32.gguf");
    let args = [
        "evaluate",
        "-m",
        model.to_str().unwrap(),
        "--tasks-dir",
        tasks.to_str().unwrap(),
        "--ppl-file",
        text.to_str().unwrap(),
        "--ppl-ctx",
        "32",
        "--ctx",
        "256",
        "--max-gen-tokens",
        "8",
        "-t",
        "1",
        "-o",
        report.to_str().unwrap(),
    ];
    let out = edgefusion(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "| hellaswag | 0 | 3 | acc_norm",
        "| mmlu | 5 | 3 | acc",
        "| gsm8k | 8 | 2 | exact_match",
        "bits per byte",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
    };
    let first = read();
    let tasks_of = |v: &serde_json::Value| v["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks_of(&first).len(), 4);
    // The 8-shot GSM8K prompt does not fit 256 positions: cut from the left and counted.
    let gsm8k = &tasks_of(&first)[3];
    assert_eq!(gsm8k["task"], "gsm8k");
    assert_eq!(gsm8k["truncated"], 2);
    let ppl = first["perplexity"][0][1]["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0);

    // Again: every item from the cache, the same scores.
    let metrics = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        tasks_of(v).iter().map(|t| t["metrics"].clone()).collect()
    };
    let out = edgefusion(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = read();
    assert_eq!(metrics(&second), metrics(&first));
    for t in tasks_of(&second) {
        assert_eq!(t["cached"], t["items"], "{t}");
    }
    // Every scored item logged, cached or not.
    let samples = dir.join("samples.jsonl");
    let mut logged = args.to_vec();
    logged.extend_from_slice(&["--samples", samples.to_str().unwrap()]);
    let out = edgefusion(&logged);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3 + 3 + 3 + 2);
    assert_eq!(lines[0]["task"], "hellaswag");
    assert_eq!(lines[0]["logliks"].as_array().unwrap().len(), 4);
    assert_eq!(lines[0]["continuations"][1], " sings. a song.");
    assert!(lines[10]["generation"].is_string());
    // A run killed in the middle of writing a record: the partial record is cut, the
    // missing items are computed again, the scores do not change.
    let cache = dir.join("report.cache.jsonl");
    let bytes = std::fs::read(&cache).unwrap();
    std::fs::write(&cache, &bytes[..bytes.len() - 40]).unwrap();
    let out = edgefusion(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("half-written"), "{}", stderr(&out));
    assert_eq!(metrics(&read()), metrics(&first));

    fn with<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut a: Vec<&str> = args[..args.len() - 2].to_vec();
        a.extend_from_slice(extra);
        a
    }
    assert_fails_with(
        &with(&args, &["--tasks", "hellaswag,siqa"]),
        &["siqa", "hellaswag", "arc_challenge", "gsm8k"],
    );
    assert_fails_with(
        &with(&args, &["--limit", "0"]),
        &["--limit", "scores nothing"],
    );
    std::fs::write(
        tasks.join("hellaswag_validation.jsonl"),
        "{\"activity_label\": \"x\"}\n",
    )
    .unwrap();
    assert_fails_with(
        &with(&args, &["--tasks", "hellaswag", "--no-cache"]),
        &["hellaswag_validation.jsonl", "line 1"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `compare` on the tiny model: the five variants built (a conversion trained on the way),
/// evaluated and measured, the table in markdown and JSON, the chart; a second run reuses
/// every variant and cached item.
#[test]
fn compare_builds_evaluates_and_tabulates_five_variants() {
    let (dir, text, config) = tiny_training_dir(
        "compare",
        "The sun rose over the quiet town and the birds began to sing. ",
        4,
        6,
    );
    let tasks = dir.join("tasks");
    tiny_tasks(&tasks);
    let out = dir.join("compare");
    let model = fixture("tiny-llama-f32.gguf");
    let args = [
        "compare",
        "--base",
        model.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--tasks",
        "ppl,hellaswag,arc_challenge",
        "--limit",
        "2",
        "--tasks-dir",
        tasks.to_str().unwrap(),
        "--ppl-file",
        text.to_str().unwrap(),
        "--ppl-ctx",
        "32",
        "--ctx",
        "128",
        "--bench-ctx",
        "48",
        "--bench-tokens",
        "8",
        "--window",
        "8",
        "--sink",
        "1",
        "-t",
        "1",
        "-o",
        out.to_str().unwrap(),
    ];
    let run = edgefusion(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let table = std::fs::read_to_string(out.join("compare.md")).unwrap();
    for needle in [
        "| | Dense | GPTQ-4bit | Mamba-pure | Window-only | EdgeFusion |",
        "| PPL |",
        "| HellaSwag (acc_norm, %) |",
        "2 of 3 items (--limit)",
        "| Peak memory (GB) |",
        "| Tokens/s |",
        "| GFLOPs/token |",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let variants = json["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 5);
    assert_eq!(variants[2]["n_converted_layers"], variants[2]["n_layers"]);
    // Window-only converts the layer EdgeFusion converted.
    assert_eq!(variants[3]["name"], "Window-only");
    assert_eq!(variants[3]["n_converted_layers"], 1);
    assert_eq!(variants[4]["n_converted_layers"], 1);
    for v in variants {
        assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0, "{v}");
    }
    // Mamba-pure and Window-only do less work per token than Dense at depth.
    // (Unwrapped: an Option comparison would pass with a missing value, None < Some.)
    let gflops = |i: usize| {
        variants[i]["gflops_per_token"]
            .as_f64()
            .expect("gflops_per_token")
    };
    assert!(gflops(2) < gflops(0) && gflops(3) < gflops(0));
    let png = std::fs::read(out.join("compare.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    // Again: nothing rebuilt, every item from the caches, the same table.
    let again = edgefusion(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        !stderr(&again).contains("training the conversion"),
        "{}",
        stderr(&again)
    );
    let json2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    for (a, b) in variants.iter().zip(json2["variants"].as_array().unwrap()) {
        assert_eq!(
            a["eval"]["tasks"][0]["metrics"],
            b["eval"]["tasks"][0]["metrics"]
        );
        assert_eq!(b["eval"]["tasks"][0]["cached"], 2);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `convert --window-layers`: listed layers or a joint choice (`auto`) become sink + window
/// attention in a file every command runs; bad lists and counts are refused by name.
#[test]
fn convert_windows_listed_or_chosen_layers() {
    let dir = std::env::temp_dir().join(format!("edgefusion-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The river ran past the mill and the miller counted his sacks of grain. ".repeat(40),
    )
    .unwrap();
    let model = fixture("tiny-llama-f32.gguf");
    let model = model.to_str().unwrap();
    let listed = dir.join("listed.gguf");
    let out = edgefusion(&[
        "convert",
        "-m",
        model,
        "--window-layers",
        "1",
        "--window",
        "4",
        "--sink",
        "1",
        "-o",
        listed.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let inspect = edgefusion(&["inspect", listed.to_str().unwrap()]);
    let shown = String::from_utf8_lossy(&inspect.stdout);
    assert!(shown.contains("1 of 2 layers converted (AW;"), "{shown}");
    assert!(
        shown.contains("window: sink 1 + last 4 positions"),
        "{shown}"
    );
    let chosen = dir.join("chosen.gguf");
    let out = edgefusion(&[
        "convert",
        "-m",
        model,
        "--window-layers",
        "auto",
        "--convert",
        "1",
        "--window",
        "4",
        "--sink",
        "1",
        "--choice-text",
        text.to_str().unwrap(),
        "--choice-ctx",
        "32",
        "-t",
        "1",
        "-o",
        chosen.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout.contains("chose 1 of 2 layers by joint KL"),
        "{stdout}"
    );
    let ppl = edgefusion(&[
        "perplexity",
        "-m",
        chosen.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "32",
        "--chunks",
        "2",
        "-t",
        "1",
    ]);
    assert!(ppl.status.success(), "{}", stderr(&ppl));
    let base = ["convert", "-m", model, "-o", "/dev/null", "--window-layers"];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    assert_fails_with(&with(&["3-1"]), &["--window-layers", "backwards"]);
    assert_fails_with(&with(&["7"]), &["layer 7", "2 layers"]);
    assert_fails_with(&with(&["1", "--window", "0"]), &["window of 0"]);
    assert_fails_with(
        &with(&["1", "--window", "64"]),
        &["edgefusion.window", "context length 64"],
    );
    assert_fails_with(
        &with(&["auto", "--convert", "5"]),
        &["--convert 5", "2 layers"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A copy of fixture `name` in `dir` whose GGUF `llama.context_length` says `n_ctx`: the
/// tiny models are made with 64 positions, fewer than the fixed text of a passkey prompt
/// takes, and nothing else in them depends on it.
fn with_context_length(name: &str, n_ctx: u32, dir: &std::path::Path) -> PathBuf {
    let mut bytes = std::fs::read(fixture(name)).unwrap();
    let key = b"llama.context_length";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("a context_length key")
        + key.len();
    // After the key: the value's type (4, UINT32) and the value, little-endian.
    assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "{name}");
    bytes[at + 4..at + 8].copy_from_slice(&n_ctx.to_le_bytes());
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `evaluate --tasks passkey` on a dense and a hybrid tiny model: prompts sized to
/// --passkey-ctx, a reported accuracy, items cached; a --passkey-ctx of 0, beyond the
/// model's window or too small for the prompt is a one-line error naming the flag.
#[test]
fn evaluate_passkey_scores_dense_and_hybrid_and_checks_its_window() {
    let dir = std::env::temp_dir().join(format!("edgefusion-passkey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["tiny-llama-f32.gguf", "tiny-hybrid-f32.gguf"] {
        let model = with_context_length(name, 1024, &dir);
        let report = dir.join(format!("{name}.json"));
        let samples = dir.join(format!("{name}.samples.jsonl"));
        let args = [
            "evaluate",
            "-m",
            model.to_str().unwrap(),
            "--tasks",
            "passkey",
            "--passkey-ctx",
            "400",
            "--limit",
            "3",
            "-t",
            "1",
            "--samples",
            samples.to_str().unwrap(),
            "-o",
            report.to_str().unwrap(),
        ];
        let out = edgefusion(&args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("| passkey (400-token window) | 0 | 3 | acc |"),
            "{name}:\n{stdout}"
        );
        let read = || -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
        };
        let first = read();
        let task = &first["tasks"][0];
        assert_eq!(task["task"], "passkey");
        assert_eq!(task["items"], 3);
        assert_eq!(task["ctx"], 400);
        assert_eq!(task["truncated"], 0);
        let acc = task["metrics"][0]["value"]["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{acc}");
        assert_eq!(task["metrics"][0]["name"], "acc");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        for line in &lines {
            let prompt = line["context"].as_str().unwrap();
            let key = line["gold"].as_str().unwrap();
            assert_eq!(key.len(), 5);
            assert!(
                prompt.contains(&format!("The pass key is {key}.")),
                "{prompt}"
            );
            assert!(prompt.ends_with("What is the pass key? The pass key is"));
            assert!(line["generation"].is_string());
        }
        // Again: every item from the cache, the same score.
        let out = edgefusion(&args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let second = read();
        assert_eq!(second["tasks"][0]["cached"], 3);
        assert_eq!(second["tasks"][0]["metrics"], first["tasks"][0]["metrics"]);
    }

    let wide = with_context_length("tiny-llama-f32.gguf", 1024, &dir);
    let wide = wide.to_str().unwrap();
    let narrow = fixture("tiny-llama-f32.gguf");
    let narrow = narrow.to_str().unwrap();
    fn passkey<'a>(model: &'a str, ctx: &'a str) -> [&'a str; 8] {
        [
            "evaluate",
            "-m",
            model,
            "--tasks",
            "passkey",
            "--passkey-ctx",
            ctx,
            "--no-cache",
        ]
    }
    assert_fails_with(&passkey(wide, "0"), &["--passkey-ctx 0"]);
    assert_fails_with(
        &passkey(wide, "2048"),
        &["--passkey-ctx 2048", "context window of 1024"],
    );
    assert_fails_with(
        &passkey(wide, "100"),
        &["--passkey-ctx 100 is too small", "give at least"],
    );
    // The default window, 2048, on the 64-position model as it is.
    assert_fails_with(
        &["evaluate", "-m", narrow, "--tasks", "passkey", "--no-cache"],
        &["--passkey-ctx 2048", "context window of 64"],
    );
    assert_fails_with(
        &passkey(narrow, "64"),
        &["--passkey-ctx 64 is too small", "cannot run passkey"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `chart` draws a series table as a PNG, and refuses a table it cannot read or a log axis
/// with a point at or below zero, naming the file; nothing is written then.
#[test]
fn chart_draws_a_table_and_refuses_bad_ones() {
    let dir = std::env::temp_dir().join(format!("ef-cli-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = dir.join("curve.tsv");
    std::fs::write(
        &table,
        "edgefusion\tefq 3.1\t3.10\t9.6\nedgefusion\tefq 5.5\t5.50\t0.3\nllama.cpp\tQ4_K_M\t5.53\t0.72\n",
    )
    .unwrap();
    let png = dir.join("curve.png");
    let (table_s, png_s) = (table.to_str().unwrap(), png.to_str().unwrap());
    let out = edgefusion(&["chart", table_s, "-o", png_s, "--log-y", "--title", "t"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let never = dir.join("never.png");
    let never_s = never.to_str().unwrap();
    std::fs::write(&table, "edgefusion\tzero\t3.0\t0\n").unwrap();
    assert_fails_with(
        &["chart", table_s, "-o", never_s, "--log-y"],
        &["curve.tsv", "--log-y"],
    );
    std::fs::write(&table, "edgefusion\t3.0\t0\n").unwrap();
    assert_fails_with(&["chart", table_s, "-o", never_s], &["curve.tsv line 1"]);
    assert!(!never.exists());
    std::fs::remove_dir_all(&dir).ok();
}
