//! The local API server inside the app (issue 15): the OpenAI-compatible API of `tptt_api`,
//! serving the model chosen in Settings ([`host::AppHost`]) on `127.0.0.1` — never another
//! interface: programs of this computer only. Off by default; "Local API server" in Settings
//! switches it on, picks its port and its key ([`settings::ApiServerSettings`]).
//!
//! Its requests run on the app's engine thread, queued with the user's chats, and are kept out
//! of the conversations: nothing an API client sends is stored (its conversation states live in
//! the server's memory, [`tptt_api::sessions`], and go with it).
//!
//! [`ApiControl::apply`] makes the running server match the settings (started, stopped, or
//! restarted on a new port or key); [`ApiControl::status`] is what Settings shows.

pub mod host;
pub mod settings;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tauri::async_runtime::JoinHandle;
use tptt_api::{Api, ApiConfig};

use crate::state::{lock, AppState};
pub use settings::{ApiServerDto, ApiServerSettings, ApiServerStatus};

/// How long a restart waits for the old server to let go of its port.
const PORT_RELEASE: Duration = Duration::from_secs(3);

/// A server that runs.
struct RunningServer {
    settings: ApiServerSettings,
    api: Arc<Api>,
    url: String,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// What runs, or why nothing does.
#[derive(Default)]
struct Current {
    running: Option<RunningServer>,
    /// The settings that failed to start, and why.
    failed: Option<(ApiServerSettings, String)>,
}

/// The app's API server (module doc).
#[derive(Default)]
pub struct ApiControl {
    current: Mutex<Current>,
    /// Held through an [`ApiControl::apply`]: two never interleave.
    applying: tokio::sync::Mutex<()>,
}

impl ApiControl {
    /// What Settings shows.
    pub fn status(&self, state: &AppState) -> ApiServerStatus {
        let c = lock(&self.current);
        match (&c.running, &c.failed) {
            (Some(r), _) => ApiServerStatus::Listening {
                url: r.url.clone(),
                model_id: host::model_id(&state.settings()),
                served: r.api.requests(),
            },
            (None, Some((_, why))) => ApiServerStatus::Failed {
                message: why.clone(),
            },
            (None, None) => ApiServerStatus::Off,
        }
    }

    /// Drops the conversation states the server keeps (the loaded model changes: they hold
    /// its weights).
    pub fn forget_sessions(&self) {
        if let Some(r) = &lock(&self.current).running {
            r.api.forget_sessions();
        }
    }

    /// Makes the server match `state`'s settings: starts it, stops it, or restarts it on a new
    /// port or key (its open requests are cancelled). A port that cannot be used leaves it
    /// stopped, with the reason in [`ApiControl::status`].
    pub async fn apply(&self, state: &AppState) -> ApiServerStatus {
        let _one = self.applying.lock().await;
        let want = state.settings().api_server;
        let old = {
            let mut c = lock(&self.current);
            let same = c.running.as_ref().is_some_and(|r| r.settings == want);
            if same || (!want.enabled && c.running.is_none()) {
                if !want.enabled {
                    c.failed = None;
                }
                drop(c);
                return self.status(state);
            }
            c.failed = None;
            c.running.take()
        };
        let old_port = old.as_ref().map(|o| o.port);
        if let Some(old) = old {
            stop(old).await;
        }
        if want.enabled {
            match start(state, &want, old_port).await {
                Ok(r) => {
                    tracing::info!(url = %r.url, "the local API server listens");
                    lock(&self.current).running = Some(r);
                }
                Err(why) => {
                    tracing::warn!(%why, "the local API server cannot start");
                    lock(&self.current).failed = Some((want, why));
                }
            }
        } else {
            tracing::info!("the local API server is stopped");
        }
        self.status(state)
    }
}

/// Stops `server`: its requests are cancelled, its listener closed; waits (a little) for it.
async fn stop(mut server: RunningServer) {
    server.api.stop();
    if let Some(tx) = server.stop.take() {
        let _ = tx.send(());
    }
    if tokio::time::timeout(PORT_RELEASE, &mut server.task)
        .await
        .is_err()
    {
        server.task.abort();
    }
}

/// Binds `127.0.0.1:port` and serves the API there.
async fn start(
    state: &AppState,
    want: &ApiServerSettings,
    old_port: Option<u16>,
) -> Result<RunningServer, String> {
    let port = want.port;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + PORT_RELEASE;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            // The server just stopped may not have let go of its port yet.
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && old_port == Some(port)
                    && port != 0
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(format!(
                    "Port {port} is already in use by another program: choose another port (or 0 for any free one)."
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "Port {port} is reserved by the system: choose a port above 1023 (or 0 for any free one)."
                ))
            }
            Err(e) => return Err(format!("Cannot listen on 127.0.0.1:{port}: {e}")),
        }
    };
    let at = listener
        .local_addr()
        .map_err(|e| format!("Cannot read the server's address: {e}"))?;
    let cfg = ApiConfig {
        api_key: Some(want.api_key.clone()).filter(|k| !k.is_empty()),
        ..Default::default()
    };
    let api = Api::new(host::AppHost::new(state), cfg);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = api.clone();
    let task = tauri::async_runtime::spawn(async move {
        let stopped = async move {
            let _ = rx.await;
        };
        if let Err(e) = tptt_api::serve_until(listener, serving, stopped).await {
            tracing::error!(error = %e, "the local API server failed");
        }
    });
    Ok(RunningServer {
        settings: want.clone(),
        api,
        url: format!("http://{at}/v1"),
        port: at.port(),
        stop: Some(tx),
        task,
    })
}
