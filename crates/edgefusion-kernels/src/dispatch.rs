//! The type-generic entry points: quantize, dequantize and dot one row of any [`GgmlType`],
//! each forwarding to the format's scalar reference or to the SIMD kernel of the ISA.

use crate::cpu::{self, Isa};
use crate::formats::{float, q4_0, q4_1, q5_0, q5_1, q8_0, q8_1, QK};
use crate::{kquants, GgmlType};

/// The activation format a weight type is dotted with: Q4_0/Q5_0/Q8_0 → Q8_0,
/// Q4_1/Q5_1 → Q8_1, Q2_K..Q6_K → Q8_K, F32/F16/BF16/I8 → F32; Q8_1 and Q8_K pair with
/// themselves.
pub fn vec_dot_type(weight: GgmlType) -> GgmlType {
    match weight {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
        GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q4K
        | GgmlType::Q5K
        | GgmlType::Q6K
        | GgmlType::Q8K => GgmlType::Q8K,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::I8 => GgmlType::F32,
    }
}

/// Bytes of a row of `n` values of `ty`.
///
/// # Panics
/// If `n` is not a whole number of blocks.
fn row_bytes(ty: GgmlType, n: usize) -> usize {
    ty.row_bytes(n).unwrap_or_else(|| {
        panic!(
            "{} rows hold a multiple of {} values, got {n}",
            ty.name(),
            ty.block_size()
        )
    })
}

/// Quantizes `x` into one row of `ty` in `out`, using SIMD where the type is an activation
/// format (F32 is a plain little-endian copy; Q8_0, Q8_1 and Q8_K have SIMD quantizers that
/// are bit-identical to their references). Other types use [`quantize_row_ref`].
///
/// # Panics
/// If `x.len()` is not a whole number of blocks of `ty` or `out` is shorter than the row.
#[inline]
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    quantize_row_impl(cpu::isa(), ty, x, out)
}

/// [`quantize_row`] with the kernels of `isa`.
///
/// # Panics
/// As [`quantize_row`], or if `isa` cannot run on this machine.
pub fn quantize_row_on(isa: Isa, ty: GgmlType, x: &[f32], out: &mut [u8]) {
    assert!(
        cpu::is_runnable(isa),
        "quantize_row_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    quantize_row_impl(isa, ty, x, out)
}

fn quantize_row_impl(isa: Isa, ty: GgmlType, x: &[f32], out: &mut [u8]) {
    match ty {
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let needed = row_bytes(ty, x.len());
            assert!(
                out.len() >= needed,
                "{} row of {} values needs {needed} bytes, got {}",
                ty.name(),
                x.len(),
                out.len()
            );
            let nb = x.len() / QK;
            #[cfg(target_arch = "x86_64")]
            {
                use crate::x86::{avx2, avx512};
                let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
                // SAFETY: `isa` was detected or checked runnable; `x` holds `32·nb` floats and
                // `out` at least `nb` blocks of `ty` (checked above).
                unsafe {
                    match (isa.has_avx512(), isa.has_avx2(), ty) {
                        (true, _, GgmlType::Q8_0) => {
                            return avx512::quantize_row_q8_0(src, dst, nb)
                        }
                        (true, _, _) => return avx512::quantize_row_q8_1(src, dst, nb),
                        (false, true, GgmlType::Q8_0) => {
                            return avx2::quantize_row_q8_0(src, dst, nb)
                        }
                        (false, true, _) => return avx2::quantize_row_q8_1(src, dst, nb),
                        _ => {}
                    }
                }
            }
            let _ = (isa, nb);
            quantize_row_ref(ty, x, out)
        }
        GgmlType::Q8K => kquants::quantize_row_q8k_on(isa, x, out),
        _ => quantize_row_ref(ty, x, out),
    }
}

