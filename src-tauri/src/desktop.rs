//! The desktop around the window, through Tauri's plugins:
//! - one instance ([`with_desktop_plugins`], `tauri-plugin-single-instance`): a second launch
//!   hands over to the first, which shows and focuses its window, and exits. On Linux the
//!   instances meet on the D-Bus session bus (name `org.tptt.chat.SingleInstance`); without a
//!   session bus every launch runs on its own;
//! - the main window's size, position and maximized state remembered between runs
//!   (`tauri-plugin-window-state`: `.window-state.json` in Tauri's config folder,
//!   `~/.config/org.tptt.chat` on Linux), saved when the window closes;
//! - native file dialogs ([`pick_folder`], [`pick_save_path`]; `tauri-plugin-dialog`, registered
//!   by [`with_system_plugins`]): the plugin's own IPC commands are not granted to the web UI
//!   (`capabilities/default.json`), the app's commands open the dialogs;
//! - links and folders handed to the desktop's opener ([`open_link`], [`open_folder`];
//!   `tauri-plugin-opener`'s functions, which need no registration: no opener command is
//!   exposed to the web UI).
//!
//! - a session's end ([`exit_on_terminate`]: SIGTERM at logout or shutdown, SIGINT from a
//!   terminal) closes the app as its window's close button does: the geometry is saved.
//!
//! Only the real app ([`crate::run_app`]) adds the single-instance and window-state plugins;
//! the tests' mock app has the dialogs (never opened there) and the opener.

use std::path::{Path, PathBuf};

use tauri::{AppHandle, Builder, Emitter, Manager, Runtime};
use tauri_plugin_dialog::DialogExt;

use crate::dto::LAUNCH_EVENT;
use crate::error::{CmdResult, CommandError};
use crate::state::AppState;

/// The label of the app's one window (tauri.conf.json).
pub const MAIN_WINDOW: &str = "main";

/// Adds the plugins of a real desktop session: one instance, the window's geometry remembered.
/// The single-instance plugin comes first, so a second launch exits before anything else
/// starts.
pub fn with_desktop_plugins<R: Runtime>(builder: Builder<R>) -> Builder<R> {
    builder
        .plugin(tauri_plugin_single_instance::init(|app, argv, cwd| {
            tracing::info!("a second launch: focusing this window");
            focus_main_window(app);
            follow_second_launch(app, argv, cwd);
        }))
        .plugin(tauri_plugin_window_state::Builder::default().build())
}

/// Follows a later launch's `--model` ([`crate::launch::handover`]) off the event loop and
/// tells the UI ([`LAUNCH_EVENT`]).
fn follow_second_launch<R: Runtime>(app: &AppHandle<R>, argv: Vec<String>, cwd: String) {
    let app = app.clone();
    tauri::async_runtime::spawn(async move {
        let state = app.state::<AppState>().inner().clone();
        if let Some(event) = crate::launch::handover(&state, &argv, Path::new(&cwd)).await {
            if let Err(e) = app.emit(LAUNCH_EVENT, event) {
                tracing::warn!(error = %e, "cannot tell the UI about the later launch");
            }
        }
    });
}

/// Adds the plugins the app's commands use (the native dialogs).
pub fn with_system_plugins<R: Runtime>(builder: Builder<R>) -> Builder<R> {
    builder.plugin(tauri_plugin_dialog::init())
}

/// Quits the app the way closing its window does (the window-state plugin saves the geometry
/// on the exit) on SIGTERM or SIGINT, instead of dying where the signal finds it.
#[cfg(unix)]
pub fn exit_on_terminate<R: Runtime>(app: &AppHandle<R>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGTERM / SIGINT");
            return;
        }
    };
    let app = app.clone();
    let watcher = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let name = if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                tracing::info!("{name}: quitting");
                app.exit(0);
            }
        });
    if let Err(e) = watcher {
        tracing::warn!(error = %e, "cannot start the signal watcher");
    }
}

/// Elsewhere the system's own handling stays.
#[cfg(not(unix))]
pub fn exit_on_terminate<R: Runtime>(_app: &AppHandle<R>) {}

/// Shows, un-minimizes and focuses the main window.
pub fn focus_main_window<R: Runtime>(app: &AppHandle<R>) {
    let Some(window) = app.get_webview_window(MAIN_WINDOW) else {
        tracing::warn!("no main window to focus");
        return;
    };
    for (what, result) in [
        ("show", window.show()),
        ("unminimize", window.unminimize()),
        ("focus", window.set_focus()),
    ] {
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot {what} the main window");
        }
    }
}

