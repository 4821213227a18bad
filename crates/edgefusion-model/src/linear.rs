//! One interface for a linear layer's weights, whatever their storage format.

use std::borrow::Cow;

use edgefusion_io::TensorView;
use edgefusion_kernels::efq::{self, ActQ8, EfqMatrix};
use edgefusion_kernels::{interleaved, BatchPart, GgmlType};

use crate::ModelError;

/// How a [`Linear`]'s bytes are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As in GGUF: rows one after another, each a run of blocks.
    Rows,
    /// Rows regrouped 16 at a time for the SIMD kernels (`edgefusion_kernels::interleaved`);
    /// the same bytes in total, and 16-aligned row ranges are the same byte ranges.
    Interleaved,
    /// An EFQ matrix blob (`edgefusion_kernels::efq`), stored as a 1-D I8 tensor.
    Efq,
}

/// The format a matrix wants its input activations in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActFormat {
    /// A GGML type (`vec_dot_type` of the weights).
    Ggml(GgmlType),
    /// EFQ's partner: 8-bit codes per 128-column block with scale and code sum.
    EfqQ8,
    /// [`ActFormat::EfqQ8`] of the input rotated by EFQ v2's randomized Hadamard transform
    /// (`edgefusion_kernels::hadamard`), for matrices stored rotated.
    EfqQ8Rotated,
}

impl ActFormat {
    /// Bytes of one row of `n` activations.
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            ActFormat::Ggml(ty) => ty.row_bytes(n).unwrap_or(n * 4),
            ActFormat::EfqQ8 | ActFormat::EfqQ8Rotated => ActQ8::row_bytes(n),
        }
    }

    /// Quantizes one row `x` into `out`.
    pub fn quantize_row(self, x: &[f32], out: &mut [u8]) {
        match self {
            ActFormat::Ggml(ty) => edgefusion_kernels::quantize_row(ty, x, out),
            ActFormat::EfqQ8 => ActQ8::quantize_row(x, out),
            ActFormat::EfqQ8Rotated => ActQ8::quantize_row_rotated(x, out),
        }
    }
}

/// A weight matrix `(n_out, n_in)`: `n_out` rows of `n_in` weights, each row a whole
/// number of blocks of `dtype`. Memory-mapped when the file's layout is usable as is.
#[derive(Debug)]
pub struct Linear<'a> {
    pub name: String,
    pub dtype: GgmlType,
    pub n_in: usize,
    pub n_out: usize,
    /// The weights: `n_out * row_bytes` bytes in the row or interleaved layout, or one EFQ blob.
    data: Cow<'a, [u8]>,
    /// Bytes of one row; 0 for EFQ, whose rows differ in size.
    row_bytes: usize,
    storage: Storage<'a>,
}

/// How `data` is ordered, with the parsed blob for EFQ.
#[derive(Debug)]
enum Storage<'a> {
    Rows,
    Interleaved,
    Efq(EfqMatrix<'a>),
}

impl<'a> Linear<'a> {
    /// Binds a tensor as a `(n_out, n_in)` matrix, checking its shape and size.
    pub fn from_view(
        view: TensorView<'a>,
        file: &str,
        n_in: usize,
        n_out: usize,
    ) -> Result<Self, ModelError> {
        if view.shape != [n_in, n_out] {
            return Err(ModelError::Shape {
                file: file.to_string(),
                tensor: view.name.to_string(),
                expected: vec![n_in, n_out],
                found: view.shape.to_vec(),
            });
        }
        if matches!(view.dtype, GgmlType::Q8_1 | GgmlType::Q8K) {
            return Err(ModelError::Invalid {
                file: file.to_string(),
                what: format!(
                    "tensor '{}' has type {}, which is an activation format, not a weight format",
                    view.name,
                    view.dtype.name()
                ),
            });
        }
        let row_bytes = view
            .dtype
            .row_bytes(n_in)
            .ok_or_else(|| ModelError::Invalid {
                file: file.to_string(),
                what: format!(
                    "tensor '{}': rows of {n_in} weights are not a whole number of {} blocks of {}",
                    view.name,
                    view.dtype.name(),
                    view.dtype.block_size()
                ),
            })?;
        if view.data.len() != row_bytes * n_out {
            return Err(ModelError::Invalid {
                file: file.to_string(),
                what: format!(
                    "tensor '{}' holds {} bytes, expected {} for {n_out} rows of {n_in} {}",
                    view.name,
                    view.data.len(),
                    row_bytes * n_out,
                    view.dtype.name()
                ),
            });
        }
        Ok(Linear {
            name: view.name.to_string(),
            dtype: view.dtype,
            n_in,
            n_out,
            data: Cow::Borrowed(view.data),
            row_bytes,
            storage: Storage::Rows,
        })
    }

