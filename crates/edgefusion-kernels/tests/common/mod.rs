//! Deterministic inputs and error measures shared by the kernel test files.
#![allow(dead_code)]

use edgefusion_kernels::cpu::{self, Isa};
use edgefusion_kernels::GgmlType;

/// Lengths every SIMD-vs-scalar test runs: one block, odd block counts, and the SmolLM2
/// widths (576 = 18 blocks, 1536 = 48 blocks).
pub const LENGTHS: [usize; 7] = [32, 64, 96, 160, 224, 576, 1536];

/// The 32-wide types this crate's formats own.
pub const BLOCK32_TYPES: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
];

/// Every ISA this machine can run, scalar first.
pub fn isas() -> Vec<Isa> {
    cpu::available_isas()
}

/// llama.cpp's test-quantize-fns vector: 0.1 + 2·cos(i + offset).
pub fn cosine_vector(n: usize, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| 0.1 + 2.0 * (i as f32 + offset).cos())
        .collect()
}

/// A small xorshift generator: reproducible without a crate.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i32
    }

    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        for byte in out {
            *byte = (self.next_u64() >> 56) as u8;
        }
    }
}

/// Activation-like values: mostly small, a few outliers, varying per block.
pub fn activation_like(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift(seed | 1);
    (0..n)
        .map(|i| {
            let scale = 0.5 + ((i / 32) % 5) as f32;
            let v = rng.next_f32() * scale;
            if i % 61 == 7 {
                v * 12.0
            } else {
                v
            }
        })
        .collect()
}

/// Weight-like values: ±0.05 with occasional outliers.
pub fn weight_like(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift(seed | 1);
    (0..n)
        .map(|i| {
            let v = rng.next_f32() * 0.05;
            if i % 97 == 13 {
                v * 10.0
            } else {
                v
            }
        })
        .collect()
}

/// Root mean square of `a − b`.
pub fn rmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    (sum / a.len() as f64).sqrt()
}

/// `x` quantized with the reference quantizer of `ty`.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).expect("whole blocks")];
    edgefusion_kernels::quantize_row_ref(ty, x, &mut out);
    out
}

/// `bytes` (a row of `n` values of `ty`) expanded to f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    edgefusion_kernels::dequantize_row(ty, bytes, &mut out);
    out
}

/// f16 bits of `v` as little-endian bytes.
pub fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// Types with a SIMD or scalar `vec_dot` owned by the 32-wide/float formats.
pub const OWN_TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
];

/// A weight row of `k` values of `ty` with random codes and sane random f16 scales (and
/// offsets), so every code pattern, including Q8_0's −128, is exercised.
pub fn random_row(ty: GgmlType, k: usize, rng: &mut XorShift) -> Vec<u8> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::I8 => {
            let x: Vec<f32> = (0..k).map(|_| rng.next_f32() * 4.0).collect();
            quantize(ty, &x)
        }
        _ => {
            let block = ty.type_size();
            let mut row = vec![0u8; ty.row_bytes(k).unwrap()];
            rng.fill_bytes(&mut row);
            for b in row.chunks_exact_mut(block) {
                b[..2].copy_from_slice(&f16_bytes(0.001 + rng.next_f32().abs() * 0.05));
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1) {
                    b[2..4].copy_from_slice(&f16_bytes(rng.next_f32() * 0.3));
                }
            }
            row
        }
    }
}

/// A row whose every product and partial sum is an integer below 2^24, so any summation
/// order gives the same f32: scales 1 or 2, codes bounded so that Σ|terms| < 2^24 for
/// k ≤ 1536 (Q8_0 codes within ±31; Q8_x activations within ±`act_code_max`).
pub fn exact_row(ty: GgmlType, k: usize, rng: &mut XorShift, act_code_max: i32) -> Vec<u8> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let x: Vec<f32> = (0..k).map(|_| rng.range(-16, 16) as f32).collect();
            quantize(ty, &x)
        }
        _ => {
            let block = ty.type_size();
            let mut row = vec![0u8; ty.row_bytes(k).unwrap()];
            rng.fill_bytes(&mut row);
            for b in row.chunks_exact_mut(block) {
                let d = [1.0f32, 2.0][rng.range(0, 1) as usize];
                b[..2].copy_from_slice(&f16_bytes(d));
                match ty {
                    GgmlType::Q4_1 | GgmlType::Q5_1 => {
                        b[2..4].copy_from_slice(&f16_bytes(d * rng.range(-8, 8) as f32));
                    }
                    GgmlType::Q8_0 => {
                        for q in &mut b[2..] {
                            *q = rng.range(-act_code_max, act_code_max) as i8 as u8;
                        }
                    }
                    GgmlType::Q8_1 => {
                        b[2..4].copy_from_slice(&f16_bytes(d * rng.range(-2000, 2000) as f32));
                        for q in &mut b[4..] {
                            *q = rng.range(-act_code_max, act_code_max) as i8 as u8;
                        }
                    }
                    _ => {}
                }
            }
            row
        }
    }
}

/// An activation row in `vec_dot_type(ty)` for the exact tests.
pub fn exact_act(ty: GgmlType, k: usize, rng: &mut XorShift) -> Vec<u8> {
    let act_ty = edgefusion_kernels::vec_dot_type(ty);
    let code_max = if ty == GgmlType::Q8_0 { 31 } else { 127 };
    match act_ty {
        GgmlType::F32 => exact_row(GgmlType::F32, k, rng, code_max),
        _ => exact_row(act_ty, k, rng, code_max),
    }
}

/// Σ |ŵ_i · â_i| in f64: the magnitude against which summation-order differences are
/// measured.
pub fn l1_magnitude(ty: GgmlType, k: usize, w: &[u8], act: &[u8]) -> f64 {
    let act_ty = edgefusion_kernels::vec_dot_type(ty);
    let wf = dequantize(ty, w, k);
    let af = dequantize(act_ty, act, k);
    wf.iter()
        .zip(&af)
        .map(|(&x, &y)| (x as f64 * y as f64).abs())
        .sum()
}
