//! The HTTP side: OpenAI-shaped endpoints over the [`Engine`].

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgefusion_runtime::chat::{ChatError, ChatMessage};
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use crate::params::{gen_params, Body};
use crate::scheduler::{
    Engine, Event, FinishReason, GenParams, Job, SubmitError, TokenLogprob, TokenText, RATE_WINDOW,
};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the field at fault.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 503: a request that waited past the server's `--timeout` for a slot.
    fn timed_out(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("timeout"),
        }
    }

    /// The body: `{"error": {"message", "type", "param", "code"}}` (also a stream's error
    /// event).
    fn json(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    fn server(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.json())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type Shared = State<Arc<Engine>>;

/// Request bodies above this are refused with 413 (the largest context's prompt is far
/// smaller).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// A request's body, with axum's refusals (too large, unreadable) as OpenAI-shaped errors.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|rejection| ApiError {
                status: rejection.status(),
                message: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    format!("the request body exceeds {MAX_BODY_BYTES} bytes")
                } else {
                    format!("reading the request body: {}", rejection.body_text())
                },
                kind: "invalid_request_error",
                param: None,
                code: None,
            })
    }
}

/// Every endpoint, over one engine.
pub fn router(engine: Arc<Engine>) -> Router {
    // The key is checked before a body is read: a caller without it gets 401, whatever it
    // sent.
    let keyed = Router::new()
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(engine.clone(), require_key));
    Router::new()
        .route("/", get(chat_page))
        .route("/health", get(health))
        .merge(keyed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(engine)
}

/// Lets a request on when the server has no key or the request carries it; else 401.
async fn require_key(State(engine): Shared, request: Request, next: Next) -> Response {
    match authorize(&engine, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The chat page (static, built into the binary): it streams replies from
/// `/v1/chat/completions`, has a stop button, and shows the model and the speed. Served
/// without the API key, which the page asks for and sends with its requests.
async fn chat_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
        .into_response()
}

/// Byte comparison whose time depends only on the lengths, not on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

fn authorize(engine: &Engine, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &engine.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key: send 'Authorization: Bearer <key>'".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn next_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(engine): Shared) -> Result<Json<Value>, ApiError> {
    let info = &engine.info;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "edgefusion",
            "meta": {"n_ctx": info.n_ctx, "n_ctx_train": info.n_ctx_train,
                     "n_vocab": info.vocab_size, "slots": info.slots},
        }],
    })))
}

