//! The one error type of this crate. Every variant names the file (or folder) it is about,
//! so a message read alone in a log still says where to look.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{}: no such file or directory", path.display())]
    NotFound { path: PathBuf },

    #[error("{}: is a directory, expected a GGUF file", path.display())]
    IsDirectory { path: PathBuf },

    #[error("{}: is neither a GGUF file nor a Hugging Face model folder", path.display())]
    NotAModel { path: PathBuf },

    #[error("{}: {action}: {source}", path.display())]
    Os {
        path: PathBuf,
        /// What we were doing: `open`, `memory-map`, `write`, `rename to ...`.
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")", path.display())]
    BadMagic { path: PathBuf, found: Vec<u8> },

    #[error("{}: unsupported GGUF version {version} (this reader supports 2 and 3){hint}", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        /// Extra advice, e.g. that the file looks big-endian; empty or starting with "; ".
        hint: String,
    },

    #[error("{}: truncated: {context} needs {needed} bytes at offset {offset}, but the file has {file_size}", path.display())]
    Truncated {
        path: PathBuf,
        context: String,
        offset: usize,
        needed: u64,
        file_size: usize,
    },

    /// A structural rule of the format is broken; `problem` says which, and where.
    #[error("{}: {problem}", path.display())]
    Malformed { path: PathBuf, problem: String },

    #[error("{}: tensor `{tensor}`: {problem}", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },

    #[error("{}: tensor `{tensor}` has unknown ggml type id {id}", path.display())]
    UnknownType {
        path: PathBuf,
        tensor: String,
        id: u32,
    },

    #[error("{}: tensor `{tensor}` has dtype {dtype}; only F32, F16 and BF16 are supported", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{}: duplicate {what} `{name}`", path.display())]
    Duplicate {
        path: PathBuf,
        /// `tensor name` or `metadata key`.
        what: &'static str,
        name: String,
    },

    #[error("{}: metadata key `{key}` not found", path.display())]
    MissingKey { path: PathBuf, key: String },

    #[error("{}: metadata key `{key}` is {found}, expected {expected}", path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("{}: tensor `{tensor}` not found", path.display())]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{}: invalid safetensors header: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },

    #[error("{}: shard `{shard}` listed in the index is missing", path.display())]
    MissingShard { path: PathBuf, shard: String },
}

impl IoError {
    pub(crate) fn os(
        path: impl Into<PathBuf>,
        action: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        IoError::Os {
            path: path.into(),
            action: action.into(),
            source,
        }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        IoError::Malformed {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
