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

/// With `EDGEFUSION_FUZZ_SEEDS=<dir>` (set by `scripts/fuzz.sh`), seeds built here in
/// memory are also written to `<dir>/<target>/` to start the fuzzer's corpus.
fn keep_seeds(target: &str, seeds: &[(String, Vec<u8>)]) {
    let Some(dir) = std::env::var_os("EDGEFUSION_FUZZ_SEEDS") else {
        return;
    };
    let dir = PathBuf::from(dir).join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Runs `entry` on in-memory seeds; each must return without a panic.
fn replay_built(target: &str, entry: fn(&[u8]), seeds: &[(String, Vec<u8>)]) {
    keep_seeds(target, seeds);
    for (name, data) in seeds {
        let outcome = std::panic::catch_unwind(|| entry(data));
        assert!(outcome.is_ok(), "{target}: seed {name} panicked");
    }
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

/// A GGUF fixture as the files of a Hugging Face folder: `config.json` and the tensors
/// under their Hugging Face names, in one safetensors file or in `shards` of them.
fn hf_folder_seed(fixture: &str, shards: usize) -> Vec<u8> {
    use edgefusion_io::gguf::GgufFile;
    use edgefusion_io::names::parse_gguf_name;
    use edgefusion_model::ModelConfig;
    use safetensors::tensor::TensorView;

    let gguf = GgufFile::open(root().join("tests/fixtures").join(fixture)).unwrap();
    let tied = gguf.tensor_view("output.weight").is_none();
    let cfg = ModelConfig::from_gguf(&gguf, tied).unwrap();
    let mut tensors = Vec::new();
    for t in &gguf.tensors {
        let view = gguf.view(t);
        let (role, layer) = parse_gguf_name(view.name).expect("fixture tensors have roles");
        let dtype = match view.dtype {
            edgefusion_kernels::GgmlType::F16 => safetensors::Dtype::F16,
            edgefusion_kernels::GgmlType::F32 => safetensors::Dtype::F32,
            other => panic!(
                "{fixture}: {} has {other:?}; seeds use f32/f16 fixtures",
                view.name
            ),
        };
        let shape: Vec<usize> = view.shape.iter().rev().copied().collect();
        tensors.push((role.hf_name(layer), dtype, shape, view.data.to_vec()));
    }
    let serialize = |part: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]| {
        let views: Vec<(&str, TensorView)> = part
            .iter()
            .map(|(name, dtype, shape, data)| {
                let view = TensorView::new(*dtype, shape.clone(), data).unwrap();
                (name.as_str(), view)
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    let layer_types: Vec<&str> = cfg.layer_types.iter().map(|t| t.name()).collect();
    let config = serde_json::json!({
        "model_type": cfg.arch.name(),
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_ctx_train,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": tied,
        "layer_types": layer_types,
        "ssm_d_state": cfg.ssm_d_state,
        "ssm_d_conv": cfg.ssm_d_conv,
        "window": cfg.window,
        "sink": cfg.sink,
    });
    let mut parts = vec![config.to_string().into_bytes()];
    if shards <= 1 {
        parts.push(serialize(&tensors));
    } else {
        let per_shard = tensors.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        let mut files = Vec::new();
        for (i, chunk) in tensors.chunks(per_shard).enumerate() {
            for (name, ..) in chunk {
                weight_map.insert(name.clone(), format!("s{i}.safetensors").into());
            }
            files.push(serialize(chunk));
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        parts.push(index.to_string().into_bytes());
        parts.extend(files);
    }
    parts.join(entries::PART_SEPARATOR)
}

#[test]
fn hf_folder_inputs_never_panic() {
    let mut seeds = vec![
        (
            "tiny-llama-f16".to_string(),
            hf_folder_seed("tiny-llama-f16.gguf", 1),
        ),
        (
            "tiny-llama-f16-sharded".to_string(),
            hf_folder_seed("tiny-llama-f16.gguf", 3),
        ),
        (
            "tiny-hybrid-f32".to_string(),
            hf_folder_seed("tiny-hybrid-f32.gguf", 1),
        ),
    ];
    // Each seed must be a folder that loads, or the fuzzer starts from nothing useful.
    for (name, data) in &seeds {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-seed-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, bytes) in entries::hf_folder_files(data) {
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        let source = edgefusion_io::ModelSource::open(&dir).unwrap();
        edgefusion_model::Model::load(&source).unwrap_or_else(|e| panic!("seed {name}: {e}"));
    }
    // Cut short and with flipped header bytes, too.
    let whole = seeds[0].1.clone();
    let config_len = whole
        .windows(entries::PART_SEPARATOR.len())
        .position(|w| w == entries::PART_SEPARATOR)
        .unwrap();
    for cut in [10, config_len + 40, whole.len() / 2, whole.len() - 1] {
        seeds.push((format!("cut-{cut}"), whole[..cut].to_vec()));
    }
    let header = config_len + entries::PART_SEPARATOR.len();
    for (i, at) in [header, header + 3, header + 9, header + 60]
        .into_iter()
        .enumerate()
    {
        let mut bytes = whole.clone();
        bytes[at] ^= 0x5a;
        seeds.push((format!("flipped-{i}"), bytes));
    }
    replay_built("hf_folder", entries::hf_folder, &seeds);
    replay("hf_folder", entries::hf_folder, &[]);
}

/// An EFQ matrix of `n_out × n_in` with every tile width, zero points and outliers, with
/// the given rotation word, as a version-2 blob (or version 1 when `v1`).
fn efq_seed(n_out: usize, n_in: usize, rotation: u32, v1: bool) -> Vec<u8> {
    use edgefusion_kernels::efq::{n_tiles, EfqParts};
    let nt = n_tiles(n_in);
    let groups = n_out / 16;
    let widths: Vec<u8> = (0..groups * nt).map(|i| 2 + (i % 3) as u8).collect();
    let width_at = |r: usize, c: usize| widths[(r / 16) * nt + c / 128];
    let parts = EfqParts {
        n_out,
        n_in,
        row_scales: (0..n_out)
            .map(|r| half::f16::from_f32(0.01 + r as f32 * 1e-3).to_bits())
            .collect(),
        block_scales: (0..n_out * nt).map(|i| (i * 37 % 251) as u8 + 1).collect(),
        zeros: (0..n_out * nt)
            .map(|i| (i % 4) as u8 % (1 << widths[(i / nt / 16) * nt + i % nt]))
            .collect(),
        codes: (0..n_out * n_in)
            .map(|i| (i * 11 % 16) as u8 % (1 << width_at(i / n_in, i % n_in)))
            .collect(),
        outlier_scales: vec![half::f16::from_f32(0.02).to_bits(); groups],
        outliers: vec![
            (0, 3, 17),
            (5, n_in as u32 - 1, -31),
            (n_out as u32 - 1, 130, 2),
        ],
        widths,
        rotation,
    };
    if v1 {
        parts.to_bytes_v1().unwrap()
    } else {
        parts.to_bytes().unwrap()
    }
}

#[test]
fn efq_blobs_never_panic() {
    let mut seeds = vec![
        ("efq-32x160".to_string(), efq_seed(32, 160, 0, false)),
        ("efq-16x576".to_string(), efq_seed(16, 576, 0, false)),
        (
            "efq-16x576-rotated".to_string(),
            efq_seed(16, 576, 64, false),
        ),
        ("efq-32x160-v1".to_string(), efq_seed(32, 160, 0, true)),
    ];
    let whole = seeds[0].1.clone();
    for cut in [3, 16, whole.len() / 2, whole.len() - 1] {
        seeds.push((format!("cut-{cut}"), whole[..cut].to_vec()));
    }
    for at in [4, 8, 12, 16, whole.len() / 2, whole.len() - 2] {
        let mut bytes = whole.clone();
        bytes[at] ^= 0x33;
        seeds.push((format!("flipped-{at}"), bytes));
    }
    replay_built("efq_blob", entries::efq_blob, &seeds);
    replay("efq_blob", entries::efq_blob, &[]);
}

/// Task-file seeds: the selector byte of each item type, then the first lines of its file
/// from the fetched tasks (when present) or a hand-written item.
#[test]
fn task_jsonl_inputs_never_panic() {
    let tasks = edgefusion_testkit::assets_dir().join("tasks");
    let hand = [
        r#"{"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "endings": ["bakes.", "runs.", "sings.", "naps."], "label": "0"}"#,
        r#"{"id": "q1", "question": "What is 2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}"#,
        r#"{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"], "answer": 3}"#,
        r#"{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}"#,
        r#"{"question": "Tom has 2 apples.", "answer": "He has 2.\n#### 2", "cot": "He has 2. So the answer is 2."}"#,
    ];
    let files = [
        "hellaswag_validation.jsonl",
        "arc_challenge_test.jsonl",
        "mmlu_dev.jsonl",
        "gsm8k_test.jsonl",
        "gsm8k_fewshot.jsonl",
    ];
    {
        use edgefusion_eval::tasks::{ArcItem, Gsm8kItem, Gsm8kShot, HellaswagItem, MmluItem};
        use edgefusion_eval::TaskItem;
        let ok = [
            HellaswagItem::parse("h", hand[0].as_bytes()).map(drop),
            ArcItem::parse("a", hand[1].as_bytes()).map(drop),
            MmluItem::parse("m", hand[2].as_bytes()).map(drop),
            Gsm8kItem::parse("g", hand[3].as_bytes()).map(drop),
            Gsm8kShot::parse("s", hand[4].as_bytes()).map(drop),
        ];
        for (i, r) in ok.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("hand-written seed {i} must parse: {e}"));
        }
    }
    let mut seeds = Vec::new();
    for (kind, (line, file)) in hand.iter().zip(files).enumerate() {
        let mut data = vec![kind as u8];
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
        seeds.push((format!("hand-{kind}"), data));
        if let Ok(text) = std::fs::read_to_string(tasks.join(file)) {
            let mut data = vec![kind as u8];
            for line in text.lines().take(5) {
                data.extend_from_slice(line.as_bytes());
                data.push(b'\n');
            }
            seeds.push((format!("{file}-head"), data));
        }
    }
    replay_built("task_jsonl", entries::task_jsonl, &seeds);
    replay("task_jsonl", entries::task_jsonl, &[]);
}