/// A folder chosen in the native folder dialog, or `None` when the user cancels.
pub async fn pick_folder<R: Runtime>(
    app: &AppHandle<R>,
    title: &str,
) -> CmdResult<Option<PathBuf>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    app.dialog()
        .file()
        .set_title(title)
        .pick_folder(move |picked| {
            let _ = tx.send(picked);
        });
    chosen_path(rx.await)
}

/// A file chosen in the native open dialog (one filter: `filter.0` names the `filter.1`
/// extensions), or `None` when the user cancels.
pub async fn pick_open_file<R: Runtime>(
    app: &AppHandle<R>,
    title: &str,
    filter: (&str, &[&str]),
) -> CmdResult<Option<PathBuf>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut dialog = app
        .dialog()
        .file()
        .set_title(title)
        .add_filter(filter.0, filter.1);
    if let Some(dir) = default_folder() {
        dialog = dialog.set_directory(dir);
    }
    dialog.pick_file(move |picked| {
        let _ = tx.send(picked);
    });
    chosen_path(rx.await)
}

/// In a debug build, the document the end-to-end test "chooses" (`TPTT_TEST_DOCUMENT`): a
/// native file dialog cannot be driven over WebDriver. Never read by a release build.
#[cfg(debug_assertions)]
fn scripted_document() -> Option<PathBuf> {
    std::env::var_os("TPTT_TEST_DOCUMENT").map(PathBuf::from)
}

#[cfg(not(debug_assertions))]
fn scripted_document() -> Option<PathBuf> {
    None
}

/// A document chosen in the native open dialog (the kinds `crate::documents` reads), or `None`.
pub async fn pick_document<R: Runtime>(app: &AppHandle<R>) -> CmdResult<Option<PathBuf>> {
    if let Some(path) = scripted_document() {
        return Ok(Some(path));
    }
    const KINDS: &[&str] = &[
        "txt", "md", "markdown", "html", "htm", "pdf", "rs", "py", "js", "ts", "c", "cpp", "h",
        "java", "go", "json", "toml", "yaml", "yml", "csv", "log",
    ];
    pick_open_file(app, "Attach a document", ("Documents", KINDS)).await
}

/// A file name chosen in the native save dialog (`suggested` in `folder` proposed, one filter
/// of `extension`), or `None` when the user cancels.
pub async fn pick_save_path<R: Runtime>(
    app: &AppHandle<R>,
    title: &str,
    suggested: &str,
    filter: (&str, &str),
) -> CmdResult<Option<PathBuf>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut dialog = app
        .dialog()
        .file()
        .set_title(title)
        .set_file_name(suggested)
        .add_filter(filter.0, &[filter.1]);
    if let Some(dir) = default_folder() {
        dialog = dialog.set_directory(dir);
    }
    dialog.save_file(move |picked| {
        let _ = tx.send(picked);
    });
    chosen_path(rx.await)
}

/// The dialog's answer as a path. A dialog that never answered (its sender dropped: the main
/// thread was gone) is an error.
fn chosen_path(
    answer: Result<Option<tauri_plugin_dialog::FilePath>, tokio::sync::oneshot::error::RecvError>,
) -> CmdResult<Option<PathBuf>> {
    let picked = answer.map_err(|e| CommandError::internal("The file dialog did not open", e))?;
    picked
        .map(|p| {
            p.into_path()
                .map_err(|e| CommandError::internal("The file dialog gave no local path", e))
        })
        .transpose()
}

/// Where a save dialog starts: the user's documents folder, else their home.
fn default_folder() -> Option<PathBuf> {
    let dirs = directories::UserDirs::new()?;
    Some(
        dirs.document_dir()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dirs.home_dir().to_path_buf()),
    )
}

/// Hands a link (already checked: [`crate::commands::checked_link`]) to the system's opener.
pub fn open_link(url: &str) -> CmdResult<()> {
    tauri_plugin_opener::open_url(url, None::<&str>)
        .map_err(|e| CommandError::internal("Cannot open the link in a browser", e))
}

/// Opens `dir` in the system's file manager.
pub fn open_folder(dir: &Path) -> CmdResult<()> {
    tauri_plugin_opener::open_path(dir, None::<&str>)
        .map_err(|e| CommandError::internal("Cannot open the folder", e))
}
