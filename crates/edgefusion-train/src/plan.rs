//! What a conversion will cost and produce, computed from the architecture alone (no
//! weights needed): `edgefusion train --dry-run`.

use edgefusion_model::{Arch, LayerType, ModelConfig, RopeScaling, RopeStyle};

use crate::config::{Architecture, LayerChoiceMethod, TrainConfig};
use crate::convert::CHOICE_CANDIDATES;
use crate::TrainError;

/// Context lengths the memory table shows.
pub const CONTEXTS: [usize; 5] = [512, 2048, 4096, 8192, 32768];

/// The paper's memory envelope for the 7B hybrid, in bytes (4 GB).
pub const ENVELOPE_BYTES: f64 = 4e9;

/// Training and inference speed as multiples of the machine's measured f32 matrix-product
/// speed. Training (candle's CPU backward): calibrated on end-to-end backprop through a
/// 135M model at about 20 tokens/s on 2 cores (16 GFLOP/s against 85 measured). Inference
/// (our runtime's 8-bit prefill): SmolLM2 at about 1480 tokens/s on 2 cores (400 GFLOP/s).
const TRAIN_EFFICIENCY: f64 = 0.19;
const INFER_EFFICIENCY: f64 = 4.7;

/// Seconds `edgefusion quantize` takes per million parameters here (SmolLM2: about 90 s).
const QUANTIZE_S_PER_MPARAM: f64 = 0.7;

/// A model's shapes from the configuration's `architecture` (Llama defaults for the rest).
pub fn config_from_architecture(a: &Architecture) -> ModelConfig {
    let head_dim = a.d_model / a.n_heads;
    ModelConfig {
        arch: Arch::Llama,
        name: "architecture from the training config".into(),
        n_layers: a.n_layers,
        d_model: a.d_model,
        n_heads: a.n_heads,
        n_kv_heads: a.n_kv_heads,
        head_dim,
        d_ff: a.d_ff,
        vocab_size: a.vocab_size,
        n_ctx_train: 4096,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_dim: head_dim,
        rope_style: RopeStyle::Normal,
        rope_scaling: RopeScaling::None,
        tied_embeddings: a.tied_embeddings,
        layer_types: vec![LayerType::Attention; a.n_layers],
        ssm_d_state: 0,
        ssm_d_conv: 0,
        window: 0,
        sink: 0,
        block: Default::default(),
    }
}

/// Figures of one model (dense or hybrid).
#[derive(Debug, Clone)]
pub struct ModelFigures {
    pub params: usize,
    pub gflops_per_token_0: f64,
    pub gflops_per_token_4k: f64,
    /// Bytes of the weights at the configured quantization.
    pub quantized_bytes: f64,
    /// KV cache (f16) plus SSM state (f32) bytes at each of [`CONTEXTS`].
    pub state_bytes: Vec<f64>,
}

/// Cost of one training stage.
#[derive(Debug, Clone)]
pub struct StageEstimate {
    pub name: &'static str,
    pub tokens: usize,
    pub tflops: f64,
    pub seconds: f64,
    pub note: String,
}

/// The whole plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dense: ModelConfig,
    pub hybrid: ModelConfig,
    pub n_ssm_layers: usize,
    pub attention_params: usize,
    pub ssm_params: usize,
    pub dense_figures: ModelFigures,
    pub hybrid_figures: ModelFigures,
    pub stages: Vec<StageEstimate>,
    /// Bytes stage 1 writes to disk (per-layer mixer inputs and outputs, top-k logits).
    pub teacher_cache_bytes: f64,
    /// Measured f32 matrix-product speed of this machine (GFLOP/s, all threads).
    pub machine_gflops: f64,
    pub threads: usize,
}

