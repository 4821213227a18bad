//! The server end to end: started in-process on an ephemeral port with the tiny fixture
//! model, driven over HTTP.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefusion_io::ModelSource;
use edgefusion_model::Model;
use edgefusion_runtime::chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
use edgefusion_runtime::sampler::argmax;
use edgefusion_runtime::{Logits, Session, SessionOptions};
use edgefusion_serve::scheduler::{load_tokenizer, Event, GenParams, Job};
use edgefusion_serve::{serve_on, Engine, ServeConfig};
use edgefusion_testkit::fixture;
use serde_json::{json, Value};
use tokio::sync::oneshot;

const MODEL: &str = "tiny-llama-f32.gguf";
const PROMPT: &str = "The old teacher said good morning to";

struct TestServer {
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    async fn start(configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        Self::start_model(MODEL, configure).await
    }

    async fn start_model(model: &str, configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        let mut cfg = ServeConfig::new(fixture(model));
        configure(&mut cfg);
        let engine = Arc::new(Engine::start(cfg).expect("engine starts"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_on(engine, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// The `data:` payloads of a streamed request, `[DONE]` included.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = response.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    async fn metric(&self, name: &str) -> u64 {
        self.metric_f64(name).await as u64
    }

    async fn metric_f64(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
            .parse()
            .unwrap()
    }

    async fn wait_for_metric(&self, name: &str, want: u64) {
        let start = Instant::now();
        while self.metric(name).await != want {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} never reached {want}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }
}

/// Greedy decode with a plain runtime session, as `edgefusion run --temp 0` does: the text
/// and the number of tokens.
fn direct_greedy(prompt: &str, max_tokens: usize) -> (String, usize) {
    direct_greedy_of(MODEL, 64, prompt, max_tokens)
}

/// [`direct_greedy`] of another fixture model with a context of `n_ctx`.
fn direct_greedy_of(model: &str, n_ctx: usize, prompt: &str, max_tokens: usize) -> (String, usize) {
    let source = ModelSource::open(fixture(model)).unwrap();
    let model = Model::load(&source).unwrap();
    let tokenizer = load_tokenizer(&source).unwrap();
    let mut session = Session::new(&model, SessionOptions::new(n_ctx, 1)).unwrap();
    let ids = tokenizer.encode(prompt, true).unwrap();
    let mut logits = session.forward(&ids, Logits::Last).unwrap().to_vec();
    let mut streamer = tokenizer.streamer();
    let (mut text, mut n) = (String::new(), 0);
    while n < max_tokens.min(n_ctx - ids.len()) {
        let next = argmax(&logits);
        if tokenizer.is_eos(next) {
            break;
        }
        n += 1;
        if let Some(piece) = streamer.push(next).unwrap() {
            text.push_str(&piece);
        }
        logits = session.forward(&[next], Logits::Last).unwrap().to_vec();
    }
    if let Some(rest) = streamer.finish() {
        text.push_str(&rest);
    }
    (text, n)
}

fn greedy(max_tokens: usize) -> Value {
    json!({"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": max_tokens})
}

/// The text of a streamed completion, checking the chunks' shape and the final `[DONE]`.
fn assemble(events: &[String], chat: bool) -> (String, String) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        if chat {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        } else {
            assert_eq!(chunk["object"], "text_completion");
            text.push_str(choice["text"].as_str().unwrap());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (text, finish)
}

fn assert_openai_error(body: &Value, param: Option<&str>) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("code").is_some(), "{body}");
    match param {
        Some(p) => assert_eq!(error["param"], p, "{body}"),
        None => assert!(error.get("param").is_some(), "{body}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_models_metrics_and_tokenizer() {
    let server = TestServer::start(|_| {}).await;
    let health = server.get("/health").await;
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    // The chat page (its behaviour is tested in a browser: scripts/chat-page-test.py).
    let page = server.get("/").await;
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<title>EdgeFusion chat</title>") && html.contains("/v1/chat/completions")
    );
    let models: Value = server.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-llama-f32");
    assert_eq!(models["data"][0]["object"], "model");

    let (status, tokens) = server.post("/tokenize", &json!({"content": PROMPT})).await;
    assert_eq!(status, 200);
    let (status, text) = server
        .post("/detokenize", &json!({"tokens": tokens["tokens"]}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(text["content"], PROMPT);
    let (status, body) = server
        .post("/detokenize", &json!({"tokens": [1_000_000]}))
        .await;
    assert_eq!(status, 400);
    assert_openai_error(&body, Some("tokens"));

    let metrics = server.get("/metrics").await;
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    for name in [
        "edgefusion_requests_total",
        "edgefusion_tokens_generated_total",
        "edgefusion_queue_depth",
        "edgefusion_active_slots",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_equals_a_direct_session_and_the_stream() {
    let server = TestServer::start(|_| {}).await;
    let (want, n) = direct_greedy(PROMPT, 20);
    assert!(n > 0 && !want.is_empty());
    let (status, body) = server.post("/v1/completions", &greedy(20)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["choices"][0]["text"], want.as_str());
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(body["usage"]["completion_tokens"], n as u64);
    assert_eq!(body["usage"]["total_tokens"], prompt_tokens + n as u64);
    let finish = if n == 20 { "length" } else { "stop" };
    assert_eq!(body["choices"][0]["finish_reason"], finish);

    let mut request = greedy(20);
    request["stream"] = json!(true);
    let events = server.stream("/v1/completions", &request).await;
    assert_eq!(assemble(&events, false), (want.clone(), finish.to_string()));
    assert!(server.metric("edgefusion_tokens_generated_total").await >= 2 * n as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_and_stop_strings_end_generation() {
    let server = TestServer::start(|_| {}).await;
    let (status, body) = server.post("/v1/completions", &greedy(5)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["choices"][0]["text"],
        direct_greedy(PROMPT, 5).0.as_str()
    );

    // A stop string cut from the middle of the greedy text: the answer ends just before it.
    let (full, _) = direct_greedy(PROMPT, 30);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "greedy text too short: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let before = &full[..full.find(&stop).unwrap()];
    let mut request = greedy(30);
    request["stop"] = json!(["never appears ~~~", stop]);
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], before, "stop {stop:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    request["stream"] = json!(true);
    let events = server.stream("/v1/completions", &request).await;
    assert_eq!(
        assemble(&events, false),
        (before.to_string(), "stop".into())
    );
    // A single string works too.
    request["stop"] = json!(stop);
    request["stream"] = json!(false);
    let (_, body) = server.post("/v1/completions", &request).await;
    assert_eq!(body["choices"][0]["text"], before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_whole_and_streamed_agree() {
    let server = TestServer::start(|_| {}).await;
    let request = json!({
        "model": "tiny-llama-f32",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        "temperature": 0, "max_completion_tokens": 12,
        "stream_options": {"include_usage": true},
    });
    let (status, body) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &streamed).await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    // The usage chunk has no choices, so it adds no text.
    let (text, finish) = assemble(&events, true);
    assert_eq!(text, content);
    assert_eq!(
        finish,
        body["choices"][0]["finish_reason"].as_str().unwrap()
    );
    // include_usage: a last chunk with no choices and the usage.
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], body["usage"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_requests_share_two_slots() {
    let server = Arc::new(TestServer::start(|cfg| cfg.slots = 2).await);
    let (want, _) = direct_greedy(PROMPT, 16);
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    server.post("/v1/completions", &greedy(16)).await.1["choices"][0]["text"]
                        .as_str()
                        .unwrap()
                        .to_string()
                } else {
                    let mut request = greedy(16);
                    request["stream"] = json!(true);
                    assemble(&server.stream("/v1/completions", &request).await, false).0
                }
            })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), want);
    }
    assert_eq!(server.metric("edgefusion_requests_total").await, 4);
    assert_eq!(server.metric("edgefusion_queue_depth").await, 0);
    Arc::into_inner(server).unwrap().stop().await;
}

/// Four different prompts at once on four slots, prefilled 3 tokens a round: each is
/// decoded in batched steps beside the others, and each text is its own direct greedy decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_prompts_decoded_together_equal_each_alone() {
    let server = Arc::new(
        TestServer::start(|cfg| {
            cfg.slots = 4;
            cfg.prefill_chunk = 3;
            // Rounds slowed so all four are in before the first finishes.
            cfg.step_delay = Duration::from_millis(10);
        })
        .await,
    );
    let prompts = [
        PROMPT,
        "Once upon a time",
        "The river ran quickly past the old mill and",
        "Numbers: one two three",
    ];
    let requests: Vec<_> = prompts
        .iter()
        .map(|&prompt| {
            let server = server.clone();
            tokio::spawn(async move {
                let request = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12});
                let (status, body) = server.post("/v1/completions", &request).await;
                assert_eq!(status, 200, "{body}");
                body["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    for (request, prompt) in requests.into_iter().zip(prompts) {
        assert_eq!(
            request.await.unwrap(),
            direct_greedy(prompt, 12).0,
            "{prompt}"
        );
    }
    let steps = server.metric("edgefusion_decode_steps_total").await;
    let rows = server.metric("edgefusion_decode_rows_total").await;
    assert!(
        rows > steps,
        "no step decoded two slots: {rows} rows in {steps} steps"
    );
    Arc::into_inner(server).unwrap().stop().await;
}

/// With a context shorter than two prompts together, a round prefills only what one step
/// holds (the session's batch is clamped to the context); both requests still succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_longer_together_than_the_context_are_prefilled_in_turn() {
    let server = Arc::new(
        TestServer::start(|cfg| {
            cfg.slots = 2;
            cfg.ctx = Some(24);
            cfg.step_delay = Duration::from_millis(5);
        })
        .await,
    );
    let prompt = "The river ran quickly past the old mill and";
    let requests: Vec<_> = (0..2)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move {
                let request = json!({"prompt": prompt, "temperature": 0, "max_tokens": 3});
                server.post("/v1/completions", &request).await
            })
        })
        .collect();
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 8);
    }
    Arc::into_inner(server).unwrap().stop().await;
}

