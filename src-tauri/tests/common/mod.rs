//! Test helpers: the app on Tauri's mock runtime with a temporary data folder, IPC invocation
//! through a mock webview, channels collected in Rust, the tiny fixture models.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use serde_json::{json, Value};
use tauri::ipc::{CallbackFn, Channel, InvokeBody, InvokeResponseBody};
use tauri::test::{
    get_ipc_response, mock_builder, mock_context, noop_assets, MockRuntime, INVOKE_KEY,
};
use tauri::webview::InvokeRequest;
use tauri::{App, Manager, WebviewWindow, WebviewWindowBuilder};
use tptt_chat::{build_app, AppConfig, AppState};
use tptt_hub::HubConfig;

/// How long a test waits for a stream to end.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// tests/fixtures/tiny of the workspace.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny")
}

/// The tiny Llama TPTT repository (17 variants; base `llama-base` beside it).
pub fn tiny_llama() -> PathBuf {
    std::fs::canonicalize(tiny().join("tptt-llama")).expect("fixture folder")
}

/// An app on the mock runtime over `dir`, with a hub at `hub_url` caching into `dir/hf`.
pub struct TestApp {
    pub app: App<MockRuntime>,
    pub window: WebviewWindow<MockRuntime>,
    pub dir: PathBuf,
}

impl TestApp {
    pub fn start(dir: &Path, hub_url: &str) -> Self {
        Self::start_with(dir, hub_url, |_| {})
    }

    /// [`TestApp::start`] with a changed configuration.
    pub fn start_with(dir: &Path, hub_url: &str, tweak: impl FnOnce(&mut AppConfig)) -> Self {
        let mut config = AppConfig::in_dir(dir, HubConfig::new(hub_url, dir.join("hf")));
        tweak(&mut config);
        let app =
            build_app(mock_builder(), mock_context(noop_assets()), config).expect("build the app");
        let window = WebviewWindowBuilder::new(&app, "main", Default::default())
            .build()
            .expect("mock window");
        Self {
            app,
            window,
            dir: dir.to_path_buf(),
        }
    }

    /// No hub reachable (port 9, discard): everything must work offline.
    pub fn offline(dir: &Path) -> Self {
        Self::start(dir, "http://127.0.0.1:9")
    }

    pub fn state(&self) -> tauri::State<'_, AppState> {
        self.app.state::<AppState>()
    }

    /// Invokes `cmd` through the mock webview as the UI does: `Ok(json)` or `Err({kind, message})`.
    pub fn invoke(&self, cmd: &str, args: Value) -> Result<Value, Value> {
        let request = InvokeRequest {
            cmd: cmd.into(),
            callback: CallbackFn(0),
            error: CallbackFn(1),
            url: "tauri://localhost".parse().expect("url"),
            body: InvokeBody::Json(args),
            headers: Default::default(),
            invoke_key: INVOKE_KEY.to_string(),
        };
        get_ipc_response(&self.window, request)
            .map(|b| b.deserialize::<Value>().expect("JSON answer"))
    }

    /// `invoke` that must succeed.
    pub fn ok(&self, cmd: &str, args: Value) -> Value {
        self.invoke(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd} failed: {e}"))
    }

    /// `invoke` that must fail with `kind`; returns the message.
    pub fn err(&self, cmd: &str, args: Value, kind: &str) -> String {
        let e = self.invoke(cmd, args).expect_err(cmd);
        assert_eq!(e["kind"], kind, "{cmd}: {e}");
        e["message"].as_str().expect("message").to_string()
    }

    /// Imports the tiny Llama repository and chooses `variant`, greedy, `max_new` tokens.
    pub fn use_tiny(&self, variant: &str, max_new: u32) -> String {
        let entry = self.ok(
            "import_local_model",
            json!({"path": tiny_llama().display().to_string()}),
        );
        let repo = entry["repoId"].as_str().expect("repo id").to_string();
        self.choose(&repo, variant, max_new);
        repo
    }

    pub fn choose(&self, repo: &str, variant: &str, max_new: u32) {
        let mut s = self.ok("get_settings", json!({}));
        s["modelRepo"] = json!(repo);
        s["variant"] = json!(variant);
        s["device"] = json!("cpu");
        s["sampling"]["temperature"] = json!(0.0);
        s["sampling"]["maxNewTokens"] = json!(max_new);
        s["sampling"]["repeatPenalty"] = json!(1.0);
        s["sampling"]["seed"] = json!(7);
        self.ok("set_settings", json!({"settings": s}));
    }

    pub fn new_conversation(&self) -> String {
        self.ok("create_conversation", json!({}))["id"]
            .as_str()
            .expect("id")
            .to_string()
    }

    pub fn conversation(&self, id: &str) -> Value {
        self.ok("get_conversation", json!({"id": id}))
    }
}

/// A channel whose messages arrive in the returned receiver, as JSON.
pub fn channel<T>() -> (Channel<T>, Receiver<Value>) {
    let (tx, rx) = mpsc::channel();
    let ch = Channel::new(move |body: InvokeResponseBody| {
        let v = match body {
            InvokeResponseBody::Json(s) => serde_json::from_str(&s).expect("channel JSON"),
            InvokeResponseBody::Raw(b) => json!({ "raw": b.len() }),
        };
        let _ = tx.send(v);
        Ok(())
    });
    (ch, rx)
}

/// The events of one generation up to its end (`done`, `stopped` or `error`).
pub fn until_end(rx: &Receiver<Value>) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let e = rx
            .recv_timeout(STREAM_TIMEOUT)
            .expect("the stream ends in time");
        let kind = e["kind"].as_str().unwrap_or_default().to_string();
        out.push(e);
        if matches!(kind.as_str(), "done" | "stopped" | "error" | "cancelled") {
            return out;
        }
    }
}

/// The concatenated `token` texts.
pub fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["kind"] == "token")
        .filter_map(|e| e["text"].as_str())
        .collect()
}

pub fn last_kind(events: &[Value]) -> &str {
    events
        .last()
        .and_then(|e| e["kind"].as_str())
        .unwrap_or_default()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tauri::async_runtime::block_on(f)
}

/// Sends `content` (direct call with a Rust channel): the result and the events to the end.
pub fn send(app: &TestApp, conversation: &str, content: &str) -> (Value, Vec<Value>) {
    let (ch, rx) = channel();
    let r = block_on(tptt_chat::commands::send_message(
        app.state(),
        conversation.into(),
        content.into(),
        ch,
    ))
    .expect("send_message");
    let events = until_end(&rx);
    (serde_json::to_value(r).expect("json"), events)
}
