//! lm-evaluation-harness prompt formats, byte for byte, so our scores mean what theirs do.
//!
//! Checked against EleutherAI/lm-evaluation-harness at commit `4e7e0d4` (task configs
//! unchanged in substance since v0.4):
//! - `lm_eval/tasks/hellaswag/{hellaswag.yaml,utils.py}`: `preprocess` and `process_docs`.
//! - `lm_eval/tasks/arc/arc_easy.yaml` (included by `arc_challenge.yaml`):
//!   `doc_to_text: "Question: {{question}}\nAnswer:"`, `doc_to_choice: "{{choices.text}}"`.
//! - `lm_eval/tasks/mmlu/default/_default_template_yaml` and `_generate_configs.py`: the
//!   subject description, `{{question.strip()}}\nA. ..\nD. {{choices[3]}}\nAnswer:`, choices
//!   `["A", "B", "C", "D"]`, shots from `dev` with the `first_n` sampler.
//! - `lm_eval/tasks/gsm8k/gsm8k-cot.yaml` (task `gsm8k_cot`, version 3.0): see
//!   [`gsm8k_cot_request`].
//! - `lm_eval/tasks/piqa/piqa.yaml`, `winogrande/{default.yaml,preprocess_winogrande.py}`,
//!   `super_glue/boolq/default.yaml`, `openbookqa/openbookqa.yaml`, `sciq/sciq.yaml`,
//!   `super_glue/copa/{default.yaml,utils.py}`, `commonsense_qa/default.yaml` and
//!   `siqa/siqa.yaml`: each builder below quotes its template.
//! - `lm_eval/api/task.py` (`fewshot_context`, `build_qa_turn`, `multiple_input_context`,
//!   `construct_requests`) and `lm_eval/config/task.py`: target delimiter `" "`, few-shot
//!   delimiter `"\n\n"`; a multiple-choice request is `(context, " " + choice)`, or, when
//!   `doc_to_text` gives the gold index (WinoGrande), `(choice, " " + target)` per choice.
//! - `lm_eval/models/huggingface.py`: left truncation ([`fit_loglikelihood`],
//!   [`fit_generation`]) and `max_gen_toks` 256.
//!
//! Shots are a parameter everywhere; each builder takes the already chosen examples so that
//! the choice of pool (and its order) stays visible at the call site.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::tasks::{
    python_lstrip, python_strip, ArcItem, BoolqItem, CommonsenseQaItem, CopaItem, CopaQuestion,
    Gsm8kItem, Gsm8kShot, HellaswagItem, MmluItem, OpenbookqaItem, PiqaItem, SciqItem,
    SocialIqaItem, WinograndeItem, COMMONSENSE_QA_LETTERS,
};

/// Bumped whenever a prompt format below changes, so that cached results computed under the
/// old format stop matching (it belongs in the cache's [`crate::RunHash`]).
pub const PROMPT_FORMAT_VERSION: u32 = 1;

/// Between a question and its answer (the harness's `target_delimiter`).
pub const TARGET_DELIMITER: &str = " ";
/// After each few-shot example (the harness's `fewshot_delimiter`).
pub const FEWSHOT_DELIMITER: &str = "\n\n";

/// Errors raised while building prompts or fitting them into a context window.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    #[error("mmlu: subject '{subject}' has {available} dev examples, {requested} shots requested")]
    NotEnoughShots {
        subject: String,
        available: usize,
        requested: usize,
    },
    #[error("mmlu: no dev examples for subject '{subject}' (is the dev file the one for this test file?)")]
    UnknownSubject { subject: String },
    #[error("a context window of {n_ctx} tokens cannot hold a continuation of {continuation} tokens plus one token of context")]
    ContinuationTooLong { continuation: usize, n_ctx: usize },
    #[error("the continuation is empty: there is nothing to score")]
    EmptyContinuation,
    #[error(
        "the context is empty: start it with the model's prefix token (BOS), as the harness does"
    )]
    EmptyContext,
    #[error("a context window of {n_ctx} tokens leaves no room for a prompt after reserving {max_gen_tokens} tokens to generate")]
    NoRoomForPrompt { n_ctx: usize, max_gen_tokens: usize },
}

/// A multiple-choice item as the harness scores it: the log-likelihood of
/// `TARGET_DELIMITER + choice` after `context`, for each choice; or, for the harness's
/// multiple-input tasks (WinoGrande), of `TARGET_DELIMITER + shared_continuation` after
/// `context + choice`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McRequest {
    /// Shared by every choice, so it is computed once (prefix KV/state reuse). For a
    /// multiple-input item, the part of the context before the choice (the few-shot
    /// preamble; empty at 0 shots).
    pub context: String,
    /// The harness's `doc_to_choice` strings, without the leading delimiter; their lengths
    /// are what `acc_norm` divides by ([`crate::ChoiceResult::new`]).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
    /// The harness's `doc_to_target` when its `doc_to_text` is the gold index
    /// (`multiple_input`): every choice is then scored on this one continuation, each after
    /// its own context `context + choice` ("partial evaluation": only the words after the
    /// choice count, so longer options are not penalised for their own tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_continuation: Option<String>,
}

impl McRequest {
    /// The context choice `index` is scored after: [`McRequest::context`], or
    /// `context + choice` for a multiple-input item.
    pub fn context_of(&self, index: usize) -> String {
        match &self.shared_continuation {
            None => self.context.clone(),
            Some(_) => format!("{}{}", self.context, self.choices[index]),
        }
    }

    /// The text scored for choice `index`: `" " + choice`, or `" " + shared_continuation`.
    pub fn continuation(&self, index: usize) -> String {
        let scored = self
            .shared_continuation
            .as_deref()
            .unwrap_or(&self.choices[index]);
        format!("{TARGET_DELIMITER}{scored}")
    }

    /// Every choice's continuation, in order.
    pub fn continuations(&self) -> Vec<String> {
        (0..self.choices.len())
            .map(|i| self.continuation(i))
            .collect()
    }

    /// Every choice's `(context, continuation)`, the harness's `loglikelihood` requests.
    pub fn pairs(&self) -> Vec<(String, String)> {
        (0..self.choices.len())
            .map(|i| (self.context_of(i), self.continuation(i)))
            .collect()
    }

