//! Test helpers: a fresh database per test, and a raw connection to write what the API won't.

use std::path::PathBuf;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use tptt_store::{ConversationId, NewConversation, NewMessage, Role, Store};

/// A store on a new file in its own temporary folder (removed on drop).
pub struct TestDb {
    pub store: Store,
    pub path: PathBuf,
    pub _dir: TempDir,
}

pub async fn fresh() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("chat.sqlite3");
    let store = Store::open(&path).await.expect("open a new database");
    TestDb {
        store,
        path,
        _dir: dir,
    }
}

/// A plain connection to the file, with CHECK constraints off: writes rows the store would
/// refuse, as a hand edit (or a newer app version) could.
pub async fn raw(path: &std::path::Path) -> SqliteConnection {
    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
        .await
        .expect("raw connection");
    sqlx::query("PRAGMA ignore_check_constraints = ON")
        .execute(&mut conn)
        .await
        .expect("pragma");
    conn
}

/// Runs one statement on a raw connection.
pub async fn exec(path: &std::path::Path, sql: &'static str) {
    let mut conn = raw(path).await;
    sqlx::query(sql).execute(&mut conn).await.expect(sql);
    conn.close().await.expect("close raw connection");
}

/// A conversation with the given messages, all complete.
pub async fn conversation_with(
    store: &Store,
    title: &str,
    messages: &[(Role, &str)],
) -> ConversationId {
    let c = store
        .create_conversation(&NewConversation::titled(title))
        .await
        .expect("create");
    for &(role, text) in messages {
        store
            .add_message(c.id, &NewMessage::new(role, text))
            .await
            .expect("add message");
    }
    c.id
}

/// FTS5's own consistency check of an external-content index against its table.
pub async fn fts_integrity(store: &Store) {
    for table in ["messages_fts", "conversations_fts"] {
        let sql = match table {
            "messages_fts" => "INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)",
            _ => "INSERT INTO conversations_fts (conversations_fts, rank) VALUES ('integrity-check', 1)",
        };
        sqlx::query(sql)
            .execute(store.pool())
            .await
            .expect("FTS index matches its table");
    }
}
