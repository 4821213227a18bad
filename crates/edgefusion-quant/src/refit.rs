//! Scale refitting: once GPTQ has chosen every code, each row's block scales are solved
//! again, by least squares against the layer's input statistics, with the codes and zero
//! points fixed (the layer-wise reconstruction step of OmniQuant / EfficientQAT, in closed
//! form). GPTQ fixes the grids before it rounds; afterwards the codes it chose are often
//! better served by slightly different scales, and the output error `(w − ŵ)ᵀ H (w − ŵ)`
//! is a quadratic in them.
//!
//! For row `r` with codes `u_c = q_c − z_t` (column c in tile t) the stored row is
//! `ŵ_c = a_t · u_c`, so with `M[t][s] = Σ_{c∈t, c'∈s} u_c H[c][c'] u_c'` and
//! `b[t] = Σ_{c∈t} u_c (H w)_c` the error is `wᵀHw − 2 aᵀb + aᵀMa`, least at `M a = b`.
//! The solution is then stored as the format stores scales (an f16 row scale and u8 block
//! scales), and kept only where that rounded solution beats the scales GPTQ used.

use rayon::prelude::*;

use edgefusion_kernels::efq::{n_tiles, tile_cols, TILE_COLS};
use edgefusion_kernels::formats::{f16_bits, f16_to_f32};

use crate::efq::Plan;

/// What refitting did to one matrix.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RefitReport {
    /// Σ over rows of `(w − ŵ)ᵀ H (w − ŵ)` with GPTQ's scales, then with the refitted ones.
    pub error_before: f64,
    pub error_after: f64,
    /// Rows whose scales changed.
    pub rows_changed: usize,
}

/// One row's refit: its new f16 row scale and u8 block scales, if they lower its error,
/// and the row's values as they now store.
struct RowRefit {
    row_scale: u16,
    block_scales: Vec<u8>,
    values: Vec<f32>,
}

/// Refits the block scales of `plan` for the matrix `w (n_out, n_in)` whose values as
/// rounded by GPTQ (on `plan`'s grids) are `rounded`, under `h`, the full symmetric
/// `(n_in, n_in)` input statistics (`Hessian::mean`). Updates `plan` and returns the values
/// as now stored (the input to `Plan::encode`) with a report.
pub fn refit_scales(
    plan: &mut Plan,
    w: &[f32],
    rounded: &[f32],
    h: &[f64],
) -> (Vec<f32>, RefitReport) {
    let (n_out, n_in, nt) = (plan.n_out, plan.n_in, n_tiles(plan.n_in));
    assert_eq!(w.len(), n_out * n_in, "refit: w is not (n_out, n_in)");
    assert_eq!(
        rounded.len(),
        n_out * n_in,
        "refit: rounded is not (n_out, n_in)"
    );
    assert_eq!(h.len(), n_in * n_in, "refit: H is not (n_in, n_in)");
    let results: Vec<(f64, f64, Option<RowRefit>)> = (0..n_out)
        .into_par_iter()
        .map(|r| {
            refit_row(
                plan,
                r,
                &w[r * n_in..][..n_in],
                &rounded[r * n_in..][..n_in],
                h,
            )
        })
        .collect();
    let mut out = rounded.to_vec();
    let mut report = RefitReport::default();
    for (r, (before, after, refit)) in results.into_iter().enumerate() {
        report.error_before += before;
        report.error_after += after;
        let Some(refit) = refit else { continue };
        report.rows_changed += 1;
        plan.row_scales[r] = refit.row_scale;
        let d = f16_to_f32(refit.row_scale.to_le_bytes());
        for t in 0..nt {
            plan.block_scales[r * nt + t] = refit.block_scales[t];
            plan.grids[r * nt + t].scale = d * refit.block_scales[t] as f32;
        }
        out[r * n_in..][..n_in].copy_from_slice(&refit.values);
    }
    (out, report)
}

/// `q − z` of a value on a grid of step `scale`.
fn code_offset(value: f32, scale: f32) -> f32 {
    if scale > 0.0 {
        (value / scale).round()
    } else {
        0.0
    }
}

