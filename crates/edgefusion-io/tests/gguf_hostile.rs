//! Hostile, truncated and corrupted GGUF input: every case returns an error that names the
//! file and the problem, and nothing panics.

use std::path::{Path, PathBuf};

use edgefusion_io::gguf::{GgufFile, GgufWriter, MetaValue};
use edgefusion_io::IoError;
use edgefusion_kernels::GgmlType;
use proptest::prelude::*;

/// Hand-encodes GGUF so tests can break rules the writer refuses to break.
#[derive(Default)]
struct RawGguf {
    bytes: Vec<u8>,
}

impl RawGguf {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut raw = RawGguf::default();
        raw.bytes.extend_from_slice(b"GGUF");
        raw.u32(version).u64(n_tensors).u64(n_kv);
        raw
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn string(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64);
        self.bytes.extend_from_slice(s);
        self
    }

    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.string(key.as_bytes()).u32(4).u32(v)
    }

    fn tensor_info(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.string(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }

    /// Pads to the data section and appends `n` data bytes.
    fn data(&mut self, n: usize) -> &mut Self {
        let start = self.bytes.len().next_multiple_of(32);
        self.bytes.resize(start + n, 0xAB);
        self
    }
}

struct Case {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_case(name: &str, bytes: &[u8]) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    Case { _dir: dir, path }
}

/// Opens `bytes` as a file and returns the error message, which must name the file and
/// contain every one of `expected`.
fn open_err(bytes: &[u8], expected: &[&str]) -> IoError {
    let case = write_case("hostile.gguf", bytes);
    let err = match GgufFile::open(&case.path) {
        Ok(_) => panic!("expected an error containing {expected:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains("hostile.gguf"),
        "message does not name the file: {msg}"
    );
    for part in expected {
        assert!(msg.contains(part), "expected {part:?} in: {msg}");
    }
    err
}

/// A small valid file whose last tensor ends exactly at the end of the file, so that every
/// proper prefix is invalid.
fn small_valid_file() -> Vec<u8> {
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::String("llama".into()))
        .add_metadata("llama.block_count", MetaValue::U32(1))
        .add_metadata("flag", MetaValue::Bool(true))
        .add_metadata(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("bc".into()),
            ]),
        )
        .add_metadata(
            "nested",
            MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::F64(1.0)])]),
        )
        .add_tensor(
            "blk.0.attn_q.weight",
            GgmlType::Q8_0,
            &[32, 2],
            vec![7u8; 68],
        )
        .add_tensor("output_norm.weight", GgmlType::F32, &[8], vec![1u8; 32]);
    writer.to_bytes().unwrap()
}

#[test]
fn valid_file_opens() {
    let bytes = small_valid_file();
    let case = write_case("valid.gguf", &bytes);
    let gguf = GgufFile::open(&case.path).unwrap();
    let last = gguf.tensors.last().unwrap();
    assert_eq!(last.offset + last.n_bytes, bytes.len());
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = small_valid_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    // Under Miri (~1000x slower) every 7th cut.
    let step = if cfg!(miri) { 7 } else { 1 };
    for cut in (0..bytes.len()).step_by(step) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = match GgufFile::open(&path) {
            Ok(_) => panic!("prefix of {cut} bytes opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("cut.gguf"), "cut {cut}: {err}");
        assert!(
            err.contains("truncated") || err.contains("past the end") || err.contains("claims"),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn missing_path_and_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, IoError::NotFound { .. }));
    assert!(err.to_string().contains("nope.gguf"), "{err}");
    let err = GgufFile::open(dir.path()).unwrap_err();
    assert!(matches!(err, IoError::IsDirectory { .. }));
    assert!(err.to_string().contains("is a directory"), "{err}");
}

#[test]
fn empty_file() {
    open_err(b"", &["truncated", "magic"]);
}

#[test]
fn wrong_magic() {
    let mut bytes = small_valid_file();
    bytes[..4].copy_from_slice(b"GGML");
    let err = open_err(&bytes, &["not a GGUF file"]);
    assert!(matches!(err, IoError::BadMagic { .. }));
}

#[test]
fn unsupported_versions() {
    open_err(
        &RawGguf::header(1, 0, 0).bytes,
        &["unsupported GGUF version 1"],
    );
    open_err(
        &RawGguf::header(99, 0, 0).bytes,
        &["unsupported GGUF version 99"],
    );
    open_err(
        &RawGguf::header(3u32.swap_bytes(), 0, 0).bytes,
        &["big-endian"],
    );
    // Version 2 has the same layout as 3.
    let case = write_case("v2.gguf", &RawGguf::header(2, 0, 0).bytes);
    assert_eq!(GgufFile::open(&case.path).unwrap().version, 2);
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    open_err(
        &RawGguf::header(3, 0, u64::MAX).bytes,
        &["metadata count", "claims"],
    );
    open_err(
        &RawGguf::header(3, u64::MAX, 0).bytes,
        &["tensor count", "claims"],
    );
    let mut raw = RawGguf::header(3, 1 << 40, 1);
    raw.kv_u32("a", 1);
    open_err(&raw.bytes, &["tensor count", "claims"]);
    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(1 << 60);
    open_err(&raw.bytes, &["tokenizer.ggml.tokens", "claims"]);
}

#[test]
fn huge_string_length() {
    let mut raw = RawGguf::header(3, 0, 1);
    raw.u64(u64::MAX)
        .bytes
        .extend_from_slice(b"key and some more bytes");
    open_err(&raw.bytes, &["truncated", "metadata key #0"]);
    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"general.name").u32(8).u64(1 << 50);
    open_err(&raw.bytes, &["truncated", "general.name"]);
}

