//! Import: conversations brought in from a backup, all of them in one transaction (a failure
//! imports none), each a new conversation with new ids; nothing that exists is touched. Which
//! state snapshots follow is the caller's business: the new messages' ids are returned in order.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::types::{
    Attachment, ConversationId, ConversationSettings, MessageId, MessageStatus, Role, Timestamp,
};
use crate::Store;

/// A message to import.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportMessage {
    /// Its role.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Its status.
    pub status: MessageStatus,
    /// Why it is not complete, when known.
    pub error: Option<String>,
    /// When it was written.
    pub created_at: Timestamp,
    /// Its last change.
    pub updated_at: Timestamp,
    /// Its prompt tokens, when known.
    pub token_count: Option<u32>,
    /// Its generation statistics.
    pub stats: Option<Value>,
    /// The document attached to it.
    pub attachment: Option<Attachment>,
}

/// A conversation to import.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportConversation {
    /// Its title.
    pub title: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// Its last change.
    pub updated_at: Timestamp,
    /// The model its next message uses.
    pub model: Option<String>,
    /// That model's variant.
    pub variant: Option<String>,
    /// Its own settings.
    pub settings: ConversationSettings,
    /// In the archived list.
    pub archived: bool,
    /// Listed first.
    pub pinned: bool,
    /// Its messages, in order.
    pub messages: Vec<ImportMessage>,
}

/// One imported conversation: its new id and its messages' new ids, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// The new conversation.
    pub conversation: ConversationId,
    /// Its messages' ids, in the order given.
    pub messages: Vec<MessageId>,
}

impl Store {
    /// Imports `conversations` in one transaction, in order. [`Error::InvalidInput`] for a
    /// value the schema refuses (a negative or out-of-range number); a failure imports none.
    pub async fn import_conversations(
        &self,
        conversations: &[ImportConversation],
    ) -> Result<Vec<Imported>> {
        const CONVERSATION: &str = "INSERT INTO conversations \
            (title, created_at, updated_at, model, variant, settings, archived, pinned) \
            VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";
        const MESSAGE: &str = "INSERT INTO messages \
            (conversation_id, position, role, content, status, error, created_at, updated_at, \
             token_count, stats, attachment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(conversations.len());
        for c in conversations {
            let settings = serde_json::to_string(&c.settings)?;
            let id: i64 = sqlx::query_scalar(CONVERSATION)
                .bind(&c.title)
                .bind(c.created_at.as_millis())
                .bind(c.updated_at.as_millis())
                .bind(&c.model)
                .bind(&c.variant)
                .bind(settings)
                .bind(i64::from(c.archived))
                .bind(i64::from(c.pinned))
                .fetch_one(&mut *tx)
                .await?;
            let mut messages = Vec::with_capacity(c.messages.len());
            for (position, m) in c.messages.iter().enumerate() {
                let position = i64::try_from(position)
                    .map_err(|_| Error::InvalidInput("too many messages".into()))?;
                let stats = m.stats.as_ref().map(serde_json::to_string).transpose()?;
                if let Some(a) = m.attachment.as_ref().filter(|a| !a.fits(&m.content)) {
                    return Err(Error::InvalidInput(format!(
                        "attachment range {}..{} is not within its message's text",
                        a.start, a.end
                    )));
                }
                let attachment = m
                    .attachment
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()?;
                let mid: i64 = sqlx::query_scalar(MESSAGE)
                    .bind(id)
                    .bind(position)
                    .bind(m.role.as_str())
                    .bind(&m.content)
                    .bind(m.status.as_str())
                    .bind(&m.error)
                    .bind(m.created_at.as_millis())
                    .bind(m.updated_at.as_millis())
                    .bind(m.token_count.map(i64::from))
                    .bind(stats)
                    .bind(attachment)
                    .fetch_one(&mut *tx)
                    .await?;
                messages.push(MessageId(mid));
            }
            out.push(Imported {
                conversation: ConversationId(id),
                messages,
            });
        }
        tx.commit().await?;
        Ok(out)
    }
}
