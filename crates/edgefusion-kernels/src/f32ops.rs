//! Dense f32 vector operations for the runtime's non-matmul work (softmax, SwiGLU, norms):
//! `dot`, `axpy`, `scale`, `max`, a vectorizable `exp` with the slice functions built on it
//! (`exp_sub_max_sum`, `silu_mul`) and `round_f16`, with SIMD twins of the scalar references.
//!
//! The `exp` family is written once as plain Rust (`exp` and the `*_body` loops) and compiled
//! three times: as is (the scalar reference) and inside `#[target_feature]` wrappers for
//! AVX-512 and AVX2, where the loops vectorize. Every multiply-add is a `mul_add`, so all three
//! round identically and the SIMD twins equal the scalar reference bit for bit.

use crate::cpu::{self, Isa};

/// Round half to even, the rounding of llama.cpp's `nearest_int` and of `cvtps2dq`.
///
/// Adding 1.5·2^23 leaves the rounded integer in the low mantissa bits; this avoids the
/// libm call `round_ties_even` becomes on baseline x86-64 (no SSE4.1 `roundss`). Inputs
/// beyond ±2^22 saturate there, which every caller's clamp to its code range absorbs.
#[inline]
pub fn nearest_int(value: f32) -> i32 {
    const LIMIT: f32 = 4_194_303.0; // 2^22 - 1
    let biased = value.clamp(-LIMIT, LIMIT) + 12_582_912.0;
    (biased.to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

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

// ---------------------------------------------------------------------------------------
// exp, softmax, SwiGLU

/// 1.5 · 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer (ties to even).
const ROUND_SHIFT: f32 = 12_582_912.0;
/// log2(e), rounded to f32.
const LOG2_E: f32 = f32::from_bits(0x3fb8_aa3b);
/// ln 2 split in two (Cody–Waite): `LN2_HI` has 16 significant bits, so `n · LN2_HI` is exact
/// for the |n| ≤ 192 that matter, and `LN2_HI + LN2_LO` is ln 2 to about 2^-44.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// Minimax coefficients of e^b ≈ 1 + b·(C1 + b·(C2 + b·(C3 + b·(C4 + b·C5)))) on
/// |b| ≤ ln2/2 (Arm optimized-routines' expf, as in ggml's `ggml_v_expf`).
const EXP_C1: f32 = f32::from_bits(0x3f7f_fff6);
const EXP_C2: f32 = f32::from_bits(0x3eff_fedb);
const EXP_C3: f32 = f32::from_bits(0x3e2a_af33);
const EXP_C4: f32 = f32::from_bits(0x3d2b_9f17);
const EXP_C5: f32 = f32::from_bits(0x3c07_2010);

/// The front both exps share: x = n·ln2 + b.
struct ExpReduced {
    /// x·log2 e plus [`ROUND_SHIFT`]: its low mantissa bits hold the integer n.
    z: f32,
    /// n = round(x·log2 e).
    n: f32,
    /// b = x − n·ln2 in two steps (Cody–Waite).
    b: f32,
    /// b².
    u: f32,
    /// The polynomial's upper terms, (C5·b + C4)·b² + C3·b + C2.
    upper: f32,
}

#[inline(always)]
fn exp_reduce(x: f32) -> ExpReduced {
    let z = x.mul_add(LOG2_E, ROUND_SHIFT);
    let n = z - ROUND_SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let upper = EXP_C5
        .mul_add(b, EXP_C4)
        .mul_add(u, EXP_C3.mul_add(b, EXP_C2));
    ExpReduced { z, n, b, u, upper }
}

/// e^x in f32, within 2.24 ulp (checked exhaustively over every f32 in [-104, 88.7]).
/// Inputs above ~88.72 give +inf, below ~-103.9 (and -inf) give +0, NaN gives NaN;
/// subnormal results are rounded once.
///
/// The arithmetic, bit for bit, is that of llama.cpp's AVX-512 `ggml_v_expf` (Arm
/// optimized-routines' expf), which llama.cpp runs for softmax and SiLU on AVX-512 machines:
/// x = n·ln2 + b with n = round(x·log2 e) and b = x − n·ln2 in two steps (Cody–Waite), e^b
/// from a degree-5 polynomial, then scaled by 2^n (`vscalefps`). Its AVX2/NEON variant
/// scales as 2^n + 2^n·(e^b − 1) in one fused step ([`exp_fused`]); each ISA uses the
/// variant llama.cpp built for it uses, because SiLU's output is quantized to 8 bits next and
/// a last-bit difference flips activation codes and then greedy tokens.
/// Written with `mul_add` and selects only, so loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let ExpReduced { z, n, b, u, upper } = exp_reduce(x);
    let j = upper.mul_add(u, EXP_C1.mul_add(b, 1.0));
    // 2^n as two normal factors 2^n1 · 2^n2 (|n1|, |n2| ≤ 96): `j · 2^n1` is exact, so the
    // product rounds once even when the result is subnormal, as `vscalefps` does.
    let n_int = (z.to_bits() as i32).wrapping_sub(ROUND_SHIFT.to_bits() as i32);
    let n1 = n_int >> 1;
    let n2 = n_int.wrapping_sub(n1);
    let pow2 = |e: i32| f32::from_bits((e.wrapping_add(127) << 23) as u32);
    let scaled = j * pow2(n1) * pow2(n2);
    // |n| > 192: far outside f32's range (and ±inf inputs, where `b` is NaN).
    let saturated = if n > 0.0 { f32::INFINITY } else { 0.0 };
    if n.abs() > 192.0 {
        saturated
    } else {
        scaled
    }
}

/// e^x as llama.cpp's AVX2 and NEON builds compute it (`ggml_v_expf` without `vscalefps`),
/// which they run for softmax and SiLU: the reduction and polynomial of [`exp`] give
/// j = e^b − 1, and the result is 2^n + 2^n·j in one fused step (within 1.95 ulp); where 2^n
/// alone would leave the normal range (|n| > 126) it is built from two factors, and beyond
/// |n| > 192 it saturates to +∞ or +0. SiLU's output is quantized to 8 bits next, so a
/// last-bit difference from llama.cpp flips activation codes and then greedy tokens: each
/// ISA uses the variant llama.cpp uses on it. Written with `mul_add` and selects only, so
/// loops over it vectorize.
#[inline(always)]
pub fn exp_fused(x: f32) -> f32 {
    let ExpReduced { z, n, b, u, upper } = exp_reduce(x);
    let j = upper.mul_add(u, EXP_C1 * b);
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let in_range = j.mul_add(k, k);
    // 2^n = s1 · s2 with both factors normal.
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    let wide = s2.mul_add(j, s2) * s1;
    let saturated = s1 * s1;
    let m = n.abs();
    if m > 192.0 {
        saturated
    } else if m > 126.0 {
        wide
    } else {
        in_range
    }
}

/// Largest element (`-inf` for an empty slice; NaNs are skipped).
#[inline]
pub fn max(x: &[f32]) -> f32 {
    max_impl(cpu::isa(), x)
}

/// `x[i] = exp(x[i] - max)` for every element; returns Σ x[i] (the new values) summed in f64.
/// Softmax's numerator and denominator, as ggml's `ggml_vec_soft_max_f32` computes them (it
/// adds each 16 values in f32 before the f64 sum, a difference far below f32 precision).
/// `max` must be finite (the row's maximum): `-inf − -inf` is NaN.
#[inline]
pub fn exp_sub_max_sum(x: &mut [f32], max: f32) -> f64 {
    exp_sub_max_sum_impl(cpu::isa(), x, max)
}

/// `gate[i] = silu(gate[i]) · up[i]` with silu(g) = g / (1 + exp(−g)): SwiGLU.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_impl(cpu::isa(), gate, up)
}

