//! Hugging Face folders as input: `convert` and `quantize` read what the runtime reads.
//!
//! The tiny fixture is written out as a Hugging Face folder the way transformers stores a
//! Llama (q/k rows in NeoX order, safetensors, config.json, tokenizer.json). The runtime
//! loading that folder must give the GGUF's logits (an independent check of the folder),
//! and the converter must turn it back into the fixture's tensors byte for byte.

use std::path::{Path, PathBuf};

use edgefusion_io::gguf::GgufFile;
use edgefusion_io::names::{parse_gguf_name, TensorRole};
use edgefusion_io::ModelSource;
use edgefusion_model::{Arch, Model, ModelConfig};
use edgefusion_quant::pipeline::{quantize, Method, QuantizeOptions};
use edgefusion_runtime::tokenizer::Tokenizer;
use edgefusion_runtime::{Logits, Session, SessionOptions};
use edgefusion_testkit::{fixture, max_abs_diff};

fn logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
    let source = ModelSource::open(path).unwrap();
    let model = Model::load(&source).unwrap();
    let opts = SessionOptions {
        max_logits: tokens.len(),
        ..SessionOptions::new(64, 1)
    };
    let mut session = Session::new(&model, opts).unwrap();
    session.forward(tokens, Logits::From(0)).unwrap().to_vec()
}

/// Rows of each head from GGUF's adjacent RoPE pairs back to Hugging Face's halves: GGUF
/// row `2i + j` is Hugging Face row `j · head_dim/2 + i` (written independently of the
/// converter's permutation).
fn unpermute(data: &[u8], heads: usize, head_dim: usize) -> Vec<u8> {
    let row = data.len() / (heads * head_dim);
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for r in 0..head_dim {
            let (i, j) = (r / 2, r % 2);
            let hf = h * head_dim + j * head_dim / 2 + i;
            let gguf = h * head_dim + r;
            out[hf * row..(hf + 1) * row].copy_from_slice(&data[gguf * row..(gguf + 1) * row]);
        }
    }
    out
}

