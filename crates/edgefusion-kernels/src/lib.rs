//! Compute kernels for EdgeFusion: block formats, dot products and their SIMD twins.
//!
//! Every format has one scalar reference (`formats::*`) and per-architecture kernels
//! (`x86`, `aarch64`) that are tested against it. The ISA is detected once at run time
//! (`cpu::isa()`); `EDGEFUSION_NO_SIMD=1` forces the scalar path.

pub mod ggml_type;

pub use ggml_type::GgmlType;
