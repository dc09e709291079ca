//! TPTT state snapshots: which file holds the model state after which message.
//!
//! The engine saves a conversation's state at a turn boundary (after an answer) to a file and
//! the app records it here with [`Store::record_snapshot`]. Reopening the conversation asks
//! [`Store::latest_snapshot`] for the newest one taken with the same [`ModelKey`] (model,
//! variant, config hash); if there is none, the state is rebuilt from the text. A snapshot row
//! goes when its message or conversation is deleted, when it no longer matches the
//! conversation's model ([`Store::delete_stale_snapshots`]), or when older ones are pruned
//! ([`Store::prune_snapshots`]). Every function that deletes rows returns the files that no row
//! refers to any more: the app removes them (the store touches no file but its database).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::error::{Error, MalformedRow, Result};
use crate::types::{ConversationId, Listing, MessageId, ModelKey, SnapshotId, Timestamp};
use crate::Store;

/// A recorded snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Its id.
    pub id: SnapshotId,
    /// The conversation.
    pub conversation_id: ConversationId,
    /// The last message the state has read.
    pub message_id: MessageId,
    /// The model, variant and config it was taken with.
    pub key: ModelKey,
    /// The file the engine wrote.
    pub path: PathBuf,
    /// The file's size.
    pub size_bytes: u64,
    /// Tokens the state has read.
    pub token_count: u64,
    /// When it was recorded.
    pub created_at: Timestamp,
}

/// What [`Store::record_snapshot`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSnapshot {
    /// The conversation.
    pub conversation_id: ConversationId,
    /// The last message the state has read; must belong to the conversation.
    pub message_id: MessageId,
    /// The model, variant and config it was taken with.
    pub key: ModelKey,
    /// The file the engine wrote (a UTF-8 path).
    pub path: PathBuf,
    /// The file's size.
    pub size_bytes: u64,
    /// Tokens the state has read.
    pub token_count: u64,
}

/// Column list read by [`snapshot_from_row`], for a query on `snapshots s`.
macro_rules! snapshot_columns {
    () => {
        "s.id, s.conversation_id, s.message_id, s.model, s.variant, s.config_hash, s.path, \
         s.size_bytes, s.token_count, s.created_at"
    };
}

/// Reads one snapshot row, or says why it cannot.
fn snapshot_from_row(row: &SqliteRow) -> Result<Snapshot, MalformedRow> {
    let id: Option<i64> = row.try_get("id").ok();
    let bad = |reason: String| MalformedRow::new("snapshots", id, reason);
    let id = id.ok_or_else(|| bad("no readable id".into()))?;
    let text = |name: &str| -> Result<String, MalformedRow> {
        row.try_get(name).map_err(|e| bad(format!("{name}: {e}")))
    };
    let int = |name: &str| -> Result<i64, MalformedRow> {
        row.try_get(name).map_err(|e| bad(format!("{name}: {e}")))
    };
    let unsigned = |name: &str| -> Result<u64, MalformedRow> {
        let n = int(name)?;
        u64::try_from(n).map_err(|_| bad(format!("{name} is negative ({n})")))
    };
    Ok(Snapshot {
        id: SnapshotId(id),
        conversation_id: ConversationId(int("conversation_id")?),
        message_id: MessageId(int("message_id")?),
        key: ModelKey {
            model: text("model")?,
            variant: text("variant")?,
            config_hash: text("config_hash")?,
        },
        path: PathBuf::from(text("path")?),
        size_bytes: unsigned("size_bytes")?,
        token_count: unsigned("token_count")?,
        created_at: Timestamp(int("created_at")?),
    })
}

/// Of `paths` (just deleted from `snapshots`), those no remaining row refers to, once each.
pub(crate) async fn unreferenced_paths(
    conn: &mut SqliteConnection,
    paths: Vec<String>,
) -> Result<Vec<PathBuf>> {
    const SQL: &str = "SELECT EXISTS (SELECT 1 FROM snapshots WHERE path = ?)";
    let mut out = Vec::new();
    for path in paths.into_iter().collect::<BTreeSet<_>>() {
        let referenced: bool = sqlx::query_scalar(SQL)
            .bind(&path)
            .fetch_one(&mut *conn)
            .await?;
        if !referenced {
            out.push(PathBuf::from(path));
        }
    }
    Ok(out)
}

fn to_i64(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::InvalidInput(format!("{what} {n} is too large")))
}

