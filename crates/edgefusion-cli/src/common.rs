//! What every subcommand shares: finding and loading the model, its tokenizer, threads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::tokenizer::Tokenizer;

/// Where `scripts/fetch-assets.sh --model` puts the default model.
pub const DEFAULT_MODEL: &str = "assets/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The calibration text of `quantize` (and the training text of the shipped configs):
/// never an evaluation text.
pub const CALIBRATION_TEXT: &str = "assets/text/sotu.txt";

/// Model selection shared by the subcommands.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face model folder [default: $EDGEFUSION_MODEL, else
    /// assets/models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(short = 'm', long = "model", value_name = "PATH")]
    pub model: Option<PathBuf>,
}

impl ModelArgs {
    pub fn path(&self) -> PathBuf {
        if let Some(p) = &self.model {
            return p.clone();
        }
        if let Some(p) = std::env::var_os("EDGEFUSION_MODEL") {
            return PathBuf::from(p);
        }
        PathBuf::from(DEFAULT_MODEL)
    }

    /// Opens the model file or folder, with a hint when it is the missing default.
    pub fn open(&self) -> Result<ModelSource> {
        let path = self.path();
        if self.model.is_none() && !path.exists() {
            bail!(
                "default model {} not found: run `scripts/fetch-assets.sh --model` first, or pass --model PATH",
                path.display()
            );
        }
        Ok(ModelSource::open(&path)?)
    }
}

/// Binds the model's weights.
pub fn load_model(source: &ModelSource) -> Result<Model<'_>> {
    Ok(Model::load(source)?)
}

/// The tokenizer that ships with the model: GGUF metadata, or tokenizer.json in the folder.
pub fn load_tokenizer(source: &ModelSource) -> Result<Tokenizer> {
    match source {
        ModelSource::Gguf(gguf) => Tokenizer::from_gguf(gguf)
            .with_context(|| format!("{}: reading the tokenizer", gguf.path.display())),
        ModelSource::HfDir(dir) => {
            let path = dir.tokenizer_json.as_deref().with_context(|| {
                format!(
                    "{}: no tokenizer.json in the model folder",
                    dir.dir.display()
                )
            })?;
            Tokenizer::from_tokenizer_json(path)
                .with_context(|| format!("{}: reading the tokenizer", path.display()))
        }
    }
}

/// Thread count from the flag, else from `EDGEFUSION_THREADS`, else the physical cores this
/// process may use (affinity mask and cgroup quota: `edgefusion_runtime::cpus`).
pub fn threads(flag: Option<usize>) -> Result<usize> {
    let env = std::env::var("EDGEFUSION_THREADS").ok();
    threads_from(flag, env.as_deref())
}

fn threads_from(flag: Option<usize>, env: Option<&str>) -> Result<usize> {
    match (flag, env.map(str::trim).filter(|v| !v.is_empty())) {
        (Some(0), _) => bail!("--threads must be at least 1 (got 0)"),
        (Some(n), _) => Ok(n),
        (None, Some(v)) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("EDGEFUSION_THREADS must be a whole number of threads ≥ 1 (got {v:?})"),
        },
        (None, None) => Ok(edgefusion_runtime::cpus::default_threads()),
    }
}

/// Reads a UTF-8 text file with errors naming it.
pub fn read_text(path: &Path) -> Result<String> {
    if path.is_dir() {
        bail!("{} is a directory, expected a text file", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so that a
/// failure never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    edgefusion_io::durable::commit_rename(&tmp, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Bytes a model takes on disk: a GGUF file's size, or the sum of a Hugging Face folder's
/// files (weights, tokenizer, config).
pub fn model_bytes(path: &std::path::Path) -> usize {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len() as usize)
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len() as usize)
    }
}

/// Whether `done` of `total` steps just crossed a tenth (or finished): how often a hidden bar
/// (output not a terminal) prints a plain progress line instead.
pub(crate) fn tenth_done(done: usize, total: usize) -> bool {
    total > 0 && done > 0 && (done == total || done * 10 / total != (done - 1) * 10 / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_bar_reports_each_tenth_once() {
        let lines: Vec<usize> = (0..=95).filter(|&d| tenth_done(d, 95)).collect();
        assert_eq!(lines, [10, 19, 29, 38, 48, 57, 67, 76, 86, 95]);
        assert_eq!((1..=3).filter(|&d| tenth_done(d, 3)).count(), 3);
        assert!(!tenth_done(0, 0));
    }

    #[test]
    fn the_flag_beats_the_environment_which_beats_the_default() {
        assert_eq!(threads_from(Some(3), Some("5")).unwrap(), 3);
        assert_eq!(threads_from(None, Some(" 5 ")).unwrap(), 5);
        let default = threads_from(None, None).unwrap();
        assert!(default >= 1);
        assert_eq!(threads_from(None, Some("")).unwrap(), default);
        let err = threads_from(Some(0), None).unwrap_err().to_string();
        assert!(err.contains("--threads"), "{err}");
        for bad in ["0", "two", "-1", "1.5"] {
            let err = threads_from(None, Some(bad)).unwrap_err().to_string();
            assert!(
                err.contains("EDGEFUSION_THREADS") && err.contains(bad),
                "{err}"
            );
        }
    }
}
