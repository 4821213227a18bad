//! The paper's comparison table: the dense model, uniform 4-bit GPTQ, the pure SSM and the
//! EdgeFusion hybrid at 3.1 bits, on quality, memory, speed and work per token.

use serde::{Deserialize, Serialize};

use crate::report::EvalReport;

/// One variant's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// Column name: Dense, GPTQ-4bit, Mamba-pure, Window-only, EdgeFusion.
    pub name: String,
    /// How the variant was made.
    pub description: String,
    pub model: String,
    pub file_bytes: u64,
    pub n_layers: usize,
    /// Layers without full attention (SSM or sink + window).
    pub n_converted_layers: usize,
    pub eval: EvalReport,
    /// Peak resident memory of a process that loads the model and decodes at `bench_ctx`.
    pub peak_rss_bytes: Option<u64>,
    /// Decode speed at `bench_ctx` (mean of the rounds).
    pub decode_tokens_per_s: f64,
    /// Counted from the shapes, for the token at position `bench_ctx`.
    pub gflops_per_token: f64,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub base: String,
    pub threads: usize,
    /// Context position of the speed, memory and FLOP rows.
    pub bench_ctx: usize,
    /// Tokens decoded per speed measurement, and repetitions.
    pub bench_tokens: usize,
    pub bench_repetitions: usize,
    pub limit: Option<crate::runner::Limits>,
    pub variants: Vec<VariantResult>,
}

fn task_cell(v: &VariantResult, task: &str, metric: &str) -> (String, Option<String>) {
    match v.eval.tasks.iter().find(|t| t.task == task) {
        Some(t) => {
            let value = t.metric(metric).map_or("–".into(), |m| {
                format!(
                    "{:.2}{}",
                    100.0 * m.mean,
                    m.stderr
                        .map_or(String::new(), |s| format!(" ± {:.2}", 100.0 * s))
                )
            });
            let count = if t.limited {
                format!("{} of {} items (--limit)", t.items, t.items_total)
            } else {
                format!("all {} items", t.items)
            };
            (value, Some(format!("{} shots, {count}", t.shots)))
        }
        None => ("–".into(), None),
    }
}

