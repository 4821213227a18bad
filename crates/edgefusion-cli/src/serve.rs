//! `edgefusion serve`: the OpenAI-compatible HTTP server (edgefusion-serve) as a command.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use edgefusion_serve::{serve, shutdown_signal, ServeConfig};

use crate::common::{self, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests generated at once, decoded together in one batched step per token; each
    /// slot holds its own KV cache of --ctx positions.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Context of each slot in tokens [default: the model's training context, at most 4096].
    #[arg(short = 'c', long = "ctx")]
    pub ctx: Option<usize>,
    /// Requests that may wait for a free slot; more are answered 429 (Retry-After: 1).
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Threads per forward pass [default: EDGEFUSION_THREADS, else the physical cores].
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Prompt tokens prefilled per round over all slots: a long prompt is split over
    /// several rounds and the other streams decode a token between them (smaller: steadier
    /// streams, later first tokens).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health and the chat page /
    /// [default: $EDGEFUSION_API_KEY, else no key].
    #[arg(long)]
    pub api_key: Option<String>,
    /// MiB of SSM and window states a hybrid model keeps for prefix reuse, over all slots:
    /// each slot saves them at the ends of the first and the last eight chat messages and
    /// one token before the prompt's end, so that a later request sharing that prefix (a
    /// system prompt, earlier turns) starts there; the least recently used go first when
    /// full (0: none; dense models cut their KV cache instead).
    #[arg(long, default_value_t = 256)]
    pub state_cache_mib: usize,
    /// Seconds a request may take from its arrival: one still waiting for a slot then is
    /// answered 503 (code "timeout"), a generation still running ends there with
    /// finish_reason "length" and the text so far (0: no limit).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Name the model is served under [default: the file name without extension].
    #[arg(long)]
    pub alias: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let threads = common::threads(args.threads)?;
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    if args.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    let source = args.model.open()?;
    let mut cfg = ServeConfig::new(source.path());
    drop(source);
    cfg.model_name = args.alias;
    cfg.slots = args.slots;
    cfg.ctx = args.ctx;
    cfg.queue = args.queue;
    cfg.threads = threads;
    cfg.prefill_chunk = args.prefill_chunk;
    cfg.state_cache_bytes = args
        .state_cache_mib
        .checked_mul(1 << 20)
        .context("--state-cache-mib is too large")?;
    cfg.api_key = args
        .api_key
        .or_else(|| std::env::var("EDGEFUSION_API_KEY").ok())
        .filter(|k| !k.is_empty());
    cfg.request_timeout = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    cfg.step_delay = Duration::ZERO;
    let addr = SocketAddr::new(args.host, args.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The model runs on the scheduler thread; HTTP needs few workers.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    eprintln!(
        "edgefusion serve: {} on http://{addr} ({} slots decoded together, {threads} threads)",
        cfg.model_path.display(),
        cfg.slots
    );
    runtime.block_on(serve(cfg, addr, shutdown_signal()))?;
    eprintln!("edgefusion serve: stopped");
    Ok(())
}
