//! CPU inference engine: prefill and decode over a KV cache, sampling, tokenizer and chat
//! template glue, and the measurements `--profile` and `bench` report.

pub mod batch;
pub mod chat;
pub mod constrained;
pub mod cpus;
pub mod engine;
pub mod memory;
pub mod mixer;
pub mod parallel;
pub mod profile;
mod rope;
pub mod sampler;
pub mod tokenizer;
mod tuner;

pub use batch::Sequence;
pub use engine::{KvType, LinearInput, Logits, Observer, RecurrentState, Session, SessionOptions};
pub use sampler::{Sampler, SamplerConfig};

/// Errors raised while running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("context is full: {n_past} positions used + {n_new} new tokens > context size {n_ctx} (raise --ctx or shorten the prompt)")]
    ContextFull {
        n_past: usize,
        n_new: usize,
        n_ctx: usize,
    },
    #[error("token id {token} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("{0}")]
    InvalidOption(String),
}