/// A request whose prompt repeats an earlier one's starts from the slot's cached tokens
/// (all but the last, whose logits start the generation) and gives the same text; a prompt
/// that shares only a start keeps that much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_reuses_the_cached_prefix() {
    let server = TestServer::start(|cfg| cfg.slots = 1).await;
    let (want, _) = direct_greedy(PROMPT, 8);
    let n_prompt = |body: &Value| body["usage"]["prompt_tokens"].as_u64().unwrap();
    let (_, first) = server.post("/v1/completions", &greedy(8)).await;
    assert_eq!(first["choices"][0]["text"], want.as_str());
    assert_eq!(
        server.metric("edgefusion_prompt_tokens_cached_total").await,
        0
    );
    let (_, second) = server.post("/v1/completions", &greedy(8)).await;
    assert_eq!(second["choices"][0]["text"], want.as_str());
    let cached = server.metric("edgefusion_prompt_tokens_cached_total").await;
    assert_eq!(cached, n_prompt(&second) - 1);
    // Same start, another ending: the shared tokens are kept, the rest prefilled.
    let other = format!("{PROMPT} the whole class");
    let request = json!({"prompt": other, "temperature": 0, "max_tokens": 8});
    let (_, third) = server.post("/v1/completions", &request).await;
    assert_eq!(
        third["choices"][0]["text"],
        direct_greedy(&other, 8).0.as_str()
    );
    let kept = server.metric("edgefusion_prompt_tokens_cached_total").await - cached;
    assert!(
        kept >= n_prompt(&first) - 1 && kept < n_prompt(&third),
        "kept {kept} of {} tokens",
        n_prompt(&third)
    );
    server.stop().await;
}

