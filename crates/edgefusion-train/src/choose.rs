//! Which layers to convert, chosen jointly: start with every layer converted to sink + window
//! attention and restore full attention one layer at a time, each time the layer whose
//! restoration lowers the KL divergence from the dense teacher most, until the target share
//! stays converted ("greedy restore"). Each layer alone costs little; what matters is how
//! the losses add up when many are converted together, and only the joint measurement sees
//! it (one layer's cost alone ranked SmolLM2's layers into a 391% loss at 20 of 30).
//!
//! Everything runs on the inference engine: the choice costs forward passes only.

use edgefusion_kernels::f32ops;
use edgefusion_model::{LayerType, Model};
use edgefusion_runtime::{Logits, Session, SessionOptions};
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Logit rows one forward call returns while scoring.
const LOGIT_ROWS: usize = 256;

/// Windows of the training text with the dense teacher's top-k log-probabilities at the
/// scored positions (the second half of each window, where every token has at least half a
/// window of context, as perplexity scores): what a student is scored against.
#[derive(Debug, Clone)]
pub struct TeacherWindows {
    pub seq_len: usize,
    /// (n_windows · seq_len)
    pub tokens: Vec<u32>,
    /// First scored position of each window.
    pub first_scored: usize,
    pub top_k: usize,
    /// (n_windows · (seq_len − first_scored), top_k): token ids, most probable first
    pub top_ids: Vec<u32>,
    /// (n_windows · (seq_len − first_scored), top_k): log-probabilities under the full
    /// softmax; what they leave of 1 is the tail, scored as one more outcome
    pub top_logp: Vec<f32>,
}

impl TeacherWindows {
    pub fn n_windows(&self) -> usize {
        self.tokens.len() / self.seq_len
    }
}

fn runtime_error(what: &str) -> impl Fn(edgefusion_runtime::RuntimeError) -> TrainError + '_ {
    move |e| TrainError::Numeric {
        what: format!("{what}: {e}"),
    }
}

/// A session that scores windows of `seq_len` tokens.
fn scoring_session<'m>(
    model: &'m Model<'m>,
    seq_len: usize,
    threads: usize,
) -> Result<Session<'m>, TrainError> {
    let mut opts = SessionOptions::new(seq_len, threads.max(1));
    opts.max_logits = LOGIT_ROWS.min(seq_len);
    Session::new(model, opts).map_err(runtime_error("session"))
}

/// Runs `window` through `session` from position 0 and calls `row(position, logits)` with
/// the logits of each position from `first` on (which it may overwrite); the positions
/// before only fill the context (no output head for them).
fn for_each_logit_row(
    session: &mut Session<'_>,
    window: &[u32],
    first: usize,
    row: &mut dyn FnMut(usize, &mut [f32]),
) -> Result<(), TrainError> {
    let vocab = session.model().config.vocab_size;
    session.reset();
    if first > 0 {
        session
            .forward(&window[..first], Logits::Last)
            .map_err(runtime_error("forward"))?;
    }
    let mut pos = first;
    let mut buf = Vec::new();
    for chunk in window[first..].chunks(LOGIT_ROWS) {
        let logits = session
            .forward(chunk, Logits::From(0))
            .map_err(runtime_error("forward"))?;
        buf.clear();
        buf.extend_from_slice(logits);
        for r in buf.chunks_exact_mut(vocab) {
            row(pos, r);
            pos += 1;
        }
    }
    Ok(())
}

/// Moves the ids of `row`'s `k` largest logits to the front of `order` (a permutation of
/// the vocabulary), largest first: the teacher's top k, for the choice and the cache alike.
pub(crate) fn select_top_k(row: &[f32], order: &mut [u32], k: usize) {
    let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
    order.select_nth_unstable_by(k - 1, by_logit);
    order[..k].sort_unstable_by(by_logit);
}

/// `log Σ exp(row)`, overwriting `row`.
fn log_sum_exp(row: &mut [f32]) -> f64 {
    let max = f32ops::max(row);
    max as f64 + f32ops::exp_sub_max_sum(row, max).ln()
}

/// The teacher's top-`top_k` distribution at the second half of each of `n_windows`
/// consecutive windows of `seq_len` tokens from the start of `tokens` (what scoring reads).
pub fn teacher_windows(
    teacher: &Model<'_>,
    tokens: &[u32],
    seq_len: usize,
    n_windows: usize,
    top_k: usize,
    threads: usize,
) -> Result<TeacherWindows, TrainError> {
    teacher_windows_from(
        teacher,
        tokens,
        seq_len,
        n_windows,
        seq_len / 2,
        top_k,
        threads,
        &mut |_, _| {},
    )
}