    /// A matrix of `values` `(n_out, n_in)` in f32 that owns its bytes (a weight edited in
    /// memory, e.g. to measure how much quantizing it costs).
    pub fn from_f32(name: &str, n_in: usize, n_out: usize, values: &[f32]) -> Linear<'static> {
        assert_eq!(values.len(), n_in * n_out, "from_f32: (n_out, n_in) values");
        Linear {
            name: name.to_string(),
            dtype: GgmlType::F32,
            n_in,
            n_out,
            data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            row_bytes: 4 * n_in,
            storage: Storage::Rows,
        }
    }

    /// Binds a 1-D I8 tensor holding an EFQ matrix blob as a `(n_out, n_in)` matrix,
    /// checking the blob (every size and range) and its shape.
    pub fn from_efq_view(
        view: TensorView<'a>,
        file: &str,
        n_in: usize,
        n_out: usize,
    ) -> Result<Self, ModelError> {
        let invalid = |what: String| ModelError::Invalid {
            file: file.to_string(),
            what: format!("tensor '{}': {what}", view.name),
        };
        if view.dtype != GgmlType::I8 || view.shape.len() != 1 {
            return Err(invalid(format!(
                "an EFQ matrix is a 1-D I8 tensor, found {} with shape {:?}",
                view.dtype.name(),
                view.shape
            )));
        }
        let matrix = EfqMatrix::parse(view.data).map_err(|e| invalid(e.to_string()))?;
        if (matrix.n_in, matrix.n_out) != (n_in, n_out) {
            return Err(ModelError::Shape {
                file: file.to_string(),
                tensor: view.name.to_string(),
                expected: vec![n_in, n_out],
                found: vec![matrix.n_in, matrix.n_out],
            });
        }
        Ok(Linear {
            name: view.name.to_string(),
            dtype: GgmlType::I8,
            n_in,
            n_out,
            data: Cow::Borrowed(view.data),
            row_bytes: 0,
            storage: Storage::Efq(matrix),
        })
    }

    /// Copies the matrix into the interleaved layout when this CPU has kernels for it that
    /// beat the row layout (and `n_out` is a multiple of 16); returns whether it did. The
    /// mapped bytes are not read again afterwards.
    pub fn interleave_for_cpu(&mut self) -> bool {
        let isa = edgefusion_kernels::cpu::isa();
        if !matches!(self.storage, Storage::Rows)
            || !interleaved::is_fast_on(isa, self.dtype)
            || !self.n_out.is_multiple_of(interleaved::GROUP_ROWS)
        {
            return false;
        }
        let data = interleaved::interleave(self.dtype, self.n_in, &self.data, self.n_out);
        self.data = Cow::Owned(data);
        self.storage = Storage::Interleaved;
        true
    }

    /// How the bytes are ordered.
    pub fn layout(&self) -> Layout {
        match self.storage {
            Storage::Rows => Layout::Rows,
            Storage::Interleaved => Layout::Interleaved,
            Storage::Efq(_) => Layout::Efq,
        }
    }

    /// Bytes of one row (0 for EFQ, whose rows differ in size).
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Rows `r0..r1` as raw bytes in this matrix's layout; for [`Layout::Interleaved`] both
    /// ends must be multiples of 16 (or `r1 = n_out`). EFQ blobs have no byte ranges per row.
    pub fn rows(&self, r0: usize, r1: usize) -> &[u8] {
        debug_assert!(match self.storage {
            Storage::Rows => true,
            Storage::Interleaved =>
                r0.is_multiple_of(interleaved::GROUP_ROWS)
                    && r1.is_multiple_of(interleaved::GROUP_ROWS),
            Storage::Efq(_) => false,
        });
        &self.data[r0 * self.row_bytes..r1 * self.row_bytes]
    }

    /// `out (n_tok, out_stride)[t][r0 + i] = row r0 + i · act row t` for the rows `r0..r1`,
    /// where `act` holds `n_tok` rows already quantized to [`Linear::act_format`], the rows
    /// `part` says of the step's batch (K-quants add in the order llama.cpp runs for it). Row
    /// ranges of an interleaved matrix are 16-aligned (see [`Linear::rows`]).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_rows(
        &self,
        r0: usize,
        r1: usize,
        act: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
        part: BatchPart,
    ) {
        match &self.storage {
            Storage::Rows => edgefusion_kernels::matmul_part(
                self.dtype,
                self.n_in,
                self.rows(r0, r1),
                r1 - r0,
                act,
                n_tok,
                out,
                out_stride,
                part,
            ),
            Storage::Interleaved => interleaved::matmul_interleaved(
                self.dtype,
                self.n_in,
                self.rows(r0, r1),
                r1 - r0,
                act,
                n_tok,
                out,
                out_stride,
            ),
            Storage::Efq(m) => efq::matmul(m, r0, r1, act, n_tok, out, out_stride),
        }
    }

    /// All bytes of the matrix.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The format activations must be quantized to before a dot product with these weights.
    pub fn act_format(&self) -> ActFormat {
        match self.storage {
            Storage::Efq(ref m) if m.rotation != 0 => ActFormat::EfqQ8Rotated,
            Storage::Efq(_) => ActFormat::EfqQ8,
            _ => ActFormat::Ggml(edgefusion_kernels::vec_dot_type(self.dtype)),
        }
    }

    /// Row `r` as floats (token embedding lookup).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        match &self.storage {
            Storage::Rows => {
                edgefusion_kernels::dequantize_row(self.dtype, self.rows(r, r + 1), out)
            }
            Storage::Interleaved => {
                interleaved::dequantize_row(self.dtype, self.n_in, &self.data, r, out)
            }
            Storage::Efq(m) => m.dequantize_row(r, out),
        }
    }
}

/// Reads a 1-D tensor of `n` values (norm weights, biases) into floats.
pub fn vector_from_view(
    view: TensorView<'_>,
    file: &str,
    n: usize,
) -> Result<Vec<f32>, ModelError> {
    if view.shape != [n] {
        return Err(ModelError::Shape {
            file: file.to_string(),
            tensor: view.name.to_string(),
            expected: vec![n],
            found: view.shape.to_vec(),
        });
    }
    if !matches!(view.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(ModelError::Invalid {
            file: file.to_string(),
            what: format!(
                "vector tensor '{}' has type {}; expected F32, F16 or BF16",
                view.name,
                view.dtype.name()
            ),
        });
    }
    let expected = view.dtype.row_bytes(n).unwrap_or(usize::MAX);
    if view.data.len() != expected {
        return Err(ModelError::Invalid {
            file: file.to_string(),
            what: format!(
                "tensor '{}' holds {} bytes, expected {expected}",
                view.name,
                view.data.len()
            ),
        });
    }
    let mut out = vec![0.0f32; n];
    edgefusion_kernels::dequantize_row(view.dtype, view.data, &mut out);
    Ok(out)
}
