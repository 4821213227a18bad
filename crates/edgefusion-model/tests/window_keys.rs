//! Bad window and sink settings in hybrid and Gemma 3 GGUF files: each is refused with an
//! error that names the file and the key or tensor, never a panic. The files are the windowed
//! fixture (`tests/fixtures/tiny-window-f32.gguf`: layers ssm, window, attention; window 6,
//! sink 2) or the Gemma 3 one (`tiny-gemma3-f32.gguf`: five local layers over a window of 5,
//! then a global one) rewritten with one thing changed.

use std::path::{Path, PathBuf};

use edgefusion_io::gguf::{GgufFile, GgufWriter, MetaValue};
use edgefusion_io::ModelSource;
use edgefusion_model::{LayerType, Model, ModelError};

const WINDOWED: &str = "tiny-window-f32.gguf";
const GEMMA3: &str = "tiny-gemma3-f32.gguf";

fn fixture_named(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn fixture() -> PathBuf {
    fixture_named(WINDOWED)
}

/// The windowed fixture with metadata `set` (a `None` value removes the key) and without the
/// tensors `drop`, written to a temporary file named after `case`.
fn variant(case: &str, set: &[(&str, Option<MetaValue>)], drop: &[&str]) -> PathBuf {
    variant_of(WINDOWED, case, set, drop)
}

/// [`variant`] of fixture `name`.
fn variant_of(name: &str, case: &str, set: &[(&str, Option<MetaValue>)], drop: &[&str]) -> PathBuf {
    let src = GgufFile::open(fixture_named(name)).expect("fixture");
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        if !set.iter().any(|(key, _)| key == k) {
            w.add_metadata(k.clone(), v.clone());
        }
    }
    for (k, v) in set {
        if let Some(v) = v {
            w.add_metadata(*k, v.clone());
        }
    }
    for t in &src.tensors {
        if !drop.contains(&t.name.as_str()) {
            w.add_tensor(
                t.name.clone(),
                t.dtype,
                &t.shape,
                src.tensor_data(t).to_vec(),
            );
        }
    }
    let path = std::env::temp_dir().join(format!(
        "edgefusion-window-{case}-{}.gguf",
        std::process::id()
    ));
    w.write(&path).expect("write variant");
    path
}

fn load_error(path: &Path) -> String {
    let source = ModelSource::open(path).expect("the GGUF itself is valid");
    let err: ModelError = Model::load(&source).expect_err("must be refused");
    let _ = std::fs::remove_file(path);
    err.to_string()
}

fn types(names: &[&str]) -> Option<MetaValue> {
    Some(MetaValue::Array(
        names
            .iter()
            .map(|n| MetaValue::String(n.to_string()))
            .collect(),
    ))
}

#[test]
fn the_fixture_loads_with_its_window() {
    let source = ModelSource::open(fixture()).expect("open");
    let model = Model::load(&source).expect("load");
    let cfg = &model.config;
    assert_eq!(
        cfg.layer_types,
        [LayerType::Ssm, LayerType::Window, LayerType::Attention]
    );
    assert_eq!((cfg.window, cfg.sink, cfg.n_window_layers()), (6, 2, 2));
    assert!(model.layers[0].mixer.attention().is_some() && model.layers[0].mixer.ssm().is_some());
}

#[test]
fn negative_window_or_sink_is_refused_naming_the_key() {
    for key in ["edgefusion.window", "edgefusion.sink"] {
        let path = variant("negative", &[(key, Some(MetaValue::I32(-4)))], &[]);
        let err = load_error(&path);
        assert!(err.contains(key) && err.contains("-4"), "{err}");
    }
}

#[test]
fn window_beyond_the_context_is_refused() {
    // The fixture's context is 64 positions.
    let path = variant(
        "too-long",
        &[("edgefusion.window", Some(MetaValue::U32(63)))],
        &[],
    );
    let err = load_error(&path);
    assert!(
        err.contains("edgefusion.window") && err.contains("context length 64"),
        "{err}"
    );
}

#[test]
fn window_on_a_model_without_converted_layers_is_refused() {
    let path = variant(
        "no-converted",
        &[(
            "edgefusion.layer_types",
            types(&["attention", "attention", "attention"]),
        )],
        &[
            "blk.0.ssm_c.weight",
            "blk.0.ssm_b.weight",
            "blk.0.ssm_x.weight",
            "blk.0.ssm_dt.weight",
            "blk.0.ssm_dt.bias",
            "blk.0.ssm_a_log",
            "blk.0.ssm_d",
            "blk.0.ssm_gate.weight",
            "blk.0.ssm_conv1d.weight",
            "blk.0.ssm_out.weight",
        ],
    );
    let err = load_error(&path);
    assert!(
        err.contains("edgefusion.window") && err.contains("no layer is 'ssm' or 'window'"),
        "{err}"
    );
}