/// Writes `gguf` (f32, llama or qwen3) as a Hugging Face folder in `dir`.
fn write_hf_folder(gguf: &GgufFile, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tied = gguf.tensor_view("output.weight").is_none();
    let cfg = ModelConfig::from_gguf(gguf, tied).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &gguf.tensors {
        let view = gguf.view(t);
        // rope_freqs.weight has no Hugging Face tensor: its config's rope_scaling says it.
        let Some((role, layer)) = parse_gguf_name(view.name) else {
            assert_eq!(view.name, "rope_freqs.weight", "fixture tensors have roles");
            continue;
        };
        // GGUF llama permuted q/k rows to adjacent RoPE pairs; qwen3 keeps the NeoX halves.
        let llama = cfg.arch == Arch::Llama;
        let data = match role {
            TensorRole::AttnQ if llama => unpermute(view.data, cfg.n_heads, cfg.head_dim),
            TensorRole::AttnK if llama => unpermute(view.data, cfg.n_kv_heads, cfg.head_dim),
            _ => view.data.to_vec(),
        };
        let shape: Vec<usize> = view.shape.iter().rev().copied().collect();
        tensors.push((role.hf_name(layer), shape, data));
    }
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (name.as_str(), view)
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({
        "model_type": cfg.arch.name(),
        "hidden_size": cfg.d_model,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_ctx_train,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": tied,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokenizer = Tokenizer::from_gguf(gguf).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        tokenizer.to_tokenizer_json().unwrap(),
    )
    .unwrap();
    let text_of = |id: Option<u32>| id.and_then(|id| tokenizer.token_str(id)).unwrap_or("");
    let tokenizer_config = serde_json::json!({
        "bos_token": text_of(tokenizer.bos_id()),
        "eos_token": text_of(tokenizer.eos_id()),
        "add_bos_token": tokenizer.add_bos(),
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
}

/// Fixture `{stem}-f32.gguf` written as a Hugging Face folder in a fresh work folder, its
/// `config.json` rewritten through `edit`: (work folder, the folder, the fixture's path, the
/// fixture).
fn folder_of(
    stem: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> (PathBuf, PathBuf, PathBuf, GgufFile) {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-source-{stem}"));
    let _ = std::fs::remove_dir_all(&work);
    let (hf, input) = (work.join("folder"), fixture(&format!("{stem}-f32.gguf")));
    let original = GgufFile::open(&input).unwrap();
    write_hf_folder(&original, &hf);
    let path = hf.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    (work, hf, input, original)
}

/// The folder `hf` gives the logits of its GGUF `input` on `tokens` (to 1e-4), and converts
/// into `work/converted.gguf`: (the GGUF's logits, the conversion's report, its path).
fn runs_like_gguf_and_converts(
    work: &Path,
    hf: &Path,
    input: &Path,
    tokens: &[u32],
) -> (Vec<f32>, edgefusion_model::convert::ConvertReport, PathBuf) {
    let reference = logits(input, tokens);
    let diff = max_abs_diff(&logits(hf, tokens), &reference);
    assert!(diff < 1e-4, "folder vs GGUF logits differ by {diff}");
    let ModelSource::HfDir(dir) = ModelSource::open(hf).unwrap() else {
        panic!("a folder opens as a Hugging Face folder");
    };
    let converted = work.join("converted.gguf");
    let report = edgefusion_model::convert::hf_to_gguf(&dir, &converted).unwrap();
    (reference, report, converted)
}

/// A Qwen3 folder (QK-norm weights as `self_attn.{q,k}_norm`, an explicit `head_dim`, the
/// config as transformers 5 writes it) runs like its GGUF and converts back to it byte for
/// byte, q/k rows unpermuted.
#[test]
fn qwen3_folder_runs_and_converts_like_its_gguf() {
    // As transformers 5 saves it: RoPE in `rope_parameters` (base 1e6: a reader that missed
    // it would rotate with 1e4), and full attention spelled its way.
    let (work, hf, input, original) = folder_of("tiny-qwen3", |config| {
        let base = config["rope_theta"].take();
        config.as_object_mut().unwrap().remove("rope_theta");
        config["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": base});
        let n_layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
        config["layer_types"] = serde_json::json!(vec!["full_attention"; n_layers]);
    });
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 512).collect();
    let (_, report, converted_path) = runs_like_gguf_and_converts(&work, &hf, &input, &tokens);
    assert_eq!((report.config.arch, report.permuted), (Arch::Qwen3, 0));
    let converted = GgufFile::open(&converted_path).unwrap();
    assert_eq!(converted.tensors.len(), original.tensors.len());
    for t in &original.tensors {
        let want = original.view(t);
        let got = converted.tensor_view(want.name).unwrap();
        assert!(got.data == want.data, "{} differs", want.name);
    }
}

/// A Llama folder whose config asks for Llama 3 RoPE scaling runs like the GGUF that stores
/// the same scaling as `rope_freqs.weight`, and converts into that GGUF: the factors written
/// equal the fixture's (computed independently, by llama.cpp's converter formula in numpy).
#[test]
fn llama3_rope_scaling_converts_to_rope_freqs() {
    let (work, hf, input, original) = folder_of("tiny-llama3", |config| {
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64
        });
    });
    let tokens: Vec<u32> = (0..40).map(|i| (i * 29 + 5) % 512).collect();
    let (reference, _, converted_path) = runs_like_gguf_and_converts(&work, &hf, &input, &tokens);
    let converted = GgufFile::open(&converted_path).unwrap();
    let floats = |g: &GgufFile| -> Vec<f32> {
        let v = g
            .tensor_view("rope_freqs.weight")
            .expect("rope_freqs.weight");
        v.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let (want, got) = (floats(&original), floats(&converted));
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert!((w - g).abs() <= 1e-6 * w, "factor {g} vs {w}");
    }
    let diff = max_abs_diff(&logits(&converted_path, &tokens), &reference);
    assert!(diff < 1e-4, "converted vs fixture logits differ by {diff}");
}

