//! Writer → reader round trips and the metadata getters.

use std::time::Instant;

use edgefusion_io::gguf::{GgufFile, GgufWriter, MetaValue, DEFAULT_ALIGNMENT};
use edgefusion_io::IoError;
use edgefusion_kernels::GgmlType;

/// Deterministic, non-trivial bytes so a misplaced slice cannot compare equal by accident.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn every_value_type() -> Vec<(String, MetaValue)> {
    vec![
        ("t.u8".into(), MetaValue::U8(200)),
        ("t.i8".into(), MetaValue::I8(-100)),
        ("t.u16".into(), MetaValue::U16(60_000)),
        ("t.i16".into(), MetaValue::I16(-30_000)),
        ("t.u32".into(), MetaValue::U32(4_000_000_000)),
        ("t.i32".into(), MetaValue::I32(-2_000_000_000)),
        ("t.u64".into(), MetaValue::U64(u64::MAX)),
        ("t.i64".into(), MetaValue::I64(i64::MIN)),
        ("t.f32".into(), MetaValue::F32(-1.5e-6)),
        ("t.f64".into(), MetaValue::F64(std::f64::consts::PI)),
        ("t.bool".into(), MetaValue::Bool(true)),
        (
            "t.string".into(),
            MetaValue::String("héllo ▁wörld 🦀".into()),
        ),
        ("t.empty_string".into(), MetaValue::String(String::new())),
        (
            "t.str_array".into(),
            MetaValue::Array(vec![
                MetaValue::String("<s>".into()),
                MetaValue::String("Ġthe".into()),
            ]),
        ),
        (
            "t.f32_array".into(),
            MetaValue::Array(vec![MetaValue::F32(0.25), MetaValue::F32(-8.0)]),
        ),
        (
            "t.i32_array".into(),
            MetaValue::Array(vec![
                MetaValue::I32(1),
                MetaValue::I32(-3),
                MetaValue::I32(6),
            ]),
        ),
        (
            "t.bool_array".into(),
            MetaValue::Array(vec![MetaValue::Bool(false), MetaValue::Bool(true)]),
        ),
        (
            "t.nested".into(),
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::U16(1), MetaValue::U16(2)]),
                MetaValue::Array(vec![]),
                MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I64(-7)])]),
            ]),
        ),
        ("t.empty_array".into(), MetaValue::Array(vec![])),
        (
            "general.architecture".into(),
            MetaValue::String("llama".into()),
        ),
    ]
}

struct TestTensor {
    name: &'static str,
    dtype: GgmlType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn test_tensors() -> Vec<TestTensor> {
    let specs: [(&str, GgmlType, Vec<usize>); 6] = [
        ("token_embd.weight", GgmlType::F32, vec![8, 3]),
        ("output_norm.weight", GgmlType::F16, vec![5]),
        ("blk.0.attn_q.weight", GgmlType::Q4_0, vec![64, 2]),
        ("blk.0.ffn_down.weight", GgmlType::Q4K, vec![256, 1]),
        ("blk.0.four_d", GgmlType::BF16, vec![2, 3, 2, 2]),
        ("blk.0.attn_k.weight", GgmlType::Q8_0, vec![32, 3]),
    ];
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, dtype, shape))| {
            let rows: usize = shape.iter().skip(1).product();
            let n_bytes = dtype.row_bytes(shape[0]).unwrap() * rows;
            TestTensor {
                name,
                dtype,
                shape,
                data: pattern(n_bytes, i as u8 * 17 + 1),
            }
        })
        .collect()
}

#[test]
fn round_trip_every_value_type_and_several_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let metadata = every_value_type();
    let tensors = test_tensors();

    let mut writer = GgufWriter::new();
    for (key, value) in &metadata {
        writer.add_metadata(key.clone(), value.clone());
    }
    for t in &tensors {
        writer.add_tensor(t.name, t.dtype, &t.shape, &t.data[..]);
    }
    writer.write(&path).unwrap();
    assert!(!dir.path().join("model.gguf.tmp").exists());

    let gguf = GgufFile::open(&path).unwrap();
    assert_eq!(gguf.version, 3);
    assert_eq!(gguf.alignment, DEFAULT_ALIGNMENT);
    // Empty arrays carry no element type; they come back empty all the same.
    assert_eq!(gguf.metadata, metadata);
    assert_eq!(gguf.tensors.len(), tensors.len());
    assert_eq!(
        gguf.file_size(),
        std::fs::metadata(&path).unwrap().len() as usize
    );
    assert_eq!(gguf.data_offset() % 32, 0);
    for (info, t) in gguf.tensors.iter().zip(&tensors) {
        assert_eq!(info.name, t.name);
        assert_eq!(info.dtype, t.dtype);
        assert_eq!(info.shape, t.shape);
        assert_eq!(info.n_bytes, t.data.len());
        assert_eq!(info.offset % 32, 0, "{}", t.name);
        assert_eq!(gguf.tensor_data(info), &t.data[..], "{}", t.name);
        let view = gguf.tensor_view(t.name).unwrap();
        assert_eq!(view.data, &t.data[..]);
        assert_eq!(view.shape, &t.shape[..]);
        assert_eq!(view.n_elements(), t.shape.iter().product::<usize>());
    }
    assert!(gguf.tensor("missing.weight").is_none());
    assert_eq!(gguf.architecture().unwrap(), "llama");
}

