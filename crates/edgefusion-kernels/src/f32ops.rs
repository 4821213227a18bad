//! Dense f32 vector operations for the runtime's non-matmul work (attention scores, value
//! accumulation, norms): `dot`, `axpy`, `scale`, with SIMD twins of the scalar references.

use crate::cpu::{self, Isa};

/// Σ a[i] · b[i].
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_impl(cpu::isa(), a, b)
}

/// y += alpha · x.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy_impl(cpu::isa(), alpha, x, y)
}

/// x *= s.
#[inline]
pub fn scale(x: &mut [f32], s: f32) {
    scale_impl(cpu::isa(), x, s)
}

/// [`dot`] with the kernel of `isa`.
///
/// # Panics
/// If the lengths differ or `isa` cannot run on this machine.
pub fn dot_on(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert!(
        cpu::is_runnable(isa),
        "dot_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    dot_impl(isa, a, b)
}

/// [`axpy`] with the kernel of `isa`.
///
/// # Panics
/// If the lengths differ or `isa` cannot run on this machine.
pub fn axpy_on(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    assert!(
        cpu::is_runnable(isa),
        "axpy_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    axpy_impl(isa, alpha, x, y)
}

/// [`scale`] with the kernel of `isa`.
///
/// # Panics
/// If `isa` cannot run on this machine.
pub fn scale_on(isa: Isa, x: &mut [f32], s: f32) {
    assert!(
        cpu::is_runnable(isa),
        "scale_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    scale_impl(isa, x, s)
}

/// Scalar reference of [`dot`]: summed in order.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scalar reference of [`axpy`]: y[i] = alpha · x[i] + y[i], rounded twice.
pub fn axpy_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: length mismatch");
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Scalar reference of [`scale`].
pub fn scale_scalar(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

#[inline]
fn dot_impl(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    let n = a.len();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable; both slices hold `n` floats.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            crate::x86::avx512::dot_f32(a.as_ptr(), b.as_ptr(), n)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { crate::x86::avx2::dot_f32(a.as_ptr(), b.as_ptr(), n) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { crate::aarch64::neon::dot_f32(a.as_ptr(), b.as_ptr(), n) },
        _ => dot_scalar(a, b),
    }
}

#[inline]
fn axpy_impl(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: length mismatch");
    let n = x.len();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable; `x` and `y` hold `n` floats and do
        // not overlap (`y` is borrowed mutably).
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            crate::x86::avx512::axpy_f32(alpha, x.as_ptr(), y.as_mut_ptr(), n)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { crate::x86::avx2::axpy_f32(alpha, x.as_ptr(), y.as_mut_ptr(), n) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe {
            crate::aarch64::neon::axpy_f32(alpha, x.as_ptr(), y.as_mut_ptr(), n)
        },
        _ => axpy_scalar(alpha, x, y),
    }
}

#[inline]
fn scale_impl(isa: Isa, x: &mut [f32], s: f32) {
    let n = x.len();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable; `x` holds `n` floats.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            crate::x86::avx512::scale_f32(x.as_mut_ptr(), s, n)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { crate::x86::avx2::scale_f32(x.as_mut_ptr(), s, n) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { crate::aarch64::neon::scale_f32(x.as_mut_ptr(), s, n) },
        _ => scale_scalar(x, s),
    }
}
