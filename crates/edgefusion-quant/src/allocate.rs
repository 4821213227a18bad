//! Choosing how every matrix of the layers is stored within one bits-per-weight budget:
//! each tile's EFQ width ([`allocate_widths`]), or, where the budget holds it, the source
//! tensor as its file stores it (Q4_1, Q4_K, Q6_K, ...), written unchanged ([`allocate`]).
//!
//! The source's encoding loses nothing: "full precision" is the source dequantized, so a
//! kept matrix has zero error, which no re-rounding onto EFQ's rotated 128-wide blocks can
//! match once the budget reaches the source's own bits (a Q4_1 source at 5.0 bits per
//! weight, a Q4_K_M one at about 4.9). llama.cpp gets the same for free when its target
//! type is the source's: its Q4_K_M of a Q4_K_M file is that file.

use edgefusion_kernels::efq::{n_tiles, tile_bytes, tile_cols};
use rayon::prelude::*;

use crate::efq::{TileErrors, WIDTHS};

/// One matrix as the allocator sees it.
#[derive(Clone, Copy)]
pub struct AllocationInput<'a> {
    pub n_out: usize,
    pub n_in: usize,
    /// From [`crate::efq::tile_errors`], on one scale across matrices.
    pub errors: &'a [TileErrors],
    /// Bytes the matrix stores besides its tiles' codes (row scales, outliers, header…).
    pub fixed_bytes: usize,
    /// Narrowest width its tiles may get (2 for most matrices), one of [`WIDTHS`].
    pub min_bits: u8,
    /// Widest width its tiles may get, one of [`WIDTHS`], at least `min_bits`.
    pub max_bits: u8,
    /// Bytes of the matrix as its source stores it, when that tensor may be written
    /// unchanged (at zero error); `None`: EFQ only.
    pub source_bytes: Option<usize>,
}

impl AllocationInput<'_> {
    /// Bytes of tile `t` (row group major, as `errors`) at `bits`.
    fn tile_size(&self, t: usize, bits: u8) -> usize {
        tile_bytes(bits, tile_cols(self.n_in, t % n_tiles(self.n_in)))
    }

    /// Bytes of the matrix with every tile at its narrowest width.
    fn min_size(&self) -> usize {
        self.fixed_bytes
            + (0..self.errors.len())
                .map(|t| self.tile_size(t, self.min_bits))
                .sum::<usize>()
    }
}

/// How one matrix is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// EFQ tiles of these widths, one per tile (row group major, as the errors).
    Efq(Vec<u8>),
    /// The source tensor as stored.
    Source,
}

/// What [`allocate`] chose.
#[derive(Debug, Clone)]
pub struct Allocation {
    /// One per input matrix, in order.
    pub encodings: Vec<Encoding>,
    /// Bits per weight reached, every stored byte counted.
    pub bpw: f64,
    /// The summed tile errors of the EFQ matrices (kept ones have none).
    pub error: f64,
}

