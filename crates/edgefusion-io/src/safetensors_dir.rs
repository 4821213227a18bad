//! A Hugging Face model folder: `config.json`, the weights as `model.safetensors` or as
//! shards listed in `model.safetensors.index.json`, and optionally `tokenizer.json`.
//!
//! Shards are memory-mapped and their headers parsed by the `safetensors` crate; tensors
//! are exposed as [`TensorView`]s with the shape reversed into ggml order (safetensors
//! stores `(out, in)` row-major, ggml lists the contiguous `in` first).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::mapped::{Backing, FileMap};
use edgefusion_kernels::GgmlType;
use safetensors::{Dtype, SafeTensors};

use crate::error::IoError;
use crate::names::parse_hf_name;
use crate::TensorView;

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// One memory-mapped `.safetensors` file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    mmap: FileMap,
}

/// Where one tensor lives.
#[derive(Debug)]
struct TensorEntry {
    name: String,
    /// The storage type, or the safetensors dtype name we cannot use.
    dtype: Result<GgmlType, String>,
    /// ggml order.
    shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range within the shard file.
    start: usize,
    end: usize,
}

/// An open, validated Hugging Face model folder.
#[derive(Debug)]
pub struct SafetensorsDir {
    pub dir: PathBuf,
    /// `config.json`, parsed (always a JSON object).
    pub config: serde_json::Value,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer_json: Option<PathBuf>,
    shards: Vec<Shard>,
    /// In file order: by shard, then by offset.
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens the folder and every shard, and checks every tensor the index lists.
    ///
    /// Tensors with dtypes other than F32/F16/BF16 are allowed (models carry integer
    /// buffers) unless their name is one of the model weights in [`crate::names`]; those must
    /// be usable, so that a lookup by role fails only when the tensor is absent.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, IoError> {
        Self::open_with(dir, Backing::Auto)
    }

    /// [`SafetensorsDir::open`] with the shards' bytes held as `backing` says.
    pub fn open_with(dir: impl AsRef<Path>, backing: Backing) -> Result<Self, IoError> {
        let dir = dir.as_ref();
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(IoError::malformed(
                    dir,
                    "is not a directory, expected a Hugging Face model folder",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IoError::NotFound {
                    path: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(IoError::os(dir, "stat", e)),
        }

        let config_path = dir.join(CONFIG_FILE);
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(IoError::malformed(&config_path, "is not a JSON object"));
        }
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let tokenizer_json = tokenizer_path.is_file().then_some(tokenizer_path);

        let single_path = dir.join(SINGLE_WEIGHTS_FILE);
        let index_path = dir.join(INDEX_FILE);
        // Like transformers: a single file wins over an index.
        let (shards, tensors) = if single_path.is_file() {
            let shard = map_shard(&single_path, backing)?;
            let tensors = shard_tensors(&shard, 0, None)?;
            (vec![shard], tensors)
        } else if index_path.is_file() {
            open_sharded(dir, &index_path, backing)?
        } else {
            return Err(IoError::malformed(
                dir,
                format!("has neither {SINGLE_WEIGHTS_FILE} nor {INDEX_FILE}"),
            ));
        };

        for t in &tensors {
            if let (Err(dtype), Some(_)) = (&t.dtype, parse_hf_name(&t.name)) {
                let shard_path = shards.get(t.shard).map_or(dir, |s| &s.path);
                return Err(IoError::UnsupportedDtype {
                    path: shard_path.to_path_buf(),
                    tensor: t.name.clone(),
                    dtype: dtype.clone(),
                });
            }
        }
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            config,
            tokenizer_json,
            shards,
            tensors,
            by_name,
        })
    }

    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    pub fn tokenizer_json(&self) -> Option<&Path> {
        self.tokenizer_json.as_deref()
    }

    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Every tensor name, usable or not, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// A tensor by its Hugging Face name; an error names the folder (or shard) and tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, IoError> {
        let entry = self
            .by_name
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .ok_or_else(|| IoError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        self.view(entry)
    }

    /// Every tensor with a usable dtype, in file order (see [`Self::unsupported`] for the rest).
    pub fn tensors(&self) -> Vec<TensorView<'_>> {
        self.tensors
            .iter()
            .filter_map(|t| self.view(t).ok())
            .collect()
    }

    /// `(name, dtype)` of the tensors whose dtype is not F32/F16/BF16.
    pub fn unsupported(&self) -> Vec<(&str, &str)> {
        self.tensors
            .iter()
            .filter_map(|t| {
                t.dtype
                    .as_ref()
                    .err()
                    .map(|d| (t.name.as_str(), d.as_str()))
            })
            .collect()
    }

    fn view<'a>(&'a self, entry: &'a TensorEntry) -> Result<TensorView<'a>, IoError> {
        let shard = self.shards.get(entry.shard);
        let shard_path = shard.map_or(self.dir.as_path(), |s| s.path.as_path());
        let dtype = entry
            .dtype
            .clone()
            .map_err(|dtype| IoError::UnsupportedDtype {
                path: shard_path.to_path_buf(),
                tensor: entry.name.clone(),
                dtype,
            })?;
        // Ranges were checked against the map at open(); `get` keeps this panic-free anyway.
        let data = shard
            .and_then(|s| s.mmap.get(entry.start..entry.end))
            .ok_or_else(|| IoError::BadTensor {
                path: shard_path.to_path_buf(),
                tensor: entry.name.clone(),
                problem: "data range lies outside the file".to_string(),
            })?;
        Ok(TensorView {
            name: &entry.name,
            dtype,
            shape: &entry.shape,
            data,
        })
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, IoError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => IoError::NotFound {
            path: path.to_path_buf(),
        },
        _ => IoError::os(path, "read", e),
    })?;
    serde_json::from_str(&text).map_err(|source| IoError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn map_shard(path: &Path, backing: Backing) -> Result<Shard, IoError> {
    let mmap = FileMap::open(path, backing)?;
    Ok(Shard {
        path: path.to_path_buf(),
        mmap,
    })
}

fn open_sharded(
    dir: &Path,
    index_path: &Path,
    backing: Backing,
) -> Result<(Vec<Shard>, Vec<TensorEntry>), IoError> {
    let index = read_json(index_path)?;
    let weight_map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| IoError::malformed(index_path, "has no `weight_map` object"))?;

    // shard file name -> tensor names it should hold; sorted so the order is stable.
    let mut listed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in weight_map {
        let shard = shard.as_str().ok_or_else(|| {
            IoError::malformed(
                index_path,
                format!("weight_map entry for `{tensor}` is not a file name"),
            )
        })?;
        // Only plain file names next to the index: no `..`, no absolute paths.
        let plain = Path::new(shard).file_name().and_then(|n| n.to_str()) == Some(shard)
            && !shard.contains(['/', '\\']);
        if !plain {
            return Err(IoError::malformed(
                index_path,
                format!("shard `{shard}` for `{tensor}` is not a plain file name"),
            ));
        }
        listed.entry(shard).or_default().push(tensor);
    }

    let mut shards = Vec::with_capacity(listed.len());
    let mut tensors = Vec::new();
    for (shard_index, (shard_name, names)) in listed.into_iter().enumerate() {
        let shard_path = dir.join(shard_name);
        if !shard_path.is_file() {
            return Err(IoError::MissingShard {
                path: index_path.to_path_buf(),
                shard: shard_name.to_string(),
            });
        }
        let shard = map_shard(&shard_path, backing)?;
        tensors.extend(shard_tensors(&shard, shard_index, Some(&names))?);
        shards.push(shard);
    }
    Ok((shards, tensors))
}

