//! Quantizers: named error limits on a fixed vector, known-answer block layouts, property
//! round trips, and SIMD activation quantizers bit-identical to their references.

mod common;

use common::*;
use edgefusion_kernels::formats::{self, QK};
use edgefusion_kernels::{dequantize_row, quantize_row_on, quantize_row_ref, GgmlType};
use proptest::prelude::*;

/// Length of the fixed test vector (llama.cpp's test-quantize-fns uses 32 · 128).
const TEST_LEN: usize = 32 * 128;

/// RMSE of dequantize(quantize(x)) on `cosine_vector(TEST_LEN, 0)` (values in [−1.9, 2.1]).
/// Uniform rounding error is step/√12; the steps are ~2.1/8 (Q4_0), ~4/15 (Q4_1),
/// ~2.1/16 (Q5_0), ~4/31 (Q5_1) and ~2.1/127 (Q8_x), so the limits sit a little above
/// 0.076, 0.077, 0.038, 0.037 and 0.0048 (measured: 0.0718, 0.0732, 0.0378, 0.0356,
/// 0.00476). Float formats: about an ulp near 2 (f16 2^-10, bf16 2^-7) over √12.
const RMSE_LIMITS: [(GgmlType, f64); 9] = [
    (GgmlType::Q4_0, 0.078),
    (GgmlType::Q4_1, 0.080),
    (GgmlType::Q5_0, 0.041),
    (GgmlType::Q5_1, 0.039),
    (GgmlType::Q8_0, 0.0052),
    (GgmlType::Q8_1, 0.0052),
    (GgmlType::F16, 3.0e-4),
    (GgmlType::BF16, 2.5e-3),
    (GgmlType::F32, 0.0),
];

/// llama.cpp's own measure, sqrt(Σ err²) / n, and its limit for ≥ 4-bit formats
/// (`MAX_QUANTIZATION_TOTAL_ERROR`).
const LLAMA_TOTAL_ERROR_LIMIT: f64 = 0.002;

#[test]
fn each_format_meets_its_rmse_limit_on_the_fixed_vector() {
    let x = cosine_vector(TEST_LEN, 0.0);
    for (ty, limit) in RMSE_LIMITS {
        let y = dequantize(ty, &quantize(ty, &x), TEST_LEN);
        let err = rmse(&x, &y);
        assert!(err <= limit, "{}: rmse {err} over limit {limit}", ty.name());
        let total = err * (TEST_LEN as f64).sqrt() / TEST_LEN as f64;
        assert!(
            total < LLAMA_TOTAL_ERROR_LIMIT,
            "{}: llama.cpp total error {total}",
            ty.name()
        );
    }
}

#[test]
fn rmse_limits_are_tight_enough_to_separate_formats() {
    // A 4-bit format must not pass the 5-bit limit: the limits mean something.
    let x = cosine_vector(TEST_LEN, 0.0);
    let q4 = rmse(
        &x,
        &dequantize(GgmlType::Q4_0, &quantize(GgmlType::Q4_0, &x), TEST_LEN),
    );
    assert!(
        q4 > 0.041,
        "Q4_0 rmse {q4} unexpectedly within the Q5 limit"
    );
    let q5 = rmse(
        &x,
        &dequantize(GgmlType::Q5_0, &quantize(GgmlType::Q5_0, &x), TEST_LEN),
    );
    assert!(
        q5 > 0.0052,
        "Q5_0 rmse {q5} unexpectedly within the Q8 limit"
    );
}

#[test]
fn q4_0_known_answer_layout_and_rounding() {
    // Codes j % 16 with d = 1: byte j holds weight j (low nibble) and j + 16 (high).
    let x: Vec<f32> = (0..QK).map(|j| (j % 16) as f32 - 8.0).collect();
    let bytes = quantize(GgmlType::Q4_0, &x);
    assert_eq!(&bytes[..2], &f16_bytes(1.0));
    for j in 0..16 {
        assert_eq!(bytes[2 + j], (j as u8) | ((j as u8) << 4), "qs[{j}]");
    }
    // llama.cpp truncates x/d + 8.5: halves round up, not away from zero.
    let mut x = vec![0.0f32; QK];
    x[0] = -8.0;
    x[1] = -0.5;
    x[2] = 0.5;
    x[3] = -1.5;
    let b = formats::BlockQ4_0::quantize(x.as_slice().try_into().unwrap());
    assert_eq!([b.code(0), b.code(1), b.code(2), b.code(3)], [0, 8, 9, 7]);
}

#[test]
fn q4_1_known_answer_layout() {
    let x: Vec<f32> = (0..QK).map(|j| (j % 16) as f32 + 10.0).collect();
    let bytes = quantize(GgmlType::Q4_1, &x);
    assert_eq!(&bytes[..2], &f16_bytes(1.0));
    assert_eq!(&bytes[2..4], &f16_bytes(10.0));
    for j in 0..16 {
        assert_eq!(bytes[4 + j], (j as u8) | ((j as u8) << 4), "qs[{j}]");
    }
}

