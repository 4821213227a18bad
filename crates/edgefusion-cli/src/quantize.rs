//! `edgefusion quantize`: a model into EFQ, EdgeFusion's adaptive low-bit format (2- to 8-bit tiles).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use edgefusion_model::ModelConfig;
use edgefusion_quant::fit;
use edgefusion_quant::pipeline::{self, Calibration, Method, QuantizeOptions};
use edgefusion_runtime::SessionOptions;
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::ModelArgs;

fn efq_block() -> usize {
    edgefusion_kernels::efq::TILE_COLS
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    /// Adaptive 2- to 8-bit tiles for a bits-per-weight budget (or a memory size, --fit),
    /// rotated matrices, fitted grids, GPTQ with calibration.
    Efq,
    /// GPTQ at a uniform width (--bits), no outliers: the paper's GPTQ column.
    Gptq,
    /// Round to nearest at a uniform width (--bits), no outliers: the baseline.
    Rtn,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AllocationArg {
    /// Errors weighted by each matrix's measured end-to-end cost.
    Sensitivity,
    /// Relative output errors, every matrix alike.
    Relative,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion quantize --output smollm2.efq.gguf                # efq at 3.1 bits per weight\n  \
    edgefusion quantize --output smollm2.rtn3.gguf --method rtn --bits 3\n  \
    edgefusion perplexity -m smollm2.efq.gguf -f assets/text/moby-dick.txt --chunks 20\n\n\
    Every stored byte counts in --bpw: codes, block scales, zero points, row scales,\n\
    outliers and their indices, over the layers' attention and feed-forward matrices.\n\
    The token embedding and output head are stored at --embedding-bits (EFQ tiles of one\n\
    width plus outliers) and reported on their own; the file's bits per parameter count\n\
    everything. The input is a GGUF file or a Hugging Face folder (converted on the way,\n\
    as `edgefusion convert` does). The output is a GGUF file that run, bench, perplexity\n\
    and inspect load; `edgefusion inspect FILE` shows the tile widths per role and layer.")]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write the quantized model (written atomically: all or nothing).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// How codes are chosen.
    #[arg(long, value_enum, default_value_t = MethodArg::Efq)]
    pub method: MethodArg,
    /// Average bits per weight over the layers' linear matrices, every overhead included (efq).
    #[arg(long, default_value_t = 3.1)]
    pub bpw: f64,
    /// Code width for --method rtn and gptq: 2, 3, 4, 5, 6 or 8.
    #[arg(long, default_value_t = 3, value_parser = parse_width)]
    pub bits: u8,
    /// Columns per block. EFQ stores 128-column blocks (the last one of a row may be
    /// narrower); the flag exists so that scripts can state it.
    #[arg(long, default_value_t = 128)]
    pub block: usize,
    /// Share of each matrix's weights kept as 6-bit outliers (efq). Rotated matrices have
    /// no outliers worth their 24 bits each (on SmolLM2 at 3.1 bpw, rotated: PPL 35.8 with
    /// none, 38.9 with 0.005); with --no-rotate, 0.005 helps.
    #[arg(long, default_value_t = 0.0)]
    pub outliers: f64,
    /// Calibration text (UTF-8) the model reads to weigh errors by what each layer sees;
    /// never the text you evaluate on. "none" quantizes without calibration.
    #[arg(long, default_value = crate::common::CALIBRATION_TEXT)]
    pub calib: String,
    /// Calibration tokens to read (windows of --calib-ctx).
    #[arg(long, default_value_t = 16384)]
    pub calib_tokens: usize,
    /// Tokens per calibration window (at most the model's training context): the positions
    /// the statistics are gathered at.
    #[arg(long, default_value_t = 512)]
    pub calib_ctx: usize,
    /// Which windows of the calibration text are read: 0 reads it from the start, any
    /// other seed a seeded random choice of windows. Same seed, same output file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPTQ processes columns in their stored order instead of by decreasing Hessian
    /// diagonal (act-order, the default: the most important columns are rounded first,
    /// while the most error can still be compensated; on SmolLM2 at 3.1 bpw, PPL 35.8 ->
    /// 35.2 on Moby-Dick). The grids are fixed before GPTQ runs, so the file's layout and
    /// speed do not change.
    #[arg(long)]
    pub no_act_order: bool,
    /// Accepted for scripts written before act-order became the default; changes nothing.
    #[arg(long, hide = true)]
    pub act_order: bool,
    /// How the bit allocation compares matrices (efq with calibration). `sensitivity`:
    /// by each matrix's measured end-to-end cost, the KL divergence of the predictions when
    /// it alone is rounded to 2 bits (one extra forward pass per matrix; on SmolLM2 at 3.1
    /// bpw, PPL 53.7 -> 44.0). `relative`: by relative output error alone (faster).
    #[arg(long, value_enum, default_value_t = AllocationArg::Sensitivity)]
    pub allocation: AllocationArg,
    /// Code width of the token embedding and output head (efq), outside the --bpw budget:
    /// 2, 3, 4, 5, 6 or 8. Their errors reach every layer through the lookup (and every
    /// logit through the head). Default: 6, or the layers' widest tile when that is wider
    /// (on SmolLM2 at 3.1 bpw, PPL 35.2 with 4 bits, 34.4 with 6).
    #[arg(long, value_parser = parse_width)]
    pub embedding_bits: Option<u8>,
    /// Widest tile the allocator may give the layers (efq): 2, 3, 4, 5, 6 or 8. Default: the
    /// narrowest width of at least ⌈--bpw⌉ (3.1 -> 4, 5.0 -> 5, 5.5 -> 6); wider tiles at a
    /// low budget starve the rest (SmolLM2 at 3.1 bpw: PPL 34.4 up to 4 bits, 35.9 up to 8).
    #[arg(long, value_parser = parse_width)]
    pub max_bits: Option<u8>,
    /// Keep the block scales GPTQ rounded with. By default every row's block scales are
    /// solved again after GPTQ by least squares against the layer's input statistics, the
    /// codes fixed (a closed-form layer-wise reconstruction).
    #[arg(long)]
    pub no_refit: bool,
    /// Store matrices as they are instead of rotated. By default every matrix whose rows
    /// are a multiple of 64 long is stored as W·R, R a randomized Hadamard transform on
    /// 64-column blocks, and the kernels rotate its input to match (6 additions per input
    /// value): rotated rows have no outliers for a block's grid to stretch to (on SmolLM2,
    /// GPTQ 3-bit: PPL 55.9 -> 34.2 on Moby-Dick).
    #[arg(long)]
    pub no_rotate: bool,
    /// Re-encode every matrix in EFQ. By default a layer matrix whose source tensor
    /// (Q4_1, Q4_K, Q6_K, ...) the --bpw budget holds is written unchanged where that lowers
    /// the total error, and the embedding and head keep their source tensor where it takes
    /// no more bytes than their EFQ width: the source is the reference, so a kept matrix
    /// loses nothing (efq). --max-bits bounds EFQ tiles, not kept tensors.
    #[arg(long)]
    pub no_keep_source: bool,
    /// Fit a memory size instead of asking for --bpw: choose the embedding width and the
    /// bits per weight so that the weights, one sequence's KV cache or SSM state at --ctx,
    /// the runtime's buffers and the process fit, print the plan, then quantize (efq). Sizes
    /// take a unit: 4GB, 3.5GiB, 800MB, 512MiB. `edgefusion run --profile` prints the
    /// measured peak beside the same plan.
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["bpw", "embedding_bits"])]
    pub fit: Option<String>,
    /// Context length the --fit plan holds state for.
    #[arg(long, default_value_t = 4096, requires = "fit")]
    pub ctx: usize,
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