/// Plans the conversion of `dense` (all attention) with `cfg`, on `threads` threads of a
/// machine that multiplies f32 matrices at `machine_gflops`.
///
/// # Errors
/// If the configured SSM would have more parameters than the attention it replaces, or the
/// target fraction leaves no layer to convert.
pub fn plan(
    cfg: &TrainConfig,
    dense: &ModelConfig,
    machine_gflops: f64,
    threads: usize,
) -> Result<Plan, TrainError> {
    let n_layers = dense.n_layers;
    let fraction = cfg.router.target_ssm_fraction.unwrap_or(0.5);
    let n_ssm = ((fraction * n_layers as f64).round() as usize).min(n_layers);
    let mut hybrid = dense.clone();
    // Which layers become SSM is learned; for counting, any n_ssm of them will do.
    hybrid.layer_types = (0..n_layers)
        .map(|i| {
            if i < n_ssm {
                LayerType::Ssm
            } else {
                LayerType::Attention
            }
        })
        .collect();
    hybrid.ssm_d_state = cfg.ssm.d_state;
    hybrid.ssm_d_conv = cfg.ssm.d_conv;
    let conv = &cfg.conversion;
    let greedy = conv.layer_choice == LayerChoiceMethod::Greedy;
    if greedy {
        hybrid.window = conv.window;
        hybrid.sink = conv.sink;
        if !conv.ssm_beside_window {
            for t in hybrid.layer_types.iter_mut() {
                if *t == LayerType::Ssm {
                    *t = LayerType::Window;
                }
            }
        }
    }
    let (attention_params, ssm_params) = (hybrid.attention_params(), hybrid.ssm_params());
    if ssm_params > attention_params {
        return Err(TrainError::Config {
            file: "training config".into(),
            what: format!(
                "ssm.d_state: d_state {} makes the SSM {ssm_params} parameters, more than the attention it replaces ({attention_params}); lower it (it must stay below head_dim {})",
                cfg.ssm.d_state, dense.head_dim
            ),
        });
    }

    let q = &cfg.quantization;
    let figures = |m: &ModelConfig| {
        let embd = m.vocab_size * m.d_model;
        let heads = if m.tied_embeddings { 1 } else { 2 };
        // EFQ bytes: codes plus block scales and zero points (12 bits per 128), outliers
        // (24 bits each) and f16 row scales; tiny vectors in f32.
        let efq_bpw =
            |bits: f64, n_in: usize| bits + 12.0 / 128.0 + q.outliers * 24.0 + 16.0 / n_in as f64;
        let small = m.n_params() - m.n_block_params() - heads * embd;
        let ssm_f32 = m.count_layers(LayerType::Ssm)
            * (2 * m.n_kv_heads * m.d_model + m.ssm_channels() * m.ssm_d_conv);
        let linear = m.n_block_params() - ssm_f32;
        let quantized_bytes = (linear as f64 * efq_bpw(q.bpw, m.d_model)
            + (heads * embd) as f64 * efq_bpw(q.embedding_bits as f64, m.d_model))
            / 8.0
            + ((small + ssm_f32) * 4) as f64;
        ModelFigures {
            params: m.n_params(),
            gflops_per_token_0: m.flops_per_token(0) / 1e9,
            gflops_per_token_4k: m.flops_per_token(4095) / 1e9,
            quantized_bytes,
            state_bytes: CONTEXTS
                .iter()
                .map(|&n| m.context_state_bytes(n) as f64)
                .collect(),
        }
    };
    let (dense_figures, hybrid_figures) = (figures(dense), figures(&hybrid));

    // Stages, in FLOPs: 2 per multiply-add forward, 6 forward + backward.
    let p_dense = dense.n_params() as f64;
    let p_ssm_all = (n_layers * ssm_params) as f64;
    let train = machine_gflops * 1e9 * TRAIN_EFFICIENCY;
    let infer = machine_gflops * 1e9 * INFER_EFFICIENCY;
    let s = &cfg.stages;
    let teacher_tokens = s.teacher_tokens;
    let router_tokens = s.router_steps * cfg.data.batch_size * cfg.data.seq_len;
    let teacher_cache_bytes = teacher_tokens as f64
        * ((n_layers * 2 * dense.d_model * 2) as f64 + (s.teacher_top_k * 6) as f64);
    let stage1 = 2.0 * p_dense * teacher_tokens as f64;
    let stage2 = 6.0 * p_ssm_all * (teacher_tokens * s.distill_epochs) as f64;
    // Both branches forward, activation gradients through the frozen base, SSM gradients.
    let stage3 = (6.0 * (p_dense + p_ssm_all)) * router_tokens as f64;
    let quantize_stage = |name| StageEstimate {
        name,
        tokens: q.calib_tokens,
        tflops: 2.0 * hybrid.n_params() as f64 * q.calib_tokens as f64 / 1e12,
        seconds: hybrid.n_params() as f64 / 1e6
            * QUANTIZE_S_PER_MPARAM
            * (20.0 / machine_gflops.max(1.0)).max(0.05),
        note: format!("EFQ at {} bits per weight", q.bpw),
    };
    let stages = if greedy {
        // The choice: one pass with all converted, a round over every layer, then rounds
        // over the best few (choose.rs); end-to-end KL: forward, then activation gradients
        // through the frozen base (about twice the forward), adapter gradients negligible.
        let rounds = n_layers - n_ssm;
        let passes = 1 + n_layers + rounds.saturating_sub(1) * CHOICE_CANDIDATES.min(n_layers);
        let choice_ctx = conv.choice_ctx.min(dense.n_ctx_train);
        let windows = conv.choice_windows + conv.choice_copy_windows;
        let choice_tokens = passes * windows * choice_ctx;
        let choice = 2.0 * p_dense * choice_tokens as f64;
        let finetune_tokens = conv.finetune_steps * conv.finetune_seq_len;
        let finetune = 6.0 * p_dense * finetune_tokens as f64;
        vec![
            StageEstimate {
                name: "1 joint layer choice",
                tokens: choice_tokens,
                tflops: choice / 1e12,
                seconds: choice / infer,
                note: format!(
                    "{passes} forward passes over {windows} × {choice_ctx} tokens (KL with each layer restored{})",
                    match conv.choice_copy_windows {
                        0 => String::new(),
                        n => format!("; {n} of the windows copy windows"),
                    }
                ),
            },
            StageEstimate {
                name: "2 end-to-end KL",
                tokens: finetune_tokens,
                tflops: finetune / 1e12,
                seconds: finetune / train,
                note: format!(
                    "{} steps of {} tokens, rank-{} adapters on the feed-forward blocks{}",
                    conv.finetune_steps,
                    conv.finetune_seq_len,
                    conv.lora_rank,
                    if conv.ssm_beside_window {
                        " and the SSMs"
                    } else {
                        ""
                    }
                ),
            },
            quantize_stage("3 quantize"),
        ]
    } else {
        vec![
            StageEstimate {
                name: "1 teacher cache",
                tokens: teacher_tokens,
                tflops: stage1 / 1e12,
                seconds: stage1 / infer,
                note: format!(
                    "writes {:.1} GB (per-layer mixer inputs/outputs and top-{} logits, 16-bit)",
                    teacher_cache_bytes / 1e9,
                    s.teacher_top_k
                ),
            },
            StageEstimate {
                name: "2 layer-local distillation",
                tokens: teacher_tokens * s.distill_epochs,
                tflops: stage2 / 1e12,
                seconds: stage2 / train,
                note: format!(
                    "{n_layers} SSM blocks, each against its attention, {} epoch(s)",
                    s.distill_epochs
                ),
            },
            StageEstimate {
                name: "3 router training",
                tokens: router_tokens,
                tflops: stage3 / 1e12,
                seconds: stage3 / train,
                note: format!(
                    "{} steps of {}×{} tokens, {}",
                    s.router_steps,
                    cfg.data.batch_size,
                    cfg.data.seq_len,
                    if s.freeze_base {
                        "base frozen".to_string()
                    } else {
                        // Weights, gradient and two moments of every base weight, in f32.
                        format!(
                            "full fine-tuning (base weights, gradients and moments: {:.1} GB)",
                            16.0 * p_dense / 1e9
                        )
                    }
                ),
            },
            quantize_stage("4 harden + quantize"),
        ]
    };
    Ok(Plan {
        dense: dense.clone(),
        hybrid,
        n_ssm_layers: n_ssm,
        attention_params,
        ssm_params,
        dense_figures,
        hybrid_figures,
        stages,
        teacher_cache_bytes,
        machine_gflops,
        threads,
    })
}

