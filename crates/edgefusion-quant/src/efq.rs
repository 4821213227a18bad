//! Fitting weights to the EFQ format (`edgefusion_kernels::efq`): outlier selection, block
//! grids, per-tile bit widths and the final encoding.
//!
//! Quantizing one matrix `(n_out, n_in)` goes in three steps, so that GPTQ can run between
//! the second and the third:
//! 1. [`plan`]: take out the most sensitive weights as outliers, then fit every block's grid
//!    (scale, zero point) to the remaining weights for the tile widths chosen by
//!    `crate::allocate`. Grids are fixed from here on ("static groups").
//! 2. [`Plan::round`]: the nearest representable value of a weight — what RTN applies to
//!    every weight directly, and what GPTQ applies column by column to error-compensated
//!    weights.
//! 3. [`Plan::encode`]: codes of the final weights, as [`EfqParts`].
//!
//! Sensitivity is measured with per-column importances `h` (the diagonal of the calibration
//! Hessian `XᵀX`, or all ones without calibration): the output error a weight error `e` in
//! column c causes is ≈ `h_c · e²`.

use edgefusion_kernels::efq::{
    n_tiles, tile_cols, EfqParts, OUTLIER_MAX, SLOT_BYTES, TILE_COLS, TILE_ROWS,
};
use edgefusion_kernels::formats::{f16_bits, f16_to_f32};
use rayon::prelude::*;

pub use edgefusion_kernels::efq::WIDTHS;

/// Per-tile errors at each width of [`WIDTHS`], in that order.
pub type TileErrors = [f64; WIDTHS.len()];

/// Shrink factors tried when fitting a block's range: clipping the extremes a little often
/// lowers the total error (the same search llama.cpp's `make_qx_quants` and AWQ's clip run).
const SHRINKS: [f32; 12] = [
    1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.70, 0.66,
];

/// One block's grid: `value = scale · (code − zero)`, codes `0..2^bits`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub bits: u8,
    pub scale: f32,
    pub zero: u8,
}

impl Grid {
    fn max_code(self) -> i32 {
        (1 << self.bits) - 1
    }

    /// The code nearest to `v`.
    pub fn code(self, v: f32) -> u8 {
        if self.scale <= 0.0 {
            return self.zero;
        }
        ((v / self.scale).round() as i32 + self.zero as i32).clamp(0, self.max_code()) as u8
    }

    /// The value of `code`.
    pub fn value(self, code: u8) -> f32 {
        self.scale * (code as i32 - self.zero as i32) as f32
    }

    /// Σ h · (v − grid(v))² over a block.
    fn error(self, values: &[f32], h: &[f32]) -> f64 {
        values
            .iter()
            .zip(h)
            .map(|(&v, &w)| {
                let e = v - self.value(self.code(v));
                w as f64 * (e as f64) * (e as f64)
            })
            .sum()
    }
}

