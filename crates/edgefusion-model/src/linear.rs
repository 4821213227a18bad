//! One interface for a linear layer's weights, whatever their storage format.

use std::borrow::Cow;

use edgefusion_io::TensorView;
use edgefusion_kernels::GgmlType;

use crate::ModelError;

/// A weight matrix `(n_out, n_in)`: `n_out` rows of `n_in` weights, each row a whole
/// number of blocks of `dtype`. Memory-mapped when the file's layout is usable as is.
#[derive(Debug)]
pub struct Linear<'a> {
    pub name: String,
    pub dtype: GgmlType,
    pub n_in: usize,
    pub n_out: usize,
    /// `n_out * row_bytes` bytes, rows contiguous.
    data: Cow<'a, [u8]>,
    row_bytes: usize,
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
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Rows `r0..r1` as raw block bytes.
    pub fn rows(&self, r0: usize, r1: usize) -> &[u8] {
        &self.data[r0 * self.row_bytes..r1 * self.row_bytes]
    }

    /// All bytes of the matrix.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The format activations must be quantized to before a dot product with these weights.
    pub fn act_type(&self) -> GgmlType {
        edgefusion_kernels::vec_dot_type(self.dtype)
    }

    /// Row `r` as floats (token embedding lookup).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        edgefusion_kernels::dequantize_row(self.dtype, self.rows(r, r + 1), out);
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
