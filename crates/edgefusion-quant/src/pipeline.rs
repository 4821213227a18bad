//! Quantizing a whole model into an EFQ GGUF file: every linear matrix (token embedding and
//! output head included) becomes an EFQ blob, or keeps its source tensor where the budget
//! holds it (`crate::allocate`; efq only); everything else is copied.
//!
//! The output is a GGUF v3 file whose metadata is the source's plus `edgefusion.efq.*` keys,
//! with each quantized matrix stored as a 1-D I8 tensor holding its EFQ blob (magic
//! `EFQ2`, see `edgefusion_kernels::efq` and `docs/FORMAT.md`); matrices whose rows are a
//! multiple of 64 long are stored rotated (`edgefusion_kernels::hadamard`) unless
//! `QuantizeOptions::rotate` is off. It is written atomically.

use std::path::Path;

use rayon::prelude::*;

use edgefusion_io::gguf::{GgufWriter, MetaValue};
use edgefusion_io::names::TensorRole;
use edgefusion_io::ModelSource;
use edgefusion_kernels::efq::{n_tiles, tiles, ROTATION_RHT64, TILE_ROWS};
use edgefusion_kernels::hadamard;
use edgefusion_kernels::GgmlType;
use edgefusion_model::model::{EFQ_VERSION as EFQ_FILE_VERSION, EFQ_VERSION_KEY as VERSION_KEY};
use edgefusion_model::{Linear, Model};
use edgefusion_runtime::tokenizer::Tokenizer;
use edgefusion_runtime::{LinearInput, Logits, Session, SessionOptions};

use crate::allocate::{allocate, AllocationInput, Encoding};
use crate::efq::{fixed_bytes, plan, select_outliers, tile_errors, WIDTHS};
use crate::fit::blob_bytes_with_outliers;
use crate::gptq::{GptqFactor, GptqOptions};
use crate::hessian::Hessian;
use crate::refit::refit_scales;
use crate::QuantError;

/// How the codes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Adaptive widths for a bits-per-weight budget, outliers, fitted grids and (with
    /// calibration) GPTQ error compensation.
    Efq,
    /// GPTQ at a uniform width, no outliers (needs calibration).
    Gptq,
    /// Round to nearest on uniform widths, fitted grids, no outliers.
    Rtn,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Efq => "efq",
            Method::Gptq => "gptq",
            Method::Rtn => "rtn",
        }
    }
}

/// Calibration data: text the model reads so that every linear layer's input statistics
/// `XᵀX` weigh the quantization error by what the layer actually sees.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Where the text came from (for messages and metadata).
    pub name: String,
    pub text: String,
    /// Tokens to read (in windows of `ctx`).
    pub n_tokens: usize,
    pub ctx: usize,
    pub threads: usize,
    /// Chooses which windows of the text are read (the same seed reads the same tokens).
    pub seed: u64,
}

/// What to produce.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    /// Budget over the layers' linear matrices (attention and feed-forward), every stored
    /// byte counted (efq). The token embedding and output head have their own width.
    pub bpw: f64,
    /// Uniform code width (rtn).
    pub bits: u8,
    /// Share of each matrix kept as 6-bit outliers (efq).
    pub outliers: f64,
    /// Calibration (required by gptq; efq without it weighs every column alike and skips
    /// error compensation).
    pub calibration: Option<Calibration>,
    /// GPTQ processes columns by decreasing Hessian diagonal.
    pub act_order: bool,
    /// Weigh each matrix's errors in the bit allocation by its measured end-to-end cost
    /// (efq with calibration): one extra forward pass per matrix.
    pub sensitivity: bool,
    /// Code width of every tile of the token embedding and the output head (efq), outside
    /// the `bpw` budget and reported on its own, as llama.cpp gives `token_embd` and
    /// `output` their own types: the embedding's errors reach every layer through the
    /// lookup, which no Hessian sees.
    pub embedding_bits: u8,
    /// Store every matrix whose rows are a multiple of 64 long as `W·R`, `R` the randomized
    /// Hadamard transform of `edgefusion_kernels::hadamard` (the kernels rotate the input
    /// to match): rotated rows have no heavy coordinates for a block's grid to stretch to.
    pub rotate: bool,
    /// Widest tile the allocator may choose (efq); `None`: [`default_max_bits`].
    pub max_bits: Option<u8>,
    /// After GPTQ, solve every row's block scales again by least squares against the
    /// layer's input statistics, codes fixed (`crate::refit`; efq only). Costs about what
    /// GPTQ does (`n_in²` per row).
    pub refit: bool,
    /// Let the allocator write a layer matrix's source tensor unchanged (Q4_1, Q4_K, ...)
    /// where the budget holds it and that lowers the total error, and keep the embedding's
    /// and head's source tensors where they take no more bytes than their EFQ width would
    /// (efq only): the source dequantized is the reference, so a kept matrix loses nothing.
    pub keep_source: bool,
}

