//! `edgefusion inspect`: what a model file holds.
//!
//! For EFQ files (written by `edgefusion quantize`) the matrices are I8 tensors holding EFQ
//! blobs: their weights are counted from the blob's shape, not its bytes, and a section
//! shows the tile widths, outliers and bits per weight by role and by layer, then the
//! matrices kept in their source's type and the layers' bits per weight with them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use edgefusion_io::gguf::MetaValue;
use edgefusion_io::names::{self, TensorRole};
use edgefusion_io::{Backing, ModelSource, TensorView};
use edgefusion_kernels::efq::{tile_cols, width_index, EfqMatrix, SLOT_BYTES, TILE_ROWS, WIDTHS};
use edgefusion_kernels::GgmlType;
use edgefusion_model::model::{EFQ_VERSION, EFQ_VERSIONS_READ, EFQ_VERSION_KEY};
use edgefusion_model::ModelConfig;

use crate::common::mib;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file or Hugging Face model folder.
    pub model: PathBuf,
    /// Also list every tensor.
    #[arg(long)]
    pub tensors: bool,
    /// Also print every metadata key (long arrays abbreviated).
    #[arg(long)]
    pub metadata: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    // Metadata and tensor headers only: the file stays mapped.
    let source = ModelSource::open_with(&args.model, Backing::Mapped)?;
    let config = ModelConfig::from_source(&source);
    println!("file: {}", args.model.display());
    match &source {
        ModelSource::Gguf(gguf) => println!("format: GGUF v{}", gguf.version),
        ModelSource::HfDir(_) => println!("format: Hugging Face folder (safetensors)"),
    }
    match &config {
        Ok(c) => {
            println!("architecture: {} ({})", c.arch.name(), c.name);
            println!(
                "layers {} | d_model {} | heads {} (kv {}) × {} | d_ff {} | vocab {} | context {}",
                c.n_layers,
                c.d_model,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.d_ff,
                c.vocab_size,
                c.n_ctx_train
            );
            println!(
                "rope: base {} dim {} {:?} scaling {} | rms eps {:e} | tied head: {}",
                c.rope_base,
                c.rope_dim,
                c.rope_style,
                match &c.rope_scaling {
                    edgefusion_model::RopeScaling::Factors(f) =>
                        format!("per-frequency factors ×{} (rope_freqs.weight)", f.len()),
                    other => format!("{other:?}"),
                },
                c.rms_eps,
                c.tied_embeddings
            );
            let b = &c.block;
            if *b != edgefusion_model::BlockVariant::default() {
                println!(
                    "block: embedding × {:.3} | attention scale {:.4} | ffn {:?} | qk-norm {} | post-norms {} | local layers' rope base {}",
                    b.embed_scale,
                    c.attn_scale(),
                    b.ffn_act,
                    b.qk_norm,
                    b.post_norms,
                    b.window_rope_base.map_or("same".into(), |v| v.to_string())
                );
            }
            if c.is_hybrid() {
                use edgefusion_model::LayerType;
                let kinds: String = c
                    .layer_types
                    .iter()
                    .map(|t| match t {
                        LayerType::Attention => 'A',
                        LayerType::Ssm => 'S',
                        LayerType::Window => 'W',
                    })
                    .collect();
                if c.arch == edgefusion_model::Arch::Gemma3 && c.count_layers(LayerType::Ssm) == 0 {
                    println!(
                        "layers: {} local of {} ({kinds}; A global attention, W local over a sliding window)",
                        c.n_window_layers(),
                        c.n_layers,
                    );
                } else {
                    println!(
                        "hybrid: {} of {} layers converted ({kinds}; A attention, S SSM, W sink + window only)",
                        c.n_layers - c.n_attention_layers(),
                        c.n_layers,
                    );
                }
                if c.count_layers(LayerType::Ssm) > 0 {
                    println!(
                        "ssm: d_state {} | d_conv {} | state {:.1} KiB per SSM layer",
                        c.ssm_d_state,
                        c.ssm_d_conv,
                        c.ssm_state_floats() as f64 * 4.0 / 1024.0
                    );
                }
                if c.window > 0 {
                    println!(
                        "window: sink {} + last {} positions in {} layers | K+V {:.1} KiB per layer (f16), whatever the context",
                        c.sink,
                        c.window,
                        c.n_window_layers(),
                        (2 * c.kv_dim() * 2 * c.window_positions()) as f64 / 1024.0
                    );
                }
                println!(
                    "state per sequence at 4096 positions: {:.2} MiB (dense: {:.2} MiB)",
                    c.context_state_bytes(4096) as f64 / (1 << 20) as f64,
                    (c.n_layers * 2 * c.kv_dim() * 2 * 4096) as f64 / (1 << 20) as f64
                );
            }
            println!(
                "params {:.2} M | {:.3} GFLOP/token at position 0",
                c.n_params() as f64 / 1e6,
                c.flops_per_token(0) / 1e9
            );
        }
        Err(e) => println!("architecture: not runnable here: {e}"),
    }
    let efq_meta: Vec<(&str, &MetaValue)> = match &source {
        ModelSource::Gguf(gguf) => gguf
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("edgefusion.efq."))
            .map(|(k, v)| (k.as_str(), v))
            .collect(),
        ModelSource::HfDir(_) => Vec::new(),
    };
    let is_efq = efq_meta.iter().any(|(k, _)| *k == EFQ_VERSION_KEY);
    if args.metadata {
        if let ModelSource::Gguf(gguf) = &source {
            println!("\nmetadata:");
            for (key, value) in &gguf.metadata {
                println!("  {key} = {}", summarize(value));
            }
        }
    }

    let tensors = source.tensors();
    // Every tensor's weights and EFQ statistics first, so a bad blob fails before any table.
    let mut efq_stats: Vec<Option<(EfqShape, WidthStats)>> = Vec::with_capacity(tensors.len());
    for t in &tensors {
        efq_stats.push(if is_efq && t.dtype == GgmlType::I8 {
            Some(efq_tensor(t).map_err(|e| {
                anyhow::anyhow!(
                    "{}: tensor {}: EFQ blob does not parse: {e}",
                    args.model.display(),
                    t.name
                )
            })?)
        } else {
            None
        });
    }

    // role -> (weights, bytes, types seen)
    let mut by_role: BTreeMap<&'static str, (usize, usize, BTreeMap<&'static str, usize>)> =
        BTreeMap::new();
    let (mut total_weights, mut total_bytes) = (0usize, 0usize);
    if args.tensors {
        println!(
            "\n{:<36} {:>6} {:>18} {:>12} {:>6}",
            "tensor", "type", "shape", "bytes", "bpw"
        );
    }
    for (t, efq) in tensors.iter().zip(&efq_stats) {
        let bytes = t.data.len();
        let (n, type_name, shape) = match efq {
            Some((s, _)) => (
                s.n_out * s.n_in,
                "EFQ",
                format!("({}, {})", s.n_out, s.n_in),
            ),
            None => (
                t.shape.iter().product(),
                t.dtype.name(),
                format!("{:?}", t.shape),
            ),
        };
        total_weights += n;
        total_bytes += bytes;
        let role = names::parse_gguf_name(t.name)
            .or_else(|| names::parse_hf_name(t.name))
            .map_or("other", |(r, _)| r.short());
        let entry = by_role.entry(role).or_default();
        entry.0 += n;
        entry.1 += bytes;
        *entry.2.entry(type_name).or_default() += 1;
        if args.tensors {
            println!(
                "{:<36} {:>6} {:>18} {:>12} {:>6.2}",
                t.name,
                type_name,
                shape,
                bytes,
                bytes as f64 * 8.0 / n.max(1) as f64
            );
        }
    }
    println!(
        "\n{:<12} {:>12} {:>10} {:>7}  types",
        "role", "weights", "MiB", "bpw"
    );
    for (role, (n, bytes, types)) in &by_role {
        let types: Vec<String> = types.iter().map(|(t, c)| format!("{t}×{c}")).collect();
        println!(
            "{:<12} {:>12} {:>10.2} {:>7.3}  {}",
            role,
            n,
            mib(*bytes),
            *bytes as f64 * 8.0 / (*n).max(1) as f64,
            types.join(" ")
        );
    }
    println!(
        "{:<12} {:>12} {:>10.2} {:>7.3}  ({} tensors)",
        "total",
        total_weights,
        mib(total_bytes),
        total_bytes as f64 * 8.0 / total_weights.max(1) as f64,
        tensors.len()
    );

    if is_efq {
        let matrices: Vec<(&str, WidthStats)> = tensors
            .iter()
            .zip(&efq_stats)
            .filter_map(|(t, s)| s.as_ref().map(|(_, w)| (t.name, *w)))
            .collect();
        print_efq_section(&efq_meta, &matrices);
        // Matrices the quantizer kept as the source stored them (2-D tensors not in EFQ).
        let kept: Vec<&TensorView<'_>> = tensors
            .iter()
            .filter(|t| t.dtype != GgmlType::I8 && t.shape.len() == 2)
            .collect();
        if !kept.is_empty() {
            let in_layers =
                |t: &&&TensorView<'_>| matches!(names::parse_gguf_name(t.name), Some((_, Some(_))));
            let (weights, bytes) = kept
                .iter()
                .filter(in_layers)
                .fold((0usize, 0usize), |(w, b), t| {
                    (w + t.shape.iter().product::<usize>(), b + t.data.len())
                });
            let mut types: BTreeMap<&str, usize> = BTreeMap::new();
            for t in &kept {
                *types.entry(t.dtype.name()).or_default() += 1;
            }
            let types: Vec<String> = types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
            let efq_layers = matrices
                .iter()
                .filter(|(name, _)| matches!(names::parse_gguf_name(name), Some((_, Some(_)))))
                .fold((0usize, 0usize), |(w, b), (_, s)| {
                    (w + s.weights, b + s.bytes)
                });
            println!(
                "kept as the source stored them: {} matrices ({}); the layers' matrices, EFQ and kept: {:.3} bits/weight",
                kept.len(),
                types.join(" "),
                (bytes + efq_layers.1) as f64 * 8.0 / (weights + efq_layers.0).max(1) as f64
            );
        }
    }
    Ok(())
}