/// `gate[i] = gelu(gate[i]) · up[i]` with the tanh approximation of GELU: GeGLU, computed
/// as llama.cpp's CPU backend does (`ggml_vec_geglu_f32`): 0 at or below −10, the identity at
/// or above 10, and between them the input rounded to f16 looked up in a table of
/// f16-rounded GELU values. Matching its rounding keeps greedy decoding token-identical.
///
/// # Panics
/// If the lengths differ.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_mul: gate and up lengths differ");
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            table[half::f16::from_f32(x).to_bits() as usize] * u
        };
    }
}

/// GELU (tanh approximation) in f32 arithmetic, as `ggml_gelu_f32`.
pub fn gelu_tanh(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    // GCC contracts llama.cpp's `1.0f + GELU_COEF_A*x*x` into one fused multiply-add.
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
}

/// [`gelu_tanh`] of every f16 value, rounded to f16 (indexed by the f16's bits).
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                half::f16::from_f32(gelu_tanh(x)).to_f32()
            })
            .collect()
    })
}

/// Rounds every element to the nearest f16 value (ties to even), kept as f32.
#[inline]
pub fn round_f16(x: &mut [f32]) {
    round_f16_impl(cpu::isa(), x)
}

/// [`max`] with the kernel of `isa`.
///
/// # Panics
/// If `isa` cannot run on this machine.
pub fn max_on(isa: Isa, x: &[f32]) -> f32 {
    assert!(
        cpu::is_runnable(isa),
        "max_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    max_impl(isa, x)
}

/// [`exp_sub_max_sum`] with the kernel of `isa`.
///
/// # Panics
/// If `isa` cannot run on this machine.
pub fn exp_sub_max_sum_on(isa: Isa, x: &mut [f32], max: f32) -> f64 {
    assert!(
        cpu::is_runnable(isa),
        "exp_sub_max_sum_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    exp_sub_max_sum_impl(isa, x, max)
}

/// [`silu_mul`] with the kernel of `isa`.
///
/// # Panics
/// If the lengths differ or `isa` cannot run on this machine.
pub fn silu_mul_on(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert!(
        cpu::is_runnable(isa),
        "silu_mul_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    silu_mul_impl(isa, gate, up)
}

/// [`round_f16`] with the kernel of `isa`.
///
/// # Panics
/// If `isa` cannot run on this machine.
pub fn round_f16_on(isa: Isa, x: &mut [f32]) {
    assert!(
        cpu::is_runnable(isa),
        "round_f16_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    round_f16_impl(isa, x)
}

/// Scalar reference of [`max`].
pub fn max_scalar(x: &[f32]) -> f32 {
    max_body(x)
}

/// Scalar reference of [`exp_sub_max_sum`] as the kernel of `isa` computes it (AVX-512
/// follows llama.cpp's AVX-512 build, every other ISA its AVX2 build).
pub fn exp_sub_max_sum_scalar(isa: Isa, x: &mut [f32], max: f32) -> f64 {
    if uses_scalef(isa) {
        exp_sub_max_sum_body::<true>(x, max)
    } else {
        exp_sub_max_sum_body::<false>(x, max)
    }
}

/// Scalar reference of [`silu_mul`] as the kernel of `isa` computes it.
pub fn silu_mul_scalar(isa: Isa, gate: &mut [f32], up: &[f32]) {
    if uses_scalef(isa) {
        silu_mul_body::<true>(gate, up)
    } else {
        silu_mul_body::<false>(gate, up)
    }
}

/// `dst[i] = src[i]` as f32 (exact). Panics if the lengths differ.
#[inline]
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32: lengths differ");
    match cpu::isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `cpu::isa()` is runnable and every x86 SIMD ISA here has F16C; the lengths
        // are equal (asserted).
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            vectorized::f16_to_f32_f16c(src, dst)
        },
        _ => half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst),
    }
}