impl Default for QuantizeOptions {
    /// What `edgefusion quantize` does without options, less the calibration text: efq at
    /// 3.1 bits per weight in tiles of up to 4 bits, rotated, no outliers, act-order GPTQ,
    /// scale refit, sensitivity allocation, 6-bit embedding.
    fn default() -> Self {
        QuantizeOptions {
            method: Method::Efq,
            bpw: 3.1,
            bits: 3,
            outliers: 0.0,
            calibration: None,
            act_order: true,
            sensitivity: true,
            embedding_bits: default_embedding_bits(default_max_bits(3.1)),
            rotate: true,
            max_bits: None,
            refit: true,
            keep_source: true,
        }
    }
}

/// The widest tile the allocator gives the layers at `bpw` unless told otherwise: the
/// narrowest width of at least `⌈bpw⌉` (3.1 → 4, 4.5 and 5.0 → 5, 5.5 → 6). The allocator
/// ranks steps by fitted-grid errors measured before GPTQ, which overrate widening a few
/// sensitive tiles far past the budget: on SmolLM2 at 3.1 bpw (6-bit embedding), PPL on
/// Moby-Dick 34.4 with tiles up to 4 bits, 35.3 up to 5, 35.9 up to 8.
pub fn default_max_bits(bpw: f64) -> u8 {
    let at_least = bpw.ceil().max(WIDTHS[0] as f64);
    WIDTHS
        .iter()
        .copied()
        .find(|&w| w as f64 >= at_least)
        .unwrap_or(WIDTHS[WIDTHS.len() - 1])
}

/// The token embedding's and output head's width unless told otherwise, given the layers'
/// widest tile (`--max-bits`, else [`default_max_bits`]): 6 bits, or that tile when it is
/// wider. On SmolLM2 at 3.1 bpw (tiles up to 4 bits), PPL on Moby-Dick 35.2 with a 4-bit
/// embedding, 34.4 with 6 bits, 34.4 with 8; llama.cpp likewise stores a tied embedding as
/// Q5_K or Q6_K in its 3- and 4-bit types.
pub fn default_embedding_bits(layers_max_bits: u8) -> u8 {
    layers_max_bits.max(6)
}

/// One quantized matrix, for the report.
#[derive(Debug, Clone)]
pub struct MatrixReport {
    pub name: String,
    pub role: TensorRole,
    pub params: usize,
    pub bytes: usize,
    /// Tiles of each width of [`WIDTHS`] (none when kept).
    pub width_histogram: [usize; WIDTHS.len()],
    /// The source's type, when the matrix was written unchanged instead of as EFQ.
    pub kept: Option<GgmlType>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub matrices: Vec<MatrixReport>,
    /// Bits per weight over the layers' linear matrices, every stored byte counted.
    pub linear_bpw: f64,
    /// Bits per weight of the token embedding and output head (one matrix when tied).
    pub embedding_bpw: f64,
    /// Bytes of the output file.
    pub file_bytes: u64,
    /// Parameters of the whole model.
    pub params: usize,
}

/// The linear matrices of a model with their tensor roles, and the input each one reads
/// (`None`: the token embedding, which is looked up rather than multiplied).
fn matrices<'m>(
    model: &'m Model<'_>,
) -> Vec<(
    TensorRole,
    Option<LinearInput>,
    &'m Linear<'m>,
    Option<usize>,
)> {
    let tied = model.output.is_none();
    model
        .linears()
        .into_iter()
        .filter(|(role, _, w)| efq_takes(*role, w.n_out, w.n_in))
        .map(|(role, layer, w)| (role, mats_site(role, layer, tied), w, layer))
        .collect()
}