/// Shape of an EFQ matrix blob.
struct EfqShape {
    n_out: usize,
    n_in: usize,
}

/// Tile widths, outliers and bytes of one or more EFQ matrices.
#[derive(Debug, Default, Clone, Copy)]
struct WidthStats {
    /// n_out · n_in over the matrices.
    weights: usize,
    /// Weights in tiles of each width of [`WIDTHS`] (a partial last tile counts its
    /// columns).
    by_width: [usize; WIDTHS.len()],
    /// Outliers stored (nonzero slot values).
    outliers: usize,
    /// Every byte of the blobs.
    bytes: usize,
}

impl WidthStats {
    fn add(&mut self, other: &WidthStats) {
        self.weights += other.weights;
        for (a, b) in self.by_width.iter_mut().zip(other.by_width) {
            *a += b;
        }
        self.outliers += other.outliers;
        self.bytes += other.bytes;
    }

    fn pct(&self, n: usize) -> f64 {
        100.0 * n as f64 / self.weights.max(1) as f64
    }

    /// Mean code width, weighted by weights.
    fn code_bits(&self) -> f64 {
        let bits: usize = WIDTHS
            .iter()
            .zip(self.by_width)
            .map(|(&b, n)| b as usize * n)
            .sum();
        bits as f64 / self.weights.max(1) as f64
    }

