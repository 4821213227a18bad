//! Model-free multiple-choice scoring and aggregation, with lm-evaluation-harness semantics
//! (`lm_eval/api/task.py`, `ConfigurableTask.process_results` for `multiple_choice`;
//! `lm_eval/api/metrics.py` for `mean`, `mean_stderr` and `pooled_sample_stderr`).
//!
//! Per item the harness takes, for each choice, the summed log-likelihood of
//! `" " + choice` and whether greedy decoding would have produced it, then:
//! - `acc`: the argmax of the log-likelihoods is the gold index;
//! - `acc_norm`: the argmax of log-likelihood / `len(choice)`, where `len` counts the
//!   choice's characters (Unicode code points, as Python's `len`), without the leading space;
//! - `acc_bytes`: the same divided by the choice's UTF-8 byte length instead.
//!
//! `acc_norm` and `acc_bytes` differ only on non-ASCII choices (199 of HellaSwag's 40,168
//! endings, 27 of ARC-Challenge's test answers). Ties go to the first maximum, as
//! `np.argmax`.

use serde::{Deserialize, Serialize};

/// Errors raised while scoring.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScoreError {
    #[error("an item needs at least one choice to score")]
    NoChoices,
    #[error("gold index {gold} is out of range for {n_choices} choices")]
    GoldOutOfRange { gold: usize, n_choices: usize },
    #[error("choice {choice} has log-likelihood {loglik}, which is not a number or is +inf")]
    NotFinite { choice: usize, loglik: f64 },
    #[error("choice {choice} is empty, so its length-normalised score is undefined")]
    EmptyChoice { choice: usize },
    #[error("no values to aggregate")]
    NoValues,
}

/// What the model said about one choice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChoiceResult {
    /// Sum of the log-probabilities of the continuation's tokens (natural log).
    pub loglik: f64,
    /// Whether every continuation token was the argmax at its position.
    pub is_greedy: bool,
    /// Characters of the choice text without the leading delimiter (`acc_norm`'s length).
    pub chars: usize,
    /// UTF-8 bytes of the same text (`acc_bytes`'s length).
    pub bytes: usize,
}

impl ChoiceResult {
    /// `choice` is the harness's `doc_to_choice` string, i.e. [`crate::McRequest::choices`],
    /// not the continuation with its leading space.
    pub fn new(loglik: f64, is_greedy: bool, choice: &str) -> Self {
        ChoiceResult {
            loglik,
            is_greedy,
            chars: choice.chars().count(),
            bytes: choice.len(),
        }
    }
}

/// One multiple-choice item's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct McScore {
    /// Argmax of the log-likelihoods.
    pub pred: usize,
    /// Argmax of log-likelihood per character.
    pub pred_norm: usize,
    /// Argmax of log-likelihood per byte.
    pub pred_bytes: usize,
    pub acc: bool,
    pub acc_norm: bool,
    pub acc_bytes: bool,
    /// Whether the gold continuation is the greedy one (the harness's multiple-choice
    /// `exact_match`).
    pub gold_is_greedy: bool,
}

/// Scores one item. NaN or +inf log-likelihoods are errors (NaN would win `np.argmax` and
/// give a silently wrong answer); -inf is a legal, if extreme, log-likelihood.
pub fn score_choices(choices: &[ChoiceResult], gold: usize) -> Result<McScore, ScoreError> {
    if choices.is_empty() {
        return Err(ScoreError::NoChoices);
    }
    if gold >= choices.len() {
        return Err(ScoreError::GoldOutOfRange {
            gold,
            n_choices: choices.len(),
        });
    }
    for (choice, result) in choices.iter().enumerate() {
        if result.loglik.is_nan() || result.loglik == f64::INFINITY {
            return Err(ScoreError::NotFinite {
                choice,
                loglik: result.loglik,
            });
        }
        if result.chars == 0 || result.bytes == 0 {
            return Err(ScoreError::EmptyChoice { choice });
        }
    }
    let first_max = |score: &dyn Fn(&ChoiceResult) -> f64| {
        argmax_first(choices.iter().map(score)).expect("choices is not empty")
    };
    let pred = first_max(&|c| c.loglik);
    let pred_norm = first_max(&|c| c.loglik / c.chars as f64);
    let pred_bytes = first_max(&|c| c.loglik / c.bytes as f64);
    Ok(McScore {
        pred,
        pred_norm,
        pred_bytes,
        acc: pred == gold,
        acc_norm: pred_norm == gold,
        acc_bytes: pred_bytes == gold,
        gold_is_greedy: choices[gold].is_greedy,
    })
}

