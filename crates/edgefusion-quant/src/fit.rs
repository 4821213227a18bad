//! `quantize --fit`: the budget (bits per weight of the layers' matrices, embedding width)
//! at which a model, one sequence's state at a context length, the runtime's buffers and
//! the process fit a memory size, planned with `edgefusion_runtime::memory`.

use edgefusion_kernels::efq::TILE_COLS;
use edgefusion_model::ModelConfig;
use edgefusion_runtime::memory::{self, MemoryPlan};
use edgefusion_runtime::SessionOptions;

use crate::QuantError;

/// Code widths an EFQ tile may have, narrowest and widest.
const MIN_BITS: u8 = 2;
const MAX_BITS: u8 = 4;

/// Bits per weight of EFQ at `bits`-bit codes on rows of `n_in`, every stored byte counted
/// except the blob's fixed header: the codes, a u8 scale and a 4-bit zero per 128-column
/// block, an f16 scale per row.
pub fn efq_bpw(bits: u8, n_in: usize) -> f64 {
    bits as f64 + 12.0 / TILE_COLS as f64 + 16.0 / n_in.max(1) as f64
}

/// A size in bytes from text with a unit: `4GB`, `3.5GiB`, `800MB`, `512MiB`, `64kB`
/// (decimal units are powers of 1000, binary ones of 1024).
pub fn parse_size(text: &str) -> Result<u64, QuantError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let bad = |why: &str| {
        QuantError::Input(format!(
            "--fit {text:?}: {why} (write a number and a unit: 4GB, 3.5GiB, 800MB, 512MiB)"
        ))
    };
    let value: f64 = number.parse().map_err(|_| bad("no number"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" => return Err(bad("no unit")),
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(bad("not a positive size"));
    }
    Ok(bytes as u64)
}

/// A budget that fits, and what it comes to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitPlan {
    /// `--bpw` to ask for (layers' linear matrices).
    pub linear_bpw: f64,
    /// `--embedding-bits`.
    pub embedding_bits: u8,
    pub memory: MemoryPlan,
}

/// Bytes of an EFQ file of `cfg` at `linear_bpw` and `embedding_bits`, plus `metadata`
/// bytes of header (tokenizer, hyperparameters), rounded up to what the allocator can reach.
pub fn weight_bytes(
    cfg: &ModelConfig,
    linear_bpw: f64,
    embedding_bits: u8,
    metadata: usize,
) -> usize {
    let linear = cfg.n_block_params() as f64 * linear_bpw / 8.0;
    let n_embd = if cfg.tied_embeddings { 1 } else { 2 };
    let embedding =
        (n_embd * cfg.vocab_size * cfg.d_model) as f64 * efq_bpw(embedding_bits, cfg.d_model) / 8.0;
    let norms = 4 * (2 * cfg.n_layers + 1) * cfg.d_model;
    metadata + (linear + embedding).ceil() as usize + norms
}

