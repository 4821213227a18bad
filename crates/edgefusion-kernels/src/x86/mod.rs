//! x86-64 kernels. Every function here is an `unsafe fn` with `#[target_feature]`: the
//! caller must have checked (via [`crate::cpu`]) that the CPU has those features. Bodies
//! shared by several feature sets are `#[inline(always)]` generics, instantiated inside
//! each `#[target_feature]` wrapper so they compile for that wrapper's features.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod efq;
pub(crate) mod efq_avx2;
pub(crate) mod interleaved;
