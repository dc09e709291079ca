//! Messages: add, update, get, list, and truncate a conversation for regenerate or
//! edit-and-resend.
//!
//! The generation flow the app follows, so that no text is ever lost:
//! 1. [`Store::add_message`] the user's message, committed before generation starts;
//! 2. add the assistant's message as [`MessageStatus::Partial`] with empty text, and
//!    [`Store::update_message`] it with the text so far as tokens stream (a crash leaves a
//!    partial answer, not nothing);
//! 3. finally update it to [`MessageStatus::Complete`], or keep it `Partial` when stopped, or
//!    [`MessageStatus::Error`] with the error when generation failed — always with its text.
//!
//! Messages are ordered by `position` (0, 1, 2...), which the store assigns.

use std::path::PathBuf;

use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::error::{Error, MalformedRow, Result};
use crate::snapshots::unreferenced_paths;
use crate::types::{ConversationId, Listing, MessageId, MessageStatus, Role, Timestamp};
use crate::Store;

/// A message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// Its id.
    pub id: MessageId,
    /// The conversation it belongs to.
    pub conversation_id: ConversationId,
    /// Its place in the conversation, from 0.
    pub position: u32,
    /// Who wrote it.
    pub role: Role,
    /// The text, exactly as written or generated.
    pub content: String,
    /// Complete, partial (stopped / streaming / cut by a crash) or error.
    pub status: MessageStatus,
    /// Why generation failed, for [`MessageStatus::Error`].
    pub error: Option<String>,
    /// When it was added.
    pub created_at: Timestamp,
    /// Last update (the end of streaming, for an answer).
    pub updated_at: Timestamp,
    /// Tokens it takes in the prompt, when known.
    pub token_count: Option<u32>,
    /// Generation statistics (free-form JSON written by the app).
    pub stats: Option<serde_json::Value>,
}

/// What [`Store::add_message`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// Its status; an answer about to stream starts as [`MessageStatus::Partial`].
    pub status: MessageStatus,
    /// Why generation failed, for [`MessageStatus::Error`].
    pub error: Option<String>,
    /// Tokens it takes in the prompt, when known.
    pub token_count: Option<u32>,
    /// Generation statistics.
    pub stats: Option<serde_json::Value>,
}

impl NewMessage {
    /// A complete message with this role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            status: MessageStatus::Complete,
            error: None,
            token_count: None,
            stats: None,
        }
    }

    /// An empty [`MessageStatus::Partial`] assistant message, added when generation starts.
    pub fn streaming_answer() -> Self {
        Self {
            status: MessageStatus::Partial,
            ..Self::new(Role::Assistant, "")
        }
    }
}

/// New values for a message: [`Store::update_message`] replaces all of these fields.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageUpdate {
    /// The text.
    pub content: String,
    /// Its status.
    pub status: MessageStatus,
    /// Why generation failed, for [`MessageStatus::Error`].
    pub error: Option<String>,
    /// Tokens it takes in the prompt, when known.
    pub token_count: Option<u32>,
    /// Generation statistics.
    pub stats: Option<serde_json::Value>,
}

impl MessageUpdate {
    /// Text with a status, nothing else.
    pub fn new(content: impl Into<String>, status: MessageStatus) -> Self {
        Self {
            content: content.into(),
            status,
            error: None,
            token_count: None,
            stats: None,
        }
    }
}

/// Column list read by [`message_from_row`].
macro_rules! message_columns {
    () => {
        "id, conversation_id, position, role, content, status, error, created_at, updated_at, \
         token_count, stats"
    };
}

