//! Hugging Face folders: single file, sharded, and every way they can be broken.

use std::path::Path;

use edgefusion_io::safetensors_dir::SafetensorsDir;
use edgefusion_io::IoError;
use edgefusion_kernels::GgmlType;
use proptest::prelude::*;
use safetensors::tensor::TensorView as StView;
use safetensors::Dtype;

/// `(name, dtype, shape in safetensors order, bytes)`.
type Spec = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn bytes_of(n_elements: usize, elem_bytes: usize, seed: u8) -> Vec<u8> {
    (0..n_elements * elem_bytes)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn serialize(specs: &[Spec]) -> Vec<u8> {
    let views: Vec<(&str, StView)> = specs
        .iter()
        .map(|(name, dtype, shape, data)| {
            (*name, StView::new(*dtype, shape.clone(), data).unwrap())
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn model_specs() -> Vec<Spec> {
    vec![
        (
            "model.embed_tokens.weight",
            Dtype::F32,
            vec![6, 4],
            bytes_of(24, 4, 1),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::BF16,
            vec![4, 4],
            bytes_of(16, 2, 2),
        ),
        (
            "model.layers.0.input_layernorm.weight",
            Dtype::F16,
            vec![4],
            bytes_of(4, 2, 3),
        ),
        ("model.norm.weight", Dtype::F32, vec![4], bytes_of(4, 4, 4)),
        // An integer buffer, as some checkpoints carry: allowed, but not readable as weights.
        (
            "model.position_ids",
            Dtype::I64,
            vec![1, 8],
            bytes_of(8, 8, 5),
        ),
    ]
}

fn write_config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4, "num_hidden_layers": 1}"#,
    )
    .unwrap();
}

fn check_views(folder: &SafetensorsDir, specs: &[Spec]) {
    for (name, dtype, shape, data) in specs {
        if *dtype == Dtype::I64 {
            continue;
        }
        let view = folder.tensor(name).unwrap();
        let reversed: Vec<usize> = shape.iter().rev().copied().collect();
        assert_eq!(view.shape, &reversed[..], "{name}");
        assert_eq!(view.data, &data[..], "{name}");
        let expected = match dtype {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            _ => GgmlType::BF16,
        };
        assert_eq!(view.dtype, expected, "{name}");
    }
}

fn expect_err(result: Result<SafetensorsDir, IoError>, expected: &[&str]) -> IoError {
    let err = result.expect_err("expected an error");
    let msg = err.to_string();
    for part in expected {
        assert!(msg.contains(part), "expected {part:?} in: {msg}");
    }
    err
}

#[test]
fn single_file_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let specs = model_specs();
    std::fs::write(dir.path().join("model.safetensors"), serialize(&specs)).unwrap();

    let folder = SafetensorsDir::open(dir.path()).unwrap();
    assert_eq!(folder.config()["hidden_size"], 4);
    assert_eq!(
        folder.tokenizer_json(),
        Some(dir.path().join("tokenizer.json").as_path())
    );
    assert_eq!(folder.shard_paths().count(), 1);
    check_views(&folder, &specs);
    assert_eq!(folder.names().count(), specs.len());
    assert_eq!(folder.tensors().len(), specs.len() - 1);
    assert_eq!(folder.unsupported(), [("model.position_ids", "I64")]);

    let err = folder.tensor("model.position_ids").unwrap_err();
    assert!(matches!(err, IoError::UnsupportedDtype { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("model.position_ids")
            && msg.contains("I64"),
        "{msg}"
    );

    let err = folder.tensor("lm_head.weight").unwrap_err();
    assert!(matches!(err, IoError::MissingTensor { .. }));
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
}

fn write_sharded(dir: &Path, specs: &[Spec], index_json: Option<String>) {
    write_config(dir);
    let (first, second) = specs.split_at(2);
    std::fs::write(
        dir.join("model-00001-of-00002.safetensors"),
        serialize(first),
    )
    .unwrap();
    std::fs::write(
        dir.join("model-00002-of-00002.safetensors"),
        serialize(second),
    )
    .unwrap();
    let index = index_json.unwrap_or_else(|| {
        let entries: Vec<String> = specs
            .iter()
            .enumerate()
            .map(|(i, (name, ..))| {
                let shard = if i < 2 { 1 } else { 2 };
                format!(r#""{name}": "model-0000{shard}-of-00002.safetensors""#)
            })
            .collect();
        format!(
            r#"{{"metadata": {{"total_size": 0}}, "weight_map": {{{}}}}}"#,
            entries.join(", ")
        )
    });
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
}

#[test]
fn sharded_folder() {
    let dir = tempfile::tempdir().unwrap();
    let specs = model_specs();
    write_sharded(dir.path(), &specs, None);
    let folder = SafetensorsDir::open(dir.path()).unwrap();
    assert_eq!(folder.shard_paths().count(), 2);
    assert!(folder.tokenizer_json().is_none());
    check_views(&folder, &specs);
    assert_eq!(folder.names().count(), specs.len());
}

#[test]
fn missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path(), &model_specs(), None);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = expect_err(
        SafetensorsDir::open(dir.path()),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );
    assert!(matches!(err, IoError::MissingShard { .. }));
}

#[test]
fn tensor_listed_in_index_but_not_in_shard() {
    let dir = tempfile::tempdir().unwrap();
    let index = r#"{"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00001-of-00002.safetensors"}}"#;
    write_sharded(dir.path(), &model_specs(), Some(index.to_string()));
    expect_err(
        SafetensorsDir::open(dir.path()),
        &[
            "model-00001-of-00002.safetensors",
            "model.norm.weight",
            "listed in",
        ],
    );
}

#[test]
fn bad_index_files() {
    let cases = [
        ("not json", "invalid JSON"),
        (r#"{"metadata": {}}"#, "no `weight_map`"),
        (r#"{"weight_map": {"a": 3}}"#, "not a file name"),
        (
            r#"{"weight_map": {"a": "../evil.safetensors"}}"#,
            "not a plain file name",
        ),
        (
            r#"{"weight_map": {"a": "/etc/passwd"}}"#,
            "not a plain file name",
        ),
    ];
    for (index, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path(), &model_specs(), Some(index.to_string()));
        expect_err(
            SafetensorsDir::open(dir.path()),
            &["model.safetensors.index.json", expected],
        );
    }
}

#[test]
fn missing_or_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        serialize(&model_specs()),
    )
    .unwrap();
    let err = expect_err(
        SafetensorsDir::open(dir.path()),
        &["config.json", "no such file"],
    );
    assert!(matches!(err, IoError::NotFound { .. }));

    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": ").unwrap();
    let err = expect_err(
        SafetensorsDir::open(dir.path()),
        &["config.json", "invalid JSON"],
    );
    assert!(matches!(err, IoError::Json { .. }));

    std::fs::write(dir.path().join("config.json"), "[1, 2]").unwrap();
    expect_err(
        SafetensorsDir::open(dir.path()),
        &["config.json", "not a JSON object"],
    );
}