/// The scalar reference quantizer of `ty` (llama.cpp's `quantize_row_*_ref` rounding), for
/// every type: activations, requantization and tests.
///
/// # Panics
/// If `x.len()` is not a whole number of blocks of `ty` or `out` is shorter than the row.
pub fn quantize_row_ref(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    let needed = row_bytes(ty, x.len());
    assert!(
        out.len() >= needed,
        "{} row of {} values needs {needed} bytes, got {}",
        ty.name(),
        x.len(),
        out.len()
    );
    match ty {
        GgmlType::F32 => float::quantize_row_f32(x, out),
        GgmlType::F16 => float::quantize_row_f16(x, out),
        GgmlType::BF16 => float::quantize_row_bf16(x, out),
        GgmlType::Q4_0 => q4_0::quantize_row_q4_0_ref(x, out),
        GgmlType::Q4_1 => q4_1::quantize_row_q4_1_ref(x, out),
        GgmlType::Q5_0 => q5_0::quantize_row_q5_0_ref(x, out),
        GgmlType::Q5_1 => q5_1::quantize_row_q5_1_ref(x, out),
        GgmlType::Q8_0 => q8_0::quantize_row_q8_0_ref(x, out),
        GgmlType::Q8_1 => q8_1::quantize_row_q8_1_ref(x, out),
        GgmlType::Q2K => kquants::quantize_row_q2k_ref(x, out),
        GgmlType::Q3K => kquants::quantize_row_q3k_ref(x, out),
        GgmlType::Q4K => kquants::quantize_row_q4k_ref(x, out),
        GgmlType::Q5K => kquants::quantize_row_q5k_ref(x, out),
        GgmlType::Q6K => kquants::quantize_row_q6k_ref(x, out),
        GgmlType::Q8K => kquants::quantize_row_q8k_scalar(x, out),
        GgmlType::I8 => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v.round().clamp(-128.0, 127.0) as i8 as u8;
            }
        }
    }
}

/// Expands one row of `ty` from `src` into `out` (its length sets the row length).
///
/// # Panics
/// If `out.len()` is not a whole number of blocks of `ty` or `src` is shorter than the row.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let needed = row_bytes(ty, out.len());
    assert!(
        src.len() >= needed,
        "{} row of {} values needs {needed} bytes, got {}",
        ty.name(),
        out.len(),
        src.len()
    );
    match ty {
        GgmlType::F32 => float::dequantize_row_f32(src, out),
        GgmlType::F16 => float::dequantize_row_f16(src, out),
        GgmlType::BF16 => float::dequantize_row_bf16(src, out),
        GgmlType::Q4_0 => q4_0::dequantize_row_q4_0(src, out),
        GgmlType::Q4_1 => q4_1::dequantize_row_q4_1(src, out),
        GgmlType::Q5_0 => q5_0::dequantize_row_q5_0(src, out),
        GgmlType::Q5_1 => q5_1::dequantize_row_q5_1(src, out),
        GgmlType::Q8_0 => q8_0::dequantize_row_q8_0(src, out),
        GgmlType::Q8_1 => q8_1::dequantize_row_q8_1(src, out),
        GgmlType::Q2K => kquants::dequantize_row_q2k(src, out),
        GgmlType::Q3K => kquants::dequantize_row_q3k(src, out),
        GgmlType::Q4K => kquants::dequantize_row_q4k(src, out),
        GgmlType::Q5K => kquants::dequantize_row_q5k(src, out),
        GgmlType::Q6K => kquants::dequantize_row_q6k(src, out),
        GgmlType::Q8K => kquants::dequantize_row_q8k(src, out),
        GgmlType::I8 => {
            for (o, &v) in out.iter_mut().zip(src) {
                *o = v as i8 as f32;
            }
        }
    }
}

/// Dot product of one weight row of `ty` (`k` weights) with one activation row in
/// [`vec_dot_type`]`(ty)`, on the ISA detected at start-up.
///
/// # Panics
/// If `k` is not a whole number of blocks of `ty` or a row is shorter than `k` values.
#[inline]
pub fn vec_dot(ty: GgmlType, k: usize, w_row: &[u8], act: &[u8]) -> f32 {
    vec_dot_impl(cpu::isa(), ty, k, w_row, act)
}

