//! GGUF v3 writer: collect metadata and tensors, then write the file atomically.
//!
//! Everything is validated before the first byte is written; the bytes go to `<path>.tmp`,
//! which is flushed, fsynced and renamed over `path`. A failure at any step removes the
//! temporary file, so `path` is either the old file (or absent) or the complete new one.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use edgefusion_kernels::GgmlType;

use crate::error::IoError;
use crate::gguf::{
    MetaValue, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION,
    MAX_ARRAY_DEPTH, MAX_DIMS,
};

/// A tensor waiting to be written; its bytes are borrowed when the caller can keep them
/// alive, so writing a large model does not copy it.
#[derive(Debug, Clone)]
struct PendingTensor<'a> {
    name: String,
    dtype: GgmlType,
    /// ggml order, `shape[0]` contiguous.
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

/// Builder for a GGUF v3 file.
///
/// ```no_run
/// # use edgefusion_io::gguf::{GgufWriter, MetaValue};
/// # use edgefusion_kernels::GgmlType;
/// let weights = vec![0u8; 4 * 8];
/// let mut writer = GgufWriter::new();
/// writer
///     .add_metadata("general.architecture", MetaValue::String("llama".into()))
///     .add_tensor("output_norm.weight", GgmlType::F32, &[8], &weights[..]);
/// writer.write("model.gguf")?;
/// # Ok::<(), edgefusion_io::IoError>(())
/// ```
#[derive(Debug, Clone)]
pub struct GgufWriter<'a> {
    alignment: usize,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor<'a>>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Data alignment; must be a power of two (checked when writing). Anything but the
    /// default 32 is recorded as `general.alignment`.
    pub fn with_alignment(mut self, alignment: usize) -> Self {
        self.alignment = alignment;
        self
    }

    /// Adds a key, or replaces the value of a key added before (keeping its position).
    ///
    /// An empty `MetaValue::Array` carries no element type; it is written as an empty
    /// array of U8.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, old)) => *old = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a tensor. `shape` is in ggml order (`shape[0]` is the row length) and `data`
    /// must hold exactly the bytes that `dtype` needs for it; both are checked when writing.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: GgmlType,
        shape: &[usize],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data: data.into(),
        });
        self
    }

    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    pub fn n_metadata(&self) -> usize {
        self.metadata.len()
    }

    /// Writes the file atomically: `<path>.tmp`, flush, fsync, rename over `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), IoError> {
        let path = path.as_ref();
        let layout = self.layout(path)?;
        let tmp_path = tmp_path_for(path);
        let result = write_tmp_then_rename(self, &layout, path, &tmp_path);
        if result.is_err() {
            // Best effort: the temporary file may not exist if create() itself failed, and
            // the original error is the one worth reporting.
            let _ = std::fs::remove_file(&tmp_path);
        }
        result
    }

    /// The file's bytes, for tests and small files. Errors name `<in-memory GGUF>`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, IoError> {
        let label = Path::new("<in-memory GGUF>");
        let layout = self.layout(label)?;
        let mut bytes = Vec::with_capacity(layout.total_bytes);
        self.emit(&layout, &mut bytes)
            .map_err(|e| IoError::os(label, "write", e))?;
        Ok(bytes)
    }

    /// Validates everything and works out where each tensor goes.
    fn layout(&self, path: &Path) -> Result<Layout, IoError> {
        let alignment = self.alignment;
        if !alignment.is_power_of_two() || u32::try_from(alignment).is_err() {
            return Err(IoError::malformed(
                path,
                format!("alignment {alignment} is not a power of two that fits in u32"),
            ));
        }
        let alignment_entry = (alignment != DEFAULT_ALIGNMENT)
            .then(|| (ALIGNMENT_KEY.to_string(), MetaValue::U32(alignment as u32)));
        for (key, value) in &self.metadata {
            if key == ALIGNMENT_KEY && value.as_i128() != Some(alignment as i128) {
                return Err(IoError::malformed(
                    path,
                    format!(
                        "metadata {ALIGNMENT_KEY} = {} disagrees with the writer's alignment {alignment}",
                        value.describe()
                    ),
                ));
            }
            check_value(path, key, value, 0)?;
        }
        // Our own entry only when the caller did not supply one.
        let extra_metadata = alignment_entry
            .filter(|_| !self.metadata.iter().any(|(k, _)| k == ALIGNMENT_KEY))
            .into_iter()
            .collect::<Vec<_>>();

        let mut names = HashSet::with_capacity(self.tensors.len());
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut data_bytes: usize = 0;
        for t in &self.tensors {
            let bad = |problem: String| IoError::BadTensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                problem,
            };
            if !names.insert(t.name.as_str()) {
                return Err(IoError::Duplicate {
                    path: path.to_path_buf(),
                    what: "tensor name",
                    name: t.name.clone(),
                });
            }
            let expected = expected_bytes(t.dtype, &t.shape).map_err(bad)?;
            if t.data.len() != expected {
                return Err(bad(format!(
                    "has {} bytes of data, but {} {:?} needs {expected}",
                    t.data.len(),
                    t.dtype.name(),
                    t.shape
                )));
            }
            offsets.push(data_bytes);
            data_bytes = data_bytes
                .checked_add(expected)
                .and_then(|end| end.checked_next_multiple_of(alignment))
                .ok_or_else(|| bad("total data size overflows".to_string()))?;
        }

        let header_bytes = self.header_size(&extra_metadata);
        let data_start = header_bytes
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| IoError::malformed(path, "header size overflows"))?;
        let total_bytes = data_start
            .checked_add(data_bytes)
            .ok_or_else(|| IoError::malformed(path, "file size overflows"))?;
        Ok(Layout {
            extra_metadata,
            offsets,
            data_start,
            total_bytes,
        })
    }

    /// Bytes before the padding that precedes the data section.
    fn header_size(&self, extra_metadata: &[(String, MetaValue)]) -> usize {
        let kv_bytes: usize = self
            .metadata
            .iter()
            .chain(extra_metadata)
            .map(|(key, value)| 8 + key.len() + 4 + value_payload_size(value))
            .sum();
        let tensor_info_bytes: usize = self
            .tensors
            .iter()
            .map(|t| 8 + t.name.len() + 4 + 8 * t.shape.len() + 4 + 8)
            .sum();
        4 + 4 + 8 + 8 + kv_bytes + tensor_info_bytes
    }

    fn emit(&self, layout: &Layout, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&GGUF_MAGIC)?;
        out.write_all(&GGUF_VERSION.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        let n_kv = self.metadata.len() + layout.extra_metadata.len();
        out.write_all(&(n_kv as u64).to_le_bytes())?;
        for (key, value) in self.metadata.iter().chain(&layout.extra_metadata) {
            write_string(out, key)?;
            out.write_all(&(value.value_type() as u32).to_le_bytes())?;
            write_value(out, value)?;
        }
        for (t, &offset) in self.tensors.iter().zip(&layout.offsets) {
            write_string(out, &t.name)?;
            out.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for &dim in &t.shape {
                out.write_all(&(dim as u64).to_le_bytes())?;
            }
            out.write_all(&(t.dtype as u32).to_le_bytes())?;
            out.write_all(&(offset as u64).to_le_bytes())?;
        }
        let header_bytes = self.header_size(&layout.extra_metadata);
        write_zeros(out, layout.data_start - header_bytes)?;
        for t in &self.tensors {
            out.write_all(&t.data)?;
            let padded = t.data.len().next_multiple_of(self.alignment);
            write_zeros(out, padded - t.data.len())?;
        }
        Ok(())
    }
}