/// Scalar reference of [`round_f16`].
pub fn round_f16_scalar(x: &mut [f32]) {
    for v in x {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// Lanes of the running max and f64 sums: one zmm of f32 (two of f64).
const LANES: usize = 16;

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            // `maxps` semantics: keeps `m` when `v` is NaN.
            *m = if v > *m { v } else { *m };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(tail) {
        best = if v > best { v } else { best };
    }
    best
}

/// Whether `isa` computes e^x as llama.cpp's AVX-512 build does ([`exp`], 16-wide softmax
/// sums) rather than as its AVX2 and NEON builds do ([`exp_fused`]; softmax sums 8 at a time
/// as its AVX2 build does, where its NEON build adds 4 at a time).
#[inline]
fn uses_scalef(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Avx512Vnni)
}

#[inline(always)]
fn exp_sub_max_sum_body<const SCALEF: bool>(x: &mut [f32], max: f32) -> f64 {
    if SCALEF {
        // One pass: exponentials and f64 partial sums in lanes. The order differs from
        // llama.cpp's (16 values added in f32, then the f64 sum) only far below f32.
        let mut lanes = [0.0f64; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, v) in lanes.iter_mut().zip(chunk) {
                *v = exp(*v - max);
                *s += *v as f64;
            }
        }
        let mut sum: f64 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v as f64;
        }
        sum
    } else {
        // llama.cpp's AVX2 `ggml_vec_soft_max_f32`: 8 values at a time, added in f32 as its
        // horizontal sum does, then into an f64 total. Its rows are padded with −∞ (whose
        // exponential is 0) to a multiple of 8, so a short last chunk is padded with zeros.
        let mut sum = 0.0f64;
        for chunk in x.chunks_mut(8) {
            let mut v = [0.0f32; 8];
            for (v, x) in v.iter_mut().zip(chunk.iter_mut()) {
                *x = exp_fused(*x - max);
                *v = *x;
            }
            sum += (((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))) as f64;
        }
        sum
    }
}

