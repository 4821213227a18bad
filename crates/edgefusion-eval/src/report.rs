//! One model's evaluation report: perplexity and the tasks, as markdown and JSON.

use serde::{Deserialize, Serialize};

use crate::perplexity::Perplexity;
use crate::runner::TaskReport;

/// Everything `edgefusion evaluate` measured on one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub threads: usize,
    /// The context window of the task prompts.
    pub n_ctx: usize,
    /// Perplexity on each text file, by file name.
    pub perplexity: Vec<(String, PerplexitySummary)>,
    pub tasks: Vec<TaskReport>,
}

/// What a report keeps of a perplexity run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerplexitySummary {
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub bits_per_byte: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub ctx: usize,
    pub tokens_per_s: f64,
}

impl From<&Perplexity> for PerplexitySummary {
    fn from(p: &Perplexity) -> Self {
        PerplexitySummary {
            ppl: p.ppl,
            ppl_stderr: p.ppl_stderr,
            bits_per_byte: p.bits_per_byte,
            tokens_scored: p.tokens_scored,
            windows: p.windows,
            ctx: p.ctx,
            tokens_per_s: p.tokens_per_s,
        }
    }
}

impl EvalReport {
    /// The report as a markdown table, one row per metric, each saying how it was measured.
    pub fn to_markdown(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "# Evaluation of {}\n", self.model);
        let _ = writeln!(
            out,
            "{} threads; task prompts in a {}-token window (longer ones cut from the left, counted as truncated){}.\n",
            self.threads,
            self.n_ctx,
            if self.tasks.iter().any(|t| t.ctx.is_some()) {
                "; a task with its own window names it"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "| task | shots | items | metric | value | ± stderr | truncated | items/s |"
        );
        let _ = writeln!(out, "|---|---:|---:|---|---:|---:|---:|---:|");
        for (file, p) in &self.perplexity {
            let _ = writeln!(
                out,
                "| ppl: {file} (ctx {}, {} windows) | – | {} tokens | perplexity | {:.4} | {:.4} | – | {:.0} tok/s |",
                p.ctx, p.windows, p.tokens_scored, p.ppl, p.ppl_stderr, p.tokens_per_s
            );
            let _ = writeln!(
                out,
                "| ppl: {file} | – | {} tokens | bits per byte | {:.4} | – | – | – |",
                p.tokens_scored, p.bits_per_byte
            );
        }
        for t in &self.tasks {
            let items = if t.limited {
                format!("{} of {} (--limit)", t.items, t.items_total)
            } else {
                t.items.to_string()
            };
            let label = match t.ctx {
                Some(ctx) => format!("{} ({ctx}-token window)", t.task),
                None => t.task.clone(),
            };
            for m in &t.metrics {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.4} | {} | {} | {:.2} |",
                    label,
                    t.shots,
                    items,
                    m.name,
                    m.value.mean,
                    m.value.stderr.map_or("N/A".into(), |s| format!("{s:.4}")),
                    t.truncated,
                    t.items_per_s
                );
            }
        }
        out
    }
}