/// The tensors of one shard: all of them, or exactly `wanted` (each of which must exist).
fn shard_tensors(
    shard: &Shard,
    shard_index: usize,
    wanted: Option<&[&str]>,
) -> Result<Vec<TensorEntry>, IoError> {
    let path = &shard.path;
    check_offsets_fit(shard)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&shard.mmap).map_err(|e| IoError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let data_start = header_len
        .checked_add(8)
        .ok_or_else(|| IoError::malformed(path, "header length overflows"))?;
    let infos = metadata.tensors();
    let names: Vec<&str> = match wanted {
        Some(wanted) => {
            if let Some(missing) = wanted.iter().find(|n| !infos.contains_key(**n)) {
                return Err(IoError::BadTensor {
                    path: path.clone(),
                    tensor: missing.to_string(),
                    problem: format!("listed in {INDEX_FILE} but not in this shard"),
                });
            }
            wanted.to_vec()
        }
        None => infos.keys().map(String::as_str).collect(),
    };

    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        let Some(info) = infos.get(name) else {
            continue;
        };
        let (rel_start, rel_end) = info.data_offsets;
        let range = data_start
            .checked_add(rel_start)
            .zip(data_start.checked_add(rel_end))
            .filter(|&(start, end)| start <= end && end <= shard.mmap.len());
        let Some((start, end)) = range else {
            return Err(IoError::BadTensor {
                path: path.clone(),
                tensor: name.to_string(),
                problem: format!("data_offsets {:?} lie outside the file", info.data_offsets),
            });
        };
        entries.push(TensorEntry {
            name: name.to_string(),
            dtype: ggml_dtype(info.dtype),
            shape: info.shape.iter().rev().copied().collect(),
            shard: shard_index,
            start,
            end,
        });
    }
    entries.sort_by_key(|e| e.start);
    Ok(entries)
}

fn ggml_dtype(dtype: Dtype) -> Result<GgmlType, String> {
    match dtype {
        Dtype::F32 => Ok(GgmlType::F32),
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::BF16 => Ok(GgmlType::BF16),
        other => Err(format!("{other:?}")),
    }
}

/// Refuses a header whose data offsets exceed the file before the `safetensors` crate sees
/// it: that crate adds the largest offset to the header length unchecked, which overflows
/// (and panics in debug builds) for offsets near `u64::MAX`.
fn check_offsets_fit(shard: &Shard) -> Result<(), IoError> {
    let bytes: &[u8] = &shard.mmap;
    let header_len = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes);
    // Malformed length fields are left to the crate, which reports them well.
    let Some(header) = header_len
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| n.checked_add(8))
        .and_then(|end| bytes.get(8..end))
    else {
        return Ok(());
    };
    let data_len = (bytes.len() - 8 - header.len()) as u64;
    let Ok(entries) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return Ok(());
    };
    for (name, entry) in entries {
        let offsets = entry.get("data_offsets").and_then(|o| o.as_array());
        let too_far = offsets
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_u64)
            .any(|offset| offset > data_len);
        if too_far {
            return Err(IoError::BadTensor {
                path: shard.path.clone(),
                tensor: name,
                problem: format!(
                    "data_offsets {} run past the {data_len} data bytes of the file",
                    entry
                        .get("data_offsets")
                        .map_or(String::new(), |o| o.to_string())
                ),
            });
        }
    }
    Ok(())
}
