//! Weight quantization for EdgeFusion.
//!
//! - `efq`: fitting weights to the EFQ format: outliers, block grids, encoding.
//! - `allocate`: how each matrix is stored within a bits-per-weight budget: tile widths,
//!   or the source tensor unchanged.
//! - `pipeline`: a whole model into an EFQ GGUF file.
//! - `hessian`: per-linear-layer input statistics `XᵀX` gathered from calibration text.
//! - `gptq`: column-by-column quantization with inverse-Hessian error compensation
//!   (Frantar et al., 2022), over any grid given as a closure.

pub mod allocate;
pub mod efq;
pub mod error;
pub mod fit;
pub mod gptq;
pub mod hessian;
pub mod pipeline;
pub mod refit;

pub use error::QuantError;