/// The highest budget whose plan fits `budget` bytes at `opts` (context, threads): the
/// widest embedding first, then the most bits per linear weight (in steps of 0.01).
///
/// # Errors
/// A context of 0, or a budget below the smallest plan (2-bit tiles and embedding); the
/// message gives that plan's size.
pub fn fit(
    cfg: &ModelConfig,
    budget: u64,
    opts: &SessionOptions,
    metadata: usize,
) -> Result<FitPlan, QuantError> {
    if opts.n_ctx == 0 {
        return Err(QuantError::Input(
            "--ctx 0: the plan needs a context of at least 1 position".into(),
        ));
    }
    let n_in = cfg.d_model.min(cfg.d_ff).max(1);
    let lowest = efq_bpw(MIN_BITS, n_in);
    let highest = efq_bpw(MAX_BITS, n_in);
    let plan_at = |bpw: f64, bits: u8| FitPlan {
        linear_bpw: bpw,
        embedding_bits: bits,
        memory: memory::plan(cfg, weight_bytes(cfg, bpw, bits, metadata), opts),
    };
    for bits in (MIN_BITS..=MAX_BITS).rev() {
        if plan_at(lowest, bits).memory.total() as u64 > budget {
            continue;
        }
        // Bisect on hundredths of a bit: the plan grows with the budget.
        let (mut lo, mut hi) = (
            (lowest * 100.0).ceil() as u32,
            (highest * 100.0).floor() as u32,
        );
        if plan_at(hi as f64 / 100.0, bits).memory.total() as u64 <= budget {
            return Ok(plan_at(hi as f64 / 100.0, bits));
        }
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if plan_at(mid as f64 / 100.0, bits).memory.total() as u64 <= budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        return Ok(plan_at(lo as f64 / 100.0, bits));
    }
    let smallest = plan_at(lowest, MIN_BITS).memory;
    Err(QuantError::Input(format!(
        "--fit {:.1} MiB is below the smallest plan at context {}: {} (2-bit tiles and embedding); raise --fit to at least {:.0} MiB or lower --ctx",
        budget as f64 / (1u64 << 20) as f64,
        opts.n_ctx,
        smallest.describe(),
        (smallest.total() as f64 / (1u64 << 20) as f64).ceil()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        use edgefusion_model::config::{Arch, RopeScaling, RopeStyle};
        ModelConfig {
            arch: Arch::Llama,
            name: "SmolLM2-135M shapes".into(),
            n_layers: 30,
            d_model: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            d_ff: 1536,
            vocab_size: 49152,
            n_ctx_train: 8192,
            rms_eps: 1e-5,
            rope_base: 100_000.0,
            rope_dim: 64,
            rope_style: RopeStyle::Normal,
            rope_scaling: RopeScaling::None,
            tied_embeddings: true,
            layer_types: vec![edgefusion_model::LayerType::Attention; 30],
            ssm_d_state: 0,
            ssm_d_conv: 0,
            window: 0,
            sink: 0,
        }
    }

    #[test]
    fn sizes_need_a_unit() {
        assert_eq!(parse_size("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_size("3.5GiB").unwrap(), 3_758_096_384);
        assert_eq!(parse_size(" 512 MiB ").unwrap(), 512 << 20);
        for bad in ["4", "4 parsecs", "GB", "-1GB", "0GB", ""] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("--fit") && e.contains("4GB"), "{bad}: {e}");
        }
        assert!(parse_size("4").unwrap_err().to_string().contains("no unit"));
    }

    #[test]
    fn the_plan_fits_and_uses_the_budget() {
        let cfg = smollm2();
        let opts = SessionOptions::new(4096, 2);
        for mib in [170u64, 185, 200, 400] {
            let budget = mib << 20;
            let p = fit(&cfg, budget, &opts, 0).unwrap();
            assert!(p.memory.total() as u64 <= budget, "{mib}: {p:?}");
            // A hundredth of a bit more would not fit, unless the widest budget was reached.
            if p.linear_bpw < efq_bpw(MAX_BITS, 576) - 0.01 {
                let more = weight_bytes(&cfg, p.linear_bpw + 0.01, p.embedding_bits, 0);
                assert!(
                    memory::plan(&cfg, more, &opts).total() as u64 > budget,
                    "{mib}"
                );
            }
        }
        // More memory never gives fewer bits.
        let a = fit(&cfg, 175 << 20, &opts, 0).unwrap();
        let b = fit(&cfg, 195 << 20, &opts, 0).unwrap();
        assert!((b.embedding_bits, b.linear_bpw) >= (a.embedding_bits, a.linear_bpw));
    }

    #[test]
    fn a_budget_below_every_plan_names_the_smallest() {
        let cfg = smollm2();
        let opts = SessionOptions::new(4096, 2);
        let e = fit(&cfg, 60 << 20, &opts, 0).unwrap_err().to_string();
        assert!(e.contains("raise --fit to at least"), "{e}");
        let smallest: u64 = e
            .split("at least ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        // That size does fit.
        assert!(fit(&cfg, smallest << 20, &opts, 0).is_ok());
        let zero = SessionOptions::new(0, 2);
        assert!(fit(&cfg, 1 << 30, &zero, 0)
            .unwrap_err()
            .to_string()
            .contains("--ctx 0"));
    }
}
