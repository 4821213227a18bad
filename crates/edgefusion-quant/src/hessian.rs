//! Calibration statistics of one linear layer: `H = XᵀX = Σ_t x_t x_tᵀ` over the layer's
//! inputs `x_t` (one row per calibration token), the Hessian of the layer-wise squared error
//! that GPTQ minimizes (Frantar et al., 2022, §3: `H = 2XXᵀ` in their column convention; the
//! factor 2 and the normalization do not change GPTQ's result).
//!
//! Rows arrive in batches of any size. Each batch is cut into chunks of `CHUNK_ROWS` (256)
//! rows whose `XᵀX` is computed in f32 and then added into an f64 sum, so f32 rounding covers
//! at most `CHUNK_ROWS` products per entry. The f32 product runs on the tiled f32 matmul of
//! `edgefusion-kernels`, which dispatches to AVX2/AVX-512 FMA kernels at run time: the
//! workspace builds for baseline x86-64, where auto-vectorized Rust loops only get SSE2 and
//! measured ~3x slower on this kernel. Row panels of `H` run in parallel (rayon), and only
//! the upper triangle is computed; [`Hessian::mean`] mirrors it.

use edgefusion_kernels::{matmul, GgmlType};
use rayon::prelude::*;

use crate::QuantError;

/// Rows of `X` whose `XᵀX` is summed in f32 before it joins the f64 sum.
const CHUNK_ROWS: usize = 256;

/// Rows of `H` per parallel task.
const PANEL_ROWS: usize = 32;

/// The running sum `Σ_t x_t x_tᵀ` of a linear layer's inputs `x_t` (each of length `n`,
/// the layer's `n_in`).
#[derive(Clone)]
pub struct Hessian {
    n: usize,
    /// (n, n) row-major; `sum[i·n + j] = Σ_t x_t[i] · x_t[j]` for `i ≤ j` (the upper
    /// triangle). The lower triangle is never written and stays zero.
    pub(crate) sum: Vec<f64>,
    n_rows: usize,
}

impl std::fmt::Debug for Hessian {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hessian")
            .field("n", &self.n)
            .field("n_rows", &self.n_rows)
            .finish_non_exhaustive()
    }
}

impl Hessian {
    /// An empty sum for inputs of length `n`; holds `n²` f64 values.
    pub fn new(n: usize) -> Self {
        Hessian {
            n,
            sum: vec![0.0; n * n],
            n_rows: 0,
        }
    }

    /// The statistics of the rotated input `x·R` (`edgefusion_kernels::hadamard`):
    /// `Rᵀ·H·R`, for matrices stored rotated. `n` must be a multiple of 64.
    pub fn rotated(&self) -> Hessian {
        use edgefusion_kernels::hadamard;
        let n = self.n;
        // Rows of the full symmetric matrix, each right-multiplied by R: H·R.
        let mut hr = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                hr[i * n + j] = self.sum[i.min(j) * n + i.max(j)];
            }
            hadamard::rotate(&mut hr[i * n..(i + 1) * n], 0);
        }
        // (H·R)ᵀ·R = Rᵀ·H·R: transpose, then rows times R again.
        let mut out = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                out[j * n + i] = hr[i * n + j];
            }
        }
        for row in out.chunks_exact_mut(n) {
            hadamard::rotate(row, 0);
        }
        // Keep the upper triangle (symmetrized against rounding), as `add_rows` does.
        let mut sum = vec![0.0f64; n * n];
        for i in 0..n {
            for j in i..n {
                sum[i * n + j] = 0.5 * (out[i * n + j] + out[j * n + i]);
            }
        }
        Hessian {
            n,
            sum,
            n_rows: self.n_rows,
        }
    }

    /// Input length (`n_in` of the layer).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Rows (calibration tokens) added so far.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Adds `Σ_t x_t x_tᵀ` over the `n_rows` rows of `x`, `(n_rows, n)` row-major.
    ///
    /// The whole batch is checked before anything is added: on error the sum is unchanged.
    ///
    /// # Errors
    /// [`QuantError::Shape`] if `x.len() != n_rows · n`; [`QuantError::NonFinite`] if `x`
    /// holds a NaN or an infinity.
    pub fn add_rows(&mut self, x: &[f32], n_rows: usize) -> Result<(), QuantError> {
        let n = self.n;
        let expected = n_rows.saturating_mul(n);
        if x.len() != expected {
            return Err(QuantError::Shape {
                what: "Hessian::add_rows input (n_rows, n)".into(),
                expected,
                found: x.len(),
            });
        }
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                what: "Hessian::add_rows input".into(),
                index,
            });
        }
        if n > 0 {
            // (n, m) f32 as little-endian bytes: feature c's values over the chunk's rows, the
            // layout the matmul takes for both operands.
            let mut x_t = Vec::new();
            for chunk in x.chunks(CHUNK_ROWS * n) {
                let m = chunk.len() / n;
                transpose_to_bytes(chunk, m, n, &mut x_t);
                self.add_chunk(&x_t, m);
            }
        }
        self.n_rows += n_rows;
        Ok(())
    }

    /// Adds the upper triangle of one chunk's `XᵀX`, given `x_t` `(n, m)` as f32 bytes.
    fn add_chunk(&mut self, x_t: &[u8], m: usize) {
        let n = self.n;
        let feature_bytes = 4 * m;
        self.sum
            .par_chunks_mut(PANEL_ROWS * n)
            .enumerate()
            .for_each_init(Vec::new, |panel, (p, sum_rows)| {
                let i0 = p * PANEL_ROWS;
                let rows = sum_rows.len() / n;
                // Columns i0.. of the panel's rows: the upper triangle plus the lower half
                // of the panel's diagonal block, which is computed but not added.
                let width = n - i0;
                // (rows, width): panel[t·width + c] = Σ_s x[s][i0 + t] · x[s][i0 + c]
                panel.clear();
                panel.resize(rows * width, 0.0f32);
                matmul(
                    GgmlType::F32,
                    m,
                    &x_t[i0 * feature_bytes..],
                    width,
                    &x_t[i0 * feature_bytes..(i0 + rows) * feature_bytes],
                    rows,
                    panel,
                    width,
                );
                for (t, (sum_row, panel_row)) in sum_rows
                    .chunks_exact_mut(n)
                    .zip(panel.chunks_exact(width))
                    .enumerate()
                {
                    for (s, &v) in sum_row[i0 + t..].iter_mut().zip(&panel_row[t..]) {
                        *s += f64::from(v);
                    }
                }
            });
    }

    /// `Σ_t x_t x_tᵀ / n_rows`, `(n, n)` row-major and symmetric; all zeros while no rows
    /// have been added.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.n;
        let scale = if self.n_rows > 0 {
            1.0 / self.n_rows as f64
        } else {
            0.0
        };
        let mut mean = vec![0.0; n * n];
        // Tile by tile, so that the mirrored (column-wise) writes stay in cache.
        const TILE: usize = 32;
        for i0 in (0..n).step_by(TILE) {
            for j0 in (i0..n).step_by(TILE) {
                for i in i0..(i0 + TILE).min(n) {
                    for j in j0.max(i)..(j0 + TILE).min(n) {
                        let v = self.sum[i * n + j] * scale;
                        mean[i * n + j] = v;
                        mean[j * n + i] = v;
                    }
                }
            }
        }
        mean
    }

    /// The diagonal of [`Hessian::mean`], `(n,)`: the mean of `x_t[j]²` over the rows.
    pub fn diag(&self) -> Vec<f64> {
        let scale = if self.n_rows > 0 {
            1.0 / self.n_rows as f64
        } else {
            0.0
        };
        (0..self.n)
            .map(|j| self.sum[j * self.n + j] * scale)
            .collect()
    }
}

