//! GPTQ: column-by-column quantization with inverse-Hessian error compensation (Frantar et
//! al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", Algorithm 1, with the details of their reference implementation: dead
//! columns, damping relative to the mean diagonal, lazy batch updates, act-order).
//!
//! The grid is not chosen here: the caller passes a closure that rounds one weight to the
//! grid of its (row, column), fixed before compensation. GPTQ only decides which grid point
//! each weight takes, pushing each column's rounding error onto the columns not yet
//! quantized so that the layer's output on the calibration inputs moves as little as possible.
//!
//! # Precision and parallelism
//! - The factorization runs in f64: one blocked Cholesky and one blocked triangular inverse
//!   (see `inverse_cholesky_upper`), parallel over row or column panels with rayon.
//! - The column loop runs in f32, as the reference does. Rows of `W` are independent given
//!   `Hinv`, so each rayon task runs the whole column loop for a chunk of rows. The hot part,
//!   the lazy batch update `W[:, later] −= Err · Hinv[block, later]`, runs on the tiled f32
//!   matmul of `edgefusion-kernels` (AVX2/AVX-512 FMA picked at run time).

use edgefusion_kernels::{matmul, GgmlType};
use rayon::prelude::*;

use crate::hessian::Hessian;
use crate::QuantError;

/// How many times a failed Cholesky factorization is retried, each time with 10x the damping.
const DAMP_RETRIES: usize = 4;

/// Block width of the f64 factorization kernels.
const FACTOR_BLOCK: usize = 64;

/// Rows of the trailing matrix per parallel task in the Cholesky update.
const FACTOR_TASK_ROWS: usize = 16;

/// Rows of `W` per parallel task of the column loop. Fixed, not derived from the thread
/// count: the matmul's summation order for a row depends on its place in the task's batch,
/// so a fixed split keeps the result independent of the number of threads.
const TASK_ROWS: usize = 32;

/// Options of [`gptq`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Damping `λ = damp · mean(diag H)` added to the diagonal of `H` (the reference's
    /// `percdamp`), as a fraction of the mean diagonal. Default 0.01.
    pub damp: f64,
    /// Columns per lazy batch (the reference's `blocksize`): errors inside a block update the
    /// block's columns one at a time; later columns are updated once per block by a matrix
    /// product. Default 128.
    pub block_size: usize,
    /// Quantize columns in order of decreasing `H_jj` ("act-order") instead of left to right.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            block_size: 128,
            act_order: false,
        }
    }
}

/// What [`gptq`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqReport {
    /// The damping that made `H` positive definite, as a fraction of the mean diagonal:
    /// `GptqOptions::damp`, or 10x, 100x, ... of it after failed factorizations.
    pub damp_used: f64,
    /// Columns whose inputs were all zero (`H_jj = 0`): their weights were rounded from 0.
    pub dead_columns: usize,
    /// GPTQ's loss `Σ_r Σ_c ((w_rc − q_rc) / Hinv_cc)²`, with `w_rc` the weight as updated
    /// when column `c` was quantized. It equals `tr((W′ − Q) H_d (W′ − Q)ᵀ)` exactly (up to
    /// rounding), where `W′` is the input `W` with dead columns zeroed and
    /// `H_d = mean_t(x_t x_tᵀ) + λI` (dead diagonal entries set to 1): the mean over the
    /// calibration tokens of `‖(W′ − Q) x_t‖²`, plus the damping term `λ‖W′ − Q‖²`.
    /// (The reference reports half of it, for its Hessian `2XᵀX`.)
    pub loss: f64,
}

/// Quantizes `w` in place with GPTQ (Frantar et al., 2022, Algorithm 1).
///
/// `w` is the layer's weight matrix `(n_out, n_in)` row-major (row r = output r);
/// `hessian` holds the statistics of the layer's inputs (length `n_in`). `round(r, c, v)`
/// rounds a weight of row `r`, column `c` (always the original column index, act-order or
/// not) to its grid; it is called exactly once per (row, column), with the weight as
/// updated by the errors of the columns quantized before it, possibly from several threads.
/// On return every `w[r·n_in + c]` holds that call's result.
///
/// Steps, as in the reference implementation:
/// 1. `H = mean_t(x_t x_tᵀ)`; dead columns (`H_jj = 0`) get `H_jj = 1` and weights 0.
/// 2. act-order: columns permuted by decreasing `H_jj` (stable).
/// 3. `H += λI`, `λ = damp · mean(diag H)`; when the Cholesky factorization fails, retried
///    with 10x the damping, up to 4 times.
/// 4. `Hinv` = upper Cholesky factor of `H⁻¹` (f64).
/// 5. Columns in blocks of `block_size`: for column i of a block, `q = round(w[:, i])`,
///    `err = (w[:, i] − q) / Hinv_ii`, `w[:, j] −= err · Hinv_ij` for the block's later
///    columns j; after the block, `W[:, later] −= Err · Hinv[block, later]`.
///
/// # Errors
/// - [`QuantError::Shape`] if `w.len() != n_out · n_in` or `hessian.n() != n_in`;
/// - [`QuantError::InvalidArgument`] if `opts.block_size == 0`, `opts.damp` is negative or
///   not finite, or the Hessian holds no rows;
/// - [`QuantError::NonFinite`] if `w`, the Hessian or a value returned by `round` is NaN or
///   infinite (after a bad `round` value, `w` is left partly quantized);
/// - [`QuantError::NotPositiveDefinite`] if the factorization fails at every damping tried
///   (`pivot` is an original column index).
pub fn gptq(
    w: &mut [f32],
    n_out: usize,
    n_in: usize,
    hessian: &Hessian,
    opts: &GptqOptions,
    round: impl Fn(usize, usize, f32) -> f32 + Sync,
) -> Result<GptqReport, QuantError> {
    let n = n_in;
    check_shape(w, n_out, n)?;
    if hessian.n() != n {
        return Err(QuantError::Shape {
            what: "gptq Hessian size (n_in)".into(),
            expected: n,
            found: hessian.n(),
        });
    }
    check_options(opts)?;
    check_finite(w)?;
    if n == 0 || n_out == 0 {
        return Ok(GptqReport {
            damp_used: opts.damp,
            dead_columns: 0,
            loss: 0.0,
        });
    }
    GptqFactor::new(hessian, opts)?.apply_checked(w, n_out, round)
}

