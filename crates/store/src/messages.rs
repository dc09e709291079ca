//! Messages: add, update, get, list; edit-and-resend, regenerate, and what a process that
//! died left unfinished.
//!
//! The generation flow the app follows, so that no text is ever lost:
//! 1. [`Store::add_message`] the user's message, committed before generation starts;
//! 2. add the assistant's message as [`MessageStatus::Partial`] with empty text
//!    ([`NewMessage::streaming_answer`]), and [`Store::update_message`] it with the text so far
//!    (no stats) as tokens stream (a crash leaves a partial answer, not nothing);
//! 3. finally update it to [`MessageStatus::Complete`], or keep it `Partial` when stopped
//!    (with its stats: that is what tells a stopped answer from one still streaming), or
//!    [`MessageStatus::Error`] with the error when generation failed — always with its text.
//!
//! An answer found still streaming when the database is opened was cut by the end of the
//! process that wrote it: [`Store::open`] keeps its text and sets its error to
//! [`INTERRUPTED`]. Regenerate goes through [`Store::begin_replacing_answer`]: the new answer
//! is stored after the old one, which stays until [`Store::finish_replacing_answer`] (the new
//! one has started) or [`Store::abandon_replacing_answer`] (it failed or was stopped first).
//! Edit-and-resend is one transaction ([`Store::edit_and_truncate`]).
//!
//! Messages are ordered by `position` (0, 1, 2...), which the store assigns.

use std::path::PathBuf;

use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::error::{Error, MalformedRow, Result};
use crate::snapshots::unreferenced_paths;
use crate::types::{
    Attachment, ConversationId, Listing, MessageId, MessageStatus, Role, Timestamp,
};
use crate::versions::{delete_versions_from, stash_version};
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
    /// The document attached to it (a user message), whose text is part of `content`.
    pub attachment: Option<Attachment>,
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
    /// The document attached to it; its range must lie in `content`.
    pub attachment: Option<Attachment>,
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
            attachment: None,
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
         token_count, stats, attachment"
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
    let attachment: Option<String> = row
        .try_get("attachment")
        .map_err(|e| bad(format!("attachment: {e}")))?;
    let attachment: Option<Attachment> = attachment
        .map(|a| serde_json::from_str(&a).map_err(|e| bad(format!("attachment is not valid: {e}"))))
        .transpose()?;
    if let Some(a) = attachment.as_ref().filter(|a| !a.fits(&content)) {
        return Err(bad(format!(
            "attachment range {}..{} is not within its text",
            a.start, a.end
        )));
    }
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
        attachment,
    })
}

fn stats_json(stats: &Option<serde_json::Value>) -> Result<Option<String>> {
    Ok(stats.as_ref().map(serde_json::to_string).transpose()?)
}

/// Moves a conversation's `updated_at` to `now`; [`Error::ConversationNotFound`] if there is
/// no such conversation.
async fn touch(
    conn: &mut SqliteConnection,
    conversation: ConversationId,
    now: Timestamp,
) -> Result<()> {
    const TOUCH: &str = "UPDATE conversations SET updated_at = ? WHERE id = ?";
    let touched = sqlx::query(TOUCH)
        .bind(now.as_millis())
        .bind(conversation.0)
        .execute(&mut *conn)
        .await?;
    if touched.rows_affected() == 0 {
        return Err(Error::ConversationNotFound(conversation));
    }
    Ok(())
}