    /// Whether the choices differ in their contexts rather than their continuations.
    pub fn is_multiple_input(&self) -> bool {
        self.shared_continuation.is_some()
    }
}

/// A 0-shot request whose choices are continuations of one context.
fn zero_shot(context: String, choices: Vec<String>, gold: usize) -> McRequest {
    McRequest {
        context,
        choices,
        gold,
        shared_continuation: None,
    }
}

/// Moves trailing whitespace of a context onto the continuation, as the harness's
/// `_encode_pair` does before tokenizing (a BPE tokenizer attaches a space to the word after
/// it, so `"Answer: "` + `"A"` must be tokenized as `"Answer:"` + `" A"`). None of the
/// formats here end a context in whitespace; this keeps custom ones right too.
pub fn split_trailing_whitespace(context: &str, continuation: &str) -> (String, String) {
    let kept =
        context.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    let moved = &context[kept.len()..];
    (kept.to_string(), format!("{moved}{continuation}"))
}

/// A generation item: greedy decoding from `prompt` until a stop sequence, the model's end
/// of sequence token, or `max_gen_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenRequest {
    pub prompt: String,
    /// Generation stops when the text generated so far contains any of these; the text is
    /// then cut before the earliest one ([`GenRequest::cut`]). The harness also adds the
    /// tokenizer's EOS string, which a runtime handles as the EOS token id.
    pub stop: Vec<String>,
    /// The harness's `max_gen_toks` (256 by default for its models).
    pub max_gen_tokens: usize,
    /// The reference answer the extracted answer is compared with.
    pub target: String,
}

impl GenRequest {
    /// The byte offset where the earliest stop sequence starts in `generated`, if any.
    pub fn find_stop(&self, generated: &str) -> Option<usize> {
        find_stop(generated, &self.stop)
    }

    /// The generation cut before its earliest stop sequence, as the harness's
    /// `for term in until: s = s.split(term)[0]` (which amounts to the earliest one).
    pub fn cut<'a>(&self, generated: &'a str) -> &'a str {
        match self.find_stop(generated) {
            Some(at) => &generated[..at],
            None => generated,
        }
    }
}

/// The byte offset of the earliest occurrence of any non-empty stop sequence.
pub fn find_stop<S: AsRef<str>>(text: &str, stops: &[S]) -> Option<usize> {
    stops
        .iter()
        .map(AsRef::as_ref)
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| text.find(stop))
        .min()
}

fn with_shots(shots: impl Iterator<Item = (String, String)>, query: String) -> String {
    let mut prompt = String::new();
    for (question, answer) in shots {
        prompt.push_str(&question);
        prompt.push_str(TARGET_DELIMITER);
        prompt.push_str(&answer);
        prompt.push_str(FEWSHOT_DELIMITER);
    }
    prompt.push_str(&query);
    prompt
}

// ---------------------------------------------------------------------------------------------
// HellaSwag

/// The harness's HellaSwag cleaning (`utils.preprocess`): strip, `" [title]"` → `". "`,
/// drop bracketed WikiHow markers such as `[header]` and `[step]`, then one pass of double
/// spaces to single ones (Python's `replace` is a single non-overlapping pass, so three spaces
/// become two; we do the same).
pub fn hellaswag_preprocess(text: &str) -> String {
    static BRACKETED: OnceLock<Regex> = OnceLock::new();
    // `.` stops at a newline, as in Python's `re` without DOTALL; lazy, as `.*?`.
    let bracketed = BRACKETED.get_or_init(|| Regex::new(r"\[.*?\]").expect("constant regex"));
    let text = python_strip(text).replace(" [title]", ". ");
    let text = bracketed.replace_all(&text, "");
    text.replace("  ", " ")
}

/// Python's `str.capitalize()`: the first character upper-cased and the rest lower-cased
/// (HellaSwag's `ctx_b.capitalize()` lowers the rest, which matters for names). Python
/// title-cases the first character; the two differ only for a few digraph letters.
pub fn python_capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first
            .to_uppercase()
            .chain(chars.as_str().to_lowercase().chars())
            .collect(),
    }
}

/// The harness's `query` of a HellaSwag item:
/// `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`.
pub fn hellaswag_query(item: &HellaswagItem) -> String {
    hellaswag_preprocess(&format!(
        "{}: {} {}",
        item.activity_label,
        item.ctx_a,
        python_capitalize(&item.ctx_b)
    ))
}

/// HellaSwag: context [`hellaswag_query`], choices the cleaned endings, continuations
/// `" " + ending`. The harness default is 0-shot (its shots would come from the train split,
/// which the assets do not hold); `shots` are formatted as `query + " " + gold ending + "\n\n"`.
pub fn hellaswag_request(item: &HellaswagItem, shots: &[HellaswagItem]) -> McRequest {
    let shots = shots.iter().map(|shot| {
        (
            hellaswag_query(shot),
            hellaswag_preprocess(&shot.endings[shot.label]),
        )
    });
    McRequest {
        context: with_shots(shots, hellaswag_query(item)),
        choices: item
            .endings
            .iter()
            .map(|e| hellaswag_preprocess(e))
            .collect(),
        gold: item.label,
        shared_continuation: None,
    }
}

// ---------------------------------------------------------------------------------------------
// ARC

fn arc_query(item: &ArcItem) -> String {
    format!("Question: {}\nAnswer:", item.question)
}

/// ARC-Challenge and ARC-Easy (`arc_easy.yaml`, which `arc_challenge.yaml` includes):
/// `"Question: {question}\nAnswer:"`, continuations `" " + answer text`. The
/// harness default is 0-shot; `shots` are formatted as the harness would (query, `" "`, the
/// correct answer text, `"\n\n"`), though the harness samples them at random from train.
pub fn arc_request(item: &ArcItem, shots: &[ArcItem]) -> McRequest {
    let shots = shots
        .iter()
        .map(|shot| (arc_query(shot), shot.choices[shot.answer].clone()));
    McRequest {
        context: with_shots(shots, arc_query(item)),
        choices: item.choices.clone(),
        gold: item.answer,
        shared_continuation: None,
    }
}

// ---------------------------------------------------------------------------------------------
// MMLU