#[test]
fn hugging_face_folder_converts_and_quantizes_like_its_gguf() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hf-source");
    let _ = std::fs::remove_dir_all(&work);
    let hf = work.join("tiny-llama-hf");
    let input = fixture("tiny-llama-f32.gguf");
    let original = GgufFile::open(&input).unwrap();
    write_hf_folder(&original, &hf);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 53 + 7) % 512).collect();

    // The folder itself, run with NeoX RoPE on unpermuted rows, gives the GGUF's logits.
    let reference = logits(&input, &tokens);
    let from_folder = logits(&hf, &tokens);
    let diff = max_abs_diff(&from_folder, &reference);
    assert!(diff < 1e-4, "folder vs GGUF logits differ by {diff}");

    // Converted back: every tensor equals the fixture's, byte for byte.
    let converted_path = work.join("converted.gguf");
    let ModelSource::HfDir(dir) = ModelSource::open(&hf).unwrap() else {
        panic!("a folder opens as a Hugging Face folder");
    };
    let report = edgefusion_model::convert::hf_to_gguf(&dir, &converted_path).unwrap();
    assert_eq!(report.permuted, 2 * report.config.n_layers);
    let converted = GgufFile::open(&converted_path).unwrap();
    assert_eq!(converted.tensors.len(), original.tensors.len());
    for t in &original.tensors {
        let want = original.view(t);
        let got = converted
            .tensor_view(want.name)
            .unwrap_or_else(|| panic!("{} missing after conversion", want.name));
        assert_eq!(got.shape, want.shape, "{}", want.name);
        assert!(
            got.data == want.data,
            "{} differs after conversion",
            want.name
        );
    }
    assert_eq!(
        max_abs_diff(&logits(&converted_path, &tokens), &reference),
        0.0
    );
    // The tokenizer travels inside: same ids, same BOS, and the chat template.
    let text = "the quick brown fox, 42 times!";
    let a = Tokenizer::from_gguf(&original).unwrap();
    let b = Tokenizer::from_gguf(&converted).unwrap();
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.bos_id(), b.bos_id());
    assert!(b.chat_template().is_some());

    // quantize takes the folder and writes what it writes for the GGUF; its temporary
    // conversion is gone afterwards.
    let opts = QuantizeOptions {
        method: Method::Rtn,
        bpw: 0.0,
        bits: 4,
        outliers: 0.0,
        calibration: None,
        act_order: false,
        sensitivity: false,
        embedding_bits: 4,
        rotate: true,
        max_bits: None,
        refit: true,
        keep_source: true,
    };
    let out_hf = work.join("from-folder.efq.gguf");
    let out_gguf = work.join("from-gguf.efq.gguf");
    quantize(
        &ModelSource::open(&hf).unwrap(),
        &out_hf,
        &opts,
        &mut |_, _, _| {},
    )
    .unwrap();
    quantize(
        &ModelSource::open(&input).unwrap(),
        &out_gguf,
        &opts,
        &mut |_, _, _| {},
    )
    .unwrap();
    let (q_hf, q_gguf) = (
        GgufFile::open(&out_hf).unwrap(),
        GgufFile::open(&out_gguf).unwrap(),
    );
    for t in &q_gguf.tensors {
        let want = q_gguf.view(t);
        let got = q_hf.tensor_view(want.name).unwrap();
        assert!(got.data == want.data, "{} differs", want.name);
    }
    let leftovers: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("source"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert_eq!(
        max_abs_diff(&logits(&out_hf, &tokens), &logits(&out_gguf, &tokens)),
        0.0
    );
}

#[test]
fn a_folder_without_tokenizer_is_refused_by_name() {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hf-source-no-tokenizer");
    let _ = std::fs::remove_dir_all(&work);
    let hf = work.join("model");
    write_hf_folder(
        &GgufFile::open(fixture("tiny-llama-f32.gguf")).unwrap(),
        &hf,
    );
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let ModelSource::HfDir(dir) = ModelSource::open(&hf).unwrap() else {
        panic!("a folder opens as a Hugging Face folder");
    };
    let out = work.join("out.gguf");
    let err = edgefusion_model::convert::hf_to_gguf(&dir, &out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("model"),
        "{err}"
    );
    assert!(!out.exists());
}