/// Where things go, worked out (and everything checked) before writing.
struct Layout {
    /// `general.alignment` when it is not the default and the caller did not add it.
    extra_metadata: Vec<(String, MetaValue)>,
    /// Offset of each tensor relative to the data section.
    offsets: Vec<usize>,
    data_start: usize,
    total_bytes: usize,
}

fn tmp_path_for(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

fn write_tmp_then_rename(
    writer: &GgufWriter<'_>,
    layout: &Layout,
    path: &Path,
    tmp_path: &Path,
) -> Result<(), IoError> {
    let file = File::create(tmp_path).map_err(|e| IoError::os(tmp_path, "create", e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    writer
        .emit(layout, &mut out)
        .map_err(|e| IoError::os(tmp_path, "write", e))?;
    let file = out
        .into_inner()
        .map_err(|e| IoError::os(tmp_path, "flush", e.into_error()))?;
    file.sync_all()
        .map_err(|e| IoError::os(tmp_path, "fsync", e))?;
    drop(file);
    crate::durable::rename_flushed(tmp_path, path)
        .map_err(|e| IoError::os(tmp_path, format!("rename to {}", path.display()), e))
}

/// Bytes a tensor of `dtype` and `shape` takes, or why the shape is not writable.
fn expected_bytes(dtype: GgmlType, shape: &[usize]) -> Result<usize, String> {
    if shape.is_empty() || shape.len() > MAX_DIMS {
        return Err(format!(
            "has {} dimensions; GGUF allows 1 to {MAX_DIMS}",
            shape.len()
        ));
    }
    if let Some(axis) = shape.iter().position(|&d| d == 0) {
        return Err(format!("dimension {axis} is 0"));
    }
    let row_len = shape.first().copied().unwrap_or(1);
    if row_len % dtype.block_size() != 0 {
        return Err(format!(
            "row length {row_len} is not a multiple of the {} block size {}",
            dtype.name(),
            dtype.block_size()
        ));
    }
    let row_bytes = dtype
        .row_bytes(row_len)
        .ok_or_else(|| format!("byte size of a row of {row_len} overflows"))?;
    shape
        .iter()
        .skip(1)
        .try_fold(row_bytes, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("byte size of shape {shape:?} overflows"))
}

/// Checks what the reader will insist on: homogeneous arrays, bounded nesting.
fn check_value(path: &Path, key: &str, value: &MetaValue, depth: usize) -> Result<(), IoError> {
    let MetaValue::Array(items) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(IoError::malformed(
            path,
            format!("metadata key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
        ));
    }
    let Some(first) = items.first() else {
        return Ok(());
    };
    let elem_ty = first.value_type();
    for (i, item) in items.iter().enumerate() {
        if item.value_type() != elem_ty {
            return Err(IoError::malformed(
                path,
                format!(
                    "metadata key `{key}`: array mixes {} (element 0) and {} (element {i})",
                    elem_ty.name(),
                    item.value_type().name()
                ),
            ));
        }
        check_value(path, key, item, depth + 1)?;
    }
    Ok(())
}

/// Encoded size of a value without its type tag.
fn value_payload_size(value: &MetaValue) -> usize {
    match value {
        MetaValue::U8(_) | MetaValue::I8(_) | MetaValue::Bool(_) => 1,
        MetaValue::U16(_) | MetaValue::I16(_) => 2,
        MetaValue::U32(_) | MetaValue::I32(_) | MetaValue::F32(_) => 4,
        MetaValue::U64(_) | MetaValue::I64(_) | MetaValue::F64(_) => 8,
        MetaValue::String(s) => 8 + s.len(),
        MetaValue::Array(items) => 4 + 8 + items.iter().map(value_payload_size).sum::<usize>(),
    }
}

fn write_string(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

fn write_zeros(out: &mut impl Write, n: usize) -> std::io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(ZEROS.len());
        out.write_all(&ZEROS[..chunk])?;
        left -= chunk;
    }
    Ok(())
}

/// Writes a value's payload (the type tag is written by the caller).
fn write_value(out: &mut impl Write, value: &MetaValue) -> std::io::Result<()> {
    match value {
        MetaValue::U8(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::I8(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::U16(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::I16(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::U32(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::I32(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::U64(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::I64(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::F32(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::F64(v) => out.write_all(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.write_all(&[u8::from(*v)]),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(items) => {
            let elem_ty = items.first().map_or(ValueType::U8, MetaValue::value_type);
            out.write_all(&(elem_ty as u32).to_le_bytes())?;
            out.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(out, item))
        }
    }
}
