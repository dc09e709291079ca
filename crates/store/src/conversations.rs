//! Conversations: create, list, get, rename, choose model and variant, settings, archive, pin,
//! delete.
//!
//! The holders of hidden versions ([`crate::versions`]) are conversation rows too, but not
//! conversations of this API: their ids are not found here.
//!
//! A [`Conversation`] row holds its title, timestamps, the model and variant its next message
//! uses, and its [`ConversationSettings`] (JSON). `updated_at` moves on every change to the
//! conversation or its messages, and listings are ordered by it, most recent first.

use std::path::PathBuf;

use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::error::{Error, MalformedRow, Result};
use crate::snapshots::unreferenced_paths;
use crate::types::{ConversationId, ConversationSettings, Listing, Timestamp};
use crate::Store;

/// A conversation, without its messages.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversation {
    /// Its id.
    pub id: ConversationId,
    /// Title shown in the list (may be empty: the UI names it).
    pub title: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// Last change to it or its messages.
    pub updated_at: Timestamp,
    /// Repo id or local folder of the model its next message uses.
    pub model: Option<String>,
    /// Variant of that model.
    pub variant: Option<String>,
    /// Its settings (system prompt, sampling, window).
    pub settings: ConversationSettings,
    /// Hidden from the main list.
    pub archived: bool,
    /// Listed first.
    pub pinned: bool,
}

/// What [`Store::create_conversation`] needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewConversation {
    /// Title (may be empty).
    pub title: String,
    /// Model repo id or folder, if already chosen.
    pub model: Option<String>,
    /// Variant, if already chosen.
    pub variant: Option<String>,
    /// Settings.
    pub settings: ConversationSettings,
}

impl NewConversation {
    /// A conversation with this title and default everything else.
    pub fn titled(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }
}

/// Which conversations [`Store::list_conversations`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListScope {
    /// Those not archived (the main list).
    #[default]
    Active,
    /// Only archived ones.
    Archived,
    /// All.
    All,
}

/// Column list read by [`conversation_from_row`].
macro_rules! conversation_columns {
    () => {
        "id, title, created_at, updated_at, model, variant, settings, archived, pinned"
    };
}
pub(crate) use conversation_columns;

/// Reads one conversation row, or says why it cannot.
pub(crate) fn conversation_from_row(row: &SqliteRow) -> Result<Conversation, MalformedRow> {
    let id: Option<i64> = row.try_get("id").ok();
    let bad = |reason: String| MalformedRow::new("conversations", id, reason);
    let id = id.ok_or_else(|| bad("no readable id".into()))?;
    let title: String = row
        .try_get("title")
        .map_err(|e| bad(format!("title: {e}")))?;
    let created_at: i64 = row.try_get("created_at").map_err(|e| bad(e.to_string()))?;
    let updated_at: i64 = row.try_get("updated_at").map_err(|e| bad(e.to_string()))?;
    let model: Option<String> = row
        .try_get("model")
        .map_err(|e| bad(format!("model: {e}")))?;
    let variant: Option<String> = row
        .try_get("variant")
        .map_err(|e| bad(format!("variant: {e}")))?;
    let settings: String = row
        .try_get("settings")
        .map_err(|e| bad(format!("settings: {e}")))?;
    let settings: ConversationSettings = serde_json::from_str(&settings).map_err(|e| {
        bad(format!(
            "settings are not valid conversation settings JSON: {e}"
        ))
    })?;
    let flag = |name: &str| -> Result<bool, MalformedRow> {
        match row
            .try_get::<i64, _>(name)
            .map_err(|e| bad(format!("{name}: {e}")))?
        {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(bad(format!("{name} flag is {other}, expected 0 or 1"))),
        }
    };
    let archived = flag("archived")?;
    let pinned = flag("pinned")?;
    Ok(Conversation {
        id: ConversationId(id),
        title,
        created_at: Timestamp(created_at),
        updated_at: Timestamp(updated_at),
        model,
        variant,
        settings,
        archived,
        pinned,
    })
}

impl Store {
    /// Creates a conversation; `created_at` and `updated_at` are now.
    pub async fn create_conversation(&self, new: &NewConversation) -> Result<Conversation> {
        const SQL: &str = "INSERT INTO conversations \
            (title, created_at, updated_at, model, variant, settings) \
            VALUES (?, ?, ?, ?, ?, ?) RETURNING id";
        let now = self.now();
        let settings = serde_json::to_string(&new.settings)?;
        let id: i64 = sqlx::query_scalar(SQL)
            .bind(&new.title)
            .bind(now.as_millis())
            .bind(now.as_millis())
            .bind(&new.model)
            .bind(&new.variant)
            .bind(&settings)
            .fetch_one(&self.pool)
            .await?;
        Ok(Conversation {
            id: ConversationId(id),
            title: new.title.clone(),
            created_at: now,
            updated_at: now,
            model: new.model.clone(),
            variant: new.variant.clone(),
            settings: new.settings.clone(),
            archived: false,
            pinned: false,
        })
    }