async fn metrics(State(engine): Shared) -> Result<Response, ApiError> {
    let m = &engine.metrics;
    let rows: [(&str, &str, &str, u64); 14] = [
        (
            "edgefusion_requests_total",
            "counter",
            "Generation requests accepted.",
            m.requests.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_requests_rejected_total",
            "counter",
            "Requests answered 429 because the queue was full.",
            m.rejected_queue_full.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_requests_cancelled_total",
            "counter",
            "Requests whose client went away before the end.",
            m.cancelled.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_requests_timed_out_total",
            "counter",
            "Requests that reached --timeout: refused while queued, or cut with finish_reason length.",
            m.timed_out.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_prompt_tokens_total",
            "counter",
            "Prompt tokens received.",
            m.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens a slot already held from an earlier request (not prefilled again).",
            m.prompt_tokens_cached.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_tokens_generated_total",
            "counter",
            "Tokens generated.",
            m.tokens_generated.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_decode_steps_total",
            "counter",
            "Batched decode steps (one forward pass over every generating slot).",
            m.decode_steps.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_decode_rows_total",
            "counter",
            "Tokens those steps decoded; divided by the steps, the mean batch size.",
            m.decode_rows.load(Ordering::Relaxed),
        ),
        (
            "edgefusion_queue_depth",
            "gauge",
            "Requests waiting for a slot.",
            m.queue_depth.load(Ordering::SeqCst) as u64,
        ),
        (
            "edgefusion_active_slots",
            "gauge",
            "Slots generating now.",
            m.active_slots.load(Ordering::SeqCst) as u64,
        ),
        (
            "edgefusion_saved_states",
            "gauge",
            "Recurrent states a hybrid model's slots hold for prefix reuse.",
            m.saved_states.load(Ordering::Relaxed) as u64,
        ),
        (
            "edgefusion_saved_state_bytes",
            "gauge",
            "Bytes of those states (at most --state-cache-mib).",
            m.saved_state_bytes.load(Ordering::Relaxed) as u64,
        ),
        (
            "edgefusion_saved_states_evicted_total",
            "counter",
            "Saved states dropped, least recently used first, to stay within the budget.",
            m.saved_states_evicted.load(Ordering::Relaxed),
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    text.push_str(&format!(
        "# HELP edgefusion_slots Slots configured.\n# TYPE edgefusion_slots gauge\nedgefusion_slots {}\n",
        engine.info.slots
    ));
    text.push_str(&format!(
        "# HELP edgefusion_tokens_per_second Tokens generated per second over the last {} s, all slots together (0 while idle).\n# TYPE edgefusion_tokens_per_second gauge\nedgefusion_tokens_per_second {:.2}\n",
        RATE_WINDOW.as_secs(),
        f64::from_bits(m.tokens_per_second.load(Ordering::Relaxed))
    ));
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn tokenize(State(engine): Shared, RawBody(body): RawBody) -> Result<Json<Value>, ApiError> {
    let body = Body::parse(&body)?;
    let content = body
        .str("content")?
        .ok_or_else(|| ApiError::invalid("'content' is required", Some("content")))?;
    let add_special = body.bool("add_special")?.unwrap_or(false);
    let tokens = engine
        .tokenizer
        .encode(content, add_special)
        .map_err(|e| ApiError::server(e.to_string()))?;
    Ok(Json(json!({ "tokens": tokens })))
}

async fn detokenize(
    State(engine): Shared,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let body = Body::parse(&body)?;
    let bad = || ApiError::invalid("'tokens' must be a list of token ids", Some("tokens"));
    let tokens: Vec<u32> = match body.value("tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    let vocab = engine.tokenizer.vocab_size();
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token {t} is outside the vocabulary (size {vocab})"),
            Some("tokens"),
        ));
    }
    let content = engine
        .tokenizer
        .decode(&tokens)
        .map_err(|e| ApiError::server(e.to_string()))?;
    Ok(Json(json!({ "content": content })))
}

/// Which OpenAI endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(engine): Shared, RawBody(body): RawBody) -> Response {
    generate(engine, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(engine): Shared, RawBody(body): RawBody) -> Response {
    generate(engine, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// A completion's `prompt`.
fn completion_prompt(body: &Body) -> Result<String, ApiError> {
    let prompts = body.strings("prompt")?;
    match prompts.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ApiError::invalid("'prompt' is required", Some("prompt"))),
        _ => Err(ApiError::invalid(
            "'prompt' must be one string (several prompts per request are not supported)",
            Some("prompt"),
        )),
    }
}

/// The model's chat template over `messages`, with its BOS and EOS strings.
fn render_chat(
    engine: &Engine,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String, ChatError> {
    let tok = &engine.tokenizer;
    let bos = tok.bos_id().and_then(|id| tok.token_str(id)).unwrap_or("");
    let eos = tok
        .eos_ids()
        .first()
        .and_then(|&id| tok.token_str(id))
        .unwrap_or("");
    engine
        .chat_template
        .render(messages, add_generation_prompt, bos, eos)
}

/// Messages whose end a hybrid model saves its state at: the first (a system prompt that
/// many conversations share) and the last few (a conversation's earlier turns).
const BOUNDARY_MESSAGES: usize = 8;

/// Where in `prompt` (the tokens of the whole rendered chat) each message but the last
/// ends: the template rendered over the messages up to it, tokenized, when that is a prefix
/// of `prompt` (it is not when a template joins messages inside a token).
fn message_boundaries(engine: &Engine, messages: &[ChatMessage], prompt: &[u32]) -> Vec<usize> {
    let n = messages.len();
    let ends = (1..n).filter(|&k| k == 1 || k + BOUNDARY_MESSAGES >= n);
    ends.filter_map(|k| {
        let text = render_chat(engine, &messages[..k], false).ok()?;
        let tokens = engine.tokenizer.encode(&text, true).ok()?;
        (!tokens.is_empty() && prompt.starts_with(&tokens)).then_some(tokens.len())
    })
    .collect()
}

fn chat_messages(body: &Body) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |what: String| ApiError::invalid(what, Some("messages"));
    let Some(Value::Array(items)) = body.value("messages") else {
        return Err(bad(
            "'messages' must be a list of {role, content} objects".into()
        ));
    };
    if items.is_empty() {
        return Err(bad("'messages' must hold at least one message".into()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("messages[{i}].role must be a string")))?;
            let content = match item.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // Content parts: the text ones, joined.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(bad(format!(
                                "messages[{i}].content: only text parts are supported"
                            ))),
                        },
                    )
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                Some(_) => {
                    return Err(bad(format!(
                        "messages[{i}].content must be a string or a list of parts"
                    )))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// Validates, tokenizes and queues a request; answers it whole or as a stream.
async fn generate(engine: Arc<Engine>, body: Bytes, kind: Kind) -> Result<Response, ApiError> {
    let deadline = engine.request_timeout.map(|t| Instant::now() + t);
    let body = Body::parse(&body)?;
    let max_field = match kind {
        Kind::Completion => "max_tokens",
        Kind::Chat => "max_completion_tokens",
    };
    let mut params = gen_params(&body, max_field)?;
    let stream = body.bool("stream")?.unwrap_or(false);
    let include_usage = stream
        && body
            .value("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    // One model is served: `model` is echoed back whatever it names.
    let model = body.str("model")?.unwrap_or(&engine.info.name).to_string();
    let messages = match kind {
        Kind::Chat => Some(chat_messages(&body)?),
        Kind::Completion => None,
    };
    let text = match &messages {
        Some(messages) => render_chat(&engine, messages, true)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?,
        None => completion_prompt(&body)?,
    };
    let prompt = engine
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::server(e.to_string()))?;
    let n_ctx = engine.info.n_ctx;
    let prompt_field = if kind == Kind::Chat {
        "messages"
    } else {
        "prompt"
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "the prompt encodes to no tokens",
            Some(prompt_field),
        ));
    }
    if prompt.len() >= n_ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                format!(
                    "the prompt is {} tokens, which does not fit the context of {n_ctx} tokens (leave room for at least one generated token, or raise --ctx)",
                    prompt.len()
                ),
                Some(prompt_field),
            )
        });
    }
    params.max_tokens = params.max_tokens.min(n_ctx - prompt.len());
    let boundaries = match &messages {
        Some(messages) if engine.info.saves_states => {
            message_boundaries(&engine, messages, &prompt)
        }
        _ => Vec::new(),
    };
    let params_logprobs = params.logprobs.is_some();
    let events = submit(&engine, prompt, boundaries, params, deadline)?;
    let reply = Reply {
        id: next_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: unix_now(),
        model,
        kind,
        logprobs: params_logprobs,
    };
    if stream {
        Ok(stream_response(reply, events, include_usage))
    } else {
        whole_response(reply, events).await
    }
}