/// Whether `quantize` stores a matrix of `role` and shape `(n_out, n_in)` in EFQ (the one
/// rule, which `fit` plans with). An SSM layer's Δ and gate projections have one row per KV
/// group: too few for 16-row tiles, and too small to matter; they keep their source type,
/// as do SSM projections whose shape (set by the state width) does not tile. Any other
/// matrix that does not tile is refused by `quantize`.
pub(crate) fn efq_takes(role: TensorRole, n_out: usize, n_in: usize) -> bool {
    match role {
        TensorRole::SsmDt | TensorRole::SsmGate => false,
        TensorRole::SsmC | TensorRole::SsmB | TensorRole::SsmX | TensorRole::SsmOut => {
            tiles(n_out, n_in)
        }
        _ => true,
    }
}

/// The input a matrix reads (`None`: the token embedding of an untied model, which is only
/// looked up).
fn mats_site(role: TensorRole, layer: Option<usize>, tied: bool) -> Option<LinearInput> {
    let layer = layer.unwrap_or(0);
    match role {
        TensorRole::TokenEmbd => tied.then_some(LinearInput::Head),
        TensorRole::Output => Some(LinearInput::Head),
        TensorRole::AttnQ | TensorRole::AttnK | TensorRole::AttnV => {
            Some(LinearInput::Attention { layer })
        }
        TensorRole::AttnOutput => Some(LinearInput::AttentionOutput { layer }),
        TensorRole::FfnGate | TensorRole::FfnUp => Some(LinearInput::FeedForward { layer }),
        TensorRole::FfnDown => Some(LinearInput::FeedForwardDown { layer }),
        TensorRole::SsmC | TensorRole::SsmB | TensorRole::SsmX => Some(LinearInput::Ssm { layer }),
        TensorRole::SsmOut => Some(LinearInput::SsmOutput { layer }),
        _ => unreachable!("Model::linears lists matrices only"),
    }
}

type Hessians = std::collections::HashMap<LinearInput, Hessian>;

/// Runs the model over the calibration text and returns `XᵀX` of every linear input, and
/// the tokens of the first window read.
fn calibrate(
    gguf: &edgefusion_io::gguf::GgufFile,
    model: &Model<'_>,
    calib: &Calibration,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(Hessians, Vec<u32>), QuantError> {
    let tokenizer = Tokenizer::from_gguf(gguf)
        .map_err(|e| QuantError::Input(format!("{}: tokenizer: {e}", gguf.path.display())))?;
    let tokens = tokenizer
        .encode(&calib.text, false)
        .map_err(|e| QuantError::Input(format!("{}: {e}", calib.name)))?;
    if tokens.len() < calib.n_tokens {
        return Err(QuantError::Input(format!(
            "calibration text {} has {} tokens; --calib-tokens asks for {}",
            calib.name,
            tokens.len(),
            calib.n_tokens
        )));
    }
    let ctx = calib.ctx.min(model.config.n_ctx_train).max(2);
    let windows = calib.n_tokens.div_ceil(ctx);
    let starts = window_starts(tokens.len(), ctx, calib.n_tokens, calib.seed);
    // Each window starts as the model's inputs do where its vocabulary asks for BOS (Gemma):
    // BOS in place of the first token, as llama-imatrix and `perplexity` do.
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    let window_of = |start: usize, end: usize| {
        let mut window = tokens[start..end].to_vec();
        if let Some(bos) = bos {
            window[0] = bos;
        }
        window
    };
    let hessians = std::rc::Rc::new(std::cell::RefCell::new(Hessians::new()));
    let failure = std::rc::Rc::new(std::cell::RefCell::new(None::<QuantError>));
    let opts = SessionOptions {
        max_batch: ctx,
        ..SessionOptions::new(ctx, calib.threads.max(1))
    };
    let mut session = Session::new(model, opts).map_err(|e| QuantError::Input(e.to_string()))?;
    let (h, f) = (hessians.clone(), failure.clone());
    session.set_observer(Some(Box::new(move |site, x, n_tok| {
        let width = x.len() / n_tok;
        let mut map = h.borrow_mut();
        let hessian = map.entry(site).or_insert_with(|| Hessian::new(width));
        if let Err(e) = hessian.add_rows(x, n_tok) {
            f.borrow_mut().get_or_insert(e);
        }
    })));
    for (w, &start) in starts.iter().enumerate() {
        let end = (start + ctx)
            .min(tokens.len())
            .min(start + calib.n_tokens - w * ctx);
        session.reset();
        session
            .forward(&window_of(start, end), Logits::Last)
            .map_err(|e| QuantError::Input(e.to_string()))?;
        progress(w + 1, windows, "calibrating");
        if let Some(e) = failure.borrow_mut().take() {
            return Err(e);
        }
    }
    drop(session);
    let first = starts[0];
    let window = window_of(first, (first + ctx).min(tokens.len()));
    Ok((
        std::rc::Rc::try_unwrap(hessians)
            .map(|c| c.into_inner())
            .unwrap_or_default(),
        window,
    ))
}

/// Tokens of the calibration window scored when measuring sensitivities.
const SENSITIVITY_TOKENS: usize = 256;

/// Per-position log-probabilities and `Σ p·log p` of the model's logits on `tokens`.
fn log_probs(model: &Model<'_>, tokens: &[u32], threads: usize) -> Result<Vec<f32>, QuantError> {
    let opts = SessionOptions {
        max_batch: tokens.len(),
        max_logits: tokens.len(),
        ..SessionOptions::new(tokens.len(), threads.max(1))
    };
    let mut session = Session::new(model, opts).map_err(|e| QuantError::Input(e.to_string()))?;
    let logits = session
        .forward(tokens, Logits::From(0))
        .map_err(|e| QuantError::Input(e.to_string()))?;
    let vocab = model.config.vocab_size;
    let mut out = logits.to_vec();
    for row in out.chunks_mut(vocab) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let lse = max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
        for v in row.iter_mut() {
            *v -= lse;
        }
    }
    Ok(out)
}

