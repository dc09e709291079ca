//! The conversation memory the app holds between turns: plain data, so the app's shared state
//! can hold it without depending on the chat's operations.

use tptt_engine::snapshot::ModelIdentity;
use tptt_engine::{ChatTranscript, Session};
use tptt_store::ConversationId;

/// The memory of the conversation used last, kept between turns.
pub struct CachedSession {
    /// Its conversation.
    pub conversation: ConversationId,
    /// The state (and tokens, logits).
    pub session: Session,
    /// What rendered text it read.
    pub transcript: ChatTranscript,
    /// The model it belongs to.
    pub identity: ModelIdentity,
    /// Position of the last message it read.
    pub read_position: Option<u32>,
}