/// Inserts `new` after the conversation's last message (inside the caller's transaction).
async fn append(
    conn: &mut SqliteConnection,
    conversation: ConversationId,
    new: &NewMessage,
    now: Timestamp,
) -> Result<Message> {
    // One statement reads the next position and inserts.
    const INSERT: &str = "INSERT INTO messages \
        (conversation_id, position, role, content, status, error, created_at, updated_at, \
         token_count, stats, attachment) \
        SELECT ?1, COALESCE(MAX(position) + 1, 0), ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9 \
        FROM messages WHERE conversation_id = ?1 \
        RETURNING id, position";
    let stats = stats_json(&new.stats)?;
    if let Some(a) = new.attachment.as_ref().filter(|a| !a.fits(&new.content)) {
        return Err(Error::InvalidInput(format!(
            "attachment range {}..{} is not within the message's text",
            a.start, a.end
        )));
    }
    let attachment = new
        .attachment
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?;
    let (id, position): (i64, i64) = sqlx::query_as(INSERT)
        .bind(conversation.0)
        .bind(new.role.as_str())
        .bind(&new.content)
        .bind(new.status.as_str())
        .bind(&new.error)
        .bind(now.as_millis())
        .bind(new.token_count.map(i64::from))
        .bind(&stats)
        .bind(&attachment)
        .fetch_one(&mut *conn)
        .await?;
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
        attachment: new.attachment.clone(),
    })
}

/// One message read inside the caller's transaction; [`Error::MessageNotFound`] if there is
/// none with this id.
async fn message_in(conn: &mut SqliteConnection, id: MessageId) -> Result<Message> {
    const SQL: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = ?");
    let row = sqlx::query(SQL)
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(Error::MessageNotFound(id))?;
    Ok(message_from_row(&row)?)
}

/// Deletes the snapshot rows of message `id`, returning their paths.
async fn delete_snapshots_of(conn: &mut SqliteConnection, id: MessageId) -> Result<Vec<String>> {
    const SQL: &str = "DELETE FROM snapshots WHERE message_id = ? RETURNING path";
    Ok(sqlx::query_scalar(SQL)
        .bind(id.0)
        .fetch_all(&mut *conn)
        .await?)
}

/// The reason [`Store::open`] records on an answer that a process left streaming when it
/// ended (a crash, a kill, a power cut): the answer stays [`MessageStatus::Partial`] with the
/// text saved until then, and its `error` says this.
pub const INTERRUPTED: &str =
    "the app closed before this answer was finished; the text saved until then is kept";

/// A regenerated answer on its way ([`Store::begin_replacing_answer`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Replacement {
    /// The answer being replaced, still in place.
    pub old: Message,
    /// The new, empty [`MessageStatus::Partial`] answer, stored after it until
    /// [`Store::finish_replacing_answer`] puts it in its place.
    pub new: Message,
}

/// What [`Store::edit_and_truncate`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Edited {
    /// The edited user message (same id and position, the new text).
    pub user: Message,
    /// The new, empty [`MessageStatus::Partial`] answer after it.
    pub answer: Message,
    /// Snapshot files no row refers to any more: the caller removes them.
    pub files: Vec<PathBuf>,
}

/// What [`Store::open`] found left unfinished by a process that ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Answers that were streaming, now marked [`INTERRUPTED`] (their text kept).
    pub interrupted: u64,
    /// Regenerated answers that had not started (no text): removed, so the answer they were
    /// to replace stays.
    pub abandoned: u64,
}

impl Store {
    /// Appends a message to a conversation (the next position) and commits it; the
    /// conversation's `updated_at` moves to now.
    pub async fn add_message(
        &self,
        conversation: ConversationId,
        new: &NewMessage,
    ) -> Result<Message> {
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        touch(&mut tx, conversation, now).await?;
        let message = append(&mut tx, conversation, new, now).await?;
        tx.commit().await?;
        Ok(message)
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

    /// Deletes the messages at `from_position` and after, with the snapshots taken after them
    /// and every version of those positions ([`crate::versions`]). Returns the snapshot files
    /// no row refers to any more, for the caller to remove.
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
        let mut paths: Vec<String> = sqlx::query_scalar(SNAPSHOTS)
            .bind(conversation.0)
            .bind(i64::from(from_position))
            .fetch_all(&mut *tx)
            .await?;
        paths.extend(delete_versions_from(&mut tx, conversation, from_position).await?);
        sqlx::query(MESSAGES)
            .bind(conversation.0)
            .bind(i64::from(from_position))
            .execute(&mut *tx)
            .await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }

