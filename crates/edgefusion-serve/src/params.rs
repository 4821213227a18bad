//! Reading OpenAI request bodies field by field, so every error names its field
//! (`param`), as OpenAI's own errors do.

use std::sync::Arc;

use edgefusion_runtime::constrained::Grammar;
use edgefusion_runtime::SamplerConfig;
use serde_json::{Map, Value};

use crate::api::ApiError;
use crate::scheduler::GenParams;

/// A request body: a JSON object.
pub struct Body(pub Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
        match value {
            Value::Object(map) => Ok(Body(map)),
            _ => Err(ApiError::invalid("the body must be a JSON object", None)),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn f32(&self, name: &str) -> Result<Option<f32>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| ApiError::invalid(format!("'{name}' must be a number"), Some(name))),
        }
    }

    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                ApiError::invalid(format!("'{name}' must be an integer"), Some(name))
            }),
        }
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                ApiError::invalid(format!("'{name}' must be true or false"), Some(name))
            }),
        }
    }

    pub fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(format!("'{name}' must be a string"), Some(name))),
        }
    }

    pub fn value(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }

    /// A string or a list of strings (`stop`, a completion's `prompt`).
    pub fn strings(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let bad = || {
            ApiError::invalid(
                format!("'{name}' must be a string or a list of strings"),
                Some(name),
            )
        };
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    }
}

/// The generation settings of a completion or chat request. Defaults are `edgefusion run`'s
/// (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05); `max_tokens` defaults to the rest of
/// the context.
pub fn gen_params(body: &Body, max_tokens_field: &str) -> Result<GenParams, ApiError> {
    let defaults = SamplerConfig::default();
    if let Some(n) = body.i64("n")? {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("'n' must be 1 (got {n}): one choice per request"),
                Some("n"),
            ));
        }
    }
    let temperature = body.f32("temperature")?.unwrap_or(defaults.temperature);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            format!("'temperature' must be in [0, 2] (got {temperature})"),
            Some("temperature"),
        ));
    }
    let top_p = body.f32("top_p")?.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("'top_p' must be in (0, 1] (got {top_p})"),
            Some("top_p"),
        ));
    }
    let min_p = body.f32("min_p")?.unwrap_or(defaults.min_p);
    if !(0.0..1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            format!("'min_p' must be in [0, 1) (got {min_p})"),
            Some("min_p"),
        ));
    }
    let top_k = match body.i64("top_k")? {
        None => defaults.top_k,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("'top_k' must be ≥ 0 (got {k})"),
                Some("top_k"),
            ))
        }
    };
    // `max_completion_tokens` is the newer chat name of `max_tokens`.
    let max_tokens = match (body.i64(max_tokens_field)?, body.i64("max_tokens")?) {
        (Some(n), _) | (None, Some(n)) => {
            let field = if body.get(max_tokens_field).is_some() {
                max_tokens_field
            } else {
                "max_tokens"
            };
            if n < 1 {
                return Err(ApiError::invalid(
                    format!("'{field}' must be at least 1 (got {n})"),
                    Some(field),
                ));
            }
            n as usize
        }
        (None, None) => usize::MAX,
    };
    let mut penalties = [0.0f32; 2];
    for (slot, name) in penalties
        .iter_mut()
        .zip(["presence_penalty", "frequency_penalty"])
    {
        let v = body.f32(name)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::invalid(
                format!("'{name}' must be in [-2, 2] (got {v})"),
                Some(name),
            ));
        }
        *slot = v;
    }
    let seed = match body.value("seed") {
        None => fresh_seed(),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|s| s as u64))
            .ok_or_else(|| ApiError::invalid("'seed' must be an integer", Some("seed")))?,
    };
    let stop = body.strings("stop")?;
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            format!("'stop' holds at most 4 strings (got {})", stop.len()),
            Some("stop"),
        ));
    }
    let logprobs = logprobs(body, max_tokens_field == "max_completion_tokens")?;
    let json = response_format(body)?;
    if json.is_some() && stop.iter().any(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "'stop' cannot be combined with 'response_format': a stop string would cut the JSON document (generation ends when the document is whole)",
            Some("stop"),
        ));
    }
    Ok(GenParams {
        sampler: SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: defaults.repeat_last_n,
            seed,
        },
        max_tokens,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        presence_penalty: penalties[0],
        frequency_penalty: penalties[1],
        logprobs,
        json,
    })
}

/// The grammar `response_format` asks the output to follow (`None`: free text):
/// - `{"type": "text"}`: none;
/// - `{"type": "json_object"}`: any JSON object (llama-server's `"schema"` beside it also
///   counts);
/// - `{"type": "json_schema", "json_schema": {"name": .., "schema": {..}, "strict": ..}}`.
fn response_format(body: &Body) -> Result<Option<Arc<Grammar>>, ApiError> {
    const FIELD: &str = "response_format";
    let Some(format) = body.value(FIELD) else {
        return Ok(None);
    };
    let bad = |message: String| ApiError::invalid(message, Some(FIELD));
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"".into())
    })?;
    let schema = match kind {
        "text" => return Ok(None),
        "json_object" => format.get("schema"),
        "json_schema" => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return Err(bad(
                    "'response_format.json_schema' must be an object holding 'schema'".into(),
                ));
            };
            Some(spec.get("schema").unwrap_or(&Value::Bool(true)))
        }
        other => {
            return Err(bad(format!(
                "'response_format.type' must be \"text\", \"json_object\" or \"json_schema\" (got \"{other}\")"
            )))
        }
    };
    let grammar = match schema {
        None => Grammar::any_object(),
        Some(schema) => {
            Grammar::from_schema(schema).map_err(|e| bad(format!("'response_format' {e}")))?
        }
    };
    Ok(Some(Arc::new(grammar)))
}

/// How many alternatives to report beside each generated token's log-probability (`None`:
/// no log-probabilities). Chat: `logprobs` true and `top_logprobs` 0–20; completions:
/// `logprobs` an integer 0–5, as OpenAI's API takes them.
fn logprobs(body: &Body, chat: bool) -> Result<Option<usize>, ApiError> {
    if chat {
        let wanted = body.bool("logprobs")?.unwrap_or(false);
        let top = body.i64("top_logprobs")?;
        if let Some(top) = top {
            if !(0..=20).contains(&top) {
                return Err(ApiError::invalid(
                    format!("'top_logprobs' must be in [0, 20] (got {top})"),
                    Some("top_logprobs"),
                ));
            }
            if !wanted {
                return Err(ApiError::invalid(
                    "'top_logprobs' needs 'logprobs': true",
                    Some("top_logprobs"),
                ));
            }
        }
        Ok(wanted.then(|| top.unwrap_or(0) as usize))
    } else {
        match body.i64("logprobs")? {
            None => Ok(None),
            Some(n) if (0..=5).contains(&n) => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::invalid(
                format!("'logprobs' must be an integer in [0, 5] (got {n})"),
                Some("logprobs"),
            )),
        }
    }
}

/// A seed for requests that give none: differs per request.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