/// The letters MMLU's choices are scored as.
pub const MMLU_LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// `"The following are multiple choice questions (with answers) about {subject}.\n\n"`, the
/// subject's underscores as spaces (`' '.join(subject.split('_'))`).
pub fn mmlu_description(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        subject.replace('_', " ")
    )
}

fn mmlu_query(item: &MmluItem) -> String {
    let mut query = python_strip(&item.question).to_string();
    for (letter, choice) in MMLU_LETTERS.iter().zip(&item.choices) {
        query.push_str(&format!("\n{letter}. {choice}"));
    }
    query.push_str("\nAnswer:");
    query
}

/// MMLU: the subject description, then each shot as
/// `"{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}\n\n"`, then the query ending in
/// `"Answer:"`; continuations `" A"` to `" D"`. Shots come from [`MmluDev::shots`] (the
/// harness's: the first K dev items of the same subject, K = 5 by default).
pub fn mmlu_request(item: &MmluItem, shots: &[MmluItem]) -> McRequest {
    let shots = shots
        .iter()
        .map(|shot| (mmlu_query(shot), MMLU_LETTERS[shot.answer].to_string()));
    McRequest {
        context: mmlu_description(&item.subject) + &with_shots(shots, mmlu_query(item)),
        choices: MMLU_LETTERS.map(String::from).to_vec(),
        gold: item.answer,
        shared_continuation: None,
    }
}

/// The MMLU dev split grouped by subject, in file order (the harness's `first_n` sampler
/// takes the first K in dataset order).
#[derive(Debug, Clone, Default)]
pub struct MmluDev {
    by_subject: BTreeMap<String, Vec<MmluItem>>,
}

impl MmluDev {
    pub fn new(dev: Vec<MmluItem>) -> Self {
        let mut by_subject: BTreeMap<String, Vec<MmluItem>> = BTreeMap::new();
        for item in dev {
            by_subject
                .entry(item.subject.clone())
                .or_default()
                .push(item);
        }
        MmluDev { by_subject }
    }

    /// The first `k` dev items of `subject`; an error when the subject is missing or has
    /// fewer than `k`, rather than a prompt with fewer shots than reported.
    pub fn shots(&self, subject: &str, k: usize) -> Result<&[MmluItem], PromptError> {
        if k == 0 {
            return Ok(&[]);
        }
        let items = self
            .by_subject
            .get(subject)
            .ok_or_else(|| PromptError::UnknownSubject {
                subject: subject.to_string(),
            })?;
        items.get(..k).ok_or(PromptError::NotEnoughShots {
            subject: subject.to_string(),
            available: items.len(),
            requested: k,
        })
    }

    /// The subjects, sorted.
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        self.by_subject.keys().map(String::as_str)
    }
}

// ---------------------------------------------------------------------------------------------
// GSM8K

/// `gsm8k_cot` (harness version 3.0) stops at these, plus the tokenizer's EOS. Version 2.0
/// stopped at `["Q:", "\n\n"]`; since version 3.0 `"\n\n"` is not a stop sequence.
pub const GSM8K_COT_STOP: [&str; 3] = ["Q:", "</s>", "<|im_end|>"];

/// The harness's `max_gen_toks` for its models.
pub const GSM8K_MAX_GEN_TOKENS: usize = 256;

/// The 8 chain-of-thought exemplars of `gsm8k-cot.yaml` (`fewshot_config.samples`, from
/// Wei et al. 2022, "Chain-of-Thought Prompting", table 20), in the harness's order.
const GSM8K_COT_EXEMPLARS: [(&str, &str); 8] = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
];

/// The harness's 8 `gsm8k_cot` exemplars. The assets' `gsm8k_fewshot.jsonl` holds the same
/// questions and reasoning but ends each with "So the answer is N."; these are the harness's
/// words, so that the prompt (and the "The answer is N." the model learns to write) match.
pub fn gsm8k_cot_shots() -> Vec<Gsm8kShot> {
    GSM8K_COT_EXEMPLARS
        .iter()
        .map(|(question, cot)| Gsm8kShot {
            question: question.to_string(),
            cot: cot.to_string(),
        })
        .collect()
}

