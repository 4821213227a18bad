//! GGUF reader (versions 2 and 3), over a memory map.
//!
//! Layout, all little-endian:
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv      × (key: string, value type u32, value)
//! n_tensors × (name: string, n_dims u32, dims u64 × n_dims, ggml type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor's offset is relative to the start of this section
//! ```
//! A string is a u64 byte length followed by UTF-8 bytes; an array is an element type u32,
//! a u64 count and the elements. Everything is validated in [`GgufFile::open`], so the
//! accessors afterwards cannot fail on a well-formed handle.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::mapped::{Backing, FileMap};
use edgefusion_kernels::GgmlType;

use crate::error::IoError;
use crate::TensorView;

pub use crate::gguf_writer::GgufWriter;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Version written by [`GgufWriter`].
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;
pub const ALIGNMENT_KEY: &str = "general.alignment";
pub const ARCHITECTURE_KEY: &str = "general.architecture";
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal; deeper nesting than this is refused so that a hostile file
/// cannot drive the recursive reader into a stack overflow.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The on-disk tag of a metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| *t as u32 == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "U8",
            ValueType::I8 => "I8",
            ValueType::U16 => "U16",
            ValueType::I16 => "I16",
            ValueType::U32 => "U32",
            ValueType::I32 => "I32",
            ValueType::F32 => "F32",
            ValueType::Bool => "BOOL",
            ValueType::String => "STRING",
            ValueType::Array => "ARRAY",
            ValueType::U64 => "U64",
            ValueType::I64 => "I64",
            ValueType::F64 => "F64",
        }
    }

    /// The fewest bytes one value of this type takes on disk: a string is at least its
    /// length field, an array at least its element type and count.
    fn min_encoded_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// A metadata value. Arrays hold elements of one type (the writer checks this).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::F64(_) => ValueType::F64,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
        }
    }

    /// The value as an integer, for any integer type (not bools).
    pub fn as_i128(&self) -> Option<i128> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value as a float, for F32 and F64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages: `U32 7`, `STRING`, `ARRAY of 3 F32`.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::String(_) => "STRING".to_string(),
            MetaValue::Array(items) => match items.first() {
                Some(first) => format!("ARRAY of {} {}", items.len(), first.value_type().name()),
                None => "empty ARRAY".to_string(),
            },
            scalar => format!("{} {scalar}", scalar.value_type().name()),
        }
    }
}

/// Prints scalars plainly and long arrays shortened, for `inspect`.
impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN_ITEMS: usize = 8;
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(items) => {
                write!(f, "[")?;
                for (i, item) in items.iter().take(SHOWN_ITEMS).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                if items.len() > SHOWN_ITEMS {
                    write!(f, ", ... ({} items)", items.len())?;
                }
                write!(f, "]")
            }
        }
    }
}

/// Where one tensor lives in the file and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: GgmlType,
    /// ggml order: `shape[0]` is the contiguous row length (the input dimension of a
    /// weight matrix), `shape[1]` the number of rows.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        // Cannot overflow: open() checked the product.
        self.shape
            .iter()
            .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
            .unwrap_or(usize::MAX)
    }
}