    fn bpw(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.weights.max(1) as f64
    }
}

/// Parses one I8 tensor of an EFQ file as a matrix blob and counts its tile widths.
fn efq_tensor(t: &TensorView<'_>) -> Result<(EfqShape, WidthStats), String> {
    let m = EfqMatrix::parse(t.data).map_err(|e| e.to_string())?;
    let (n_out, n_in, nt) = (m.n_out, m.n_in, m.n_tiles());
    let mut by_width = [0usize; WIDTHS.len()];
    for g in 0..n_out / TILE_ROWS {
        for tile in 0..nt {
            let k = width_index(m.width(g, tile));
            by_width[k.expect("parse checked the widths")] += TILE_ROWS * tile_cols(n_in, tile);
        }
    }
    // The blob ends with its outlier slots (docs/FORMAT.md): the header's slot count S at
    // bytes 12..16, then 48·S bytes at the end, each slot 16 u16 columns and 16 i8 values
    // (0 = empty). `parse` has checked that these sizes add up.
    let n_slots = u32::from_le_bytes(t.data[12..16].try_into().expect("4 bytes")) as usize;
    let slots = &t.data[t.data.len() - n_slots * SLOT_BYTES..];
    let outliers = slots
        .chunks_exact(SLOT_BYTES)
        .map(|slot| slot[2 * TILE_ROWS..].iter().filter(|&&v| v != 0).count())
        .sum();
    Ok((
        EfqShape { n_out, n_in },
        WidthStats {
            weights: n_out * n_in,
            by_width,
            outliers,
            bytes: t.data.len(),
        },
    ))
}

