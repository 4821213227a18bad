//! `vec_dot`: every SIMD kernel against its scalar twin on every ISA this machine has, and
//! the dot's meaning: vec_dot(w, quantize(x)) ≈ Σ dequantize(w) · x.

mod common;

use common::*;
use edgefusion_kernels::cpu::Isa;
use edgefusion_kernels::{quantize_row, vec_dot, vec_dot_on, vec_dot_type, GgmlType};

/// SIMD and scalar kernels sum the same exact integer block dots in a different order (per
/// 4-byte lane, then across lanes and blocks) and scale per lane instead of per block; the
/// difference is a few f32 roundings of terms no larger than Σ|ŵ·â|.
const SUMMATION_REL_TOL: f64 = 1e-5;

#[test]
fn simd_vec_dot_matches_scalar_within_summation_tolerance() {
    let mut rng = XorShift(0x5EED);
    for ty in OWN_TYPES {
        let act_ty = vec_dot_type(ty);
        for k in LENGTHS {
            let w = random_row(ty, k, &mut rng);
            let mut act = vec![0u8; act_ty.row_bytes(k).unwrap()];
            quantize_row(act_ty, &activation_like(k, k as u64 + 1), &mut act);
            let want = vec_dot_on(Isa::Scalar, ty, k, &w, &act) as f64;
            let tol = SUMMATION_REL_TOL * l1_magnitude(ty, k, &w, &act) + 1e-30;
            for isa in isas() {
                let got = vec_dot_on(isa, ty, k, &w, &act) as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{} on {} k={k}: {got} vs scalar {want} (tol {tol})",
                    ty.name(),
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn simd_vec_dot_is_exact_when_every_partial_sum_is_an_integer() {
    // Power-of-two scales and bounded codes make all per-block integer sums, their scaled
    // values and any partial sums exact in f32: a kernel that gets one integer block sum
    // wrong, or drops a block, cannot match bit for bit.
    let mut rng = XorShift(0xE7AC7);
    for ty in OWN_TYPES {
        let w_code_max = if ty == GgmlType::Q8_0 { 31 } else { 127 };
        for k in LENGTHS {
            let w = exact_row(ty, k, &mut rng, w_code_max);
            let act = exact_act(ty, k, &mut rng);
            let want = vec_dot_on(Isa::Scalar, ty, k, &w, &act);
            for isa in isas() {
                let got = vec_dot_on(isa, ty, k, &w, &act);
                assert_eq!(got, want, "{} on {} k={k}", ty.name(), isa.name());
            }
        }
    }
}

#[test]
fn q8_0_weights_with_minus_128_codes_are_exact() {
    // −128 is legal in a Q8_0 weight file (our quantizer never writes it); the unsigned-bias
    // (VNNI) and sign-transfer (AVX2) tricks must both handle it.
    let k = 96;
    let mut w = vec![0u8; GgmlType::Q8_0.row_bytes(k).unwrap()];
    let mut act = w.clone();
    for (b, (wb, ab)) in w
        .chunks_exact_mut(34)
        .zip(act.chunks_exact_mut(34))
        .enumerate()
    {
        wb[..2].copy_from_slice(&f16_bytes(1.0));
        ab[..2].copy_from_slice(&f16_bytes(if b == 1 { 2.0 } else { 1.0 }));
        for i in 0..32 {
            wb[2 + i] = if i % 3 == 0 {
                0x80
            } else {
                (i as i8 - 16) as u8
            };
            ab[2 + i] = if i % 2 == 0 { 127 } else { (-127i8) as u8 };
        }
    }
    let want = vec_dot_on(Isa::Scalar, GgmlType::Q8_0, k, &w, &act);
    for isa in isas() {
        assert_eq!(
            vec_dot_on(isa, GgmlType::Q8_0, k, &w, &act),
            want,
            "{}",
            isa.name()
        );
    }
}

#[test]
fn q5_extreme_codes_are_exact_in_vec_dot_and_matmul() {
    // All fifth bits set and every nibble 15 (code 31), or none set (code 0), against ±127
    // activations: the largest |pair sums| the byte dots see, with odd block counts so the
    // tiled kernels' partial groups hold fifth bits too.
    for ty in [GgmlType::Q5_0, GgmlType::Q5_1] {
        let act_ty = vec_dot_type(ty);
        for k in [96, 224, 576] {
            let mut w = vec![0u8; ty.row_bytes(k).unwrap()];
            let mut act = vec![0u8; act_ty.row_bytes(k).unwrap()];
            let qh_at = if ty == GgmlType::Q5_0 { 2 } else { 4 };
            for (b, wb) in w.chunks_exact_mut(ty.type_size()).enumerate() {
                wb[..2].copy_from_slice(&f16_bytes(1.0));
                if ty == GgmlType::Q5_1 {
                    wb[2..4].copy_from_slice(&f16_bytes(-3.0));
                }
                let (qh, qs) = if b % 3 == 2 { (0u32, 0u8) } else { (!0, 0xFF) };
                wb[qh_at..qh_at + 4].copy_from_slice(&qh.to_le_bytes());
                wb[qh_at + 4..].fill(qs);
            }
            let qs_at = act_ty.type_size() - 32;
            for (b, ab) in act.chunks_exact_mut(act_ty.type_size()).enumerate() {
                ab[..2].copy_from_slice(&f16_bytes(if b % 2 == 0 { 1.0 } else { 2.0 }));
                if act_ty == GgmlType::Q8_1 {
                    ab[2..4].copy_from_slice(&f16_bytes(4.0));
                }
                let sign = if b % 4 == 1 { -127i8 } else { 127 };
                ab[qs_at..].fill(sign as u8);
            }
            let want = vec_dot_on(Isa::Scalar, ty, k, &w, &act);
            for isa in isas() {
                assert_eq!(
                    vec_dot_on(isa, ty, k, &w, &act),
                    want,
                    "{} on {} k={k}",
                    ty.name(),
                    isa.name()
                );
                let mut out = [f32::NAN; 1];
                edgefusion_kernels::matmul_on(
                    isa,
                    ty,
                    k,
                    &w,
                    1,
                    &act,
                    1,
                    &mut out,
                    1,
                    edgefusion_kernels::BatchPart::whole(1),
                );
                assert_eq!(out[0], want, "matmul {} on {} k={k}", ty.name(), isa.name());
            }
        }
    }
}

/// Worst-case |vec_dot(w, quantize(x)) − Σ ŵ·x|: each activation is off by at most half a
/// step d_b = max|x_b|/127 plus the f16 rounding of d_b over 127 codes; offset formats add
/// |m_b| times the error of `s_b` (its f16 rounding plus 32 half-steps); then f32 fuzz.
fn act_quant_bound(ty: GgmlType, k: usize, w: &[u8], x: &[f32], act: &[u8]) -> f64 {
    let wf = dequantize(ty, w, k);
    let f16_half_ulp = 1.0 / 2048.0;
    let mut bound = 0.0f64;
    for b in 0..k / 32 {
        let xb = &x[32 * b..32 * b + 32];
        let d = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
        let per_value = d * (0.5 + 127.0 * f16_half_ulp * 1.01);
        bound += wf[32 * b..32 * b + 32]
            .iter()
            .map(|&v| v.abs() as f64)
            .sum::<f64>()
            * per_value;
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            let blk = &w[b * ty.type_size()..];
            let m = half::f16::from_bits(u16::from_le_bytes([blk[2], blk[3]]))
                .to_f64()
                .abs();
            let ab = &act[b * 36..];
            let s = half::f16::from_bits(u16::from_le_bytes([ab[2], ab[3]]))
                .to_f64()
                .abs();
            bound += m * (s * f16_half_ulp + 16.0 * d);
        }
    }
    let l1: f64 = wf
        .iter()
        .zip(x)
        .map(|(&a, &b)| (a as f64 * b as f64).abs())
        .sum();
    bound + 1e-5 * l1
}

#[test]
fn vec_dot_of_quantized_activation_approximates_the_float_dot() {
    for ty in OWN_TYPES {
        for k in [32, 576, 1536] {
            let w = quantize(ty, &weight_like(k, 11 + k as u64));
            let x = activation_like(k, 23 + k as u64);
            let act_ty = vec_dot_type(ty);
            let mut act = vec![0u8; act_ty.row_bytes(k).unwrap()];
            quantize_row(act_ty, &x, &mut act);
            let wf = dequantize(ty, &w, k);
            let exact: f64 = wf.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let bound = act_quant_bound(ty, k, &w, &x, &act);
            let got = vec_dot(ty, k, &w, &act) as f64;
            assert!(
                (got - exact).abs() <= bound,
                "{} k={k}: {got} vs {exact} (bound {bound})",
                ty.name()
            );
        }
    }
}

#[test]
fn every_type_dispatches_and_k_quants_forward_to_their_kernels() {
    // K-quant rows go to `kquants`; each ISA's result equals the scalar reference within the
    // summation tolerance.
    let k = 512;
    for ty in GgmlType::ALL {
        let act_ty = vec_dot_type(ty);
        // I8 holds plain integers: give it integer-sized weights.
        let scale = if ty == GgmlType::I8 { 100.0 } else { 1.0 };
        let weights: Vec<f32> = weight_like(k, 3).iter().map(|v| v * scale).collect();
        let w = quantize(ty, &weights);
        let mut act = vec![0u8; act_ty.row_bytes(k).unwrap()];
        quantize_row(act_ty, &activation_like(k, 4), &mut act);
        let want = vec_dot_on(Isa::Scalar, ty, k, &w, &act) as f64;
        let tol = SUMMATION_REL_TOL * l1_magnitude(ty, k, &w, &act) + 1e-30;
        assert!(want.is_finite() && want != 0.0, "{}: {want}", ty.name());
        for isa in isas() {
            let got = vec_dot_on(isa, ty, k, &w, &act) as f64;
            assert!(
                (got - want).abs() <= tol,
                "{} on {}: {got} vs {want}",
                ty.name(),
                isa.name()
            );
        }
    }
}

#[test]
#[should_panic(expected = "rows need")]
fn short_rows_are_rejected_before_any_kernel_runs() {
    let w = vec![0u8; 18];
    let act = vec![0u8; 34];
    vec_dot(GgmlType::Q4_0, 64, &w, &act);
}