fn submit(
    engine: &Engine,
    prompt: Vec<u32>,
    boundaries: Vec<usize>,
    params: GenParams,
    deadline: Option<Instant>,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    match engine.submit(Job {
        prompt,
        boundaries,
        params,
        deadline,
        events: tx,
    }) {
        Ok(()) => {
            engine.metrics.requests.fetch_add(1, Ordering::Relaxed);
            Ok(rx)
        }
        Err(SubmitError::QueueFull) => {
            engine
                .metrics
                .rejected_queue_full
                .fetch_add(1, Ordering::Relaxed);
            Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "the server is busy: every slot is generating and the queue is full; retry later".into(),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            })
        }
        Err(SubmitError::Closed) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::server("the server is shutting down")
        }),
    }
}

/// The fields every response and chunk of one request shares.
struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
}

/// Log-probabilities of generated tokens in the shape of the request's endpoint: chat's
/// `{"content": [{token, logprob, bytes, top_logprobs}]}`, or completions' parallel lists
/// `tokens`, `token_logprobs`, `top_logprobs` and `text_offset` (characters from the start
/// of the generated text; `offset` is where `entries` begin).
fn logprobs_json(kind: Kind, entries: &[TokenLogprob], offset: &mut usize) -> Value {
    match kind {
        Kind::Chat => {
            let token = |t: &TokenText, logprob: f32| json!({"token": t.text, "logprob": logprob, "bytes": t.bytes});
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let mut v = token(&e.token, e.logprob);
                    v["top_logprobs"] = e.top.iter().map(|(t, lp)| token(t, *lp)).collect();
                    v
                })
                .collect();
            json!({ "content": content })
        }
        Kind::Completion => {
            let mut text_offset = Vec::with_capacity(entries.len());
            for e in entries {
                text_offset.push(*offset);
                *offset += e.token.text.chars().count();
            }
            json!({
                "tokens": entries.iter().map(|e| e.token.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": entries
                    .iter()
                    .map(|e| {
                        // Keyed by text: of tokens that spell the same, the likeliest stays.
                        let mut top = serde_json::Map::new();
                        for (t, lp) in &e.top {
                            top.entry(t.text.clone()).or_insert(json!(lp));
                        }
                        top
                    })
                    .collect::<Vec<_>>(),
                "text_offset": text_offset,
            })
        }
    }
}