/// The index of the first maximum, as `np.argmax` on values without NaN; `None` when empty.
pub fn argmax_first(values: impl IntoIterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (index, value) in values.into_iter().enumerate() {
        // Strictly greater: an equal later value does not replace the first.
        if best.is_none_or(|(_, max)| value > max) {
            best = Some((index, value));
        }
    }
    best.map(|(index, _)| index)
}

/// A mean with its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStderr {
    pub mean: f64,
    /// The sample standard deviation over √n (the harness's `mean_stderr`); `None` for a
    /// single value, where the harness reports "N/A".
    pub stderr: Option<f64>,
    pub n: usize,
}

impl MeanStderr {
    /// Mean and standard error of per-item values (1.0/0.0 for accuracies). Summed left to
    /// right, as Python's `sum`, so the result matches the harness to the last bit.
    pub fn of(values: &[f64]) -> Result<MeanStderr, ScoreError> {
        if values.is_empty() {
            return Err(ScoreError::NoValues);
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let stderr = (n > 1).then(|| {
            let squares: f64 = values.iter().map(|x| (x - mean) * (x - mean)).sum();
            (squares / (n - 1) as f64).sqrt() / (n as f64).sqrt()
        });
        Ok(MeanStderr { mean, stderr, n })
    }

    /// The same for per-item pass/fail outcomes.
    pub fn of_bools(outcomes: impl IntoIterator<Item = bool>) -> Result<MeanStderr, ScoreError> {
        let values: Vec<f64> = outcomes.into_iter().map(f64::from).collect();
        MeanStderr::of(&values)
    }

    /// A group of subtasks weighted by size, as the harness aggregates MMLU's 57 subjects:
    /// the mean over all items, and the pooled standard error
    /// `sqrt(Σ (nᵢ - 1)·nᵢ·seᵢ² / (Σ nᵢ - k) / Σ nᵢ)` (`pooled_sample_stderr`). This is
    /// not the standard error of all items taken together: it leaves out the spread between
    /// subjects' means.
    pub fn pooled(groups: &[MeanStderr]) -> Result<MeanStderr, ScoreError> {
        let n: usize = groups.iter().map(|g| g.n).sum();
        if n == 0 {
            return Err(ScoreError::NoValues);
        }
        let mean = groups.iter().map(|g| g.mean * g.n as f64).sum::<f64>() / n as f64;
        let dof = n - groups.len();
        let stderr = (dof > 0).then(|| {
            let pooled_variance: f64 = groups
                .iter()
                .map(|g| {
                    let se = g.stderr.unwrap_or(0.0);
                    (g.n as f64 - 1.0) * se * se * g.n as f64
                })
                .sum::<f64>()
                / dof as f64;
            (pooled_variance / n as f64).sqrt()
        });
        Ok(MeanStderr { mean, stderr, n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(loglik: f64, text: &str) -> ChoiceResult {
        ChoiceResult::new(loglik, false, text)
    }

    #[test]
    fn acc_and_acc_norm_with_known_numbers() {
        // Per-char: -10/5 = -2.0, -12/12 = -1.0, -9.5/3 = -3.17, -20/40 = -0.5.
        let choices = [
            choice(-10.0, "abcde"),
            choice(-12.0, "abcdefghijkl"),
            choice(-9.5, "abc"),
            choice(-20.0, &"x".repeat(40)),
        ];
        let score = score_choices(&choices, 3).unwrap();
        assert_eq!((score.pred, score.pred_norm, score.pred_bytes), (2, 3, 3));
        assert!(!score.acc && score.acc_norm && score.acc_bytes);
        let score = score_choices(&choices, 2).unwrap();
        assert!(score.acc && !score.acc_norm);
    }

    #[test]
    fn acc_norm_counts_characters_and_acc_bytes_counts_bytes() {
        // "été" is 3 characters and 5 bytes. Raw: -3.0 > -3.6. Per character: -1.0 < -0.9.
        // Per byte: -0.6 > -0.9.
        let choices = [choice(-3.0, "été"), choice(-3.6, "abcd")];
        let score = score_choices(&choices, 0).unwrap();
        assert_eq!((score.pred, score.pred_norm, score.pred_bytes), (0, 1, 0));
        assert_eq!((choices[0].chars, choices[0].bytes), (3, 5));
    }

    #[test]
    fn ties_go_to_the_first_maximum() {
        let choices = [choice(-1.0, "ab"), choice(-1.0, "ab"), choice(-2.0, "ab")];
        let score = score_choices(&choices, 1).unwrap();
        assert_eq!((score.pred, score.pred_norm), (0, 0));
        assert!(!score.acc);
        assert_eq!(argmax_first([3.0, 5.0, 5.0, 1.0]), Some(1));
        assert_eq!(argmax_first([]), None);
        assert_eq!(
            argmax_first([f64::NEG_INFINITY, f64::NEG_INFINITY]),
            Some(0)
        );
    }

    #[test]
    fn gold_is_greedy_is_the_gold_choices_flag() {
        let choices = [
            ChoiceResult::new(-5.0, true, "a"),
            ChoiceResult::new(-1.0, false, "b"),
        ];
        assert!(score_choices(&choices, 0).unwrap().gold_is_greedy);
        assert!(!score_choices(&choices, 1).unwrap().gold_is_greedy);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert_eq!(score_choices(&[], 0), Err(ScoreError::NoChoices));
        let choices = [choice(-1.0, "a"), choice(-2.0, "b")];
        assert_eq!(
            score_choices(&choices, 2),
            Err(ScoreError::GoldOutOfRange {
                gold: 2,
                n_choices: 2
            })
        );
        let nan = [choice(-1.0, "a"), choice(f64::NAN, "b")];
        assert!(matches!(
            score_choices(&nan, 0),
            Err(ScoreError::NotFinite { choice: 1, .. })
        ));
        let empty = [choice(-1.0, "a"), choice(-2.0, "")];
        assert_eq!(
            score_choices(&empty, 0),
            Err(ScoreError::EmptyChoice { choice: 1 })
        );
        let minus_inf = [choice(f64::NEG_INFINITY, "a"), choice(-2.0, "b")];
        assert_eq!(score_choices(&minus_inf, 1).unwrap().pred, 1);
    }

    #[test]
    fn mean_and_stderr_with_known_numbers() {
        // mean 0.75; sample sd sqrt((3 * 0.25² + 0.75²) / 3) = 0.5; stderr 0.5 / 2.
        let m = MeanStderr::of_bools([true, false, true, true]).unwrap();
        assert_eq!(m.mean, 0.75);
        assert_eq!(m.stderr, Some(0.25));
        assert_eq!(m.n, 4);
        // Python: statistics.stdev([2, 4, 4, 4, 5, 5, 7, 9]) / sqrt(8) = 0.7559289460184544
        let m = MeanStderr::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(m.mean, 5.0);
        assert!((m.stderr.unwrap() - 0.755_928_946_018_454_4).abs() < 1e-15);
        let one = MeanStderr::of(&[1.0]).unwrap();
        assert_eq!((one.mean, one.stderr), (1.0, None));
        assert_eq!(MeanStderr::of(&[]), Err(ScoreError::NoValues));
    }

    #[test]
    fn pooled_follows_the_harness_formula() {
        let a = MeanStderr::of_bools([true, false, true, true]).unwrap(); // 0.75 ± 0.25, n 4
        let b = MeanStderr::of_bools([false, false]).unwrap(); // 0.0 ± 0.0, n 2
        let pooled = MeanStderr::pooled(&[a, b]).unwrap();
        assert_eq!(pooled.n, 6);
        assert_eq!(pooled.mean, 0.5);
        // sqrt(((4 - 1) * 0.25² * 4 + 0) / (6 - 2) / 6) = sqrt(0.75 / 4 / 6) = 0.1767766952966369
        assert!((pooled.stderr.unwrap() - 0.176_776_695_296_636_9).abs() < 1e-15);
        assert_eq!(MeanStderr::pooled(&[]), Err(ScoreError::NoValues));
        let single = MeanStderr::of(&[1.0]).unwrap();
        assert_eq!(MeanStderr::pooled(&[single]).unwrap().stderr, None);
    }
}