/// Row `r`: its error before and after, and the new scales if they are better.
fn refit_row(
    plan: &Plan,
    r: usize,
    w: &[f32],
    rounded: &[f32],
    h: &[f64],
) -> (f64, f64, Option<RowRefit>) {
    let (n_in, nt) = (plan.n_in, n_tiles(plan.n_in));
    let tile_of = |c: usize| c / TILE_COLS;
    // The target and u_c. An outlier's stored value does not depend on the scales: its
    // code offset is 0 and its target is its fixed residual `w − outlier`.
    let mut target = vec![0.0f64; n_in];
    let mut u = vec![0.0f64; n_in];
    for c in 0..n_in {
        if plan.outlier_codes[r * n_in + c] != 0 {
            target[c] = w[c] as f64 - rounded[c] as f64;
        } else {
            target[c] = w[c] as f64;
            u[c] = code_offset(rounded[c], plan.grids[r * nt + tile_of(c)].scale) as f64;
        }
    }
    // hw = H·target; g[c][s] = Σ_{c'∈s} H[c][c'] u_c'.
    let mut hw = vec![0.0f64; n_in];
    let mut g = vec![0.0f64; n_in * nt];
    for c in 0..n_in {
        let row = &h[c * n_in..][..n_in];
        hw[c] = row.iter().zip(&target).map(|(a, b)| a * b).sum();
        for s in 0..nt {
            let cols = s * TILE_COLS..s * TILE_COLS + tile_cols(n_in, s);
            g[c * nt + s] = row[cols.clone()]
                .iter()
                .zip(&u[cols])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    let whw: f64 = target.iter().zip(&hw).map(|(a, b)| a * b).sum();
    let mut m = vec![0.0f64; nt * nt];
    let mut b = vec![0.0f64; nt];
    for c in 0..n_in {
        let t = tile_of(c);
        if u[c] != 0.0 {
            b[t] += u[c] * hw[c];
            for s in 0..nt {
                m[t * nt + s] += u[c] * g[c * nt + s];
            }
        }
    }
    let error = |a: &[f64]| -> f64 {
        let mut e = whw;
        for t in 0..nt {
            e -= 2.0 * a[t] * b[t];
            for s in 0..nt {
                e += a[t] * m[t * nt + s] * a[s];
            }
        }
        e.max(0.0)
    };
    let old: Vec<f64> = (0..nt)
        .map(|t| plan.grids[r * nt + t].scale as f64)
        .collect();
    let before = error(&old);
    // Tiles whose codes are all at the zero point have no say: they keep their scale.
    let free: Vec<usize> = (0..nt).filter(|&t| m[t * nt + t] > 0.0).collect();
    let Some(solved) = solve_free(&m, &b, &old, &free, nt) else {
        return (before, before, None);
    };
    // Store as the format does: an f16 row scale, u8 block scales under it.
    let max = solved.iter().cloned().fold(0.0f64, f64::max);
    if max <= 0.0 {
        return (before, before, None);
    }
    let row_scale = f16_bits((max / 255.0) as f32);
    let d = f16_to_f32(row_scale.to_le_bytes()) as f64;
    if d <= 0.0 {
        return (before, before, None);
    }
    let block_scales: Vec<u8> = solved
        .iter()
        .map(|&a| (a / d).round().clamp(0.0, 255.0) as u8)
        .collect();
    let stored: Vec<f64> = block_scales
        .iter()
        .map(|&s| (d as f32 * s as f32) as f64)
        .collect();
    let after = error(&stored);
    if after < before {
        let values = (0..n_in)
            .map(|c| {
                if plan.outlier_codes[r * n_in + c] != 0 {
                    rounded[c]
                } else {
                    (d as f32 * block_scales[tile_of(c)] as f32) * u[c] as f32
                }
            })
            .collect();
        (
            before,
            after,
            Some(RowRefit {
                row_scale,
                block_scales,
                values,
            }),
        )
    } else {
        (before, before, None)
    }
}

/// Solves `M a = b` over the `free` tiles, the others held at `fixed`; `None` if the
/// system is singular or a solved scale is not positive.
fn solve_free(m: &[f64], b: &[f64], fixed: &[f64], free: &[usize], nt: usize) -> Option<Vec<f64>> {
    let k = free.len();
    if k == 0 {
        return None;
    }
    // Reduced system: A x = y with the fixed tiles moved to the right-hand side.
    let mut a = vec![0.0f64; k * k];
    let mut y = vec![0.0f64; k];
    for (i, &t) in free.iter().enumerate() {
        y[i] = b[t];
        for s in 0..nt {
            if !free.contains(&s) {
                y[i] -= m[t * nt + s] * fixed[s];
            }
        }
        for (j, &s) in free.iter().enumerate() {
            a[i * k + j] = m[t * nt + s];
        }
    }
    // Cholesky (M is a Gram matrix: symmetric, positive semi-definite); a relative ridge
    // keeps nearly dependent tiles solvable.
    let ridge = 1e-9 * (0..k).map(|i| a[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        a[i * k + i] += ridge;
    }
    for j in 0..k {
        let mut diag = a[j * k + j];
        for p in 0..j {
            diag -= a[j * k + p] * a[j * k + p];
        }
        if diag <= 0.0 {
            return None;
        }
        let diag = diag.sqrt();
        a[j * k + j] = diag;
        for i in j + 1..k {
            let mut v = a[i * k + j];
            for p in 0..j {
                v -= a[i * k + p] * a[j * k + p];
            }
            a[i * k + j] = v / diag;
        }
    }
    // L z = y, then Lᵀ x = z.
    let mut x = y;
    for i in 0..k {
        for p in 0..i {
            x[i] -= a[i * k + p] * x[p];
        }
        x[i] /= a[i * k + i];
    }
    for i in (0..k).rev() {
        for p in i + 1..k {
            x[i] -= a[p * k + i] * x[p];
        }
        x[i] /= a[i * k + i];
    }
    let mut out = fixed.to_vec();
    for (i, &t) in free.iter().enumerate() {
        if !(x[i].is_finite() && x[i] > 0.0) {
            return None;
        }
        out[t] = x[i];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::efq::plan;
    use edgefusion_kernels::efq::{EfqMatrix, TILE_ROWS};

    /// A small block (16 rows × 256 columns, 3-bit tiles) with correlated inputs: after
    /// rounding on the fitted grids, refitting lowers the output error `Σ (x·(w − ŵ))²`
    /// measured on the inputs themselves, and the blob stores exactly the refitted values.
    #[test]
    fn refitting_lowers_a_blocks_output_error() {
        let (n_out, n_in, n_tok) = (TILE_ROWS, 256, 512);
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let w: Vec<f32> = (0..n_out * n_in).map(|_| next() as f32).collect();
        // Inputs with a shared component (correlated columns) and uneven column scales.
        let x: Vec<f64> = (0..n_tok)
            .flat_map(|_| {
                let common = next();
                (0..n_in)
                    .map(|c| (1.0 + (c % 7) as f64) * (0.3 * next() + common))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut h = vec![0.0f64; n_in * n_in];
        for t in 0..n_tok {
            let row = &x[t * n_in..][..n_in];
            for i in 0..n_in {
                for j in 0..n_in {
                    h[i * n_in + j] += row[i] * row[j] / n_tok as f64;
                }
            }
        }
        let diag: Vec<f32> = (0..n_in).map(|c| h[c * n_in + c] as f32).collect();
        let widths = vec![3u8; n_in.div_ceil(TILE_COLS)];
        let mut p = plan(&w, n_out, n_in, &diag, &widths, &[]);
        let rounded: Vec<f32> = (0..n_out * n_in)
            .map(|i| p.round(i / n_in, i % n_in, w[i]))
            .collect();
        let output_error = |v: &[f32]| -> f64 {
            (0..n_tok)
                .map(|t| {
                    (0..n_out)
                        .map(|r| {
                            let d: f64 = (0..n_in)
                                .map(|c| {
                                    (w[r * n_in + c] - v[r * n_in + c]) as f64 * x[t * n_in + c]
                                })
                                .sum();
                            d * d
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let (refitted, report) = refit_scales(&mut p, &w, &rounded, &h);
        let (before, after) = (output_error(&rounded), output_error(&refitted));
        assert!(report.rows_changed > 0, "{report:?}");
        assert!(
            after < 0.95 * before,
            "output error {before} -> {after} ({report:?})"
        );
        // The report's errors are the same quantity (per token, H being a mean).
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
        assert!(
            rel(report.error_before, before / n_tok as f64) < 1e-6,
            "{report:?} {before}"
        );
        assert!(
            rel(report.error_after, after / n_tok as f64) < 1e-6,
            "{report:?} {after}"
        );
        // What the blob stores is what refitting returned.
        let bytes = p.encode(&refitted).to_bytes().unwrap();
        let m = EfqMatrix::parse(&bytes).unwrap();
        let mut row = vec![0.0f32; n_in];
        for r in 0..n_out {
            m.dequantize_row(r, &mut row);
            for c in 0..n_in {
                let want = refitted[r * n_in + c];
                assert!(
                    (row[c] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "({r}, {c})"
                );
            }
        }
    }
}