#[test]
fn bad_metadata_values() {
    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"k").u32(13).u32(0);
    open_err(&raw.bytes, &["`k`", "unknown value type 13"]);

    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"k").u32(7).bytes.push(2);
    open_err(&raw.bytes, &["`k`", "BOOL", "byte 2"]);

    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(&[0x66, 0xFF, 0x80]).u32(4).u32(0);
    open_err(&raw.bytes, &["metadata key #0", "not valid UTF-8"]);

    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"k").u32(8).string(&[0xC3]);
    open_err(&raw.bytes, &["`k`", "not valid UTF-8"]);

    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"k").u32(9).u32(77).u64(0);
    open_err(&raw.bytes, &["`k`", "unknown element type 77"]);

    let mut raw = RawGguf::header(3, 0, 2);
    raw.kv_u32("k", 1).kv_u32("k", 2);
    open_err(&raw.bytes, &["duplicate metadata key `k`"]);
}

#[test]
fn deeply_nested_arrays_do_not_overflow_the_stack() {
    let depth = 100_000;
    let mut raw = RawGguf::header(3, 0, 1);
    raw.string(b"deep").u32(9);
    for _ in 0..depth {
        raw.u32(9).u64(1);
    }
    raw.u32(4).u64(1).u32(0);
    open_err(&raw.bytes, &["`deep`", "nested deeper"]);
}

#[test]
fn bad_alignment_value() {
    let mut raw = RawGguf::header(3, 0, 1);
    raw.kv_u32("general.alignment", 48);
    open_err(&raw.bytes, &["general.alignment", "power of two"]);
    let mut raw = RawGguf::header(3, 0, 1);
    raw.kv_u32("general.alignment", 0);
    open_err(&raw.bytes, &["general.alignment", "power of two"]);
}

fn one_tensor(dims: &[u64], type_id: u32, offset: u64, data_bytes: usize) -> Vec<u8> {
    let mut raw = RawGguf::header(3, 1, 0);
    raw.tensor_info("blk.0.attn_q.weight", dims, type_id, offset)
        .data(data_bytes);
    raw.bytes
}

#[test]
fn one_valid_raw_tensor_opens() {
    // The control for the tensor cases below: same builder, rules kept.
    let case = write_case("raw.gguf", &one_tensor(&[4, 2], 0, 0, 32));
    let gguf = GgufFile::open(&case.path).unwrap();
    assert_eq!(gguf.tensors[0].shape, [4, 2]);
    assert_eq!(gguf.tensor_data(&gguf.tensors[0]), &[0xAB; 32]);
}

#[test]
fn tensor_offset_past_end() {
    open_err(
        &one_tensor(&[4, 2], 0, 1024, 32),
        &["blk.0.attn_q.weight", "past the end"],
    );
    open_err(
        &one_tensor(&[4, 2], 0, 0, 31),
        &["blk.0.attn_q.weight", "past the end"],
    );
    open_err(
        &one_tensor(&[4], 0, u64::MAX - 31, 16),
        &["blk.0.attn_q.weight"],
    );
}