#[test]
fn writer_bytes_equal_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("same.gguf");
    let tensors = test_tensors();
    let mut writer = GgufWriter::new();
    writer.add_metadata("general.name", MetaValue::String("same".into()));
    for t in &tensors {
        writer.add_tensor(t.name, t.dtype, &t.shape, t.data.clone());
    }
    writer.write(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), writer.to_bytes().unwrap());
}

#[test]
fn getters_convert_where_the_value_fits_and_name_file_and_key_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("getters.gguf");
    let mut writer = GgufWriter::new();
    for (key, value) in every_value_type() {
        writer.add_metadata(key, value);
    }
    writer.add_metadata("t.neg_i64", MetaValue::I64(-1));
    writer.add_metadata("t.small_u64", MetaValue::U64(4096));
    writer.add_metadata(
        "t.f64_array",
        MetaValue::Array(vec![MetaValue::F64(0.5), MetaValue::F64(2.0)]),
    );
    writer.add_metadata(
        "t.u8_array",
        MetaValue::Array(vec![MetaValue::U8(3), MetaValue::U8(250)]),
    );
    writer.write(&path).unwrap();
    let gguf = GgufFile::open(&path).unwrap();

    assert_eq!(gguf.get_u32("t.u8").unwrap(), 200);
    assert_eq!(gguf.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(gguf.get_u32("t.small_u64").unwrap(), 4096);
    assert_eq!(gguf.get_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(gguf.get_f32("t.f32").unwrap(), -1.5e-6);
    assert_eq!(gguf.get_f32("t.f64").unwrap(), std::f32::consts::PI);
    assert!(gguf.get_bool("t.bool").unwrap());
    assert_eq!(gguf.get_str("t.string").unwrap(), "héllo ▁wörld 🦀");
    assert_eq!(gguf.get_str_array("t.str_array").unwrap(), ["<s>", "Ġthe"]);
    assert_eq!(gguf.get_f32_array("t.f32_array").unwrap(), [0.25, -8.0]);
    assert_eq!(gguf.get_f32_array("t.f64_array").unwrap(), [0.5, 2.0]);
    assert_eq!(gguf.get_i32_array("t.i32_array").unwrap(), [1, -3, 6]);
    assert_eq!(gguf.get_i32_array("t.u8_array").unwrap(), [3, 250]);
    assert!(gguf.get_str_array("t.empty_array").unwrap().is_empty());

    let expect_wrong_type = |result: Result<(), IoError>, key: &str| {
        let err = result.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, IoError::WrongType { .. }), "{msg}");
        assert!(msg.contains("getters.gguf") && msg.contains(key), "{msg}");
    };
    expect_wrong_type(gguf.get_u32("t.neg_i64").map(drop), "t.neg_i64");
    expect_wrong_type(gguf.get_u32("t.u64").map(drop), "t.u64");
    expect_wrong_type(gguf.get_u32("t.f32").map(drop), "t.f32");
    expect_wrong_type(gguf.get_u32("t.bool").map(drop), "t.bool");
    expect_wrong_type(gguf.get_f32("t.u32").map(drop), "t.u32");
    expect_wrong_type(gguf.get_str("t.u8").map(drop), "t.u8");
    expect_wrong_type(gguf.get_bool("t.u8").map(drop), "t.u8");
    expect_wrong_type(gguf.get_str_array("t.f32_array").map(drop), "t.f32_array");
    expect_wrong_type(gguf.get_str_array("t.string").map(drop), "t.string");
    expect_wrong_type(gguf.get_f32_array("t.str_array").map(drop), "t.str_array");
    expect_wrong_type(gguf.get_i32_array("t.f32_array").map(drop), "t.f32_array");

    let err = gguf.get_u32("llama.block_count").unwrap_err();
    assert!(matches!(err, IoError::MissingKey { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("getters.gguf") && msg.contains("llama.block_count"),
        "{msg}"
    );
}

#[test]
fn custom_alignment_is_recorded_and_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned.gguf");
    let a = pattern(4 * 3, 1);
    let b = pattern(2 * 5, 2);
    let mut writer = GgufWriter::new().with_alignment(256);
    writer
        .add_tensor("a", GgmlType::F32, &[3], &a[..])
        .add_tensor("b", GgmlType::F16, &[5], &b[..]);
    writer.write(&path).unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    assert_eq!(gguf.alignment, 256);
    assert_eq!(gguf.get_u32("general.alignment").unwrap(), 256);
    for t in &gguf.tensors {
        assert_eq!(t.offset % 256, 0);
    }
    assert_eq!(gguf.tensor_data(gguf.tensor("b").unwrap()), &b[..]);
}

#[test]
fn file_without_tensors_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    GgufWriter::new().write(&path).unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    assert!(gguf.metadata.is_empty() && gguf.tensors.is_empty());
}