#[test]
fn q5_0_known_answer_layout() {
    // Codes j: the fifth bit is set for weights 16..32, so qh = 0xFFFF0000.
    let x: Vec<f32> = (0..QK).map(|j| j as f32 - 16.0).collect();
    let bytes = quantize(GgmlType::Q5_0, &x);
    assert_eq!(&bytes[..2], &f16_bytes(1.0));
    assert_eq!(&bytes[2..6], &0xFFFF_0000u32.to_le_bytes());
    for j in 0..16 {
        assert_eq!(bytes[6 + j], (j as u8) | ((j as u8) << 4), "qs[{j}]");
    }
}

#[test]
fn q5_1_known_answer_layout() {
    let x: Vec<f32> = (0..QK).map(|j| j as f32 - 3.0).collect();
    let bytes = quantize(GgmlType::Q5_1, &x);
    assert_eq!(&bytes[..2], &f16_bytes(1.0));
    assert_eq!(&bytes[2..4], &f16_bytes(-3.0));
    assert_eq!(&bytes[4..8], &0xFFFF_0000u32.to_le_bytes());
    for j in 0..16 {
        assert_eq!(bytes[8 + j], (j as u8) | ((j as u8) << 4), "qs[{j}]");
    }
}

#[test]
fn q8_0_and_q8_1_known_answer_layout() {
    let x: Vec<f32> = (0..QK).map(|j| 127.0 - 8.0 * j as f32).collect();
    let q8_0 = quantize(GgmlType::Q8_0, &x);
    assert_eq!(&q8_0[..2], &f16_bytes(1.0));
    for j in 0..QK {
        assert_eq!(q8_0[2 + j] as i8 as f32, x[j], "qs[{j}]");
    }
    let q8_1 = quantize(GgmlType::Q8_1, &x);
    let sum: f32 = x.iter().sum();
    assert_eq!(&q8_1[..2], &f16_bytes(1.0));
    assert_eq!(&q8_1[2..4], &f16_bytes(sum));
    assert_eq!(&q8_1[4..], &q8_0[2..]);
    // llama.cpp's SIMD activation quantizers: halves go to the even neighbour.
    let mut x = vec![0.0f32; QK];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    let q = quantize(GgmlType::Q8_0, &x);
    assert_eq!([q[3] as i8, q[4] as i8], [2, -2]);
    x[1] = 3.5;
    x[2] = -3.5;
    let q = quantize(GgmlType::Q8_0, &x);
    assert_eq!([q[3] as i8, q[4] as i8], [4, -4]);
}

#[test]
fn all_zero_blocks_quantize_to_zero() {
    let x = vec![0.0f32; 64];
    for ty in BLOCK32_TYPES {
        let y = dequantize(ty, &quantize(ty, &x), 64);
        assert!(y.iter().all(|&v| v == 0.0), "{}", ty.name());
    }
}

/// Inputs that hit the rounding ties and extremes of the Q8 quantizers.
fn tie_heavy_vector(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 32 {
            0 => 127.0,
            // Exact halves after scaling by 127/127 = 1.
            1..=8 => (i % 32) as f32 - 0.5,
            9..=16 => -((i % 32) as f32) + 0.5,
            17 => 0.499_999_97,
            18 => -0.499_999_97,
            _ => (i as f32 * 0.37).sin() * 100.0,
        })
        .collect()
}

#[test]
fn simd_activation_quantizers_are_bit_identical_to_the_reference() {
    for isa in isas() {
        for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
            for n in LENGTHS {
                let inputs = [
                    activation_like(n, n as u64),
                    cosine_vector(n, 0.5),
                    tie_heavy_vector(n),
                    vec![0.0; n],
                ];
                for x in inputs {
                    let want = quantize(ty, &x);
                    let mut got = vec![0xAAu8; want.len()];
                    quantize_row_on(isa, ty, &x, &mut got);
                    assert_eq!(got, want, "{} on {} at n = {n}", ty.name(), isa.name());
                }
            }
        }
    }
}

#[test]
fn f32_activation_rows_are_plain_little_endian_copies() {
    let x = activation_like(96, 3);
    for isa in isas() {
        let mut out = vec![0u8; 4 * x.len()];
        quantize_row_on(isa, GgmlType::F32, &x, &mut out);
        let back: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, x);
    }
}

#[test]
#[should_panic(expected = "multiple of 32")]
fn partial_blocks_are_rejected() {
    let mut out = vec![0u8; 64];
    quantize_row_ref(GgmlType::Q8_0, &[0.0; 33], &mut out);
}

#[test]
#[should_panic(expected = "needs 34 bytes")]
fn short_output_is_rejected() {
    let mut out = vec![0u8; 33];
    quantize_row_ref(GgmlType::Q8_0, &[0.0; 32], &mut out);
}

/// A block of 32 values in ±`scale`, `scale` kept where f16 scales stay normal.
fn block_strategy() -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(-1.0f32..1.0, 32..=32),
        prop::sample::select(vec![0.01f32, 0.3, 1.0, 7.0, 250.0]),
        -2.0f32..2.0,
    )
        .prop_map(|(unit, scale, shift)| unit.iter().map(|u| u * scale + shift * scale).collect())
}