impl Store {
    /// Records a snapshot file the engine wrote after `message_id`.
    /// [`Error::InvalidInput`] if the message belongs to another conversation or the path is
    /// not UTF-8.
    pub async fn record_snapshot(&self, new: &NewSnapshot) -> Result<Snapshot> {
        const OWNER: &str = "SELECT conversation_id FROM messages WHERE id = ?";
        const INSERT: &str = "INSERT INTO snapshots (conversation_id, message_id, model, \
            variant, config_hash, path, size_bytes, token_count, created_at) \
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";
        let path = new.path.to_str().ok_or_else(|| {
            Error::InvalidInput(format!(
                "snapshot path {} is not valid UTF-8",
                new.path.display()
            ))
        })?;
        let size = to_i64("snapshot size", new.size_bytes)?;
        let tokens = to_i64("snapshot token count", new.token_count)?;
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let owner: Option<i64> = sqlx::query_scalar(OWNER)
            .bind(new.message_id.0)
            .fetch_optional(&mut *tx)
            .await?;
        match owner {
            None => return Err(Error::MessageNotFound(new.message_id)),
            Some(c) if c != new.conversation_id.0 => {
                return Err(Error::InvalidInput(format!(
                    "message {} belongs to conversation {c}, not {}",
                    new.message_id, new.conversation_id
                )))
            }
            Some(_) => {}
        }
        let id: i64 = sqlx::query_scalar(INSERT)
            .bind(new.conversation_id.0)
            .bind(new.message_id.0)
            .bind(&new.key.model)
            .bind(&new.key.variant)
            .bind(&new.key.config_hash)
            .bind(path)
            .bind(size)
            .bind(tokens)
            .bind(now.as_millis())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Snapshot {
            id: SnapshotId(id),
            conversation_id: new.conversation_id,
            message_id: new.message_id,
            key: new.key.clone(),
            path: new.path.clone(),
            size_bytes: new.size_bytes,
            token_count: new.token_count,
            created_at: now,
        })
    }

    /// The snapshot taken after the latest message, among those taken with `key`; `None` if
    /// there is none (rebuild the state from the text).
    pub async fn latest_snapshot(
        &self,
        conversation: ConversationId,
        key: &ModelKey,
    ) -> Result<Option<Snapshot>> {
        self.latest_snapshot_before(conversation, key, u32::MAX)
            .await
    }

    /// [`Store::latest_snapshot`] among the messages before `position`: the memory to start
    /// the answer at `position` from (a regenerated answer is written there while the old one,
    /// with its snapshot, still stands).
    pub async fn latest_snapshot_before(
        &self,
        conversation: ConversationId,
        key: &ModelKey,
        position: u32,
    ) -> Result<Option<Snapshot>> {
        const SQL: &str = concat!(
            "SELECT ",
            snapshot_columns!(),
            " FROM snapshots s JOIN messages m ON m.id = s.message_id \
             WHERE s.conversation_id = ? AND s.model = ? AND s.variant = ? AND s.config_hash = ? \
             AND m.position < ? ORDER BY m.position DESC, s.id DESC LIMIT 1"
        );
        let row = sqlx::query(SQL)
            .bind(conversation.0)
            .bind(&key.model)
            .bind(&key.variant)
            .bind(&key.config_hash)
            .bind(i64::from(position))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(snapshot_from_row).transpose()?)
    }

    /// A conversation's snapshots, oldest turn first (disk usage, diagnostics).
    pub async fn list_snapshots(&self, conversation: ConversationId) -> Result<Listing<Snapshot>> {
        const SQL: &str = concat!(
            "SELECT ",
            snapshot_columns!(),
            " FROM snapshots s JOIN messages m ON m.id = s.message_id \
             WHERE s.conversation_id = ? ORDER BY m.position, s.id"
        );
        let rows = sqlx::query(SQL)
            .bind(conversation.0)
            .fetch_all(&self.pool)
            .await?;
        Ok(Listing::collect(rows.iter().map(snapshot_from_row)))
    }

    /// Deletes a conversation's snapshots not taken with `key` (the conversation moved to
    /// another model, variant or config). Returns the files no row refers to any more.
    pub async fn delete_stale_snapshots(
        &self,
        conversation: ConversationId,
        key: &ModelKey,
    ) -> Result<Vec<PathBuf>> {
        const SQL: &str = "DELETE FROM snapshots WHERE conversation_id = ? \
            AND NOT (model = ? AND variant = ? AND config_hash = ?) RETURNING path";
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let paths: Vec<String> = sqlx::query_scalar(SQL)
            .bind(conversation.0)
            .bind(&key.model)
            .bind(&key.variant)
            .bind(&key.config_hash)
            .fetch_all(&mut *tx)
            .await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }

    /// Keeps a conversation's `keep` latest snapshots (by turn, whatever their model) and
    /// deletes the others. Returns the files no row refers to any more.
    pub async fn prune_snapshots(
        &self,
        conversation: ConversationId,
        keep: u32,
    ) -> Result<Vec<PathBuf>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let paths = prune_in(&mut tx, conversation, keep).await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }
}

/// [`Store::prune_snapshots`] inside the caller's transaction: returns the deleted rows' paths.
pub(crate) async fn prune_in(
    conn: &mut SqliteConnection,
    conversation: ConversationId,
    keep: u32,
) -> Result<Vec<String>> {
    const SQL: &str = "DELETE FROM snapshots WHERE conversation_id = ?1 AND id NOT IN \
        (SELECT s.id FROM snapshots s JOIN messages m ON m.id = s.message_id \
         WHERE s.conversation_id = ?1 ORDER BY m.position DESC, s.id DESC LIMIT ?2) \
        RETURNING path";
    Ok(sqlx::query_scalar(SQL)
        .bind(conversation.0)
        .bind(i64::from(keep))
        .fetch_all(&mut *conn)
        .await?)
}
