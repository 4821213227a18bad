//! `edgefusion evaluate`: perplexity and the standard tasks (HellaSwag, ARC, MMLU, GSM8K,
//! PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ, COPA, CommonsenseQA, Social IQa) with
//! lm-evaluation-harness semantics, and passkey retrieval, in one report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use edgefusion_eval::lm::LanguageModel;
use edgefusion_eval::perplexity::{perplexity, PerplexityOptions};
use edgefusion_eval::report::{EvalReport, PerplexitySummary};
use edgefusion_eval::runner::{run_task, Limits, RunSettings};
use edgefusion_eval::{passkey, ResultCache, RunHash, Task};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{self, ModelArgs};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    edgefusion evaluate --tasks ppl,hellaswag --limit 200\n  \
    edgefusion evaluate -m runs/smollm2/checkpoint_quantized/model.gguf -o hybrid.md\n  \
    edgefusion evaluate --tasks mmlu --shots 5 -o mmlu.json\n  \
    edgefusion evaluate --tasks piqa,winogrande,boolq,copa --limit 500\n  \
    edgefusion evaluate --tasks all --limit 100,mmlu=2,gsm8k=20 -o all.md\n  \
    edgefusion evaluate -m hybrid.gguf --tasks passkey --limit 50 --passkey-ctx 4096\n\n\
    Tasks (lm-evaluation-harness semantics but passkey; shots: the harness's defaults):\n  \
    ppl            perplexity and bits per byte on --ppl-file (llama-perplexity's windows)\n  \
    hellaswag      10,042 validation items, 0-shot, acc and acc_norm\n  \
    arc_challenge  1,172 test items, 0-shot, \"Question: … Answer:\", acc and acc_norm\n  \
    mmlu           14,042 test items over 57 subjects, 5-shot from dev, acc\n  \
    gsm8k          1,319 test items, 8-shot chain of thought, greedy, exact match\n  \
    arc_easy       2,376 test items, as arc_challenge, acc and acc_norm\n  \
    piqa           1,838 validation items, \"Question: {goal} Answer:\", two solutions,\n                 \
    acc and acc_norm\n  \
    winogrande     1,267 validation items (xl), partial scoring: each option fills the\n                 \
    blank in its own context, only the shared rest of the sentence is scored, acc\n  \
    boolq          3,270 validation items, \"{passage} Question: {question}? Answer:\",\n                 \
    no/yes, acc (the assets' passages lack SuperGLUE's \"title -- \" prefix)\n  \
    openbookqa     500 validation items, the bare question stem, acc and acc_norm\n  \
    sciq           1,000 validation items, \"{support} Question: … Answer:\", acc and\n                 \
    acc_norm\n  \
    copa           100 validation items, premise + \"because\"/\"therefore\", the choice\n                 \
    lower-cased, acc\n  \
    commonsense_qa 1,221 validation items, choices listed A-E, scored as the letter, acc\n  \
    social_iqa     1,954 validation items, \"Q: {context} {question} A:\", acc\n  \
    passkey        long-context retrieval (not in the default list): a 5-digit key hidden\n                 \
    10-40% into filler text that fills --passkey-ctx tokens (default 2048, counted\n                 \
    with the model's tokenizer, at most the model's context window), asked for at\n                 \
    the end; 8 greedy tokens, right when they start with the key; acc over --limit\n                 \
    items (default 20, generated from their index, no task file). It checks that\n                 \
    layers which see only a sink and a recent window (or an SSM state) have not cut\n                 \
    the model off from what lies far back: compare a hybrid with its dense base.\n  \
    all            every task above, passkey included.\n\n\
    Only arc_challenge and arc_easy (shots from validation), mmlu (dev) and gsm8k have\n\
    few-shot examples in the assets; --shots above 0 is an error for the other tasks.\n\
    Multiple choice scores each continuation by its log-likelihood after the shared\n\
    context, which is computed once per question (and a few-shot preamble once per run of\n\
    questions that share it). acc_norm divides by the continuation's length in\n\
    characters, as the harness does, and is reported where the harness reports it.\n\
    Each item's result is appended to a cache as it finishes, so an interrupted run\n\
    started again resumes where it stopped (--no-cache to recompute). Task files come from `scripts/fetch-assets.sh --tasks`.")]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated tasks: ppl, hellaswag, arc_challenge, mmlu, gsm8k, arc_easy, piqa,
    /// winogrande, boolq, openbookqa, sciq, copa, commonsense_qa, social_iqa, passkey; or
    /// `all` for every one.
    #[arg(long, default_value = "ppl,hellaswag,arc_challenge,mmlu,gsm8k")]
    pub tasks: String,
    /// Score only the first N items of each task (of each subject for MMLU): `200`, or
    /// per task, `200,mmlu=10,gsm8k=50`.
    #[arg(long, value_parser = Limits::parse)]
    pub limit: Option<Limits>,
    /// Few-shot examples for every task [default: each task's own, listed below].
    #[arg(long)]
    pub shots: Option<usize>,
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Write the report here: .md for markdown, .json for JSON (it is printed anyway).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Text for perplexity (never the calibration text, assets/text/sotu.txt).
    #[arg(long, default_value = "assets/text/moby-dick.txt")]
    pub ppl_file: PathBuf,
    /// Perplexity window in tokens.
    #[arg(long, default_value_t = 512)]
    pub ppl_ctx: usize,
    /// Perplexity windows to score [default: all in the file].
    #[arg(long)]
    pub ppl_chunks: Option<usize>,
    /// Context window of the task prompts (longer prompts are cut from the left).
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Longest generation (GSM8K) in tokens [default: the harness's 256].
    #[arg(long)]
    pub max_gen_tokens: Option<usize>,
    /// Passkey: tokens its prompt and answer fill (the filler is sized to it with the model's
    /// tokenizer); at most the model's context window. Independent of --ctx.
    #[arg(long, default_value_t = edgefusion_eval::passkey::DEFAULT_CTX)]
    pub passkey_ctx: usize,
    /// Folder of the task jsonl files.
    #[arg(long, default_value = "assets/tasks")]
    pub tasks_dir: PathBuf,
    /// Per-item result cache [default: next to --output (REPORT.cache.jsonl), else
    /// edgefusion-eval-cache.jsonl].
    #[arg(long, conflicts_with = "no_cache")]
    pub cache: Option<PathBuf>,
    /// Compute every item again; read and write no cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Log every scored item here (jsonl: prompt, continuations, log-likelihoods, choice,
    /// generation), as lm-evaluation-harness's --log_samples.
    #[arg(long, value_name = "JSONL")]
    pub samples: Option<PathBuf>,
}