    /// Edit-and-resend, in one transaction: the user message `message` of `conversation` and
    /// everything after it are kept as a version of its position ([`crate::versions`]; their
    /// snapshots go with them, the latest kept), a new user message with `content` takes its
    /// position (a new id; the old message keeps its own in its version), and an empty
    /// [`NewMessage::streaming_answer`] follows. A failure anywhere changes nothing.
    ///
    /// [`Error::MessageNotFound`] if there is no such message, [`Error::InvalidInput`] if it
    /// is not a user message of `conversation`.
    pub async fn edit_and_truncate(
        &self,
        conversation: ConversationId,
        message: MessageId,
        content: &str,
    ) -> Result<Edited> {
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        touch(&mut tx, conversation, now).await?;
        let old = message_in(&mut tx, message).await?;
        if old.conversation_id != conversation || old.role != Role::User {
            return Err(Error::InvalidInput(format!(
                "message {message} is not a user message of conversation {conversation}"
            )));
        }
        let paths = stash_version(&mut tx, conversation, old.position, None, now).await?;
        let user = append(
            &mut tx,
            conversation,
            &NewMessage::new(Role::User, content),
            now,
        )
        .await?;
        let answer = append(&mut tx, conversation, &NewMessage::streaming_answer(), now).await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(Edited {
            user,
            answer,
            files,
        })
    }

    /// Regenerate, step 1: a new empty [`NewMessage::streaming_answer`] is stored after
    /// `old`, the conversation's last message and an answer, which stays in place until the
    /// new one has started ([`Store::finish_replacing_answer`]) or is given up
    /// ([`Store::abandon_replacing_answer`]). The old answer keeps its snapshots (it may come
    /// back, as a version or when the regeneration is given up): the memory to start the new
    /// one from is [`Store::latest_snapshot_before`] its position.
    ///
    /// [`Error::InvalidInput`] if `old` is not the last message of `conversation` or not an
    /// answer.
    pub async fn begin_replacing_answer(
        &self,
        conversation: ConversationId,
        old: MessageId,
    ) -> Result<Replacement> {
        const LAST: &str = "SELECT MAX(position) FROM messages WHERE conversation_id = ?";
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        touch(&mut tx, conversation, now).await?;
        let old = message_in(&mut tx, old).await?;
        let last: Option<i64> = sqlx::query_scalar(LAST)
            .bind(conversation.0)
            .fetch_one(&mut *tx)
            .await?;
        if old.conversation_id != conversation
            || old.role != Role::Assistant
            || last != Some(i64::from(old.position))
        {
            return Err(Error::InvalidInput(format!(
                "message {} is not the last answer of conversation {conversation}",
                old.id
            )));
        }
        let new = append(&mut tx, conversation, &NewMessage::streaming_answer(), now).await?;
        tx.commit().await?;
        Ok(Replacement { old, new })
    }

