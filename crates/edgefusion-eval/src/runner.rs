//! One task, end to end: read its items, build the harness's prompts, score them on the
//! model (each item's result cached, so an interrupted run resumes where it stopped), and
//! aggregate the metrics.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cache::{ResultCache, RunHash};
use crate::lm::{LanguageModel, LmError};
use crate::passkey::{self, PasskeyError};
use crate::prompts::{
    arc_request, boolq_request, commonsense_qa_request, copa_request, gsm8k_cot_request,
    gsm8k_cot_shots, hellaswag_request, mmlu_request, openbookqa_request, piqa_request,
    sciq_request, social_iqa_request, winogrande_request, GenRequest, McRequest, MmluDev,
    PromptError,
};
use crate::score::{score_choices, ChoiceResult, MeanStderr, ScoreError};
use crate::tasks::{
    ArcItem, BoolqItem, CommonsenseQaItem, CopaItem, Gsm8kItem, HellaswagItem, MmluItem,
    OpenbookqaItem, PiqaItem, SciqItem, SocialIqaItem, Task, TaskError, TaskItem, WinograndeItem,
};

/// What can fail while running a task.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Cache(#[from] crate::CacheError),
    #[error(transparent)]
    Passkey(#[from] PasskeyError),
    #[error("{task} item {index}: {source}")]
    Model {
        task: &'static str,
        index: usize,
        source: LmError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// `--limit`: items to score per task. A bare number applies to every task, `task=N` to
/// one (`200,mmlu=10`: 200 items of each task but 10 of each MMLU subject).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub all: Option<usize>,
    pub per_task: Vec<(Task, usize)>,
}

impl Limits {
    /// Parses `200`, `mmlu=10` or `200,mmlu=10,gsm8k=50`; 0 and unknown tasks are errors.
    pub fn parse(text: &str) -> Result<Limits, String> {
        let mut limits = Limits::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (task, n) = match part.split_once('=') {
                Some((task, n)) => (Some(Task::parse(task).map_err(|e| e.to_string())?), n),
                None => (None, part),
            };
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| format!("'{part}': the limit must be a whole number"))?;
            if n == 0 {
                return Err(format!(
                    "'{part}': a limit of 0 scores nothing; give at least 1, or leave the task's limit out"
                ));
            }
            match task {
                Some(task) => limits.per_task.push((task, n)),
                None => limits.all = Some(n),
            }
        }
        Ok(limits)
    }

    /// The `--limit` text that [`Limits::parse`] reads back.
    pub fn to_arg(&self) -> String {
        let all = self.all.map(|n| n.to_string());
        let per_task = self
            .per_task
            .iter()
            .map(|(t, n)| format!("{}={n}", t.name()));
        all.into_iter()
            .chain(per_task)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The limit of `task`.
    pub fn of(&self, task: Task) -> Option<usize> {
        self.per_task
            .iter()
            .rev()
            .find(|(t, _)| *t == task)
            .map(|(_, n)| *n)
            .or(self.all)
    }
}

/// How tasks are run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Folder of the jsonl files (`assets/tasks`).
    pub tasks_dir: PathBuf,
    /// Score the first N items only (MMLU: the first N of each subject, as the harness's
    /// `--limit` applies to each of its 57 subtasks).
    pub limit: Option<usize>,
    /// Few-shot examples (`None`: each task's default, [`Task::default_shots`]).
    pub shots: Option<usize>,
    /// Generation length limit (`None`: the harness's 256 tokens); GSM8K only.
    pub max_gen_tokens: Option<usize>,
    /// Passkey: the window its prompts and answers fill ([`passkey::DEFAULT_CTX`]); the
    /// session must hold at least this many positions.
    pub passkey_ctx: usize,
}

/// One aggregated metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: MeanStderr,
}

/// What a task scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskReport {
    pub task: String,
    pub shots: usize,
    /// Items scored (after `--limit`) and the items the task has.
    pub items: usize,
    pub items_total: usize,
    pub limited: bool,
    pub metrics: Vec<Metric>,
    /// The window of this task's prompts when it has its own (passkey: `--passkey-ctx`),
    /// not the report's `n_ctx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<usize>,
    /// Items whose prompt was cut from the left to fit the context window.
    pub truncated: usize,
    /// Items found in the cache instead of computed.
    pub cached: usize,
    pub seconds: f64,
    /// Items computed (not cached) per second.
    pub items_per_s: f64,
    /// Tokens run through the model per second.
    pub tokens_per_s: f64,
}

