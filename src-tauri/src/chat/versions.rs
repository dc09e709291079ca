//! Versions (`switch_version`): regenerate and edit keep what they replace
//! ([`tptt_store::versions`]), and the user shows another version of a position. Its messages
//! come back with their snapshot (a stashed continuation keeps its latest), so the next turn
//! continues from that state, or from the latest one before it and reads only what follows —
//! never the whole conversation again (the memory rule, module doc of [`super`]).

use tptt_store::{ConversationId, MessageId};

use super::memory::invalidate_session;
use super::slot::Slot;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::state::AppState;

/// Shows version `version` of the continuation that `message` starts. `busy` while a reply is
/// generated (the slot keeps a turn from reading the memory meanwhile), `not_found` for an
/// unknown conversation, a message not shown in it or a version it does not have.
pub async fn switch_version(
    state: &AppState,
    conversation: ConversationId,
    message: MessageId,
    version: u32,
) -> CmdResult<()> {
    state.store.get_conversation(conversation).await?;
    let (_slot, _cancel) = Slot::acquire(state, conversation)?;
    let switched = match state
        .store
        .switch_version(conversation, message, version)
        .await
    {
        Ok(s) => s,
        Err(tptt_store::Error::InvalidInput(_)) => {
            return Err(CommandError::new(
                ErrorKind::NotFound,
                format!("This message has no version {version}."),
            ))
        }
        Err(tptt_store::Error::MessageNotFound(_)) => {
            return Err(CommandError::new(
                ErrorKind::NotFound,
                format!("Message {} is not shown in this conversation.", message.0),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    // A memory that read the other version is no start for this one.
    invalidate_session(state, conversation, Some(switched.position));
    tracing::info!(
        conversation = conversation.0,
        position = switched.position,
        version = switched.version,
        "version shown"
    );
    Ok(())
}