    /// Regenerate, step 2 (the new answer has started): in one transaction the old answer is
    /// kept as a version of its position ([`crate::versions`]) and the new one takes its
    /// position. Returns the snapshot files no row refers to any more. Nothing to do (`Ok`)
    /// when the old answer is already gone or held; [`Error::MessageNotFound`] when the new
    /// one is.
    pub async fn finish_replacing_answer(
        &self,
        old: MessageId,
        new: MessageId,
    ) -> Result<Vec<PathBuf>> {
        const MOVE: &str = "UPDATE messages SET position = ? WHERE id = ?";
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let new = message_in(&mut tx, new).await?;
        let old = match message_in(&mut tx, old).await {
            Ok(m) => m,
            Err(Error::MessageNotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // Already replaced: the old answer is held as a version of the new one's conversation.
        const HELD: &str = "SELECT EXISTS (SELECT 1 FROM versions \
            WHERE conversation_id = ? AND holder_id = ?)";
        let held: bool = sqlx::query_scalar(HELD)
            .bind(new.conversation_id.0)
            .bind(old.conversation_id.0)
            .fetch_one(&mut *tx)
            .await?;
        if held && old.position == new.position {
            return Ok(Vec::new());
        }
        if old.conversation_id != new.conversation_id || old.position >= new.position {
            return Err(Error::InvalidInput(format!(
                "message {} cannot replace message {}: not a later message of its conversation",
                new.id, old.id
            )));
        }
        let paths = stash_version(
            &mut tx,
            old.conversation_id,
            old.position,
            Some(new.position),
            now,
        )
        .await?;
        sqlx::query(MOVE)
            .bind(i64::from(old.position))
            .bind(new.id.0)
            .execute(&mut *tx)
            .await?;
        touch(&mut tx, new.conversation_id, now).await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }

    /// Regenerate given up before the new answer started (it failed, or was stopped, before
    /// its first token): the new answer and its snapshots are deleted; the old answer was
    /// never touched. Returns the snapshot files no row refers to any more.
    pub async fn abandon_replacing_answer(&self, new: MessageId) -> Result<Vec<PathBuf>> {
        const DELETE: &str = "DELETE FROM messages WHERE id = ? RETURNING conversation_id";
        let now = self.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let paths = delete_snapshots_of(&mut tx, new).await?;
        let conversation: Option<i64> = sqlx::query_scalar(DELETE)
            .bind(new.0)
            .fetch_optional(&mut *tx)
            .await?;
        let conversation = conversation.ok_or(Error::MessageNotFound(new))?;
        touch(&mut tx, ConversationId(conversation), now).await?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }

    /// Settles what a process that ended left mid-way (called by [`Store::open`], in one
    /// transaction). An answer is still streaming when it is [`MessageStatus::Partial`] with
    /// no stats and no error (the final save of a stopped answer carries its stats); such an
    /// answer:
    /// - right after another answer is a regeneration: with no text it had not started and is
    ///   removed, so the answer it was to replace stays; with text it replaces that answer
    ///   ([`Store::finish_replacing_answer`]: the old one is kept as a version) and is marked as
    ///   below;
    /// - otherwise keeps its text and gets the error [`INTERRUPTED`] (status unchanged).
    pub(crate) async fn settle_unfinished_answers(&self) -> Result<Settled> {
        const STREAMING: &str = concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE role = 'assistant' AND status = 'partial' \
              AND stats IS NULL AND error IS NULL ORDER BY id"
        );
        const BEFORE: &str = "SELECT id, role FROM messages \
            WHERE conversation_id = ? AND position < ? ORDER BY position DESC LIMIT 1";
        const DELETE: &str = "DELETE FROM messages WHERE id = ?";
        const MOVE: &str = "UPDATE messages SET position = ? WHERE id = ?";
        const MARK: &str = "UPDATE messages SET error = ? WHERE id = ?";
        let mut settled = Settled::default();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(STREAMING).fetch_all(&mut *tx).await?;
        for row in &rows {
            let m = match message_from_row(row) {
                Ok(m) => m,
                Err(bad) => {
                    tracing::warn!(%bad, "an unfinished answer cannot be read: left as it is");
                    continue;
                }
            };
            let before: Option<(i64, String)> = sqlx::query_as(BEFORE)
                .bind(m.conversation_id.0)
                .bind(i64::from(m.position))
                .fetch_optional(&mut *tx)
                .await?;
            let regenerating = before.filter(|(_, role)| role == Role::Assistant.as_str());
            if let Some((before_id, _)) = regenerating {
                if m.content.is_empty() {
                    sqlx::query(DELETE).bind(m.id.0).execute(&mut *tx).await?;
                    settled.abandoned += 1;
                    continue;
                }
                // The new answer had started: it takes the old one's place, which is kept as
                // a version with its latest snapshot.
                let old = message_in(&mut tx, MessageId(before_id)).await?;
                let now = self.now();
                let stale = stash_version(
                    &mut tx,
                    m.conversation_id,
                    old.position,
                    Some(m.position),
                    now,
                )
                .await?;
                if !stale.is_empty() {
                    tracing::warn!(
                        files = stale.len(),
                        "snapshots of a replaced answer left in the store"
                    );
                }
                sqlx::query(MOVE)
                    .bind(i64::from(old.position))
                    .bind(m.id.0)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(MARK)
                .bind(INTERRUPTED)
                .bind(m.id.0)
                .execute(&mut *tx)
                .await?;
            settled.interrupted += 1;
        }
        tx.commit().await?;
        Ok(settled)
    }
}