/// Row order of the by-role table: the embedding, the layers' matrices, the head.
const ROLE_ORDER: [TensorRole; 9] = [
    TensorRole::TokenEmbd,
    TensorRole::AttnQ,
    TensorRole::AttnK,
    TensorRole::AttnV,
    TensorRole::AttnOutput,
    TensorRole::FfnGate,
    TensorRole::FfnUp,
    TensorRole::FfnDown,
    TensorRole::Output,
];

/// The "EFQ tile widths" section: quantization settings, then widths by role and by layer.
fn print_efq_section(meta: &[(&str, &MetaValue)], matrices: &[(&str, WidthStats)]) {
    println!("\nEFQ tile widths");
    let get = |key: &str| meta.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let version = get(EFQ_VERSION_KEY).and_then(|v| v.as_i128());
    let mut settings = vec![match version {
        Some(v) if v == EFQ_VERSION as i128 => format!("format v{v}"),
        Some(v)
            if (*EFQ_VERSIONS_READ.start() as i128..=*EFQ_VERSIONS_READ.end() as i128)
                .contains(&v) =>
        {
            format!("format v{v} (an earlier version; still read)")
        }
        Some(v) => format!(
            "format v{v} (this EdgeFusion reads v{} to v{})",
            EFQ_VERSIONS_READ.start(),
            EFQ_VERSIONS_READ.end()
        ),
        None => "format version unreadable".to_string(),
    }];
    if let Some(m) = get("edgefusion.efq.method") {
        settings.push(format!("method {}", m.as_str().unwrap_or("?")));
    }
    if let Some(b) = get("edgefusion.efq.target_bpw").and_then(|v| v.as_f64()) {
        settings.push(format!("target {b:.2} bits/weight (layers)"));
    }
    if let Some(o) = get("edgefusion.efq.outliers").and_then(|v| v.as_f64()) {
        settings.push(format!("outliers {:.2} % per matrix", 100.0 * o));
    }
    println!("{}", settings.join(" | "));
    match get("edgefusion.efq.calibration") {
        Some(c) => {
            let tokens = get("edgefusion.efq.calibration_tokens")
                .and_then(|v| v.as_i128())
                .map_or(String::new(), |n| format!(", {n} tokens"));
            println!("calibration: {}{tokens}", summarize(c));
        }
        None => println!("calibration: none"),
    }
    const SHOWN: [&str; 6] = [
        EFQ_VERSION_KEY,
        "edgefusion.efq.method",
        "edgefusion.efq.target_bpw",
        "edgefusion.efq.outliers",
        "edgefusion.efq.calibration",
        "edgefusion.efq.calibration_tokens",
    ];
    for (key, value) in meta.iter().filter(|(k, _)| !SHOWN.contains(k)) {
        println!("{key} = {}", summarize(value));
    }

    let mut by_role: BTreeMap<Option<TensorRole>, WidthStats> = BTreeMap::new();
    let mut by_layer: BTreeMap<usize, WidthStats> = BTreeMap::new();
    let (mut layers, mut all) = (WidthStats::default(), WidthStats::default());
    for (name, s) in matrices {
        let parsed = names::parse_gguf_name(name);
        by_role.entry(parsed.map(|(r, _)| r)).or_default().add(s);
        if let Some((_, Some(layer))) = parsed {
            by_layer.entry(layer).or_default().add(s);
            layers.add(s);
        }
        all.add(s);
    }

    println!(
        "% of weights in 2/3/4/5/6/8-bit tiles; code bits: their mean; outliers: 6-bit values stored \
         apart;\nbpw: every stored byte (codes, scales, zero points, outliers, indices) per weight"
    );
    let mut rows: Vec<(String, WidthStats)> = Vec::new();
    for role in ROLE_ORDER {
        if let Some(s) = by_role.remove(&Some(role)) {
            rows.push((role.short().to_string(), s));
        }
    }
    // Anything else stored as EFQ (not expected from `edgefusion quantize`).
    for (role, s) in by_role {
        rows.push((
            role.map_or(names::OTHER_GROUP, |r| r.short()).to_string(),
            s,
        ));
    }
    rows.push(("all".to_string(), all));
    print_width_table("role", &rows);

    let mut rows: Vec<(String, WidthStats)> = by_layer
        .into_iter()
        .map(|(l, s)| (l.to_string(), s))
        .collect();
    rows.push(("layers".to_string(), layers));
    print_width_table("layer", &rows);
}