/// Steps 1–4 of [`gptq`] for one Hessian: what every matrix reading the same input (q, k
/// and v; gate and up) shares, so that it is factorized once for all of them.
pub struct GptqFactor {
    n: usize,
    block_size: usize,
    /// (n,): original column of each processing position.
    perm: Vec<usize>,
    /// (n,) by original column.
    dead: Vec<bool>,
    /// (n, n) upper triangular, processing order.
    hinv: Vec<f32>,
    /// Per lazy batch: (n − b1, b1 − b0) as f32 bytes.
    hinv_t: Vec<Vec<u8>>,
    damp_used: f64,
    dead_columns: usize,
}

impl GptqFactor {
    /// Factorizes `hessian` (`n_in × n_in`) for `opts`.
    ///
    /// # Errors
    /// As [`gptq`], for the Hessian and the options.
    pub fn new(hessian: &Hessian, opts: &GptqOptions) -> Result<Self, QuantError> {
        check_options(opts)?;
        let n = hessian.n();
        if hessian.n_rows() == 0 {
            return Err(invalid(
                "gptq Hessian",
                "holds no calibration rows (every column would be dead)",
            ));
        }

        // Step 1: H and its dead columns.
        let mut h = hessian.mean(); // (n, n)
        if let Some(index) = h.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite {
                what: "gptq Hessian".into(),
                index,
            });
        }
        let mut dead = vec![false; n];
        for (j, is_dead) in dead.iter_mut().enumerate() {
            if h[j * n + j] == 0.0 {
                h[j * n + j] = 1.0;
                *is_dead = true;
            }
        }
        let dead_columns = dead.iter().filter(|&&d| d).count();

        // Step 2: processing order; position p holds original column perm[p].
        let mut perm: Vec<usize> = (0..n).collect();
        if opts.act_order {
            perm.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
        }
        // (n, n) in processing order
        let h_perm = if opts.act_order {
            let mut h_perm = vec![0.0f64; n * n];
            for (row, &i) in h_perm.chunks_exact_mut(n).zip(&perm) {
                let h_row = &h[i * n..(i + 1) * n];
                for (v, &j) in row.iter_mut().zip(&perm) {
                    *v = h_row[j];
                }
            }
            drop(h);
            h_perm
        } else {
            h
        };

        // Steps 3 and 4.
        let (hinv, damp_used) = damped_inverse_factor(h_perm, n, opts.damp, &perm)?;

        // Per lazy batch [b0, b1): Hinv[b0..b1, b1..] transposed, (n − b1, b1 − b0) as f32
        // bytes: the weight operand of the matmul in the batch update.
        let block_size = opts.block_size;
        let hinv_t: Vec<Vec<u8>> = (0..n.div_ceil(block_size))
            .into_par_iter()
            .map(|blk| {
                let (b0, b1) = (blk * block_size, ((blk + 1) * block_size).min(n));
                let mut bytes = Vec::with_capacity(4 * (n - b1) * (b1 - b0));
                for j in b1..n {
                    for i in b0..b1 {
                        bytes.extend_from_slice(&hinv[i * n + j].to_le_bytes());
                    }
                }
                bytes
            })
            .collect();

        Ok(GptqFactor {
            n,
            block_size,
            perm,
            dead,
            hinv,
            hinv_t,
            damp_used,
            dead_columns,
        })
    }

    /// Step 5 of [`gptq`]: quantizes `w` `(n_out, n_in)` in place with this factor.
    ///
    /// # Errors
    /// As [`gptq`], for the weights and `round`.
    pub fn apply(
        &self,
        w: &mut [f32],
        n_out: usize,
        round: impl Fn(usize, usize, f32) -> f32 + Sync,
    ) -> Result<GptqReport, QuantError> {
        check_shape(w, n_out, self.n)?;
        check_finite(w)?;
        self.apply_checked(w, n_out, round)
    }

    fn apply_checked(
        &self,
        w: &mut [f32],
        n_out: usize,
        round: impl Fn(usize, usize, f32) -> f32 + Sync,
    ) -> Result<GptqReport, QuantError> {
        let n = self.n;
        if n == 0 || n_out == 0 {
            return Ok(GptqReport {
                damp_used: self.damp_used,
                dead_columns: self.dead_columns,
                loss: 0.0,
            });
        }
        // Step 5, in parallel over chunks of rows.
        let ctx = ColumnLoop {
            n,
            block_size: self.block_size,
            perm: &self.perm,
            dead: &self.dead,
            hinv: &self.hinv,
            hinv_t: &self.hinv_t,
        };
        let loss = w
            .par_chunks_mut(TASK_ROWS * n)
            .enumerate()
            .map(|(task, rows)| ctx.run(task * TASK_ROWS, rows, &round))
            .try_reduce(|| 0.0, |a, b| Ok(a + b))?;

        Ok(GptqReport {
            damp_used: self.damp_used,
            dead_columns: self.dead_columns,
            loss,
        })
    }
}

/// Steps 3 and 4 of [`gptq`]: `Hinv`, the upper Cholesky factor of `(H + λI)⁻¹`, `(n, n)`
/// in f32 (zero below the diagonal), and the damping fraction that made `H + λI` positive
/// definite. `h` `(n, n)` is in processing order; `perm` maps a failed pivot back to its
/// original column.
fn damped_inverse_factor(
    h: Vec<f64>,
    n: usize,
    damp: f64,
    perm: &[usize],
) -> Result<(Vec<f32>, f64), QuantError> {
    let mean_diag = (0..n).map(|j| h[j * n + j]).sum::<f64>() / n as f64;
    let mut damp = damp;
    let mut attempt = 0;
    loop {
        match inverse_cholesky_upper(&h, n, damp * mean_diag) {
            Ok(hinv) => return Ok((hinv.iter().map(|&v| v as f32).collect(), damp)),
            Err(Pivot { index, value }) => {
                if attempt == DAMP_RETRIES {
                    return Err(QuantError::NotPositiveDefinite {
                        what: "gptq Hessian".into(),
                        pivot: perm[index],
                        value,
                        damp,
                    });
                }
                attempt += 1;
                // ×10 per retry (from the default when no damping was asked for).
                damp = if damp > 0.0 {
                    damp * 10.0
                } else {
                    GptqOptions::default().damp
                };
            }
        }
    }
}

