//! Fixtures shared by this crate's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

/// A file of the workspace's `tests/fixtures`.
pub use edgefusion_testkit::fixture;

/// `n` random-looking tokens of the tiny fixture's 512-token vocabulary, from an xorshift
/// generator started at `seed` (reproducible, no dependency).
pub fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 512) as u32
        })
        .collect()
}