/// [`teacher_windows`] with the distribution kept from position `first_scored` of each
/// window on (`0`: every position, what training reads). `progress(done, total)` counts
/// windows.
#[allow(clippy::too_many_arguments)]
pub fn teacher_windows_from(
    teacher: &Model<'_>,
    tokens: &[u32],
    seq_len: usize,
    n_windows: usize,
    first_scored: usize,
    top_k: usize,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TeacherWindows, TrainError> {
    let n_windows = n_windows.min(tokens.len() / seq_len.max(1));
    if n_windows == 0 {
        return Err(TrainError::Config {
            file: "training text".into(),
            what: format!(
                "has {} tokens, fewer than one window of {seq_len}",
                tokens.len()
            ),
        });
    }
    let vocab = teacher.config.vocab_size;
    let k = top_k.clamp(1, vocab);
    let mut session = scoring_session(teacher, seq_len, threads)?;
    let n = n_windows * seq_len;
    let first_scored = first_scored.min(seq_len - 1);
    let n_scored = n_windows * (seq_len - first_scored);
    let mut top_ids = Vec::with_capacity(n_scored * k);
    let mut top_logp = Vec::with_capacity(n_scored * k);
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    for w in 0..n_windows {
        let window = &tokens[w * seq_len..(w + 1) * seq_len];
        for_each_logit_row(&mut session, window, first_scored, &mut |_, row| {
            select_top_k(row, &mut order, k);
            let top: Vec<f32> = order[..k].iter().map(|&i| row[i as usize]).collect();
            let lse = log_sum_exp(row);
            top_ids.extend_from_slice(&order[..k]);
            top_logp.extend(top.iter().map(|&v| (v as f64 - lse) as f32));
        })?;
        progress(w + 1, n_windows);
    }
    Ok(TeacherWindows {
        seq_len,
        tokens: tokens[..n].to_vec(),
        first_scored,
        top_k: k,
        top_ids,
        top_logp,
    })
}

/// The layout of a copy window of `seq_len` tokens repeating `span`: `(text, from)`, that is
/// `text` tokens of prose, then `text[from..from + span]` again, `text - from` positions
/// after it stood. `None` when the window cannot repeat from a tenth of the way in
/// (`seq_len < 11 · span`).
pub fn copy_layout(seq_len: usize, span: usize) -> Option<(usize, usize)> {
    let text = seq_len
        .checked_sub(span)
        .filter(|&t| t >= 10 * span.max(1))?;
    Some((text, text / 10))
}

/// Copy windows: what a converted model must still retrieve from far back. Each of
/// `n_windows` windows of `seq_len` tokens is `seq_len − span` consecutive tokens of
/// `tokens`, then again the `span` tokens that stood at a tenth of that text: the dense
/// model predicts a repeat by looking back (induction), from far outside any short window.
/// The teacher's distribution is kept on the repeat alone. Retrieval (a passkey read back
/// after 2,000 tokens) leans on the layers that do this, and prose KL barely sees them.
#[allow(clippy::too_many_arguments)]
pub fn copy_windows(
    teacher: &Model<'_>,
    tokens: &[u32],
    seq_len: usize,
    n_windows: usize,
    span: usize,
    top_k: usize,
    threads: usize,
) -> Result<TeacherWindows, TrainError> {
    let (text, from) = copy_layout(seq_len, span).ok_or_else(|| TrainError::Config {
        file: "copy windows".into(),
        what: format!(
            "a window of {seq_len} tokens cannot repeat {span} from a tenth of the way in"
        ),
    })?;
    let windows: Vec<u32> = tokens
        .chunks_exact(text)
        .take(n_windows)
        .flat_map(|t| t.iter().chain(&t[from..from + span]).copied())
        .collect();
    teacher_windows_from(
        teacher,
        &windows,
        seq_len,
        n_windows,
        text,
        top_k,
        threads,
        &mut |_, _| {},
    )
}

/// KL over the teacher's top k and one outcome for the rest of the vocabulary ("the
/// tail"): `Σ p log(p/q) + p_tail log(p_tail/q_tail)`, from the teacher's log-probabilities
/// `log_p` and the model's `log_q` at the same ids. Without the tail a student is rewarded
/// for draining all mass outside the top k, and its perplexity on real text, whose tokens
/// often lie there, goes up while the score goes down.
pub fn tail_kl(log_p: &[f32], log_q: &[f64]) -> f64 {
    let mut kl = 0.0f64;
    let (mut p_top, mut q_top) = (0.0f64, 0.0f64);
    for (&lp, &lq) in log_p.iter().zip(log_q) {
        let p = (lp as f64).exp();
        kl += p * (lp as f64 - lq);
        p_top += p;
        q_top += lq.exp();
    }
    let (p_tail, q_tail) = ((1.0 - p_top).max(TAIL_FLOOR), (1.0 - q_top).max(TAIL_FLOOR));
    kl + p_tail * (p_tail / q_tail).ln()
}

/// The least mass a tail is given, so that its logarithm stays finite.
pub const TAIL_FLOOR: f64 = 1e-6;

/// Mean KL(teacher ‖ model) in nats per scored position of `teacher`'s windows: the
/// teacher's top k and its tail against the model's full softmax ([`tail_kl`]); 0 for the
/// teacher itself.
pub fn kl_to_teacher(
    model: &Model<'_>,
    teacher: &TeacherWindows,
    threads: usize,
) -> Result<f64, TrainError> {
    let mut session = scoring_session(model, teacher.seq_len, threads)?;
    let k = teacher.top_k;
    let mut total = 0.0f64;
    let (first, per_window) = (teacher.first_scored, teacher.seq_len - teacher.first_scored);
    for w in 0..teacher.n_windows() {
        let window = &teacher.tokens[w * teacher.seq_len..(w + 1) * teacher.seq_len];
        let base = w * per_window;
        for_each_logit_row(&mut session, window, first, &mut |pos, row| {
            let at = (base + pos - first) * k;
            let ids = &teacher.top_ids[at..at + k];
            let logp = &teacher.top_logp[at..at + k];
            let picked: Vec<f32> = ids.iter().map(|&i| row[i as usize]).collect();
            let lse = log_sum_exp(row);
            let log_q: Vec<f64> = picked.iter().map(|&z| z as f64 - lse).collect();
            total += tail_kl(logp, &log_q);
        })?;
    }
    Ok(total / (teacher.n_windows() * per_window) as f64)
}

/// One round of [`greedy_restore`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreStep {
    /// The layer given back its full attention.
    pub restored: usize,
    /// KL per position after restoring it.
    pub kl: f64,
    /// Every layer tried this round with the KL its restoration gave.
    pub tried: Vec<(usize, f64)>,
}

