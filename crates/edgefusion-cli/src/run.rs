//! `edgefusion run`: generate text, streaming it, optionally with a timing profile.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use edgefusion_runtime::chat::{render_chat, ChatMessage, CHATML_TEMPLATE};
use edgefusion_runtime::{
    memory, profile, Logits, Sampler, SamplerConfig, Session, SessionOptions,
};

use crate::common::{self, mib, ModelArgs};

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to continue (with --chat: the user's message).
    #[arg(short, long)]
    pub prompt: String,
    /// Tokens to generate at most (stops earlier at end of sequence).
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Divide the logits of recently seen tokens by this (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template (ChatML if it has none).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (otherwise the template's default, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Context size in tokens [default: the model's training context, at most 4096].
    #[arg(short = 'c', long = "ctx")]
    pub ctx: Option<usize>,
    /// Threads [default: EDGEFUSION_THREADS, else the physical cores this process may use]; fewer run while that is faster on busy CPUs, unless EDGEFUSION_ADAPT_THREADS=0.
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Print the prompt as the model sees it (after the chat template) and its token ids.
    #[arg(long)]
    pub verbose_prompt: bool,
    /// Print time to first token, prefill and decode speed, memory and FLOPs to stderr.
    #[arg(long)]
    pub profile: bool,
}

pub fn run(args: RunArgs) -> Result<()> {
    let n_threads = common::threads(args.threads)?;
    validate_sampling(&args)?;
    let load_start = Instant::now();
    let source = args.model.open()?;
    let model = common::load_model(&source)?;
    let tokenizer = common::load_tokenizer(&source)?;
    let cfg = &model.config;
    let n_ctx = match args.ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(n) => n,
        None => cfg.n_ctx_train.min(4096),
    };

    let text = if args.chat {
        let template = tokenizer.chat_template().map(str::to_string);
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        let bos = tokenizer
            .bos_id()
            .and_then(|id| tokenizer.token_str(id))
            .unwrap_or("");
        let eos = tokenizer
            .eos_ids()
            .first()
            .and_then(|&id| tokenizer.token_str(id))
            .unwrap_or("");
        render_chat(
            template.as_deref().unwrap_or(CHATML_TEMPLATE),
            &messages,
            true,
            bos,
            eos,
        )?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text, true)?;
    if args.verbose_prompt {
        eprintln!("prompt text: {text:?}");
        eprintln!("prompt tokens ({}):", prompt.len());
        for &id in &prompt {
            eprintln!("  {id:6} {:?}", tokenizer.token_str(id).unwrap_or("?"));
        }
    }
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens; give some text with --prompt");
    }
    if prompt.len() >= n_ctx {
        bail!(
            "the prompt is {} tokens, which does not fit the context of {n_ctx} (raise --ctx, up to the model's {})",
            prompt.len(),
            cfg.n_ctx_train
        );
    }
    let n_predict = args.n_predict.min(n_ctx - prompt.len());
    let session_opts = SessionOptions::new(n_ctx, n_threads);
    let mut session = Session::new(&model, session_opts.clone())?;
    let load_time = load_start.elapsed();
    let mut sampler = Sampler::new(
        SamplerConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            seed: args.seed,
        },
        cfg.vocab_size,
    );

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }
    let mut history = prompt.clone();
    let mut streamer = tokenizer.streamer();
    let start = Instant::now();
    let mut logits = session.forward(&prompt, Logits::Last)?;
    let prefill_time = start.elapsed();
    let mut n_generated = 0;
    let mut n_decode_steps = 0;
    let decode_start = Instant::now();
    while n_generated < n_predict {
        let next = sampler.sample(logits, &history);
        if tokenizer.eos_ids().contains(&next) {
            break;
        }
        history.push(next);
        n_generated += 1;
        if let Some(piece) = streamer.push(next)? {
            write!(out, "{piece}")?;
            out.flush()?;
        }
        if n_generated == n_predict {
            break;
        }
        logits = session.forward(&[next], Logits::Last)?;
        n_decode_steps += 1;
    }
    let decode_time = decode_start.elapsed();
    if let Some(rest) = streamer.finish() {
        write!(out, "{rest}")?;
    }
    writeln!(out)?;
    drop(out);

    if args.profile {
        let n_past = session.n_past();
        eprintln!();
        eprintln!("profile ({} threads, context {n_ctx})", session.n_threads());
        eprintln!(
            "  model              {} ({}, {} layers, d={})",
            cfg.name,
            cfg.arch.name(),
            cfg.n_layers,
            cfg.d_model
        );
        eprintln!(
            "  load               {:8.1} ms",
            load_time.as_secs_f64() * 1e3
        );
        eprintln!("  prompt             {:8} tokens", prompt.len());
        eprintln!("  generated          {:8} tokens", n_generated);
        eprintln!(
            "  time to 1st token  {:8.1} ms",
            (prefill_time.as_secs_f64()) * 1e3
        );
        eprintln!(
            "  prefill            {:8.1} tok/s",
            prompt.len() as f64 / prefill_time.as_secs_f64()
        );
        eprintln!(
            "  decode             {:8.1} tok/s",
            n_decode_steps as f64 / decode_time.as_secs_f64().max(1e-9)
        );
        // The planner `quantize --fit` uses, for this file and context.
        let file_bytes = crate::common::model_bytes(source.path());
        let plan = memory::plan(cfg, file_bytes, &session_opts);
        match profile::peak_rss_bytes() {
            Some(b) => eprintln!(
                "  peak RSS           {:8.1} MiB ({:.0}% of the plan: {})",
                mib(b as usize),
                100.0 * b as f64 / plan.total() as f64,
                plan.describe()
            ),
            None => eprintln!(
                "  peak RSS           unavailable on this OS (plan: {})",
                plan.describe()
            ),
        }
        let weight_bytes = model.weight_bytes();
        eprintln!(
            "  weights            {:8.1} MiB ({:.2} bits/param over {:.1} M params)",
            mib(weight_bytes),
            weight_bytes as f64 * 8.0 / cfg.n_params() as f64,
            cfg.n_params() as f64 / 1e6
        );
        eprintln!(
            "  KV cache           {:8.1} MiB allocated ({:.1} KiB per position, {:.1} MiB used)",
            mib(session.kv_bytes()),
            session.kv_bytes_per_position() as f64 / 1024.0,
            mib(session.kv_bytes_per_position() * n_past)
        );
        if cfg.is_hybrid() {
            let ssm = session.ssm_state_bytes();
            eprintln!(
                "  SSM state          {:8.1} KiB ({} of {} layers SSM; constant in the context)",
                ssm as f64 / 1024.0,
                cfg.count_layers(edgefusion_model::LayerType::Ssm),
                cfg.n_layers
            );
            if cfg.window > 0 {
                eprintln!(
                    "  window K+V         {:8.1} KiB (sink {} + last {} positions in {} layers; constant)",
                    (session.recurrent_state_bytes() - ssm) as f64 / 1024.0,
                    cfg.sink,
                    cfg.window,
                    cfg.n_window_layers()
                );
            }
        }
        eprintln!(
            "  compute            {:8.3} GFLOP/token (at position {n_past}; {:.3} at position 0)",
            cfg.flops_per_token(n_past) / 1e9,
            cfg.flops_per_token(0) / 1e9
        );
    }
    Ok(())
}

fn validate_sampling(args: &RunArgs) -> Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temp must be a number ≥ 0 (got {})", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    if !(0.0..1.0).contains(&args.min_p) {
        bail!("--min-p must be in [0, 1) (got {})", args.min_p);
    }
    if !(args.repeat_penalty.is_finite() && args.repeat_penalty > 0.0) {
        bail!("--repeat-penalty must be > 0 (got {})", args.repeat_penalty);
    }
    Ok(())
}
