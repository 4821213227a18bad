//! Model file formats: GGUF, safetensors / Hugging Face folders.
//!
//! - [`gguf`]: memory-mapped GGUF v2/v3 reader ([`gguf::GgufFile`]) and atomic v3 writer
//!   ([`gguf::GgufWriter`]).
//! - [`safetensors_dir`]: a Hugging Face model folder (`config.json` + one or more
//!   `.safetensors` shards).
//! - [`names`]: the one table of tensor names, GGUF and Hugging Face.
//! - [`source`]: either of the above behind one `tensor(role, layer)` lookup.
//!
//! Every reader validates its whole input when it opens it and returns an [`IoError`] that
//! names the file and the rule broken; no input makes it panic.

pub mod durable;
pub mod error;
pub mod gguf;
mod gguf_writer;
mod mapped;
pub mod names;
pub mod safetensors_dir;
pub mod source;

use edgefusion_kernels::GgmlType;

pub use error::IoError;
pub use mapped::Backing;
pub use names::TensorRole;
pub use source::ModelSource;

/// A borrowed tensor: its name, storage type, shape and raw bytes (little-endian, in the
/// block layout of `dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: GgmlType,
    /// ggml order: `shape[0]` is the contiguous row length (the input dimension of a
    /// weight matrix).
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    pub fn n_elements(&self) -> usize {
        // Readers check this product at open(); saturate rather than wrap for hand-made views.
        self.shape
            .iter()
            .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
            .unwrap_or(usize::MAX)
    }

    /// Length of one contiguous row (`shape[0]`).
    pub fn row_len(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> usize {
        self.shape
            .iter()
            .skip(1)
            .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
            .unwrap_or(usize::MAX)
    }

    /// Storage bits per weight, block overhead included.
    pub fn bits_per_weight(&self) -> f64 {
        self.dtype.bits_per_weight()
    }
}