/// What [`greedy_restore`] chose and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerChoice {
    /// Layers that stay converted, in increasing order.
    pub converted: Vec<usize>,
    /// KL per position with every layer converted, and with the final choice.
    pub kl_all_converted: f64,
    pub kl_final: f64,
    /// The rounds in order.
    pub steps: Vec<RestoreStep>,
    /// Forward passes over the windows that the choice took.
    pub evaluations: usize,
}

/// Converts every layer of `model` (all attention; its config's window set) to sink + window
/// attention, then restores attention greedily until `n_converted` layers remain
/// converted, scoring against `teacher`. A round re-scores only the `candidates` layers
/// that ranked best in the previous round (all of them in the first; `0` = all every round):
/// a layer's restoration gain moves little from one round to the next, and a round of all
/// 30 SmolLM2 layers is 30 forward passes. Leaves `model` with the choice applied.
/// `progress(done, total)` counts forward passes.
pub fn greedy_restore(
    model: &mut Model<'_>,
    teacher: &TeacherWindows,
    n_converted: usize,
    candidates: usize,
    threads: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LayerChoice, TrainError> {
    greedy_restore_by(model, n_converted, candidates, progress, &mut |m| {
        kl_to_teacher(m, teacher, threads)
    })
}

/// [`greedy_restore`] by any score of the model (lower is better), e.g. prose KL plus a
/// weighted KL on [`copy_windows`]; the choice's `kl` fields then hold that score.
pub fn greedy_restore_by(
    model: &mut Model<'_>,
    n_converted: usize,
    candidates: usize,
    progress: &mut dyn FnMut(usize, usize),
    score: &mut dyn FnMut(&Model<'_>) -> Result<f64, TrainError>,
) -> Result<LayerChoice, TrainError> {
    let n = model.config.n_layers;
    let n_converted = n_converted.min(n);
    let set = |model: &mut Model<'_>, l: usize, kind: LayerType| {
        model
            .set_layer(l, kind, None)
            .map_err(|e| TrainError::Numeric {
                what: e.to_string(),
            })
    };
    for l in 0..n {
        set(model, l, LayerType::Window)?;
    }
    let rounds = n - n_converted;
    let per_round = if candidates == 0 { n } else { candidates };
    let total = 1 + n + rounds.saturating_sub(1) * per_round.min(n);
    let mut done = 0;
    let kl_all_converted = score(model)?;
    done += 1;
    progress(done, total);
    let mut converted: Vec<usize> = (0..n).collect();
    let mut ranking: Vec<usize> = converted.clone();
    let mut steps = Vec::new();
    let mut kl_final = kl_all_converted;
    for round in 0..rounds {
        let pool: Vec<usize> = if round == 0 || candidates == 0 {
            converted.clone()
        } else {
            ranking
                .iter()
                .copied()
                .filter(|l| converted.contains(l))
                .take(candidates)
                .collect()
        };
        let mut tried = Vec::with_capacity(pool.len());
        for &l in &pool {
            set(model, l, LayerType::Attention)?;
            let kl = score(model)?;
            set(model, l, LayerType::Window)?;
            tried.push((l, kl));
            done += 1;
            progress(done, total.max(done));
        }
        tried.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (best, kl) = tried[0];
        set(model, best, LayerType::Attention)?;
        converted.retain(|&l| l != best);
        // Next round's candidates: this round's order, then the layers not tried.
        ranking = tried
            .iter()
            .map(|&(l, _)| l)
            .filter(|&l| l != best)
            .collect();
        let untried: Vec<usize> = converted
            .iter()
            .copied()
            .filter(|l| !ranking.contains(l))
            .collect();
        ranking.extend(untried);
        kl_final = kl;
        steps.push(RestoreStep {
            restored: best,
            kl,
            tried,
        });
    }
    Ok(LayerChoice {
        converted,
        kl_all_converted,
        kl_final,
        steps,
        evaluations: done,
    })
}