/// An open, validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: usize,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section.
    data_offset: usize,
    mmap: FileMap,
    key_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps and validates the file: header, every metadata value, every tensor's type,
    /// shape, alignment and extent. After this succeeds no accessor can read out of bounds.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        Self::open_with(path, Backing::Auto)
    }

    /// [`GgufFile::open`] with the file's bytes held as `backing` says.
    pub fn open_with(path: impl AsRef<Path>, backing: Backing) -> Result<Self, IoError> {
        let path = path.as_ref();
        let file_meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IoError::NotFound {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(IoError::os(path, "stat", e)),
        };
        if file_meta.is_dir() {
            return Err(IoError::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        let mmap = FileMap::open(path, backing)?;
        let parsed = parse(path, &mmap)?;
        let key_index = parsed
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (key, _))| (key.clone(), i))
            .collect();
        let tensor_index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            data_offset: parsed.data_offset,
            mmap,
            key_index,
            tensor_index,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        // The index is built at open(); the fields are public, so fall back to a scan if a
        // caller has since edited `metadata`.
        let indexed = self
            .key_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .filter(|(k, _)| k == key);
        indexed
            .or_else(|| self.metadata.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, IoError> {
        self.get(key).ok_or_else(|| IoError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &MetaValue) -> IoError {
        IoError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: found.describe(),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, IoError> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "STRING", value))
    }

    /// Any integer type whose value fits in a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, IoError> {
        let value = self.require(key)?;
        value
            .as_i128()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| self.wrong_type(key, "an integer in 0..=4294967295", value))
    }

    /// Any integer type whose value fits in a u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, IoError> {
        let value = self.require(key)?;
        value
            .as_i128()
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", value))
    }

    /// F32 or F64 (narrowed).
    pub fn get_f32(&self, key: &str) -> Result<f32, IoError> {
        let value = self.require(key)?;
        value
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| self.wrong_type(key, "F32 or F64", value))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, IoError> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            other => Err(self.wrong_type(key, "BOOL", other)),
        }
    }

    fn get_array(&self, key: &str, expected: &'static str) -> Result<&[MetaValue], IoError> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, expected, value))
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, IoError> {
        const EXPECTED: &str = "ARRAY of STRING";
        let items = self.get_array(key, EXPECTED)?;
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| self.wrong_type(key, EXPECTED, &self.sample_of(items)))
            })
            .collect()
    }

    /// F32 or F64 elements.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, IoError> {
        const EXPECTED: &str = "ARRAY of F32";
        let items = self.get_array(key, EXPECTED)?;
        items
            .iter()
            .map(|item| {
                item.as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| self.wrong_type(key, EXPECTED, &self.sample_of(items)))
            })
            .collect()
    }

    /// Integer elements that each fit in an i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, IoError> {
        const EXPECTED: &str = "ARRAY of integers that fit in I32";
        let items = self.get_array(key, EXPECTED)?;
        items
            .iter()
            .map(|item| {
                item.as_i128()
                    .and_then(|v| i32::try_from(v).ok())
                    .ok_or_else(|| self.wrong_type(key, EXPECTED, &self.sample_of(items)))
            })
            .collect()
    }

    /// A stand-in for an array in an error message, without cloning the whole array.
    fn sample_of(&self, items: &[MetaValue]) -> MetaValue {
        MetaValue::Array(items.iter().take(1).cloned().collect())
    }

    /// `general.architecture`, e.g. `llama` or `qwen2`.
    pub fn architecture(&self) -> Result<&str, IoError> {
        self.get_str(ARCHITECTURE_KEY)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let indexed = self
            .tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .filter(|t| t.name == name);
        indexed.or_else(|| self.tensors.iter().find(|t| t.name == name))
    }

    /// The bytes of `t`. Extents were checked at open(); a `TensorInfo` that does not belong
    /// to this file and points outside it yields an empty slice rather than a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        t.offset
            .checked_add(t.n_bytes)
            .and_then(|end| self.mmap.get(t.offset..end))
            .unwrap_or(&[])
    }

    pub fn view<'a>(&'a self, t: &'a TensorInfo) -> TensorView<'a> {
        TensorView {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: self.tensor_data(t),
        }
    }

    pub fn tensor_view(&self, name: &str) -> Option<TensorView<'_>> {
        self.tensor(name).map(|t| self.view(t))
    }

    /// Lets the OS drop the resident pages that lie wholly inside `bytes`, a slice of this
    /// file's mapping the caller has copied and will not read again (reading it again is
    /// still correct: the pages come back from the file). Slices from elsewhere are ignored.
    pub fn release(&self, bytes: &[u8]) {
        self.mmap.release(bytes);
    }

    pub fn file_size(&self) -> usize {
        self.mmap.len()
    }

    /// Absolute offset where the tensor data section starts.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }
}

/// What `parse` recovers from the bytes of a file.
struct ParsedGguf {
    version: u32,
    alignment: usize,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
    data_offset: usize,
}

/// A read that ran off the end: `needed` bytes at `offset`.
#[derive(Clone, Copy)]
struct Short {
    offset: usize,
    needed: u64,
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Short> {
        let short = Short {
            offset: self.pos,
            needed: n,
        };
        let n = usize::try_from(n).map_err(|_| short)?;
        let end = self.pos.checked_add(n).ok_or(short)?;
        let taken = self.bytes.get(self.pos..end).ok_or(short)?;
        self.pos = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let at = self.pos;
        <[u8; N]>::try_from(self.take(N as u64)?).map_err(|_| Short {
            offset: at,
            needed: N as u64,
        })
    }

    fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    /// A length-prefixed byte string (UTF-8 is checked by the caller, who knows the context).
    fn string_bytes(&mut self) -> Result<&'a [u8], Short> {
        let len = self.u64()?;
        self.take(len)
    }
}

/// Parses and validates a whole GGUF image; `path` is only for messages.
struct Parser<'a> {
    path: &'a Path,
    cursor: Cursor<'a>,
}

impl<'a> Parser<'a> {
    fn truncated(&self, short: Short, context: impl FnOnce() -> String) -> IoError {
        IoError::Truncated {
            path: self.path.to_path_buf(),
            context: context(),
            offset: short.offset,
            needed: short.needed,
            file_size: self.cursor.bytes.len(),
        }
    }

    fn malformed(&self, problem: String) -> IoError {
        IoError::malformed(self.path, problem)
    }