/// A hybrid model's states do not rewind, so its slot saves them at the end of each chat
/// message and prompt: a second conversation with the same system prompt starts from the
/// state saved after it, an edited last message from the state before it, and a repeated
/// prompt from its end; every reply equals a fresh session's on the whole prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_restores_states_saved_at_message_ends() {
    const HYBRID: &str = "tiny-hybrid-f32.gguf";
    const CTX: usize = 256;
    let server = TestServer::start_model(HYBRID, |cfg| {
        cfg.slots = 1;
        cfg.ctx = Some(CTX);
    })
    .await;
    let system = json!({"role": "system", "content": "Answer in one short line."});
    let chat = |messages: Vec<Value>| json!({"messages": messages, "temperature": 0, "max_completion_tokens": 6});
    let user = |text: &str| json!({"role": "user", "content": text});
    let assistant = |text: &str| json!({"role": "assistant", "content": text});
    let source = ModelSource::open(fixture(HYBRID)).unwrap();
    let tokenizer = load_tokenizer(&source).unwrap();
    let template = ChatTemplate::new(tokenizer.chat_template().unwrap_or(CHATML_TEMPLATE)).unwrap();
    let render = |messages: &[Value], generation: bool| {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        template.render(&messages, generation, "", "").unwrap()
    };
    let n_tokens = |text: &str| tokenizer.encode(text, true).unwrap().len() as u64;
    let cached = || server.metric("edgefusion_prompt_tokens_cached_total");
    let reply = |messages: Vec<Value>| {
        let server = &server;
        async move {
            let (status, body) = server
                .post("/v1/chat/completions", &chat(messages.clone()))
                .await;
            assert_eq!(status, 200, "{body}");
            let text = body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string();
            let (want, _) = direct_greedy_of(HYBRID, CTX, &render(&messages, true), 6);
            assert_eq!(text, want, "{messages:?}");
            text
        }
    };
    let first = vec![system.clone(), user("Hello there")];
    reply(first.clone()).await;
    assert_eq!(cached().await, 0);
    assert!(server.metric("edgefusion_saved_states").await >= 2);
    // Same system prompt, another question: it starts after the system message.
    let before = cached().await;
    reply(vec![system.clone(), user("Good morning to you")]).await;
    assert_eq!(
        cached().await - before,
        n_tokens(&render(&first[..1], false))
    );
    // The next turn of the first conversation, then the same turn again: the slot holds
    // the second conversation now, so the first starts after the system prompt again;
    // the repeat starts one token before its end.
    let answer = reply(first.clone()).await;
    let mut second_turn = first.clone();
    second_turn.extend([assistant(&answer), user("And then?")]);
    let n_prompt = n_tokens(&render(&second_turn, true));
    reply(second_turn.clone()).await;
    let before = cached().await;
    reply(second_turn.clone()).await;
    assert_eq!(cached().await - before, n_prompt - 1);
    // A budget of no states: nothing is saved, and only a slot whose whole cache the prompt
    // extends is reused.
    server.stop().await;
    let server = TestServer::start_model(HYBRID, |cfg| {
        cfg.ctx = Some(CTX);
        cfg.state_cache_bytes = 0;
    })
    .await;
    for _ in 0..2 {
        server
            .post("/v1/chat/completions", &chat(first.clone()))
            .await;
    }
    assert_eq!(
        server.metric("edgefusion_prompt_tokens_cached_total").await,
        0
    );
    assert_eq!(server.metric("edgefusion_saved_states").await, 0);
    server.stop().await;
}

