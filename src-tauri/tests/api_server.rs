//! The local API server inside the app (Settings → "Local API server"), over real HTTP on
//! loopback, with the tiny fixture model:
//!
//! * off by default; switched on it listens (port 0: any free one, shown in its status); with no
//!   model chosen it lists none and answers 503 saying so;
//! * with a model chosen, the first request starts loading it (503 `model_loading`), then it
//!   answers — the same text the app's own chat gives the same message under greedy decoding —
//!   and nothing of it shows up in the conversations; a second turn resumes its state;
//! * a request and a chat turn at the same time both finish (they queue on the one engine);
//! * a key set in Settings is required at once (restart on the same port); a port in use is a
//!   clear status, the settings are kept; switched off, the port is closed;
//! * another model chosen: requests must name it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// POST `body` to `url/chat/completions`: status and JSON.
fn chat(url: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut req = client()
        .post(format!("{url}/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().expect("send");
    let status = resp.status().as_u16();
    let body = resp.text().expect("body");
    (status, serde_json::from_str(&body).expect("a JSON answer"))
}

/// `GET url/models`.
fn get_models(url: &str) -> Value {
    let body = client()
        .get(format!("{url}/models"))
        .send()
        .and_then(|r| r.text())
        .expect("models");
    serde_json::from_str(&body).expect("JSON")
}

/// [`chat`] until the model has loaded (503 `model_loading` meanwhile).
fn chat_when_loaded(url: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, v) = chat(url, body, key);
        if status != 503 || v["error"]["code"] != "model_loading" || Instant::now() > until {
            return (status, v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Saves the settings with `edit` applied to the API server's; the status after.
fn set_api(app: &TestApp, edit: impl FnOnce(&mut Value)) -> Value {
    let mut s = app.ok("get_settings", json!({}));
    edit(&mut s["apiServer"]);
    app.ok("set_settings", json!({"settings": s}));
    app.ok("api_server_status", json!({}))
}

fn url_of(status: &Value) -> String {
    assert_eq!(status["state"], "listening", "{status}");
    status["url"].as_str().expect("url").to_string()
}

fn port_of(url: &str) -> u16 {
    url.trim_end_matches("/v1")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

#[test]
fn the_app_serves_its_model_on_a_local_openai_api() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    let defaults = app.ok("get_settings", json!({}));
    assert_eq!(defaults["apiServer"]["enabled"], false, "off by default");
    assert_eq!(
        app.ok("api_server_status", json!({})),
        json!({"state": "off"})
    );

    // On, no model chosen yet.
    let status = set_api(&app, |a| {
        a["enabled"] = json!(true);
        a["port"] = json!(0);
    });
    let url = url_of(&status);
    assert!(url.starts_with("http://127.0.0.1:"), "loopback only: {url}");
    assert_eq!(status["modelId"], json!(null));
    let models = get_models(&url);
    assert_eq!(models["data"], json!([]), "{models}");
    let hi = json!({"model": "x", "messages": [{"role": "user", "content": "Hi"}]});
    let (status, v) = chat(&url, &hi, None);
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("No model is chosen"),
        "{v}"
    );

    // A model chosen: the request names it, the first one loads it.
    app.use_tiny("delta_rule", 8);
    let status = app.ok("api_server_status", json!({}));
    let model = status["modelId"].as_str().expect("model id").to_string();
    assert_eq!(model, "tptt-llama/delta_rule");
    let ask = |messages: Value, n: u32| json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": n});
    let first = json!([{"role": "user", "content": "Hello there"}]);
    let (status, v) = chat(&url, &ask(first.clone(), 8), None);
    assert_eq!(status, 503, "the model was not loaded yet: {v}");
    assert_eq!(v["error"]["code"], "model_loading", "{v}");
    let (status, answer) = chat_when_loaded(&url, &ask(first.clone(), 8), None);
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(!text.is_empty());
    let none = app.ok("list_conversations", json!({"query": null}));
    assert_eq!(
        none,
        json!([]),
        "API requests stay out of the conversations"
    );

    // The app's own chat, same message, same greedy decoding: the same answer.
    let c = app.new_conversation();
    let (_, events) = send(&app, &c, "Hello there");
    assert_eq!(last_kind(&events), "done");
    assert_eq!(
        streamed_text(&events),
        text,
        "the API answers as the app's chat"
    );

    // A second turn resumes the first's state.
    let prompt_tokens = answer["usage"]["prompt_tokens"].as_u64().expect("prompt");
    let second = json!([
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And then?"}
    ]);
    let (status, v) = chat(&url, &ask(second, 4), None);
    assert_eq!(status, 200, "{v}");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    assert!(cached >= prompt_tokens, "{v}");

    // An API request and a chat turn at the same time: both finish.
    let long = ask(json!([{"role": "user", "content": "Tell me more"}]), 48);
    let api_url = url.clone();
    let request = std::thread::spawn(move || chat(&api_url, &long, None));
    let (_, events) = send(&app, &c, "Go on");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let (status, v) = request.join().expect("request thread");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        app.ok("list_conversations", json!({"query": null}))
            .as_array()
            .map(Vec::len),
        Some(1),
        "still only the user's conversation"
    );

    // A key: required at once, on the same port (the old server lets go of it).
    let port = port_of(&url);
    let status = set_api(&app, |a| {
        a["port"] = json!(port);
        a["apiKey"] = json!("sk-local-1");
    });
    assert_eq!(url_of(&status), url, "restarted on the same port");
    let hello = ask(first.clone(), 2);
    let (status, v) = chat(&url, &hello, None);
    assert_eq!(status, 401, "{v}");
    let (status, v) = chat(&url, &hello, Some("sk-local-2"));
    assert_eq!(status, 401, "{v}");
    let (status, v) = chat(&url, &hello, Some("sk-local-1"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        app.ok("get_settings", json!({}))["apiServer"]["apiKey"],
        "sk-local-1",
        "the key is shown in Settings (clients need it)"
    );

    // A port in use: a clear status; the settings are saved all the same.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let status = set_api(&app, |a| a["port"] = json!(taken_port));
    assert_eq!(status["state"], "failed", "{status}");
    let why = status["message"].as_str().expect("message");
    assert!(
        why.contains(&format!("Port {taken_port} is already in use")),
        "{why}"
    );
    assert_eq!(
        app.ok("get_settings", json!({}))["apiServer"]["port"],
        json!(taken_port)
    );
    assert!(
        client().get(format!("{url}/models")).send().is_err(),
        "the old port is closed"
    );
    drop(taken);
    // Hostile values are refused by field, and change nothing.
    for (field, value) in [
        ("port", json!(-1)),
        ("port", json!(65536)),
        ("port", json!(1.5)),
        ("apiKey", json!("two words")),
    ] {
        let mut s = app.ok("get_settings", json!({}));
        s["apiServer"][field] = value;
        let msg = app.err("set_settings", json!({"settings": s}), "invalid_settings");
        assert!(msg.starts_with(&format!("apiServer.{field}")), "{msg}");
    }

    // Back on a free port, then another model: requests must name the new one.
    let url = url_of(&set_api(&app, |a| a["port"] = json!(0)));
    app.use_tiny("delta_product", 8);
    let (status, v) = chat(&url, &ask(first.clone(), 2), Some("sk-local-1"));
    assert_eq!(status, 404, "the old model's id: {v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    let renamed = json!({"model": "tptt-llama/delta_product", "messages": first, "temperature": 0, "max_tokens": 2});
    let (status, v) = chat_when_loaded(&url, &renamed, Some("sk-local-1"));
    assert_eq!(status, 200, "{v}");

    // Off: the port is closed.
    assert_eq!(
        set_api(&app, |a| a["enabled"] = json!(false)),
        json!({"state": "off"})
    );
    assert!(client().get(format!("{url}/models")).send().is_err());
}

#[test]
fn the_server_starts_with_the_app_when_it_is_switched_on() {
    let dir = tempfile::tempdir().expect("dir");
    {
        let app = TestApp::offline(dir.path());
        set_api(&app, |a| {
            a["enabled"] = json!(true);
            a["port"] = json!(0);
        });
    }
    let again = TestApp::offline(dir.path());
    let url = url_of(&again.ok("api_server_status", json!({})));
    let models = get_models(&url);
    assert_eq!(models["object"], "list");
}
