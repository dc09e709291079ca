//! The app's log: to stderr and to a file in the app's log folder ([`AppConfig::log_dir`]:
//! `~/.local/share/tptt-chat/logs` on Linux), `tptt-chat.YYYY-MM-DD.log`, a new file each day
//! and the last [`KEEP_LOG_FILES`] kept, so a user can attach it to a bug report (Settings →
//! "Open logs folder"). `RUST_LOG` filters both (default: info for the app's crates, warnings
//! else). The file is written without colours.
//!
//! [`AppConfig::log_dir`]: crate::AppConfig::log_dir

use std::path::Path;

use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

/// The log files' name before the date.
pub const LOG_FILE_PREFIX: &str = "tptt-chat";
/// Log files kept (one a day): older ones are deleted when a new one starts.
pub const KEEP_LOG_FILES: usize = 7;

/// Why the log file could not be started (the log then goes to stderr only).
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    /// The log folder could not be created.
    #[error("cannot create the log folder {dir}: {source}")]
    Folder {
        /// The log folder.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The day's file could not be opened.
    #[error("cannot open a log file in {dir}: {source}")]
    File {
        /// The log folder.
        dir: String,
        /// Why.
        #[source]
        source: tracing_appender::rolling::InitError,
    },
}

/// The default filter: `RUST_LOG`, else info for the app's crates and warnings for the rest.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,tptt_chat=info,tptt_engine=info,tptt_hub=info,tptt_store=info")
    })
}

/// The rotating file in `dir` (created when missing: first, as the appender looks for old files
/// to delete before it creates the folder).
pub fn log_file(dir: &Path) -> Result<RollingFileAppender, LogFileError> {
    std::fs::create_dir_all(dir).map_err(|source| LogFileError::Folder {
        dir: dir.display().to_string(),
        source,
    })?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(LOG_FILE_PREFIX)
        .filename_suffix("log")
        .max_log_files(KEEP_LOG_FILES)
        .build(dir)
        .map_err(|source| LogFileError::File {
            dir: dir.display().to_string(),
            source,
        })
}

/// Logs to stderr and, when `dir` is given and writable, to the rotating file there. Installs
/// the global subscriber once (a second call changes nothing). An unwritable folder leaves the
/// log on stderr and is returned (and logged there).
pub fn init(dir: Option<&Path>) -> Result<(), LogFileError> {
    let (file, problem) = match dir.map(log_file) {
        Some(Ok(file)) => (Some(file), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let file_layer = file.map(|w| fmt::layer().with_ansi(false).with_writer(w));
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt::layer().with_writer(std::io::stderr))
        .with(file_layer)
        .try_init();
    match problem {
        Some(e) => {
            tracing::warn!(error = %e, "logging to stderr only");
            Err(e)
        }
        None => Ok(()),
    }
}
