//! Compute kernels for EdgeFusion: block formats, dot products and their SIMD twins.
//!
//! Every format has one scalar reference (`formats::*`, `kquants::*`) and per-architecture
//! kernels (`x86`, `aarch64`) that are tested against it. The ISA is detected once at run
//! time (`cpu::isa()`); `EDGEFUSION_NO_SIMD=1` forces the scalar path and `EDGEFUSION_ISA=avx2`
//! (or another ISA this CPU runs) a narrower one. Every entry point has
//! an `_on(isa, ..)` twin that runs a chosen ISA's kernels, which is how the tests hold each
//! SIMD kernel against its scalar reference.
//!
//! Rows are raw little-endian GGUF block bytes; a row of `k` weights is `k / block_size`
//! consecutive blocks. For decode and prefill alike, call [`matmul`] over a range of rows:
//! it packs the activation once per call and runs register-tiled kernels, which is much
//! faster than [`vec_dot`] per row.

// Every unsafe operation sits in its own `unsafe {}` block, even inside an `unsafe fn`, and
// every such block states why it is sound.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod attention;
pub mod cpu;
pub mod efq;
pub mod f32ops;
pub mod formats;
pub mod ggml_type;
pub mod hadamard;
pub mod interleaved;
pub mod kquants;
pub mod threads;

mod dispatch;
mod matmul;
#[cfg(target_arch = "x86_64")]
mod pack;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use dispatch::{
    dequantize_row, quantize_row, quantize_row_on, quantize_row_ref, vec_dot, vec_dot_on,
    vec_dot_type,
};
pub use ggml_type::GgmlType;
pub use matmul::{matmul, matmul_on, matmul_part, BatchPart};