impl TaskReport {
    pub fn metric(&self, name: &str) -> Option<&MeanStderr> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| &m.value)
    }
}

/// One scored item as `evaluate --samples` logs it (lm-evaluation-harness's
/// `--log_samples`): the prompt, what the model gave and how it scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub task: String,
    pub index: usize,
    /// Multiple choice: the shared context; generation: the prompt.
    pub context: String,
    /// Multiple-input items (WinoGrande): each choice's own context, `context` + the choice
    /// (the continuations are then all alike).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contexts: Vec<String>,
    /// Multiple choice: each continuation as scored (`" " + choice`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub continuations: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logliks: Vec<f64>,
    pub gold: String,
    /// The choice picked by raw log-likelihood (multiple choice) or the extracted answer.
    pub pred: String,
    /// The choice picked by length-normalised log-likelihood (multiple choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pred_norm: Option<usize>,
    /// Generation: the text generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    pub correct: bool,
    /// Prompt tokens cut from the left to fit the window.
    pub dropped: usize,
}

/// A multiple-choice item's cached result: enough to recompute every metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct McResult {
    logliks: Vec<f64>,
    greedy: Vec<bool>,
    dropped: usize,
}

/// A generation item's cached result.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GenResult {
    text: String,
    dropped: usize,
}

/// The requests of one task, in order, with the group (MMLU subject) of each.
enum Requests {
    Mc(Vec<(String, McRequest)>),
    Gen(Vec<GenRequest>),
}

fn read<T: TaskItem>(dir: &Path, file: &str) -> Result<Vec<T>, TaskError> {
    T::read(dir.join(file))
}

/// Builds `task`'s requests with `shots` examples; returns them with the item count before
/// the limit.
fn requests(
    task: Task,
    settings: &RunSettings,
    shots: usize,
) -> Result<(Requests, usize), RunError> {
    let files = task
        .files()
        .ok_or_else(|| RunError::Invalid(format!("{} is not a jsonl task", task.name())))?;
    let dir = &settings.tasks_dir;
    let limit = |n: usize| settings.limit.map_or(n, |l| l.min(n));
    Ok(match task {
        Task::Perplexity | Task::Passkey => unreachable!("files() is None"),
        Task::Hellaswag => zero_shot_only::<HellaswagItem>(task, settings, shots, |item| {
            hellaswag_request(item, &[])
        })?,
        Task::ArcChallenge | Task::ArcEasy => {
            let items: Vec<ArcItem> = read(dir, files.eval)?;
            let pool: Vec<ArcItem> = match (shots, files.fewshot) {
                (0, _) => Vec::new(),
                (_, Some(f)) => read(dir, f)?,
                (_, None) => return Err(no_pool(task, shots)),
            };
            if pool.len() < shots {
                return Err(RunError::Invalid(format!(
                    "{}: {shots} shots asked, the few-shot pool has {}",
                    task.name(),
                    pool.len()
                )));
            }
            let total = items.len();
            let reqs = items[..limit(total)]
                .iter()
                .map(|item| (String::new(), arc_request(item, &pool[..shots])))
                .collect();
            (Requests::Mc(reqs), total)
        }
        Task::Mmlu => {
            let items: Vec<MmluItem> = read(dir, files.eval)?;
            let dev = MmluDev::new(match files.fewshot {
                Some(f) if shots > 0 => read(dir, f)?,
                _ => Vec::new(),
            });
            let total = items.len();
            let mut per_subject: std::collections::HashMap<&str, usize> = Default::default();
            let mut reqs = Vec::new();
            for item in &items {
                let seen = per_subject.entry(item.subject.as_str()).or_default();
                if settings.limit.is_some_and(|l| *seen >= l) {
                    continue;
                }
                *seen += 1;
                let examples = if shots > 0 {
                    dev.shots(&item.subject, shots)?
                } else {
                    &[]
                };
                reqs.push((item.subject.clone(), mmlu_request(item, examples)));
            }
            (Requests::Mc(reqs), total)
        }
        Task::Gsm8k => {
            let items: Vec<Gsm8kItem> = read(dir, files.eval)?;
            let pool = gsm8k_cot_shots();
            if pool.len() < shots {
                return Err(RunError::Invalid(format!(
                    "gsm8k: {shots} shots asked, the chain-of-thought exemplars are {}",
                    pool.len()
                )));
            }
            let total = items.len();
            let reqs = items[..limit(total)]
                .iter()
                .map(|item| {
                    let mut req = gsm8k_cot_request(item, &pool[..shots]);
                    if let Some(n) = settings.max_gen_tokens {
                        req.max_gen_tokens = n;
                    }
                    req
                })
                .collect();
            (Requests::Gen(reqs), total)
        }
        Task::Piqa => zero_shot_only::<PiqaItem>(task, settings, shots, piqa_request)?,
        Task::Winogrande => {
            zero_shot_only::<WinograndeItem>(task, settings, shots, winogrande_request)?
        }
        Task::Boolq => zero_shot_only::<BoolqItem>(task, settings, shots, boolq_request)?,
        Task::Openbookqa => {
            zero_shot_only::<OpenbookqaItem>(task, settings, shots, openbookqa_request)?
        }
        Task::Sciq => zero_shot_only::<SciqItem>(task, settings, shots, sciq_request)?,
        Task::Copa => zero_shot_only::<CopaItem>(task, settings, shots, copa_request)?,
        Task::CommonsenseQa => {
            zero_shot_only::<CommonsenseQaItem>(task, settings, shots, commonsense_qa_request)?
        }
        Task::SocialIqa => {
            zero_shot_only::<SocialIqaItem>(task, settings, shots, social_iqa_request)?
        }
    })
}

