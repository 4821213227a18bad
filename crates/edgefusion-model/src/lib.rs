//! The model as the runtime runs it: hyperparameters, weights bound to their roles,
//! and the per-layer mixer (attention today; SSM blocks join as another variant).

pub mod config;
pub mod convert;
pub mod linear;
pub mod model;

pub use config::{
    Arch, BlockVariant, FfnAct, LayerType, ModelConfig, RopeScaling, RopeStyle, SsmDims,
};
pub use linear::{ActFormat, Layout, Linear};
pub use model::{ssm_role, Attention, DecoderLayer, FeedForward, Mixer, Model, Ssm, SsmParams};

/// Errors raised while binding a model's weights.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Io(#[from] edgefusion_io::IoError),
    #[error(
        "{file}: architecture '{arch}' is not supported (supported: llama, qwen2, qwen3, gemma3)"
    )]
    UnsupportedArch { file: String, arch: String },
    #[error("{file}: tensor '{tensor}' has shape {found:?}, expected {expected:?} (ggml order: row length first)")]
    Shape {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
}