fn check_shape(w: &[f32], n_out: usize, n: usize) -> Result<(), QuantError> {
    let expected = n_out.saturating_mul(n);
    if w.len() != expected {
        return Err(QuantError::Shape {
            what: "gptq weights (n_out, n_in)".into(),
            expected,
            found: w.len(),
        });
    }
    Ok(())
}

fn check_finite(w: &[f32]) -> Result<(), QuantError> {
    match w.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            what: "gptq weights".into(),
            index,
        }),
        None => Ok(()),
    }
}

fn check_options(opts: &GptqOptions) -> Result<(), QuantError> {
    if opts.block_size == 0 {
        return Err(invalid("gptq block_size", "must be at least 1"));
    }
    if !(opts.damp.is_finite() && opts.damp >= 0.0) {
        return Err(invalid(
            "gptq damp",
            &format!("must be finite and ≥ 0, got {}", opts.damp),
        ));
    }
    Ok(())
}

fn invalid(what: &str, reason: &str) -> QuantError {
    QuantError::InvalidArgument {
        what: what.into(),
        reason: reason.into(),
    }
}

/// What every row chunk of the column loop shares.
struct ColumnLoop<'a> {
    n: usize,
    block_size: usize,
    /// (n,): original column of each processing position.
    perm: &'a [usize],
    /// (n,) by original column.
    dead: &'a [bool],
    /// (n, n) upper triangular, processing order.
    hinv: &'a [f32],
    /// Per lazy batch: (n − b1, b1 − b0) as f32 bytes.
    hinv_t: &'a [Vec<u8>],
}

impl ColumnLoop<'_> {
    /// Quantizes `w_rows` `(m, n)`, rows `row0..row0 + m` of `W`, in place; returns their
    /// share of the loss.
    fn run(
        &self,
        row0: usize,
        w_rows: &mut [f32],
        round: &(impl Fn(usize, usize, f32) -> f32 + Sync),
    ) -> Result<f64, QuantError> {
        let n = self.n;
        let m = w_rows.len() / n;
        // (m, n): the rows in processing order, dead columns zeroed.
        let mut work = vec![0.0f32; m * n];
        for (work_row, w_row) in work.chunks_exact_mut(n).zip(w_rows.chunks_exact(n)) {
            for (x, &c) in work_row.iter_mut().zip(self.perm) {
                *x = if self.dead[c] { 0.0 } else { w_row[c] };
            }
        }
        // (m, block) as f32 bytes: the scaled errors of the current block (the
        // reference's Err1), the activation operand of the batch update.
        let mut err = vec![0u8; 4 * m * self.block_size];
        // (m, n − b1): Err · Hinv[block, later].
        let mut update = vec![0.0f32; m * n];
        let mut loss = 0.0f64;
        for (blk, hinv_t) in self.hinv_t.iter().enumerate() {
            let b0 = blk * self.block_size;
            let b1 = (b0 + self.block_size).min(n);
            let width = b1 - b0;
            for (r, work_row) in work.chunks_exact_mut(n).enumerate() {
                let block = &mut work_row[b0..b1];
                let err_row = &mut err[4 * r * width..4 * (r + 1) * width];
                for k in 0..width {
                    let i = b0 + k;
                    let col = self.perm[i];
                    let v = block[k];
                    let q = round(row0 + r, col, v);
                    if !q.is_finite() {
                        return Err(QuantError::NonFinite {
                            what: format!("gptq round({}, {col}, {v})", row0 + r),
                            index: (row0 + r) * n + col,
                        });
                    }
                    // Hinv[i, b0..b1]
                    let hinv_row = &self.hinv[i * n + b0..i * n + b1];
                    let e = (v - q) / hinv_row[k];
                    block[k] = q;
                    for (x, &hij) in block[k + 1..].iter_mut().zip(&hinv_row[k + 1..]) {
                        *x -= e * hij;
                    }
                    err_row[4 * k..4 * k + 4].copy_from_slice(&e.to_le_bytes());
                    loss += f64::from(e) * f64::from(e);
                }
            }
            let rest = n - b1;
            if rest > 0 {
                let update = &mut update[..m * rest];
                matmul(
                    GgmlType::F32,
                    width,
                    hinv_t,
                    rest,
                    &err[..4 * m * width],
                    m,
                    update,
                    rest,
                );
                for (work_row, update_row) in
                    work.chunks_exact_mut(n).zip(update.chunks_exact(rest))
                {
                    for (x, &u) in work_row[b1..].iter_mut().zip(update_row) {
                        *x -= u;
                    }
                }
            }
        }
        for (w_row, work_row) in w_rows.chunks_exact_mut(n).zip(work.chunks_exact(n)) {
            for (&x, &c) in work_row.iter().zip(self.perm) {
                w_row[c] = x;
            }
        }
        Ok(loss)
    }
}

