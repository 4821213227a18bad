//! Stage 1: the dense teacher reads the training tokens once, and what the later stages
//! need is cached on disk in 16-bit: per layer, the normalized input of the attention block
//! and the attention read-out entering `wo` (so the mixer output is `read-out · woᵀ`).
//!
//! Layout of the cache folder (written as `NAME.tmp/`, renamed when complete):
//! - `meta.json`: [`TeacherMeta`];
//! - `layerNN.in.f16`: `(n_tokens, d_model)` f16 little-endian;
//! - `layerNN.attn.f16`: `(n_tokens, q_dim)` f16 little-endian;
//! - `tokens.u32`: the tokens read, u32 little-endian;
//! - `topk.idx.u32`, `topk.val.f16`: `(n_tokens, top_k)` the teacher's most probable tokens
//!   per position, most probable first, and their log-probabilities under the full softmax
//!   (what they leave of 1 is the tail, which the KL keeps: `student::top_k_tail_kl`).
//!
//! Sequences are independent windows of `seq_len` tokens: the teacher's attention sees only
//! its window, as the student will.

use std::cell::RefCell;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use edgefusion_model::Model;
use edgefusion_runtime::{LinearInput, Logits, Session, SessionOptions};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// What a cache holds; a cache is reused only when all of it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherMeta {
    pub model: String,
    pub text: String,
    pub n_tokens: usize,
    pub seq_len: usize,
    pub n_layers: usize,
    pub d_model: usize,
    pub q_dim: usize,
    pub top_k: usize,
    /// [`TEACHER_FORMAT`] when written by this version (a cache of another format, such as
    /// the renormalisable top-k logits of format 0, is made again).
    #[serde(default)]
    pub format: u32,
}

/// The cache format: 1 stores top-k log-probabilities under the full softmax.
pub const TEACHER_FORMAT: u32 = 1;

fn io_error(path: &Path, what: &str, e: std::io::Error) -> TrainError {
    TrainError::Io {
        path: path.display().to_string(),
        what: format!("{what}: {e}"),
    }
}

fn layer_file(dir: &Path, layer: usize, kind: &str) -> PathBuf {
    dir.join(format!("layer{layer:02}.{kind}.f16"))
}

/// Reads the cache in `dir` if it exists and was made for `meta`.
pub fn existing(dir: &Path, meta: &TeacherMeta) -> Option<TeacherMeta> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    let found: TeacherMeta = serde_json::from_str(&text).ok()?;
    (found == *meta).then_some(found)
}

