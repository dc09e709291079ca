//! Versions: what regenerate and edit replace is kept, and the user switches between the
//! continuations of a position (schema 2, `migrations/0002_versions.sql`).
//!
//! The continuation of a conversation from position `p` on is *stashed* when it is replaced:
//! its messages (ids kept) and their snapshots move into a new *holder* conversation, owned by
//! the conversation the user sees and listed nowhere, and a `versions` row names the holder.
//! The continuation shown has a row without holder (once there are two). Switching to another
//! version stashes the shown continuation and moves the holder's back: the messages come back
//! with their ids and their snapshots, so the memory continues from them without re-reading.
//! Versions at later positions inside a stashed continuation travel with it (their rows name
//! the holder as their conversation).

use serde::Serialize;
use sqlx::SqliteConnection;

use crate::error::{Error, Result};
use crate::snapshots::prune_in;
use crate::types::{ConversationId, MessageId, Timestamp};
use crate::Store;

/// Snapshots a stashed continuation keeps (its latest): switching back to it continues from
/// there; the older ones would only cost disk.
pub const HELD_SNAPSHOTS: u32 = 1;

/// The versions of one position of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VersionSet {
    /// The position whose continuations they are.
    pub position: u32,
    /// The version shown (1-based).
    pub current: u32,
    /// How many there are (at least 2).
    pub total: u32,
}

/// A switch made by [`Store::switch_version`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switched {
    /// The position whose continuation changed.
    pub position: u32,
    /// The version now shown.
    pub version: u32,
}

/// Moves `conversation`'s messages at positions `from..below` (all from `from` on when
/// `below` is `None`), their snapshots and the versions rows of later positions in that range
/// into a new holder, and returns the holder's id. The versions row of `from` is the caller's.
async fn move_tail_to_holder(
    conn: &mut SqliteConnection,
    conversation: ConversationId,
    from: u32,
    below: Option<u32>,
    now: Timestamp,
) -> Result<i64> {
    const HOLDER: &str = "INSERT INTO conversations \
        (title, created_at, updated_at, model, variant, settings, owner_id) \
        SELECT '', ?1, ?1, model, variant, settings, COALESCE(owner_id, id) \
        FROM conversations WHERE id = ?2 RETURNING id";
    const SNAPSHOTS: &str = "UPDATE snapshots SET conversation_id = ?1 WHERE message_id IN \
        (SELECT id FROM messages WHERE conversation_id = ?2 AND position >= ?3 AND position < ?4)";
    const MESSAGES: &str = "UPDATE messages SET conversation_id = ?1 \
        WHERE conversation_id = ?2 AND position >= ?3 AND position < ?4";
    const NESTED: &str = "UPDATE versions SET conversation_id = ?1 \
        WHERE conversation_id = ?2 AND position > ?3 AND position < ?4";
    let holder: i64 = sqlx::query_scalar(HOLDER)
        .bind(now.as_millis())
        .bind(conversation.0)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(Error::ConversationNotFound(conversation))?;
    let below = below.map_or(i64::MAX, i64::from);
    for sql in [SNAPSHOTS, MESSAGES, NESTED] {
        sqlx::query(sql)
            .bind(holder)
            .bind(conversation.0)
            .bind(i64::from(from))
            .bind(below)
            .execute(&mut *conn)
            .await?;
    }
    Ok(holder)
}

/// Stashes `conversation`'s continuation at `from..below` as a version of position `from`
/// (module doc), inside the caller's transaction: the shown version becomes held, and the
/// continuation that follows (the caller's to write) is the newest version, shown. Returns the
/// paths of the snapshots dropped: a stashed continuation keeps only its latest one
/// ([`HELD_SNAPSHOTS`]).
pub(crate) async fn stash_version(
    conn: &mut SqliteConnection,
    conversation: ConversationId,
    from: u32,
    below: Option<u32>,
    now: Timestamp,
) -> Result<Vec<String>> {
    const SHOWN: &str = "UPDATE versions SET holder_id = ?1 \
        WHERE conversation_id = ?2 AND position = ?3 AND holder_id IS NULL";
    const FIRST: &str = "INSERT INTO versions (conversation_id, position, version, holder_id) \
        VALUES (?1, ?2, 1, ?3)";
    const NEXT: &str = "INSERT INTO versions (conversation_id, position, version, holder_id) \
        SELECT ?1, ?2, MAX(version) + 1, NULL FROM versions \
        WHERE conversation_id = ?1 AND position = ?2";
    let holder = move_tail_to_holder(conn, conversation, from, below, now).await?;
    let shown = sqlx::query(SHOWN)
        .bind(holder)
        .bind(conversation.0)
        .bind(i64::from(from))
        .execute(&mut *conn)
        .await?;
    if shown.rows_affected() == 0 {
        sqlx::query(FIRST)
            .bind(conversation.0)
            .bind(i64::from(from))
            .bind(holder)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(NEXT)
        .bind(conversation.0)
        .bind(i64::from(from))
        .execute(&mut *conn)
        .await?;
    prune_in(conn, ConversationId(holder), HELD_SNAPSHOTS).await
}

/// Deletes the versions of `conversation` at `from` and later positions with everything their
/// holders hold (holders inside holders included), inside the caller's transaction. Returns
/// the paths of the snapshots deleted with them.
pub(crate) async fn delete_versions_from(
    conn: &mut SqliteConnection,
    conversation: ConversationId,
    from: u32,
) -> Result<Vec<String>> {
    const HOLDERS: &str = "WITH RECURSIVE doomed (id) AS ( \
            SELECT holder_id FROM versions \
            WHERE conversation_id = ?1 AND position >= ?2 AND holder_id IS NOT NULL \
            UNION SELECT v.holder_id FROM versions v JOIN doomed d ON v.conversation_id = d.id \
            WHERE v.holder_id IS NOT NULL) \
        SELECT id FROM doomed";
    const SNAPSHOTS: &str = "DELETE FROM snapshots WHERE conversation_id = ? RETURNING path";
    const HOLDER: &str = "DELETE FROM conversations WHERE id = ?";
    const ROWS: &str = "DELETE FROM versions WHERE conversation_id = ? AND position >= ?";
    let holders: Vec<i64> = sqlx::query_scalar(HOLDERS)
        .bind(conversation.0)
        .bind(i64::from(from))
        .fetch_all(&mut *conn)
        .await?;
    let mut paths = Vec::new();
    for h in holders {
        let p: Vec<String> = sqlx::query_scalar(SNAPSHOTS)
            .bind(h)
            .fetch_all(&mut *conn)
            .await?;
        paths.extend(p);
        sqlx::query(HOLDER).bind(h).execute(&mut *conn).await?;
    }
    sqlx::query(ROWS)
        .bind(conversation.0)
        .bind(i64::from(from))
        .execute(&mut *conn)
        .await?;
    Ok(paths)
}

fn position_of(n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::InvalidInput(format!("position {n} is out of range")))
}