fn no_pool(task: Task, shots: usize) -> RunError {
    let name = task.name();
    RunError::Invalid(format!(
        "{name}: {shots} shots asked, but the assets hold no split to draw {name} examples from; use --shots 0"
    ))
}

/// A task scored 0-shot on its one file (the assets hold no split to draw its examples
/// from): the first `--limit` items, each built by `build`.
fn zero_shot_only<T: TaskItem>(
    task: Task,
    settings: &RunSettings,
    shots: usize,
    build: fn(&T) -> McRequest,
) -> Result<(Requests, usize), RunError> {
    let name = task.name();
    if shots > 0 {
        return Err(no_pool(task, shots));
    }
    let file = task
        .files()
        .ok_or_else(|| RunError::Invalid(format!("{name} is not a jsonl task")))?
        .eval;
    let items: Vec<T> = read(&settings.tasks_dir, file)?;
    let total = items.len();
    let scored = settings.limit.map_or(total, |l| l.min(total));
    let reqs = items[..scored]
        .iter()
        .map(|item| (String::new(), build(item)))
        .collect();
    Ok((Requests::Mc(reqs), total))
}

/// Passkey items 0..N (`--limit`, else [`passkey::DEFAULT_ITEMS`]), each sized with the
/// model's tokenizer to fill `--passkey-ctx`; returns them with N as the item count.
fn passkey_requests(
    lm: &LanguageModel<'_>,
    settings: &RunSettings,
) -> Result<(Requests, usize), RunError> {
    let ctx = settings.passkey_ctx;
    passkey::check_ctx(ctx, lm.model_ctx())?;
    if ctx > lm.n_ctx() {
        return Err(PasskeyError::ExceedsSession {
            ctx,
            n_ctx: lm.n_ctx(),
        }
        .into());
    }
    let n = settings.limit.unwrap_or(passkey::DEFAULT_ITEMS);
    let reqs = (0..n)
        .map(|index| {
            passkey::item(index, lm.tokenizer(), ctx, Some(lm.model_ctx()))
                .map(|item| item.request())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((Requests::Gen(reqs), n))
}

/// Runs `task` on `lm`. `cache` (with `run`, the identity of the model and settings)
/// holds per-item results: found items are not recomputed, computed ones are appended as
/// they finish. `sample(done, total, &sample)` after each item.
pub fn run_task(
    lm: &mut LanguageModel<'_>,
    task: Task,
    settings: &RunSettings,
    mut cache: Option<&mut ResultCache>,
    run: RunHash,
    progress: &mut dyn FnMut(usize, usize, &Sample),
) -> Result<TaskReport, RunError> {
    if settings.limit == Some(0) {
        return Err(RunError::Invalid(
            "--limit 0 scores nothing; give at least 1 (or leave it out for every item)".into(),
        ));
    }
    let shots = settings.shots.unwrap_or(task.default_shots());
    let (requests, items_total) = if task == Task::Passkey {
        if shots > 0 {
            return Err(RunError::Invalid(format!(
                "passkey: {shots} shots asked, but a passkey prompt holds no examples; use --shots 0"
            )));
        }
        passkey_requests(lm, settings)?
    } else {
        requests(task, settings, shots)?
    };
    let name = task.name();
    let start = Instant::now();
    let tokens_before = lm.tokens_evaluated;
    let (mut truncated, mut cached, mut computed) = (0, 0, 0);
    let model_error = |index: usize| {
        move |source: LmError| RunError::Model {
            task: name,
            index,
            source,
        }
    };
    let (items, metrics) = match requests {
        Requests::Mc(reqs) => {
            let total = reqs.len();
            // (group, scores) per item.
            let mut outcomes = Vec::with_capacity(total);
            for (index, (group, req)) in reqs.iter().enumerate() {
                let result = match cache
                    .as_deref()
                    .map(|c| c.get::<McResult>(name, index, run))
                {
                    Some(Ok(Some(r))) if r.logliks.len() == req.choices.len() => {
                        cached += 1;
                        r
                    }
                    Some(Err(e)) => return Err(e.into()),
                    _ => {
                        let scored = lm.score_pairs(&req.pairs()).map_err(model_error(index))?;
                        computed += 1;
                        let r = McResult {
                            logliks: scored.choices.iter().map(|c| c.loglik).collect(),
                            greedy: scored.choices.iter().map(|c| c.is_greedy).collect(),
                            dropped: scored.dropped,
                        };
                        if let Some(c) = cache.as_deref_mut() {
                            c.insert(name, index, run, &r)?;
                        }
                        r
                    }
                };
                truncated += usize::from(result.dropped > 0);
                let choices: Vec<ChoiceResult> = req
                    .choices
                    .iter()
                    .zip(result.logliks.iter().zip(&result.greedy))
                    .map(|(text, (&ll, &greedy))| ChoiceResult::new(ll, greedy, text))
                    .collect();
                let scored = score_choices(&choices, req.gold)?;
                progress(
                    index + 1,
                    total,
                    &Sample {
                        task: name.into(),
                        index,
                        context: req.context.clone(),
                        contexts: if req.is_multiple_input() {
                            (0..req.choices.len()).map(|i| req.context_of(i)).collect()
                        } else {
                            Vec::new()
                        },
                        continuations: req.continuations(),
                        logliks: result.logliks.clone(),
                        gold: req.gold.to_string(),
                        pred: scored.pred.to_string(),
                        pred_norm: Some(scored.pred_norm),
                        generation: None,
                        correct: scored.acc,
                        dropped: result.dropped,
                    },
                );
                outcomes.push((group.clone(), scored));
            }
            let metrics = if task == Task::Mmlu {
                // The harness's group aggregate: items weighted alike, the pooled stderr of
                // the subjects.
                let mut subjects: std::collections::BTreeMap<&str, Vec<bool>> = Default::default();
                for (group, s) in &outcomes {
                    subjects.entry(group.as_str()).or_default().push(s.acc);
                }
                let groups = subjects
                    .values()
                    .map(|v| MeanStderr::of_bools(v.iter().copied()))
                    .collect::<Result<Vec<_>, _>>()?;
                vec![Metric {
                    name: "acc".into(),
                    value: MeanStderr::pooled(&groups)?,
                }]
            } else {
                let of = |f: &dyn Fn(&crate::McScore) -> bool| {
                    MeanStderr::of_bools(outcomes.iter().map(|(_, s)| f(s)))
                };
                let mut metrics = vec![Metric {
                    name: "acc".into(),
                    value: of(&|s| s.acc)?,
                }];
                // Only where the harness's metric_list has it, so a report's columns are
                // the harness's.
                if task.reports_acc_norm() {
                    metrics.push(Metric {
                        name: "acc_norm".into(),
                        value: of(&|s| s.acc_norm)?,
                    });
                }
                metrics
            };
            (total, metrics)
        }
        Requests::Gen(reqs) => {
            let total = reqs.len();
            // GSM8K's scores (three columns), and every item's right or wrong.
            let mut scores = Vec::with_capacity(total);
            let mut corrects = Vec::with_capacity(total);
            for (index, req) in reqs.iter().enumerate() {
                let result = match cache
                    .as_deref()
                    .map(|c| c.get::<GenResult>(name, index, run))
                {
                    Some(Ok(Some(r))) => {
                        cached += 1;
                        r
                    }
                    Some(Err(e)) => return Err(e.into()),
                    _ => {
                        let generated = lm
                            .generate(&req.prompt, &req.stop, req.max_gen_tokens)
                            .map_err(model_error(index))?;
                        computed += 1;
                        let r = GenResult {
                            text: generated.text,
                            dropped: generated.dropped,
                        };
                        if let Some(c) = cache.as_deref_mut() {
                            c.insert(name, index, run, &r)?;
                        }
                        r
                    }
                };
                truncated += usize::from(result.dropped > 0);
                let (pred, correct) = if task == Task::Passkey {
                    let correct = passkey::is_correct(&result.text, &req.target);
                    (passkey::answer(&result.text).to_string(), correct)
                } else {
                    let scored = crate::gsm8k::score(&result.text, &req.target);
                    let pred = scored
                        .extracted
                        .as_ref()
                        .map_or(String::new(), |e| e.answer.clone());
                    let correct = scored.exact_match;
                    scores.push(scored);
                    (pred, correct)
                };
                corrects.push(correct);
                progress(
                    index + 1,
                    total,
                    &Sample {
                        task: name.into(),
                        index,
                        context: req.prompt.clone(),
                        contexts: Vec::new(),
                        continuations: Vec::new(),
                        logliks: Vec::new(),
                        gold: req.target.clone(),
                        pred,
                        pred_norm: None,
                        generation: Some(result.text.clone()),
                        correct,
                        dropped: result.dropped,
                    },
                );
            }
            let metrics = if task == Task::Passkey {
                vec![Metric {
                    name: "acc".into(),
                    value: MeanStderr::of_bools(corrects.iter().copied())?,
                }]
            } else {
                let of = |f: &dyn Fn(&crate::gsm8k::Gsm8kScore) -> bool| {
                    MeanStderr::of_bools(scores.iter().map(f))
                };
                vec![
                    Metric {
                        name: "exact_match".into(),
                        value: of(&|s| s.exact_match)?,
                    },
                    Metric {
                        name: "harness_strict".into(),
                        value: of(&|s| s.harness_strict)?,
                    },
                    Metric {
                        name: "harness_flexible".into(),
                        value: of(&|s| s.harness_flexible)?,
                    },
                ]
            };
            (total, metrics)
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    Ok(TaskReport {
        task: name.into(),
        shots,
        items,
        items_total,
        limited: items < items_total,
        metrics,
        ctx: (task == Task::Passkey).then_some(settings.passkey_ctx),
        truncated,
        cached,
        seconds,
        items_per_s: computed as f64 / seconds.max(1e-9),
        tokens_per_s: (lm.tokens_evaluated - tokens_before) as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_a_number_for_all_and_overrides_per_task() {
        let l = Limits::parse("200, mmlu=10").unwrap();
        assert_eq!(l.of(Task::Hellaswag), Some(200));
        assert_eq!(l.of(Task::Mmlu), Some(10));
        let l = Limits::parse("gsm8k=5").unwrap();
        assert_eq!(l.of(Task::Gsm8k), Some(5));
        assert_eq!(l.of(Task::ArcChallenge), None);
        assert!(Limits::parse("0").unwrap_err().contains("scores nothing"));
        assert!(Limits::parse("mmlu=x")
            .unwrap_err()
            .contains("whole number"));
        assert!(Limits::parse("piqa=3").is_ok());
        assert!(Limits::parse("siqa=3").unwrap_err().contains("social_iqa"));
        let l = Limits::parse("200,mmlu=10,gsm8k=50").unwrap();
        assert_eq!(Limits::parse(&l.to_arg()).unwrap(), l);
    }
}
