//! Primed memories (schema 4): a conversation's state saved under a name, and new chats that
//! start from it. The store keeps the rows; the files are the app's (as for snapshots): a
//! deleted memory's file is returned for the caller to remove.

use std::path::PathBuf;

use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::conversations::Conversation;
use crate::error::{Error, MalformedRow, Result};
use crate::types::{ConversationId, Listing, MemoryId, ModelKey, Timestamp};
use crate::Store;

/// A saved memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    /// Its id.
    pub id: MemoryId,
    /// Its name (trimmed, not empty).
    pub name: String,
    /// The model, variant and config it was taken with (only they can use it).
    pub key: ModelKey,
    /// The state file.
    pub path: PathBuf,
    /// The file's size.
    pub size_bytes: u64,
    /// Tokens the state has read.
    pub token_count: u64,
    /// The title of the conversation it was saved from.
    pub source_title: String,
    /// When it was saved.
    pub created_at: Timestamp,
}

/// What [`Store::add_memory`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMemory {
    /// Its name.
    pub name: String,
    /// The model, variant and config of the state.
    pub key: ModelKey,
    /// The state file (a UTF-8 path), written by the caller.
    pub path: PathBuf,
    /// The file's size.
    pub size_bytes: u64,
    /// Tokens the state has read.
    pub token_count: u64,
    /// The title of the conversation it comes from.
    pub source_title: String,
}

/// The longest memory name, in characters.
pub const MAX_MEMORY_NAME_CHARS: usize = 200;

/// A name as stored: trimmed, not empty, at most [`MAX_MEMORY_NAME_CHARS`] characters.
fn clean_name(name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Error::InvalidInput("the memory's name is empty".into()));
    }
    if name.chars().count() > MAX_MEMORY_NAME_CHARS {
        return Err(Error::InvalidInput(format!(
            "the memory's name is longer than {MAX_MEMORY_NAME_CHARS} characters"
        )));
    }
    Ok(name.to_string())
}

/// Column list read by [`memory_from_row`].
macro_rules! memory_columns {
    () => {
        "id, name, model, variant, config_hash, path, size_bytes, token_count, source_title, \
         created_at"
    };
}

fn memory_from_row(row: &SqliteRow) -> Result<Memory, MalformedRow> {
    let id: Option<i64> = row.try_get("id").ok();
    let bad = |reason: String| MalformedRow::new("memories", id, reason);
    let id = id.ok_or_else(|| bad("no readable id".into()))?;
    let text = |name: &str| -> Result<String, MalformedRow> {
        row.try_get(name).map_err(|e| bad(format!("{name}: {e}")))
    };
    let unsigned = |name: &str| -> Result<u64, MalformedRow> {
        let n: i64 = row.try_get(name).map_err(|e| bad(format!("{name}: {e}")))?;
        u64::try_from(n).map_err(|_| bad(format!("{name} is negative ({n})")))
    };
    Ok(Memory {
        id: MemoryId(id),
        name: text("name")?,
        key: ModelKey {
            model: text("model")?,
            variant: text("variant")?,
            config_hash: text("config_hash")?,
        },
        path: PathBuf::from(text("path")?),
        size_bytes: unsigned("size_bytes")?,
        token_count: unsigned("token_count")?,
        source_title: text("source_title")?,
        created_at: Timestamp(
            row.try_get("created_at")
                .map_err(|e| bad(format!("created_at: {e}")))?,
        ),
    })
}

fn to_i64(what: &str, n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::InvalidInput(format!("{what} {n} is too large")))
}