/// [`vec_dot`] with the kernels of `isa`; `Isa::Scalar` gives every type's scalar reference.
///
/// # Panics
/// As [`vec_dot`], or if `isa` cannot run on this machine.
pub fn vec_dot_on(isa: Isa, ty: GgmlType, k: usize, w_row: &[u8], act: &[u8]) -> f32 {
    assert!(
        cpu::is_runnable(isa),
        "vec_dot_on: {} kernels cannot run on this CPU",
        isa.name()
    );
    vec_dot_impl(isa, ty, k, w_row, act)
}

pub(crate) fn vec_dot_impl(isa: Isa, ty: GgmlType, k: usize, w: &[u8], act: &[u8]) -> f32 {
    let act_ty = vec_dot_type(ty);
    let (w_bytes, act_bytes) = (row_bytes(ty, k), row_bytes(act_ty, k));
    assert!(
        w.len() >= w_bytes && act.len() >= act_bytes,
        "vec_dot {}·{} of {k}: rows need {w_bytes} and {act_bytes} bytes, got {} and {}",
        ty.name(),
        act_ty.name(),
        w.len(),
        act.len()
    );
    if let Some(dot) = simd_vec_dot(isa, ty, k, w, act) {
        return dot;
    }
    match ty {
        GgmlType::F32 => float::vec_dot_f32_scalar(k, w, act),
        GgmlType::F16 => float::vec_dot_f16_f32_scalar(k, w, act),
        GgmlType::BF16 => float::vec_dot_bf16_f32_scalar(k, w, act),
        GgmlType::Q4_0 => q4_0::vec_dot_q4_0_q8_0_scalar(k, w, act),
        GgmlType::Q4_1 => q4_1::vec_dot_q4_1_q8_1_scalar(k, w, act),
        GgmlType::Q5_0 => q5_0::vec_dot_q5_0_q8_0_scalar(k, w, act),
        GgmlType::Q5_1 => q5_1::vec_dot_q5_1_q8_1_scalar(k, w, act),
        GgmlType::Q8_0 => q8_0::vec_dot_q8_0_q8_0_scalar(k, w, act),
        GgmlType::Q8_1 => q8_1::vec_dot_q8_1_q8_1_scalar(k, w, act),
        GgmlType::Q2K if isa == Isa::Scalar => kquants::vec_dot_q2k_q8k_scalar(k, w, act),
        GgmlType::Q2K => kquants::vec_dot_q2k_q8k(k, w, act),
        GgmlType::Q3K if isa == Isa::Scalar => kquants::vec_dot_q3k_q8k_scalar(k, w, act),
        GgmlType::Q3K => kquants::vec_dot_q3k_q8k(k, w, act),
        GgmlType::Q4K => kquants::vec_dot_q4k_q8k_on(isa, k, w, act),
        GgmlType::Q5K if isa == Isa::Scalar => kquants::vec_dot_q5k_q8k_scalar(k, w, act),
        GgmlType::Q5K => kquants::vec_dot_q5k_q8k(k, w, act),
        GgmlType::Q6K => kquants::vec_dot_q6k_q8k_on(isa, k, w, act),
        GgmlType::Q8K => vec_dot_q8k_q8k_scalar(k, w, act),
        GgmlType::I8 => w[..k]
            .iter()
            .zip(act.chunks_exact(4))
            .map(|(&q, a)| q as i8 as f32 * f32::from_le_bytes([a[0], a[1], a[2], a[3]]))
            .sum(),
    }
}

/// Q8_K · Q8_K, which only requantization and tests produce (no model stores Q8_K weights):
/// Σ_blocks d_w · d_a · Σ q_w · q_a over `block_q8_K` (`d` f32, `qs[256]`, `bsums[16]`).
fn vec_dot_q8k_q8k_scalar(k: usize, w: &[u8], act: &[u8]) -> f32 {
    let block_bytes = GgmlType::Q8K.type_size();
    let nb = k / GgmlType::Q8K.block_size();
    (0..nb)
        .map(|b| {
            let (wb, ab) = (&w[b * block_bytes..], &act[b * block_bytes..]);
            let d_w = f32::from_le_bytes([wb[0], wb[1], wb[2], wb[3]]);
            let d_a = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
            let sumi: i32 = wb[4..260]
                .iter()
                .zip(&ab[4..260])
                .map(|(&x, &y)| x as i8 as i32 * y as i8 as i32)
                .sum();
            (d_w * d_a) * sumi as f32
        })
        .sum()
}

