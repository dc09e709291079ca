//! OpenAI's request bodies, read and checked: what `/v1/chat/completions` and `/v1/completions`
//! take. Unknown fields are ignored, as OpenAI does; fields this server cannot honour (`n` > 1,
//! tools and functions, logprobs) are refused with a 400 naming them rather than ignored.

use serde_json::{Map, Value};
use tptt_engine::template::Message;

use crate::error::ApiError;

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// A checked generation request (chat or plain completion).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The model asked for.
    pub model: String,
    /// Chat messages (`None` for a plain completion).
    pub messages: Option<Vec<Message>>,
    /// A plain completion's prompt.
    pub prompt: String,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<usize>,
    /// Sampling temperature (`0..=2`).
    pub temperature: Option<f32>,
    /// Nucleus threshold (`(0, 1]`).
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(param), message)
}

/// The body as a JSON object.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            None,
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(ApiError::bad_request(
            None,
            format!("The request body is not valid JSON: {e}."),
        )),
    }
}

/// A field that must be absent, null, or a number in `range`.
fn number(m: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(bad(
                key,
                format!("`{key}` must be between {lo} and {hi}, got {n}."),
            )),
        },
        Some(other) => Err(bad(key, format!("`{key}` must be a number, got {other}."))),
    }
}

/// A field that must be absent, null, or a boolean.
fn boolean(m: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(
            key,
            format!("`{key}` must be true or false, got {other}."),
        )),
    }
}

/// What every generation request shares.
fn common(m: &Map<String, Value>) -> Result<Request, ApiError> {
    let model = match m.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(bad(
                "model",
                "`model` is required (a string: GET /v1/models lists it).",
            ))
        }
    };
    match m.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(bad(
                "n",
                format!("Only one choice per request is supported (`n` = 1), got {v}."),
            ))
        }
    }
    for key in ["tools", "functions", "tool_choice", "function_call"] {
        if m.get(key).is_some_and(|v| !v.is_null()) {
            return Err(bad(
                key,
                format!("`{key}` is not supported: this server's models answer in text only."),
            ));
        }
    }
    for key in ["logprobs", "top_logprobs", "echo"] {
        if m.get(key)
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        {
            return Err(bad(
                key,
                format!("`{key}` is not supported by this server."),
            ));
        }
    }
    let tokens = |key: &str| -> Result<Option<usize>, ApiError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                _ => Err(bad(
                    key,
                    format!("`{key}` must be a whole number of tokens, at least 1, got {v}."),
                )),
            },
        }
    };
    let max_tokens = match (tokens("max_completion_tokens")?, tokens("max_tokens")?) {
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad("stop", format!("`stop` holds {other}, not a string."))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(
                "stop",
                format!("`stop` must be a string or a list of strings, got {other}."),
            ))
        }
    };
    if stop.len() > MAX_STOP {
        return Err(bad(
            "stop",
            format!("At most {MAX_STOP} stop sequences, got {}.", stop.len()),
        ));
    }
    if stop
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(bad(
            "stop",
            format!("A stop sequence must be 1 to {MAX_STOP_BYTES} bytes long."),
        ));
    }
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?,
        Some(other) => {
            return Err(bad(
                "stream_options",
                format!("`stream_options` must be an object, got {other}."),
            ))
        }
    };
    let seed = match m.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| bad("seed", format!("`seed` must be an integer, got {v}.")))?,
        ),
    };
    Ok(Request {
        model,
        messages: None,
        prompt: String::new(),
        max_tokens,
        temperature: number(m, "temperature", 0.0, 2.0)?.map(|x| x as f32),
        top_p: match number(m, "top_p", 0.0, 1.0)? {
            Some(0.0) => return Err(bad("top_p", "`top_p` must be above 0.")),
            other => other.map(|x| x as f32),
        },
        seed,
        stop,
        stream: boolean(m, "stream")?,
        include_usage,
    })
}

