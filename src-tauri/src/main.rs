//! `tptt-chat`: the desktop app's entry point. Everything lives in the library (`tptt_chat`), so
//! the tests build the same app on Tauri's mock runtime.

// No console window on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

fn main() {
    use tptt_chat::launch::{Launch, USAGE};
    let args = match Launch::parse(std::env::args_os().skip(1)) {
        Ok(Launch::Run(args)) => args,
        Ok(Launch::Help) => {
            println!("{USAGE}");
            return;
        }
        Ok(Launch::Version) => {
            println!("tptt-chat {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // The folder is checked before anything starts: a mistyped path is a usage error.
    let choice = match tptt_chat::launch::check(&args) {
        Ok(choice) => choice,
        Err(e) => {
            eprintln!("error: --model: {e}");
            std::process::exit(2);
        }
    };
    // Thread count pinned, allocator tuned: as the CLI does.
    tptt_engine::prepare_process();
    let config = match tptt_chat::AppConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    // An unwritable log folder leaves the log on stderr (said there); the app still starts and
    // reports an unwritable data folder in its window.
    let _ = tptt_chat::logging::init(Some(&config.log_dir()));
    // Before any thread starts: it sets an environment variable WebKit reads.
    tptt_chat::webview::paint_cheaply_without_gpu();
    if let Err(e) = tptt_chat::run_app(tauri::Builder::default(), config, choice) {
        tracing::error!(error = %e, "the app failed");
        eprintln!("error: {e}");
        // A command line the app cannot follow is a usage error (launch module doc).
        let status = if matches!(e, tptt_chat::AppError::Launch(_)) {
            2
        } else {
            1
        };
        std::process::exit(status);
    }
}