/// One width table (a column per tile width): a header, a row per entry, the last entry a
/// total.
fn print_width_table(what: &str, rows: &[(String, WidthStats)]) {
    let widths: String = WIDTHS
        .iter()
        .map(|b| format!(" {:>5}", format!("{b}b %")))
        .collect();
    println!(
        "\n{:<12} {:>12}{widths} {:>9} {:>9} {:>6} {:>6}",
        what, "weights", "code bits", "outliers", "outl %", "bpw"
    );
    for (label, s) in rows {
        let shares: String = s
            .by_width
            .iter()
            .map(|&n| format!(" {:>5.1}", s.pct(n)))
            .collect();
        println!(
            "{:<12} {:>12}{shares} {:>9.3} {:>9} {:>6.2} {:>6.3}",
            label,
            s.weights,
            s.code_bits(),
            s.outliers,
            s.pct(s.outliers),
            s.bpw()
        );
    }
}

/// A metadata value on one line: arrays show their length and first items.
fn summarize(value: &MetaValue) -> String {
    match value {
        MetaValue::String(s) => {
            let one_line: String = s
                .chars()
                .take(80)
                .map(|c| if c == '\n' { ' ' } else { c })
                .collect();
            if s.chars().count() > 80 {
                format!("{one_line:?}…")
            } else {
                format!("{one_line:?}")
            }
        }
        MetaValue::Array(items) => {
            let head: Vec<String> = items.iter().take(5).map(summarize).collect();
            let more = if items.len() > 5 { ", …" } else { "" };
            format!("[{}{more}] ({} items)", head.join(", "), items.len())
        }
        MetaValue::U8(v) => v.to_string(),
        MetaValue::I8(v) => v.to_string(),
        MetaValue::U16(v) => v.to_string(),
        MetaValue::I16(v) => v.to_string(),
        MetaValue::U32(v) => v.to_string(),
        MetaValue::I32(v) => v.to_string(),
        MetaValue::U64(v) => v.to_string(),
        MetaValue::I64(v) => v.to_string(),
        MetaValue::F32(v) => v.to_string(),
        MetaValue::F64(v) => v.to_string(),
        MetaValue::Bool(v) => v.to_string(),
    }
}