/// A message's text: a string, or a list of `{"type": "text", "text": …}` parts.
fn content(v: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Ok(String::new()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(bad(
                            at,
                            format!(
                                "Only text content parts are supported, got a part of type {}.",
                                kind.unwrap_or("(none)")
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(other) => Err(bad(
            at,
            format!("A message's content must be a string or a list of text parts, got {other}."),
        )),
    }
}

/// `POST /v1/chat/completions`.
pub fn chat_request(body: &[u8]) -> Result<Request, ApiError> {
    let m = object(body)?;
    let mut r = common(&m)?;
    let list = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(bad(
                "messages",
                "`messages` is empty: give at least one message.",
            ))
        }
        _ => {
            return Err(bad(
                "messages",
                "`messages` is required (a list of {role, content}).",
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = msg.get("role").and_then(Value::as_str).unwrap_or("");
        let text = content(msg.get("content"), &at)?;
        messages.push(match role {
            "system" | "developer" => Message::system(text),
            "user" => Message::user(text),
            "assistant" => Message::assistant(text),
            "tool" | "function" => {
                return Err(bad(
                    &at,
                    "Tool messages are not supported: this server's models answer in text only.",
                ))
            }
            other => {
                return Err(bad(
                    &at,
                    format!("Unknown role {other:?} (system, developer, user or assistant)."),
                ))
            }
        });
    }
    r.messages = Some(messages);
    Ok(r)
}

/// `POST /v1/completions` (one prompt string).
pub fn completion_request(body: &[u8]) -> Result<Request, ApiError> {
    let m = object(body)?;
    let mut r = common(&m)?;
    r.prompt = match m.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(bad("prompt", "Only one prompt per request is supported."))
        }
        None | Some(Value::Null) => return Err(bad("prompt", "`prompt` is required (a string).")),
        Some(other) => {
            return Err(bad(
                "prompt",
                format!("`prompt` must be a string, got {other}."),
            ))
        }
    };
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(body: &str) -> (Option<String>, String) {
        let e = chat_request(body.as_bytes()).expect_err(body);
        (e.param, e.message)
    }

    #[test]
    fn a_chat_request_is_read_with_its_options() {
        let r = chat_request(br#"{"model": "m", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3,
            "stop": "END", "stream": true, "stream_options": {"include_usage": true}, "user": "ignored"}"#)
            .expect("valid");
        assert_eq!(r.messages.as_ref().map(Vec::len), Some(2));
        assert_eq!(r.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(
            (r.temperature, r.top_p, r.seed),
            (Some(0.0), Some(0.5), Some(3))
        );
        assert_eq!(r.stop, vec!["END".to_string()]);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn hostile_requests_are_refused_naming_the_field() {
        for (body, param) in [
            ("[1, 2]", None),
            ("{\"model\": ", None),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                Some("model"),
            ),
            (r#"{"model": "m", "messages": []}"#, Some("messages")),
            (r#"{"model": "m"}"#, Some("messages")),
            (
                r#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#,
                Some("messages[0]"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
                Some("messages[0]"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                Some("messages[0]"),
            ),
            (
                r#"{"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("n"),
            ),
            (
                r#"{"model": "m", "tools": [], "messages": [{"role": "user", "content": "x"}]}"#,
                Some("tools"),
            ),
            (
                r#"{"model": "m", "temperature": 3, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]}"#,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "top_p": 0, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("top_p"),
            ),
            (
                r#"{"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "max_tokens": -5, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "max_tokens": 2.5, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "stop": ["a","b","c","d","e"], "messages": [{"role": "user", "content": "x"}]}"#,
                Some("stop"),
            ),
            (
                r#"{"model": "m", "stop": [""], "messages": [{"role": "user", "content": "x"}]}"#,
                Some("stop"),
            ),
            (
                r#"{"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}"#,
                Some("stream"),
            ),
            (
                r#"{"model": "m", "seed": "x", "messages": [{"role": "user", "content": "x"}]}"#,
                Some("seed"),
            ),
        ] {
            let (got, message) = reason(body);
            assert_eq!(got.as_deref(), param, "{body}: {message}");
            assert!(!message.is_empty());
        }
    }

    #[test]
    fn a_completion_request_takes_one_prompt() {
        let r = completion_request(br#"{"model": "m", "prompt": "Once"}"#).expect("valid");
        assert_eq!(r.prompt, "Once");
        assert!(r.messages.is_none());
        let e = completion_request(br#"{"model": "m", "prompt": ["a", "b"]}"#).expect_err("two");
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