/// Bytes the budget allows over `matrices`.
fn budget_bytes(matrices: &[AllocationInput<'_>], bpw: f64) -> usize {
    (bpw * params(matrices) as f64 / 8.0).floor() as usize
}

fn params(matrices: &[AllocationInput<'_>]) -> usize {
    matrices.iter().map(|m| m.n_out * m.n_in).sum()
}

/// Chooses every tile's width so that the stored bits of all matrices together stay within
/// `bpw · Σ parameters`, spending bits where they lower the error most per bit (greedy on
/// error reduction per byte, near-optimal for convex per-tile error curves: exact but for
/// the steps skipped when they no longer fit). Returns
/// the widths per matrix and the bits per weight reached, or `None` if even all-2-bit tiles
/// exceed the budget. `source_bytes` is ignored: every matrix is EFQ.
pub fn allocate_widths(matrices: &[AllocationInput<'_>], bpw: f64) -> Option<(Vec<Vec<u8>>, f64)> {
    let kept = vec![false; matrices.len()];
    let chosen = greedy(matrices, &kept, budget_bytes(matrices, bpw))?;
    Some((
        chosen.widths,
        chosen.used as f64 * 8.0 / params(matrices) as f64,
    ))
}

/// Trial keeps ranked best by error removed per extra byte, tried per round.
const TRIES: usize = 4;

/// How far above the budget (bits per weight) a source may be for a trial keep. The errors
/// the allocator weighs are measured before GPTQ and overrate a wide step at a few
/// sensitive matrices, as for wide tiles (`pipeline::default_max_bits`): on SmolLM2's Q4_1
/// (5.0 bits), keeping matrices by trial at 3.1 bpw raised Moby-Dick's ΔPPL from +9.59 to
/// +10.83, while at 4.0 it lowered it from +2.74 to +2.26 and at 4.5 from +1.48 to +0.92.
/// Lossless keeps (a source no larger than its tiles, or every source fitting) are exact
/// and not bounded.
pub const KEEP_ABOVE_BUDGET: f64 = 1.0;

/// [`allocate_widths`] with a second choice per matrix: its source tensor unchanged, at
/// `source_bytes` and zero error. Starting from all-EFQ, a matrix is kept outright when its
/// source takes no more bytes than its tiles were given (lossless and freeing bytes);
/// otherwise, each round, the [`TRIES`] candidates (sources at most [`KEEP_ABOVE_BUDGET`]
/// above `bpw`) that remove the most error per extra byte are tried (in parallel) with the
/// tiles of the rest allocated again, and the best is kept if it lowers the total error. When the budget holds every source, every candidate is
/// kept at once. `None` if even all-2-bit tiles exceed the budget.
pub fn allocate(matrices: &[AllocationInput<'_>], bpw: f64) -> Option<Allocation> {
    let budget = budget_bytes(matrices, bpw);
    let candidates: Vec<bool> = matrices.iter().map(|m| m.source_bytes.is_some()).collect();
    let mut kept = vec![false; matrices.len()];
    let mut best = match greedy(matrices, &candidates, budget) {
        // Every source fits beside the narrowest tiles of the rest: keep them all (zero
        // error wherever a source exists; the rest share what is left).
        Some(all) => {
            kept = candidates;
            all
        }
        None => greedy(matrices, &kept, budget)?,
    };
    loop {
        let freed: Vec<usize> = (0..matrices.len())
            .filter(|&i| !kept[i] && matrices[i].source_bytes.is_some_and(|s| s <= best.bytes[i]))
            .collect();
        if !freed.is_empty() {
            // Keeping them as they are loses nothing and frees bytes; allocating the freed
            // bytes again usually lowers the error further, but the greedy skips steps that
            // do not fit, so take whichever of the two is lower.
            for &i in &freed {
                kept[i] = true;
            }
            let as_is = best.keeping(&freed, matrices);
            // Each kept matrix takes at most what it had: the rest still fits.
            let again = greedy(matrices, &kept, budget).expect("keeping freed bytes");
            best = if again.error <= as_is.error {
                again
            } else {
                as_is
            };
            continue;
        }
        let mut ranked: Vec<(f64, usize)> = matrices
            .iter()
            .enumerate()
            .filter(|&(i, _)| !kept[i])
            .filter_map(|(i, m)| {
                let source = m.source_bytes?;
                let source_bpw = source as f64 * 8.0 / (m.n_out * m.n_in) as f64;
                if source_bpw > bpw + KEEP_ABOVE_BUDGET {
                    return None;
                }
                let extra = source - best.bytes[i];
                Some((best.errors[i] / extra as f64, i))
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let trial = ranked
            .par_iter()
            .take(TRIES)
            .filter_map(|&(_, i)| {
                let mut with = kept.clone();
                with[i] = true;
                greedy(matrices, &with, budget).map(|c| (i, c))
            })
            .min_by(|a, b| a.1.error.total_cmp(&b.1.error));
        match trial {
            Some((i, chosen)) if chosen.error < best.error => {
                kept[i] = true;
                best = chosen;
            }
            _ => break,
        }
    }
    let encodings = kept
        .iter()
        .zip(best.widths)
        .map(|(&k, w)| {
            if k {
                Encoding::Source
            } else {
                Encoding::Efq(w)
            }
        })
        .collect();
    Some(Allocation {
        encodings,
        bpw: best.used as f64 * 8.0 / params(matrices) as f64,
        error: best.error,
    })
}

/// One greedy allocation of the tiles of the matrices not `kept`.
struct Greedy {
    /// Tile widths per matrix (empty for kept ones).
    widths: Vec<Vec<u8>>,
    /// Bytes per matrix (the source's for kept ones).
    bytes: Vec<usize>,
    /// Summed tile errors per matrix (0 for kept ones).
    errors: Vec<f64>,
    used: usize,
    error: f64,
}

/// Index of `bits` in [`WIDTHS`].
fn width_index(bits: u8) -> usize {
    edgefusion_kernels::efq::width_index(bits)
        .unwrap_or_else(|| panic!("{bits} bits is not an EFQ tile width"))
}

impl Greedy {
    /// This allocation with the matrices `newly_kept` (each taking no more than its tiles
    /// did) switched to their sources.
    fn keeping(&self, newly_kept: &[usize], matrices: &[AllocationInput<'_>]) -> Greedy {
        let mut out = Greedy {
            widths: self.widths.clone(),
            bytes: self.bytes.clone(),
            errors: self.errors.clone(),
            used: self.used,
            error: self.error,
        };
        for &i in newly_kept {
            let source = matrices[i]
                .source_bytes
                .expect("a kept matrix has a source size");
            out.used = out.used - out.bytes[i] + source;
            out.widths[i].clear();
            out.bytes[i] = source;
            out.errors[i] = 0.0;
        }
        out.error = out.errors.iter().sum();
        out
    }
}

fn greedy(matrices: &[AllocationInput<'_>], kept: &[bool], budget: usize) -> Option<Greedy> {
    for m in matrices {
        assert!(
            WIDTHS.contains(&m.min_bits)
                && WIDTHS.contains(&m.max_bits)
                && m.min_bits <= m.max_bits,
            "allocate: min_bits {} and max_bits {} must be tile widths {WIDTHS:?}, min ≤ max",
            m.min_bits,
            m.max_bits
        );
    }
    let source = |i: usize| {
        matrices[i]
            .source_bytes
            .expect("only matrices with a source size are kept")
    };
    let mut widths: Vec<Vec<u8>> = matrices
        .iter()
        .zip(kept)
        .map(|(m, &k)| {
            if k {
                Vec::new()
            } else {
                vec![m.min_bits; m.errors.len()]
            }
        })
        .collect();
    let mut bytes: Vec<usize> = (0..matrices.len())
        .map(|i| {
            if kept[i] {
                source(i)
            } else {
                matrices[i].min_size()
            }
        })
        .collect();
    let mut used: usize = bytes.iter().sum();
    if used > budget {
        return None;
    }
    // Max-heap of (gain per byte, matrix, tile) for each tile's next step up.
    let mut heap = std::collections::BinaryHeap::new();
    let next = |bits: u8| WIDTHS[width_index(bits) + 1];
    let step = |m: &AllocationInput<'_>, t: usize, from: u8| {
        let k = width_index(from);
        let gain = m.errors[t][k] - m.errors[t][k + 1];
        let cost = m.tile_size(t, next(from)) - m.tile_size(t, from);
        OrderedGain(gain / cost as f64)
    };
    for (i, (m, w)) in matrices.iter().zip(&widths).enumerate() {
        for (t, &bits) in w.iter().enumerate() {
            if bits < m.max_bits && next(bits) <= m.max_bits {
                heap.push((step(m, t, bits), i, t));
            }
        }
    }
    while let Some((_, i, t)) = heap.pop() {
        let m = &matrices[i];
        let from = widths[i][t];
        let cost = m.tile_size(t, next(from)) - m.tile_size(t, from);
        if used + cost > budget {
            continue;
        }
        used += cost;
        bytes[i] += cost;
        widths[i][t] = next(from);
        if next(from) < m.max_bits && next(next(from)) <= m.max_bits {
            heap.push((step(m, t, next(from)), i, t));
        }
    }
    let errors: Vec<f64> = matrices
        .iter()
        .zip(&widths)
        .map(|(m, w)| {
            w.iter()
                .enumerate()
                .map(|(t, &bits)| m.errors[t][width_index(bits)])
                .sum()
        })
        .collect();
    Some(Greedy {
        error: errors.iter().sum(),
        widths,
        bytes,
        errors,
        used,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedGain(f64);
impl Eq for OrderedGain {}
impl PartialOrd for OrderedGain {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedGain {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::efq::tests::test_matrix;
    use crate::efq::{fixed_bytes, plan, select_outliers, tile_errors};
    use edgefusion_kernels::efq::{TILE_COLS, TILE_ROWS};

    /// The allocator spends the budget, never exceeds it, and favours the tiles whose
    /// error drops most.
    #[test]
    fn allocation_hits_the_budget_and_prefers_sensitive_tiles() {
        let (n_out, n_in) = (64, 576);
        let w = test_matrix(n_out, n_in);
        // Columns of the first tile are 100x more important.
        let h: Vec<f32> = (0..n_in)
            .map(|c| if c < TILE_COLS { 100.0 } else { 1.0 })
            .collect();
        let outliers = select_outliers(&w, n_out, n_in, &h, 0.005);
        let errors = tile_errors(&w, n_out, n_in, &h, &outliers);
        let input = AllocationInput {
            n_out,
            n_in,
            errors: &errors,
            fixed_bytes: fixed_bytes(n_out, n_in, &outliers),
            min_bits: 2,
            max_bits: 8,
            source_bytes: None,
        };
        for bpw in [2.6, 3.1, 3.6, 4.6, 5.5, 7.0] {
            let (widths, reached) = allocate_widths(std::slice::from_ref(&input), bpw).unwrap();
            assert!(
                reached <= bpw && reached > bpw - 0.1,
                "bpw {bpw}: reached {reached}"
            );
            let nt = n_tiles(n_in);
            let first: f64 = (0..n_out / TILE_ROWS)
                .map(|g| widths[0][g * nt] as f64)
                .sum::<f64>();
            let rest: f64 = (0..n_out / TILE_ROWS)
                .flat_map(|g| (1..nt).map(move |t| (g, t)))
                .map(|(g, t)| widths[0][g * nt + t] as f64)
                .sum();
            let (first, rest) = (
                first / (n_out / TILE_ROWS) as f64,
                rest / ((nt - 1) * n_out / TILE_ROWS) as f64,
            );
            assert!(
                first >= rest,
                "bpw {bpw}: important tiles got {first} bits, others {rest}"
            );
            // The stored size the allocator counted is the blob's real size.
            let p = plan(&w, n_out, n_in, &h, &widths[0], &outliers);
            let stored = p.encode(&w).stored_bytes();
            assert!(stored as f64 * 8.0 / (n_out * n_in) as f64 <= bpw + 1e-9);
        }
        assert!(allocate_widths(std::slice::from_ref(&input), 1.5).is_none());
        // A floor is respected and paid for from the same budget.
        let floored = AllocationInput {
            min_bits: 3,
            ..input
        };
        let (widths, reached) = allocate_widths(std::slice::from_ref(&floored), 3.6).unwrap();
        assert!(widths[0].iter().all(|&b| b >= 3) && reached <= 3.6);
        assert!(allocate_widths(std::slice::from_ref(&floored), 3.0).is_none());
        // A cap is respected (6 is never stepped past on the way to 8), leaving the budget
        // unspent rather than exceeding the widest width.
        for cap in [4u8, 6] {
            let capped = AllocationInput {
                max_bits: cap,
                ..floored
            };
            let (widths, reached) = allocate_widths(std::slice::from_ref(&capped), 7.5).unwrap();
            assert!(widths[0].iter().all(|&b| b <= cap), "cap {cap}");
            assert!(reached < cap as f64 + 0.4, "cap {cap}: {reached}");
        }
    }

    /// Two matrices of `test_matrix` rows, the second 10x as sensitive, each with a source
    /// encoding of `source_bpw` bits per weight.
    fn pair(errors: &[Vec<TileErrors>; 2], source_bpw: f64) -> Vec<AllocationInput<'_>> {
        let (n_out, n_in) = (64, 576);
        (0..2)
            .map(|i| AllocationInput {
                n_out,
                n_in,
                errors: &errors[i],
                fixed_bytes: fixed_bytes(n_out, n_in, &[]),
                min_bits: 2,
                max_bits: 8,
                source_bytes: Some((source_bpw * (n_out * n_in) as f64 / 8.0) as usize),
            })
            .collect()
    }

    /// The summed tile errors of [`allocate_widths`]'s all-EFQ allocation at `bpw`.
    fn all_efq_error(inputs: &[AllocationInput<'_>], bpw: f64) -> f64 {
        let (widths, _) = allocate_widths(inputs, bpw).unwrap();
        inputs
            .iter()
            .zip(&widths)
            .flat_map(|(m, w)| {
                w.iter()
                    .enumerate()
                    .map(move |(t, &b)| m.errors[t][width_index(b)])
            })
            .sum()
    }

    fn pair_errors() -> [Vec<TileErrors>; 2] {
        let (n_out, n_in) = (64, 576);
        let w = test_matrix(n_out, n_in);
        let h = vec![1.0f32; n_in];
        let errors = tile_errors(&w, n_out, n_in, &h, &[]);
        let louder = errors
            .iter()
            .map(|e| e.map(|x| 10.0 * x))
            .collect::<Vec<_>>();
        [errors, louder]
    }

    /// Keeping the source never breaks the budget and never raises the error over
    /// all-EFQ; it is taken whole where the budget holds every source, not at all where
    /// it holds none, and for the sensitive matrix first in between.
    #[test]
    fn the_source_is_kept_where_it_pays() {
        let errors = pair_errors();
        let inputs = pair(&errors, 5.0);
        let total = (2 * 64 * 576) as f64;
        for bpw in [2.6, 3.1, 3.8, 4.0, 4.5, 4.9, 5.0, 5.5, 6.0] {
            let a = allocate(&inputs, bpw).unwrap();
            let efq_error = all_efq_error(&inputs, bpw);
            assert!(a.bpw <= bpw, "bpw {bpw}: reached {}", a.bpw);
            assert!(
                a.error <= efq_error * (1.0 + 1e-12),
                "bpw {bpw}: {} > {efq_error}",
                a.error
            );
            // The bytes counted are the bytes stored.
            let stored: usize = inputs
                .iter()
                .zip(&a.encodings)
                .map(|(m, e)| match e {
                    Encoding::Source => m.source_bytes.unwrap(),
                    Encoding::Efq(w) => {
                        m.fixed_bytes
                            + w.iter()
                                .enumerate()
                                .map(|(t, &b)| m.tile_size(t, b))
                                .sum::<usize>()
                    }
                })
                .sum();
            assert!((stored as f64 * 8.0 / total - a.bpw).abs() < 1e-9);
            let kept: Vec<bool> = a.encodings.iter().map(|e| *e == Encoding::Source).collect();
            match bpw {
                // More than KEEP_ABOVE_BUDGET below the sources: no trial keeps.
                b if b < 4.0 => assert_eq!(kept, [false, false], "bpw {bpw}"),
                b if b >= 5.0 => {
                    assert_eq!(kept, [true, true], "bpw {bpw}");
                    assert_eq!(a.error, 0.0);
                }
                _ => assert!(
                    !kept[0] || kept[1],
                    "bpw {bpw}: the quieter matrix kept first"
                ),
            }
        }
        // Somewhere between, the sensitive matrix alone is kept.
        assert!((40..50).any(|tenths| {
            let a = allocate(&inputs, tenths as f64 / 10.0).unwrap();
            a.encodings[1] == Encoding::Source && a.encodings[0] != Encoding::Source
        }));
        // A source smaller than the narrowest tiles is always kept; one without a size never.
        let cheap = pair(&errors, 1.0);
        let a = allocate(&cheap, 2.6).unwrap();
        assert!(a.encodings.iter().all(|e| *e == Encoding::Source));
        let none: Vec<_> = cheap
            .iter()
            .map(|m| AllocationInput {
                source_bytes: None,
                ..*m
            })
            .collect();
        let a = allocate(&none, 6.0).unwrap();
        assert!(a.encodings.iter().all(|e| matches!(e, Encoding::Efq(_))));
        assert!(allocate(&inputs, 1.5).is_none());
        // Mixed: a matrix without a source beside one whose source is cheap.
        let mixed = [none[0], cheap[1]];
        let a = allocate(&mixed, 3.0).unwrap();
        assert!(matches!(a.encodings[0], Encoding::Efq(_)));
        assert_eq!(a.encodings[1], Encoding::Source);
        assert!(a.bpw <= 3.0);
    }

    /// Not every source fits, but one takes fewer bytes than its tiles at this budget: it
    /// is kept outright, its bytes go to the rest, and the error only drops.
    #[test]
    fn a_source_smaller_than_its_tiles_frees_bytes() {
        let errors = pair_errors();
        let three = pair(&errors, 3.5);
        let wide = pair(&errors, 8.0);
        let inputs = [three[0], wide[1]];
        for bpw in [4.0, 4.5, 5.0] {
            let a = allocate(&inputs, bpw).unwrap();
            let efq_error = all_efq_error(&inputs, bpw);
            assert_eq!(a.encodings[0], Encoding::Source, "bpw {bpw}");
            assert!(matches!(a.encodings[1], Encoding::Efq(_)), "bpw {bpw}");
            assert!(a.error < efq_error, "bpw {bpw}");
            assert!(a.bpw <= bpw, "bpw {bpw}: reached {}", a.bpw);
        }
    }
}