/// Best asymmetric grid of `bits` for `values` under importances `h`, searching shrunken
/// ranges; skipped positions (outliers) are given as `h = 0` and value 0.
pub fn fit_grid(values: &[f32], h: &[f32], bits: u8) -> (Grid, f64) {
    let (mut lo, mut hi) = (0.0f32, 0.0f32);
    for (&v, &w) in values.iter().zip(h) {
        if w > 0.0 {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    let levels = ((1u32 << bits) - 1) as f32;
    let mut best = (
        Grid {
            bits,
            scale: 0.0,
            zero: 0,
        },
        f64::INFINITY,
    );
    if hi <= lo {
        let grid = best.0;
        return (grid, grid.error(values, h));
    }
    for shrink in SHRINKS {
        let (a, b) = (lo * shrink, hi * shrink);
        let scale = (b - a) / levels;
        let zero = (-a / scale).round().clamp(0.0, levels) as u8;
        let grid = Grid { bits, scale, zero };
        let err = grid.error(values, h);
        if err < best.1 {
            best = (grid, err);
        }
    }
    best
}

/// A matrix's plan: outliers and every block's grid, fixed before the codes are chosen.
#[derive(Debug, Clone)]
pub struct Plan {
    pub n_out: usize,
    pub n_in: usize,
    /// (n_out / 16, n_tiles)
    pub widths: Vec<u8>,
    /// (n_out): f16 bits of each row scale `d_r`.
    pub(crate) row_scales: Vec<u16>,
    /// (n_out, n_tiles): the u8 block scales and the grids they stand for (`d_r · s`).
    pub(crate) block_scales: Vec<u8>,
    pub(crate) grids: Vec<Grid>,
    /// (n_out / 16): f16 bits of each group's outlier scale.
    outlier_scales: Vec<u16>,
    /// (n_out, n_in): each weight's 6-bit outlier code, 0 where it is not an outlier.
    pub(crate) outlier_codes: Vec<i8>,
    /// The blob's rotation word: 0, or `ROTATION_RHT64` when `w` was given as `W·R`.
    pub rotation: u32,
}

/// Chooses the outliers of `w (n_out, n_in)`: in every row, the `round(frac · n_in)` weights
/// with the largest `h_c · w²` (at most 255).
///
/// The same count in every row is what makes outliers cheap in EFQ: a row group stores as
/// many slots as its fullest row, so equal counts leave no padding and 0.5 % outliers cost
/// exactly 0.5 % × 24 bits. Ranking per row loses little against a per-matrix ranking,
/// because the sensitivity of LLM weights is dominated by input channels (columns with a
/// large `h_c`), which every row shares.
pub fn select_outliers(
    w: &[f32],
    n_out: usize,
    n_in: usize,
    h: &[f32],
    frac: f64,
) -> Vec<(u32, u32)> {
    let k = ((n_in as f64 * frac).round() as usize)
        .min(u8::MAX as usize)
        .min(n_in);
    if k == 0 || n_in > u16::MAX as usize + 1 {
        return Vec::new();
    }
    let mut picked = Vec::with_capacity(n_out * k);
    let mut scored: Vec<(f32, u32)> = Vec::with_capacity(n_in);
    for (r, row) in w.chunks_exact(n_in).enumerate().take(n_out) {
        scored.clear();
        scored.extend(
            row.iter()
                .zip(h)
                .enumerate()
                .map(|(c, (&v, &hc))| (hc * v * v, c as u32)),
        );
        scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        picked.extend(
            scored[..k]
                .iter()
                .filter(|s| s.0 > 0.0)
                .map(|&(_, c)| (r as u32, c)),
        );
    }
    picked.sort_unstable();
    picked
}

/// Per-tile errors of `w (n_out, n_in)` at each width of [`WIDTHS`] (outliers excluded), for
/// the bit allocator: `(n_out / 16 · n_tiles)` entries of `[err_2, err_3, …, err_8]`.
pub fn tile_errors(
    w: &[f32],
    n_out: usize,
    n_in: usize,
    h: &[f32],
    outliers: &[(u32, u32)],
) -> Vec<TileErrors> {
    let nt = n_tiles(n_in);
    let mask = outlier_mask(n_out, n_in, outliers);
    let mut errors = vec![[0.0; WIDTHS.len()]; (n_out / TILE_ROWS) * nt];
    // One row group per task; rows within a group add in order, so results do not depend
    // on the thread count.
    errors
        .par_chunks_mut(nt)
        .enumerate()
        .for_each(|(g, group)| {
            let mut values = [0.0f32; TILE_COLS];
            let mut weights = [0.0f32; TILE_COLS];
            for r in g * TILE_ROWS..(g + 1) * TILE_ROWS {
                for (t, e) in group.iter_mut().enumerate() {
                    let n = masked_block(w, h, &mask, n_in, r, t, &mut values, &mut weights);
                    for (k, &bits) in WIDTHS.iter().enumerate() {
                        e[k] += fit_grid(&values[..n], &weights[..n], bits).1;
                    }
                }
            }
        });
    errors
}

/// Row `r`'s block of tile `t` for fitting: its values and importances, outliers given
/// importance 0 (and value 0) so that the grid ignores them; returns the block's width.
#[allow(clippy::too_many_arguments)]
fn masked_block(
    w: &[f32],
    h: &[f32],
    mask: &[bool],
    n_in: usize,
    r: usize,
    t: usize,
    values: &mut [f32],
    weights: &mut [f32],
) -> usize {
    let cols = t * TILE_COLS..t * TILE_COLS + tile_cols(n_in, t);
    let n = cols.len();
    for (i, c) in cols.enumerate() {
        let skip = mask[r * n_in + c];
        values[i] = if skip { 0.0 } else { w[r * n_in + c] };
        // A tiny floor keeps columns the calibration never excited in the fit.
        weights[i] = if skip { 0.0 } else { h[c].max(1e-12) };
    }
    n
}

fn outlier_mask(n_out: usize, n_in: usize, outliers: &[(u32, u32)]) -> Vec<bool> {
    let mut mask = vec![false; n_out * n_in];
    for &(r, c) in outliers {
        mask[r as usize * n_in + c as usize] = true;
    }
    mask
}

/// Bytes a matrix stores besides its tiles, for the allocator: the blob header and index
/// sections plus the outlier slots (estimated from the outlier count per group).
pub fn fixed_bytes(n_out: usize, n_in: usize, outliers: &[(u32, u32)]) -> usize {
    let n_groups = n_out / TILE_ROWS;
    let mut per_row = vec![0usize; n_out];
    for &(r, _) in outliers {
        per_row[r as usize] += 1;
    }
    let slots: usize = per_row
        .chunks(TILE_ROWS)
        .map(|g| g.iter().copied().max().unwrap_or(0))
        .sum();
    20 + n_groups * n_tiles(n_in) + 2 * n_out + 3 * n_groups + 64 + slots * SLOT_BYTES
}

/// Fits every block's grid of `w (n_out, n_in)` for `widths`, outliers at `outliers`.
pub fn plan(
    w: &[f32],
    n_out: usize,
    n_in: usize,
    h: &[f32],
    widths: &[u8],
    outliers: &[(u32, u32)],
) -> Plan {
    let nt = n_tiles(n_in);
    let mask = outlier_mask(n_out, n_in, outliers);
    let mut grids = vec![
        Grid {
            bits: 2,
            scale: 0.0,
            zero: 0
        };
        n_out * nt
    ];
    {
        grids.par_chunks_mut(nt).enumerate().for_each(|(r, row)| {
            let mut values = [0.0f32; TILE_COLS];
            let mut weights = [0.0f32; TILE_COLS];
            for (t, grid) in row.iter_mut().enumerate() {
                let n = masked_block(w, h, &mask, n_in, r, t, &mut values, &mut weights);
                *grid = fit_grid(
                    &values[..n],
                    &weights[..n],
                    widths[(r / TILE_ROWS) * nt + t],
                )
                .0;
            }
        });
    }
    // Block scales to u8 under an f16 row scale; re-fit the zero point to the rounded scale.
    let mut row_scales = vec![0u16; n_out];
    let mut block_scales = vec![0u8; n_out * nt];
    for r in 0..n_out {
        let max = grids[r * nt..(r + 1) * nt]
            .iter()
            .fold(0.0f32, |m, g| m.max(g.scale));
        let d_bits = f16_bits(max / 255.0);
        let d = f16_to_f32(d_bits.to_le_bytes());
        row_scales[r] = d_bits;
        for t in 0..nt {
            let (g, s) = snap_scale(grids[r * nt + t], d);
            grids[r * nt + t] = g;
            block_scales[r * nt + t] = s;
        }
    }
    // Outlier values: 6 bits under one f16 scale per row group. `outliers` is sorted by
    // row, so each group's outliers are one run; groups without any keep scale 0.
    let mut outlier_scales = vec![0u16; n_out / TILE_ROWS];
    let mut outlier_codes = vec![0i8; n_out * n_in];
    for in_group in outliers.chunk_by(|a, b| a.0 as usize / TILE_ROWS == b.0 as usize / TILE_ROWS) {
        let g = in_group[0].0 as usize / TILE_ROWS;
        let max = in_group.iter().fold(0.0f32, |m, &(r, c)| {
            m.max(w[r as usize * n_in + c as usize].abs())
        });
        outlier_scales[g] = f16_bits(max / OUTLIER_MAX as f32);
        let gs = f16_to_f32(outlier_scales[g].to_le_bytes());
        if gs > 0.0 {
            for &(r, c) in in_group {
                let i = r as usize * n_in + c as usize;
                // 0 (an outlier too small for the scale) means "not an outlier".
                outlier_codes[i] = (w[i] / gs)
                    .round()
                    .clamp(-(OUTLIER_MAX as f32), OUTLIER_MAX as f32)
                    as i8;
            }
        }
    }
    Plan {
        n_out,
        n_in,
        widths: widths.to_vec(),
        row_scales,
        block_scales,
        grids,
        outlier_scales,
        outlier_codes,
        rotation: 0,
    }
}

/// `grid` with its scale rounded to `d · s` for a u8 `s`, and its zero point re-fitted so
/// that the grid's lower end stays where it was; returns the grid and `s`.
fn snap_scale(mut g: Grid, d: f32) -> (Grid, u8) {
    let s = if d > 0.0 {
        (g.scale / d).round().clamp(0.0, 255.0)
    } else {
        0.0
    };
    let rounded = d * s;
    if g.scale > 0.0 && rounded > 0.0 {
        // zero = −low / scale
        let low = -(g.zero as f32) * g.scale;
        g.zero = (-low / rounded).round().clamp(0.0, g.max_code() as f32) as u8;
    }
    g.scale = rounded;
    (g, s as u8)
}

impl Plan {
    /// The value weight `(r, c)` is stored as when it is `v`: its outlier value, or the nearest
    /// point of its block's grid.
    pub fn round(&self, r: usize, c: usize, v: f32) -> f32 {
        let outlier = self.outlier_codes[r * self.n_in + c];
        if outlier != 0 {
            let gs = f16_to_f32(self.outlier_scales[r / TILE_ROWS].to_le_bytes());
            return gs * outlier as f32;
        }
        let grid = self.grids[r * n_tiles(self.n_in) + c / TILE_COLS];
        grid.value(grid.code(v))
    }

    /// Codes of `w (n_out, n_in)` (usually already rounded by [`Plan::round`] or GPTQ) as
    /// EFQ parts; outlier positions take the zero point so that only the outlier counts.
    pub fn encode(&self, w: &[f32]) -> EfqParts {
        let (n_out, n_in, nt) = (self.n_out, self.n_in, n_tiles(self.n_in));
        let mut codes = vec![0u8; n_out * n_in];
        let mut zeros = vec![0u8; n_out * nt];
        for r in 0..n_out {
            for t in 0..nt {
                zeros[r * nt + t] = self.grids[r * nt + t].zero;
            }
            for c in 0..n_in {
                let grid = self.grids[r * nt + c / TILE_COLS];
                codes[r * n_in + c] = if self.outlier_codes[r * n_in + c] != 0 {
                    grid.zero
                } else {
                    grid.code(w[r * n_in + c])
                };
            }
        }
        EfqParts {
            n_out,
            n_in,
            widths: self.widths.clone(),
            row_scales: self.row_scales.clone(),
            block_scales: self.block_scales.clone(),
            zeros,
            codes,
            outlier_scales: self.outlier_scales.clone(),
            // Row-major scan: sorted by (row, col), as the outliers were selected.
            outliers: self
                .outlier_codes
                .iter()
                .enumerate()
                .filter(|&(_, &v)| v != 0)
                .map(|(i, &v)| ((i / n_in) as u32, (i % n_in) as u32, v))
                .collect(),
            rotation: self.rotation,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use edgefusion_kernels::efq::EfqMatrix;

    /// A fixed test vector: Gaussian-like weights with a few heavy outliers, as in LLM rows.
    pub(crate) fn test_matrix(n_out: usize, n_in: usize) -> Vec<f32> {
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32
        };
        (0..n_out * n_in)
            .map(|i| {
                // Sum of 4 uniforms ≈ Gaussian; every 211th weight is 8x larger.
                let g = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
                let row_scale = 0.02 * (1.0 + (i / n_in % 7) as f32 * 0.2);
                g * row_scale * if i % 211 == 0 { 8.0 } else { 1.0 }
            })
            .collect()
    }

    fn rmse(a: &[f32], b: &[f32]) -> f64 {
        (a.iter()
            .zip(b)
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64)
            .sqrt()
    }

    fn dequantized(parts: &EfqParts) -> Vec<f32> {
        let bytes = parts.to_bytes().unwrap();
        let m = EfqMatrix::parse(&bytes).unwrap();
        let mut out = vec![0.0; m.n_out * m.n_in];
        for (r, row) in out.chunks_mut(m.n_in).enumerate() {
            m.dequantize_row(r, row);
        }
        out
    }

    /// Named RMSE limits per uniform width on the fixed test vector (relative to the
    /// weights' RMS), with and without 0.5 % outliers; outliers must help.
    #[test]
    fn uniform_widths_meet_their_rmse_limits() {
        let (n_out, n_in) = (64, 576);
        let w = test_matrix(n_out, n_in);
        let rms = (w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        let h = vec![1.0f32; n_in];
        let nt = n_tiles(n_in);
        // Limits sit ~5 % above what this fitter reaches; the plain ones are high because
        // every 211th weight is an 8σ outlier that stretches its block's range.
        for (bits, limit_plain, limit_outliers) in [
            (2u8, 0.50, 0.33),
            (3, 0.28, 0.16),
            (4, 0.145, 0.082),
            (5, 0.07, 0.042),
            (6, 0.035, 0.024),
            (8, 0.0088, 0.0134),
        ] {
            let widths = vec![bits; n_out / TILE_ROWS * nt];
            let mut results = Vec::new();
            for frac in [0.0, 0.005] {
                let outliers = select_outliers(&w, n_out, n_in, &h, frac);
                let p = plan(&w, n_out, n_in, &h, &widths, &outliers);
                let rounded: Vec<f32> = (0..n_out * n_in)
                    .map(|i| p.round(i / n_in, i % n_in, w[i]))
                    .collect();
                let parts = p.encode(&rounded);
                let back = dequantized(&parts);
                // What the kernels see equals what `round` promised.
                for (a, b) in back.iter().zip(&rounded) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                }
                results.push(rmse(&back, &w) / rms);
            }
            eprintln!(
                "{bits}-bit relative RMSE: {:.4} plain, {:.4} with outliers",
                results[0], results[1]
            );
            assert!(
                results[0] < limit_plain,
                "{bits}-bit RMSE {:.4} ≥ {limit_plain}",
                results[0]
            );
            assert!(
                results[1] < limit_outliers,
                "{bits}-bit + outliers RMSE {:.4} ≥ {limit_outliers}",
                results[1]
            );
            // 6-bit outliers are coarser than 8-bit tiles: they help up to 6 bits.
            if bits <= 6 {
                assert!(results[1] < results[0]);
            }
        }
    }
}
