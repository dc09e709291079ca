//! `tptt-chat`: the desktop app's entry point. Everything lives in the library (`tptt_chat`), so
//! the tests build the same app on Tauri's mock runtime.

// No console window on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

fn main() {
    tptt::alloc::tune_for_inference();
    tptt_chat::init_logging();
    // Before any thread starts: it sets an environment variable WebKit reads.
    tptt_chat::webview::paint_cheaply_without_gpu();
    if let Err(e) = tptt_chat::run_app(tauri::Builder::default()) {
        tracing::error!(error = %e, "the app failed");
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