impl Store {
    /// The positions of `conversation` that have more than one version, in order, with the
    /// version shown and the count ([`Error::ConversationNotFound`] for an unknown one).
    pub async fn list_versions(&self, conversation: ConversationId) -> Result<Vec<VersionSet>> {
        const EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM conversations WHERE id = ?)";
        const SQL: &str = "SELECT position, \
            COALESCE(MAX(CASE WHEN holder_id IS NULL THEN version END), 0), COUNT(*) \
            FROM versions WHERE conversation_id = ? GROUP BY position ORDER BY position";
        let exists: bool = sqlx::query_scalar(EXISTS)
            .bind(conversation.0)
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Err(Error::ConversationNotFound(conversation));
        }
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(SQL)
            .bind(conversation.0)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (position, current, total) in rows {
            // A set without a shown version or of one only is no choice (a hand edit): skipped.
            if current < 1 || total < 2 {
                tracing::warn!(
                    conversation = conversation.0,
                    position,
                    "a version set without a shown version: ignored"
                );
                continue;
            }
            out.push(VersionSet {
                position: position_of(position)?,
                current: position_of(current)?,
                total: position_of(total)?,
            });
        }
        Ok(out)
    }

    /// Shows version `version` of the continuation that starts with `message` (one of
    /// `conversation`'s shown messages): the continuation shown now is stashed as its version,
    /// and the chosen one's messages (with their ids and snapshots) take its place, in one
    /// transaction. Nothing to do when it is already shown.
    ///
    /// [`Error::MessageNotFound`] when `message` is not shown in `conversation`,
    /// [`Error::InvalidInput`] when its position has no such version.
    pub async fn switch_version(
        &self,
        conversation: ConversationId,
        message: MessageId,
        version: u32,
    ) -> Result<Switched> {
        const POSITION: &str = "SELECT position FROM messages WHERE id = ? AND conversation_id = ?";
        const TARGET: &str = "SELECT holder_id FROM versions \
            WHERE conversation_id = ? AND position = ? AND version = ?";
        const SHOWN: &str = "UPDATE versions SET holder_id = ?1 \
            WHERE conversation_id = ?2 AND position = ?3 AND holder_id IS NULL";
        const BACK: [&str; 3] = [
            "UPDATE snapshots SET conversation_id = ?1 WHERE conversation_id = ?2",
            "UPDATE messages SET conversation_id = ?1 WHERE conversation_id = ?2",
            "UPDATE versions SET conversation_id = ?1 WHERE conversation_id = ?2",
        ];
        const CHOSEN: &str = "UPDATE versions SET holder_id = NULL \
            WHERE conversation_id = ? AND position = ? AND version = ?";
        const EMPTY_HOLDER: &str = "DELETE FROM conversations WHERE id = ?";
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let position: i64 = sqlx::query_scalar(POSITION)
            .bind(message.0)
            .bind(conversation.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::MessageNotFound(message))?;
        let position = position_of(position)?;
        let target: Option<Option<i64>> = sqlx::query_scalar(TARGET)
            .bind(conversation.0)
            .bind(i64::from(position))
            .bind(i64::from(version))
            .fetch_optional(&mut *tx)
            .await?;
        let holder = match target {
            None => {
                return Err(Error::InvalidInput(format!(
                    "message {message} has no version {version}"
                )))
            }
            Some(None) => return Ok(Switched { position, version }),
            Some(Some(h)) => h,
        };
        let stashed = move_tail_to_holder(&mut tx, conversation, position, None, now).await?;
        sqlx::query(SHOWN)
            .bind(stashed)
            .bind(conversation.0)
            .bind(i64::from(position))
            .execute(&mut *tx)
            .await?;
        for sql in BACK {
            sqlx::query(sql)
                .bind(conversation.0)
                .bind(holder)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(CHOSEN)
            .bind(conversation.0)
            .bind(i64::from(position))
            .bind(i64::from(version))
            .execute(&mut *tx)
            .await?;
        sqlx::query(EMPTY_HOLDER)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Switched { position, version })
    }
}
