//! Evaluation groundwork that needs no model: typed readers for the task files, the
//! lm-evaluation-harness prompt formats, multiple-choice scoring and aggregation, GSM8K
//! answer extraction, and a per-item result cache so an interrupted run resumes.
//!
//! The runtime side (log-likelihoods of continuations, greedy generation) lives elsewhere and
//! feeds this crate plain numbers and strings; everything here is deterministic and tested
//! without weights.
//!
//! The pieces, in the order a run uses them:
//! 1. [`tasks`]: [`Task`] names and the jsonl readers ([`TaskItem::read`]).
//! 2. [`prompts`]: items to [`McRequest`] / [`GenRequest`], exactly as the harness builds them,
//!    plus left truncation to a context window.
//! 3. [`score`] and [`gsm8k`]: per-item metrics and their mean ± standard error.
//! 4. [`cache`]: append-only per-item results, tolerant of a killed run.
//!
//! [`passkey`] generates its items instead of reading them (a key hidden in filler text,
//! sized to the window with the model's tokenizer) and scores the greedy answer.

pub mod cache;
pub mod compare;
pub mod gsm8k;
pub mod lm;
pub mod passkey;
pub mod perplexity;
pub mod prompts;
pub mod report;
pub mod runner;
pub mod score;
pub mod tasks;

pub use cache::{CacheError, ResultCache, RunHash};
pub use prompts::{GenRequest, McRequest, PromptError};
pub use score::{ChoiceResult, McScore, MeanStderr, ScoreError};
pub use tasks::{Task, TaskError, TaskItem};

/// Any error of this crate, for callers that handle them alike.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}
