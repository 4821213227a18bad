//! `quantize --fit`: the budget (bits per weight of the layers' matrices, embedding width)
//! at which a model, one sequence's state at a context length, the runtime's buffers and
//! the process fit a memory size, planned with `edgefusion_runtime::memory`.

use edgefusion_kernels::efq::{n_tiles, tile_bytes, tile_cols, TILE_ROWS};
use edgefusion_model::{ssm_role, LayerType, ModelConfig, SsmParams};
use edgefusion_runtime::memory::{self, MemoryPlan};
use edgefusion_runtime::SessionOptions;

use crate::efq::{fixed_bytes, WIDTHS};
use crate::QuantError;

/// Code widths an EFQ tile may have, narrowest and widest.
const MIN_BITS: u8 = WIDTHS[0];
const MAX_BITS: u8 = WIDTHS[WIDTHS.len() - 1];

/// Layers' linear bits per weight below which the layers lose more than a narrower
/// embedding does (SmolLM2 at 3.1 bpw: the 4-bit embedding costs ~2 PPL, the layers going
/// from 3.1 to 2.5 bpw far more): `fit` narrows the embedding before going below it.
const LAYERS_FIRST_BPW: f64 = 3.0;

/// The fewest bits per linear weight the layers keep beside a `bits`-wide embedding: at
/// least [`LAYERS_FIRST_BPW`], and no more than one bit below the embedding (a wider
/// embedding than that buys less than the same bytes spent on the layers).
fn layers_floor(embedding_bits: u8) -> f64 {
    LAYERS_FIRST_BPW.max(embedding_bits as f64 - 1.0)
}

/// Bytes of one EFQ blob `(n_out, n_in)` with every tile `bits` wide and no outliers:
/// every stored byte (header, widths, row scales, tiles with their scales and zeros).
pub fn blob_bytes(n_out: usize, n_in: usize, bits: u8) -> usize {
    blob_bytes_with_outliers(n_out, n_in, bits, &[])
}

/// [`blob_bytes`] with the slots of `outliers` (as `crate::efq::select_outliers` gives them).
pub fn blob_bytes_with_outliers(
    n_out: usize,
    n_in: usize,
    bits: u8,
    outliers: &[(u32, u32)],
) -> usize {
    let tiles: usize = (0..n_tiles(n_in))
        .map(|t| tile_bytes(bits, tile_cols(n_in, t)))
        .sum();
    fixed_bytes(n_out, n_in, outliers) + (n_out / TILE_ROWS) * tiles
}

/// The SSM projections EFQ quantizes within the `--bpw` budget, as `(n_out, n_in)`: those
/// `pipeline::efq_takes` (C, B, x and the output, where they tile).
fn ssm_matrices(cfg: &ModelConfig) -> Vec<(usize, usize)> {
    let dims = cfg.ssm_dims();
    SsmParams::<()>::NAMES
        .iter()
        .filter_map(|&name| Some((name, dims.matrix_shape(name)?)))
        .filter(|&(name, (o, i))| crate::pipeline::efq_takes(ssm_role(name), o, i))
        .map(|(_, shape)| shape)
        .collect()
}

/// The layers' matrices EFQ quantizes within the `--bpw` budget, as `(n_out, n_in)`:
/// attention, feed-forward and the SSM projections of [`ssm_matrices`].
fn layer_matrices(cfg: &ModelConfig) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for l in 0..cfg.n_layers {
        if cfg.layer_types.get(l) == Some(&LayerType::Ssm) {
            out.extend(ssm_matrices(cfg));
        }
        if cfg.has_attention_weights(l) {
            out.extend([
                (cfg.q_dim(), cfg.d_model),
                (cfg.kv_dim(), cfg.d_model),
                (cfg.kv_dim(), cfg.d_model),
                (cfg.d_model, cfg.q_dim()),
            ]);
        }
        out.extend([
            (cfg.d_ff, cfg.d_model),
            (cfg.d_ff, cfg.d_model),
            (cfg.d_model, cfg.d_ff),
        ]);
    }
    out
}