/// GSM8K 8-shot chain of thought, following lm-evaluation-harness task `gsm8k_cot`
/// (`gsm8k-cot.yaml`, version 3.0; not `gsm8k`, which is 5-shot "Question:/Answer:" with
/// full solutions, nor `gsm8k_cot_llama`, which is a chat format): each shot
/// `"Q: {question}\nA: {cot}\n\n"`, then `"Q: {question}\nA:"`; greedy until
/// [`GSM8K_COT_STOP`] or [`GSM8K_MAX_GEN_TOKENS`]. Pass [`gsm8k_cot_shots`] for the
/// harness's prompt.
pub fn gsm8k_cot_request(item: &Gsm8kItem, shots: &[Gsm8kShot]) -> GenRequest {
    let query = |question: &str| format!("Q: {question}\nA:");
    let shots = shots
        .iter()
        .map(|shot| (query(&shot.question), shot.cot.clone()));
    GenRequest {
        prompt: with_shots(shots, query(&item.question)),
        stop: GSM8K_COT_STOP.map(String::from).to_vec(),
        max_gen_tokens: GSM8K_MAX_GEN_TOKENS,
        target: item.target.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// 0-shot tasks scored on their validation split (the assets hold no train split to draw
// shots from, so these builders take none)

/// PIQA (`piqa.yaml`): `"Question: {goal}\nAnswer:"`, choices `sol1`, `sol2`; acc and
/// acc_norm.
pub fn piqa_request(item: &PiqaItem) -> McRequest {
    zero_shot(
        format!("Question: {}\nAnswer:", item.goal),
        item.solutions.clone(),
        item.label,
    )
}

/// WinoGrande (`winogrande/default.yaml`, `preprocess_winogrande.py`), scored by partial
/// evaluation (Trinh & Le 2018, as in the GPT-3 paper): with `i` the first `_`, choice k is
/// `sentence[..i] + option_k` (the harness's `doc_to_choice`), the shared continuation is
/// `" " + sentence[i + 1..].strip()` (`doc_to_target`), and the gold index comes from
/// `answer` (`doc_to_text`). Only the continuation's log-likelihood counts; acc alone.
pub fn winogrande_request(item: &WinograndeItem) -> McRequest {
    let blank = item.sentence.find('_').unwrap_or(item.sentence.len());
    let before = &item.sentence[..blank];
    let after = item.sentence.get(blank + 1..).unwrap_or_default();
    McRequest {
        context: String::new(),
        choices: item
            .options
            .iter()
            .map(|option| format!("{before}{option}"))
            .collect(),
        gold: item.answer,
        shared_continuation: Some(python_strip(after).to_string()),
    }
}

/// BoolQ (`super_glue/boolq/default.yaml`): `"{passage}\nQuestion: {question}?\nAnswer:"`,
/// choices `"no"`, `"yes"`; acc. The assets' passages lack SuperGLUE's `"{title} -- "`
/// prefix ([`BoolqItem`]).
pub fn boolq_request(item: &BoolqItem) -> McRequest {
    zero_shot(
        format!("{}\nQuestion: {}?\nAnswer:", item.passage, item.question),
        vec!["no".into(), "yes".into()],
        usize::from(item.answer),
    )
}

/// OpenBookQA (`openbookqa.yaml`): the bare `question_stem` as context, the answer texts
/// as choices; acc and acc_norm.
pub fn openbookqa_request(item: &OpenbookqaItem) -> McRequest {
    zero_shot(
        item.question_stem.clone(),
        item.choices.clone(),
        item.answer,
    )
}

/// SciQ (`sciq.yaml`): `"{support.lstrip()}\nQuestion: {question}\nAnswer:"` (an item
/// without support starts with the newline), choices the three distractors then the
/// correct answer, gold 3; acc and acc_norm.
pub fn sciq_request(item: &SciqItem) -> McRequest {
    let mut choices = item.distractors.clone();
    choices.push(item.correct_answer.clone());
    let gold = choices.len() - 1;
    zero_shot(
        format!(
            "{}\nQuestion: {}\nAnswer:",
            python_lstrip(&item.support),
            item.question
        ),
        choices,
        gold,
    )
}

/// COPA's choice as the harness joins it to the premise: first character lower-cased
/// (`choice[0].lower() + choice[1:]`).
fn copa_choice(choice: &str) -> String {
    let mut chars = choice.chars();
    match chars.next() {
        None => String::new(),
        Some(first) => first.to_lowercase().chain(chars).collect(),
    }
}

/// COPA (`super_glue/copa/utils.py`): the premise stripped, its last character (the full
/// stop) dropped, then `" because"` (cause) or `" therefore"` (effect); choices
/// `" " + choice` with the first letter lower-cased. The harness's choices carry that
/// leading space and the target delimiter adds another, so each continuation starts with
/// two spaces ("  water flowed from the spout."), as the harness scores them; acc.
pub fn copa_request(item: &CopaItem) -> McRequest {
    let premise = python_strip(&item.premise);
    let without_stop = premise
        .char_indices()
        .last()
        .map_or(premise, |(at, _)| &premise[..at]);
    let connector = match item.question {
        CopaQuestion::Cause => "because",
        CopaQuestion::Effect => "therefore",
    };
    zero_shot(
        format!("{without_stop} {connector}"),
        item.choices
            .iter()
            .map(|c| format!(" {}", copa_choice(c)))
            .collect(),
        item.label,
    )
}

/// CommonsenseQA (`commonsense_qa/default.yaml`):
/// `"Question: {question.strip()}\nA. {t0}\nB. {t1}\nC. {t2}\nD. {t3}\nE. {t4}\nAnswer:"`,
/// choices the letters `" A"` to `" E"`; acc.
pub fn commonsense_qa_request(item: &CommonsenseQaItem) -> McRequest {
    let mut context = format!("Question: {}", python_strip(&item.question));
    for (letter, choice) in COMMONSENSE_QA_LETTERS.iter().zip(&item.choices) {
        context.push_str(&format!("\n{letter}. {choice}"));
    }
    context.push_str("\nAnswer:");
    zero_shot(
        context,
        COMMONSENSE_QA_LETTERS.map(String::from).to_vec(),
        item.answer,
    )
}

/// Social IQa (`siqa/siqa.yaml`, task `social_iqa`): `"Q: {context} {question}\nA:"`,
/// choices `answerA`..`answerC`; acc.
pub fn social_iqa_request(item: &SocialIqaItem) -> McRequest {
    zero_shot(
        format!("Q: {} {}\nA:", item.context, item.question),
        item.answers.clone(),
        item.label,
    )
}

// ---------------------------------------------------------------------------------------------
// Context windows

/// Tokens kept from a sequence that had to fit a context window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fitted<'a, T> {
    /// The kept tokens: the end of the context (or prompt).
    pub tokens: &'a [T],
    /// How many tokens were cut from the left; count these items in the report.
    pub dropped: usize,
}

impl<T> Fitted<'_, T> {
    /// Whether anything was cut.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }
}

/// Fits `context + continuation` into `n_ctx` positions for scoring, as the harness does:
/// the input is `(context + continuation)[-(n_ctx + 1):][:-1]` (the last continuation token
/// is predicted, never fed), so the continuation stays whole and the context loses tokens
/// from the left. Returns the kept context; feed it, then the continuation minus its last
/// token.
///
/// An empty context is an error (the harness conditions on the prefix token instead; put
/// BOS first), and so is a continuation that leaves no room for one context token.
pub fn fit_loglikelihood<'a, T>(
    context: &'a [T],
    continuation: &[T],
    n_ctx: usize,
) -> Result<Fitted<'a, T>, PromptError> {
    if continuation.is_empty() {
        return Err(PromptError::EmptyContinuation);
    }
    if context.is_empty() {
        return Err(PromptError::EmptyContext);
    }
    if continuation.len() > n_ctx {
        return Err(PromptError::ContinuationTooLong {
            continuation: continuation.len(),
            n_ctx,
        });
    }
    // Context tokens that fit: n_ctx + 1 - continuation, at least one by the check above.
    let room = n_ctx + 1 - continuation.len();
    let dropped = context.len().saturating_sub(room);
    Ok(Fitted {
        tokens: &context[dropped..],
        dropped,
    })
}