    /// Conversations, pinned ones first, then most recently updated first. Rows that cannot be read are skipped and
    /// reported in [`Listing::skipped`].
    pub async fn list_conversations(&self, scope: ListScope) -> Result<Listing<Conversation>> {
        const SQL: &str = concat!(
            "SELECT ",
            conversation_columns!(),
            " FROM conversations WHERE archived IN (?, ?) AND owner_id IS NULL \
              ORDER BY pinned DESC, updated_at DESC, id DESC"
        );
        let (a, b) = match scope {
            ListScope::Active => (0, 0),
            ListScope::Archived => (1, 1),
            ListScope::All => (0, 1),
        };
        let rows = sqlx::query(SQL)
            .bind(a)
            .bind(b)
            .fetch_all(&self.pool)
            .await?;
        Ok(Listing::collect(rows.iter().map(conversation_from_row)))
    }

    /// One conversation. [`Error::ConversationNotFound`] if there is none with this id,
    /// [`Error::Malformed`] if its row cannot be read.
    pub async fn get_conversation(&self, id: ConversationId) -> Result<Conversation> {
        const SQL: &str = concat!(
            "SELECT ",
            conversation_columns!(),
            " FROM conversations WHERE id = ? AND owner_id IS NULL"
        );
        let row = sqlx::query(SQL)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        let row = row.ok_or(Error::ConversationNotFound(id))?;
        Ok(conversation_from_row(&row)?)
    }

    /// Sets the title. Any string is accepted, the empty one included.
    pub async fn rename_conversation(&self, id: ConversationId, title: &str) -> Result<()> {
        const SQL: &str =
            "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ? AND owner_id IS NULL";
        let done = sqlx::query(SQL)
            .bind(title)
            .bind(self.now().as_millis())
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected(), id)
    }

    /// Sets the model and variant the conversation's next message uses. Snapshots of other
    /// models stay until [`Store::delete_stale_snapshots`] drops them.
    pub async fn set_conversation_model(
        &self,
        id: ConversationId,
        model: Option<&str>,
        variant: Option<&str>,
    ) -> Result<()> {
        const SQL: &str = "UPDATE conversations SET model = ?, variant = ?, updated_at = ? \
             WHERE id = ? AND owner_id IS NULL";
        let done = sqlx::query(SQL)
            .bind(model)
            .bind(variant)
            .bind(self.now().as_millis())
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected(), id)
    }

    /// Replaces the conversation's settings.
    pub async fn update_conversation_settings(
        &self,
        id: ConversationId,
        settings: &ConversationSettings,
    ) -> Result<()> {
        const SQL: &str = "UPDATE conversations SET settings = ?, updated_at = ? \
            WHERE id = ? AND owner_id IS NULL";
        let json = serde_json::to_string(settings)?;
        let done = sqlx::query(SQL)
            .bind(json)
            .bind(self.now().as_millis())
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected(), id)
    }

    /// Archives or restores a conversation.
    pub async fn set_archived(&self, id: ConversationId, archived: bool) -> Result<()> {
        const SQL: &str = "UPDATE conversations SET archived = ?, updated_at = ? \
            WHERE id = ? AND owner_id IS NULL";
        let done = sqlx::query(SQL)
            .bind(i64::from(archived))
            .bind(self.now().as_millis())
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected(), id)
    }

    /// Pins a conversation (listed first) or unpins it; its place among the recent ones does
    /// not change (`updated_at` stays).
    pub async fn set_pinned(&self, id: ConversationId, pinned: bool) -> Result<()> {
        const SQL: &str = "UPDATE conversations SET pinned = ? WHERE id = ? AND owner_id IS NULL";
        let done = sqlx::query(SQL)
            .bind(i64::from(pinned))
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        found(done.rows_affected(), id)
    }

    /// Deletes a conversation with its messages, snapshot rows and versions (the schema
    /// cascades, to the holders of its versions too). Returns the snapshot files no row refers
    /// to any more, for the caller to remove.
    pub async fn delete_conversation(&self, id: ConversationId) -> Result<Vec<PathBuf>> {
        const SNAPSHOTS: &str = "DELETE FROM snapshots WHERE conversation_id IN \
            (SELECT id FROM conversations WHERE id = ?1 OR owner_id = ?1) RETURNING path";
        const CONVERSATION: &str = "DELETE FROM conversations WHERE id = ? AND owner_id IS NULL";
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let paths: Vec<String> = sqlx::query_scalar(SNAPSHOTS)
            .bind(id.0)
            .fetch_all(&mut *tx)
            .await?;
        let done = sqlx::query(CONVERSATION)
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        found(done.rows_affected(), id)?;
        let files = unreferenced_paths(&mut tx, paths).await?;
        tx.commit().await?;
        Ok(files)
    }
}

/// `Ok` if an update touched a row, else [`Error::ConversationNotFound`].
fn found(rows_affected: u64, id: ConversationId) -> Result<()> {
    if rows_affected == 0 {
        Err(Error::ConversationNotFound(id))
    } else {
        Ok(())
    }
}