impl CompareReport {
    /// The table as markdown: one row per measure, one column per variant, and a last
    /// column that says how the row was measured.
    pub fn to_markdown(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "# EdgeFusion comparison: {}\n", self.base);
        let _ = write!(out, "| |");
        for v in &self.variants {
            let _ = write!(out, " {} |", v.name);
        }
        let _ = writeln!(out, " how it was measured |");
        let _ = write!(out, "|---|");
        for _ in &self.variants {
            let _ = write!(out, "---:|");
        }
        let _ = writeln!(out, "---|");
        let row = |out: &mut String, label: &str, cells: Vec<String>, how: String| {
            let _ = write!(out, "| {label} |");
            for c in cells {
                let _ = write!(out, " {c} |");
            }
            let _ = writeln!(out, " {how} |");
        };
        let ppl_how = self
            .variants
            .iter()
            .find_map(|v| v.eval.perplexity.first())
            .map_or("–".into(), |(file, p)| {
                format!(
                    "{file}, windows of {} tokens, second halves scored ({} tokens), llama-perplexity's method",
                    p.ctx, p.tokens_scored
                )
            });
        row(
            &mut out,
            "PPL",
            self.variants
                .iter()
                .map(|v| {
                    v.eval
                        .perplexity
                        .first()
                        .map_or("–".into(), |(_, p)| format!("{:.2}", p.ppl))
                })
                .collect(),
            ppl_how,
        );
        for (label, task, metric) in [
            ("MMLU 5-shot (acc, %)", "mmlu", "acc"),
            ("HellaSwag (acc_norm, %)", "hellaswag", "acc_norm"),
            ("ARC-Challenge (acc_norm, %)", "arc_challenge", "acc_norm"),
            ("GSM8K 8-shot (exact match, %)", "gsm8k", "exact_match"),
            ("Passkey retrieval (acc, %)", "passkey", "acc"),
        ] {
            let ran = self
                .variants
                .iter()
                .flat_map(|v| &v.eval.tasks)
                .find(|t| t.task == task);
            // Passkey is not among compare's default tasks: its row only when it was run.
            if task == "passkey" && ran.is_none() {
                continue;
            }
            let cells: Vec<(String, Option<String>)> = self
                .variants
                .iter()
                .map(|v| task_cell(v, task, metric))
                .collect();
            let how = cells
                .iter()
                .find_map(|(_, how)| how.clone())
                .map_or("not run".into(), |h| match ran.and_then(|t| t.ctx) {
                    Some(ctx) => format!(
                        "a 5-digit key 10–40% into the filler of a {ctx}-token prompt, greedy answer, {h}"
                    ),
                    None => format!("lm-evaluation-harness prompts and metric, {h}"),
                });
            row(
                &mut out,
                label,
                cells.into_iter().map(|(c, _)| c).collect(),
                how,
            );
        }
        row(
            &mut out,
            "Peak memory (GB)",
            self.variants
                .iter()
                .map(|v| {
                    v.peak_rss_bytes
                        .map_or("–".into(), |b| format!("{:.3}", b as f64 / 1e9))
                })
                .collect(),
            format!(
                "peak RSS (VmHWM) of an `edgefusion bench` process, the largest of the rounds: load, prefill to {} and decode",
                self.bench_ctx
            ),
        );
        row(
            &mut out,
            "Tokens/s",
            self.variants
                .iter()
                .map(|v| format!("{:.1}", v.decode_tokens_per_s))
                .collect(),
            format!(
                "decode, {} tokens ending at position {}, {} threads, mean of {} rounds (the variants take turns, one process each)",
                self.bench_tokens, self.bench_ctx, self.threads, self.bench_repetitions
            ),
        );
        row(
            &mut out,
            "GFLOPs/token",
            self.variants
                .iter()
                .map(|v| format!("{:.3}", v.gflops_per_token))
                .collect(),
            format!(
                "counted from the shapes (2 per multiply-add, attention over {} positions)",
                self.bench_ctx
            ),
        );
        row(
            &mut out,
            "File (MB) / converted layers",
            self.variants
                .iter()
                .map(|v| {
                    format!(
                        "{:.1} / {} of {}",
                        v.file_bytes as f64 / 1e6,
                        v.n_converted_layers,
                        v.n_layers
                    )
                })
                .collect(),
            "the GGUF file evaluated; converted: SSM or sink + window, not full attention".into(),
        );
        let _ = writeln!(out);
        for v in &self.variants {
            let _ = writeln!(out, "- **{}**: {} (`{}`)", v.name, v.description, v.model);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{Metric, TaskReport};
    use crate::score::MeanStderr;

    fn task(name: &str, metric: &str, ctx: Option<usize>) -> TaskReport {
        TaskReport {
            task: name.into(),
            shots: 0,
            items: 4,
            items_total: 4,
            limited: false,
            metrics: vec![Metric {
                name: metric.into(),
                value: MeanStderr::of_bools([true, true, false, true]).unwrap(),
            }],
            ctx,
            truncated: 0,
            cached: 0,
            seconds: 1.0,
            items_per_s: 4.0,
            tokens_per_s: 100.0,
        }
    }

    fn report(tasks: Vec<TaskReport>) -> CompareReport {
        let eval = EvalReport {
            model: "m.gguf".into(),
            threads: 1,
            n_ctx: 2048,
            perplexity: Vec::new(),
            tasks,
        };
        CompareReport {
            base: "m.gguf".into(),
            threads: 1,
            bench_ctx: 512,
            bench_tokens: 64,
            bench_repetitions: 3,
            limit: None,
            variants: vec![VariantResult {
                name: "Dense".into(),
                description: "the base".into(),
                model: "m.gguf".into(),
                file_bytes: 1,
                n_layers: 2,
                n_converted_layers: 0,
                eval,
                peak_rss_bytes: None,
                decode_tokens_per_s: 1.0,
                gflops_per_token: 1.0,
            }],
        }
    }

    #[test]
    fn the_passkey_row_appears_only_when_passkey_ran() {
        let without = report(vec![task("hellaswag", "acc_norm", None)]).to_markdown();
        assert!(!without.contains("Passkey"), "{without}");
        assert!(without.contains("| GSM8K 8-shot (exact match, %) | – | not run |"));
        let with = report(vec![task("passkey", "acc", Some(2048))]).to_markdown();
        let row = with
            .lines()
            .find(|l| l.starts_with("| Passkey retrieval (acc, %) |"))
            .unwrap_or_else(|| panic!("{with}"));
        assert!(row.contains("| 75.00 ± 25.00 |"), "{row}");
        assert!(
            row.contains("of a 2048-token prompt, greedy answer, 0 shots, all 4 items"),
            "{row}"
        );
    }
}
