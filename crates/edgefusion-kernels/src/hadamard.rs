//! Randomized Hadamard transform (RHT) on 64-column blocks: the incoherence processing of
//! EFQ v2 (QuIP#, QuaRot).
//!
//! A matrix `W (n_out, n_in)` is stored as `W·R` and its input `x` is read as `x·R`, where
//! `R = diag(s) · blockdiag(H₆₄ / 8)` is orthogonal (`s` a fixed ±1 per column, `H₆₄` the
//! Sylvester–Hadamard matrix): `(W·R)(x·R)ᵀ = W·xᵀ`. Rotated rows have no heavy
//! coordinates, so a block's grid spends its levels on the bulk of the weights instead of
//! stretching to a few outliers; and the rotation costs `6 · n_in` additions per token.
//!
//! The signs depend on the column index alone, so every matrix reading the same input
//! shares one rotated activation.

/// Columns per Hadamard block.
pub const BLOCK: usize = 64;

/// Whether column `c`'s sign is negative: a fixed pseudo-random ±1 per column (one
/// splitmix64 hash per block of 64 columns, one bit per column).
#[inline]
fn negative(c: usize) -> bool {
    let mut z = ((c / BLOCK) as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> (c % BLOCK)) & 1 == 1
}

/// Numbers the transform runs on (f32 for weights and activations, f64 for Hessians).
pub trait Scalar:
    Copy + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Neg<Output = Self>
{
    /// `1 / √BLOCK`, exact in binary.
    const NORM: Self;
    fn mul(self, other: Self) -> Self;
}

impl Scalar for f32 {
    const NORM: f32 = 0.125;
    #[inline]
    fn mul(self, other: f32) -> f32 {
        self * other
    }
}

impl Scalar for f64 {
    const NORM: f64 = 0.125;
    #[inline]
    fn mul(self, other: f64) -> f64 {
        self * other
    }
}

/// `blk ← blk · H₆₄ / 8` (the normalized Hadamard is symmetric and its own inverse).
#[inline]
fn hadamard_block<T: Scalar>(blk: &mut [T]) {
    debug_assert_eq!(blk.len(), BLOCK);
    let mut len = 1;
    while len < BLOCK {
        for i0 in (0..BLOCK).step_by(2 * len) {
            for j in i0..i0 + len {
                let (a, b) = (blk[j], blk[j + len]);
                blk[j] = a + b;
                blk[j + len] = a - b;
            }
        }
        len *= 2;
    }
    for v in blk.iter_mut() {
        *v = v.mul(T::NORM);
    }
}

/// Whether a row of `n` columns can be rotated.
pub fn fits(n: usize) -> bool {
    n > 0 && n.is_multiple_of(BLOCK)
}

/// Panics unless a run of `len` columns at column `first` is whole Hadamard blocks.
fn check_run(len: usize, first: usize) {
    assert!(
        fits(len) && first.is_multiple_of(BLOCK),
        "RHT of {len} columns at {first}: both must be multiples of {BLOCK}"
    );
}

/// `x ← x · R` for a run of columns starting at column `first` (both multiples of 64).
pub fn rotate<T: Scalar>(x: &mut [T], first: usize) {
    check_run(x.len(), first);
    for (b, blk) in x.chunks_exact_mut(BLOCK).enumerate() {
        for (i, v) in blk.iter_mut().enumerate() {
            if negative(first + b * BLOCK + i) {
                *v = -*v;
            }
        }
        hadamard_block(blk);
    }
}

/// `x ← x · Rᵀ`, the inverse of [`rotate`].
pub fn unrotate<T: Scalar>(x: &mut [T], first: usize) {
    check_run(x.len(), first);
    for (b, blk) in x.chunks_exact_mut(BLOCK).enumerate() {
        hadamard_block(blk);
        for (i, v) in blk.iter_mut().enumerate() {
            if negative(first + b * BLOCK + i) {
                *v = -*v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R as an explicit matrix, built from the definition (H₆₄[i][j] = (−1)^popcount(i&j)).
    fn explicit(n: usize) -> Vec<f64> {
        let mut r = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                if i / BLOCK == j / BLOCK {
                    let h = if ((i % BLOCK) & (j % BLOCK)).count_ones().is_multiple_of(2) {
                        1.0
                    } else {
                        -1.0
                    };
                    let s = if negative(i) { -1.0 } else { 1.0 };
                    r[i * n + j] = s * h / 8.0;
                }
            }
        }
        r
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    #[test]
    fn rotate_is_x_times_the_explicit_matrix() {
        let n = 3 * BLOCK;
        let r = explicit(n);
        let x = values(n, 1);
        let mut fast = x.clone();
        rotate(&mut fast, 0);
        for j in 0..n {
            let slow: f64 = (0..n).map(|i| x[i] * r[i * n + j]).sum();
            assert!(
                (fast[j] - slow).abs() < 1e-12,
                "column {j}: {} vs {slow}",
                fast[j]
            );
        }
        // A run starting later uses the same columns' signs.
        let mut tail = x[BLOCK..].to_vec();
        rotate(&mut tail, BLOCK);
        assert_eq!(tail, fast[BLOCK..]);
    }

    #[test]
    fn unrotate_inverts_and_dot_products_survive() {
        let n = 9 * BLOCK; // SmolLM2's 576
        let (w, x) = (values(n, 2), values(n, 3));
        let (mut wr, mut xr) = (w.clone(), x.clone());
        rotate(&mut wr, 0);
        rotate(&mut xr, 0);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        assert!((dot(&w, &x) - dot(&wr, &xr)).abs() < 1e-12);
        unrotate(&mut wr, 0);
        for (a, b) in wr.iter().zip(&w) {
            assert!((a - b).abs() < 1e-14);
        }
        // f32 agrees with f64.
        let mut x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        rotate(&mut x32, 0);
        for (a, b) in x32.iter().zip(&xr) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn spreads_a_spike_over_its_block() {
        let mut x = vec![0.0f32; 2 * BLOCK];
        x[5] = 8.0;
        rotate(&mut x, 0);
        assert!(x[..BLOCK].iter().all(|v| v.abs() == 1.0));
        assert!(x[BLOCK..].iter().all(|&v| v == 0.0));
    }

    #[test]
    #[should_panic(expected = "multiples of 64")]
    fn refuses_a_partial_block() {
        rotate(&mut [0.0f32; 96], 0);
    }
}
