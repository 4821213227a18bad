//! Converting a dense transformer into an attention/SSM hybrid (docs/HYBRID.md): the
//! training configuration and the plan computed from it. Stage 1 ([`teacher`]) caches the dense
//! model's activations, stage 2 ([`distill`]) fits each layer's SSM to its attention; router
//! training and hardening come next.

pub mod align;
pub mod analysis;
pub mod attention;
pub mod checkpoint;
pub mod choose;
pub mod config;
pub mod convert;
pub mod distill;
pub mod finetune;
pub mod frozen;
pub mod init;
pub mod lora;
pub mod optim;
pub mod plan;
pub mod router;
pub mod run;
pub mod ssm;
pub mod student;
pub mod teacher;
#[cfg(test)]
mod test_util;

pub use config::TrainConfig;

/// The device training runs on: the first CUDA GPU when built with the `cuda` feature and
/// one is present, else the CPU (the default, and what CI tests).
pub fn device() -> &'static candle_core::Device {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    DEVICE.get_or_init(|| {
        #[cfg(feature = "cuda")]
        if let Ok(gpu) = candle_core::Device::new_cuda(0) {
            return gpu;
        }
        candle_core::Device::Cpu
    })
}
pub use plan::{plan, Plan};

/// What can go wrong in a conversion, with the file and field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration that does not parse or breaks a rule.
    #[error("{file}: {what}")]
    Config { file: String, what: String },
    /// A file or folder of the run that cannot be read or written.
    #[error("{path}: {what}")]
    Io { path: String, what: String },
    /// The run stopped on request after this router step (its checkpoint is written).
    #[error("stopped after step {step} as asked; continue with --resume")]
    Stopped { step: usize },
    /// A tensor operation that failed during training.
    #[error("training: {what}")]
    Numeric { what: String },
}

/// A tensor operation that failed: every candle error in training is a numeric one.
impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Numeric {
            what: e.to_string(),
        }
    }
}