/// Bits per weight of the layers' matrices with every tile `bits` wide: the least (2) and
/// most (8) that `--bpw` can ask for.
pub fn layers_bpw_at(cfg: &ModelConfig, bits: u8) -> f64 {
    let m = layer_matrices(cfg);
    let params: usize = m.iter().map(|(o, i)| o * i).sum();
    let bytes: usize = m.iter().map(|&(o, i)| blob_bytes(o, i, bits)).sum();
    bytes as f64 * 8.0 / params.max(1) as f64
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
/// bytes of header (tokenizer, hyperparameters).
pub fn weight_bytes(
    cfg: &ModelConfig,
    linear_bpw: f64,
    embedding_bits: u8,
    metadata: usize,
) -> usize {
    let params: usize = layer_matrices(cfg).iter().map(|(o, i)| o * i).sum();
    let linear = (params as f64 * linear_bpw / 8.0).ceil() as usize;
    let n_embd = if cfg.tied_embeddings { 1 } else { 2 };
    let embedding = n_embd * blob_bytes(cfg.vocab_size, cfg.d_model, embedding_bits);
    // The rest of each SSM mixer keeps its source type (f32 counted: the most a source
    // holds); norms and biases are f32.
    let ssm_quantized: usize = ssm_matrices(cfg).iter().map(|(o, i)| o * i).sum();
    let ssm = 4 * cfg.count_layers(LayerType::Ssm) * (cfg.ssm_params() - ssm_quantized);
    let small = 4 * (cfg.n_params() - cfg.n_block_params() - n_embd * cfg.vocab_size * cfg.d_model);
    metadata + linear + embedding + ssm + small
}

/// The budget that fits `budget` bytes at `opts` (context, threads): the widest embedding
/// whose plan leaves the layers at least [`layers_floor`] bits per weight, then the most
/// bits per linear weight (in hundredths); below that, the embedding width that leaves the
/// layers the most.
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
    // Hundredths of a bit the allocator can reach: all-2-bit tiles (rounded up) to
    // all-8-bit tiles (rounded down).
    let lowest = (layers_bpw_at(cfg, MIN_BITS) * 100.0).ceil() as u32;
    let highest = (layers_bpw_at(cfg, MAX_BITS) * 100.0).floor() as u32;
    let plan_at = |hundredths: u32, bits: u8| FitPlan {
        linear_bpw: hundredths as f64 / 100.0,
        embedding_bits: bits,
        memory: memory::plan(
            cfg,
            weight_bytes(cfg, hundredths as f64 / 100.0, bits, metadata),
            opts,
        ),
    };
    let fits = |p: &FitPlan| p.memory.total() as u64 <= budget;
    // The most bits per linear weight that fit with a `bits`-wide embedding.
    let best_at = |bits: u8| -> Option<FitPlan> {
        if !fits(&plan_at(lowest, bits)) {
            return None;
        }
        if fits(&plan_at(highest, bits)) {
            return Some(plan_at(highest, bits));
        }
        // lowest fits, highest does not; the plan grows with the budget.
        let (mut lo, mut hi) = (lowest, highest);
        while lo + 1 < hi {
            let mid = (lo + hi) / 2;
            if fits(&plan_at(mid, bits)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(plan_at(lo, bits))
    };
    let plans: Vec<FitPlan> = WIDTHS.iter().rev().filter_map(|&b| best_at(b)).collect();
    if let Some(p) = plans
        .iter()
        .find(|p| p.linear_bpw >= layers_floor(p.embedding_bits))
    {
        return Ok(*p);
    }
    if let Some(p) = plans.iter().max_by(|a, b| {
        a.linear_bpw
            .total_cmp(&b.linear_bpw)
            .then(a.embedding_bits.cmp(&b.embedding_bits))
    }) {
        return Ok(*p);
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
            block: Default::default(),
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
            if p.linear_bpw < layers_bpw_at(&cfg, MAX_BITS) - 0.01 {
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

    /// The extremes are the real sizes of all-2-bit and all-4-bit blobs (the allocator
    /// cannot go outside them), and the embedding follows the layers-first rule.
    #[test]
    fn extremes_are_real_blob_sizes() {
        use crate::allocate::{allocate_widths, AllocationInput};
        let cfg = smollm2();
        let (lo, hi) = (layers_bpw_at(&cfg, 2), layers_bpw_at(&cfg, 8));
        assert!(
            lo > 2.12 && lo < 2.14 && hi > 8.16 && hi < 8.18,
            "{lo} {hi}"
        );
        // The allocator reaches the lowest plan (rounded up) and refuses just below it.
        let errors = vec![[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]; (576 / 16) * n_tiles(1536)];
        let input = AllocationInput {
            n_out: 576,
            n_in: 1536,
            errors: &errors,
            fixed_bytes: fixed_bytes(576, 1536, &[]),
            min_bits: 2,
            max_bits: 8,
            source_bytes: None,
        };
        let own = blob_bytes(576, 1536, 2) as f64 * 8.0 / (576.0 * 1536.0);
        assert!(
            allocate_widths(std::slice::from_ref(&input), (own * 100.0).ceil() / 100.0).is_some()
        );
        assert!(allocate_widths(std::slice::from_ref(&input), own - 0.001).is_none());
        let opts = SessionOptions::new(4096, 2);
        // Generous: 8-bit embedding and layers; middling: the embedding at most a bit wider
        // than the layers; tight: the embedding narrows before the layers drop below 3 bits
        // per weight.
        let roomy = fit(&cfg, 400 << 20, &opts, 0).unwrap();
        assert_eq!(roomy.embedding_bits, 8);
        assert!(roomy.linear_bpw > 8.1, "{roomy:?}");
        let middling = fit(&cfg, 230 << 20, &opts, 0).unwrap();
        assert!(
            middling.linear_bpw >= middling.embedding_bits as f64 - 1.0
                && middling.linear_bpw < 8.0,
            "{middling:?}"
        );
        let tight = fit(&cfg, 182 << 20, &opts, 0).unwrap();
        assert!(
            tight.linear_bpw >= LAYERS_FIRST_BPW || tight.embedding_bits == 2,
            "{tight:?}"
        );
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
