//! Errors of the quantizers.

/// What went wrong while quantizing.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A matrix (Hessian, weights) had the wrong size for the shapes given.
    #[error("{what}: expected {expected} values, got {found}")]
    Shape {
        what: String,
        expected: usize,
        found: usize,
    },
    /// Non-finite values where finite ones are required.
    #[error("{what} holds a non-finite value (NaN or ±inf) at index {index}")]
    NonFinite { what: String, index: usize },
    /// The damped Hessian is not positive definite, even after raising the damping.
    #[error("{what}: Hessian is not positive definite (pivot {pivot} = {value:e}) even with damping {damp}")]
    NotPositiveDefinite {
        what: String,
        pivot: usize,
        value: f64,
        damp: f64,
    },
    /// An argument outside its valid range (a Hessian with no rows, a zero block size, a
    /// negative damping).
    #[error("{what}: {reason}")]
    InvalidArgument { what: String, reason: String },
    /// The input model, file or options cannot be quantized; the message names which and why.
    #[error("{0}")]
    Input(String),
}
