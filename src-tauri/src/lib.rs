//! `tptt-chat`: the TPTT Chat desktop app (Tauri 2) — the only crate that knows Tauri and the
//! UI's JSON. The model, generation, hub and store crates do the work; this one wires them to
//! the web UI (`ui/`, served from `ui/dist`) through the commands and channels of
//! `docs/ipc.md`.
//!
//! - [`commands`]: one thin `#[tauri::command]` per IPC command.
//! - [`chat`]: chat turns on worker threads, streaming through a `Channel`, stop, partial saves,
//!   state snapshots, and the conversation memory rule (its module doc).
//! - [`models`]: the model manager (catalog, added repositories, imported folders, variant
//!   listings, downloads with progress / cancel / resume).
//! - [`runtime`]: the loaded model and its engine thread; [`device`]: CPU / CUDA / Metal.
//! - [`settings`]: validated settings and the Hugging Face token file.
//! - [`desktop`]: one instance, the window's geometry remembered, native file dialogs, links
//!   and folders handed to the desktop (Tauri's plugins); [`logging`]: stderr and a rotating
//!   log file in the app's log folder.
//! - [`launch`]: the command line (`--model FOLDER [--variant V]`: a folder imported and chosen).
//! - [`cleanup`]: at start-up, the snapshot files a crash left half-written are deleted.
//! - [`state`]: [`AppState`] and [`AppConfig`]; [`dto`]: the camelCase wire types;
//!   [`error`]: [`CommandError`] (`{ kind, message }`); [`ipc_types`]: their TypeScript, generated
//!   into `ui/src/services/ipc.gen.ts` (checked by a test).
//! - [`webview`]: on Linux without a GPU render node, WebKit paints without compositing (its
//!   software OpenGL would take the model's CPU).
//!
//! Invariants: commands return at once (long work is on worker threads); at most one
//! generation runs; a user's message is stored before its answer is generated; an answer's
//! text is saved while it streams and when it stops or fails.
//!
//! [`build_app`] takes its runtime (`tauri::Builder<R>`) and its context, so the tests run the
//! same app on Tauri's mock runtime; [`run_app`] is the real thing.

pub mod api_server;
pub mod backup;
pub mod chat;
pub mod chat_settings;
pub mod cleanup;
pub mod commands;
pub mod desktop;
pub mod device;
pub mod documents;
pub mod dto;
pub mod error;
pub mod ipc_commands;
pub mod ipc_types;
pub mod launch;
pub mod logging;
pub mod memories;
pub mod models;
pub mod runtime;
pub mod settings;
pub mod state;
pub mod webview;

pub use error::{CmdResult, CommandError, ErrorKind};
pub use state::{AppConfig, AppState};

use tauri::{App, Builder, Context, Manager, Runtime};

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The conversation database could not be opened, not even in memory.
    #[error("cannot open the conversation database: {0}")]
    Store(#[from] tptt_store::Error),
    /// Tauri failed (no display, a broken configuration...).
    #[error(transparent)]
    Tauri(#[from] tauri::Error),
    /// The command line's `--model` cannot be used ([`launch`]).
    #[error("{0}")]
    Launch(CommandError),
}

/// Builds the app on `builder`'s runtime with `context` and `config`: opens the database,
/// registers the state, the commands and the plugins they use ([`desktop::with_system_plugins`]).
/// Nothing runs until the caller runs the app.
pub fn build_app<R: Runtime>(
    builder: Builder<R>,
    context: Context<R>,
    config: AppConfig,
) -> Result<App<R>, AppError> {
    tracing::info!(data = %config.data_dir.display(), cache = %config.hub.cache_dir.display(), "starting");
    let state = tauri::async_runtime::block_on(AppState::open(config))?;
    // The local API server, when the settings switch it on (a port in use is shown in Settings).
    tauri::async_runtime::block_on(state.api_server.apply(&state));
    let app = desktop::with_system_plugins(builder)
        .manage(state)
        .invoke_handler(ipc_commands::handler())
        .build(context)?;
    Ok(app)
}

/// Runs the app with its embedded configuration and UI on `config` (the per-user folders and
/// the hub of the environment: [`AppConfig::from_env`]), as a desktop app: one instance, the
/// window's geometry remembered ([`desktop::with_desktop_plugins`]), the model of the command
/// line ([`launch::check`]ed by the caller) chosen ([`launch::apply`], once a second launch has
/// handed over and exited). Returns
/// when the last window closes.
pub fn run_app<R: Runtime>(
    builder: Builder<R>,
    config: AppConfig,
    choice: Option<launch::ModelChoice>,
) -> Result<(), AppError> {
    let builder = desktop::with_desktop_plugins(builder);
    let app = build_app(builder, tauri::generate_context!(), config)?;
    // Before the event loop runs: the web UI reads the settings after this.
    if let Some(choice) = &choice {
        let state = app.state::<AppState>().inner().clone();
        tauri::async_runtime::block_on(launch::apply(&state, choice)).map_err(AppError::Launch)?;
    }
    desktop::exit_on_terminate(app.handle());
    app.run(|_, _| {});
    Ok(())
}