/// A failed Cholesky pivot: index (in the order of the matrix given) and value.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pivot {
    index: usize,
    value: f64,
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹`, `(n, n)` row-major (zero below the
/// diagonal), with `(H + λI)⁻¹ = UᵀU`, for symmetric `h` `(n, n)`.
///
/// The reference computes `chol(H)`, then `H⁻¹` from it, then `chol(H⁻¹, upper)` (4n³/3
/// flops). Here: with `J` the reversal permutation, `JHJ = LLᵀ` gives `H = ŨŨᵀ` with
/// `Ũ = JLJ` upper triangular, so `H⁻¹ = Ũ⁻ᵀŨ⁻¹ = (Ũ⁻¹)ᵀ(Ũ⁻¹)` and, the factor being unique,
/// `U = Ũ⁻¹ = J L⁻¹ J`: one Cholesky and one triangular inverse (2n³/3 flops), and `H⁻¹` is
/// never formed.
fn inverse_cholesky_upper(h: &[f64], n: usize, lambda: f64) -> Result<Vec<f64>, Pivot> {
    // (n, n): J (H + λI) J
    let mut l = vec![0.0f64; n * n];
    for (a, (row, h_row)) in l
        .chunks_exact_mut(n)
        .zip(h.chunks_exact(n).rev())
        .enumerate()
    {
        for (v, &h_ab) in row.iter_mut().zip(h_row.iter().rev()) {
            *v = h_ab;
        }
        row[a] += lambda;
    }
    cholesky_lower(&mut l, n).map_err(|p| Pivot {
        index: n - 1 - p.index,
        value: p.value,
    })?;
    let l_inv_blocks = lower_inverse_columns(&l, n);
    // U[a][b] = L⁻¹[n−1−a][n−1−b]: L⁻¹[i][c] (i ≥ c) lands at U[n−1−i][n−1−c]. U reuses L's
    // memory, which matters at n in the thousands.
    let mut u = l;
    u.fill(0.0);
    for (blk, x) in l_inv_blocks.iter().enumerate() {
        let c0 = blk * FACTOR_BLOCK;
        let width = FACTOR_BLOCK.min(n - c0);
        for (row, x_row) in x.chunks_exact(width).enumerate() {
            let i = c0 + row;
            let u_row = &mut u[(n - 1 - i) * n..(n - i) * n];
            for (k, &v) in x_row.iter().enumerate().take(row + 1) {
                u_row[n - 1 - (c0 + k)] = v;
            }
        }
    }
    Ok(u)
}

/// In-place lower Cholesky factorization `A = LLᵀ` of symmetric `a` `(n, n)` row-major,
/// reading and writing only the lower triangle (the strict upper triangle is left as junk).
///
/// Blocked right-looking (Golub & Van Loan, "Matrix Computations", 4th ed., §4.2.9): factor
/// a diagonal block, solve the panel below it, update the trailing matrix with
/// `A₂₂ −= PPᵀ`; the solve and the update run in parallel over rows.
fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), Pivot> {
    let mut panel = Vec::new();
    let mut panel_t = Vec::new();
    for k0 in (0..n).step_by(FACTOR_BLOCK) {
        let k1 = (k0 + FACTOR_BLOCK).min(n);
        let kb = k1 - k0;
        // Diagonal block, unblocked (left-looking within the block).
        for j in k0..k1 {
            let row_j = &a[j * n + k0..j * n + j];
            let d = a[j * n + j] - row_j.iter().map(|v| v * v).sum::<f64>();
            // `!(d > 0.0)` also catches NaN.
            if !(d > 0.0 && d.is_finite()) {
                return Err(Pivot { index: j, value: d });
            }
            let l_jj = d.sqrt();
            a[j * n + j] = l_jj;
            for i in j + 1..k1 {
                let (upper, lower) = a.split_at_mut(i * n);
                let row_j = &upper[j * n + k0..j * n + j];
                let row_i = &mut lower[k0..k1];
                let dot: f64 = row_i[..j - k0].iter().zip(row_j).map(|(x, y)| x * y).sum();
                row_i[j - k0] = (row_i[j - k0] - dot) / l_jj;
            }
        }
        if k1 == n {
            break;
        }
        // (kb, kb): L_kkᵀ, upper triangle: l_kk_t[p·kb + j] = L[k0 + j][k0 + p].
        let mut l_kk_t = vec![0.0f64; kb * kb];
        for j in 0..kb {
            for p in 0..=j {
                l_kk_t[p * kb + j] = a[(k0 + j) * n + k0 + p];
            }
        }
        let (_, trailing) = a.split_at_mut(k1 * n); // rows k1..n
        let m = n - k1;
        // Panel solve: A[i, k0..k1] ← A[i, k0..k1] L_kk⁻ᵀ for every row below, as a
        // forward substitution whose updates are axpys along the row.
        trailing.par_chunks_mut(n).for_each(|row| {
            let x = &mut row[k0..k1];
            for p in 0..kb {
                let x_p = x[p] / l_kk_t[p * kb + p];
                x[p] = x_p;
                for (x_j, &l_jp) in x[p + 1..]
                    .iter_mut()
                    .zip(&l_kk_t[p * kb + p + 1..(p + 1) * kb])
                {
                    *x_j -= x_p * l_jp;
                }
            }
        });
        // The solved panel P, packed (m, kb), and its transpose (kb, m).
        panel.clear();
        for row in trailing.chunks_exact(n) {
            panel.extend_from_slice(&row[k0..k1]);
        }
        panel_t.clear();
        panel_t.resize(kb * m, 0.0);
        for (i, p_row) in panel.chunks_exact(kb).enumerate() {
            for (p, &v) in p_row.iter().enumerate() {
                panel_t[p * m + i] = v;
            }
        }
        // Trailing update, lower triangle: A[i][j] −= P_i · P_j for k1 ≤ j ≤ i.
        let (panel, panel_t) = (&panel, &panel_t);
        trailing
            .par_chunks_mut(FACTOR_TASK_ROWS * n)
            .enumerate()
            .for_each(|(task, rows)| {
                let r0 = task * FACTOR_TASK_ROWS;
                let task_rows = rows.len() / n;
                gemm_sub(
                    &mut rows[k1..],
                    n,
                    &panel[r0 * kb..],
                    kb,
                    panel_t,
                    m,
                    Dims {
                        rows: task_rows,
                        cols: m,
                        depth: kb,
                        lower_from: Some(r0),
                    },
                );
            });
    }
    Ok(())
}

/// Columns of `L⁻¹` for lower triangular `l` `(n, n)` (lower triangle read), per column
/// block `C = [c0, c0 + FACTOR_BLOCK)`: `X[c0.., C]` `(n − c0, |C|)` row-major (the rows
/// above `c0` are zero and not stored), zero above the diagonal.
///
/// Columns are independent (`L X = I` column by column), so blocks run in parallel; each is
/// a blocked forward substitution over row blocks `I` (Golub & Van Loan, §3.1.4):
/// `X[I, C] = L_II⁻¹ (I[I, C] − L[I, c0..i0] X[c0..i0, C])`, whose bulk is the product.
fn lower_inverse_columns(l: &[f64], n: usize) -> Vec<Vec<f64>> {
    (0..n.div_ceil(FACTOR_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let c0 = blk * FACTOR_BLOCK;
            let width = FACTOR_BLOCK.min(n - c0);
            // (n − c0, width): x[(i − c0)·width + k] = X[i][c0 + k]
            let mut x = vec![0.0f64; (n - c0) * width];
            for i0 in (c0..n).step_by(FACTOR_BLOCK) {
                let i1 = (i0 + FACTOR_BLOCK).min(n);
                let (solved, block) = x.split_at_mut((i0 - c0) * width);
                // block[i − i0] = I[i, C] − L[i, c0..i0] · X[c0..i0, C]
                for i in i0..i1.min(c0 + width) {
                    block[(i - i0) * width + i - c0] = 1.0;
                }
                gemm_sub(
                    block,
                    width,
                    &l[i0 * n + c0..],
                    n,
                    solved,
                    width,
                    Dims {
                        rows: i1 - i0,
                        cols: width,
                        depth: i0 - c0,
                        lower_from: None,
                    },
                );
                // Forward substitution with L_II, row by row: axpys along the rows of X.
                for i in i0..i1 {
                    let (done, rest) = block.split_at_mut((i - i0) * width);
                    let x_i = &mut rest[..width];
                    for (p, x_p) in done.chunks_exact(width).enumerate() {
                        let l_ip = l[i * n + i0 + p];
                        for (v, &u) in x_i.iter_mut().zip(x_p) {
                            *v -= l_ip * u;
                        }
                    }
                    let l_ii = l[i * n + i];
                    for v in x_i.iter_mut() {
                        *v /= l_ii;
                    }
                }
            }
            x
        })
        .collect()
}

/// Sizes of a [`gemm_sub`] call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    cols: usize,
    depth: usize,
    /// `Some(r0)`: row `i` of `C` is row `r0 + i` of a lower triangle, so only columns
    /// `j ≤ r0 + i` are needed (tiles across the diagonal also update a few `j > r0 + i`).
    lower_from: Option<usize>,
}

/// Register tile of [`gemm_sub`]: rows of `C`.
const TILE_ROWS: usize = 4;
/// Register tile of [`gemm_sub`]: columns of `C`, two 2-wide f64 vectors on baseline x86-64.
const TILE_COLS: usize = 4;
/// Cache block of [`gemm_sub`]: `DEPTH_BLOCK × COL_BLOCK` f64 of `B` (32 KiB) stay in L1
/// while every row tile of `A` passes over them.
const DEPTH_BLOCK: usize = 64;
const COL_BLOCK: usize = 64;

/// `c[i·ldc + j] −= Σ_{p < depth} a[i·lda + p] · b[p·ldb + j]` for `i < rows`, `j < cols`:
/// `C −= A B` with `A` `(rows, depth)`, `B` `(depth, cols)`, `C` `(rows, cols)`, each with
/// its own row stride. Outer-product form: a `TILE_ROWS × TILE_COLS` tile of `C` is held
/// in registers while `p` runs, vectorized along the columns (no horizontal sums).
fn gemm_sub(c: &mut [f64], ldc: usize, a: &[f64], lda: usize, b: &[f64], ldb: usize, dims: Dims) {
    let Dims {
        rows,
        cols,
        depth,
        lower_from,
    } = dims;
    for p0 in (0..depth).step_by(DEPTH_BLOCK) {
        let block_depth = DEPTH_BLOCK.min(depth - p0);
        for j0 in (0..cols).step_by(COL_BLOCK) {
            let j1 = (j0 + COL_BLOCK).min(cols);
            for i in (0..rows).step_by(TILE_ROWS) {
                let tile_rows = (rows - i).min(TILE_ROWS);
                let col_end = match lower_from {
                    Some(r0) => (r0 + i + tile_rows).min(j1),
                    None => j1,
                };
                let a_tile = &a[i * lda + p0..];
                for j in (j0..col_end).step_by(TILE_COLS) {
                    let tile_cols = (col_end - j).min(TILE_COLS);
                    let b_tile = &b[p0 * ldb + j..];
                    if tile_rows == TILE_ROWS && tile_cols == TILE_COLS {
                        let sums =
                            tile::<TILE_ROWS, TILE_COLS>(a_tile, lda, b_tile, ldb, block_depth);
                        for (r, sums_r) in sums.iter().enumerate() {
                            let c_row = &mut c[(i + r) * ldc + j..(i + r) * ldc + j + TILE_COLS];
                            for (cv, &s) in c_row.iter_mut().zip(sums_r) {
                                *cv -= s;
                            }
                        }
                    } else {
                        for r in 0..tile_rows {
                            for k in 0..tile_cols {
                                let s = tile::<1, 1>(
                                    &a_tile[r * lda..],
                                    lda,
                                    &b_tile[k..],
                                    ldb,
                                    block_depth,
                                );
                                c[(i + r) * ldc + j + k] -= s[0][0];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `[r][k] = Σ_{p < depth} a[r·lda + p] · b[p·ldb + k]`.
#[inline(always)]
fn tile<const R: usize, const C: usize>(
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    depth: usize,
) -> [[f64; C]; R] {
    let a_rows: [&[f64]; R] = std::array::from_fn(|r| &a[r * lda..r * lda + depth]);
    let mut acc = [[0.0f64; C]; R];
    for p in 0..depth {
        let b_row: &[f64; C] = b[p * ldb..p * ldb + C].try_into().expect("C columns");
        for r in 0..R {
            let x = a_rows[r][p];
            for k in 0..C {
                acc[r][k] += x * b_row[k];
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hessian::tests::Rng;

    /// Bits of the test grid.
    const GRID_BITS: u32 = 3;
    /// Columns per grid block (one scale/min per row and block).
    const GRID_BLOCK: usize = 128;
    /// GPTQ's calibrated output error must be at most this fraction of round-to-nearest's.
    const MAX_ERROR_RATIO: f64 = 0.8;

    /// A 3-bit min/max grid per (row, block of 128 columns), fixed from the original weights
    /// before GPTQ runs: `(lo, step)` per block, `(n_out, n_in / GRID_BLOCK)`.
    struct Grid {
        n_blocks: usize,
        lo_step: Vec<(f32, f32)>,
    }

    impl Grid {
        fn new(w: &[f32], n_out: usize, n_in: usize) -> Self {
            let n_blocks = n_in.div_ceil(GRID_BLOCK);
            let levels = ((1u32 << GRID_BITS) - 1) as f32;
            let mut lo_step = Vec::with_capacity(n_out * n_blocks);
            for row in w.chunks_exact(n_in) {
                for block in row.chunks(GRID_BLOCK) {
                    let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    lo_step.push((lo, ((hi - lo) / levels).max(1e-8)));
                }
            }
            Grid { n_blocks, lo_step }
        }

        fn round(&self, r: usize, c: usize, v: f32) -> f32 {
            let (lo, step) = self.lo_step[r * self.n_blocks + c / GRID_BLOCK];
            let levels = ((1u32 << GRID_BITS) - 1) as f32;
            lo + ((v - lo) / step).round().clamp(0.0, levels) * step
        }
    }

    /// `X = Z·A` `(n_rows, n_in)`: features mixed by a random `A` `(n_in, n_in)` (identity
    /// plus a dense part), so they correlate.
    fn correlated_inputs(rng: &mut Rng, n_rows: usize, n_in: usize) -> Vec<f32> {
        let z: Vec<f32> = (0..n_rows * n_in).map(|_| rng.next_f32()).collect();
        let a: Vec<f32> = (0..n_in * n_in)
            .map(|k| {
                let diag = if k / n_in == k % n_in { 1.0 } else { 0.0 };
                diag + 0.3 * rng.next_f32()
            })
            .collect();
        let mut x = vec![0.0f32; n_rows * n_in];
        for t in 0..n_rows {
            for p in 0..n_in {
                let zt = z[t * n_in + p];
                for (xv, &av) in x[t * n_in..(t + 1) * n_in]
                    .iter_mut()
                    .zip(&a[p * n_in..(p + 1) * n_in])
                {
                    *xv += zt * av;
                }
            }
        }
        x
    }

    /// `‖X Wᵀ − X Qᵀ‖²` in f64.
    fn output_error(x: &[f32], n_rows: usize, w: &[f32], q: &[f32], n_in: usize) -> f64 {
        let mut total = 0.0;
        for xt in x.chunks_exact(n_in).take(n_rows) {
            for (w_row, q_row) in w.chunks_exact(n_in).zip(q.chunks_exact(n_in)) {
                let d: f64 = xt
                    .iter()
                    .zip(w_row.iter().zip(q_row))
                    .map(|(&xv, (&wv, &qv))| f64::from(xv) * (f64::from(wv) - f64::from(qv)))
                    .sum();
                total += d * d;
            }
        }
        total
    }

    struct Layer {
        n_out: usize,
        n_in: usize,
        n_rows: usize,
        x: Vec<f32>,
        w: Vec<f32>,
        hessian: Hessian,
    }

    fn layer(seed: u32, n_out: usize, n_in: usize, n_rows: usize) -> Layer {
        let mut rng = Rng::new(seed);
        let x = correlated_inputs(&mut rng, n_rows, n_in);
        let w: Vec<f32> = (0..n_out * n_in).map(|_| 0.1 * rng.next_f32()).collect();
        let mut hessian = Hessian::new(n_in);
        hessian.add_rows(&x, n_rows).unwrap();
        Layer {
            n_out,
            n_in,
            n_rows,
            x,
            w,
            hessian,
        }
    }

    /// Runs GPTQ on `layer` and returns (GPTQ's output error / RTN's, report).
    fn gptq_vs_rtn(layer: &Layer, opts: &GptqOptions) -> (f64, GptqReport, Vec<f32>) {
        let (n_out, n_in) = (layer.n_out, layer.n_in);
        let grid = Grid::new(&layer.w, n_out, n_in);
        let rtn: Vec<f32> = (0..n_out * n_in)
            .map(|k| grid.round(k / n_in, k % n_in, layer.w[k]))
            .collect();
        let mut q = layer.w.clone();
        let report = gptq(&mut q, n_out, n_in, &layer.hessian, opts, |r, c, v| {
            grid.round(r, c, v)
        })
        .unwrap();
        let gptq_error = output_error(&layer.x, layer.n_rows, &layer.w, &q, n_in);
        let rtn_error = output_error(&layer.x, layer.n_rows, &layer.w, &rtn, n_in);
        (gptq_error / rtn_error, report, q)
    }

    /// Every entry of `q` is a point of the grid of its (row, column).
    fn assert_on_grid(q: &[f32], n_in: usize, round: impl Fn(usize, usize, f32) -> f32) {
        for (k, &v) in q.iter().enumerate() {
            assert_eq!(round(k / n_in, k % n_in, v), v, "entry {k} off its grid");
        }
    }

    #[test]
    fn diagonal_hessian_is_plain_rounding() {
        // Rows that each excite one feature: H = XᵀX is diagonal, with unequal entries.
        let (n_out, n_in) = (9, 200);
        let mut x = Vec::new();
        for t in 0..3 * n_in {
            let mut row = vec![0.0f32; n_in];
            row[t % n_in] = 1.0 + (t % 7) as f32;
            x.extend_from_slice(&row);
        }
        let mut hessian = Hessian::new(n_in);
        hessian.add_rows(&x, 3 * n_in).unwrap();
        let mut rng = Rng::new(5);
        let w: Vec<f32> = (0..n_out * n_in).map(|_| rng.next_f32()).collect();
        let round = |_: usize, c: usize, v: f32| {
            let step = 0.1 + 0.01 * (c % 5) as f32;
            (v / step).round() * step
        };
        for act_order in [false, true] {
            for block_size in [1, 16, 128] {
                let mut q = w.clone();
                let opts = GptqOptions {
                    act_order,
                    block_size,
                    ..GptqOptions::default()
                };
                let report = gptq(&mut q, n_out, n_in, &hessian, &opts, round).unwrap();
                assert_eq!(report.dead_columns, 0);
                assert_eq!(report.damp_used, opts.damp);
                for (k, (&qv, &wv)) in q.iter().zip(&w).enumerate() {
                    assert_eq!(qv, round(k / n_in, k % n_in, wv), "entry {k}");
                }
            }
        }
    }

    #[test]
    fn beats_round_to_nearest_on_correlated_inputs() {
        let layer = layer(1, 64, 256, 512);
        for act_order in [false, true] {
            let opts = GptqOptions {
                act_order,
                ..GptqOptions::default()
            };
            let (ratio, report, q) = gptq_vs_rtn(&layer, &opts);
            println!("act_order {act_order}: GPTQ / RTN output error = {ratio:.3}");
            assert!(
                ratio < MAX_ERROR_RATIO,
                "act_order {act_order}: GPTQ / RTN = {ratio}"
            );
            assert_eq!(report.dead_columns, 0);
            let grid = Grid::new(&layer.w, layer.n_out, layer.n_in);
            assert_on_grid(&q, layer.n_in, |r, c, v| grid.round(r, c, v));
        }
    }

    /// The reported loss is `tr((W − Q) H_d (W − Q)ᵀ)` with `H_d = mean(xxᵀ) + λI`.
    #[test]
    fn loss_is_the_damped_hessian_norm_of_the_change() {
        let layer = layer(2, 40, 150, 300);
        let n = layer.n_in;
        for (act_order, block_size) in [(false, 128), (true, 32), (false, 7)] {
            let opts = GptqOptions {
                act_order,
                block_size,
                ..GptqOptions::default()
            };
            let (_, report, q) = gptq_vs_rtn(&layer, &opts);
            let mut h = layer.hessian.mean();
            let lambda = report.damp_used * (0..n).map(|j| h[j * n + j]).sum::<f64>() / n as f64;
            for j in 0..n {
                h[j * n + j] += lambda;
            }
            let mut expected = 0.0;
            for (w_row, q_row) in layer.w.chunks_exact(n).zip(q.chunks_exact(n)) {
                let d: Vec<f64> = w_row
                    .iter()
                    .zip(q_row)
                    .map(|(&a, &b)| f64::from(a) - f64::from(b))
                    .collect();
                for i in 0..n {
                    for j in 0..n {
                        expected += d[i] * h[i * n + j] * d[j];
                    }
                }
            }
            let rel = (report.loss - expected).abs() / expected;
            assert!(rel < 1e-3, "loss {} vs {expected} ({rel:e})", report.loss);
        }
    }

    #[test]
    fn dead_columns_are_rounded_from_zero() {
        let mut layer = layer(3, 48, 256, 400);
        let dead = [0, 17, 200, 255];
        for row in layer.x.chunks_exact_mut(layer.n_in) {
            for &c in &dead {
                row[c] = 0.0;
            }
        }
        layer.hessian = Hessian::new(layer.n_in);
        layer.hessian.add_rows(&layer.x, layer.n_rows).unwrap();
        for act_order in [false, true] {
            let opts = GptqOptions {
                act_order,
                ..GptqOptions::default()
            };
            let (ratio, report, q) = gptq_vs_rtn(&layer, &opts);
            println!("dead columns, act_order {act_order}: GPTQ / RTN output error = {ratio:.3}");
            assert_eq!(report.dead_columns, dead.len());
            assert!(report.loss.is_finite());
            assert!(ratio < MAX_ERROR_RATIO, "GPTQ / RTN = {ratio}");
            let grid = Grid::new(&layer.w, layer.n_out, layer.n_in);
            for r in 0..layer.n_out {
                for &c in &dead {
                    assert_eq!(q[r * layer.n_in + c], grid.round(r, c, 0.0));
                }
            }
        }
    }

    #[test]
    fn non_finite_input_is_an_error() {
        let layer = layer(4, 8, 32, 64);
        let round = |_: usize, _: usize, v: f32| v.round();
        let opts = GptqOptions::default();

        let mut w = layer.w.clone();
        w[77] = f32::NAN;
        let err = gptq(&mut w, 8, 32, &layer.hessian, &opts, round);
        assert!(
            matches!(err, Err(QuantError::NonFinite { index: 77, .. })),
            "{err:?}"
        );

        let mut hessian = layer.hessian.clone();
        hessian.sum[5 * 32 + 9] = f64::NAN;
        let mut w = layer.w.clone();
        let err = gptq(&mut w, 8, 32, &hessian, &opts, round);
        assert!(matches!(err, Err(QuantError::NonFinite { .. })), "{err:?}");

        let mut w = layer.w.clone();
        let err = gptq(&mut w, 8, 32, &layer.hessian, &opts, |r, c, v| {
            if (r, c) == (3, 30) {
                f32::INFINITY
            } else {
                v
            }
        });
        assert!(
            matches!(err, Err(QuantError::NonFinite { index, .. }) if index == 3 * 32 + 30),
            "{err:?}"
        );
    }

    #[test]
    fn bad_shapes_and_options_are_errors() {
        let layer = layer(6, 4, 16, 32);
        let round = |_: usize, _: usize, v: f32| v;
        let mut w = layer.w.clone();
        let opts = GptqOptions::default();
        assert!(matches!(
            gptq(&mut w, 4, 15, &layer.hessian, &opts, round),
            Err(QuantError::Shape { .. })
        ));
        assert!(matches!(
            gptq(&mut w[..60], 4, 15, &layer.hessian, &opts, round),
            Err(QuantError::Shape { what, .. }) if what.contains("Hessian")
        ));
        for opts in [
            GptqOptions {
                block_size: 0,
                ..opts
            },
            GptqOptions { damp: -1.0, ..opts },
            GptqOptions {
                damp: f64::NAN,
                ..opts
            },
        ] {
            assert!(matches!(
                gptq(&mut w, 4, 16, &layer.hessian, &opts, round),
                Err(QuantError::InvalidArgument { .. })
            ));
        }
        assert!(matches!(
            gptq(&mut w, 4, 16, &Hessian::new(16), &opts, round),
            Err(QuantError::InvalidArgument { .. })
        ));
        assert_eq!(w, layer.w, "failed calls must not touch the weights");
    }

    #[test]
    fn damping_is_raised_until_the_factorization_succeeds() {
        // mean = [[1, 1.05], [1.05, 1]] / 2: eigenvalues 1.025 and −0.025, mean diagonal 0.5;
        // damping 0.01 (λ = 0.005) fails, 0.1 (λ = 0.05) succeeds.
        let mut hessian = Hessian::new(2);
        hessian.add_rows(&[1.0, 0.0, 0.0, 1.0], 2).unwrap(); // sum = I
        hessian.sum[1] = 1.05;
        let round = |_: usize, _: usize, v: f32| (v * 4.0).round() / 4.0;
        let mut w = vec![0.3f32, -0.7, 0.11, 0.9];
        let report = gptq(&mut w, 2, 2, &hessian, &GptqOptions::default(), round).unwrap();
        assert!((report.damp_used - 0.1).abs() < 1e-12, "{report:?}");
        assert!(w.iter().all(|&v| round(0, 0, v) == v));

        // Eigenvalue −999.5 (mean diagonal 0.5): past the largest damping tried (0.01·10⁴).
        hessian.sum = vec![1.0, 2000.0, 0.0, 1.0];
        let err = gptq(&mut w, 2, 2, &hessian, &GptqOptions::default(), round);
        assert!(
            matches!(err, Err(QuantError::NotPositiveDefinite { pivot: 0, .. })),
            "{err:?}"
        );
    }

    /// Naive f64 Cholesky, lower, of a full symmetric matrix.
    fn naive_cholesky(a: &[f64], n: usize) -> Vec<f64> {
        let mut l = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let s: f64 = (0..j).map(|p| l[i * n + p] * l[j * n + p]).sum();
                l[i * n + j] = if i == j {
                    (a[i * n + i] - s).sqrt()
                } else {
                    (a[i * n + j] - s) / l[j * n + j]
                };
            }
        }
        l
    }

    /// The reference's route: chol(H), H⁻¹ from it, chol(H⁻¹, upper), all naive f64.
    fn naive_inverse_cholesky_upper(h: &[f64], n: usize) -> Vec<f64> {
        let l = naive_cholesky(h, n);
        // L⁻¹ by forward substitution, column by column.
        let mut l_inv = vec![0.0; n * n];
        for c in 0..n {
            for i in c..n {
                let s: f64 = (c..i).map(|p| l[i * n + p] * l_inv[p * n + c]).sum();
                let identity = if i == c { 1.0 } else { 0.0 };
                l_inv[i * n + c] = (identity - s) / l[i * n + i];
            }
        }
        // H⁻¹ = L⁻ᵀ L⁻¹
        let mut h_inv = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                h_inv[i * n + j] = (0..n).map(|p| l_inv[p * n + i] * l_inv[p * n + j]).sum();
            }
        }
        let lower = naive_cholesky(&h_inv, n);
        (0..n * n).map(|k| lower[(k % n) * n + k / n]).collect() // Uᵀ = L
    }

    #[test]
    fn inverse_cholesky_matches_the_reference_route() {
        for (n, seed) in [(1, 1), (5, 2), (64, 3), (150, 4)] {
            let mut rng = Rng::new(seed);
            let x = correlated_inputs(&mut rng, 2 * n + 3, n);
            let mut hessian = Hessian::new(n);
            hessian.add_rows(&x, 2 * n + 3).unwrap();
            let mut h = hessian.mean();
            let lambda = 0.01;
            let u = inverse_cholesky_upper(&h, n, lambda).unwrap();
            for j in 0..n {
                h[j * n + j] += lambda;
            }
            let want = naive_inverse_cholesky_upper(&h, n);
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for k in 0..n * n {
                assert!(
                    (u[k] - want[k]).abs() <= 1e-9 * scale,
                    "n {n}: U[{}][{}] = {} vs {}",
                    k / n,
                    k % n,
                    u[k],
                    want[k]
                );
            }
        }
    }

    /// Wall time of one `gptq` call on the two shapes of a small Llama-family model's MLP.
    /// Run with `RAYON_NUM_THREADS=2 cargo test --release -p edgefusion-quant -- --ignored
    /// --nocapture gptq_timing`.
    #[test]
    #[ignore = "timing; run by hand"]
    fn gptq_timing() {
        for (n_out, n_in) in [(576, 1536), (1536, 576)] {
            let mut rng = Rng::new(9);
            let n_rows = 2 * n_in;
            let x: Vec<f32> = (0..n_rows * n_in).map(|_| rng.next_f32()).collect();
            let mut hessian = Hessian::new(n_in);
            hessian.add_rows(&x, n_rows).unwrap();
            let w: Vec<f32> = (0..n_out * n_in).map(|_| 0.1 * rng.next_f32()).collect();
            let round = |_: usize, _: usize, v: f32| (v * 16.0).round() / 16.0;
            for act_order in [false, true] {
                let opts = GptqOptions {
                    act_order,
                    ..GptqOptions::default()
                };
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let mut q = w.clone();
                    let start = std::time::Instant::now();
                    gptq(&mut q, n_out, n_in, &hessian, &opts, round).unwrap();
                    best = best.min(start.elapsed().as_secs_f64());
                }
                let h = hessian.mean();
                let start = std::time::Instant::now();
                inverse_cholesky_upper(&h, n_in, 0.01).unwrap();
                let factor = start.elapsed().as_secs_f64();
                println!(
                    "gptq n_out {n_out}, n_in {n_in}, act_order {act_order}, {} threads: \
                     {:.1} ms (factorization alone {:.1} ms)",
                    rayon::current_num_threads(),
                    best * 1e3,
                    factor * 1e3
                );
            }
        }
    }
}
