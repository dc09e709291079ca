//! The OpenAI-compatible server over real HTTP on loopback, on the tiny fixture model:
//!
//! * `GET /v1/models`; a chat completion; the same request streamed gives the same text under
//!   greedy decoding, ends with `[DONE]` and reports usage when asked; a plain completion;
//! * a second turn (the conversation so far plus a new message) resumes the first turn's state:
//!   `cached_tokens` covers the first turn's prompt and answer;
//! * a client that disconnects mid-stream cancels its generation, and the server serves on;
//! * bad input gets an OpenAI error object with the right status: malformed JSON, empty
//!   messages, `n` > 1, tools, an unknown model, a wrong key, a body over the limit, an unknown
//!   path, a full queue.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tptt::model::{LoadOptions, Model};
use tptt::repo::TpttRepo;
use tptt_api::{Api, ApiConfig, LoadingHost, Serving};
use tptt_engine::{ChatModel, Engine};

const MODEL: &str = "tiny/delta_rule";

/// A server of the tiny fixture (tptt-llama, delta_rule) on a free loopback port, with `cfg`'s
/// changes; its runtime lives as long as the returned value.
struct Server {
    api: Arc<Api>,
    host: Arc<LoadingHost>,
    url: String,
    _runtime: tokio::runtime::Runtime,
}

/// The fixture's model, ready to serve as [`MODEL`] on its own engine thread.
fn fixture() -> Serving {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/tptt-llama");
    let files = TpttRepo::open(&repo)
        .and_then(|r| r.variant(Some("delta_rule"), None))
        .expect("fixture");
    let model = Model::load(&files, &LoadOptions::default()).expect("model");
    let chat = ChatModel::new(model, &files, "tiny").expect("chat model");
    let engine = Engine::spawn(chat.tokenizer.clone()).expect("engine");
    Serving {
        model_id: MODEL.into(),
        chat,
        runner: Arc::new(engine),
        window: None,
        kv_format: Default::default(),
    }
}

/// A server whose model is still loading (its host is set by the test).
fn start_loading(configure: impl FnOnce(&mut ApiConfig)) -> Server {
    let mut cfg = ApiConfig {
        default_max_tokens: 16,
        ..Default::default()
    };
    configure(&mut cfg);
    let host = LoadingHost::new(MODEL);
    let api = Api::new(host.clone(), cfg);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        ))))
        .expect("bind");
    let at = listener.local_addr().expect("address");
    runtime.spawn(tptt_api::serve(listener, api.clone()));
    Server {
        api,
        host,
        url: format!("http://{at}/v1"),
        _runtime: runtime,
    }
}

fn start(configure: impl FnOnce(&mut ApiConfig)) -> Server {
    let s = start_loading(configure);
    s.host.set(Ok(fixture()));
    s
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// POST `body` to `path`: the status and the JSON answer.
fn post(s: &Server, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut req = client()
        .post(format!("{}{path}", s.url))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().expect("send");
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_str(&resp.text().expect("body")).expect("a JSON answer"),
    )
}