/// Runs `model` over `tokens` (a multiple of `meta.seq_len` of them are read) and writes
/// the cache to `dir`. `progress(done, total)` counts windows.
pub fn cache_teacher(
    model: &Model<'_>,
    tokens: &[u32],
    meta: &TeacherMeta,
    dir: &Path,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(), TrainError> {
    let cfg = &model.config;
    let windows = meta.n_tokens / meta.seq_len;
    if windows == 0 || tokens.len() < windows * meta.seq_len {
        return Err(TrainError::Config {
            file: meta.text.clone(),
            what: format!(
                "has {} tokens; the teacher cache needs at least {} (one sequence of {})",
                tokens.len(),
                meta.n_tokens.max(meta.seq_len),
                meta.seq_len
            ),
        });
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, "creating", e))?;
    type Writers = Vec<(BufWriter<std::fs::File>, BufWriter<std::fs::File>)>;
    let mut writers: Writers = Vec::new();
    for layer in 0..cfg.n_layers {
        let open = |kind: &str| {
            let path = layer_file(&tmp, layer, kind);
            std::fs::File::create(&path)
                .map(BufWriter::new)
                .map_err(|e| io_error(&path, "creating", e))
        };
        writers.push((open("in")?, open("attn")?));
    }
    let writers = Rc::new(RefCell::new(writers));
    let failure: Rc<RefCell<Option<std::io::Error>>> = Rc::new(RefCell::new(None));
    let opts = SessionOptions {
        max_batch: meta.seq_len,
        max_logits: meta.seq_len,
        ..SessionOptions::new(meta.seq_len, threads.max(1))
    };
    let create = |name: &str| {
        let path = tmp.join(name);
        std::fs::File::create(&path)
            .map(BufWriter::new)
            .map_err(|e| io_error(&path, "creating", e))
    };
    let mut tokens_out = create("tokens.u32")?;
    let mut idx_out = create("topk.idx.u32")?;
    let mut val_out = create("topk.val.f16")?;
    let vocab = cfg.vocab_size;
    let k = meta.top_k.min(vocab).max(1);
    let mut session = Session::new(model, opts).map_err(|e| TrainError::Config {
        file: meta.model.clone(),
        what: e.to_string(),
    })?;
    let (w, f) = (writers.clone(), failure.clone());
    session.set_observer(Some(Box::new(move |site, x, _| {
        let (layer, second) = match site {
            LinearInput::Attention { layer } => (layer, false),
            LinearInput::AttentionOutput { layer } => (layer, true),
            _ => return,
        };
        let mut writers = w.borrow_mut();
        let out = if second {
            &mut writers[layer].1
        } else {
            &mut writers[layer].0
        };
        let bytes: Vec<u8> = x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        if let Err(e) = out.write_all(&bytes) {
            f.borrow_mut().get_or_insert(e);
        }
    })));
    for win in 0..windows {
        session.reset();
        let window = &tokens[win * meta.seq_len..(win + 1) * meta.seq_len];
        let logits = session
            .forward(window, Logits::From(0))
            .map_err(|e| TrainError::Config {
                file: meta.model.clone(),
                what: e.to_string(),
            })?;
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        let mut idx_bytes = Vec::with_capacity(window.len() * k * 4);
        let mut val_bytes = Vec::with_capacity(window.len() * k * 2);
        for row in logits.chunks_exact(vocab) {
            crate::choose::select_top_k(row, &mut order, k);
            let max = row[order[0] as usize] as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&z| (z as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            for &i in &order[..k] {
                let logp = (row[i as usize] as f64 - lse) as f32;
                idx_bytes.extend_from_slice(&i.to_le_bytes());
                val_bytes.extend_from_slice(&f16::from_f32(logp).to_le_bytes());
            }
        }
        let token_bytes: Vec<u8> = window.iter().flat_map(|t| t.to_le_bytes()).collect();
        for (out, bytes) in [
            (&mut tokens_out, &token_bytes),
            (&mut idx_out, &idx_bytes),
            (&mut val_out, &val_bytes),
        ] {
            out.write_all(bytes)
                .map_err(|e| io_error(&tmp, "writing the teacher cache", e))?;
        }
        if let Some(e) = failure.borrow_mut().take() {
            return Err(io_error(&tmp, "writing the teacher cache", e));
        }
        progress(win + 1, windows);
    }
    session.set_observer(None);
    let writers = Rc::try_unwrap(writers)
        .map_err(|_| TrainError::Config {
            file: meta.model.clone(),
            what: "teacher cache writers still in use".into(),
        })?
        .into_inner();
    for mut w in [tokens_out, idx_out, val_out] {
        w.flush().map_err(|e| io_error(&tmp, "writing", e))?;
    }
    for (a, b) in writers {
        for mut w in [a, b] {
            w.flush().map_err(|e| io_error(&tmp, "writing", e))?;
        }
    }
    let meta_text = serde_json::to_string_pretty(meta).expect("plain struct");
    std::fs::write(tmp.join("meta.json"), meta_text)
        .map_err(|e| io_error(&tmp, "writing meta.json", e))?;
    let _ = std::fs::remove_dir_all(dir);
    edgefusion_io::durable::commit_rename(&tmp, dir)
        .map_err(|e| io_error(dir, "renaming the finished cache", e))
}

/// One layer's cached activations as f32: `(input (n_tokens, d_model), read-out (n_tokens,
/// q_dim))`.
pub fn read_layer(
    dir: &Path,
    meta: &TeacherMeta,
    layer: usize,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let read = |kind: &str, width: usize| -> Result<Vec<f32>, TrainError> {
        let path = layer_file(dir, layer, kind);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io_error(&path, "reading", e))?;
        let want = meta.n_tokens / meta.seq_len * meta.seq_len * width * 2;
        if bytes.len() != want {
            return Err(TrainError::Io {
                path: path.display().to_string(),
                what: format!("has {} bytes, expected {want}", bytes.len()),
            });
        }
        Ok(bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    };
    Ok((read("in", meta.d_model)?, read("attn", meta.q_dim)?))
}

/// The cached tokens `(n_tokens)` and the teacher's top-k `(ids, log-probabilities)`, each
/// `(n_tokens, top_k)`.
pub type TeacherTargets = (Vec<u32>, Vec<u32>, Vec<f32>);

/// Reads what stage 3 needs from the cache.
pub fn read_targets(dir: &Path, meta: &TeacherMeta) -> Result<TeacherTargets, TrainError> {
    let read = |name: &str, want: usize| -> Result<Vec<u8>, TrainError> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| io_error(&path, "reading", e))?;
        if bytes.len() != want {
            return Err(TrainError::Io {
                path: path.display().to_string(),
                what: format!("has {} bytes, expected {want}", bytes.len()),
            });
        }
        Ok(bytes)
    };
    let n = meta.n_tokens / meta.seq_len * meta.seq_len;
    let u32s = |b: Vec<u8>| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let tokens = u32s(read("tokens.u32", n * 4)?);
    let idx = u32s(read("topk.idx.u32", n * meta.top_k * 4)?);
    let vals = read("topk.val.f16", n * meta.top_k * 2)?
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    Ok((tokens, idx, vals))
}
