//! `tptt-store`: TPTT Chat's conversations, messages, state snapshots and settings, in SQLite.
//!
//! [`Store`] is the whole API: [`Store::open`] a database file (created with its folders; WAL
//! journal, `synchronous = FULL`; foreign keys on; checked — below —; schema brought up to
//! date by the numbered migrations in `migrations/`, embedded with [`sqlx::migrate!`]) or
//! [`Store::open_in_memory`] for tests; then one async method per query, its SQL beside it:
//!
//! - [`conversations`]: create, list (most recent first), get, rename, model/variant, settings,
//!   archive, delete (messages and snapshot rows go with it).
//! - [`messages`]: add (the user's message is committed before generation starts), update
//!   (streamed, stopped or failed answers saved as [`MessageStatus::Partial`] /
//!   [`MessageStatus::Error`] with their text), list, edit-and-resend in one transaction
//!   ([`Store::edit_and_truncate`]), regenerate without losing the old answer before the new
//!   one has started ([`Store::begin_replacing_answer`]).
//! - [`versions`]: what regenerate and edit replace is kept as a version of its position, and
//!   [`Store::switch_version`] brings it back (messages, ids and snapshots), in one transaction.
//! - [`branch`]: a new conversation copied from another up to a message.
//! - [`memories`]: primed memories — a conversation's state saved under a name — and new
//!   conversations that start from one.
//! - [`search`]: titles and message text, FTS5 trigram substring search.
//! - [`snapshots`]: TPTT state snapshot files recorded at turn boundaries, keyed by
//!   [`ModelKey`]; the latest usable one; stale ones dropped.
//! - [`export`]: a conversation as Markdown or JSON, text as it is.
//! - [`import`]: conversations from a backup, all in one transaction, as new conversations.
//! - [`settings`]: application settings, one JSON value per key.
//!
//! Opening a file ([`Store::open`]):
//! - `PRAGMA quick_check` runs before anything is written: a damaged file is refused
//!   ([`Error::Corrupt`], naming it; nothing written to it), so what still reads can be
//!   recovered. Problems of the full-text indexes alone do not refuse the file: a damaged
//!   index (FTS5 `integrity-check` against its table) is rebuilt from the stored text and the
//!   repair logged. Each check stops after [`CHECK_BUDGET`] (skipped, logged) on a huge file.
//! - Answers left streaming by a process that ended (a crash, a `kill -9`, a power cut) are
//!   settled: kept with their text and marked interrupted ([`messages::INTERRUPTED`]); a
//!   regeneration that had not started is dropped, the answer it was to replace kept.
//!
//! Durability: WAL with `synchronous = FULL`, so a commit is on disk when it returns, power
//! loss included. (`NORMAL` would survive the app being killed — the WAL is in the OS's
//! hands — but could lose the last commits to a power cut or an OS crash.) The app saves a
//! streaming answer every 2 s: a kill loses at most that much of it.
//!
//! Invariants:
//! - Queries are checked at run time (`sqlx::query`), so building needs no database.
//! - A malformed row (an unknown role, invalid settings JSON, text that is not UTF-8) is an error
//!   for that row only ([`Error::Malformed`]); listings skip it and report it in
//!   [`Listing::skipped`].
//! - Functions that delete snapshot rows return the snapshot files that no row refers to any
//!   more: the caller (who wrote them) removes them. The store touches no file but its database.
//! - Timestamps ([`Timestamp`], ms since the epoch) from one `Store` strictly increase, so "most
//!   recent first" is a total order even within a millisecond.

