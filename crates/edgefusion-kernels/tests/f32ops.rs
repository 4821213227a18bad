//! `f32ops`: SIMD twins of dot, axpy and scale against the scalar references.

mod common;

use common::*;
use edgefusion_kernels::f32ops::{
    self, axpy_on, axpy_scalar, dot_on, dot_scalar, scale_on, scale_scalar,
};

/// Relative to Σ|a·b|: the SIMD dot sums in 32–64 independent lanes with fused
/// multiply-adds, the scalar reference in order; in-order f32 summation of n terms drifts by
/// about √n·ε·Σ|terms| (≈ 4e-6 at n = 4099), which this bounds with a little room.
const DOT_REL_TOL: f64 = 1e-5;
/// axpy with FMA rounds once where the scalar rounds twice: at most one ulp of the result
/// plus one of alpha·x.
const AXPY_REL_TOL: f32 = 2.5e-7;

fn lengths() -> Vec<usize> {
    (0..=70).chain([127, 128, 129, 576, 1536, 4099]).collect()
}

#[test]
fn dot_matches_scalar_on_every_isa() {
    for n in lengths() {
        let a = activation_like(n, n as u64 + 1);
        let b = weight_like(n, n as u64 + 2);
        let want = dot_scalar(&a, &b) as f64;
        let l1: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum();
        for isa in isas() {
            let got = dot_on(isa, &a, &b) as f64;
            assert!(
                (got - want).abs() <= DOT_REL_TOL * l1 + 1e-30,
                "{} n={n}: {got} vs {want}",
                isa.name()
            );
        }
    }
}

#[test]
fn dot_is_exact_on_small_integers() {
    // Integer products and sums below 2^24 are exact in any order.
    for n in lengths() {
        let a: Vec<f32> = (0..n).map(|i| ((i * 7) % 23) as f32 - 11.0).collect();
        let b: Vec<f32> = (0..n).map(|i| ((i * 5) % 19) as f32 - 9.0).collect();
        let want = dot_scalar(&a, &b);
        for isa in isas() {
            assert_eq!(dot_on(isa, &a, &b), want, "{} n={n}", isa.name());
        }
    }
}

#[test]
fn axpy_matches_scalar_on_every_isa() {
    for n in lengths() {
        let x = activation_like(n, 3 * n as u64 + 1);
        let y0 = weight_like(n, 5 * n as u64 + 2);
        let alpha = -0.37f32;
        let mut want = y0.clone();
        axpy_scalar(alpha, &x, &mut want);
        for isa in isas() {
            let mut got = y0.clone();
            axpy_on(isa, alpha, &x, &mut got);
            for i in 0..n {
                let scale = want[i].abs() + (alpha * x[i]).abs();
                assert!(
                    (got[i] - want[i]).abs() <= AXPY_REL_TOL * scale,
                    "{} n={n} [{i}]: {} vs {}",
                    isa.name(),
                    got[i],
                    want[i]
                );
            }
        }
    }
}

#[test]
fn scale_is_bit_identical_on_every_isa() {
    for n in lengths() {
        let x0 = activation_like(n, 7 * n as u64 + 3);
        let mut want = x0.clone();
        scale_scalar(&mut want, 0.125 + 1.0 / 3.0);
        for isa in isas() {
            let mut got = x0.clone();
            scale_on(isa, &mut got, 0.125 + 1.0 / 3.0);
            assert_eq!(got, want, "{} n={n}", isa.name());
        }
    }
}

#[test]
fn detected_entry_points_agree_with_the_scalar_twins() {
    let a = activation_like(333, 1);
    let b = activation_like(333, 2);
    let l1: f64 = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum();
    assert!((f32ops::dot(&a, &b) as f64 - dot_scalar(&a, &b) as f64).abs() <= DOT_REL_TOL * l1);
    let mut y = b.clone();
    f32ops::axpy(2.0, &a, &mut y);
    let mut y_ref = b.clone();
    axpy_scalar(2.0, &a, &mut y_ref);
    for (g, w) in y.iter().zip(&y_ref) {
        assert!((g - w).abs() <= AXPY_REL_TOL * (w.abs() + 2.0 * 12.0 * 5.0));
    }
    let mut z = a.clone();
    f32ops::scale(&mut z, -3.0);
    assert!(z.iter().zip(&a).all(|(&zi, &ai)| zi == -3.0 * ai));
}

#[test]
#[should_panic(expected = "length mismatch")]
fn dot_rejects_mismatched_lengths() {
    f32ops::dot(&[1.0, 2.0], &[1.0]);
}
