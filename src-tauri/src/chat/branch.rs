//! "Branch from here": a new conversation that starts as a copy of another one up to a message
//! ([`tptt_store::Store::branch_conversation`]). The source keeps a state snapshot after each
//! answer; the branch gets the latest one at or before that message, per model identity (a
//! hard link to the same immutable file, whose KV pages it then shares, or a copy where links
//! cannot be made), so its next message continues from that state without re-reading the
//! history (only what follows the snapshot: the message branched from, when it is a user's).
//! Without one its memory is rebuilt from the text at its first turn, as for any conversation
//! without a snapshot.

use tptt_store::{ConversationId, MessageId, NewSnapshot};

use super::memory::{meta_path, remove_snapshot_files, share_file};
use crate::dto::ConversationSummary;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::state::AppState;

/// The longest title a branch gets (the source's, marked as a branch).
const MAX_TITLE_CHARS: usize = 200;

/// `branch_conversation`: the branch of `source` through `through` (module doc). `busy` for the
/// answer being generated now; `not_found` for an unknown conversation or a message not in it.
pub async fn branch(
    state: &AppState,
    source: ConversationId,
    through: MessageId,
) -> CmdResult<ConversationSummary> {
    let c = state.store.get_conversation(source).await?;
    let messages = state.store.list_messages(source).await?.items;
    if super::is_generating(state, source) && messages.last().is_some_and(|m| m.id == through) {
        return Err(CommandError::new(
            ErrorKind::Busy,
            "This answer is still being written: branch from it once it is done, or stop it.",
        ));
    }
    let base = if c.title.trim().is_empty() {
        "Chat"
    } else {
        c.title.trim()
    };
    let title: String = format!("{base} (branch)")
        .chars()
        .take(MAX_TITLE_CHARS)
        .collect();
    let made = state
        .store
        .branch_conversation(source, through, &title)
        .await?;
    let new_through = made
        .messages
        .iter()
        .find(|(old, _)| *old == through)
        .map(|(_, new)| *new);
    let mut reused = 0;
    let position_of = |id| messages.iter().find(|m| m.id == id).map(|m| m.position);
    if let (Some(_), Some(limit)) = (new_through, position_of(through)) {
        // Per model key, the snapshot of the latest message at or before `through`.
        let mut latest: Vec<(u32, tptt_store::Snapshot)> = Vec::new();
        for s in state.store.list_snapshots(source).await?.items {
            let Some(p) = position_of(s.message_id).filter(|&p| p <= limit) else {
                continue;
            };
            match latest.iter_mut().find(|(_, l)| l.key == s.key) {
                Some(l) if l.0 < p => *l = (p, s),
                Some(_) => {}
                None => latest.push((p, s)),
            }
        }
        for (_, s) in &latest {
            let Some(new_message) = made
                .messages
                .iter()
                .find(|(old, _)| *old == s.message_id)
                .map(|(_, new)| *new)
            else {
                continue;
            };
            let dir = state
                .config
                .snapshots_dir()
                .join(made.conversation.0.to_string());
            let path = dir.join(format!("{}.safetensors", new_message.0));
            // Under a `.tmp` name until its row is recorded: a kill in between leaves a file the
            // start-up sweep deletes (`crate::cleanup`), never an unrecorded snapshot.
            let tmp = path.with_extension("tmp");
            if let Err(e) = share_file(&s.path, &tmp, &dir) {
                tracing::warn!(error = %e, "the branch's state could not be shared: it is rebuilt from the text");
                continue;
            }
            let recorded = state
                .store
                .record_snapshot(&NewSnapshot {
                    conversation_id: made.conversation,
                    message_id: new_message,
                    key: s.key.clone(),
                    path: path.clone(),
                    size_bytes: s.size_bytes,
                    token_count: s.token_count,
                })
                .await;
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "the branch's state could not be recorded");
                remove_snapshot_files(&[tmp]);
                continue;
            }
            // A row whose file is missing (a kill right here) is refused on load and the
            // memory rebuilt from the text, as for any damaged snapshot.
            if let Err(e) = std::fs::rename(&tmp, &path) {
                tracing::warn!(error = %e, "the branch's state could not be put in place");
                continue;
            }
            // The sidecar (the meter) goes with it; without it the meter shows once loaded.
            let _ = share_file(&meta_path(&s.path), &meta_path(&path), &dir);
            reused += 1;
        }
    }
    tracing::info!(
        source = source.0,
        branch = made.conversation.0,
        messages = made.messages.len(),
        states = reused,
        "branched"
    );
    let branch = state.store.get_conversation(made.conversation).await?;
    let preview = messages
        .iter()
        .find(|m| m.id == through)
        .map_or("", |m| m.content.as_str());
    Ok(ConversationSummary::new(&branch, preview))
}