pub mod branch;
mod check;
pub mod conversations;
mod error;
pub mod export;
pub mod import;
pub mod memories;
pub mod messages;
pub mod search;
pub mod settings;
pub mod snapshots;
mod types;
pub mod versions;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use branch::Branch;
pub use check::CHECK_BUDGET;
pub use conversations::{Conversation, ListScope, NewConversation};
pub use error::{Damage, Error, MalformedRow, Result};
pub use import::{ImportConversation, ImportMessage, Imported};
pub use memories::{Memory, NewMemory, MAX_MEMORY_NAME_CHARS};
pub use messages::{Edited, Message, MessageUpdate, NewMessage, Replacement, Settled};
pub use search::{MessageHit, SearchHit};
pub use snapshots::{NewSnapshot, Snapshot};
pub use types::{
    Attachment, ConversationId, ConversationSettings, Listing, MemoryId, MessageId, MessageStatus,
    ModelKey, Role, SamplingSettings, SnapshotId, Timestamp,
};
pub use versions::{Switched, VersionSet, HELD_SNAPSHOTS};

/// The schema migrations, embedded at build time from `migrations/NNNN_name.sql`.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long a query waits for another connection's (or program's) write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections to a database file: WAL gives one writer and concurrent readers.
const MAX_CONNECTIONS: u32 = 4;
/// Connecting again after `SQLITE_BUSY` while opening ([`Store::open`]): this many times, this
/// far apart (together the busy timeout).
const OPEN_BUSY_RETRIES: u32 = 100;
const OPEN_BUSY_PAUSE: Duration = Duration::from_millis(50);
/// Tries at migrating when another `Store` migrates the same file at the same moment.
const MIGRATE_ATTEMPTS: u32 = 3;

/// A handle on the conversation database. Cheap to clone (a connection pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// The database file; `None` in memory.
    path: Option<PathBuf>,
    /// The last timestamp handed out, so they strictly increase.
    clock: Arc<AtomicI64>,
}

