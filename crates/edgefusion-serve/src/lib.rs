//! `edgefusion serve`: an OpenAI-compatible HTTP server.
//!
//! Two halves that meet at a bounded channel:
//! - [`scheduler`]: one dedicated OS thread owns the [`edgefusion_model::Model`], one runtime
//!   session and `slots` sequences; it admits queued requests into free slots (reusing a
//!   cached prompt prefix), prefills prompts in chunks, decodes every active slot by one
//!   token per round in one batched step, and sends each token back over the request's own
//!   channel.
//! - [`api`]: axum handlers on tokio workers; they parse and validate requests, tokenize,
//!   queue a job (a full queue answers 429) and turn the token events into OpenAI responses
//!   or server-sent events. The model never runs on an async worker.

pub mod api;
pub mod params;
pub mod scheduler;
mod state_cache;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use api::router;
pub use scheduler::{Engine, Metrics};

/// Everything `serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// GGUF file or Hugging Face folder.
    pub model_path: PathBuf,
    /// Name reported by `/v1/models` and in responses [default: the file's stem].
    pub model_name: Option<String>,
    /// Sequences decoded at once (each holds its own KV cache of `ctx` positions).
    pub slots: usize,
    /// Context of each slot [default: the model's training context, at most 4096].
    pub ctx: Option<usize>,
    /// Requests that may wait while every slot is busy; one more is answered 429.
    pub queue: usize,
    /// Threads of the session that runs every slot.
    pub threads: usize,
    /// Prompt tokens prefilled per scheduler round, over all slots: a long prompt takes
    /// several rounds, with a decode step for the other slots between them.
    pub prefill_chunk: usize,
    /// When set, every endpoint but `/health` and the chat page `/` wants
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Bytes of recurrent states (SSM states, sinks and windows) a hybrid model's slots may
    /// save for prefix reuse, over all slots; the least recently used go first.
    pub state_cache_bytes: usize,
    /// Longest a request may take from its arrival: one still queued then is answered 503,
    /// a generation still running ends there with `finish_reason` "length" (`None`: no
    /// limit).
    pub request_timeout: Option<Duration>,
    /// Pause after every scheduler round (0 = none): throttles the server, and lets tests
    /// hold slots busy for a known time.
    pub step_delay: Duration,
}

impl ServeConfig {
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        ServeConfig {
            model_path: model_path.into(),
            model_name: None,
            slots: 1,
            ctx: None,
            queue: 64,
            threads: 1,
            prefill_chunk: 256,
            api_key: None,
            state_cache_bytes: 256 << 20,
            request_timeout: Some(Duration::from_secs(600)),
            step_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Io(#[from] edgefusion_io::IoError),
    #[error(transparent)]
    Model(#[from] edgefusion_model::ModelError),
    #[error(transparent)]
    Runtime(#[from] edgefusion_runtime::RuntimeError),
    #[error("reading the tokenizer: {0}")]
    Tokenizer(#[from] edgefusion_runtime::tokenizer::TokenizerError),
    #[error(transparent)]
    Chat(#[from] edgefusion_runtime::chat::ChatError),
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Net {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the model on the scheduler thread and serves on `addr` until `shutdown` resolves;
/// then stops taking connections, lets the running requests finish and stops the scheduler.
pub async fn serve(
    cfg: ServeConfig,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let engine = Arc::new(Engine::start(cfg)?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Net {
            what: format!("binding {addr}"),
            source,
        })?;
    serve_on(engine, listener, shutdown).await
}

/// [`serve`] on a bound listener with a started engine (tests bind port 0).
pub async fn serve_on(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let app = router(engine.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Net {
            what: "serving HTTP".into(),
            source,
        })?;
    // Joining the scheduler blocks: not on an async worker.
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    Ok(())
}

/// Resolves on ctrl-c or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
