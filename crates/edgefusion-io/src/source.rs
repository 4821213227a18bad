//! Either kind of model on disk behind one lookup by tensor role.

use std::path::Path;

use crate::error::IoError;
use crate::gguf::GgufFile;
use crate::mapped::Backing;
use crate::names::{parse_gguf_name, parse_hf_name, TensorRole};
use crate::safetensors_dir::SafetensorsDir;
use crate::TensorView;

/// A GGUF file or a Hugging Face model folder.
#[derive(Debug)]
pub enum ModelSource {
    Gguf(GgufFile),
    HfDir(SafetensorsDir),
}

impl ModelSource {
    /// A file opens as GGUF, a directory as a Hugging Face folder.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        Self::open_with(path, Backing::Auto)
    }

    /// [`ModelSource::open`] with the weights' bytes held as `backing` says
    /// ([`Backing::Mapped`] for commands that read metadata).
    pub fn open_with(path: impl AsRef<Path>, backing: Backing) -> Result<Self, IoError> {
        let path = path.as_ref();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IoError::NotFound {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(IoError::os(path, "stat", e)),
        };
        if meta.is_dir() {
            SafetensorsDir::open_with(path, backing).map(ModelSource::HfDir)
        } else if meta.is_file() {
            GgufFile::open_with(path, backing).map(ModelSource::Gguf)
        } else {
            Err(IoError::NotAModel {
                path: path.to_path_buf(),
            })
        }
    }

    /// Lets the OS drop the resident pages of `bytes`, tensor data the caller has copied into
    /// a layout of its own (see `GgufFile::release`); a no-op for safetensors folders.
    pub fn release(&self, bytes: &[u8]) {
        if let ModelSource::Gguf(gguf) = self {
            gguf.release(bytes);
        }
    }

    /// The file or folder this was opened from.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(gguf) => &gguf.path,
            ModelSource::HfDir(dir) => &dir.dir,
        }
    }

    /// The name `role` has in this source's naming scheme.
    pub fn tensor_name(&self, role: TensorRole, layer: Option<usize>) -> String {
        match self {
            ModelSource::Gguf(_) => role.gguf_name(layer),
            ModelSource::HfDir(_) => role.hf_name(layer),
        }
    }

    /// Role and layer of a tensor name in this source's naming scheme.
    pub fn role_of(&self, name: &str) -> Option<(TensorRole, Option<usize>)> {
        match self {
            ModelSource::Gguf(_) => parse_gguf_name(name),
            ModelSource::HfDir(_) => parse_hf_name(name),
        }
    }

    /// A required tensor; the error names the file and the tensor.
    pub fn tensor(
        &self,
        role: TensorRole,
        layer: Option<usize>,
    ) -> Result<TensorView<'_>, IoError> {
        let name = self.tensor_name(role, layer);
        match self {
            ModelSource::Gguf(gguf) => {
                gguf.tensor_view(&name)
                    .ok_or_else(|| IoError::MissingTensor {
                        path: gguf.path.clone(),
                        tensor: name,
                    })
            }
            ModelSource::HfDir(dir) => dir.tensor(&name),
        }
    }

    /// An optional tensor (biases, an untied output head). `None` means absent: tensors of
    /// every role were checked to be readable when the source was opened.
    pub fn try_tensor(&self, role: TensorRole, layer: Option<usize>) -> Option<TensorView<'_>> {
        self.tensor(role, layer).ok()
    }

    /// Every readable tensor, in file order.
    pub fn tensors(&self) -> Vec<TensorView<'_>> {
        match self {
            ModelSource::Gguf(gguf) => gguf.tensors.iter().map(|t| gguf.view(t)).collect(),
            ModelSource::HfDir(dir) => dir.tensors(),
        }
    }
}