impl Reply {
    fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        })
    }

    /// A response (`chunk` false) or stream chunk whose one choice holds `text`.
    fn body(&self, chunk: bool, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let (object, choice) = match (self.kind, chunk) {
            (Kind::Completion, _) => (
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
            ),
            (Kind::Chat, false) => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text.unwrap_or("")},
                       "logprobs": null, "finish_reason": finish}),
            ),
            (Kind::Chat, true) => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": text.map_or(json!({}), |t| json!({"content": t})),
                       "logprobs": null, "finish_reason": finish}),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

async fn whole_response(
    reply: Reply,
    mut events: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Logprob(entry) => logprobs.push(entry),
            Event::Error(message) => return Err(ApiError::server(message)),
            Event::TimedOut(message) => return Err(ApiError::timed_out(message)),
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut body = reply.body(false, Some(&text), Some(reason));
                if reply.logprobs {
                    body["choices"][0]["logprobs"] = logprobs_json(reply.kind, &logprobs, &mut 0);
                }
                body["usage"] = Reply::usage(prompt_tokens, completion_tokens);
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::server("the scheduler stopped before the end"))
}

/// Server-sent events in OpenAI's shape, ending with `data: [DONE]`. A task forwards the
/// scheduler's events; when the client goes away the stream is dropped, the task's next
/// send fails, and dropping its receiver tells the scheduler to free the slot.
fn stream_response(
    reply: Reply,
    mut events: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    tokio::spawn(async move {
        if reply.kind == Kind::Chat {
            let mut first = reply.body(true, None, None);
            first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
            if tx.send(data(first)).await.is_err() {
                return;
            }
        }
        // Log-probabilities ride on the next chunk of text (a token's text may be held back
        // while it could start a stop string), the rest on the final chunk.
        let mut pending: Vec<TokenLogprob> = Vec::new();
        let mut offset = 0;
        let mut with_logprobs = |mut chunk: Value, pending: &mut Vec<TokenLogprob>| {
            if reply.logprobs && !pending.is_empty() {
                chunk["choices"][0]["logprobs"] = logprobs_json(reply.kind, pending, &mut offset);
                pending.clear();
            }
            chunk
        };
        while let Some(event) = events.recv().await {
            let out = match event {
                Event::Logprob(entry) => {
                    pending.push(entry);
                    continue;
                }
                Event::Text(piece) => vec![data(with_logprobs(
                    reply.body(true, Some(&piece), None),
                    &mut pending,
                ))],
                Event::Error(message) => vec![data(ApiError::server(message).json())],
                Event::TimedOut(message) => vec![data(ApiError::timed_out(message).json())],
                Event::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let mut out = vec![data(with_logprobs(
                        reply.body(true, None, Some(reason)),
                        &mut pending,
                    ))];
                    if include_usage {
                        let mut last = reply.body(true, None, None);
                        last["choices"] = json!([]);
                        last["usage"] = Reply::usage(prompt_tokens, completion_tokens);
                        out.push(data(last));
                    }
                    out
                }
            };
            for item in out {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