/// The round-trip bound of one block: half a step plus what the f16 rounding of the scale
/// (and offset) can add, with codes up to `max_code` steps from the offset; the symmetric
/// formats can clamp their top code (+8 → +7), a full step.
fn round_trip_bound(ty: GgmlType, x: &[f32]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let min = x.iter().fold(f32::MAX, |m, &v| m.min(v));
    let max = x.iter().fold(f32::MIN, |m, &v| m.max(v));
    let f16_rel = 1.0 / 1024.0; // half an f16 ulp is 2^-11; doubled for slack
    let fuzz = amax * 1e-6;
    match ty {
        GgmlType::Q4_0 => amax / 8.0 * (1.0 + 8.0 * f16_rel) + fuzz,
        GgmlType::Q5_0 => amax / 16.0 * (1.0 + 16.0 * f16_rel) + fuzz,
        GgmlType::Q4_1 => {
            let d = (max - min) / 15.0;
            0.5 * d + 15.0 * d * f16_rel + min.abs() * f16_rel + fuzz
        }
        GgmlType::Q5_1 => {
            let d = (max - min) / 31.0;
            0.5 * d + 31.0 * d * f16_rel + min.abs() * f16_rel + fuzz
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let d = amax / 127.0;
            0.5 * d + 127.0 * d * f16_rel + fuzz
        }
        _ => unreachable!(),
    }
}

proptest! {
    #[test]
    fn round_trip_stays_within_the_format_bound(block in block_strategy()) {
        for ty in BLOCK32_TYPES {
            let back = dequantize(ty, &quantize(ty, &block), QK);
            let bound = round_trip_bound(ty, &block);
            for (j, (&x, &y)) in block.iter().zip(&back).enumerate() {
                prop_assert!((x - y).abs() <= bound, "{} [{j}]: {x} -> {y}, bound {bound}", ty.name());
            }
        }
    }

    #[test]
    fn float_rows_round_trip_within_half_an_ulp(x in prop::collection::vec(-6.0e4f32..6.0e4, 1..80)) {
        for (ty, rel) in [(GgmlType::F16, 1.0 / 2048.0), (GgmlType::BF16, 1.0 / 256.0), (GgmlType::F32, 0.0)] {
            let back = dequantize(ty, &quantize(ty, &x), x.len());
            for (&v, &w) in x.iter().zip(&back) {
                // f16 below its normal range has an absolute ulp of 2^-24.
                prop_assert!((v - w).abs() <= v.abs() * rel + 3.0e-8, "{}: {v} -> {w}", ty.name());
            }
        }
    }

    #[test]
    fn representable_blocks_quantize_exactly(
        codes in prop::collection::vec(0u8..32, 32..=32),
        exp in -8i32..5,
        offset_steps in -40i32..40,
        extreme_at in 0usize..32,
        other_at in 0usize..32,
    ) {
        let d = 2f32.powi(exp);
        for ty in BLOCK32_TYPES {
            let x: Vec<f32> = match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 => {
                    let half_range = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                    // Code 0 (= −half_range·d) must be the unique largest magnitude.
                    (0..QK).map(|j| {
                        let c = if j == extreme_at { 0 } else { 1 + codes[j] as i32 % (2 * half_range - 1) };
                        (c - half_range) as f32 * d
                    }).collect()
                }
                GgmlType::Q4_1 | GgmlType::Q5_1 => {
                    let top = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                    let other = if other_at == extreme_at { (extreme_at + 1) % QK } else { other_at };
                    (0..QK).map(|j| {
                        let c = if j == extreme_at { 0 } else if j == other { top } else { codes[j] as i32 % (top + 1) };
                        (c + offset_steps) as f32 * d
                    }).collect()
                }
                _ => (0..QK).map(|j| {
                    let c = if j == extreme_at { 127 } else { codes[j] as i32 * 8 - 127 };
                    c as f32 * d
                }).collect(),
            };
            let bytes = quantize(ty, &x);
            let back = dequantize(ty, &bytes, QK);
            prop_assert_eq!(&back, &x, "{} not exact", ty.name());
        }
    }
}

#[test]
fn dequantize_row_covers_every_type() {
    // Every type reads its own reference quantization back: the error is well below the
    // signal (a wrong layout or dispatch would give noise of the signal's size).
    let x = weight_like(512, 5);
    let signal = rmse(&x, &vec![0.0; x.len()]);
    // I8 holds plain integers (EFQ blobs), not scaled weights: small values round to 0.
    for ty in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::I8) {
        let back = dequantize(ty, &quantize(ty, &x), x.len());
        let err = rmse(&x, &back);
        assert!(
            err < 0.5 * signal,
            "{}: rmse {err} vs signal {signal}",
            ty.name()
        );
    }
    let mut out = vec![0.0f32; 32];
    dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut out);
    assert!(out.iter().all(|&v| v == 0.0));
}
