//! The store's error type.
//!
//! One [`Error`] enum for the crate. Errors at [`Store::open`](crate::Store::open) name the
//! database file and, where the user can do something about it, say what (a damaged file can be
//! moved aside with [`Store::move_aside`](crate::Store::move_aside) and a fresh one created). A
//! row that cannot be read is a [`MalformedRow`]: an error for that row alone, which listings
//! report beside the rows that did read ([`Listing::skipped`](crate::Listing::skipped)).

use std::fmt;
use std::path::PathBuf;

use crate::types::{ConversationId, MemoryId, MessageId};

/// `Result` with the store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SQLite primary result codes the store tells apart (`sqlite3.h`).
const SQLITE_BUSY: &str = "5";
const SQLITE_LOCKED: &str = "6";
const SQLITE_INTERRUPT: &str = "9";
const SQLITE_CORRUPT: &str = "11";
const SQLITE_FULL: &str = "13";
const SQLITE_NOTADB: &str = "26";

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The folder that should hold the database file could not be created (permissions, a file
    /// in the way, a read-only disk).
    #[error("cannot create the folder {p} for the conversation database: {source}", p = .path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The database file could not be opened or created (permissions, a folder in its place, a
    /// read-only disk).
    #[error("cannot open the conversation database {p}: {source}", p = .path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        #[source]
        source: sqlx::Error,
    },

    /// The file exists but is not an SQLite database, or its content is damaged. Nothing was
    /// written to it. The way forward: move it aside ([`Store::move_aside`](crate::Store::move_aside)
    /// renames it, keeping it for recovery) and open again, which creates an empty database.
    ///
    /// Also given when the file fails SQLite's `PRAGMA quick_check` at open
    /// ([`Damage::QuickCheck`]): the store refuses to write into a damaged file.
    #[error(
        "the conversation database {p} is damaged or is not an SQLite database ({source}). \
         Nothing was changed in it. Move it aside (rename it, e.g. to `{p}.corrupt`) and \
         start again to get a fresh, empty database; the old file can still be inspected or \
         recovered with the `sqlite3` tool's `.recover` command",
        p = .path.display()
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Damage,
    },

    /// The database was written by a newer version of the app: it has schema migrations this
    /// version does not know. Nothing was changed; use the newer version, or move the file aside.
    #[error(
        "the conversation database {p} was written by a newer version of TPTT Chat (it has \
         schema migration {version}, unknown to this version). Nothing was changed in it: use \
         the newer version, or move the file aside to start with an empty database",
        p = .path.display()
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The first applied migration this version does not know.
        version: i64,
    },

    /// Bringing the schema up to date failed for another reason (a migration that was edited
    /// after it shipped, an I/O error while migrating).
    #[error("cannot update the schema of the conversation database {p}: {source}",
        p = .path.display())]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// Moving a damaged database aside failed.
    #[error("cannot move the database {p} aside: {source}", p = .path.display())]
    MoveAside {
        /// The file that was to be renamed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The disk is full (`SQLITE_FULL`): the change was not saved, and nothing already saved is
    /// lost. Free some space and try again.
    #[error("the disk is full: the change was not saved ({0}); free some space and try again")]
    DiskFull(#[source] sqlx::Error),

    /// Another program (or another copy of the app) kept the database locked longer than the
    /// busy timeout (`SQLITE_BUSY` / `SQLITE_LOCKED`).
    #[error("the conversation database is locked by another program; try again ({0})")]
    Busy(#[source] sqlx::Error),

    /// SQLite found damaged pages while running a query (`SQLITE_CORRUPT` after opening). Data
    /// that still reads is intact; moving the file aside and starting again is the way out.
    #[error("the conversation database is damaged ({0}); move the file aside to start afresh")]
    Damaged(#[source] sqlx::Error),

    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),

    /// No conversation has this id (it was deleted, or never existed).
    #[error("conversation {0} does not exist")]
    ConversationNotFound(ConversationId),

    /// No message has this id.
    #[error("message {0} does not exist")]
    MessageNotFound(MessageId),

    /// No primed memory has this id.
    #[error("memory {0} does not exist")]
    MemoryNotFound(MemoryId),

    /// A row holds something this version cannot read (an unknown role, invalid settings JSON,
    /// text that is not UTF-8...): the row was edited by hand, by a newer version, or damaged.
    #[error("{0}")]
    Malformed(MalformedRow),

    /// An application setting holds JSON that does not parse as the type asked for.
    #[error("the setting `{key}` holds a value of the wrong shape: {source}; set it again to replace it")]
    SettingValue {
        /// The setting's key.
        key: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A value could not be turned into JSON for storage (for example a map with non-string
    /// keys).
    #[error("cannot serialize the value to JSON: {0}")]
    Json(#[from] serde_json::Error),

    /// An argument the store cannot accept: a path that is not UTF-8, a snapshot whose message
    /// belongs to another conversation, a size beyond SQLite's integers.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl From<sqlx::Error> for Error {
    /// Sorts SQLite errors into the kinds a user can act on; the rest is [`Error::Database`].
    fn from(e: sqlx::Error) -> Self {
        match sqlite_code(&e).as_deref() {
            Some(SQLITE_FULL) => Error::DiskFull(e),
            Some(SQLITE_BUSY | SQLITE_LOCKED) => Error::Busy(e),
            Some(SQLITE_CORRUPT | SQLITE_NOTADB) => Error::Damaged(e),
            _ => Error::Database(e),
        }
    }
}

/// The primary SQLite result code of a database error, as a decimal string.
fn sqlite_code(e: &sqlx::Error) -> Option<String> {
    let code = e.as_database_error()?.code()?;
    // Extended codes carry the primary one in their low byte.
    let n: i64 = code.parse().ok()?;
    Some((n & 0xff).to_string())
}

/// Whether `e` is SQLite's `SQLITE_INTERRUPT` (a progress handler ended the statement).
pub(crate) fn is_interrupt(e: &sqlx::Error) -> bool {
    sqlite_code(e).as_deref() == Some(SQLITE_INTERRUPT)
}

/// Whether `e` is `SQLITE_BUSY` / `SQLITE_LOCKED`: another connection holds the lock.
pub(crate) fn is_busy(e: &sqlx::Error) -> bool {
    matches!(sqlite_code(e).as_deref(), Some(SQLITE_BUSY | SQLITE_LOCKED))
}

/// Whether `e` says the file is not a database or is damaged.
pub(crate) fn is_corruption(e: &sqlx::Error) -> bool {
    matches!(
        sqlite_code(e).as_deref(),
        Some(SQLITE_CORRUPT | SQLITE_NOTADB)
    )
}

/// What is wrong with a database file that [`Store::open`](crate::Store::open) refuses
/// ([`Error::Corrupt`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Damage {
    /// SQLite refused the file (`SQLITE_NOTADB`: not a database; `SQLITE_CORRUPT`: damaged).
    #[error("{0}")]
    Sqlite(#[source] sqlx::Error),
    /// `PRAGMA quick_check` found problems (the first few of its lines).
    #[error("its integrity check found: {}", .0.join("; "))]
    QuickCheck(Vec<String>),
}

/// A row that could not be read: which table, which id, and why.
///
/// Returned as [`Error::Malformed`] by the functions that read one row, and collected in
/// [`Listing::skipped`](crate::Listing::skipped) by the ones that read many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedRow {
    /// The table (`conversations`, `messages`, `snapshots`).
    pub table: &'static str,
    /// The row's id, when even that could be read.
    pub id: Option<i64>,
    /// What is wrong, e.g. "unknown role `tool`".
    pub reason: String,
}

impl MalformedRow {
    pub(crate) fn new(table: &'static str, id: Option<i64>, reason: impl Into<String>) -> Self {
        Self {
            table,
            id,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for MalformedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.table {
            "conversations" => "conversation",
            "messages" => "message",
            "snapshots" => "snapshot",
            other => other,
        };
        match self.id {
            Some(id) => write!(f, "{what} {id} cannot be read: {}", self.reason)?,
            None => write!(f, "a {what} row cannot be read: {}", self.reason)?,
        }
        f.write_str(
            " (the row was edited outside the app, written by a newer version, or damaged; \
             deleting it, or fixing the value, makes it readable again)",
        )
    }
}

impl std::error::Error for MalformedRow {}

impl From<MalformedRow> for Error {
    fn from(row: MalformedRow) -> Self {
        Error::Malformed(row)
    }
}