/// Measures this machine's f32 matrix-product speed with the runtime's kernels (about a
/// tenth of a second), in GFLOP/s for `threads` threads (assumed to scale linearly).
pub fn measure_gflops(threads: usize) -> f64 {
    use edgefusion_kernels::{matmul, GgmlType};
    let (k, n_rows, n_tok) = (512, 256, 64);
    let w: Vec<u8> = (0..k * n_rows)
        .flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes())
        .collect();
    let act: Vec<u8> = (0..k * n_tok)
        .flat_map(|i| ((i % 5) as f32 * 0.02).to_le_bytes())
        .collect();
    let mut out = vec![0.0f32; n_rows * n_tok];
    let start = std::time::Instant::now();
    let mut reps = 0;
    while reps < 3 || start.elapsed().as_secs_f64() < 0.1 {
        matmul(GgmlType::F32, k, &w, n_rows, &act, n_tok, &mut out, n_rows);
        reps += 1;
    }
    let flops = 2.0 * (k * n_rows * n_tok) as f64 * reps as f64;
    flops / start.elapsed().as_secs_f64() / 1e9 * threads as f64
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

fn human_seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

impl Plan {
    /// The plan as the text `--dry-run` prints.
    pub fn render(&self, cfg: &TrainConfig) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let (d, h) = (&self.dense_figures, &self.hybrid_figures);
        let n = self.dense.n_layers;
        let _ = writeln!(
            o,
            "model: {} layers, d_model {}, heads {} (kv {}) × {}, d_ff {}, vocab {}",
            n,
            self.dense.d_model,
            self.dense.n_heads,
            self.dense.n_kv_heads,
            self.dense.head_dim,
            self.dense.d_ff,
            self.dense.vocab_size
        );
        let target = match (
            cfg.router.target_ssm_fraction,
            cfg.router.router_sparsity_lambda,
        ) {
            (Some(t), _) => format!("target ssm_frac {t} (λ by dual ascent)"),
            (None, Some(l)) => format!("fixed λ {l} (fraction not set: counted at 0.5)"),
            (None, None) => unreachable!("validated"),
        };
        let conv = &cfg.conversion;
        if conv.layer_choice == LayerChoiceMethod::Greedy {
            let _ = writeln!(
                o,
                "hybrid: {} of {} layers converted to sink {} + window {} softmax{}, chosen jointly (greedy restore by KL)",
                self.n_ssm_layers,
                n,
                conv.sink,
                conv.window,
                if conv.ssm_beside_window {
                    format!(" with an SSM beside (d_state {})", cfg.ssm.d_state)
                } else {
                    String::new()
                }
            );
        } else {
            let _ = writeln!(
                o,
                "hybrid: {} of {} layers SSM ({target}); SSM d_state {}, d_conv {}, init from {}",
                self.n_ssm_layers,
                n,
                cfg.ssm.d_state,
                cfg.ssm.d_conv,
                match cfg.ssm.init {
                    crate::config::SsmInit::Attention => "attention",
                    crate::config::SsmInit::Random => "random",
                }
            );
        }
        let _ = writeln!(
            o,
            "mixer parameters: attention {}, SSM {} ({:.1} % of attention)\n",
            self.attention_params,
            self.ssm_params,
            100.0 * self.ssm_params as f64 / self.attention_params as f64
        );
        let _ = writeln!(o, "{:<34} {:>14} {:>14}", "", "dense", "hybrid");
        let _ = writeln!(
            o,
            "{:<34} {:>12.2} M {:>12.2} M",
            "parameters",
            d.params as f64 / 1e6,
            h.params as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "{:<34} {:>14.3} {:>14.3}",
            "GFLOP/token at position 0", d.gflops_per_token_0, h.gflops_per_token_0
        );
        let _ = writeln!(
            o,
            "{:<34} {:>14.3} {:>14.3}",
            "GFLOP/token at position 4096", d.gflops_per_token_4k, h.gflops_per_token_4k
        );
        let _ = writeln!(
            o,
            "{:<34} {:>14} {:>14}",
            format!(
                "weights at {} bpw (embedding {} bits)",
                cfg.quantization.bpw, cfg.quantization.embedding_bits
            ),
            human_bytes(d.quantized_bytes),
            human_bytes(h.quantized_bytes)
        );
        for (i, ctx) in CONTEXTS.iter().enumerate() {
            let _ = writeln!(
                o,
                "{:<34} {:>14} {:>14}",
                format!("KV cache + SSM state at {ctx}"),
                human_bytes(d.state_bytes[i]),
                human_bytes(h.state_bytes[i])
            );
        }
        let at4k = CONTEXTS
            .iter()
            .position(|&c| c == 4096)
            .expect("4096 listed");
        let total_dense = d.quantized_bytes + d.state_bytes[at4k];
        let total_hybrid = h.quantized_bytes + h.state_bytes[at4k];
        let _ = writeln!(
            o,
            "{:<34} {:>14} {:>14}",
            "weights + state at 4096",
            human_bytes(total_dense),
            human_bytes(total_hybrid)
        );
        let _ = writeln!(
            o,
            "4 GB envelope (weights + state at 4096): hybrid {} ({} of 4 GB)",
            if total_hybrid <= ENVELOPE_BYTES {
                "fits"
            } else {
                "does NOT fit"
            },
            human_bytes(total_hybrid)
        );
        // What `quantize --fit 4GB --ctx 4096` would choose for each model, with the
        // runtime's buffers and the process counted too (edgefusion_runtime::memory).
        let session = edgefusion_runtime::SessionOptions::new(4096, self.threads.max(1));
        for (name, m) in [("dense", &self.dense), ("hybrid", &self.hybrid)] {
            let line = match edgefusion_quant::fit::fit(m, ENVELOPE_BYTES as u64, &session, 0) {
                Ok(p) => format!(
                    "--bpw {:.2} --embedding-bits {}: {}",
                    p.linear_bpw,
                    p.embedding_bits,
                    p.memory.describe()
                ),
                Err(e) => e.to_string(),
            };
            let _ = writeln!(o, "quantize --fit 4GB --ctx 4096, {name}: {line}");
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "estimated time on this machine ({} threads, f32 matmul {:.0} GFLOP/s measured; training at {:.2}× and inference at {:.1}× of it):",
            self.threads,
            self.machine_gflops,
            TRAIN_EFFICIENCY,
            INFER_EFFICIENCY
        );
        let mut total = 0.0;
        for s in &self.stages {
            total += s.seconds;
            let _ = writeln!(
                o,
                "  {:<28} {:>11} tokens {:>9.1} TFLOP {:>9}   {}",
                s.name,
                s.tokens,
                s.tflops,
                human_seconds(s.seconds),
                s.note
            );
        }
        let _ = writeln!(o, "  {:<28} {:>49}", "total", human_seconds(total));
        o
    }

    /// Estimated seconds of all stages.
    pub fn total_seconds(&self) -> f64 {
        self.stages.iter().map(|s| s.seconds).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> TrainConfig {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../configs")
                .join(name),
        )
        .unwrap();
        TrainConfig::parse(&text, name).unwrap()
    }

    fn smollm2() -> ModelConfig {
        config_from_architecture(&Architecture {
            n_layers: 30,
            d_model: 576,
            n_heads: 9,
            n_kv_heads: 3,
            d_ff: 1536,
            vocab_size: 49152,
            tied_embeddings: true,
        })
    }

    #[test]
    fn smollm2_plan_counts_what_the_architecture_implies() {
        let shipped = config("smollm2_135m.yaml");
        let dense = smollm2();
        // SmolLM2-135M: 134.5 M parameters.
        assert_eq!(dense.n_params(), 134_515_008);
        // The router's conversion: SSM layers.
        let mut cfg = shipped.clone();
        cfg.conversion = crate::config::ConversionSection::default();
        let p = plan(&cfg, &dense, 50.0, 2).unwrap();
        assert_eq!(p.n_ssm_layers, 20);
        assert_eq!(p.attention_params, 884_736);
        // docs/HYBRID.md: d·(H·N + G·N + G·P) + H·P·d + channels·K + 2·G·d + 2·G + H.
        assert_eq!(
            p.ssm_params,
            331_776 + 331_776 + 576 * 4 + 2 * 3 * 576 + 6 + 9
        );
        assert!(p.hybrid_figures.params < p.dense_figures.params);
        // 10 attention layers of 3 KV heads × 64 at 4096 positions in f16, plus 20 states.
        let at4k = 2;
        let kv = 10.0 * 2.0 * 192.0 * 4096.0 * 2.0;
        let state = 20.0 * (3.0 * 32.0 * 64.0 + 3.0 * 576.0) * 4.0;
        assert!((p.hybrid_figures.state_bytes[at4k] - (kv + state)).abs() < 1.0);
        assert!(p.hybrid_figures.state_bytes[at4k] < 0.5 * p.dense_figures.state_bytes[at4k]);
        let text = p.render(&cfg);
        for words in ["20 of 30 layers SSM", "4 GB envelope", "3 router training"] {
            assert!(text.contains(words), "{text}");
        }

        // The shipped greedy conversion: 20 layers keep sink 4 + window 64 keys and values
        // and an SSM state beside them.
        let p = plan(&shipped, &dense, 50.0, 2).unwrap();
        assert!(shipped.conversion.ssm_beside_window);
        assert_eq!(p.n_ssm_layers, 20);
        assert_eq!(
            p.hybrid_figures.params,
            p.dense_figures.params + 20 * p.ssm_params
        );
        let window = 20.0 * 2.0 * 192.0 * 68.0 * 2.0;
        assert!((p.hybrid_figures.state_bytes[at4k] - (kv + window + state)).abs() < 1.0);
        let text = p.render(&shipped);
        for words in [
            "20 of 30 layers converted to sink 4 + window 64 softmax with an SSM beside",
            "1 joint layer choice",
            "2 end-to-end KL",
            "100 steps of 1024 tokens",
        ] {
            assert!(text.contains(words), "{words:?} missing from\n{text}");
        }
        // Without the SSM: the window's keys and values alone, no new parameters.
        let mut window_only = shipped.clone();
        window_only.conversion.ssm_beside_window = false;
        let p = plan(&window_only, &dense, 50.0, 2).unwrap();
        assert_eq!(p.hybrid_figures.params, p.dense_figures.params);
        assert!((p.hybrid_figures.state_bytes[at4k] - (kv + window)).abs() < 1.0);
    }

    #[test]
    fn seven_b_plan_fits_the_envelope_from_the_architecture_alone() {
        let cfg = config("edgefusion_7b.yaml");
        let dense = config_from_architecture(cfg.model.architecture.as_ref().unwrap());
        // Llama-2-7B: 6.74 B parameters.
        assert_eq!(dense.n_params(), 6_738_415_616);
        let p = plan(&cfg, &dense, 50.0, 2).unwrap();
        assert_eq!(p.n_ssm_layers, 22);
        let text = p.render(&cfg);
        assert!(text.contains("hybrid fits"), "{text}");
    }

    #[test]
    fn an_ssm_larger_than_attention_is_refused() {
        let mut cfg = config("smollm2_135m.yaml");
        cfg.ssm.d_state = 64;
        let err = plan(&cfg, &smollm2(), 50.0, 2).unwrap_err().to_string();
        assert!(
            err.contains("d_state 64") && err.contains("more than the attention"),
            "{err}"
        );
    }
}
