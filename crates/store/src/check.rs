//! The checks [`Store::open`](crate::Store::open) runs on a database file before using it.
//!
//! - [`quick_check`]: SQLite's `PRAGMA quick_check` (the B-trees, their pages and records,
//!   without the slower index-to-table cross checks of `integrity_check`). A file that fails
//!   it is refused ([`Error::Corrupt`] with [`Damage::QuickCheck`]): nothing is written to it,
//!   so what still reads can be recovered (`sqlite3 file .recover`), and the app moves it aside
//!   and starts a new database rather than write into a damaged one.
//! - [`repair_search_index`]: FTS5's `integrity-check` of both full-text indexes against the
//!   tables they index (`messages_fts`, `conversations_fts` are external-content tables: the
//!   text lives once, in `messages` / `conversations`, and the indexes can always be rebuilt
//!   from it). A damaged index is rebuilt (`'rebuild'`) and the repair logged; no message is
//!   touched.
//!
//! Both are bounded in time ([`CHECK_BUDGET`] each, through SQLite's progress handler): on a
//! database too large to check within it, the check is skipped with a log line rather than
//! holding the app's start.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::SqlitePool;

use crate::error::{self, Damage, Error, Result};

/// The longest each check may run at open before it is abandoned (and skipped).
pub const CHECK_BUDGET: Duration = Duration::from_secs(3);
/// The check, reporting at most the first 10 problems.
const QUICK_CHECK: &str = "PRAGMA quick_check(10)";
/// Virtual machine instructions between two looks at the clock.
const PROGRESS_OPS: i32 = 10_000;

/// The full-text indexes and their integrity-check / rebuild commands.
const FTS_TABLES: [(&str, &str, &str); 2] = [
    (
        "messages_fts",
        "INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)",
        "INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')",
    ),
    (
        "conversations_fts",
        "INSERT INTO conversations_fts (conversations_fts, rank) VALUES ('integrity-check', 1)",
        "INSERT INTO conversations_fts (conversations_fts) VALUES ('rebuild')",
    ),
];

/// What a bounded check found.
enum Outcome<T> {
    /// It ran to the end.
    Done(T),
    /// It was still running after its budget.
    TimedOut,
}

/// Runs `PRAGMA quick_check` on the file; `Err(Error::Corrupt)` naming `path` if it finds a
/// problem.
pub(crate) async fn quick_check(pool: &SqlitePool, path: &Path) -> Result<()> {
    let problems = match bounded(pool, path, QUICK_CHECK).await {
        Ok(Outcome::Done(lines)) if lines.len() == 1 && lines[0] == "ok" => return Ok(()),
        Ok(Outcome::Done(lines)) => {
            // SQLite also runs the full-text indexes' own checks: their problems are left to
            // `repair_search_index` (the index is rebuilt from the text), the rest refuses.
            let (index, tables): (Vec<String>, Vec<String>) = lines
                .into_iter()
                .partition(|l| FTS_TABLES.iter().any(|(t, ..)| l.contains(t)));
            if tables.is_empty() {
                tracing::warn!(path = %path.display(), problems = ?index, "the search index is damaged");
                return Ok(());
            }
            Damage::QuickCheck(tables)
        }
        Ok(Outcome::TimedOut) => {
            tracing::warn!(
                path = %path.display(),
                budget_s = CHECK_BUDGET.as_secs(),
                "the database's integrity check did not finish in time: skipped"
            );
            return Ok(());
        }
        Err(Error::Damaged(e)) => Damage::Sqlite(e),
        Err(e) => return Err(e),
    };
    tracing::error!(path = %path.display(), %problems, "the database failed its integrity check");
    Err(Error::Corrupt {
        path: path.to_path_buf(),
        source: problems,
    })
}

/// Checks both full-text indexes against their tables and rebuilds a damaged one. Returns the
/// names of the indexes it rebuilt.
pub(crate) async fn repair_search_index(
    pool: &SqlitePool,
    path: &Path,
) -> Result<Vec<&'static str>> {
    let mut rebuilt = Vec::new();
    for (table, check, rebuild) in FTS_TABLES {
        match bounded(pool, path, check).await {
            Ok(Outcome::Done(_)) => continue,
            Ok(Outcome::TimedOut) => {
                tracing::warn!(
                    path = %path.display(),
                    table,
                    "the search index check did not finish in time: skipped"
                );
                continue;
            }
            Err(Error::Busy(e)) => {
                tracing::warn!(
                    path = %path.display(),
                    table,
                    error = %e,
                    "the database is busy: the search index check is skipped"
                );
                continue;
            }
            // SQLITE_CORRUPT_VTAB, or an index too damaged to be read at all.
            Err(Error::Damaged(e) | Error::Database(e)) => tracing::warn!(
                path = %path.display(),
                table,
                error = %e,
                "the search index is damaged: rebuilding it from the stored text"
            ),
            Err(other) => return Err(other),
        }
        // Not bounded: the index is of no use until it is whole again.
        match sqlx::query(rebuild).execute(pool).await {
            Ok(_) => {
                tracing::warn!(path = %path.display(), table, "search index rebuilt; no message was changed");
                rebuilt.push(table);
            }
            Err(e) if error::is_corruption(&e) => return Err(crate::open_error(path, e)),
            // The messages are intact and readable; only search (and writes, through the
            // index's triggers) may fail: the next start tries again.
            Err(e) => tracing::error!(
                path = %path.display(),
                table,
                error = %e,
                "the search index could not be rebuilt"
            ),
        }
    }
    Ok(rebuilt)
}

/// Runs `sql` on one connection of `pool` with a deadline of [`CHECK_BUDGET`] (SQLite
/// interrupts the statement once it has passed); the rows' first column as text.
async fn bounded(
    pool: &SqlitePool,
    path: &Path,
    sql: &'static str,
) -> Result<Outcome<Vec<String>>> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| crate::open_error(path, e))?;
    let deadline = Instant::now() + CHECK_BUDGET;
    conn.lock_handle()
        .await
        .map_err(|e| crate::open_error(path, e))?
        .set_progress_handler(PROGRESS_OPS, move || Instant::now() < deadline);
    let result = sqlx::query_scalar::<_, String>(sql)
        .fetch_all(&mut *conn)
        .await;
    let removed = match conn.lock_handle().await {
        Ok(mut handle) => {
            handle.remove_progress_handler();
            true
        }
        Err(_) => false,
    };
    if !removed {
        // The connection is unusable: do not hand it back to the pool.
        drop(conn.detach());
    }
    match result {
        Ok(rows) => Ok(Outcome::Done(rows)),
        Err(e) if error::is_interrupt(&e) => Ok(Outcome::TimedOut),
        Err(e) => Err(Error::from(e)),
    }
}