/// Reads one message row, or says why it cannot.
pub(crate) fn message_from_row(row: &SqliteRow) -> Result<Message, MalformedRow> {
    let id: Option<i64> = row.try_get("id").ok();
    let bad = |reason: String| MalformedRow::new("messages", id, reason);
    let id = id.ok_or_else(|| bad("no readable id".into()))?;
    let conversation_id: i64 = row
        .try_get("conversation_id")
        .map_err(|e| bad(e.to_string()))?;
    let position: i64 = row.try_get("position").map_err(|e| bad(e.to_string()))?;
    let position =
        u32::try_from(position).map_err(|_| bad(format!("position {position} out of range")))?;
    let role: String = row.try_get("role").map_err(|e| bad(format!("role: {e}")))?;
    let role = role.parse::<Role>().map_err(bad)?;
    let content: String = row
        .try_get("content")
        .map_err(|e| bad(format!("content: {e}")))?;
    let status: String = row
        .try_get("status")
        .map_err(|e| bad(format!("status: {e}")))?;
    let status = status.parse::<MessageStatus>().map_err(bad)?;
    let error: Option<String> = row
        .try_get("error")
        .map_err(|e| bad(format!("error: {e}")))?;
    let created_at: i64 = row.try_get("created_at").map_err(|e| bad(e.to_string()))?;
    let updated_at: i64 = row.try_get("updated_at").map_err(|e| bad(e.to_string()))?;
    let token_count: Option<i64> = row.try_get("token_count").map_err(|e| bad(e.to_string()))?;
    let token_count = token_count
        .map(|n| u32::try_from(n).map_err(|_| bad(format!("token count {n} out of range"))))
        .transpose()?;
    let stats: Option<String> = row
        .try_get("stats")
        .map_err(|e| bad(format!("stats: {e}")))?;
    let stats = stats
        .map(|s| serde_json::from_str(&s).map_err(|e| bad(format!("stats are not JSON: {e}"))))
        .transpose()?;
    Ok(Message {
        id: MessageId(id),
        conversation_id: ConversationId(conversation_id),
        position,
        role,
        content,
        status,
        error,
        created_at: Timestamp(created_at),
        updated_at: Timestamp(updated_at),
        token_count,
        stats,
    })
}

fn stats_json(stats: &Option<serde_json::Value>) -> Result<Option<String>> {
    Ok(stats.as_ref().map(serde_json::to_string).transpose()?)
}

impl Store {
    /// Appends a message to a conversation (the next position) and commits it; the
    /// conversation's `updated_at` moves to now.
    pub async fn add_message(
        &self,
        conversation: ConversationId,
        new: &NewMessage,
    ) -> Result<Message> {
        const TOUCH: &str = "UPDATE conversations SET updated_at = ? WHERE id = ?";
        // One statement reads the next position and inserts, inside a write transaction.
        const INSERT: &str = "INSERT INTO messages \
            (conversation_id, position, role, content, status, error, created_at, updated_at, \
             token_count, stats) \
            SELECT ?1, COALESCE(MAX(position) + 1, 0), ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8 \
            FROM messages WHERE conversation_id = ?1 \
            RETURNING id, position";
        let now = self.now();
        let stats = stats_json(&new.stats)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let touched = sqlx::query(TOUCH)
            .bind(now.as_millis())
            .bind(conversation.0)
            .execute(&mut *tx)
            .await?;
        if touched.rows_affected() == 0 {
            return Err(Error::ConversationNotFound(conversation));
        }
        let (id, position): (i64, i64) = sqlx::query_as(INSERT)
            .bind(conversation.0)
            .bind(new.role.as_str())
            .bind(&new.content)
            .bind(new.status.as_str())
            .bind(&new.error)
            .bind(now.as_millis())
            .bind(new.token_count.map(i64::from))
            .bind(&stats)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let position = u32::try_from(position)
            .map_err(|_| Error::InvalidInput(format!("message position {position} overflows")))?;
        Ok(Message {
            id: MessageId(id),
            conversation_id: conversation,
            position,
            role: new.role,
            content: new.content.clone(),
            status: new.status,
            error: new.error.clone(),
            created_at: now,
            updated_at: now,
            token_count: new.token_count,
            stats: new.stats.clone(),
        })
    }

