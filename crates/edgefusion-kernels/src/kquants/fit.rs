//! Scale searches shared by the reference quantizers.
//!
//! A sub-block (16 or 32 weights) gets a scale, and for the asymmetric formats an offset,
//! chosen by trying a fan of candidate step sizes around the naive `range / nmax`, rounding
//! every weight to a level for each, refitting scale (and offset) to those levels by
//! weighted least squares, and keeping the candidate with the smallest weighted squared
//! error. The super-block then stores those per-sub-block scales quantized to 4, 6 or 8 bits
//! against one f16 factor.

/// Candidate step sizes tried per sub-block: `nmax + FIRST_EXTRA + STEP * i` levels per range.
const FIRST_EXTRA: f32 = -1.0;
const STEP: f32 = 0.1;
const CANDIDATES: usize = 21;

pub(crate) use crate::f32ops::nearest_int;

/// Per-weight importance for the least-squares fits: the sub-block RMS plus |x|, so large
/// weights are fitted a little more tightly without ignoring the small ones.
pub(crate) fn importance(x: &[f32], out: &mut [f32]) {
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    for (w, v) in out.iter_mut().zip(x) {
        *w = rms + v.abs();
    }
}

/// Fits `x ≈ scale * level - offset` with `level` in `0..=nmax`, `scale ≥ 0`, `offset ≥ 0`
/// (the offset never makes zero unreachable). Writes the levels and returns
/// `(scale, offset)`.
pub(crate) fn fit_scale_offset(
    x: &[f32],
    weights: &[f32],
    nmax: u8,
    levels: &mut [u8],
) -> (f32, f32) {
    debug_assert!(x.len() == weights.len() && x.len() == levels.len() && x.len() <= 32);
    let low = x.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
    let high = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    levels.fill(0);
    if high <= low {
        // Every weight equals `low` (≤ 0): the offset alone represents them.
        return (0.0, -low);
    }
    let sum_w: f32 = weights.iter().sum();
    let sum_x: f32 = weights.iter().zip(x).map(|(w, v)| w * v).sum();

    let mut trial = [0u8; 32];
    let trial = &mut trial[..x.len()];
    let mut best = (f32::INFINITY, 0.0f32, low);
    for candidate in 0..CANDIDATES {
        let inv_step = (nmax as f32 + FIRST_EXTRA + STEP * candidate as f32) / (high - low);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((level, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            let l = nearest_int((v - low) * inv_step).clamp(0, nmax as i32);
            *level = l as u8;
            let l = l as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        // Normal equations of min Σ w (s·l + m - x)² over (s, m).
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det <= 0.0 {
            continue;
        }
        let mut scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        let mut min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if min > 0.0 {
            min = 0.0;
            scale = sum_xl / sum_l2;
        }
        if scale <= 0.0 {
            continue;
        }
        let err: f32 = trial
            .iter()
            .zip(x)
            .zip(weights)
            .map(|((&l, &v), &w)| {
                let diff = scale * l as f32 + min - v;
                w * diff * diff
            })
            .sum();
        if err < best.0 {
            best = (err, scale, min);
            levels.copy_from_slice(trial);
        }
    }
    (best.1, -best.2)
}

/// Fits `x ≈ scale * level` with `level` in `-nmax..nmax` (the extra negative level is put
/// on the side of the largest-magnitude weight, so `scale` may be negative). Writes the
/// levels and returns the scale.
pub(crate) fn fit_scale_symmetric(x: &[f32], weights: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    debug_assert!(x.len() == weights.len() && x.len() == levels.len() && x.len() <= 32);
    let extreme = x
        .iter()
        .copied()
        .fold(0.0f32, |acc, v| if v.abs() > acc.abs() { v } else { acc });
    levels.fill(0);
    if extreme.abs() < 1e-30 {
        return 0.0;
    }
    let mut trial = [0i8; 32];
    let trial = &mut trial[..x.len()];
    let mut best = (f32::INFINITY, 0.0f32);
    for candidate in 0..CANDIDATES {
        let inv_step = -(nmax as f32 + FIRST_EXTRA + STEP * candidate as f32) / extreme;
        let (mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32);
        for ((level, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            let l = nearest_int(v * inv_step).clamp(-nmax, nmax - 1);
            *level = l as i8;
            let l = l as f32;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        if sum_l2 <= 0.0 {
            continue;
        }
        let scale = sum_xl / sum_l2;
        let err: f32 = trial
            .iter()
            .zip(x)
            .zip(weights)
            .map(|((&l, &v), &w)| {
                let diff = scale * l as f32 - v;
                w * diff * diff
            })
            .sum();
        if err < best.0 {
            best = (err, scale);
            levels.copy_from_slice(trial);
        }
    }
    best.1
}

/// Quantizes non-negative sub-block values to `0..=max_level` against one f16 factor.
/// Returns the factor (as stored, f16-rounded) and writes the levels.
pub(crate) fn quantize_unsigned(values: &[f32], max_level: u8, levels: &mut [u8]) -> f32 {
    let largest = values.iter().copied().fold(0.0f32, f32::max);
    levels.fill(0);
    // Rounding the factor to f16 first lets the levels absorb its rounding error.
    let factor = half::f16::from_f32(largest / max_level as f32).to_f32();
    if factor <= 0.0 || !factor.is_finite() {
        return 0.0;
    }
    for (level, &v) in levels.iter_mut().zip(values) {
        *level = nearest_int(v / factor).clamp(0, max_level as i32) as u8;
    }
    factor
}

/// Quantizes signed sub-block scales to `-nmax..nmax` against one f16 factor, the extra
/// negative level on the side of the largest magnitude. Returns the stored factor.
pub(crate) fn quantize_signed(values: &[f32], nmax: i32, levels: &mut [i32]) -> f32 {
    let extreme = values
        .iter()
        .copied()
        .fold(0.0f32, |acc, v| if v.abs() > acc.abs() { v } else { acc });
    levels.fill(0);
    let factor = half::f16::from_f32(-extreme / nmax as f32).to_f32();
    if factor == 0.0 || !factor.is_finite() {
        return 0.0;
    }
    for (level, &v) in levels.iter_mut().zip(values) {
        *level = nearest_int(v / factor).clamp(-nmax, nmax - 1);
    }
    factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(1e30), 4_194_303);
        assert_eq!(nearest_int(-1e30), -4_194_303);
        let mut v = -300.0f32;
        while v < 300.0 {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
            v += 0.125 + 1.0 / 1024.0;
        }
    }

    #[test]
    fn offset_fit_is_exact_on_a_grid() {
        // Values already on a 4-bit grid with offset: the fit must reproduce them.
        let x: Vec<f32> = (0..32).map(|i| 0.25 * (i % 16) as f32 - 1.0).collect();
        let w = vec![1.0; 32];
        let mut levels = [0u8; 32];
        let (scale, offset) = fit_scale_offset(&x, &w, 15, &mut levels);
        for (&l, &v) in levels.iter().zip(&x) {
            assert!(
                (scale * l as f32 - offset - v).abs() < 1e-5,
                "{scale} {offset}"
            );
        }
    }

    #[test]
    fn symmetric_fit_is_exact_on_a_grid() {
        let x: Vec<f32> = (0..16).map(|i| 0.5 * (i as f32 - 8.0)).collect();
        let w = vec![1.0; 16];
        let mut levels = [0i8; 16];
        let scale = fit_scale_symmetric(&x, &w, 32, &mut levels);
        for (&l, &v) in levels.iter().zip(&x) {
            assert!((scale * l as f32 - v).abs() < 1e-5);
        }
        assert_eq!(fit_scale_symmetric(&[0.0; 16], &w, 32, &mut levels), 0.0);
    }

    #[test]
    fn constant_negative_sub_block_is_carried_by_the_offset() {
        let x = [-0.75f32; 32];
        let mut levels = [9u8; 32];
        let (scale, offset) = fit_scale_offset(&x, &[1.0; 32], 15, &mut levels);
        assert_eq!((scale, offset), (0.0, 0.75));
        assert!(levels.iter().all(|&l| l == 0));
    }
}
