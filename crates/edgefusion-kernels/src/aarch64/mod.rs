//! aarch64 kernels (Advanced SIMD). Every function is an `unsafe fn`: pointers must cover
//! the lengths stated in each `# Safety` section.

pub(crate) mod efq;
pub(crate) mod neon;
