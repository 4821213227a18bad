//! Chat prompts: a model's Jinja chat template (`tokenizer.chat_template`) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it: `trim_blocks` and
//! `lstrip_blocks` on, Python string methods (`.strip()`, `.startswith()`) available,
//! `raise_exception`, `strftime_now` and a Python-style `tojson`.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// ChatML, for models that ship no template (Qwen2 and SmolLM2 use this shape).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile: {message}")]
    Syntax { message: String },
    /// Rendering failed; a template's own `raise_exception("...")` lands here with its text.
    #[error("chat template failed: {message}")]
    Render { message: String },
}

/// A compiled chat template; compile once, render per turn.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // transformers compiles templates with these two on; templates are written for it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::Syntax {
                message: describe(&e),
            })?;
        Ok(ChatTemplate { env })
    }

    /// The fallback for models without a template.
    pub fn chatml() -> Self {
        // CHATML_TEMPLATE is a constant checked by the tests; failing here is a bug of ours.
        Self::new(CHATML_TEMPLATE).unwrap_or_else(|e| panic!("built-in ChatML template: {e}"))
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render {
                message: describe(&e),
            })?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| ChatError::Render {
                message: describe(&e),
            })
    }
}

/// Compiles `template` and renders it once. See [`ChatTemplate`] to reuse a compiled one.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatError> {
    ChatTemplate::new(template)?.render(messages, add_generation_prompt, bos_token, eos_token)
}

/// The error and its causes on one line, with the template line when minijinja knows it.
fn describe(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps` as transformers' `tojson` calls it: non-ASCII kept, `", "` and
/// `": "` separators (or newlines and `indent` spaces), keys in insertion order.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; non-ASCII text is always written as is.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    let layout = JsonLayout {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
    };
    write_python_json(&value, layout, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

#[derive(Clone, Copy)]
struct JsonLayout {
    indent: Option<usize>,
    sort_keys: bool,
}

impl JsonLayout {
    fn newline(self, depth: usize, out: &mut String) {
        if let Some(width) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    }

    fn item_separator(self) -> &'static str {
        if self.indent.is_some() {
            ","
        } else {
            ", "
        }
    }
}

fn write_python_json(
    value: &Value,
    layout: JsonLayout,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(layout.item_separator());
                }
                layout.newline(depth + 1, out);
                write_python_json(item, layout, depth + 1, out)?;
            }
            layout.newline(depth, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if layout.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(layout.item_separator());
                }
                layout.newline(depth + 1, out);
                // JSON keys are strings; Python writes other keys through str().
                let key_text = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                out.push_str(&Json::String(key_text).to_string());
                out.push_str(": ");
                write_python_json(&value.get_item(key)?, layout, depth + 1, out)?;
            }
            layout.newline(depth, out);
            out.push('}');
        }
        _ => {
            let scalar = serde_json::to_string(value).map_err(|e| {
                Error::new(ErrorKind::InvalidOperation, "tojson: value is not JSON").with_source(e)
            })?;
            out.push_str(&scalar);
        }
    }
    Ok(())
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date
/// (Llama 3.x). Supports the directives those templates use.
fn strftime_now(format: String) -> Result<String, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    format_utc(&format, now.as_secs() as i64)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C `strftime` over a UTC Unix time, for the common directives.
fn format_utc(format: &str, unix_secs: i64) -> Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        let directive = chars.next().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: format ends with `%`",
            )
        })?;
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        match directive {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'e' => out.push_str(&format!("{day:>2}")),
            'H' => out.push_str(&format!("{hour:02}")),
            'I' => out.push_str(&format!("{hour12:02}")),
            'M' => out.push_str(&format!("{minute:02}")),
            'S' => out.push_str(&format!("{second:02}")),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'j' => out.push_str(&format!("{day_of_year:03}")),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'B' => out.push_str(month_name),
            'a' => out.push_str(&weekday_name[..3]),
            'A' => out.push_str(weekday_name),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: directive `%{other}` is not supported"),
                ))
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`, as stored in its GGUF.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_adds_its_default_system_prompt() {
        let messages = [ChatMessage::user("What is 2+2?")];
        let prompt = render_chat(
            SMOLLM2_TEMPLATE,
            &messages,
            true,
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_template_keeps_a_given_system_prompt() {
        let messages = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello!"),
            ChatMessage::user("Bye"),
        ];
        let prompt = render_chat(SMOLLM2_TEMPLATE, &messages, false, "", "").unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_fallback() {
        let messages = [ChatMessage::user("Hi")];
        let prompt = ChatTemplate::chatml()
            .render(&messages, true, "", "")
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_reaches_the_caller() {
        let template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let err = render_chat(template, &[ChatMessage::assistant("x")], false, "", "").unwrap_err();
        assert!(matches!(err, ChatError::Render { .. }));
        assert!(
            err.to_string()
                .contains("Conversation must start with user"),
            "{err}"
        );
        assert_eq!(
            render_chat(template, &[ChatMessage::user("x")], false, "", "").unwrap(),
            "ok"
        );
    }

    #[test]
    fn python_string_methods_and_block_trimming() {
        // A Llama-2-style template: bos_token, .strip(), loop.last, and block tags on their
        // own lines that trim_blocks / lstrip_blocks must swallow.
        let template = "{{ bos_token }}\n{% for message in messages %}\n    {% if message['role'] == 'user' %}\n[INST] {{ message['content'].strip() }} [/INST]\n    {% elif loop.last %}\n{{ message['content'].upper() }}{{ eos_token }}\n    {% endif %}\n{% endfor %}";
        let messages = [
            ChatMessage::user("  hi there \n"),
            ChatMessage::assistant("ok"),
        ];
        let prompt = render_chat(template, &messages, false, "<s>", "</s>").unwrap();
        assert_eq!(prompt, "<s>\n[INST] hi there [/INST]\nOK</s>\n");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let err = ChatTemplate::new("{% for m in messages %}no end").unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let template =
            "{{ {'b': [1, 'é'], 'a': {}} | tojson }}|{{ [1, {'k': none}] | tojson(indent=2) }}";
        let out = render_chat(template, &[], false, "", "").unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, \"é\"], \"a\": {}}|[\n  1,\n  {\n    \"k\": null\n  }\n]"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let t = 1_721_997_296;
        assert_eq!(format_utc("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(
            format_utc("%A %B %e, %H:%M:%S %p %j %y %%", t).unwrap(),
            "Friday July 26, 12:34:56 PM 208 24 %"
        );
        assert_eq!(format_utc("%Y-%m-%d", 0).unwrap(), "1970-01-01");
        assert_eq!(
            format_utc("%Y-%m-%d %a", 951_782_400).unwrap(),
            "2000-02-29 Tue"
        );
        assert!(format_utc("%Q", t).is_err());
        for days in [-1_000_000, -1, 0, 59, 11_016, 1_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