/// A file's identity for the cache: path, size and modification time.
fn file_identity(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let modified = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    format!("{}|{size}|{modified}", canonical.display())
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    if let Some(out) = &args.output {
        let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "md" | "json") {
            bail!("{}: the report is .md or .json", out.display());
        }
    }
    let report = evaluate(&args)?;
    let markdown = report.to_markdown();
    print!("{markdown}");
    if let Some(out) = &args.output {
        let text = if out.extension().and_then(|e| e.to_str()) == Some("json") {
            serde_json::to_string_pretty(&report)?
        } else {
            markdown
        };
        crate::common::write_atomic(out, text.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Runs the tasks of `args` on its model (progress on stderr) and returns the report.
pub fn evaluate(args: &EvaluateArgs) -> Result<EvalReport> {
    let tasks = Task::parse_list(&args.tasks)?;
    let threads = common::threads(args.threads)?;
    let source = args.model.open()?;
    let model = common::load_model(&source)?;
    let tokenizer = common::load_tokenizer(&source)?;
    if tasks.contains(&Task::Passkey) {
        // Before anything runs, so a bad --passkey-ctx does not fail after an hour of other
        // tasks: within the model's window, and large enough for the prompt.
        let model_ctx = model.config.n_ctx_train;
        passkey::check_ctx(args.passkey_ctx, model_ctx)?;
        passkey::item(0, &tokenizer, args.passkey_ctx, Some(model_ctx))?;
    }
    let model_path = args.model.path();
    let model_name = model_path.display().to_string();
    let bar_style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:30}] {pos}/{len} ({per_sec}, {elapsed} elapsed, eta {eta}) {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");

    let mut report = EvalReport {
        model: model_name.clone(),
        threads,
        n_ctx: args.ctx,
        perplexity: Vec::new(),
        tasks: Vec::new(),
    };
    if tasks.contains(&Task::Perplexity) {
        let text = common::read_text(&args.ppl_file)?;
        if args.ppl_file.file_name() == Path::new(common::CALIBRATION_TEXT).file_name() {
            eprintln!(
                "warning: {} is the calibration text of `quantize` and `train`: perplexity on it \
                 flatters calibrated models; evaluate on assets/text/moby-dick.txt",
                args.ppl_file.display()
            );
        }
        let bar = ProgressBar::new(0).with_style(bar_style.clone());
        bar.set_prefix("ppl");
        let result = perplexity(
            &model,
            &tokenizer,
            &text,
            &PerplexityOptions {
                ctx: args.ppl_ctx,
                chunks: args.ppl_chunks,
                batch: 512,
                threads,
            },
            &mut |done, total, ppl| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(format!("PPL {ppl:.3}"));
            },
        )
        .with_context(|| format!("perplexity of {}", args.ppl_file.display()))?;
        bar.finish_and_clear();
        eprintln!(
            "ppl: {:.4} ± {:.4}, {:.4} bits per byte ({} tokens)",
            result.ppl, result.ppl_stderr, result.bits_per_byte, result.tokens_scored
        );
        let name = args
            .ppl_file
            .file_name()
            .map_or(args.ppl_file.display().to_string(), |n| {
                n.to_string_lossy().into_owned()
            });
        report
            .perplexity
            .push((name, PerplexitySummary::from(&result)));
    }

    let item_tasks: Vec<Task> = tasks
        .iter()
        .copied()
        .filter(|t| *t != Task::Perplexity)
        .collect();
    if !item_tasks.is_empty() {
        let mut cache = if args.no_cache {
            None
        } else {
            let path = args.cache.clone().unwrap_or_else(|| match &args.output {
                Some(out) => out.with_extension("cache.jsonl"),
                None => PathBuf::from("edgefusion-eval-cache.jsonl"),
            });
            let cache = ResultCache::open(&path)?;
            if cache.recovery().dropped_bytes > 0 {
                eprintln!(
                    "warning: {}: cut a half-written last record of an interrupted run",
                    path.display()
                );
            }
            Some(cache)
        };
        // Sessions made when a task first needs one: passkey prompts fill their own window
        // (--passkey-ctx), the other tasks share --ctx.
        let mut task_lm: Option<LanguageModel<'_>> = None;
        let mut passkey_lm: Option<LanguageModel<'_>> = None;
        let mut samples = match &args.samples {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )),
            None => None,
        };
        let mut sample_error = None;
        let mut settings = RunSettings {
            tasks_dir: args.tasks_dir.clone(),
            limit: None,
            shots: args.shots,
            max_gen_tokens: args.max_gen_tokens,
            passkey_ctx: args.passkey_ctx,
        };
        for task in item_tasks {
            let limit = args.limit.as_ref().and_then(|l| l.of(task));
            settings.limit = limit;
            let shots = args.shots.unwrap_or(task.default_shots());
            let run = if task == Task::Passkey {
                // Item i depends on i, the model (its tokenizer sizes the filler), the window
                // and the prompt version only: a larger --limit reuses the items cached.
                RunHash::new(&[
                    ("model", file_identity(&model_path)),
                    ("task", task.name().to_string()),
                    ("passkey_ctx", args.passkey_ctx.to_string()),
                    ("answer_tokens", passkey::ANSWER_TOKENS.to_string()),
                    ("prompts", passkey::PASSKEY_PROMPT_VERSION.to_string()),
                ])
            } else {
                RunHash::new(&[
                    ("model", file_identity(&model_path)),
                    ("task", task.name().to_string()),
                    ("shots", shots.to_string()),
                    ("n_ctx", args.ctx.to_string()),
                    ("limit", format!("{limit:?}")),
                    ("max_gen_tokens", format!("{:?}", args.max_gen_tokens)),
                    (
                        "prompts",
                        edgefusion_eval::prompts::PROMPT_FORMAT_VERSION.to_string(),
                    ),
                ])
            };
            let (slot, n_ctx) = if task == Task::Passkey {
                (&mut passkey_lm, args.passkey_ctx)
            } else {
                (&mut task_lm, args.ctx)
            };
            if slot.is_none() {
                *slot = Some(LanguageModel::new(&model, &tokenizer, n_ctx, threads)?);
            }
            let lm = slot.as_mut().expect("made above");
            if let Some(c) = &cache {
                let done = c.completed(task.name(), run);
                if done > 0 {
                    eprintln!("{}: {done} items found in the cache, resuming", task.name());
                }
            }
            let bar = ProgressBar::new(0).with_style(bar_style.clone());
            bar.set_prefix(task.name());
            let result = run_task(
                lm,
                task,
                &settings,
                cache.as_mut(),
                run,
                &mut |done, total, sample| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                    if let Some(out) = samples.as_mut() {
                        use std::io::Write;
                        let line = serde_json::to_string(sample).expect("plain struct");
                        if let Err(e) = writeln!(out, "{line}") {
                            sample_error.get_or_insert(e);
                        }
                    }
                },
            )
            .with_context(|| format!("task {}", task.name()))?;
            if let Some(e) = sample_error.take() {
                return Err(anyhow::anyhow!(e).context("writing --samples"));
            }
            bar.finish_and_clear();
            let main = &result.metrics[0];
            eprintln!(
                "{}: {} {:.4} over {} items ({} truncated, {} from the cache) in {:.0} s ({:.2} items/s, {:.0} tok/s)",
                result.task,
                main.name,
                main.value.mean,
                result.items,
                result.truncated,
                result.cached,
                result.seconds,
                result.items_per_s,
                result.tokens_per_s
            );
            report.tasks.push(result);
        }
        if let Some(mut out) = samples {
            use std::io::Write;
            out.flush().context("writing --samples")?;
        }
    }
    Ok(report)
}