/// The events of a streamed answer (`data:` payloads, `[DONE]` included).
fn stream(s: &Server, body: &Value) -> Vec<String> {
    let resp = client()
        .post(format!("{}/chat/completions", s.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().expect("body");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn error_of(v: &Value) -> (&str, &str) {
    (
        v["error"]["type"].as_str().unwrap_or_default(),
        v["error"]["message"].as_str().unwrap_or_default(),
    )
}

fn greedy(messages: Value, max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
}

#[test]
fn chat_streaming_completions_and_a_resumed_second_turn() {
    let s = start(|_| {});
    let models: Value = client()
        .get(format!("{}/models", s.url))
        .send()
        .and_then(|r| r.text())
        .map(|t| serde_json::from_str(&t).expect("JSON"))
        .expect("models");
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    let first = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]);
    let (status, answer) = post(&s, "/chat/completions", &greedy(first.clone(), 12), None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let usage = &answer["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("prompt tokens");
    let completion = usage["completion_tokens"]
        .as_u64()
        .expect("completion tokens");
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 0,
        "a new conversation"
    );

    // The same request streamed: the same text, [DONE] last, the usage when asked.
    let mut body = greedy(first.clone(), 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&s, &body);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, text,
        "streamed and whole answers agree under greedy decoding"
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(
        last["usage"]["completion_tokens"].as_u64(),
        Some(completion)
    );

    // The second turn: the conversation so far plus a new message resumes the first's state.
    let kept = s.api.kept_sessions();
    assert!(kept >= 1, "the conversation's state is kept");
    let second = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And then?"}
    ]);
    let (status, answer2) = post(&s, "/chat/completions", &greedy(second, 8), None);
    assert_eq!(status, 200, "{answer2}");
    let cached = answer2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    assert!(
        cached >= prompt,
        "the second turn reused the first's {prompt} prompt tokens (and its answer): cached {cached}"
    );
    assert!(answer2["usage"]["prompt_tokens"].as_u64().expect("prompt") > cached);

    // A plain completion.
    let (status, done) = post(
        &s,
        "/completions",
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}),
        None,
    );
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["object"], "text_completion");
    assert!(done["choices"][0]["text"].is_string());
}