#[test]
fn writer_refuses_bad_tensors_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let four_floats = [0u8; 16];
    let cases: Vec<(GgufWriter, &str)> = vec![
        (
            {
                let mut w = GgufWriter::new();
                w.add_tensor("x", GgmlType::F32, &[4], &four_floats[..])
                    .add_tensor("x", GgmlType::F32, &[4], &four_floats[..]);
                w
            },
            "duplicate tensor name `x`",
        ),
        (
            {
                let mut w = GgufWriter::new();
                w.add_tensor("short", GgmlType::F32, &[5], &four_floats[..]);
                w
            },
            "has 16 bytes of data, but F32 [5] needs 20",
        ),
        (
            {
                let mut w = GgufWriter::new();
                w.add_tensor("q", GgmlType::Q4_0, &[16], &four_floats[..]);
                w
            },
            "not a multiple of the Q4_0 block size 32",
        ),
        (
            {
                let mut w = GgufWriter::new();
                w.add_tensor("five", GgmlType::F32, &[1, 1, 1, 4, 1], &four_floats[..]);
                w
            },
            "5 dimensions",
        ),
        (
            {
                let mut w = GgufWriter::new();
                w.add_metadata(
                    "mixed",
                    MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
                );
                w
            },
            "array mixes U8 (element 0) and I8 (element 1)",
        ),
        (GgufWriter::new().with_alignment(24), "not a power of two"),
        (
            {
                let mut w = GgufWriter::new();
                w.add_metadata("general.alignment", MetaValue::U32(64));
                w
            },
            "disagrees",
        ),
    ];
    for (writer, expected) in cases {
        let msg = writer.write(&path).unwrap_err().to_string();
        assert!(msg.contains("bad.gguf") && msg.contains(expected), "{msg}");
        assert!(!path.exists());
        assert!(!dir.path().join("bad.gguf.tmp").exists());
    }
}

#[test]
fn failed_rename_removes_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    // A non-empty directory where the file should go: rename() over it must fail.
    let target = dir.path().join("occupied");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let err = GgufWriter::new().write(&target).unwrap_err();
    assert!(err.to_string().contains("rename"), "{err}");
    assert!(!dir.path().join("occupied.tmp").exists());
    assert!(target.join("keep").exists());
}

#[test]
fn overwriting_leaves_an_open_map_of_the_old_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let old = pattern(64, 3);
    let new = pattern(64, 9);
    let mut writer = GgufWriter::new();
    writer.add_tensor("w", GgmlType::F32, &[16], &old[..]);
    writer.write(&path).unwrap();
    let old_file = GgufFile::open(&path).unwrap();

    let mut writer = GgufWriter::new();
    writer.add_tensor("w", GgmlType::F32, &[16], &new[..]);
    writer.write(&path).unwrap();

    let w = old_file.tensor("w").unwrap();
    assert_eq!(old_file.tensor_data(w), &old[..]);
    let new_file = GgufFile::open(&path).unwrap();
    assert_eq!(
        new_file.tensor_data(new_file.tensor("w").unwrap()),
        &new[..]
    );
}

#[test]
fn foreign_tensor_info_reads_as_empty_not_out_of_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.gguf");
    let data = pattern(16, 0);
    let mut writer = GgufWriter::new();
    writer.add_tensor("w", GgmlType::F32, &[4], &data[..]);
    writer.write(&path).unwrap();
    let gguf = GgufFile::open(&path).unwrap();
    let mut foreign = gguf.tensor("w").unwrap().clone();
    foreign.offset = usize::MAX - 3;
    assert!(gguf.tensor_data(&foreign).is_empty());
}

#[test]
#[cfg_attr(miri, ignore = "a timing bound; Miri runs ~1000x slower")]
fn large_vocabulary_loads_fast() {
    const N_TOKENS: usize = 49_152;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vocab.gguf");
    let tokens: Vec<MetaValue> = (0..N_TOKENS)
        .map(|i| MetaValue::String(format!("Ġtok{i}")))
        .collect();
    let scores: Vec<MetaValue> = (0..N_TOKENS).map(|i| MetaValue::F32(-(i as f32))).collect();
    let types: Vec<MetaValue> = (0..N_TOKENS).map(|_| MetaValue::I32(1)).collect();
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("tokenizer.ggml.tokens", MetaValue::Array(tokens))
        .add_metadata("tokenizer.ggml.scores", MetaValue::Array(scores))
        .add_metadata("tokenizer.ggml.token_type", MetaValue::Array(types));
    writer.write(&path).unwrap();

    // Best of a few runs, so one descheduling on a busy machine does not fail the test.
    let mut best = std::time::Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let gguf = GgufFile::open(&path).unwrap();
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len(), N_TOKENS);
        assert_eq!(tokens[N_TOKENS - 1], format!("Ġtok{}", N_TOKENS - 1));
        best = best.min(start.elapsed());
    }
    eprintln!("open + vocab of {N_TOKENS}: {best:?}");
    assert!(best.as_millis() < 100, "took {best:?}");
}