impl Store {
    /// Opens the database at `path`, creating the file and its parent folders if needed, in WAL
    /// mode with foreign keys enforced; checks it, runs the migrations it lacks, rebuilds a
    /// damaged search index and settles answers left streaming (module doc).
    ///
    /// Several `Store`s (or processes) may open the same file at once. A file that is not an
    /// SQLite database, or is damaged (`quick_check`), gives [`Error::Corrupt`] (see
    /// [`Store::move_aside`]); one written by a newer version of the app gives
    /// [`Error::NewerSchema`]. Neither changes the file.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| Error::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Every commit is on disk when it returns, power loss included (module doc).
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // A new file's first connection switches it to WAL, which takes the file's lock
        // without waiting for the busy timeout: two stores (two copies of the app) opening one
        // new file at the same moment, the second gets `SQLITE_BUSY` at once. Tried again, for
        // about the busy timeout.
        let mut tries = 0u32;
        let pool = loop {
            match SqlitePoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .connect_with(options.clone())
                .await
            {
                Ok(pool) => break pool,
                Err(e) if error::is_busy(&e) && tries < OPEN_BUSY_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(OPEN_BUSY_PAUSE).await;
                }
                Err(e) => return Err(open_error(&path, e)),
            }
        };
        let store = Store {
            pool,
            path: Some(path.clone()),
            clock: Arc::default(),
        };
        match store.prepare(&path).await {
            Ok(()) => Ok(store),
            Err(e) => {
                // Let go of the file at once: the caller may move it aside.
                store.close().await;
                Err(e)
            }
        }
    }

    /// [`Store::open`]'s work once connected: check, migrate, repair, settle.
    async fn prepare(&self, path: &Path) -> Result<()> {
        // Before anything is written: a damaged file is refused untouched.
        check::quick_check(&self.pool, path).await?;
        self.migrate().await?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| open_error(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // A file system without shared memory (some network mounts) refuses WAL; SQLite
            // then keeps the rollback journal, which is slower with readers but still correct.
            tracing::warn!(path = %path.display(), mode, "WAL journal refused");
        }
        check::repair_search_index(&self.pool, path).await?;
        let settled = self.settle_unfinished_answers().await?;
        if settled.interrupted + settled.abandoned > 0 {
            tracing::info!(
                path = %path.display(),
                interrupted = settled.interrupted,
                abandoned_regenerations = settled.abandoned,
                "answers left unfinished by a process that ended were settled"
            );
        }
        tracing::info!(path = %path.display(), "conversation database open");
        Ok(())
    }

    /// A fresh, empty database in memory, for tests. Everything is lost when the last clone of
    /// the `Store` is dropped.
    pub async fn open_in_memory() -> Result<Self> {
        let path = PathBuf::from(":memory:");
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| open_error(&path, e))?
            .foreign_keys(true);
        // One connection, kept forever: each in-memory connection is its own database.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|e| open_error(&path, e))?;
        let store = Store {
            pool,
            path: None,
            clock: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Renames a damaged database file (and its `-wal` / `-shm` companions, which must not be
    /// applied to a fresh database) to `<name>.corrupt-<milliseconds>`, so that the next
    /// [`Store::open`] starts empty. Returns the new name of the main file. Call it only with no
    /// `Store` open on the file.
    pub fn move_aside(path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = path.as_ref();
        let suffix = format!(".corrupt-{}", Timestamp::now().as_millis());
        let with_suffix = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push(&suffix);
            PathBuf::from(name)
        };
        let target = with_suffix(path);
        std::fs::rename(path, &target).map_err(|source| Error::MoveAside {
            path: path.to_path_buf(),
            source,
        })?;
        for side in ["-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(side);
            let side_path = PathBuf::from(name);
            if side_path.exists() {
                std::fs::rename(&side_path, with_suffix(&side_path)).map_err(|source| {
                    Error::MoveAside {
                        path: side_path.clone(),
                        source,
                    }
                })?;
            }
        }
        tracing::warn!(from = %path.display(), to = %target.display(), "database moved aside");
        Ok(target)
    }

    /// The database file, or `None` for an in-memory store.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The connection pool, for diagnostics and tests. The schema belongs to this crate: write
    /// through the typed methods.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes every connection (checkpointing the WAL into the main file), waiting for queries
    /// in flight. Other clones of this `Store` cannot be used afterwards.
    pub async fn close(&self) {
        // Everything into the database file itself (the WAL emptied), so that the file alone
        // holds every change once closed, whichever connection closes last and when (a copy or
        // a move of the file takes all). Best effort: a busy reader leaves it to SQLite's own
        // checkpoint at the last close.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "closing the store: the WAL checkpoint did not run");
        }
        self.pool.close().await;
    }

    /// The current time, strictly after every timestamp this `Store` handed out before.
    pub(crate) fn now(&self) -> Timestamp {
        let wall = Timestamp::now().as_millis();
        let prev = self
            .clock
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(wall.max(last.saturating_add(1)))
            })
            .unwrap_or_else(|last| last); // the closure always returns Some
        Timestamp(wall.max(prev.saturating_add(1)))
    }

    fn display_path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(":memory:"))
    }

    /// Runs the migrations the database lacks. Two `Store`s migrating one new file at the same
    /// moment race (SQLite has no advisory lock): the loser's transaction fails and is rolled
    /// back, and its retry finds the schema up to date.
    async fn migrate(&self) -> Result<()> {
        let path = self.display_path();
        let mut attempt = 1;
        loop {
            match MIGRATOR.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(MigrateError::VersionMissing(version)) => {
                    return Err(Error::NewerSchema {
                        path: path.to_path_buf(),
                        version,
                    })
                }
                Err(MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _))
                    if error::is_corruption(&e) =>
                {
                    return Err(Error::Corrupt {
                        path: path.to_path_buf(),
                        source: Damage::Sqlite(e),
                    })
                }
                Err(e @ (MigrateError::Execute(_) | MigrateError::ExecuteMigration(..)))
                    if attempt < MIGRATE_ATTEMPTS =>
                {
                    tracing::debug!(attempt, error = %e, "migration failed, retrying");
                    attempt += 1;
                }
                Err(source) => {
                    return Err(Error::Migrate {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }
}

/// The error for a failure while opening `path`.
pub(crate) fn open_error(path: &Path, e: sqlx::Error) -> Error {
    if error::is_corruption(&e) {
        Error::Corrupt {
            path: path.to_path_buf(),
            source: Damage::Sqlite(e),
        }
    } else {
        Error::Open {
            path: path.to_path_buf(),
            source: e,
        }
    }
}