/// Writes `x` `(m, n)` transposed into `x_t` `(n, m)` as little-endian f32 bytes.
fn transpose_to_bytes(x: &[f32], m: usize, n: usize, x_t: &mut Vec<u8>) {
    x_t.clear();
    x_t.resize(4 * m * n, 0);
    for (c, feature) in x_t.chunks_exact_mut(4 * m).enumerate() {
        for (s, bytes) in feature.chunks_exact_mut(4).enumerate() {
            bytes.copy_from_slice(&x[s * n + c].to_le_bytes());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Entries agree with the f64 reference to this fraction of `sqrt(H_ii · H_jj)` (the
    /// Cauchy–Schwarz bound of `|H_ij|`): f32 sums of at most `CHUNK_ROWS` products.
    const REL_TOL: f64 = 1e-5;

    /// xorshift32 → uniform in [-1, 1).
    pub(crate) struct Rng(u32);

    impl Rng {
        pub(crate) fn new(seed: u32) -> Self {
            Rng(seed.max(1))
        }
        pub(crate) fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            (self.0 >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        }
    }

    /// Naive `Σ_t x_t x_tᵀ` in f64, `(n, n)`.
    fn reference(x: &[f32], n_rows: usize, n: usize) -> Vec<f64> {
        let mut h = vec![0.0f64; n * n];
        for t in 0..n_rows {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += f64::from(x[t * n + i]) * f64::from(x[t * n + j]);
                }
            }
        }
        h
    }

    fn assert_close(mean: &[f64], reference_sum: &[f64], n_rows: usize, n: usize) {
        for i in 0..n {
            for j in 0..n {
                let want = reference_sum[i * n + j] / n_rows as f64;
                let scale =
                    (reference_sum[i * n + i] * reference_sum[j * n + j]).sqrt() / n_rows as f64;
                let got = mean[i * n + j];
                assert!(
                    (got - want).abs() <= REL_TOL * scale,
                    "H[{i}][{j}]: {got} vs {want} (scale {scale})"
                );
            }
        }
    }

    /// `rotated()` is the statistics of the rotated inputs `x·R`, summed directly.
    #[test]
    fn rotated_equals_the_sum_over_rotated_inputs() {
        let mut rng = Rng::new(11);
        let (n, n_rows) = (192, 400);
        // Heavy channels, as in LLM activations: the rotation spreads them.
        let x: Vec<f32> = (0..n_rows * n)
            .map(|k| rng.next_f32() * if k % n == 5 { 20.0 } else { 1.0 } + 0.2)
            .collect();
        let mut xr = x.clone();
        for row in xr.chunks_exact_mut(n) {
            edgefusion_kernels::hadamard::rotate(row, 0);
        }
        let mut hessian = Hessian::new(n);
        hessian.add_rows(&x, n_rows).unwrap();
        let rotated = hessian.rotated();
        assert_eq!(rotated.n_rows(), n_rows);
        assert_close(&rotated.mean(), &reference(&xr, n_rows, n), n_rows, n);
        // The trace (total input energy) is unchanged; the heavy channel is spread out.
        let trace = |d: Vec<f64>| d.iter().sum::<f64>();
        let (before, after) = (hessian.diag(), rotated.diag());
        assert!(
            (trace(before.clone()) - trace(after.clone())).abs() < 1e-6 * trace(before.clone())
        );
        let peak = |d: &[f64]| {
            d.iter().cloned().fold(0.0, f64::max) / (d.iter().sum::<f64>() / d.len() as f64)
        };
        assert!(
            peak(&after) < 0.25 * peak(&before),
            "{} vs {}",
            peak(&after),
            peak(&before)
        );
    }

    #[test]
    fn matches_naive_f64_sum_on_odd_sizes() {
        let mut rng = Rng::new(7);
        for &(n, n_rows) in &[(1, 300), (7, 301), (130, 517), (33, 1)] {
            // Features of different scales and a shared offset, so entries differ in size.
            let x: Vec<f32> = (0..n_rows * n)
                .map(|k| (1.0 + (k % n) as f32 * 0.1) * rng.next_f32() + 0.3)
                .collect();
            let mut hessian = Hessian::new(n);
            hessian.add_rows(&x, n_rows).unwrap();
            assert_eq!(hessian.n_rows(), n_rows);
            let reference_sum = reference(&x, n_rows, n);
            let mean = hessian.mean();
            assert_close(&mean, &reference_sum, n_rows, n);
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(mean[i * n + j], mean[j * n + i], "mean not symmetric");
                }
                assert_eq!(hessian.diag()[i], mean[i * n + i]);
            }
        }
    }

    #[test]
    fn batches_add_up_to_one_call() {
        let (n, n_rows) = (19, 400);
        let mut rng = Rng::new(11);
        let x: Vec<f32> = (0..n_rows * n).map(|_| rng.next_f32()).collect();
        let mut hessian = Hessian::new(n);
        let mut start = 0;
        for batch in [1, 3, 250, 146] {
            hessian
                .add_rows(&x[start * n..(start + batch) * n], batch)
                .unwrap();
            start += batch;
        }
        assert_eq!(hessian.n_rows(), n_rows);
        assert_close(&hessian.mean(), &reference(&x, n_rows, n), n_rows, n);
    }

    #[test]
    fn rejects_bad_input_and_keeps_the_sum() {
        let mut hessian = Hessian::new(3);
        hessian.add_rows(&[1.0, 2.0, 3.0], 1).unwrap();
        let before = hessian.mean();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = hessian.add_rows(&[1.0, 2.0, 3.0, 4.0, bad, 6.0], 2);
            assert!(
                matches!(err, Err(QuantError::NonFinite { index: 4, .. })),
                "{err:?}"
            );
        }
        let err = hessian.add_rows(&[1.0; 5], 2);
        assert!(
            matches!(
                err,
                Err(QuantError::Shape {
                    expected: 6,
                    found: 5,
                    ..
                })
            ),
            "{err:?}"
        );
        assert_eq!(hessian.n_rows(), 1);
        assert_eq!(hessian.mean(), before);
    }

    #[test]
    fn empty_and_zero_width() {
        let hessian = Hessian::new(4);
        assert!(hessian.mean().iter().all(|&v| v == 0.0));
        let mut zero_width = Hessian::new(0);
        zero_width.add_rows(&[], 10).unwrap();
        assert_eq!(zero_width.n_rows(), 10);
        assert!(zero_width.mean().is_empty());
    }

    /// Throughput of `add_rows` for n = 1536, 4096 rows (the upper triangle's flops:
    /// n·(n+1)/2 multiply-adds per row). Run with
    /// `cargo test --release -p edgefusion-quant -- --ignored --nocapture hessian_throughput`.
    #[test]
    #[ignore = "timing; run by hand"]
    fn hessian_throughput() {
        let (n, n_rows) = (1536, 4096);
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..n_rows * n).map(|_| rng.next_f32()).collect();
        let mut hessian = Hessian::new(n);
        hessian.add_rows(&x[..CHUNK_ROWS * n], CHUNK_ROWS).unwrap(); // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = std::time::Instant::now();
            hessian.add_rows(&x, n_rows).unwrap();
            best = best.min(start.elapsed().as_secs_f64());
        }
        let flops = (n * (n + 1)) as f64 * n_rows as f64;
        println!(
            "Hessian::add_rows n = {n}, {n_rows} rows, {} threads: {:.1} ms, {:.1} GFLOP/s",
            rayon::current_num_threads(),
            best * 1e3,
            flops / best / 1e9
        );
    }
}
