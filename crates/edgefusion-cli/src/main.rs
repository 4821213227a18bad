//! `edgefusion`: run, benchmark and inspect language models on CPU.

mod analyze_router;
mod bench;
mod chart;
mod common;
mod compare;
mod convert;
mod evaluate;
mod harden;
mod inspect;
mod perplexity;
mod plot;
mod quantize;
mod run;
mod serve;
mod train;

use clap::{Parser, Subcommand};

/// EdgeFusion makes language models small and fast on CPUs.
///
/// Point it at a GGUF file or a Hugging Face model folder (config.json + *.safetensors +
/// tokenizer.json). Without --model, commands use the default model fetched by
/// `scripts/fetch-assets.sh --model` (SmolLM2-135M-Instruct, Q4_1).
#[derive(Parser)]
#[command(name = "edgefusion", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    edgefusion run --prompt \"The capital of France is\" -n 32 --temp 0 --profile\n  \
    edgefusion run --chat --prompt \"Write a haiku about the sea\"\n  \
    edgefusion bench -p 512 -n 128 -t 1,2\n  \
    edgefusion perplexity --file assets/text/moby-dick.txt --ctx 512 --chunks 20\n  \
    edgefusion inspect assets/models/SmolLM2-135M-Instruct.Q4_1.gguf\n  \
    edgefusion serve --port 8080 --slots 2")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming tokens as they come.
    Run(run::RunArgs),
    /// Measure prompt processing (pp) and generation (tg) speed, llama-bench style.
    Bench(bench::BenchArgs),
    /// Perplexity of a text file, llama-perplexity style (comparable numbers).
    Perplexity(perplexity::PerplexityArgs),
    /// Show a model's architecture, hyperparameters, tensors and bits per weight.
    Inspect(inspect::InspectArgs),
    /// Convert a Hugging Face folder (safetensors) into one GGUF file.
    Convert(convert::ConvertArgs),
    /// Quantize a model to EFQ (adaptive 2- to 8-bit tiles, rotated, GPTQ-compensated).
    Quantize(quantize::QuantizeArgs),
    /// Convert a dense model into an attention/SSM hybrid (plan it with --dry-run).
    Train(train::TrainArgs),
    /// Harden a router checkpoint of a `train` run at a chosen share of SSM layers.
    Harden(harden::HardenArgs),
    /// Score a model on perplexity, HellaSwag, ARC-Challenge, MMLU and GSM8K (harness semantics).
    Evaluate(evaluate::EvaluateArgs),
    /// The paper's table: Dense, GPTQ-4bit, Mamba-pure and EdgeFusion from one base model.
    Compare(compare::CompareArgs),
    /// Show what a `train` run's router chose per layer and what it saves (--plot PNG).
    AnalyzeRouter(analyze_router::AnalyzeRouterArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming).
    Serve(serve::ServeArgs),
    /// Draw a PNG line chart from a series/label/x/y table (curves measured by scripts).
    Chart(chart::ChartArgs),
}

/// `edgefusion inspect … | head` closes stdout early; `println!` then panics with "Broken
/// pipe". Like other Unix tools, exit quietly instead (status 141, as if killed by
/// SIGPIPE); every other panic keeps the default report.
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Runs one subcommand.
fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Train(args) => train::run(args),
        Command::Harden(args) => harden::run(args),
        Command::AnalyzeRouter(args) => analyze_router::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Chart(args) => chart::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// Parses `argv` (program name first) as a command line and runs it: one subcommand
/// composing others (`compare` runs `quantize`, `train`, `harden`).
pub fn run_argv(argv: &[String]) -> anyhow::Result<()> {
    dispatch(Cli::try_parse_from(argv)?.command)
}

/// `argv` parsed as an `evaluate` command line.
pub fn parse_evaluate(argv: &[String]) -> anyhow::Result<evaluate::EvaluateArgs> {
    match Cli::try_parse_from(argv)?.command {
        Command::Evaluate(args) => Ok(args),
        _ => anyhow::bail!("not an evaluate command line: {argv:?}"),
    }
}

fn main() {
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    let result = dispatch(cli.command);
    if let Err(err) = result {
        // One line per cause, no backtrace.
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
