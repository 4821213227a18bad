//! The 0-shot multiple-choice tasks end to end on the tiny fixture model: tiny task files
//! in the assets' layout go through the runner, which must report the harness's metrics for
//! each task and score each choice on the pair the prompt builder made (WinoGrande: the
//! shared rest of the sentence after each option's own context).

use std::path::Path;

use edgefusion_eval::cache::RunHash;
use edgefusion_eval::lm::LanguageModel;
use edgefusion_eval::runner::{run_task, RunSettings, Sample};
use edgefusion_eval::Task;
use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::tokenizer::Tokenizer;
use edgefusion_testkit::fixture;

/// Two or three items per task, in the field layout of the assets' files.
const FILES: [(&str, &str); 9] = [
    (
        "arc_easy_test.jsonl",
        r#"{"id": "a", "question": "Which one is hot?", "choices": {"text": ["ice", "fire", "snow"], "label": ["A", "B", "C"]}, "answerKey": "B"}
{"id": "b", "question": "Which one is wet?", "choices": {"text": ["water", "sand"], "label": ["1", "2"]}, "answerKey": "1"}"#,
    ),
    (
        "piqa_validation.jsonl",
        r#"{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}
{"goal": "Dry a towel", "sol1": "Soak it.", "sol2": "Hang it in the sun.", "label": 1}"#,
    ),
    (
        "winogrande_xl_validation.jsonl",
        r#"{"sentence": "The cat chased the dog because _ was angry.", "option1": "the cat", "option2": "the dog", "answer": "1"}
{"sentence": "Anna gave Maria a gift since _ had a birthday.", "option1": "Anna", "option2": "Maria", "answer": "2"}
{"sentence": "_ is red.", "option1": "The sun", "option2": "The sea", "answer": "1"}"#,
    ),
    (
        "boolq_validation.jsonl",
        r#"{"question": "is the sky blue", "answer": true, "passage": "The sky is blue on a clear day."}
{"question": "is ice hot", "answer": false, "passage": "Ice is frozen water."}"#,
    ),
    (
        "openbookqa_validation.jsonl",
        r#"{"id": "1-1", "question_stem": "The sun is a", "choices": {"text": ["star", "moon", "rock", "tree"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"}
{"id": "1-2", "question_stem": "Fish live in", "choices": {"text": ["trees", "water", "fire", "air"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"}"#,
    ),
    (
        "sciq_validation.jsonl",
        r#"{"question": "What do bees make?", "distractor3": "milk", "distractor1": "silk", "distractor2": "wax paper", "correct_answer": "honey", "support": ""}
{"question": "What gas do we breathe in?", "distractor3": "helium", "distractor1": "neon", "distractor2": "argon", "correct_answer": "oxygen", "support": " We breathe in oxygen."}"#,
    ),
    (
        "copa_validation.jsonl",
        r#"{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.", "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1}
{"premise": "The girl was hungry.", "choice1": "She ate lunch.", "choice2": "She slept.", "question": "cause", "idx": 1, "label": 0}"#,
    ),
    (
        "commonsense_qa_validation.jsonl",
        r#"{"id": "x", "question": "Where do you keep milk?", "question_concept": "milk", "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["fridge", "oven", "car", "roof", "shoe"]}, "answerKey": "A"}
{"id": "y", "question": "What do you read?", "question_concept": "read", "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["a spoon", "a book", "a cup", "a rug", "a lamp"]}, "answerKey": "B"}"#,
    ),
    (
        "social_i_qa_validation.jsonl",
        r#"{"context": "Sam lost his keys.", "question": "How would Sam feel?", "answerA": "upset", "answerB": "sleepy", "answerC": "tall", "label": "1"}
{"context": "Kim won the race.", "question": "What will Kim want to do next?", "answerA": "cry", "answerB": "quit", "answerC": "celebrate", "label": "3"}"#,
    ),
];

fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (file, text) in FILES {
        std::fs::write(dir.join(file), format!("{text}\n")).unwrap();
    }
}

#[test]
fn zero_shot_tasks_report_the_harness_metrics_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    write_tasks(dir.path());
    let source = ModelSource::open(fixture("tiny-llama-f32.gguf")).unwrap();
    let model = Model::load(&source).unwrap();
    let ModelSource::Gguf(gguf) = &source else {
        unreachable!("fixtures are GGUF files")
    };
    let tokenizer = Tokenizer::from_gguf(gguf).unwrap();
    let mut lm = LanguageModel::new(&model, &tokenizer, 256, 1).unwrap();
    let mut fresh = LanguageModel::new(&model, &tokenizer, 256, 1).unwrap();
    let mut settings = RunSettings {
        tasks_dir: dir.path().to_path_buf(),
        limit: None,
        shots: None,
        max_gen_tokens: None,
        passkey_ctx: 0,
    };
    let tasks = [
        (Task::ArcEasy, 2, true),
        (Task::Piqa, 2, true),
        (Task::Winogrande, 3, false),
        (Task::Boolq, 2, false),
        (Task::Openbookqa, 2, true),
        (Task::Sciq, 2, true),
        (Task::Copa, 2, false),
        (Task::CommonsenseQa, 2, false),
        (Task::SocialIqa, 2, false),
    ];
    for (task, items, with_norm) in tasks {
        let run = RunHash::new(&[("task", task.name().to_string())]);
        let mut samples: Vec<Sample> = Vec::new();
        let report = run_task(&mut lm, task, &settings, None, run, &mut |_, _, s| {
            samples.push(s.clone())
        })
        .unwrap();
        assert_eq!((report.items, report.items_total), (items, items), "{task}");
        assert_eq!(report.shots, 0, "{task}");
        let names: Vec<&str> = report.metrics.iter().map(|m| m.name.as_str()).collect();
        let want: &[&str] = if with_norm {
            &["acc", "acc_norm"]
        } else {
            &["acc"]
        };
        assert_eq!(names, want, "{task}");
        assert_eq!(report.metrics[0].value.n, items);
        assert_eq!(samples.len(), items);
        for sample in &samples {
            assert!(sample.logliks.iter().all(|ll| ll.is_finite() && *ll < 0.0));
            // Each choice's score is that of its (context, continuation) pair alone, so
            // the prefix reuse between pairs and items changed nothing.
            let contexts = if task == Task::Winogrande {
                sample.contexts.clone()
            } else {
                assert!(sample.contexts.is_empty(), "{task}");
                vec![sample.context.clone(); sample.continuations.len()]
            };
            assert_eq!(contexts.len(), sample.continuations.len(), "{task}");
            for ((context, continuation), got) in contexts
                .iter()
                .zip(&sample.continuations)
                .zip(&sample.logliks)
            {
                let want = fresh
                    .score(context, std::slice::from_ref(continuation))
                    .unwrap()
                    .choices[0]
                    .loglik;
                assert!((got - want).abs() < 1e-4, "{task}: {got} vs {want}");
            }
        }
        if task == Task::Winogrande {
            // Partial scoring: one continuation, the rest of the sentence, for every option.
            let first = &samples[0];
            assert_eq!(first.context, "");
            assert_eq!(
                first.contexts,
                [
                    "The cat chased the dog because the cat",
                    "The cat chased the dog because the dog"
                ]
            );
            assert_eq!(first.continuations, [" was angry.", " was angry."]);
            assert_eq!(samples[2].contexts, ["The sun", "The sea"]);
            assert_eq!(samples[2].continuations, [" is red.", " is red."]);
        }
        if task == Task::Copa {
            assert_eq!(
                samples[1].continuations,
                ["  she ate lunch.", "  she slept."]
            );
            assert_eq!(samples[1].context, "The girl was hungry because");
        }
    }

    // --limit scores the first items only; shots need a pool the assets do not hold.
    settings.limit = Some(1);
    let run = RunHash::new(&[("task", "boolq".to_string())]);
    let report = run_task(
        &mut lm,
        Task::Boolq,
        &settings,
        None,
        run,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!((report.items, report.items_total), (1, 2));
    assert!(report.limited);
    settings.shots = Some(1);
    let message = run_task(&mut lm, Task::Copa, &settings, None, run, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "copa: 1 shots asked, but the assets hold no split to draw copa examples from; use --shots 0"
    );
}