#[inline(always)]
fn silu_mul_body<const SCALEF: bool>(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: length mismatch");
    for (g, &u) in gate.iter_mut().zip(up) {
        let e = if SCALEF { exp(-*g) } else { exp_fused(-*g) };
        *g = *g / (1.0 + e) * u;
    }
}

#[inline]
fn max_impl(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { vectorized::max_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { vectorized::max_avx2(x) },
        _ => max_body(x),
    }
}

#[inline]
fn exp_sub_max_sum_impl(isa: Isa, x: &mut [f32], max: f32) -> f64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { vectorized::exp_sub_max_sum_avx512(x, max) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { vectorized::exp_sub_max_sum_avx2(x, max) },
        _ => exp_sub_max_sum_body::<false>(x, max),
    }
}

#[inline]
fn silu_mul_impl(isa: Isa, gate: &mut [f32], up: &[f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { vectorized::silu_mul_avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { vectorized::silu_mul_avx2(gate, up) },
        _ => silu_mul_body::<false>(gate, up),
    }
}

#[inline]
fn round_f16_impl(isa: Isa, x: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was detected or checked runnable; the kernel stays within `x`.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe { vectorized::round_f16_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { vectorized::round_f16_avx2(x) },
        _ => round_f16_scalar(x),
    }
}

/// The `*_body` loops compiled for AVX-512 and AVX2 (LLVM vectorizes them there), and the
/// F16C round trip.
#[cfg(target_arch = "x86_64")]
mod vectorized {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F/BW/VL must be available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn max_avx512(x: &[f32]) -> f32 {
        super::max_body(x)
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max_avx2(x: &[f32]) -> f32 {
        super::max_body(x)
    }

    /// # Safety
    /// AVX-512 F/BW/VL must be available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn exp_sub_max_sum_avx512(x: &mut [f32], max: f32) -> f64 {
        super::exp_sub_max_sum_body::<true>(x, max)
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sub_max_sum_avx2(x: &mut [f32], max: f32) -> f64 {
        super::exp_sub_max_sum_body::<false>(x, max)
    }

    /// # Safety
    /// AVX-512 F/BW/VL must be available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
        super::silu_mul_body::<true>(gate, up)
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
        super::silu_mul_body::<false>(gate, up)
    }

    /// # Safety
    /// AVX-512 F/BW/VL must be available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    pub(super) unsafe fn round_f16_avx512(x: &mut [f32]) {
        // SAFETY: AVX-512 F/BW/VL and F16C are guaranteed by the caller (`round_f16_impl` matches
        // on a runnable ISA); `p` covers the `n` floats of `x`, and each mask selects only indices
        // `< n` (masked-off lanes are not accessed).
        unsafe {
            const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT;
            let n = x.len();
            let p = x.as_mut_ptr();
            let mut i = 0;
            while i < n {
                let mask = if n - i >= 16 {
                    u16::MAX
                } else {
                    (1u16 << (n - i)) - 1
                };
                let v = _mm512_maskz_loadu_ps(mask, p.add(i));
                let r = _mm512_cvtph_ps(_mm512_cvtps_ph::<ROUND>(v));
                _mm512_mask_storeu_ps(p.add(i), mask, r);
                i += 16;
            }
        }
    }

    /// # Safety
    /// AVX and F16C must be available; `src` and `dst` have the same length.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32_f16c(src: &[half::f16], dst: &mut [f32]) {
        // SAFETY: AVX and F16C are guaranteed by the caller; each load reads 8 halves of
        // `src` at `i + 8 ≤ n` and each store writes the 8 floats of `dst` at the same place.
        unsafe {
            let n = src.len().min(dst.len());
            let whole = n - n % 8;
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            for i in (0..whole).step_by(8) {
                _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(_mm_loadu_si128(s.add(i).cast())));
            }
        }
        for (d, s) in dst[..src.len()].iter_mut().zip(src).skip(src.len() / 8 * 8) {
            *d = s.to_f32();
        }
    }

    /// # Safety
    /// AVX2 and F16C must be available.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn round_f16_avx2(x: &mut [f32]) {
        // SAFETY: AVX2 and F16C are guaranteed by the caller (`round_f16_impl` matches on a
        // runnable ISA); each load and store covers exactly one 8-float `chunk` of `x`.
        unsafe {
            const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT;
            let mut chunks = x.chunks_exact_mut(8);
            for chunk in &mut chunks {
                let v = _mm256_loadu_ps(chunk.as_ptr());
                let r = _mm256_cvtph_ps(_mm256_cvtps_ph::<ROUND>(v));
                _mm256_storeu_ps(chunk.as_mut_ptr(), r);
            }
            super::round_f16_scalar(chunks.into_remainder());
        }
    }
}