#[test]
fn folder_without_weights_or_not_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    expect_err(
        SafetensorsDir::open(dir.path()),
        &["has neither", "model.safetensors"],
    );
    expect_err(
        SafetensorsDir::open(dir.path().join("config.json")),
        &["config.json", "not a directory"],
    );
    let err = expect_err(SafetensorsDir::open(dir.path().join("nope")), &["nope"]);
    assert!(matches!(err, IoError::NotFound { .. }));
}

#[test]
fn weight_with_unsupported_dtype_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let specs: Vec<Spec> = vec![(
        "model.layers.0.mlp.up_proj.weight",
        Dtype::I8,
        vec![4, 4],
        bytes_of(16, 1, 0),
    )];
    std::fs::write(dir.path().join("model.safetensors"), serialize(&specs)).unwrap();
    let err = expect_err(
        SafetensorsDir::open(dir.path()),
        &[
            "model.safetensors",
            "model.layers.0.mlp.up_proj.weight",
            "I8",
        ],
    );
    assert!(matches!(err, IoError::UnsupportedDtype { .. }));
}

#[test]
fn corrupt_headers() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let weights = dir.path().join("model.safetensors");
    let good = serialize(&model_specs());

    // Garbage JSON in the header.
    let mut garbage = good.clone();
    garbage[8..16].copy_from_slice(b"\x00\x01\x02notjs");
    std::fs::write(&weights, &garbage).unwrap();
    let err = expect_err(
        SafetensorsDir::open(dir.path()),
        &["model.safetensors", "invalid safetensors header"],
    );
    assert!(matches!(err, IoError::Safetensors { .. }));

    // Header length far past the end.
    let mut long = good.clone();
    long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&weights, &long).unwrap();
    expect_err(SafetensorsDir::open(dir.path()), &["model.safetensors"]);

    // Offsets that would overflow the crate's size arithmetic: eight U8 tensors of
    // 2^61 - 1 bytes (each small enough to pass its own checks) end at 2^64 - 8, and the
    // crate then adds the 8-byte length field to that.
    let mut header = String::from("{");
    let mut start: u64 = 0;
    for i in 0..8u64 {
        let size = (1u64 << 61) - 1;
        let end = start + size;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""t{i}":{{"dtype":"U8","shape":[{size}],"data_offsets":[{start},{end}]}}"#
        ));
        start = end;
    }
    header.push('}');
    let mut hostile = (header.len() as u64).to_le_bytes().to_vec();
    hostile.extend_from_slice(header.as_bytes());
    std::fs::write(&weights, &hostile).unwrap();
    expect_err(
        SafetensorsDir::open(dir.path()),
        &["model.safetensors", "data_offsets"],
    );
}

#[test]
fn every_truncation_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    let weights = dir.path().join("model.safetensors");
    let good = serialize(&model_specs());
    // Under Miri (~1000x slower) every 7th cut.
    let step = if cfg!(miri) { 7 } else { 1 };
    for cut in (0..good.len()).step_by(step) {
        std::fs::write(&weights, &good[..cut]).unwrap();
        let msg = match SafetensorsDir::open(dir.path()) {
            Ok(_) => panic!("prefix of {cut} bytes opened"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("model.safetensors"), "cut {cut}: {msg}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 8 } else { 256 }))]

    #[test]
    fn flipped_bytes_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6)
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path());
        let mut bytes = serialize(&model_specs());
        // Aim at the header, where the structure is.
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (index, mask) in &flips {
            let at = index.index(header_end);
            bytes[at] ^= mask;
        }
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| SafetensorsDir::open(dir.path()).map(|f| f.tensors().len()));
        prop_assert!(outcome.is_ok());
    }
}
