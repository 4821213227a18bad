//! Test support shared by every crate's tests (a dev-dependency only).
//!
//! - [`fixture`]: the path of a file in `tests/fixtures/`.
//! - [`asset`]: a fetched asset (model, text, tasks) or a loud skip, which becomes a failure
//!   under `EDGEFUSION_REQUIRE_ASSETS=1` (CI), so a missing download cannot pass silently.
//! - [`max_rel_error`], [`max_abs_diff`]: error metrics that fail on NaN, infinities,
//!   empty or mismatched inputs instead of ignoring them (`f32::max` drops a NaN).
//! - [`Rng`]: a small seeded generator for test inputs.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures/<name>` in the workspace.
pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(name)
}

/// Whether missing assets must fail the test (`EDGEFUSION_REQUIRE_ASSETS=1`).
pub fn assets_required() -> bool {
    std::env::var("EDGEFUSION_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// The fetched assets: `EDGEFUSION_ASSETS`, else `assets/` in the workspace.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("EDGEFUSION_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("assets"))
}

/// `<assets>/<rel>` when it exists. When it does not: under `EDGEFUSION_REQUIRE_ASSETS=1` a
/// panic naming it and the `scripts/fetch-assets.sh` flag that fetches it (`fetch_flag`,
/// e.g. `--model`), else a `SKIPPED` line on stderr and `None` (the caller skips).
pub fn asset(rel: &str, fetch_flag: &str) -> Option<PathBuf> {
    let path = assets_dir().join(rel);
    if path.exists() {
        return Some(path);
    }
    let message = format!(
        "{} is missing: run scripts/fetch-assets.sh {fetch_flag}",
        path.display()
    );
    assert!(
        !assets_required(),
        "{message} (EDGEFUSION_REQUIRE_ASSETS=1)"
    );
    eprintln!("SKIPPED: {message}");
    None
}

/// Checks that two slices can be compared element by element and hold only finite values.
fn check_pair(a: &[f32], b: &[f32]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("lengths differ: {} against {}", a.len(), b.len()));
    }
    if a.is_empty() {
        return Err("nothing to compare: both are empty".into());
    }
    for (name, xs) in [("first", a), ("second", b)] {
        if let Some(i) = xs.iter().position(|v| !v.is_finite()) {
            return Err(format!("the {name} holds {} at index {i}", xs[i]));
        }
    }
    Ok(())
}

/// The largest `|a - b|`.
///
/// # Panics
/// When the lengths differ, both are empty, or either holds a NaN or an infinity.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if let Err(e) = check_pair(a, b) {
        panic!("max_abs_diff: {e}");
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest `|ours - reference|`, relative to the largest `|reference|`.
///
/// # Panics
/// As [`max_abs_diff`], and when the reference is all zeros.
pub fn max_rel_error(ours: &[f32], reference: &[f32]) -> f32 {
    if let Err(e) = check_pair(ours, reference) {
        panic!("max_rel_error: {e}");
    }
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "max_rel_error: the reference is all zeros");
    max_abs_diff(ours, reference) / scale
}

/// SplitMix64: a seeded generator for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f32 {
        self.next_f32() * 2.0 - 1.0
    }

    /// `n` values uniform in [-1, 1).
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed()).collect()
    }

    /// `n` tokens below `vocab`.
    pub fn tokens(&mut self, n: usize, vocab: u32) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_fail_on_nan_infinity_empty_and_short_input() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!((max_rel_error(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        let cases: [(&[f32], &[f32]); 5] = [
            (&[f32::NAN, 1.0], &[1.0, 1.0]),
            (&[1.0, 1.0], &[1.0, f32::NAN]),
            (&[f32::INFINITY], &[1.0]),
            (&[], &[]),
            (&[1.0], &[1.0, 2.0]),
        ];
        for (a, b) in cases {
            let abs = std::panic::catch_unwind(|| max_abs_diff(a, b));
            let rel = std::panic::catch_unwind(|| max_rel_error(a, b));
            assert!(abs.is_err() && rel.is_err(), "{a:?} against {b:?} passed");
        }
        assert!(std::panic::catch_unwind(|| max_rel_error(&[0.0], &[0.0])).is_err());
    }

    #[test]
    fn fixtures_resolve_from_the_workspace_root() {
        assert!(fixture("tiny-llama-f32.gguf").exists());
    }

    #[test]
    fn the_rng_is_seeded_and_in_range() {
        let a = Rng::new(7).values(1000);
        assert_eq!(a, Rng::new(7).values(1000));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(Rng::new(1).tokens(100, 5).iter().all(|&t| t < 5));
    }
}
