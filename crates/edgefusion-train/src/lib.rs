//! Converting a dense transformer into an attention/SSM hybrid (docs/HYBRID.md): the
//! training configuration and the plan computed from it. The training stages themselves
//! (teacher cache, layer-local distillation, router training, hardening) come next.

pub mod config;
pub mod init;
pub mod plan;
pub mod ssm;

pub use config::TrainConfig;
pub use plan::{plan, Plan};

/// What can go wrong in a conversion, with the file and field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration that does not parse or breaks a rule.
    #[error("{file}: {what}")]
    Config { file: String, what: String },
}