#[test]
fn absurd_dims() {
    open_err(
        &one_tensor(&[1 << 62], 0, 0, 32),
        &["blk.0.attn_q.weight", "overflows"],
    );
    open_err(
        &one_tensor(&[1 << 31, 1 << 31, 1 << 31], 0, 0, 32),
        &["blk.0.attn_q.weight", "overflows"],
    );
    open_err(
        &one_tensor(&[u64::MAX], 0, 0, 32),
        &["blk.0.attn_q.weight", "too large"],
    );
    open_err(
        &one_tensor(&[4, 0], 0, 0, 32),
        &["blk.0.attn_q.weight", "dimension 1 is 0"],
    );
}

#[test]
fn dimension_count() {
    open_err(
        &one_tensor(&[4, 1, 1, 1, 1], 0, 0, 32),
        &["blk.0.attn_q.weight", "5 dimensions"],
    );
    open_err(
        &one_tensor(&[], 0, 0, 32),
        &["blk.0.attn_q.weight", "0 dimensions"],
    );
    let mut raw = RawGguf::header(3, 1, 0);
    raw.string(b"t").u32(u32::MAX).data(64);
    open_err(&raw.bytes, &["`t`", "4294967295 dimensions"]);
}

#[test]
fn unknown_type_id() {
    let err = open_err(
        &one_tensor(&[4, 2], 99, 0, 32),
        &["blk.0.attn_q.weight", "99"],
    );
    assert!(matches!(err, IoError::UnknownType { id: 99, .. }));
}

#[test]
fn misaligned_offset() {
    open_err(
        &one_tensor(&[4], 0, 7, 64),
        &["blk.0.attn_q.weight", "not a multiple of the alignment 32"],
    );
}

#[test]
fn row_not_a_whole_number_of_blocks() {
    // Q4_0: blocks of 32 weights in 18 bytes.
    open_err(
        &one_tensor(&[33, 1], 2, 0, 64),
        &["blk.0.attn_q.weight", "row length 33", "Q4_0 block size 32"],
    );
    // Q4_K: blocks of 256.
    open_err(&one_tensor(&[128], 12, 0, 256), &["Q4_K block size 256"]);
}

#[test]
fn duplicate_tensor_names() {
    let mut raw = RawGguf::header(3, 2, 0);
    raw.tensor_info("w", &[4], 0, 0)
        .tensor_info("w", &[4], 0, 32)
        .data(64);
    open_err(&raw.bytes, &["duplicate tensor name `w`"]);
}

#[test]
fn tensor_name_not_utf8() {
    let mut raw = RawGguf::header(3, 1, 0);
    raw.string(&[0xFF, 0xFE])
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(0)
        .data(16);
    open_err(&raw.bytes, &["name of tensor #0", "not valid UTF-8"]);
}

fn open_never_panics(path: &Path) {
    // The property is only that this returns; either outcome is fine.
    let outcome = std::panic::catch_unwind(|| GgufFile::open(path).map(|g| g.tensors.len()));
    assert!(
        outcome.is_ok(),
        "GgufFile::open panicked on {}",
        path.display()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 8 } else { 512 }))]

    #[test]
    fn flipped_bytes_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8)
    ) {
        let mut bytes = small_valid_file();
        for (index, mask) in &flips {
            let at = index.index(bytes.len());
            bytes[at] ^= mask;
        }
        let case = write_case("flipped.gguf", &bytes);
        open_never_panics(&case.path);
    }

    #[test]
    fn random_header_fields_never_panic(
        n_tensors in any::<u64>(),
        n_kv in any::<u64>(),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut raw = RawGguf::header(3, n_tensors % 4, n_kv % 4);
        raw.bytes.extend_from_slice(&tail);
        let case = write_case("random.gguf", &raw.bytes);
        open_never_panics(&case.path);
        let mut raw = RawGguf::header(3, n_tensors, n_kv);
        raw.bytes.extend_from_slice(&tail);
        let case = write_case("random.gguf", &raw.bytes);
        open_never_panics(&case.path);
    }
}