    fn u32(&mut self, context: impl FnOnce() -> String) -> Result<u32, IoError> {
        self.cursor.u32().map_err(|s| self.truncated(s, context))
    }

    fn u64(&mut self, context: impl FnOnce() -> String) -> Result<u64, IoError> {
        self.cursor.u64().map_err(|s| self.truncated(s, context))
    }

    fn string(&mut self, context: impl Fn() -> String) -> Result<String, IoError> {
        let start = self.cursor.pos;
        let bytes = self
            .cursor
            .string_bytes()
            .map_err(|s| self.truncated(s, &context))?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.malformed(format!(
                "{} (string at offset {start}) is not valid UTF-8: {e}",
                context()
            ))),
        }
    }

    /// Refuses a count of items that cannot fit in what is left of the file, before
    /// anything is allocated for them.
    fn check_count(
        &self,
        count: u64,
        min_item_bytes: u64,
        what: impl FnOnce() -> String,
    ) -> Result<usize, IoError> {
        let remaining = self.cursor.remaining() as u64;
        let fits = count
            .checked_mul(min_item_bytes)
            .is_some_and(|need| need <= remaining);
        match usize::try_from(count) {
            Ok(count) if fits => Ok(count),
            _ => Err(self.malformed(format!(
                "{} claims {count} items of at least {min_item_bytes} bytes each, \
                 but only {remaining} bytes follow at offset {}",
                what(),
                self.cursor.pos
            ))),
        }
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: usize) -> Result<MetaValue, IoError> {
        let context = || format!("value of metadata key `{key}`");
        let c = &mut self.cursor;
        let value = match ty {
            ValueType::U8 => c.array().map(|b| MetaValue::U8(u8::from_le_bytes(b))),
            ValueType::I8 => c.array().map(|b| MetaValue::I8(i8::from_le_bytes(b))),
            ValueType::U16 => c.array().map(|b| MetaValue::U16(u16::from_le_bytes(b))),
            ValueType::I16 => c.array().map(|b| MetaValue::I16(i16::from_le_bytes(b))),
            ValueType::U32 => c.array().map(|b| MetaValue::U32(u32::from_le_bytes(b))),
            ValueType::I32 => c.array().map(|b| MetaValue::I32(i32::from_le_bytes(b))),
            ValueType::U64 => c.array().map(|b| MetaValue::U64(u64::from_le_bytes(b))),
            ValueType::I64 => c.array().map(|b| MetaValue::I64(i64::from_le_bytes(b))),
            ValueType::F32 => c.array().map(|b| MetaValue::F32(f32::from_le_bytes(b))),
            ValueType::F64 => c.array().map(|b| MetaValue::F64(f64::from_le_bytes(b))),
            ValueType::Bool => {
                let at = c.pos;
                let [byte] = c.array().map_err(|s| self.truncated(s, context))?;
                return match byte {
                    0 => Ok(MetaValue::Bool(false)),
                    1 => Ok(MetaValue::Bool(true)),
                    other => Err(self.malformed(format!(
                        "metadata key `{key}`: BOOL at offset {at} has byte {other}, expected 0 or 1"
                    ))),
                };
            }
            ValueType::String => return self.string(context).map(MetaValue::String),
            ValueType::Array => return self.array(key, depth),
        };
        value.map_err(|s| self.truncated(s, context))
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<MetaValue, IoError> {
        let context = || format!("array header of metadata key `{key}`");
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.malformed(format!(
                "metadata key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            )));
        }
        let elem_id = self.u32(context)?;
        let elem_ty = ValueType::from_id(elem_id).ok_or_else(|| {
            self.malformed(format!(
                "metadata key `{key}`: array has unknown element type {elem_id}"
            ))
        })?;
        let count = self.u64(context)?;
        let count = self.check_count(count, elem_ty.min_encoded_size(), || {
            format!("array of {} in metadata key `{key}`", elem_ty.name())
        })?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(self.value(key, elem_ty, depth + 1)?);
        }
        Ok(MetaValue::Array(items))
    }

    fn tensor_info(&mut self, index: usize, alignment: usize) -> Result<TensorInfo, IoError> {
        let name = self.string(|| format!("name of tensor #{index}"))?;
        let context = || format!("info of tensor `{name}`");
        let path: &'a Path = self.path;
        let bad = |problem: String| IoError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            problem,
        };
        let n_dims = self.u32(context)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(bad(format!(
                "has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}"
            )));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        let mut n_elements: usize = 1;
        for axis in 0..n_dims {
            let dim = self.u64(context)?;
            if dim == 0 {
                return Err(bad(format!("dimension {axis} is 0")));
            }
            let dim = usize::try_from(dim)
                .ok()
                .filter(|&d| d <= i64::MAX as usize)
                .ok_or_else(|| bad(format!("dimension {axis} = {dim} is too large")))?;
            n_elements = n_elements
                .checked_mul(dim)
                .filter(|&n| n <= i64::MAX as usize)
                .ok_or_else(|| {
                    bad(format!(
                        "element count of shape {shape:?} x {dim} overflows"
                    ))
                })?;
            shape.push(dim);
        }
        let type_id = self.u32(context)?;
        let dtype = GgmlType::from_id(type_id).ok_or_else(|| IoError::UnknownType {
            path: path.to_path_buf(),
            tensor: name.clone(),
            id: type_id,
        })?;
        let relative_offset = self.u64(context)?;

        let row_len = shape.first().copied().unwrap_or(1);
        if row_len % dtype.block_size() != 0 {
            return Err(bad(format!(
                "row length {row_len} is not a multiple of the {} block size {}",
                dtype.name(),
                dtype.block_size()
            )));
        }
        let row_bytes = dtype
            .row_bytes(row_len)
            .ok_or_else(|| bad(format!("byte size of a row of {row_len} overflows")))?;
        let n_rows = n_elements / row_len;
        let n_bytes = row_bytes
            .checked_mul(n_rows)
            .ok_or_else(|| bad(format!("byte size of shape {shape:?} overflows")))?;
        let offset = usize::try_from(relative_offset)
            .map_err(|_| bad(format!("data offset {relative_offset} is too large")))?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        Ok(TensorInfo {
            name,
            dtype,
            shape,
            offset,
            n_bytes,
        })
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<ParsedGguf, IoError> {
    let mut p = Parser {
        path,
        cursor: Cursor { bytes, pos: 0 },
    };

    let magic: [u8; 4] = p
        .cursor
        .array()
        .map_err(|s| p.truncated(s, || "magic".to_string()))?;
    if magic != GGUF_MAGIC {
        return Err(IoError::BadMagic {
            path: path.to_path_buf(),
            found: magic.to_vec(),
        });
    }
    let version = p.u32(|| "version".to_string())?;
    if version != 2 && version != 3 {
        let hint = if version == 1 {
            "; v1 files predate 64-bit counts, re-convert with a current llama.cpp".to_string()
        } else if matches!(version.swap_bytes(), 1..=3) {
            "; the file looks big-endian, which this reader does not read".to_string()
        } else {
            String::new()
        };
        return Err(IoError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
            hint,
        });
    }
    let n_tensors = p.u64(|| "tensor count".to_string())?;
    let n_kv = p.u64(|| "metadata count".to_string())?;

    // Smallest encodings: key (length) + type + a one-byte value; name (length) + n_dims +
    // one dim + type + offset.
    const MIN_KV_BYTES: u64 = 8 + 4 + 1;
    const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
    let n_kv = p.check_count(n_kv, MIN_KV_BYTES, || "the metadata count".to_string())?;
    let n_tensors = p.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, || {
        "the tensor count".to_string()
    })?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut seen_keys = std::collections::HashSet::with_capacity(n_kv);
    for index in 0..n_kv {
        let key = p.string(|| format!("metadata key #{index}"))?;
        let type_id = p.u32(|| format!("value type of metadata key `{key}`"))?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| {
            p.malformed(format!(
                "metadata key `{key}` has unknown value type {type_id}"
            ))
        })?;
        let value = p.value(&key, ty, 0)?;
        if !seen_keys.insert(key.clone()) {
            return Err(IoError::Duplicate {
                path: path.to_path_buf(),
                what: "metadata key",
                name: key,
            });
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, value)) => value
            .as_i128()
            .and_then(|v| usize::try_from(v).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                p.malformed(format!(
                    "{ALIGNMENT_KEY} is {}, expected a power of two",
                    value.describe()
                ))
            })?,
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut seen_names = std::collections::HashSet::with_capacity(n_tensors);
    for index in 0..n_tensors {
        let info = p.tensor_info(index, alignment)?;
        if !seen_names.insert(info.name.clone()) {
            return Err(IoError::Duplicate {
                path: path.to_path_buf(),
                what: "tensor name",
                name: info.name,
            });
        }
        tensors.push(info);
    }

    let data_offset = p
        .cursor
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| p.malformed("data section offset overflows".to_string()))?;
    let file_size = bytes.len();
    for t in &mut tensors {
        let relative = t.offset;
        let extent = data_offset
            .checked_add(relative)
            .and_then(|start| Some((start, start.checked_add(t.n_bytes)?)));
        match extent {
            Some((start, end)) if end <= file_size => t.offset = start,
            _ => {
                return Err(IoError::BadTensor {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    problem: format!(
                        "data ({} bytes at data offset {relative}, data section at {data_offset}) \
                         runs past the end of the file ({file_size} bytes)",
                        t.n_bytes
                    ),
                })
            }
        }
    }

    Ok(ParsedGguf {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
    })
}