#[cfg(test)]
mod gelu_tests {
    use super::*;

    /// GeGLU against GELU computed in f64 from its definition with the tanh approximation:
    /// within f16 rounding of the input and the output, exact at the clamps.
    #[test]
    fn gelu_mul_matches_the_tanh_formula_to_f16_rounding() {
        let gelu64 = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let xs: Vec<f32> = (-1300..=1300).map(|i| i as f32 * 0.01).collect();
        let up: Vec<f32> = xs.iter().map(|&x| 1.0 + 0.1 * x).collect();
        let mut got = xs.clone();
        gelu_mul(&mut got, &up);
        for ((&x, &u), &g) in xs.iter().zip(&up).zip(&got) {
            let want = gelu64(x as f64) * u as f64;
            if x <= -10.0 {
                assert_eq!(g, 0.0, "x {x}");
            } else if x >= 10.0 {
                assert_eq!(g, x * u, "x {x}");
            } else {
                // f16 input rounding moves x by up to 2^-11 relative; GELU's slope is ≤ 1.13.
                let tol = 2e-3 * (x.abs() as f64 * 1.2 + 1e-3) * (u.abs() as f64) + 1e-6;
                assert!((g as f64 - want).abs() <= tol, "x {x}: {g} vs {want}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern converts as `half` converts it, through whole vectors and
    /// the scalar tail alike.
    #[test]
    fn f16_to_f32_is_exact() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        for len in [all.len(), 13, 8, 7, 0] {
            let src = &all[all.len() - len..];
            let mut got = vec![0.0f32; len];
            f16_to_f32(src, &mut got);
            for (g, h) in got.iter().zip(src) {
                let want = h.to_f32();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{h:?}"
                );
            }
        }
    }

    /// Largest error of [`exp`] in units in the last place of the exact result (f64 `exp`
    /// rounded to f32 decides the ulp; subnormal results count in ulps of 2^-149): 2.24
    /// measured over every f32 in [-104, 88.7] (the polynomial's 1.45, the rounding of
    /// 1 + b·P(b) before scaling, and the final rounding).
    const EXP_MAX_ULPS: f64 = 2.3;

    fn ulp_of(y: f64) -> f64 {
        let y32 = y as f32;
        if y32.abs() < f32::MIN_POSITIVE {
            f64::from(f32::from_bits(1))
        } else {
            let bits = y32.abs().to_bits() & 0x7f80_0000;
            f64::from(f32::from_bits(bits)) * f64::powi(2.0, -23)
        }
    }

    fn simd_isas() -> Vec<Isa> {
        cpu::available_isas()
            .into_iter()
            .filter(|&isa| isa != Isa::Scalar)
            .collect()
    }

    /// Inputs across [-104, 89], dense near 0 and at the ends, plus the specials.
    fn exp_inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=400_000)
            .map(|i| -104.0 + 193.0 * i as f32 / 400_000.0)
            .collect();
        xs.extend((0..2000).map(|i| (i as f32 - 1000.0) * 1e-3));
        xs.extend([
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            88.72,
            88.73,
            -87.33,
            -103.97,
            -104.0,
            -1e30,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        xs
    }

    #[test]
    fn exp_is_within_named_ulps_of_f64() {
        let mut worst = (0.0f64, 0.0f32);
        for i in 0..=1_760_000 {
            let x = -88.0 + 176.0 * i as f32 / 1_760_000.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulps = (got - want).abs() / ulp_of(want);
            if ulps > worst.0 {
                worst = (ulps, x);
            }
        }
        assert!(
            worst.0 <= EXP_MAX_ULPS,
            "exp({}) is {} ulps off",
            worst.1,
            worst.0
        );
    }

    /// [`exp_fused`] within 2 ulp over the normal range, and its ends.
    #[test]
    fn exp_fused_is_within_two_ulps_of_f64() {
        let mut worst = (0.0f64, 0.0f32);
        for i in 0..=1_740_000 {
            let x = -87.0 + 175.0 * i as f32 / 1_740_000.0;
            let want = (x as f64).exp();
            let ulps = (exp_fused(x) as f64 - want).abs() / ulp_of(want);
            if ulps > worst.0 {
                worst = (ulps, x);
            }
        }
        assert!(
            worst.0 <= 2.0,
            "exp_fused({}) is {} ulps off",
            worst.1,
            worst.0
        );
        assert_eq!(exp_fused(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_fused(-1e30), 0.0);
        assert_eq!(exp_fused(0.0), 1.0);
        assert_eq!(exp_fused(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_fused(89.0), f32::INFINITY);
        assert!(exp_fused(f32::NAN).is_nan());
        // Beyond |n| > 126, through the two-factor scale.
        for x in [88.5f32, -88.0, -95.0] {
            let want = (x as f64).exp();
            let rel = (exp_fused(x) as f64 / want - 1.0).abs();
            assert!(rel < 1e-2, "exp_fused({x}) off by {rel}");
        }
    }

    #[test]
    fn exp_handles_the_ends_of_the_range() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(-104.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(1e30), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // Largest finite result and the subnormal range, rounded once.
        assert!((exp(88.72) as f64 / (88.72f32 as f64).exp() - 1.0).abs() < 3e-7);
        for x in [-87.5f32, -90.0, -95.0, -100.0, -103.0] {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                (got - want).abs() <= EXP_MAX_ULPS * ulp_of(want),
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn exp_family_simd_equals_scalar() {
        let xs = exp_inputs();
        for isa in simd_isas() {
            for len in (0..=70).chain([127, 128, 129, 1536, xs.len()]) {
                let src = &xs[xs.len() - len..];
                let max = max_scalar(src);
                assert_eq!(
                    max_on(isa, src).to_bits(),
                    max.to_bits(),
                    "{} max",
                    isa.name()
                );
                let shift = if max.is_finite() { max } else { 0.0 };
                let mut want = src.to_vec();
                let want_sum = exp_sub_max_sum_scalar(isa, &mut want, shift);
                let mut got = src.to_vec();
                let got_sum = exp_sub_max_sum_on(isa, &mut got, shift);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{} exp len {len} at {i}: {g} vs {w}",
                        isa.name()
                    );
                }
                assert!(
                    got_sum == want_sum || (got_sum.is_nan() && want_sum.is_nan()),
                    "{} sum len {len}: {got_sum} vs {want_sum}",
                    isa.name()
                );

                let up: Vec<f32> = src.iter().map(|v| 0.5 - v * 0.01).collect();
                let gate: Vec<f32> = src.iter().map(|v| v * 0.1).collect();
                let mut want = gate.clone();
                silu_mul_scalar(isa, &mut want, &up);
                let mut got = gate;
                silu_mul_on(isa, &mut got, &up);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{} silu len {len} at {i}: {g} vs {w}",
                        isa.name()
                    );
                }

                let mut want: Vec<f32> = src.iter().map(|v| v * 1e-3).collect();
                let mut got = want.clone();
                round_f16_scalar(&mut want);
                round_f16_on(isa, &mut got);
                assert_eq!(got, want, "{} round_f16 len {len}", isa.name());
            }
        }
    }

    #[test]
    fn softmax_pieces_normalize() {
        let mut row = vec![1.0f32, 2.0, 3.0, f32::NEG_INFINITY, -50.0];
        let m = max(&row);
        assert_eq!(m, 3.0);
        let sum = exp_sub_max_sum(&mut row, m);
        let want: f64 = [-2.0f64, -1.0, 0.0, -53.0].iter().map(|v| v.exp()).sum();
        assert!((sum - want).abs() < 1e-6, "{sum} vs {want}");
        assert_eq!(row[2], 1.0);
        assert_eq!(row[3], 0.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut gate = [0.0f32, 1.0, -1.0, 20.0, -100.0];
        silu_mul(&mut gate, &[1.0, 2.0, 2.0, 1.0, 1.0]);
        let silu = |g: f64| g / (1.0 + (-g).exp());
        for (g, want) in gate.iter().zip([
            0.0,
            2.0 * silu(1.0),
            2.0 * silu(-1.0),
            silu(20.0),
            silu(-100.0),
        ]) {
            assert!(
                (*g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{g} vs {want}"
            );
        }
    }
}