#[test]
fn window_layers_need_a_window_and_a_sink_needs_one_too() {
    let path = variant("zero-window", &[("edgefusion.window", None)], &[]);
    let err = load_error(&path);
    assert!(
        err.contains("edgefusion.window") && err.contains("'window' layers"),
        "{err}"
    );
    let path = variant(
        "sink-only",
        &[
            ("edgefusion.window", None),
            (
                "edgefusion.layer_types",
                types(&["ssm", "attention", "attention"]),
            ),
        ],
        &[],
    );
    let err = load_error(&path);
    assert!(err.contains("edgefusion.sink"), "{err}");
}

#[test]
fn state_keys_that_disagree_with_the_tensors_are_refused() {
    // A window promised, but the SSM layer has no attention weights to attend with.
    let path = variant("missing-q", &[], &["blk.0.attn_q.weight"]);
    let err = load_error(&path);
    assert!(
        err.contains("edgefusion.window") && err.contains("blk.0.attn_q.weight"),
        "{err}"
    );
    // Attention weights in an SSM layer, but no window for them.
    let path = variant(
        "no-window",
        &[
            ("edgefusion.window", None),
            ("edgefusion.sink", None),
            (
                "edgefusion.layer_types",
                types(&["ssm", "attention", "attention"]),
            ),
        ],
        &[],
    );
    let err = load_error(&path);
    assert!(
        err.contains("edgefusion.window") && err.contains("blk.0.attn_q.weight"),
        "{err}"
    );
}

/// A Gemma 3 file without one of the norms its block needs is refused at load with the
/// tensor named; its own file loads with the native pattern (five local layers, one global).
#[test]
fn gemma3_files_missing_a_norm_are_refused() {
    let source = ModelSource::open(fixture_named(GEMMA3)).expect("open");
    let model = Model::load(&source).expect("the fixture loads");
    let kinds: Vec<LayerType> = model.config.layer_types.clone();
    assert_eq!(kinds[..5], [LayerType::Window; 5]);
    assert_eq!(kinds[5], LayerType::Attention);
    for tensor in [
        "blk.2.attn_q_norm.weight",
        "blk.0.attn_k_norm.weight",
        "blk.5.post_attention_norm.weight",
        "blk.3.post_ffw_norm.weight",
    ] {
        let path = variant_of(GEMMA3, "gemma3-norm", &[], &[tensor]);
        let err = load_error(&path);
        assert!(err.contains(tensor), "{tensor}: {err}");
    }
}

/// Which Gemma 3 layers are local, as llama.cpp reads it: none without a sliding window (key
/// missing or 0), those flagged by a per-layer boolean array, or every layer but the last
/// of each period; an array of the wrong length is refused with the key named.
#[test]
fn gemma3_local_layers_follow_the_window_keys() {
    let kinds = |case: &str, set: &[(&str, Option<MetaValue>)]| {
        let path = variant_of(GEMMA3, case, set, &[]);
        let source = ModelSource::open(&path).expect("open");
        let cfg = Model::load(&source).expect("loads").config.clone();
        let _ = std::fs::remove_file(&path);
        let marks: String = cfg
            .layer_types
            .iter()
            .map(|t| if *t == LayerType::Window { 'W' } else { 'A' })
            .collect();
        (marks, cfg.window)
    };
    let key = "gemma3.attention.sliding_window";
    assert_eq!(kinds("no-window", &[(key, None)]), ("AAAAAA".into(), 0));
    assert_eq!(
        kinds("zero-window", &[(key, Some(MetaValue::U32(0)))]),
        ("AAAAAA".into(), 0)
    );
    let pattern = "gemma3.attention.sliding_window_pattern";
    assert_eq!(
        kinds("period-3", &[(pattern, Some(MetaValue::U32(3)))]),
        ("WWAWWA".into(), 5)
    );
    let flags = |f: &[bool]| {
        Some(MetaValue::Array(
            f.iter().map(|&b| MetaValue::Bool(b)).collect(),
        ))
    };
    assert_eq!(
        kinds(
            "flags",
            &[(pattern, flags(&[true, false, true, true, false, false]))]
        ),
        ("WAWWAA".into(), 5)
    );
    let path = variant_of(
        GEMMA3,
        "short-flags",
        &[(pattern, flags(&[true, false]))],
        &[],
    );
    let err = load_error(&path);
    assert!(err.contains(pattern), "{err}");
}