/// Mean KL divergence `KL(base ‖ other)` per position, from log-probabilities.
fn mean_kl(base: &[f32], other: &[f32], vocab: usize) -> f64 {
    let n = base.len() / vocab;
    base.chunks(vocab)
        .zip(other.chunks(vocab))
        .map(|(b, o)| {
            b.iter()
                .zip(o)
                .map(|(&lb, &lo)| (lb.exp() as f64) * (lb - lo) as f64)
                .sum::<f64>()
        })
        .sum::<f64>()
        / n.max(1) as f64
}

/// Start tokens of the `ceil(n_tokens / ctx)` calibration windows: distinct `ctx`-aligned
/// windows of the text, chosen by `seed` (seed 0 reads the text from its start), in
/// increasing order. The text has at least `n_tokens` tokens.
fn window_starts(text_tokens: usize, ctx: usize, n_tokens: usize, seed: u64) -> Vec<usize> {
    let windows = n_tokens.div_ceil(ctx);
    let available = text_tokens / ctx;
    if seed == 0 || available <= windows {
        return (0..windows).map(|w| w * ctx).collect();
    }
    // A seeded partial Fisher–Yates shuffle of the window indices (splitmix64).
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut index: Vec<usize> = (0..available).collect();
    for i in 0..windows {
        let j = i + (next() % (available - i) as u64) as usize;
        index.swap(i, j);
    }
    let mut starts: Vec<usize> = index[..windows].iter().map(|w| w * ctx).collect();
    starts.sort_unstable();
    starts
}

/// The matrix as floats `(n_out, n_in)`, refusing NaN and infinities.
fn dequantized(w: &Linear<'_>) -> Result<Vec<f32>, QuantError> {
    let mut out = vec![0.0f32; w.n_out * w.n_in];
    for (r, row) in out.chunks_mut(w.n_in).enumerate() {
        w.dequantize_row_into(r, row);
    }
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            what: format!(
                "weights of '{}' (row {}, column {})",
                w.name,
                i / w.n_in,
                i % w.n_in
            ),
            index: i,
        });
    }
    Ok(out)
}

/// Refuses sources that cannot be quantized: a GGUF file already in EFQ.
pub fn check_source(source: &ModelSource) -> Result<(), QuantError> {
    if let ModelSource::Gguf(gguf) = source {
        if gguf.get(VERSION_KEY).is_some() {
            return Err(QuantError::Input(format!(
                "{} is already an EFQ model; quantize its source instead",
                gguf.path.display()
            )));
        }
    }
    Ok(())
}

/// A converted copy of a Hugging Face folder, removed when dropped.
struct TempSource(std::path::PathBuf);