/// A code width EFQ tiles have, for `--bits` and `--embedding-bits`.
fn parse_width(text: &str) -> std::result::Result<u8, String> {
    use edgefusion_quant::efq::WIDTHS;
    match text.trim().parse::<u8>() {
        Ok(bits) if WIDTHS.contains(&bits) => Ok(bits),
        _ => Err(format!("EFQ tiles have {WIDTHS:?} bits, not {text:?}")),
    }
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if !(2.0..=8.0).contains(&args.bpw) {
        bail!(
            "--bpw {} is outside 2.0..=8.0 (2- to 8-bit tiles, every overhead counted: about 2.13 to 8.17)",
            args.bpw
        );
    }
    if args.block != efq_block() {
        bail!(
            "--block {}: EFQ stores blocks of {} columns only (the format's tile width)",
            args.block,
            efq_block()
        );
    }
    if !(0.0..0.1).contains(&args.outliers) {
        bail!("--outliers {} must be in [0, 0.1)", args.outliers);
    }
    let source = args.model.open()?;
    pipeline::check_source(&source)?;
    let mut bpw = args.bpw;
    let mut embedding_bits = args.embedding_bits.unwrap_or_else(|| {
        pipeline::default_embedding_bits(
            args.max_bits
                .unwrap_or_else(|| pipeline::default_max_bits(args.bpw)),
        )
    });
    if let Some(size) = &args.fit {
        if !matches!(args.method, MethodArg::Efq) {
            bail!("--fit chooses an efq budget; it does not apply to --method gptq or rtn (they take --bits)");
        }
        let budget = fit::parse_size(size)?;
        let config = ModelConfig::from_source(&source)?;
        // The source's header (tokenizer, hyperparameters) is copied into the output.
        let metadata = match &source {
            edgefusion_io::ModelSource::Gguf(gguf) => gguf.data_offset(),
            // A folder's tokenizer.json is stored whole in the converted file.
            _ => std::fs::metadata(source.path().join("tokenizer.json"))
                .map_or(0, |m| m.len() as usize),
        };
        let session = SessionOptions::new(args.ctx, crate::common::threads(args.threads)?);
        let plan = fit::fit(&config, budget, &session, metadata)?;
        println!(
            "plan for {size} at context {}: --bpw {:.2} --embedding-bits {} -> {}",
            args.ctx,
            plan.linear_bpw,
            plan.embedding_bits,
            plan.memory.describe()
        );
        (bpw, embedding_bits) = (plan.linear_bpw, plan.embedding_bits);
    }
    let calibration = if args.calib == "none" || matches!(args.method, MethodArg::Rtn) {
        None
    } else {
        if args.calib_ctx < 2 {
            bail!(
                "--calib-ctx {} is too short (at least 2 tokens per window)",
                args.calib_ctx
            );
        }
        if args.calib_tokens < 16 {
            bail!(
                "--calib-tokens {} is too few to calibrate (at least 16)",
                args.calib_tokens
            );
        }
        let path = std::path::Path::new(&args.calib);
        if !path.exists() && args.calib == crate::common::CALIBRATION_TEXT {
            bail!("default calibration text {} not found: run `scripts/fetch-assets.sh --text`, pass --calib FILE, or --calib none", args.calib);
        }
        Some(Calibration {
            name: args.calib.clone(),
            text: crate::common::read_text(path)?,
            n_tokens: args.calib_tokens,
            ctx: args.calib_ctx,
            threads: crate::common::threads(args.threads)?,
            seed: args.seed,
        })
    };
    let opts = QuantizeOptions {
        method: match args.method {
            MethodArg::Efq => Method::Efq,
            MethodArg::Gptq => Method::Gptq,
            MethodArg::Rtn => Method::Rtn,
        },
        calibration,
        act_order: !args.no_act_order,
        sensitivity: matches!(args.allocation, AllocationArg::Sensitivity),
        embedding_bits,
        rotate: !args.no_rotate,
        max_bits: args.max_bits,
        refit: !args.no_refit,
        keep_source: !args.no_keep_source,
        bpw,
        bits: args.bits,
        outliers: args.outliers,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} matrices ({elapsed}) {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let report = pipeline::quantize(&source, &args.output, &opts, &mut |done, total, what| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
        if bar.is_hidden() && crate::common::tenth_done(done, total) {
            eprintln!(
                "quantize: {done}/{total} matrices ({:.0} s)",
                start.elapsed().as_secs_f64()
            );
        }
    })?;
    bar.finish_and_clear();
    let q_params: usize = report
        .matrices
        .iter()
        .filter(|m| !m.role.is_embedding_or_head())
        .map(|m| m.params)
        .sum();
    let mut hist = [0usize; edgefusion_quant::efq::WIDTHS.len()];
    for m in report
        .matrices
        .iter()
        .filter(|m| !m.role.is_embedding_or_head())
    {
        for (h, n) in hist.iter_mut().zip(m.width_histogram) {
            *h += n;
        }
    }
    let tiles: usize = hist.iter().sum();
    println!(
        "wrote {} in {:.1} s: {:.2} MiB, {:.3} bits/param over the whole file",
        args.output.display(),
        start.elapsed().as_secs_f64(),
        report.file_bytes as f64 / (1 << 20) as f64,
        report.file_bytes as f64 * 8.0 / report.params as f64,
    );
    println!(
        "layers' linear matrices: {:.3} bits/weight over {:.1} M weights; token embedding and head: {:.3} bits/weight",
        report.linear_bpw,
        q_params as f64 / 1e6,
        report.embedding_bpw,
    );
    let shares: Vec<String> = edgefusion_quant::efq::WIDTHS
        .iter()
        .zip(hist)
        .filter(|&(_, n)| n > 0)
        .map(|(bits, n)| format!("{bits}-bit {:.1} %", 100.0 * n as f64 / tiles as f64))
        .collect();
    if tiles > 0 {
        println!("layer tile widths: {}", shares.join(", "));
    }
    let kept: Vec<&pipeline::MatrixReport> = report
        .matrices
        .iter()
        .filter(|m| m.kept.is_some())
        .collect();
    if !kept.is_empty() {
        let mut types: Vec<String> = kept
            .iter()
            .filter_map(|m| m.kept.map(|t| t.name().to_string()))
            .collect();
        types.sort();
        types.dedup();
        println!(
            "kept as the source stores them: {} of {} matrices ({})",
            kept.len(),
            report.matrices.len(),
            types.join(", ")
        );
    }
    Ok(())
}
