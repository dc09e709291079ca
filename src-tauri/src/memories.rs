//! Primed memories: a conversation's state saved under a name, listed in a library, and new
//! chats that start from it at no prefill cost ([`tptt_store::memories`]).
//!
//! Saving shares the conversation's latest snapshot file (and its sidecar, the meter) into
//! `<states>/memories/` (a hard link; snapshot files are never rewritten), under a `.tmp` name
//! until its row is recorded, so a kill in between leaves a file the start-up sweep deletes. A
//! chat started from a memory records it (`memory_id`); until the chat has a snapshot of its
//! own, its memory is the primed one (the memory rule, `chat::memory`), and its first turn reads
//! only its own messages on top of it.

use tptt_store::{ConversationId, ConversationSettings, MemoryId, NewMemory};

use crate::chat::{meta_path, remove_snapshot_files, share_file, Slot};
use crate::dto::{ConversationSummary, SavedMemory};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::settings::storage_error;
use crate::state::AppState;

/// The folder of memory files, under the snapshots folder.
pub fn memories_dir(state: &AppState) -> std::path::PathBuf {
    state.config.snapshots_dir().join("memories")
}

/// A name as the store takes it, or `invalid_settings` naming the field.
fn check_name(name: &str) -> CmdResult<()> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(CommandError::new(
            ErrorKind::InvalidSettings,
            "name: give the memory a name",
        ));
    }
    if trimmed.chars().count() > tptt_store::MAX_MEMORY_NAME_CHARS {
        return Err(CommandError::new(
            ErrorKind::InvalidSettings,
            format!(
                "name: at most {} characters",
                tptt_store::MAX_MEMORY_NAME_CHARS
            ),
        ));
    }
    Ok(())
}

/// `save_memory`: the conversation's memory as it stands after its last answer, saved as
/// `name`. `not_found` when it has no saved state yet (nothing answered, or its snapshot was
/// dropped); `busy` while a reply is generated (its state is being written).
pub async fn save(
    state: &AppState,
    conversation: ConversationId,
    name: &str,
) -> CmdResult<SavedMemory> {
    check_name(name)?;
    let c = state.store.get_conversation(conversation).await?;
    let (_slot, _cancel) = Slot::acquire(state, conversation)?;
    let latest = state
        .store
        .list_snapshots(conversation)
        .await?
        .items
        .pop()
        .filter(|s| s.path.is_file())
        .ok_or_else(|| {
            CommandError::new(
                ErrorKind::NotFound,
                "This chat has no saved memory yet: its memory is saved after each answer.",
            )
        })?;
    let dir = memories_dir(state);
    let stem = format!(
        "{}-{}-{}",
        conversation.0,
        latest.id.0,
        tptt_store::Timestamp::now().as_millis()
    );
    let path = dir.join(format!("{stem}.safetensors"));
    let tmp = path.with_extension("tmp");
    share_file(&latest.path, &tmp, &dir).map_err(|e| storage_error("the memory", e))?;
    let recorded = state
        .store
        .add_memory(&NewMemory {
            name: name.to_string(),
            key: latest.key.clone(),
            path: path.clone(),
            // Its file and the KV pages it keeps alive.
            size_bytes: crate::chat::state_disk_bytes(&state.config.snapshots_dir(), &latest.path),
            token_count: latest.token_count,
            source_title: c.title.clone(),
        })
        .await;
    let memory = match recorded {
        Ok(m) => m,
        Err(e) => {
            remove_snapshot_files(&[tmp]);
            return Err(e.into());
        }
    };
    if let Err(e) = std::fs::rename(&tmp, &path) {
        // The row is there without its file: drop it, as if nothing was saved.
        let _ = state.store.delete_memory(memory.id).await;
        remove_snapshot_files(&[tmp]);
        return Err(storage_error("the memory", e));
    }
    // The meter goes with it; without it the library shows the size and tokens only.
    if let Err(e) = share_file(&meta_path(&latest.path), &meta_path(&path), &dir) {
        tracing::warn!(error = %e, "the memory's meter was not copied");
    }
    tracing::info!(
        conversation = conversation.0,
        memory = memory.id.0,
        tokens = memory.token_count,
        "memory saved"
    );
    Ok(SavedMemory::from(&memory))
}

/// `list_memories`: most recent first.
pub async fn list(state: &AppState) -> CmdResult<Vec<SavedMemory>> {
    let listing = state.store.list_memories().await?;
    if !listing.skipped.is_empty() {
        tracing::warn!(
            skipped = listing.skipped.len(),
            "unreadable memories left out"
        );
    }
    Ok(listing.items.iter().map(SavedMemory::from).collect())
}

/// `rename_memory`.
pub async fn rename(state: &AppState, id: MemoryId, name: &str) -> CmdResult<()> {
    check_name(name)?;
    state.store.rename_memory(id, name).await?;
    Ok(())
}

/// `delete_memory`: the row and its file (the chats that started from it keep their own
/// snapshots; one that has not answered yet starts from an empty memory).
pub async fn delete(state: &AppState, id: MemoryId) -> CmdResult<()> {
    let path = state.store.delete_memory(id).await?;
    remove_snapshot_files(&[path]);
    Ok(())
}

/// `new_chat_from_memory`: a new conversation titled as the memory, on its model and variant
/// (its own settings when they are not the app's), whose memory is the saved one.
pub async fn new_chat(state: &AppState, id: MemoryId) -> CmdResult<ConversationSummary> {
    let m = state.store.get_memory(id).await?;
    let app = state.settings();
    let same = app.model_repo.as_deref() == Some(m.key.model.as_str())
        && app.variant.as_deref() == Some(m.key.variant.as_str());
    let settings = if same {
        ConversationSettings::default()
    } else {
        ConversationSettings {
            model_repo: Some(m.key.model.clone()),
            variant: Some(m.key.variant.clone()),
            ..ConversationSettings::default()
        }
    };
    let c = state
        .store
        .create_conversation_from_memory(id, &m.name, &settings)
        .await?;
    tracing::info!(
        conversation = c.id.0,
        memory = id.0,
        "new chat from a saved memory"
    );
    Ok(ConversationSummary::new(&c, ""))
}