impl Store {
    /// Records a memory whose state file the caller wrote. [`Error::InvalidInput`] for an empty
    /// or too long name, or a path that is not UTF-8.
    pub async fn add_memory(&self, new: &NewMemory) -> Result<Memory> {
        const SQL: &str = "INSERT INTO memories (name, model, variant, config_hash, path, \
            size_bytes, token_count, source_title, created_at) \
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";
        let name = clean_name(&new.name)?;
        let path = new.path.to_str().ok_or_else(|| {
            Error::InvalidInput(format!(
                "memory path {} is not valid UTF-8",
                new.path.display()
            ))
        })?;
        let now = self.now();
        let id: i64 = sqlx::query_scalar(SQL)
            .bind(&name)
            .bind(&new.key.model)
            .bind(&new.key.variant)
            .bind(&new.key.config_hash)
            .bind(path)
            .bind(to_i64("memory size", new.size_bytes)?)
            .bind(to_i64("memory token count", new.token_count)?)
            .bind(&new.source_title)
            .bind(now.as_millis())
            .fetch_one(&self.pool)
            .await?;
        Ok(Memory {
            id: MemoryId(id),
            name,
            key: new.key.clone(),
            path: new.path.clone(),
            size_bytes: new.size_bytes,
            token_count: new.token_count,
            source_title: new.source_title.clone(),
            created_at: now,
        })
    }

    /// The memories, most recent first; rows that cannot be read are skipped and reported.
    pub async fn list_memories(&self) -> Result<Listing<Memory>> {
        const SQL: &str = concat!(
            "SELECT ",
            memory_columns!(),
            " FROM memories ORDER BY created_at DESC, id DESC"
        );
        let rows = sqlx::query(SQL).fetch_all(&self.pool).await?;
        Ok(Listing::collect(rows.iter().map(memory_from_row)))
    }

    /// One memory ([`Error::MemoryNotFound`] if there is none with this id).
    pub async fn get_memory(&self, id: MemoryId) -> Result<Memory> {
        const SQL: &str = concat!("SELECT ", memory_columns!(), " FROM memories WHERE id = ?");
        let row = sqlx::query(SQL)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::MemoryNotFound(id))?;
        Ok(memory_from_row(&row)?)
    }

    /// Renames a memory (the name as [`Store::add_memory`] takes it).
    pub async fn rename_memory(&self, id: MemoryId, name: &str) -> Result<()> {
        const SQL: &str = "UPDATE memories SET name = ? WHERE id = ?";
        let name = clean_name(name)?;
        let done = sqlx::query(SQL)
            .bind(name)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::MemoryNotFound(id));
        }
        Ok(())
    }

    /// Deletes a memory; the chats that started from it keep what they have. Returns its file
    /// for the caller to remove.
    pub async fn delete_memory(&self, id: MemoryId) -> Result<PathBuf> {
        const SQL: &str = "DELETE FROM memories WHERE id = ? RETURNING path";
        let path: Option<String> = sqlx::query_scalar(SQL)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        path.map(PathBuf::from).ok_or(Error::MemoryNotFound(id))
    }

    /// A new conversation titled `title`, on the memory's model and variant, that starts from
    /// the memory ([`Store::conversation_memory`]).
    pub async fn create_conversation_from_memory(
        &self,
        memory: MemoryId,
        title: &str,
        settings: &crate::ConversationSettings,
    ) -> Result<Conversation> {
        const SQL: &str = "INSERT INTO conversations \
            (title, created_at, updated_at, model, variant, settings, memory_id) \
            SELECT ?1, ?2, ?2, model, variant, ?3, id FROM memories WHERE id = ?4 RETURNING id";
        let now = self.now();
        let json = serde_json::to_string(settings)?;
        let id: i64 = sqlx::query_scalar(SQL)
            .bind(title)
            .bind(now.as_millis())
            .bind(json)
            .bind(memory.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::MemoryNotFound(memory))?;
        self.get_conversation(ConversationId(id)).await
    }

    /// The memory `conversation` started from, if it did and the memory still exists.
    pub async fn conversation_memory(
        &self,
        conversation: ConversationId,
    ) -> Result<Option<Memory>> {
        const SQL: &str = concat!(
            "SELECT ",
            memory_columns!(),
            " FROM memories WHERE id = (SELECT memory_id FROM conversations WHERE id = ?)"
        );
        let row = sqlx::query(SQL)
            .bind(conversation.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(memory_from_row).transpose()?)
    }
}