/// The SIMD kernel of `isa` for `ty`, if there is one. Row lengths were checked.
#[allow(unused_variables)]
fn simd_vec_dot(isa: Isa, ty: GgmlType, k: usize, w: &[u8], act: &[u8]) -> Option<f32> {
    let (wp, ap) = (w.as_ptr(), act.as_ptr());
    #[cfg(target_arch = "x86_64")]
    {
        use crate::x86::{avx2, avx512};
        let nb = k / QK;
        let vnni = isa == Isa::Avx512Vnni;
        // SAFETY: `isa` was detected or checked runnable, and the caller checked that `w` and
        // `act` hold one full row each of `k` values (`nb` blocks) of their types.
        unsafe {
            if isa.has_avx512() {
                match ty {
                    GgmlType::F32 => return Some(avx512::dot_f32_bytes(wp, ap, k)),
                    GgmlType::F16 => return Some(avx512::dot_f16_f32(wp, ap, k)),
                    GgmlType::BF16 => return Some(avx512::dot_bf16_f32(wp, ap, k)),
                    GgmlType::Q4_0 if vnni => {
                        return Some(avx512::vec_dot_q4_0_q8_0_vnni(nb, wp, ap))
                    }
                    GgmlType::Q4_1 if vnni => {
                        return Some(avx512::vec_dot_q4_1_q8_1_vnni(nb, wp, ap))
                    }
                    GgmlType::Q5_0 if vnni => {
                        return Some(avx512::vec_dot_q5_0_q8_0_vnni(nb, wp, ap))
                    }
                    GgmlType::Q5_1 if vnni => {
                        return Some(avx512::vec_dot_q5_1_q8_1_vnni(nb, wp, ap))
                    }
                    GgmlType::Q8_0 if vnni => {
                        return Some(avx512::vec_dot_q8_0_q8_0_vnni(nb, wp, ap))
                    }
                    _ => {}
                }
            }
            if isa.has_avx2() {
                match ty {
                    GgmlType::F32 => return Some(avx2::dot_f32_bytes(wp, ap, k)),
                    GgmlType::F16 => return Some(avx2::dot_f16_f32(wp, ap, k)),
                    GgmlType::BF16 => return Some(avx2::dot_bf16_f32(wp, ap, k)),
                    GgmlType::Q4_0 => return Some(avx2::vec_dot_q4_0_q8_0(nb, wp, ap)),
                    GgmlType::Q4_1 => return Some(avx2::vec_dot_q4_1_q8_1(nb, wp, ap)),
                    GgmlType::Q5_0 => return Some(avx2::vec_dot_q5_0_q8_0(nb, wp, ap)),
                    GgmlType::Q5_1 => return Some(avx2::vec_dot_q5_1_q8_1(nb, wp, ap)),
                    GgmlType::Q8_0 => return Some(avx2::vec_dot_q8_0_q8_0(nb, wp, ap)),
                    _ => {}
                }
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        use crate::aarch64::neon;
        let nb = k / QK;
        // SAFETY: NEON is present (isa == Neon was detected or checked runnable), and the
        // caller checked that both rows are complete.
        unsafe {
            match ty {
                GgmlType::F32 => return Some(neon::dot_f32(wp.cast(), ap.cast(), k)),
                GgmlType::Q4_0 => return Some(neon::vec_dot_q4_0_q8_0(nb, wp, ap)),
                GgmlType::Q4_1 => return Some(neon::vec_dot_q4_1_q8_1(nb, wp, ap)),
                GgmlType::Q8_0 => return Some(neon::vec_dot_q8_0_q8_0(nb, wp, ap)),
                _ => {}
            }
        }
    }
    None
}