/// A streamed greedy answer of up to a million tokens (the fixture model never stops by
/// itself that soon), read line by line.
fn long_stream(s: &Server) -> std::io::Lines<BufReader<reqwest::blocking::Response>> {
    let mut body = greedy(
        json!([{"role": "user", "content": "Tell me everything"}]),
        1_000_000,
    );
    body["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/chat/completions", s.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("send");
    BufReader::new(resp).lines()
}

#[test]
fn a_client_gone_mid_stream_cancels_its_generation() {
    let s = start(|_| {});
    let mut lines = long_stream(&s);
    // Two chunks read (the role, then text), then the connection is dropped.
    for _ in 0..4 {
        lines.next().expect("a line").expect("read");
    }
    drop(lines);
    let mut waited = 0;
    while s.api.cancelled() == 0 && waited < 600 {
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    assert_eq!(s.api.cancelled(), 1, "the generation was cancelled");
    // The model is free again.
    let (status, answer) = post(
        &s,
        "/chat/completions",
        &greedy(json!([{"role": "user", "content": "Hi"}]), 4),
        None,
    );
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn bad_requests_get_error_objects_with_their_status() {
    let s = start(|c| {
        c.api_key = Some("sesame".into());
        c.max_body_bytes = 64 << 10;
    });
    let key = Some("sesame");
    let ok_messages = json!([{"role": "user", "content": "x"}]);
    // The key.
    let (status, v) = post(
        &s,
        "/chat/completions",
        &greedy(ok_messages.clone(), 2),
        None,
    );
    assert_eq!(
        (status, error_of(&v).0),
        (401, "authentication_error"),
        "{v}"
    );
    let (status, v) = post(
        &s,
        "/chat/completions",
        &greedy(ok_messages.clone(), 2),
        Some("wrong"),
    );
    assert_eq!(status, 401, "{v}");
    let models = client()
        .get(format!("{}/models", s.url))
        .send()
        .expect("send");
    assert_eq!(models.status().as_u16(), 401);
    let (status, v) = post(
        &s,
        "/chat/completions",
        &greedy(ok_messages.clone(), 2),
        key,
    );
    assert_eq!(status, 200, "{v}");

    for (body, want, param) in [
        (json!({"model": MODEL, "messages": []}), 400, "messages"),
        (
            json!({"model": MODEL, "messages": ok_messages, "n": 3}),
            400,
            "n",
        ),
        (
            json!({"model": MODEL, "messages": ok_messages, "tools": [{"type": "function"}]}),
            400,
            "tools",
        ),
        (
            json!({"model": "gpt-4o", "messages": ok_messages}),
            404,
            "model",
        ),
        (
            json!({"model": MODEL, "messages": ok_messages, "temperature": -1}),
            400,
            "temperature",
        ),
    ] {
        let (status, v) = post(&s, "/chat/completions", &body, key);
        assert_eq!(status, want, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(!error_of(&v).1.is_empty());
    }
    // Malformed JSON, a body over the limit, an unknown path: still error objects.
    let raw = |path: &str, body: Vec<u8>| {
        let resp = client()
            .post(format!("{}{path}", s.url))
            .bearer_auth("sesame")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("send");
        let status = resp.status().as_u16();
        (
            status,
            serde_json::from_str::<Value>(&resp.text().expect("body")).expect("JSON"),
        )
    };
    let (status, v) = raw("/chat/completions", b"{\"model\": ".to_vec());
    assert_eq!(
        (status, error_of(&v).0),
        (400, "invalid_request_error"),
        "{v}"
    );
    let (status, v) = raw("/chat/completions", vec![b' '; 1 << 20]);
    assert_eq!(status, 413, "{v}");
    let (status, v) = raw("/embeddings", b"{}".to_vec());
    assert_eq!(status, 404, "{v}");
    let get = client()
        .get(format!("{}/chat/completions", s.url))
        .bearer_auth("sesame")
        .send()
        .expect("send");
    assert_eq!(get.status().as_u16(), 405);
    let v: Value = serde_json::from_str(&get.text().expect("body")).expect("JSON");
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
    // The server is still up.
    let (status, _) = post(
        &s,
        "/chat/completions",
        &greedy(json!([{"role": "user", "content": "y"}]), 2),
        key,
    );
    assert_eq!(status, 200);
}

#[test]
fn a_prompt_over_the_limit_is_refused_and_the_kept_conversation_survives() {
    let s = start(|c| c.max_prompt_tokens = 200);
    let first = json!([{"role": "user", "content": "Hello"}]);
    let (status, answer) = post(&s, "/chat/completions", &greedy(first, 6), None);
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"].clone();
    let total = answer["usage"]["total_tokens"].as_u64().expect("total");
    let long = "word ".repeat(400);
    let over = json!([
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": long}
    ]);
    let (status, v) = post(&s, "/chat/completions", &greedy(over, 4), None);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages");
    assert!(error_of(&v).1.contains("at most 200"), "{v}");
    let next = json!([
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "Short"}
    ]);
    let (status, v) = post(&s, "/chat/completions", &greedy(next, 4), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(total),
        "the refused request left the conversation's state kept"
    );
}

#[test]
fn past_the_queue_limit_a_request_gets_503() {
    let s = start(|c| c.max_waiting = 0);
    // One long generation holds the model; with no room to wait, the next is refused at once.
    let mut lines = long_stream(&s);
    lines.next().expect("a line").expect("read");
    let (status, v) = post(
        &s,
        "/chat/completions",
        &greedy(json!([{"role": "user", "content": "x"}]), 2),
        None,
    );
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "server_busy");
    drop(lines);
}

#[test]
fn while_the_model_loads_requests_get_503_and_a_failed_load_says_why() {
    let s = start_loading(|_| {});
    let ask = greedy(json!([{"role": "user", "content": "Hi"}]), 2);
    let (status, v) = post(&s, "/chat/completions", &ask, None);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "model_loading", "{v}");
    let resp = client()
        .post(format!("{}/chat/completions", s.url))
        .body(ask.to_string())
        .send()
        .expect("send");
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|h| h.to_str().ok()),
        Some("2"),
        "a 503 tells clients when to retry"
    );
    // The id is known while loading, and an unknown model is still a 404.
    let (status, v) = post(
        &s,
        "/chat/completions",
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}),
        None,
    );
    assert_eq!(status, 404, "{v}");
    s.host.set(Err("the weights file is truncated".into()));
    let (status, v) = post(&s, "/chat/completions", &ask, None);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "model_unavailable", "{v}");
    assert!(error_of(&v).1.contains("truncated"), "{v}");
    // Loaded at last: it answers.
    s.host.set(Ok(fixture()));
    let (status, v) = post(&s, "/chat/completions", &ask, None);
    assert_eq!(status, 200, "{v}");
}