    /// Replaces a message's text, status, error, token count and stats (streaming progress, a
    /// stopped or failed generation's partial text, the final answer). The conversation's
    /// `updated_at` moves to now.
    pub async fn update_message(&self, id: MessageId, update: &MessageUpdate) -> Result<()> {
        const UPDATE: &str = "UPDATE messages SET content = ?, status = ?, error = ?, \
            token_count = ?, stats = ?, updated_at = ? WHERE id = ? RETURNING conversation_id";
        const TOUCH: &str = "UPDATE conversations SET updated_at = ? WHERE id = ?";
        let now = self.now();
        let stats = stats_json(&update.stats)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let conversation: Option<i64> = sqlx::query_scalar(UPDATE)
            .bind(&update.content)
            .bind(update.status.as_str())
            .bind(&update.error)
            .bind(update.token_count.map(i64::from))
            .bind(&stats)
            .bind(now.as_millis())
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
        let conversation = conversation.ok_or(Error::MessageNotFound(id))?;
        sqlx::query(TOUCH)
            .bind(now.as_millis())
            .bind(conversation)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One message. [`Error::MessageNotFound`] if there is none with this id,
    /// [`Error::Malformed`] if its row cannot be read.
    pub async fn get_message(&self, id: MessageId) -> Result<Message> {
        const SQL: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = ?");
        let row = sqlx::query(SQL)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        let row = row.ok_or(Error::MessageNotFound(id))?;
        Ok(message_from_row(&row)?)
    }

    /// A conversation's last message (the highest position), `None` when it has none (or the
    /// conversation does not exist): the conversation list's preview.
    /// [`Error::Malformed`] if that row cannot be read.
    pub async fn last_message(&self, conversation: ConversationId) -> Result<Option<Message>> {
        const SQL: &str = concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? ORDER BY position DESC LIMIT 1"
        );
        let row = sqlx::query(SQL)
            .bind(conversation.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(message_from_row).transpose()?)
    }

    /// A conversation's messages in order. Rows that cannot be read are skipped and reported
    /// in [`Listing::skipped`]. [`Error::ConversationNotFound`] if the conversation does not
    /// exist.
    pub async fn list_messages(&self, conversation: ConversationId) -> Result<Listing<Message>> {
        const EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM conversations WHERE id = ?)";
        const SQL: &str = concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE conversation_id = ? ORDER BY position"
        );
        // One connection for both reads, so they see the same snapshot of the database.
        let mut tx = self.pool.begin().await?;
        let exists: bool = sqlx::query_scalar(EXISTS)
            .bind(conversation.0)
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            return Err(Error::ConversationNotFound(conversation));
        }
        let rows = sqlx::query(SQL)
            .bind(conversation.0)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Listing::collect(rows.iter().map(message_from_row)))
    }

    /// Deletes the messages at `from_position` and after (regenerate the last answer, or edit
    /// a message and resend), with the snapshots taken after them. Returns the snapshot files no
    /// row refers to any more, for the caller to remove.
    pub async fn delete_messages_from(
        &self,
        conversation: ConversationId,
        from_position: u32,
    ) -> Result<Vec<PathBuf>> {
        const TOUCH: &str = "UPDATE conversations SET updated_at = ? WHERE id = ?";
        const SNAPSHOTS: &str = "DELETE FROM snapshots WHERE message_id IN \
            (SELECT id FROM messages WHERE conversation_id = ?1 AND position >= ?2) \
            RETURNING path";
        const MESSAGES: &str = "DELETE FROM messages WHERE conversation_id = ? AND position >= ?";
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let touched = sqlx::query(TOUCH)
            .bind(self.now().as_millis())
            .bind(conversation.0)
            .execute(&mut *tx)
            .await?;
        if touched.rows_affected() == 0 {
            return Err(Error::ConversationNotFound(conversation));
        }
        let paths: Vec<String> = sqlx::query_scalar(SNAPSHOTS)
            .bind(conversation.0)
            .bind(i64::from(from_position))
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query(MESSAGES)
            .bind(conversation.0)
            .bind(i64::from(from_position))
            .execute(&mut *tx)
            .await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }
}