/// Fits a generation prompt: the harness keeps the last `n_ctx - max_gen_tokens` prompt
/// tokens so that the whole generation fits the window.
pub fn fit_generation<T>(
    prompt: &[T],
    n_ctx: usize,
    max_gen_tokens: usize,
) -> Result<Fitted<'_, T>, PromptError> {
    let room = n_ctx
        .checked_sub(max_gen_tokens)
        .filter(|&room| room > 0)
        .ok_or(PromptError::NoRoomForPrompt {
            n_ctx,
            max_gen_tokens,
        })?;
    let dropped = prompt.len().saturating_sub(room);
    Ok(Fitted {
        tokens: &prompt[dropped..],
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{CopaQuestion, TaskItem};
    use std::path::PathBuf;

    fn assets() -> Option<PathBuf> {
        edgefusion_testkit::asset("tasks/MANIFEST.json", "--tasks")
            .map(|manifest| manifest.parent().unwrap().to_path_buf())
    }

    #[test]
    fn hellaswag_preprocess_cases() {
        assert_eq!(
            hellaswag_preprocess("  [header] How to x [title] Do y. [step] Then z.  "),
            // Stripped before the markers go, so the space after "[header]" stays.
            " How to x. Do y. Then z."
        );
        assert_eq!(hellaswag_preprocess("a   b"), "a  b");
        assert_eq!(hellaswag_preprocess("a [x\ny] b"), "a [x\ny] b");
        assert_eq!(hellaswag_preprocess("[a] [b]c"), " c");
        assert_eq!(python_capitalize("the LADY"), "The lady");
        assert_eq!(python_capitalize(""), "");
        assert_eq!(python_capitalize("éCOLE"), "École");
    }

    /// A hand-written item with the WikiHow markers, so the snapshot always runs.
    #[test]
    fn hellaswag_snapshot_handwritten() {
        let item = HellaswagItem {
            activity_label: "Home and Garden".into(),
            ctx_a: "[header] How to water a plant [title] Fill a can.".into(),
            ctx_b: "then, Tom".into(),
            endings: vec![
                "pours it [step] slowly.".into(),
                " waters  the floor.".into(),
                "eats it.".into(),
                "sings.".into(),
            ],
            label: 0,
        };
        let request = hellaswag_request(&item, &[]);
        assert_eq!(
            request.context,
            "Home and Garden: How to water a plant. Fill a can. Then, tom"
        );
        assert_eq!(
            request.continuations(),
            [
                " pours it slowly.",
                " waters the floor.",
                " eats it.",
                " sings."
            ]
        );
        assert_eq!(request.choices[1], "waters the floor.");
        assert_eq!(request.gold, 0);
    }

    /// Prompts of real items as `tests/fixtures/make_prompt_snapshots.py` builds them in
    /// Python, with Python's own string functions (the ones the harness calls).
    fn snapshot(key: &str) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/prompt_snapshots.json")).unwrap();
        all[key].clone()
    }

    fn assert_mc_snapshot(request: &McRequest, key: &str) {
        let expected = snapshot(key);
        assert!(expected.is_object(), "no snapshot {key}");
        match expected.get("contexts") {
            // Multiple input: one context per choice, as the harness's request pairs.
            Some(contexts) => {
                let contexts: Vec<String> = contexts
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().to_string())
                    .collect();
                let ours: Vec<String> = request.pairs().into_iter().map(|(c, _)| c).collect();
                assert_eq!(ours, contexts, "{key}");
            }
            None => assert_eq!(
                request.context,
                expected["context"].as_str().unwrap(),
                "{key}"
            ),
        }
        let continuations: Vec<&str> = expected["continuations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(request.continuations(), continuations, "{key}");
        assert_eq!(
            request.gold as u64,
            expected["gold"].as_u64().unwrap(),
            "{key}"
        );
    }

    #[test]
    fn hellaswag_snapshot_first_real_item() {
        let Some(dir) = assets() else { return };
        let items = HellaswagItem::read(dir.join("hellaswag_validation.jsonl")).unwrap();
        let request = hellaswag_request(&items[0], &[]);
        assert_eq!(
            request.context,
            "Roof shingle removal: A man is sitting on a roof. He"
        );
        assert_mc_snapshot(&request, "hellaswag_validation:0");
        // A WikiHow item with [header], [title], [step] and [substeps] markers; note the
        // harness leaves two spaces where a leading "[substeps] " is removed.
        assert_mc_snapshot(
            &hellaswag_request(&items[3243], &[]),
            "hellaswag_validation:3243",
        );
    }

    #[test]
    fn arc_snapshot_handwritten() {
        let item = ArcItem {
            id: None,
            question: "Which gas do plants take in?".into(),
            choices: vec!["oxygen".into(), "carbon dioxide".into(), "helium".into()],
            answer: 1,
        };
        let request = arc_request(&item, &[]);
        assert_eq!(
            request.context,
            "Question: Which gas do plants take in?\nAnswer:"
        );
        assert_eq!(
            request.continuations(),
            [" oxygen", " carbon dioxide", " helium"]
        );
        let shot = ArcItem {
            id: None,
            question: "What is 1 + 1?".into(),
            choices: vec!["1".into(), "2".into()],
            answer: 1,
        };
        assert_eq!(
            arc_request(&item, &[shot]).context,
            "Question: What is 1 + 1?\nAnswer: 2\n\nQuestion: Which gas do plants take in?\nAnswer:"
        );
    }

    #[test]
    fn arc_snapshot_first_real_item() {
        let Some(dir) = assets() else { return };
        let items = ArcItem::read(dir.join("arc_challenge_test.jsonl")).unwrap();
        let request = arc_request(&items[0], &[]);
        assert_eq!(
            request.context,
            "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:"
        );
        assert_mc_snapshot(&request, "arc_challenge_test:0");
    }

    fn mmlu_item(question: &str, subject: &str, answer: usize) -> MmluItem {
        MmluItem {
            question: question.into(),
            subject: subject.into(),
            choices: vec!["w".into(), "x".into(), "y".into(), "z".into()],
            answer,
        }
    }

    #[test]
    fn mmlu_snapshot_handwritten() {
        let dev = MmluDev::new(vec![
            mmlu_item(" Shot one? ", "high_school_physics", 0),
            mmlu_item("Other subject?", "anatomy", 1),
            mmlu_item("Shot two?", "high_school_physics", 3),
        ]);
        let item = mmlu_item("The query?\n", "high_school_physics", 2);
        let shots = dev.shots("high_school_physics", 2).unwrap();
        let request = mmlu_request(&item, shots);
        assert_eq!(
            request.context,
            "The following are multiple choice questions (with answers) about high school physics.\n\n\
             Shot one?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n\
             Shot two?\nA. w\nB. x\nC. y\nD. z\nAnswer: D\n\n\
             The query?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        );
        assert_eq!(request.continuations(), [" A", " B", " C", " D"]);
        assert_eq!(request.gold, 2);
        assert_eq!(
            mmlu_request(&item, dev.shots("high_school_physics", 0).unwrap()).context,
            "The following are multiple choice questions (with answers) about high school physics.\n\n\
             The query?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        );
        assert_eq!(
            dev.shots("high_school_physics", 3).unwrap_err().to_string(),
            "mmlu: subject 'high_school_physics' has 2 dev examples, 3 shots requested"
        );
        assert!(matches!(
            dev.shots("virology", 5),
            Err(PromptError::UnknownSubject { .. })
        ));
        assert_eq!(
            dev.subjects().collect::<Vec<_>>(),
            ["anatomy", "high_school_physics"]
        );
    }

    #[test]
    fn mmlu_snapshot_first_real_item() {
        let Some(dir) = assets() else { return };
        let dev = MmluDev::new(MmluItem::read(dir.join("mmlu_dev.jsonl")).unwrap());
        let test = MmluItem::read(dir.join("mmlu_test.jsonl")).unwrap();
        assert_eq!(dev.subjects().count(), 57);
        let request = mmlu_request(&test[0], dev.shots(&test[0].subject, 5).unwrap());
        assert_mc_snapshot(&request, "mmlu_test:0");
        for item in &test {
            dev.shots(&item.subject, 5).unwrap();
        }
    }

    #[test]
    fn gsm8k_snapshot_handwritten() {
        let item = Gsm8kItem {
            question: "Tom has 3 apples and buys 2. How many?".into(),
            solution: "3 + 2 = 5\n#### 5".into(),
            target: "5".into(),
        };
        let shots = [Gsm8kShot {
            question: "What is 1 + 1?".into(),
            cot: "1 + 1 = 2. The answer is 2.".into(),
        }];
        let request = gsm8k_cot_request(&item, &shots);
        assert_eq!(
            request.prompt,
            "Q: What is 1 + 1?\nA: 1 + 1 = 2. The answer is 2.\n\nQ: Tom has 3 apples and buys 2. How many?\nA:"
        );
        assert_eq!(request.stop, ["Q:", "</s>", "<|im_end|>"]);
        assert_eq!(request.max_gen_tokens, 256);
        assert_eq!(request.target, "5");

        let full = gsm8k_cot_request(&item, &gsm8k_cot_shots());
        assert_eq!(full.prompt.matches("\nA: ").count(), 8);
        assert!(full
            .prompt
            .starts_with("Q: There are 15 trees in the grove."));
        assert!(full
            .prompt
            .ends_with("The answer is 8.\n\nQ: Tom has 3 apples and buys 2. How many?\nA:"));
    }

    #[test]
    fn gsm8k_snapshot_first_real_item() {
        let Some(dir) = assets() else { return };
        let test = Gsm8kItem::read(dir.join("gsm8k_test.jsonl")).unwrap();
        let request = gsm8k_cot_request(&test[0], &gsm8k_cot_shots());
        let expected = snapshot("gsm8k_test:0");
        assert_eq!(request.prompt, expected["prompt"].as_str().unwrap());
        assert_eq!(
            request.stop,
            expected["stop"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect::<Vec<_>>()
        );
        assert_eq!(request.target, "18");
        // The assets' exemplars are the harness's but for "So the answer is".
        let file_shots = Gsm8kShot::read(dir.join("gsm8k_fewshot.jsonl")).unwrap();
        for (file, harness) in file_shots.iter().zip(gsm8k_cot_shots()) {
            assert_eq!(file.question, harness.question);
            assert_eq!(
                file.cot.replace("So the answer is", "The answer is"),
                harness.cot
            );
        }
    }

    /// The first item of `file`, read from the assets (`None`: skipped, assets absent).
    fn first_item<T: TaskItem>(file: &str) -> Option<T> {
        let dir = assets()?;
        Some(T::read(dir.join(file)).unwrap().swap_remove(0))
    }

    #[test]
    fn arc_easy_snapshot_first_real_item() {
        let Some(item) = first_item::<ArcItem>("arc_easy_test.jsonl") else {
            return;
        };
        let request = arc_request(&item, &[]);
        assert_eq!(
            request.context,
            "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
        );
        assert_eq!(
            request.continuations(),
            [
                " Sunlight is the source of energy for nearly all ecosystems.",
                " Most ecosystems are found on land instead of in water.",
                " Carbon dioxide is more available than other gases.",
                " The producers in all ecosystems are plants."
            ]
        );
        assert_eq!(request.gold, 0);
        assert_mc_snapshot(&request, "arc_easy_test:0");
    }

    #[test]
    fn piqa_snapshot() {
        let item = PiqaItem {
            goal: "Keep bread fresh".into(),
            solutions: vec!["Seal it in a bag.".into(), "Leave it in the sun.".into()],
            label: 0,
        };
        let request = piqa_request(&item);
        assert_eq!(request.context, "Question: Keep bread fresh\nAnswer:");
        assert_eq!(
            request.continuations(),
            [" Seal it in a bag.", " Leave it in the sun."]
        );

        let Some(item) = first_item::<PiqaItem>("piqa_validation.jsonl") else {
            return;
        };
        let request = piqa_request(&item);
        assert_eq!(
            request.context,
            "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
        );
        assert_eq!(
            request.continuations(),
            [
                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.",
                " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish."
            ]
        );
        assert_eq!(request.gold, 0);
        assert_mc_snapshot(&request, "piqa_validation:0");
    }

    #[test]
    fn winogrande_scores_the_shared_rest_after_each_option() {
        let item = WinograndeItem {
            sentence: "The cup fell off the table because _ was  wobbly. ".into(),
            options: vec!["the cup".into(), "the table".into()],
            answer: 1,
        };
        let request = winogrande_request(&item);
        assert!(request.is_multiple_input());
        assert_eq!(
            request.pairs(),
            [
                (
                    "The cup fell off the table because the cup".to_string(),
                    " was  wobbly.".to_string()
                ),
                (
                    "The cup fell off the table because the table".to_string(),
                    " was  wobbly.".to_string()
                )
            ]
        );
        // The harness's doc_to_choice: what acc_norm would divide by.
        assert_eq!(
            request.choices[0],
            "The cup fell off the table because the cup"
        );
        assert_eq!(request.gold, 1);
        // A blank at the very start, a second underscore after it.
        let item = WinograndeItem {
            sentence: "_ saw _x".into(),
            options: vec!["A".into(), "B".into()],
            answer: 0,
        };
        assert_eq!(
            winogrande_request(&item).pairs()[1],
            ("B".to_string(), " saw _x".to_string())
        );

        let Some(item) = first_item::<WinograndeItem>("winogrande_xl_validation.jsonl") else {
            return;
        };
        let request = winogrande_request(&item);
        assert_eq!(
            request.pairs(),
            [
                (
                    "Sarah was a much better surgeon than Maria so Sarah".to_string(),
                    " always got the easier cases.".to_string()
                ),
                (
                    "Sarah was a much better surgeon than Maria so Maria".to_string(),
                    " always got the easier cases.".to_string()
                )
            ]
        );
        assert_eq!(request.gold, 1);
        assert_mc_snapshot(&request, "winogrande_xl_validation:0");
    }

    #[test]
    fn boolq_snapshot() {
        let item = BoolqItem {
            passage: "Cats purr.".into(),
            question: "do cats purr".into(),
            answer: true,
        };
        let request = boolq_request(&item);
        assert_eq!(
            request.context,
            "Cats purr.\nQuestion: do cats purr?\nAnswer:"
        );
        assert_eq!(request.continuations(), [" no", " yes"]);
        assert_eq!(request.gold, 1);

        let Some(item) = first_item::<BoolqItem>("boolq_validation.jsonl") else {
            return;
        };
        let request = boolq_request(&item);
        // The assets' passage has no "Ethanol fuel -- " title (see BoolqItem).
        assert!(request
            .context
            .starts_with("All biomass goes through at least some of these steps: it needs to be grown, collected, dried, fermented, distilled, and burned."));
        assert!(request.context.ends_with(
            "concluded that producing ethanol from corn uses much less petroleum than producing gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
        ));
        assert_eq!(request.context.chars().count(), 1368 + 68);
        assert_eq!(request.continuations(), [" no", " yes"]);
        assert_eq!(request.gold, 0);
        assert_mc_snapshot(&request, "boolq_validation:0");
    }

    #[test]
    fn openbookqa_snapshot_first_real_item() {
        let Some(item) = first_item::<OpenbookqaItem>("openbookqa_validation.jsonl") else {
            return;
        };
        let request = openbookqa_request(&item);
        assert_eq!(
            request.context,
            "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as"
        );
        assert_eq!(
            request.continuations(),
            [
                " Deep sea animals",
                " fish",
                " Long Sea Fish",
                " Far Sea Animals"
            ]
        );
        assert_eq!(request.gold, 0);
        assert_mc_snapshot(&request, "openbookqa_validation:0");
    }

    #[test]
    fn sciq_snapshot() {
        let item = SciqItem {
            question: "What do plants make?".into(),
            support: " \n Plants make sugar.".into(),
            distractors: vec!["rocks".into(), "salt".into(), "iron".into()],
            correct_answer: "sugar".into(),
        };
        let request = sciq_request(&item);
        assert_eq!(
            request.context,
            "Plants make sugar.\nQuestion: What do plants make?\nAnswer:"
        );
        assert_eq!(
            request.continuations(),
            [" rocks", " salt", " iron", " sugar"]
        );
        assert_eq!(request.gold, 3);

        let Some(dir) = assets() else { return };
        let items = SciqItem::read(dir.join("sciq_validation.jsonl")).unwrap();
        let request = sciq_request(&items[0]);
        // No support: the context starts with the template's newline.
        assert_eq!(
            request.context,
            "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
        );
        assert_eq!(
            request.continuations(),
            [" Linnaeus", " shaw", " Scopes", " darwin"]
        );
        assert_eq!(request.gold, 3);
        assert_mc_snapshot(&request, "sciq_validation:0");
        assert_mc_snapshot(&sciq_request(&items[2]), "sciq_validation:2");
    }

    #[test]
    fn copa_snapshot() {
        let item = CopaItem {
            premise: " The ice melted. ".into(),
            choices: vec!["It was warm.".into(), "Émile froze it.".into()],
            question: CopaQuestion::Cause,
            label: 0,
        };
        let request = copa_request(&item);
        assert_eq!(request.context, "The ice melted because");
        assert_eq!(
            request.continuations(),
            ["  it was warm.", "  émile froze it."]
        );

        let Some(item) = first_item::<CopaItem>("copa_validation.jsonl") else {
            return;
        };
        let request = copa_request(&item);
        assert_eq!(request.context, "The man turned on the faucet therefore");
        assert_eq!(
            request.continuations(),
            [
                "  the toilet filled with water.",
                "  water flowed from the spout."
            ]
        );
        assert_eq!(request.gold, 1);
        assert_mc_snapshot(&request, "copa_validation:0");
    }

    #[test]
    fn commonsense_qa_snapshot_first_real_item() {
        let Some(item) = first_item::<CommonsenseQaItem>("commonsense_qa_validation.jsonl") else {
            return;
        };
        let request = commonsense_qa_request(&item);
        assert_eq!(
            request.context,
            "Question: A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?\n\
             A. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:"
        );
        assert_eq!(request.continuations(), [" A", " B", " C", " D", " E"]);
        assert_eq!(request.gold, 0);
        assert_mc_snapshot(&request, "commonsense_qa_validation:0");
    }

    #[test]
    fn social_iqa_snapshot_first_real_item() {
        let Some(item) = first_item::<SocialIqaItem>("social_i_qa_validation.jsonl") else {
            return;
        };
        let request = social_iqa_request(&item);
        assert_eq!(
            request.context,
            "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\nA:"
        );
        assert_eq!(
            request.continuations(),
            [
                " make a new plan",
                " Go home and see Riley",
                " Find somewhere to go"
            ]
        );
        assert_eq!(request.gold, 2);
        assert_mc_snapshot(&request, "social_i_qa_validation:0");
    }

    /// Every item of every new task's file builds a request whose pairs the harness would
    /// score: non-empty contexts and continuations, gold in range.
    #[test]
    fn every_real_item_builds() {
        let Some(dir) = assets() else { return };
        fn check<T: TaskItem>(dir: &std::path::Path, file: &str, build: fn(&T) -> McRequest) {
            for (i, item) in T::read(dir.join(file)).unwrap().iter().enumerate() {
                let request = build(item);
                assert!(request.gold < request.choices.len(), "{file} item {i}");
                for (context, continuation) in request.pairs() {
                    assert!(!context.is_empty(), "{file} item {i}");
                    assert!(!continuation.trim().is_empty(), "{file} item {i}");
                }
            }
        }
        check::<ArcItem>(&dir, "arc_easy_test.jsonl", |i| arc_request(i, &[]));
        check(&dir, "piqa_validation.jsonl", piqa_request);
        check(&dir, "winogrande_xl_validation.jsonl", winogrande_request);
        check(&dir, "boolq_validation.jsonl", boolq_request);
        check(&dir, "openbookqa_validation.jsonl", openbookqa_request);
        check(&dir, "sciq_validation.jsonl", sciq_request);
        check(&dir, "copa_validation.jsonl", copa_request);
        check(
            &dir,
            "commonsense_qa_validation.jsonl",
            commonsense_qa_request,
        );
        check(&dir, "social_i_qa_validation.jsonl", social_iqa_request);
    }

    #[test]
    fn stops_cut_at_the_earliest() {
        let request = GenRequest {
            prompt: String::new(),
            stop: GSM8K_COT_STOP.map(String::from).to_vec(),
            max_gen_tokens: 8,
            target: "1".into(),
        };
        assert_eq!(
            request.cut(" 2 + 2 = 4. The answer is 4.\n\nQ: next"),
            " 2 + 2 = 4. The answer is 4.\n\n"
        );
        assert_eq!(request.cut("a</s>b Q: c"), "a");
        assert_eq!(request.cut("no stop"), "no stop");
        assert_eq!(request.find_stop("xx<|im_end|>"), Some(2));
        assert_eq!(find_stop("abc", &["", "c"]), Some(2));
        assert_eq!(find_stop::<&str>("abc", &[]), None);
    }

    #[test]
    fn trailing_whitespace_moves_to_the_continuation() {
        assert_eq!(
            split_trailing_whitespace("Answer: \n", "A"),
            ("Answer:".to_string(), " \nA".to_string())
        );
        assert_eq!(
            split_trailing_whitespace("Answer:", " A"),
            ("Answer:".to_string(), " A".to_string())
        );
    }

    #[test]
    fn loglikelihood_window_keeps_the_continuation_whole() {
        let context: Vec<u32> = (0..10).collect();
        let continuation = [100, 101, 102];
        // Fits: 10 + 3 - 1 = 12 fed tokens <= 12.
        let fitted = fit_loglikelihood(&context, &continuation, 12).unwrap();
        assert_eq!(
            (fitted.tokens.len(), fitted.dropped, fitted.truncated()),
            (10, 0, false)
        );
        // One over: the harness keeps (ctx + cont)[-(8 + 1):] = ctx[4..] + cont.
        let fitted = fit_loglikelihood(&context, &continuation, 8).unwrap();
        assert_eq!(fitted.tokens, &context[4..]);
        assert_eq!(fitted.dropped, 4);
        assert!(fitted.truncated());
        // Smallest window that scores the whole continuation: one context token.
        let fitted = fit_loglikelihood(&context, &continuation, 3).unwrap();
        assert_eq!(fitted.tokens, &[9]);
        assert_eq!(
            fit_loglikelihood(&context, &continuation, 2),
            Err(PromptError::ContinuationTooLong {
                continuation: 3,
                n_ctx: 2
            })
        );
        assert_eq!(
            fit_loglikelihood(&context, &[] as &[u32], 8),
            Err(PromptError::EmptyContinuation)
        );
        assert_eq!(
            fit_loglikelihood(&[] as &[u32], &continuation, 8),
            Err(PromptError::EmptyContext)
        );
    }

    #[test]
    fn generation_window_reserves_room_to_generate() {
        let prompt: Vec<u32> = (0..10).collect();
        let fitted = fit_generation(&prompt, 300, 256).unwrap();
        assert!(!fitted.truncated());
        let fitted = fit_generation(&prompt, 262, 256).unwrap();
        assert_eq!(fitted.tokens, &prompt[4..]);
        assert_eq!(fitted.dropped, 4);
        assert_eq!(
            fit_generation(&prompt, 256, 256),
            Err(PromptError::NoRoomForPrompt {
                n_ctx: 256,
                max_gen_tokens: 256
            })
        );
    }

    mod windows {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the sizes, a fitted input never exceeds the window, keeps the end of
            /// the context, and matches the harness's slice.
            #[test]
            fn loglikelihood_matches_harness_slice(n_context in 1usize..50, n_cont in 1usize..20, n_ctx in 1usize..60) {
                let context: Vec<usize> = (0..n_context).collect();
                let continuation: Vec<usize> = (1000..1000 + n_cont).collect();
                match fit_loglikelihood(&context, &continuation, n_ctx) {
                    Ok(fitted) => {
                        let mut fed = fitted.tokens.to_vec();
                        fed.extend_from_slice(&continuation[..n_cont - 1]);
                        let whole: Vec<usize> = context.iter().chain(&continuation).copied().collect();
                        let start = whole.len().saturating_sub(n_ctx + 1);
                        let harness = &whole[start..whole.len() - 1];
                        prop_assert_eq!(&fed[..], harness);
                        prop_assert!(fed.len() <= n_ctx);
                        prop_assert!(!fitted.tokens.is_empty());
                        prop_assert_eq!(fitted.dropped + fitted.tokens.len(), n_context);
                    }
                    Err(_) => prop_assert!(n_cont > n_ctx),
                }
            }
        }
    }
}
