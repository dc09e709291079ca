//! Branches: a new conversation that starts as a copy of another one up to a message (its
//! title, model, variant and settings, and its messages up to and including that one, with
//! their text, status and statistics), in one transaction. The source is not touched. Which
//! state snapshot the branch may reuse is the caller's business: the copied messages' ids are
//! returned, old to new.

use crate::error::{Error, Result};
use crate::types::{ConversationId, MessageId};
use crate::Store;

/// A branch made by [`Store::branch_conversation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    /// The new conversation.
    pub conversation: ConversationId,
    /// The copied messages, `(source's id, branch's id)`, in order.
    pub messages: Vec<(MessageId, MessageId)>,
}

impl Store {
    /// A new conversation titled `title`, with `source`'s model, variant and settings and a copy
    /// of its messages up to and including `through` ([`Error::MessageNotFound`] when `through`
    /// is not one of `source`'s, [`Error::ConversationNotFound`] when `source` does not exist).
    pub async fn branch_conversation(
        &self,
        source: ConversationId,
        through: MessageId,
        title: &str,
    ) -> Result<Branch> {
        const POSITION: &str = "SELECT position FROM messages WHERE id = ? AND conversation_id = ?";
        const CONVERSATION: &str = "INSERT INTO conversations \
            (title, created_at, updated_at, model, variant, settings) \
            SELECT ?, ?, ?, model, variant, settings FROM conversations WHERE id = ? \
            RETURNING id";
        const MESSAGES: &str = "SELECT id FROM messages \
            WHERE conversation_id = ? AND position <= ? ORDER BY position";
        const COPY: &str = "INSERT INTO messages \
            (conversation_id, position, role, content, status, error, created_at, updated_at, \
             token_count, stats, attachment) \
            SELECT ?, position, role, content, status, error, created_at, ?, token_count, stats, \
            attachment FROM messages WHERE id = ? RETURNING id";
        let now = self.now().as_millis();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = ?")
            .bind(source.0)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(Error::ConversationNotFound(source));
        }
        let position: i64 = sqlx::query_scalar(POSITION)
            .bind(through.0)
            .bind(source.0)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::MessageNotFound(through))?;
        let id: i64 = sqlx::query_scalar(CONVERSATION)
            .bind(title)
            .bind(now)
            .bind(now)
            .bind(source.0)
            .fetch_one(&mut *tx)
            .await?;
        let old: Vec<i64> = sqlx::query_scalar(MESSAGES)
            .bind(source.0)
            .bind(position)
            .fetch_all(&mut *tx)
            .await?;
        let mut messages = Vec::with_capacity(old.len());
        for o in old {
            let n: i64 = sqlx::query_scalar(COPY)
                .bind(id)
                .bind(now)
                .bind(o)
                .fetch_one(&mut *tx)
                .await?;
            messages.push((MessageId(o), MessageId(n)));
        }
        tx.commit().await?;
        Ok(Branch {
            conversation: ConversationId(id),
            messages,
        })
    }
}