impl Drop for TempSource {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Quantizes `source` into `output`. `progress(done, total, what)` is called as matrices
/// finish (two passes: measuring, then encoding).
pub fn quantize(
    source: &ModelSource,
    output: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<QuantizeReport, QuantError> {
    // The widest tile the allocator may give the layers: the one place it is derived.
    let max_bits = opts.max_bits.unwrap_or_else(|| default_max_bits(opts.bpw));
    for (flag, bits) in [
        ("--bits", opts.bits),
        ("--embedding-bits", opts.embedding_bits),
        ("--max-bits", max_bits),
    ] {
        if !WIDTHS.contains(&bits) {
            return Err(QuantError::Input(format!(
                "{flag} {bits} is not an EFQ tile width; widths are {WIDTHS:?}"
            )));
        }
    }
    if opts.method == Method::Gptq && opts.calibration.is_none() {
        return Err(QuantError::Input(
            "--method gptq needs calibration text (--calib)".into(),
        ));
    }
    check_source(source)?;
    let gguf = match source {
        ModelSource::Gguf(gguf) => gguf,
        ModelSource::HfDir(dir) => {
            // The folder becomes a GGUF beside the output first (GGUF names, q/k rows in
            // GGUF llama's RoPE order, the tokenizer inside); that copy is quantized and
            // removed, whatever happens.
            let mut name = output.file_name().unwrap_or_default().to_os_string();
            name.push(".source.gguf");
            let temp = TempSource(output.with_file_name(name));
            edgefusion_model::convert::hf_to_gguf(dir, &temp.0)
                .map_err(|e| QuantError::Input(e.to_string()))?;
            let converted =
                ModelSource::open(&temp.0).map_err(|e| QuantError::Input(e.to_string()))?;
            return quantize(&converted, output, opts, progress);
        }
    };
    let file = source.path().display().to_string();
    let mut model = Model::load(source).map_err(|e| QuantError::Input(e.to_string()))?;
    let mats = matrices(&model);
    for (_, _, w, _) in &mats {
        if !tiles(w.n_out, w.n_in) {
            return Err(QuantError::Input(format!(
                "{file}: tensor '{}' is ({}, {}); EFQ needs rows in multiples of 16 and row lengths in multiples of 32",
                w.name, w.n_out, w.n_in
            )));
        }
    }
    // The bytes each matrix takes as its source stores it (the candidate of keeping it).
    let source_bytes: std::collections::HashMap<&str, (GgmlType, usize)> = gguf
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), (t.dtype, t.n_bytes)))
        .collect();
    let keep_source = opts.keep_source && opts.method == Method::Efq;
    // A matrix's source size where it may be kept (a matrix the file does not hold, if any,
    // is never a candidate).
    let source_size = |name: &str| {
        keep_source
            .then(|| source_bytes.get(name).map(|&(_, bytes)| bytes))
            .flatten()
    };
    let (mut hessians, calib_window) = match &opts.calibration {
        Some(calib) if opts.method != Method::Rtn => calibrate(gguf, &model, calib, progress)?,
        _ => (Hessians::new(), Vec::new()),
    };
    // Which matrices are stored rotated: all of them whose rows hold whole Hadamard blocks.
    let rotated = |n_in: usize| opts.rotate && hadamard::fits(n_in);
    if opts.rotate {
        // The inputs of rotated matrices are read as `x·R`: their statistics are `Rᵀ·H·R`.
        let mut sites: Vec<&mut Hessian> = hessians.values_mut().collect();
        sites.par_iter_mut().for_each(|h| {
            if rotated(h.n()) {
                **h = h.rotated();
            }
        });
    }
    // A matrix's weights as the quantizer sees them: `W`, or `W·R` when stored rotated.
    let source_weights = |w: &Linear<'_>| -> Result<Vec<f32>, QuantError> {
        let mut values = dequantized(w)?;
        if rotated(w.n_in) {
            for row in values.chunks_exact_mut(w.n_in) {
                hadamard::rotate(row, 0);
            }
        }
        Ok(values)
    };
    // Column importances: the Hessian diagonal where the input was observed.
    let importance = |site: Option<LinearInput>, n_in: usize| -> Vec<f32> {
        match site.and_then(|s| hessians.get(&s)) {
            Some(h) => h.diag().iter().map(|&v| v as f32).collect(),
            None => vec![1.0; n_in],
        }
    };
    let total = 2 * mats.len();
    let mut done = 0;

    // Pass 1: outliers and per-tile errors at each width (efq), for the global allocation.
    // A matrix is then stored as EFQ tiles of the chosen widths, or as its source tensor.
    let mut encodings: Vec<Encoding> = Vec::with_capacity(mats.len());
    let mut outlier_sets = Vec::with_capacity(mats.len());
    match opts.method {
        Method::Rtn | Method::Gptq => {
            for (_, _, w, _) in &mats {
                encodings.push(Encoding::Efq(vec![
                    opts.bits;
                    (w.n_out / TILE_ROWS) * n_tiles(w.n_in)
                ]));
                outlier_sets.push(Vec::new());
                done += 1;
                progress(done, total, &w.name);
            }
        }
        Method::Efq => {
            let mut errors = Vec::with_capacity(mats.len());
            for (role, site, w, _) in &mats {
                let values = source_weights(w)?;
                let h = importance(*site, w.n_in);
                let outliers = select_outliers(&values, w.n_out, w.n_in, &h, opts.outliers);
                if role.is_embedding_or_head() {
                    // Fixed width, outside the budget: no errors to measure.
                    errors.push(Vec::new());
                    outlier_sets.push(outliers);
                    done += 1;
                    progress(done, total, &w.name);
                    continue;
                }
                let mut tile_err = tile_errors(&values, w.n_out, w.n_in, &h, &outliers);
                {
                    // Compare matrices by relative output error: Hessian-weighted errors of
                    // different layers differ by orders of magnitude with the activations'
                    // scale (measured on SmolLM2 at 3.1 bpw: PPL 131 -> 126 on Moby-Dick).
                    let energy: f64 = values
                        .iter()
                        .enumerate()
                        .map(|(j, &v)| h[j % w.n_in] as f64 * (v as f64) * (v as f64))
                        .sum::<f64>()
                        .max(1e-30);
                    for e in &mut tile_err {
                        for x in e.iter_mut() {
                            *x /= energy;
                        }
                    }
                }
                errors.push(tile_err);
                outlier_sets.push(outliers);
                done += 1;
                progress(done, total, &w.name);
            }
            // The budget covers the layers' matrices; embedding and head get their width.
            let budgeted: Vec<usize> = (0..mats.len())
                .filter(|&i| !mats[i].0.is_embedding_or_head())
                .collect();
            if opts.sensitivity && !calib_window.is_empty() {
                // Weigh each matrix's relative errors by what they cost end to end: the KL
                // divergence of the model's predictions when that matrix alone is rounded to
                // 2-bit tiles, per unit of its relative error at 2 bits.
                let keys: Vec<(TensorRole, Option<usize>, String)> = budgeted
                    .iter()
                    .map(|&i| (mats[i].0, mats[i].3, mats[i].2.name.clone()))
                    .collect();
                let threads = opts.calibration.as_ref().map_or(1, |c| c.threads);
                let tokens = &calib_window[..calib_window.len().min(SENSITIVITY_TOKENS)];
                let base = log_probs(&model, tokens, threads)?;
                let vocab = model.config.vocab_size;
                for (k, (&i, (role, layer, name))) in budgeted.iter().zip(&keys).enumerate() {
                    let w = model
                        .linear_mut(*role, *layer)
                        .expect("listed by Model::linears");
                    let (n_out, n_in) = (w.n_out, w.n_in);
                    let values = source_weights(w)?;
                    let h = importance(mats_site(*role, *layer, model.output.is_none()), n_in);
                    let two = vec![2u8; (n_out / TILE_ROWS) * n_tiles(n_in)];
                    let p = plan(&values, n_out, n_in, &h, &two, &outlier_sets[i]);
                    let mut rounded: Vec<f32> = values
                        .iter()
                        .enumerate()
                        .map(|(j, &v)| p.round(j / n_in, j % n_in, v))
                        .collect();
                    if rotated(n_in) {
                        for row in rounded.chunks_exact_mut(n_in) {
                            hadamard::unrotate(row, 0);
                        }
                    }
                    let slot = model.linear_mut(*role, *layer).expect("listed");
                    let original =
                        std::mem::replace(slot, Linear::from_f32(name, n_in, n_out, &rounded));
                    let kl = mean_kl(&base, &log_probs(&model, tokens, threads)?, vocab);
                    *model.linear_mut(*role, *layer).expect("listed") = original;
                    let at_two: f64 = errors[i].iter().map(|e| e[0]).sum::<f64>().max(1e-30);
                    let scale = kl.max(1e-9) / at_two;
                    for e in &mut errors[i] {
                        for x in e.iter_mut() {
                            *x *= scale;
                        }
                    }
                    progress(k + 1, budgeted.len(), "measuring sensitivity");
                }
            }
            let mats = matrices(&model);
            let inputs: Vec<AllocationInput<'_>> = budgeted
                .iter()
                .map(|&i| {
                    let w = mats[i].2;
                    AllocationInput {
                        n_out: w.n_out,
                        n_in: w.n_in,
                        errors: &errors[i],
                        fixed_bytes: fixed_bytes(w.n_out, w.n_in, &outlier_sets[i]),
                        min_bits: 2,
                        max_bits,
                        source_bytes: source_size(&w.name),
                    }
                })
                .collect();
            let Some(allocation) = allocate(&inputs, opts.bpw) else {
                return Err(QuantError::Input(format!(
                    "--bpw {} is below what all-2-bit tiles with {:.2} % outliers take; raise it or lower --outliers",
                    opts.bpw,
                    opts.outliers * 100.0
                )));
            };
            let mut chosen = allocation.encodings;
            chosen.reverse();
            encodings = mats
                .iter()
                .zip(&outlier_sets)
                .map(|((role, _, w, _), outliers)| {
                    if !role.is_embedding_or_head() {
                        return chosen.pop().expect("one allocation per budgeted matrix");
                    }
                    // The embedding and head keep their source where it is no larger.
                    let efq_bytes =
                        blob_bytes_with_outliers(w.n_out, w.n_in, opts.embedding_bits, outliers);
                    if source_size(&w.name).is_some_and(|s| s <= efq_bytes) {
                        Encoding::Source
                    } else {
                        Encoding::Efq(vec![
                            opts.embedding_bits;
                            (w.n_out / TILE_ROWS) * n_tiles(w.n_in)
                        ])
                    }
                })
                .collect();
        }
    }

    // (Sensitivity measurement may have swapped matrices in and out: bind them again.)
    let mats = matrices(&model);
    // Pass 2: fit grids, round, encode.
    // (`None` for matrices written as their source stores them.)
    let mut blobs: Vec<Option<Vec<u8>>> = Vec::with_capacity(mats.len());
    let mut reports = Vec::with_capacity(mats.len());
    let gptq_opts = GptqOptions {
        act_order: opts.act_order,
        ..GptqOptions::default()
    };
    // Matrices reading the same input come one after another (q, k, v; gate, up): the
    // last input's factorization serves them all.
    let mut factor: Option<(LinearInput, GptqFactor)> = None;
    // The same for the full input statistics the scale refit reads.
    let mut input_stats: Option<(LinearInput, Vec<f64>)> = None;
    for (i, (role, site, w, _)) in mats.iter().enumerate() {
        let widths = match &encodings[i] {
            Encoding::Efq(widths) => widths,
            Encoding::Source => {
                let (dtype, bytes) = *source_bytes
                    .get(w.name.as_str())
                    .expect("only matrices found in the source are kept");
                reports.push(MatrixReport {
                    name: w.name.clone(),
                    role: *role,
                    params: w.n_out * w.n_in,
                    bytes,
                    width_histogram: [0; WIDTHS.len()],
                    kept: Some(dtype),
                });
                blobs.push(None);
                done += 1;
                progress(done, total, &w.name);
                continue;
            }
        };
        let mut values = source_weights(w)?;
        let h = importance(*site, w.n_in);
        let mut p = plan(&values, w.n_out, w.n_in, &h, widths, &outlier_sets[i]);
        if rotated(w.n_in) {
            p.rotation = ROTATION_RHT64;
        }
        let hessian = site.and_then(|s| hessians.get(&s).map(|h| (s, h)));
        let rounded: Vec<f32> = match hessian {
            Some((site, hessian)) if opts.method != Method::Rtn => {
                let gptq_error = |e: QuantError| QuantError::Input(format!("{}: {e}", w.name));
                if factor.as_ref().is_none_or(|(s, _)| *s != site) {
                    let f = GptqFactor::new(hessian, &gptq_opts).map_err(gptq_error)?;
                    factor = Some((site, f));
                }
                let (_, f) = factor.as_ref().expect("set above");
                // The refit is EFQ's: `--method gptq` stays plain GPTQ (the baseline).
                let original = (opts.refit && opts.method == Method::Efq).then(|| values.clone());
                f.apply(&mut values, w.n_out, |r, c, v| p.round(r, c, v))
                    .map_err(gptq_error)?;
                match original {
                    Some(original) => {
                        if input_stats.as_ref().is_none_or(|(s, _)| *s != site) {
                            input_stats = Some((site, hessian.mean()));
                        }
                        let (_, h_full) = input_stats.as_ref().expect("set above");
                        refit_scales(&mut p, &original, &values, h_full).0
                    }
                    None => values,
                }
            }
            _ => values
                .iter()
                .enumerate()
                .map(|(j, &v)| p.round(j / w.n_in, j % w.n_in, v))
                .collect(),
        };
        let blob = p
            .encode(&rounded)
            .to_bytes()
            .map_err(|e| QuantError::Input(format!("{}: {e}", w.name)))?;
        let mut hist = [0usize; WIDTHS.len()];
        for &b in widths {
            hist[edgefusion_kernels::efq::width_index(b).expect("a tile width")] += 1;
        }
        reports.push(MatrixReport {
            name: w.name.clone(),
            role: *role,
            params: w.n_out * w.n_in,
            bytes: blob.len(),
            width_histogram: hist,
            kept: None,
        });
        blobs.push(Some(blob));
        done += 1;
        progress(done, total, &w.name);
    }

    // The file: source metadata plus ours; quantized matrices as I8 blobs, the rest copied.
    let mut writer = GgufWriter::new().with_alignment(64);
    for (key, value) in &gguf.metadata {
        if key != "general.alignment" {
            writer.add_metadata(key.clone(), value.clone());
        }
    }
    writer.add_metadata(VERSION_KEY, MetaValue::U32(EFQ_FILE_VERSION));
    writer.add_metadata(
        "edgefusion.efq.method",
        MetaValue::String(opts.method.name().into()),
    );
    writer.add_metadata("edgefusion.efq.target_bpw", MetaValue::F32(opts.bpw as f32));
    writer.add_metadata(
        "edgefusion.efq.rotation",
        MetaValue::String(if opts.rotate { "rht64" } else { "none" }.into()),
    );
    // Only efq takes outliers out.
    let outliers = if opts.method == Method::Efq {
        opts.outliers
    } else {
        0.0
    };
    writer.add_metadata("edgefusion.efq.outliers", MetaValue::F32(outliers as f32));
    writer.add_metadata(
        "edgefusion.efq.embedding_bits",
        MetaValue::U32(if opts.method == Method::Efq {
            opts.embedding_bits
        } else {
            opts.bits
        } as u32),
    );
    if let Some(calib) = opts
        .calibration
        .as_ref()
        .filter(|_| opts.method != Method::Rtn)
    {
        writer.add_metadata(
            "edgefusion.efq.calibration",
            MetaValue::String(calib.name.clone()),
        );
        writer.add_metadata(
            "edgefusion.efq.calibration_tokens",
            MetaValue::U32(calib.n_tokens.min(u32::MAX as usize) as u32),
        );
        writer.add_metadata("edgefusion.efq.seed", MetaValue::U64(calib.seed));
    }
    let quantized: std::collections::HashMap<&str, &[u8]> = mats
        .iter()
        .zip(&blobs)
        .filter_map(|((_, _, w, _), blob)| Some((w.name.as_str(), blob.as_deref()?)))
        .collect();
    for t in &gguf.tensors {
        let view = gguf.view(t);
        if let Some(&blob) = quantized.get(t.name.as_str()) {
            writer.add_tensor(t.name.clone(), GgmlType::I8, &[blob.len()], blob);
        } else {
            writer.add_tensor(t.name.clone(), view.dtype, view.shape, view.data);
        }
    }
    writer
        .write(output)
        .map_err(|e| QuantError::Input(e.to_string()))?;
    let file_bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    let bpw_of = |embedding: bool| {
        let (params, bytes) = reports
            .iter()
            .filter(|r| r.role.is_embedding_or_head() == embedding)
            .fold((0usize, 0usize), |(p, b), r| (p + r.params, b + r.bytes));
        bytes as f64 * 8.0 / params.max(1) as f64
    };
    Ok(QuantizeReport {
        linear_bpw: bpw_of(false),
        embedding_bpw: bpw_of(true),
        matrices: reports,
        file_bytes,
        params: model.config.n_params(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default widest tile is the narrowest width of at least ⌈bpw⌉; the embedding
    /// gets 6 bits or that width when it is wider.
    #[test]
    fn default_widths_follow_the_budget() {
        for (bpw, max, embedding) in [
            (2.5, 3, 6),
            (3.1, 4, 6),
            (4.0, 4, 6),
            (4.5, 5, 6),
            (5.0, 5, 6),
            (5.5, 6, 6),
            (6.5, 8, 8),
            (8.0, 8, 8),
        ] {
            assert_eq!(default_max_bits(bpw), max, "{bpw}");
            assert_eq!(
                default_embedding_bits(default_max_bits(bpw)),
                embedding,
                "{bpw}"
            );
        }
    }
}