/// `--timeout`: a generation still running at the deadline ends there with `length` and
/// the text so far; a job that reaches the scheduler past its deadline is refused with
/// `TimedOut` (HTTP 503, code "timeout").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_ends_or_is_refused() {
    let server = TestServer::start(|cfg| {
        cfg.request_timeout = Some(Duration::from_secs(1));
        // At least 100 ms a token: the 40 tokens would take 4 s.
        cfg.step_delay = Duration::from_millis(100);
    })
    .await;
    let (_, n_direct) = direct_greedy(PROMPT, 40);
    assert!(n_direct >= 30, "the fixture stops after {n_direct} tokens");
    let started = Instant::now();
    // Mid-generation the server reports its token rate; idle, 0.
    let request = greedy(40);
    let (response, rate) = tokio::join!(server.post("/v1/completions", &request), async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.metric_f64("edgefusion_tokens_per_second").await
    });
    let (status, body) = response;
    assert!(
        rate > 0.0 && rate < 20.0,
        "{rate} tokens/s at 100 ms a round"
    );
    // 0 once the scheduler is idle (after the last round's pause).
    let idle_since = Instant::now();
    while server.metric_f64("edgefusion_tokens_per_second").await != 0.0 {
        assert!(
            idle_since.elapsed() < Duration::from_secs(5),
            "the rate stays up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let n = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n < n_direct as u64, "{n} tokens in 1 s at 100 ms each");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The text so far is the greedy text's start.
    let (want, _) = direct_greedy(PROMPT, n as usize);
    assert_eq!(body["choices"][0]["text"], want.as_str());
    assert_eq!(
        server.metric("edgefusion_requests_timed_out_total").await,
        1
    );
    assert_eq!(server.metric("edgefusion_active_slots").await, 0);
    server.stop().await;

    // A job whose deadline has passed when a slot takes it.
    let engine = Engine::start(ServeConfig::new(fixture(MODEL))).expect("engine starts");
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let params = GenParams {
        sampler: Default::default(),
        max_tokens: 4,
        stop: Vec::new(),
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logprobs: None,
        json: None,
    };
    engine
        .submit(Job {
            prompt: vec![1, 2, 3],
            boundaries: Vec::new(),
            params,
            events,
            deadline: Some(Instant::now()),
        })
        .unwrap();
    match received.recv().await {
        Some(Event::TimedOut(message)) => assert!(message.contains("timed out"), "{message}"),
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(received.recv().await.is_none(), "nothing after TimedOut");
    assert_eq!(engine.metrics.timed_out.load(Ordering::Relaxed), 1);
    assert_eq!(engine.metrics.in_flight.load(Ordering::SeqCst), 0);
}

/// Log-probabilities: chat's `content` list and completions' parallel lists, whole and
/// streamed; the greedy token is the most likely one, its log-probability is the direct
/// session's log-softmax, the tokens spell the text, and out-of-range counts are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_match_the_model_and_spell_the_text() {
    let server = TestServer::start(|_| {}).await;
    // The direct session's log-probability of its first greedy token.
    let source = ModelSource::open(fixture(MODEL)).unwrap();
    let model = Model::load(&source).unwrap();
    let tokenizer = load_tokenizer(&source).unwrap();
    let mut session = Session::new(&model, SessionOptions::new(64, 1)).unwrap();
    let ids = tokenizer.encode(PROMPT, true).unwrap();
    let logits = session.forward(&ids, Logits::Last).unwrap().to_vec();
    let first = argmax(&logits);
    let max = logits[first as usize];
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let want_first = logits[first as usize] - log_z;

    let mut request = greedy(8);
    request["logprobs"] = json!(3);
    let (status, body) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(tokens.concat(), choice["text"].as_str().unwrap());
    let first_lp = lp["token_logprobs"][0].as_f64().unwrap() as f32;
    assert!(
        (first_lp - want_first).abs() < 1e-3,
        "{first_lp} vs {want_first}"
    );
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        // A map by token text (OpenAI's shape): tokens that spell the same text share a key.
        let top = top.as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        // Greedy: the chosen token is the most likely one.
        assert!((best - lp["token_logprobs"][i].as_f64().unwrap()).abs() < 1e-6);
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));

    // Chat, whole and streamed: the same entries.
    let chat = json!({"messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
                      "max_tokens": 6, "logprobs": true, "top_logprobs": 2});
    let (status, whole) = server.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let spelled: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        spelled,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for entry in &content {
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(entry["top_logprobs"][0]["token"], entry["token"]);
    }
    let mut streamed_request = chat.clone();
    streamed_request["stream"] = json!(true);
    let events = server
        .stream("/v1/chat/completions", &streamed_request)
        .await;
    let streamed: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|v| v["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    // The same tokens; the log-probabilities to float rounding (the second request starts
    // from the first's cached prompt, so its last prompt token runs as a step of its own).
    assert_eq!(streamed.len(), content.len());
    for (a, b) in streamed.iter().zip(&content) {
        assert_eq!(a["token"], b["token"]);
        let (x, y) = (
            a["logprob"].as_f64().unwrap(),
            b["logprob"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-4, "{a} vs {b}");
    }

    for (path, field, value) in [
        ("/v1/chat/completions", "top_logprobs", json!(21)),
        ("/v1/completions", "logprobs", json!(6)),
    ] {
        let mut bad = if path == "/v1/completions" {
            greedy(4)
        } else {
            chat.clone()
        };
        bad[field] = value;
        let (status, body) = server.post(path, &bad).await;
        assert_eq!(status, 400, "{body}");
        assert_openai_error(&body, Some(field));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_the_others_finish() {
    // One slot, one place in the queue, and rounds slowed to 20 ms so the slot stays busy.
    let server = Arc::new(
        TestServer::start(|cfg| {
            cfg.slots = 1;
            cfg.queue = 1;
            cfg.step_delay = Duration::from_millis(20);
        })
        .await,
    );
    let spawn = |server: Arc<TestServer>| {
        tokio::spawn(async move { server.post("/v1/completions", &greedy(10)).await.0 })
    };
    let running = spawn(server.clone());
    server.wait_for_metric("edgefusion_active_slots", 1).await;
    let queued = spawn(server.clone());
    server.wait_for_metric("edgefusion_queue_depth", 1).await;
    let response = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .json(&greedy(10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_openai_error(&body, None);
    assert_eq!(running.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
    assert_eq!(server.metric("edgefusion_requests_rejected_total").await, 1);
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_slot() {
    // 100 ms a token: the 50 tokens would take 5 s, time enough for the disconnect to be
    // seen even on a loaded machine.
    let server = TestServer::start(|cfg| {
        cfg.slots = 1;
        cfg.step_delay = Duration::from_millis(100);
    })
    .await;
    let mut request = greedy(50);
    request["stream"] = json!(true);
    let mut response = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);
    // (The slot gauge is 0 too before the scheduler has counted the request: wait for the
    // cancellation itself, then for the gauge.)
    server
        .wait_for_metric("edgefusion_requests_cancelled_total", 1)
        .await;
    server.wait_for_metric("edgefusion_active_slots", 0).await;
    assert_eq!(
        server.metric("edgefusion_requests_cancelled_total").await,
        1
    );
    // Well short of the 50 tokens asked for.
    assert!(server.metric("edgefusion_tokens_generated_total").await < 40);
    let (status, _) = server.post("/v1/completions", &greedy(3)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors() {
    let server = TestServer::start(|cfg| cfg.ctx = Some(16)).await;
    let response = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .header("content-type", "application/json")
        .body("{\"prompt\": \"hi\",")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_openai_error(&response.json().await.unwrap(), None);
    // An oversized body: 413, still OpenAI-shaped (a raw request, so the refusal cannot race
    // a pooled connection).
    {
        let addr = server.base.trim_start_matches("http://").to_string();
        let reply = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            let head = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{\"prompt\": \"",
                3 << 20
            );
            stream.write_all(head.as_bytes()).unwrap();
            // The server may answer and close before the whole body is in: write from
            // another thread, ignoring a broken pipe, and read the answer here.
            let mut writer = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let chunk = vec![b'a'; 1 << 16];
                for _ in 0..48 {
                    if writer.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply);
            reply
        })
        .await
        .unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_openai_error(&body, None);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("exceeds"),
            "{body}"
        );
    }

    let cases = [
        (json!({"prompt": "hi", "max_tokens": -1}), "max_tokens"),
        (json!({"prompt": "hi", "n": 2}), "n"),
        (json!({"prompt": "hi", "temperature": "hot"}), "temperature"),
        (json!({"prompt": "hi", "top_p": 0}), "top_p"),
        (json!({"prompt": "hi", "stop": [1, 2]}), "stop"),
        (json!({"max_tokens": 3}), "prompt"),
    ];
    for (request, param) in cases {
        let (status, body) = server.post("/v1/completions", &request).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert_openai_error(&body, Some(param));
    }
    let (status, body) = server
        .post("/v1/chat/completions", &json!({"messages": "hello"}))
        .await;
    assert_eq!(status, 400);
    assert_openai_error(&body, Some("messages"));

    // Longer than --ctx 16: the message names both sizes.
    let long = "The old teacher said good morning to the class. ".repeat(4);
    let (status, body) = server
        .post("/v1/completions", &json!({"prompt": long}))
        .await;
    assert_eq!(status, 400);
    assert_openai_error(&body, Some("prompt"));
    let message = body["error"]["message"].as_str().unwrap();
    let (_, tokens) = server
        .post("/tokenize", &json!({"content": long, "add_special": true}))
        .await;
    let n = tokens["tokens"].as_array().unwrap().len();
    assert!(
        message.contains(&format!("{n} tokens")) && message.contains("16"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_is_required_except_for_health() {
    let server = TestServer::start(|cfg| cfg.api_key = Some("sekret".into())).await;
    assert_eq!(server.get("/health").await.status().as_u16(), 200);
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekret"),
        Some("Bearer sekre"),
    ] {
        let mut request = server.client.get(format!("{}/v1/models", server.base));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        assert_openai_error(&response.json().await.unwrap(), None);
    }
    let response = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth("sekret")
        .json(&greedy(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let response = server
        .client
        .post(format!("{}/v1/completions", server.base))
        .json(&greedy(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    // Every keyed endpoint checks the key before it reads a body: an oversized or broken
    // body without the key is a 401 too, not a 413 or 400.
    for (path, body) in [
        ("/v1/chat/completions", "{\"messages\": []}".to_string()),
        ("/v1/completions", "{not json".to_string()),
        ("/tokenize", "{\"content\": \"hi\"}".to_string()),
        ("/detokenize", "{\"tokens\": [1]}".to_string()),
    ] {
        let response = server
            .client
            .post(format!("{}{path}", server.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
    }
    // Only the head of a 3 MiB request is sent: the answer comes without the body.
    let addr = server.base.trim_start_matches("http://").to_string();
    let reply = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            3 << 20
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut reply = vec![0; 4096];
        let n = stream.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert_eq!(server.get("/metrics").await.status().as_u16(), 401);
    // The chat page is served without it (it asks for the key and sends it).
    assert_eq!(server.get("/").await.status().as_u16(), 200);
    server.stop().await;
}

/// Whether `value` has the shape of `json_schema_request`'s schema.
fn follows_the_schema(value: &Value) -> bool {
    let Some(obj) = value.as_object() else {
        return false;
    };
    let name_ok = obj["name"]
        .as_str()
        .is_some_and(|s| (1..=12).contains(&s.chars().count()));
    let age_ok = obj["age"].as_f64().is_some_and(|x| x.fract() == 0.0);
    let color_ok = obj
        .get("color")
        .is_none_or(|c| ["red", "green"].contains(&c.as_str().unwrap_or("")));
    let tags_ok = obj.get("tags").is_none_or(|t| {
        t.as_array()
            .is_some_and(|a| a.len() <= 3 && a.iter().all(Value::is_boolean))
    });
    let known = obj
        .keys()
        .all(|k| ["name", "age", "color", "tags"].contains(&k.as_str()));
    name_ok && age_ok && color_ok && tags_ok && known
}

fn json_schema_request(seed: u64, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 400,
        "stream": stream,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 12},
                "age": {"type": "integer"},
                "color": {"enum": ["red", "green"]},
                "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
            },
            "required": ["name", "age"],
            "additionalProperties": false
        }}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_makes_even_a_random_model_write_valid_json() {
    // The tiny fixture's weights are random: unconstrained, it writes no JSON at all.
    let server = TestServer::start(|cfg| {
        cfg.ctx = Some(512);
        cfg.slots = 2;
    })
    .await;
    for seed in 0..6 {
        let (status, body) = server
            .post("/v1/chat/completions", &json_schema_request(seed, false))
            .await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{body}");
        let content = choice["message"]["content"].as_str().unwrap();
        let value: Value = serde_json::from_str(content)
            .unwrap_or_else(|e| panic!("seed {seed}: {content:?} is not JSON: {e}"));
        assert!(follows_the_schema(&value), "seed {seed}: {content:?}");
        // Streamed with the same seed: the same text.
        let events = server
            .stream("/v1/chat/completions", &json_schema_request(seed, true))
            .await;
        assert_eq!(assemble(&events, true).0, content, "seed {seed}");
    }
    // json_object: any object.
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": PROMPT, "temperature": 1.0, "seed": 3, "max_tokens": 300,
                    "response_format": {"type": "json_object"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    if body["choices"][0]["finish_reason"] == "stop" {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(value.is_object(), "{text}");
    } else {
        // Cut by max_tokens: still a valid start of an object.
        assert!(text.trim_start().starts_with('{'), "{text}");
    }
    // A stop string could cut the document: refused beside response_format.
    let mut with_stop = json_schema_request(0, false);
    with_stop["stop"] = json!(["}"]);
    let (status, body) = server.post("/v1/chat/completions", &with_stop).await;
    assert_eq!(status, 400, "{body}");
    assert_openai_error(&body, Some("stop"));
    // Schemas the grammar cannot enforce, or malformed ones, are refused by place and rule.
    for (format, needle) in [
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}),
            "#/properties/n/minimum",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}}),
            "unknown type",
        ),
        (json!({"type": "json_schema"}), "json_schema"),
        (json!({"type": "yaml"}), "yaml"),
    ] {
        let (status, body) = server
            .post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "response_format": format}))
            .await;
        assert_eq!(status, 400, "{body}");
        assert_openai_error(&body, Some("response_format"));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    server.stop().await;
}
