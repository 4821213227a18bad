//! Helpers shared by the unit tests of this crate.

use candle_core::{DType, Tensor};

/// The largest `|a - b|` over all elements, in f64 whatever the tensors' float type.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("two tensors of one shape")
}
