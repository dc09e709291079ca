//! The conversation's memory (module doc of [`super`], "The memory rule"): the state held
//! between turns, the snapshots on disk and their sidecars, the saved memory a chat started
//! from, the fresh memory after a reset, and the memory meter.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tptt_engine::session::{Session, SessionOptions};
use tptt_engine::snapshot::{self, ModelIdentity};
use tptt_engine::{ChatTranscript, ReadMark};
use tptt_store::{ConversationId, Message, MessageId, ModelKey, NewSnapshot};

use super::held::CachedSession;
use super::slot::Slot;
use super::turn::block_on;
use super::SNAPSHOTS_KEPT;
use crate::chat_settings;
use crate::dto::{ChatSettingsDto, ChatSettingsSaved, MemoryInfo};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::runtime::LoadedModel;
use crate::state::{lock, AppState};

/// A snapshot's sidecar: its memory meter (shown before the snapshot is loaded) and the text its
/// state read — which the snapshot itself records since it keeps a read mark (the sidecar's is
/// read only for older files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMeta {
    /// What the state read (`None`: unknown).
    pub mark: Option<ReadMark>,
    /// Its memory.
    pub memory: MemoryInfo,
}

/// The sidecar of snapshot file `path`.
pub fn meta_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("json")
}

/// Writes a snapshot's sidecar atomically: a temporary `.json.tmp` renamed into place (a crash
/// leaves the old sidecar or the new one, and the start-up sweep deletes the temporary).
fn write_meta(snapshot: &Path, meta: &SnapshotMeta) -> Result<(), String> {
    let path = meta_path(snapshot);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The folder of the KV pages the app's snapshots share (`tptt_engine::snapshot::save_paged`).
pub fn pages_dir(states: &Path) -> PathBuf {
    states.join(snapshot::PAGES_DIR)
}

/// What snapshot `path` holds on disk: its file and every KV page it refers to (pages shared
/// with other snapshots counted whole).
pub fn state_disk_bytes(states: &Path, path: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let pages = pages_dir(states);
    let shared: u64 = snapshot::page_names(path)
        .unwrap_or_default()
        .iter()
        .map(|n| len(&snapshot::page_path(&pages, n)))
        .sum();
    len(path) + shared
}

/// Restores snapshot `path` (any format; a paged one's pages in [`pages_dir`]) onto `model`.
pub fn load_snapshot(
    state: &AppState,
    model: &LoadedModel,
    path: &Path,
) -> tptt_engine::Result<(Session, Option<ReadMark>)> {
    let pages = pages_dir(&state.config.snapshots_dir());
    let (mut session, mark) =
        snapshot::load_paged(model.model.clone(), &model.identity, path, &pages)?;
    // A snapshot's cache keeps its own format: stored from now on as the settings say.
    session
        .state
        .set_kv_format(state.settings().kv_format.format_for(&model.model))?;
    Ok((session, mark))
}

/// Reads a snapshot's sidecar.
pub fn read_meta(snapshot: &Path) -> Option<SnapshotMeta> {
    std::fs::read(meta_path(snapshot))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// `to` (in folder `dir`, created if need be) as a hard link to `from` (snapshot files are
/// never written again once made), or a copy where a link cannot be made (another file system).
pub fn share_file(from: &Path, to: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(_) => std::fs::copy(from, to).map(|_| ()),
    }
}

/// Removes snapshot files (and their sidecars) the store no longer refers to.
pub fn remove_snapshot_files(paths: &[PathBuf]) {
    for p in paths {
        for f in [p.clone(), meta_path(p)] {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %f.display(), error = %e, "cannot remove a snapshot file");
                }
            }
        }
    }
}

/// Drops the cached memory of `conversation` if it read the message at `from_position` or a
/// later one (they are being deleted); `None` drops it whatever it read.
pub fn invalidate_session(
    state: &AppState,
    conversation: ConversationId,
    from_position: Option<u32>,
) {
    let mut g = lock(&state.session);
    let stale = g.as_ref().is_some_and(|c| {
        c.conversation == conversation
            && from_position.is_none_or(|from| c.read_position.is_some_and(|p| p >= from))
    });
    if stale {
        *g = None;
    }
}

/// Finds the conversation's memory for `model` (module doc): the held one, its latest matching
/// snapshot, or a fresh one (then the whole conversation is fed: rebuilt from the text).
pub(super) fn memory_for(
    state: &AppState,
    conversation: ConversationId,
    model: &LoadedModel,
    history: &[Message],
    answer_position: u32,
    window: Option<u32>,
) -> CachedSession {
    if let Some(c) = lock(&state.session).take() {
        if c.conversation == conversation
            && c.identity == model.identity
            && c.read_position.is_none_or(|p| p < answer_position)
        {
            return c;
        }
        // Another conversation's (or another model's) memory: it is in its snapshot already.
    }
    // Snapshots recorded before format version 5 are found under the version 4 key (they
    // still load; the next save records the current key and drops the old row).
    let key = model_key(&model.identity);
    let key_v4 = ModelKey::new(
        model.identity.model.clone(),
        model.identity.variant.clone(),
        model.identity.numerics_key_v4(),
    );
    // Of the messages before the answer: a regenerated answer's old one still stands, with its
    // snapshot, until the new one has started.
    let before = |key| {
        state
            .store
            .latest_snapshot_before(conversation, key, answer_position)
    };
    let found = match block_on(before(&key)) {
        Ok(None) => block_on(before(&key_v4)),
        other => other,
    };
    match found {
        Ok(Some(snap)) => {
            let position = history
                .iter()
                .find(|m| m.id == snap.message_id)
                .map(|m| m.position);
            match (position, load_snapshot(state, model, &snap.path)) {
                (Some(p), Ok((session, mark))) => {
                    // The mark is in the snapshot (checksummed); files written before it was
                    // have it in their sidecar only.
                    let mark = mark.or_else(|| read_meta(&snap.path).and_then(|m| m.mark));
                    tracing::info!(conversation = conversation.0, tokens = session.state.pos, "memory restored from its snapshot");
                    return CachedSession {
                        conversation,
                        session,
                        transcript: ChatTranscript::from_mark(mark),
                        identity: model.identity.clone(),
                        read_position: Some(p),
                    };
                }
                (_, Err(e)) => tracing::warn!(path = %snap.path.display(), error = %e, "snapshot refused: rebuilding the memory from the text"),
                (None, Ok(_)) => tracing::warn!("snapshot of a message outside the history: rebuilding the memory from the text"),
            }
        }
        Ok(None) => tracing::info!(
            conversation = conversation.0,
            "no snapshot for this model: the memory is built from the text"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up snapshots: rebuilding the memory from the text")
        }
    }
    if let Some(primed) = primed(state, conversation, model) {
        return primed;
    }
    let window = fresh_window(state, window, Some(model));
    CachedSession {
        conversation,
        session: Session::new(
            model.model.clone(),
            SessionOptions {
                window,
                kv_format: state.settings().kv_format.format_for(&model.model),
                ..Default::default()
            },
        ),
        transcript: ChatTranscript::fresh(),
        identity: model.identity.clone(),
        read_position: None,
    }
}

/// The saved memory the conversation started from ([`crate::memories`]), loaded, when it still
/// exists, belongs to the loaded model and the conversation was not reset since: the turn then
/// reads the whole conversation on top of it (as a fresh memory reads it: the memory's own text
/// is not the conversation's).
fn primed(
    state: &AppState,
    conversation: ConversationId,
    model: &LoadedModel,
) -> Option<CachedSession> {
    if fresh_memory_marked(state, conversation) {
        return None;
    }
    let m = match block_on(state.store.conversation_memory(conversation)) {
        Ok(Some(m)) => m,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up the chat's saved memory: building the memory from the text");
            return None;
        }
    };
    if m.key != model_key(&model.identity) {
        tracing::warn!(
            conversation = conversation.0,
            memory = m.id.0,
            "the saved memory this chat started from belongs to another model or config: the memory is built from the text"
        );
        return None;
    }
    match load_snapshot(state, model, &m.path) {
        Ok((session, _)) => {
            tracing::info!(
                conversation = conversation.0,
                memory = m.id.0,
                tokens = session.state.pos,
                "memory started from a saved memory"
            );
            Some(CachedSession {
                conversation,
                session,
                transcript: ChatTranscript::fresh(),
                identity: model.identity.clone(),
                read_position: None,
            })
        }
        Err(e) => {
            tracing::warn!(path = %m.path.display(), error = %e, "saved memory refused: the memory is built from the text");
            None
        }
    }
}

/// The softmax window of a memory created now: `window` (the conversation's or the app's
/// setting), else the model's (when `model` is given, or loaded), else unknown.
pub(super) fn fresh_window(
    state: &AppState,
    window: Option<u32>,
    model: Option<&LoadedModel>,
) -> Option<usize> {
    if let Some(w) = window {
        return Some(w as usize);
    }
    let window_of = |m: &LoadedModel| {
        m.model
            .config_window()
            .unwrap_or(tptt_engine::session::DEFAULT_WINDOW)
    };
    match model {
        Some(m) => Some(window_of(m)),
        None => lock(&state.model).as_ref().map(|m| window_of(m)),
    }
}

/// The setting that marks a conversation whose memory was reset ([`reset_memory`]).
pub fn fresh_memory_key(conversation: ConversationId) -> String {
    format!("chat.freshMemory.{}", conversation.0)
}

/// Whether `conversation`'s next rebuilt memory reads only the tail of the text.
pub(super) fn fresh_memory_marked(state: &AppState, conversation: ConversationId) -> bool {
    match block_on(
        state
            .store
            .get_setting::<bool>(&fresh_memory_key(conversation)),
    ) {
        Ok(v) => v.unwrap_or(false),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the fresh-memory mark: reading the whole text");
            false
        }
    }
}

/// Of a fresh memory's prompt `ids`, the `limit` tokens it reads: the tail, after the tokens the
/// tokenizer puts before any text (`prefix`, e.g. BOS) when `ids` starts with them.
pub(super) fn tail_that_fits(ids: Vec<u32>, prefix: &[u32], limit: usize) -> Vec<u32> {
    if ids.len() <= limit {
        return ids;
    }
    let keep = if !prefix.is_empty() && prefix.len() < limit && ids.starts_with(prefix) {
        prefix.len()
    } else {
        0
    };
    let mut out = Vec::with_capacity(limit);
    out.extend_from_slice(&ids[..keep]);
    out.extend_from_slice(&ids[ids.len() - (limit - keep)..]);
    out
}

pub(super) fn model_key(id: &ModelIdentity) -> ModelKey {
    ModelKey::new(id.model.clone(), id.variant.clone(), id.numerics_key())
}

/// Writes the state after `message` and records it; prunes old and stale snapshots.
pub(super) fn save_snapshot(
    state: &AppState,
    conversation: ConversationId,
    message: MessageId,
    session: &Session,
    identity: &ModelIdentity,
    mark: Option<ReadMark>,
    memory: MemoryInfo,
) -> Result<(), String> {
    let dir = state
        .config
        .snapshots_dir()
        .join(conversation.0.to_string());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{}.safetensors", message.0));
    // The pages of the conversation's latest snapshot are shared where their bytes are this
    // state's (the positions both windows hold).
    let reuse: Vec<PathBuf> = match block_on(
        state
            .store
            .latest_snapshot(conversation, &model_key(identity)),
    ) {
        Ok(latest) => latest.map(|s| s.path).into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up the previous snapshot: its pages are not shared");
            Vec::new()
        }
    };
    let pages = pages_dir(&state.config.snapshots_dir());
    let saved = snapshot::save_paged(session, identity, mark, &path, &pages, &reuse)
        .map_err(|e| e.to_string())?;
    let bytes = saved.file_bytes;
    write_meta(&path, &SnapshotMeta { mark, memory })?;
    let key = model_key(identity);
    let new = NewSnapshot {
        conversation_id: conversation,
        message_id: message,
        key: key.clone(),
        path,
        size_bytes: bytes,
        token_count: session.state.pos as u64,
    };
    block_on(state.store.record_snapshot(&new)).map_err(|e| e.to_string())?;
    let old = block_on(state.store.prune_snapshots(conversation, SNAPSHOTS_KEPT))
        .map_err(|e| e.to_string())?;
    remove_snapshot_files(&old);
    let stale = block_on(state.store.delete_stale_snapshots(conversation, &key))
        .map_err(|e| e.to_string())?;
    remove_snapshot_files(&stale);
    tracing::debug!(conversation = conversation.0, bytes, "snapshot saved");
    Ok(())
}

/// The conversation's memory meter: the held memory, else the latest snapshot's, else empty.
pub async fn memory_info(state: &AppState, conversation: ConversationId) -> MemoryInfo {
    let held = lock(&state.session)
        .as_ref()
        .filter(|c| c.conversation == conversation)
        .map(|c| MemoryInfo::of(&c.session));
    if let Some(m) = held {
        return m;
    }
    if let Ok(listing) = state.store.list_snapshots(conversation).await {
        if let Some(meta) = listing.items.last().and_then(|s| read_meta(&s.path)) {
            return meta.memory;
        }
    }
    // A chat started from a saved memory, before its first answer: that memory.
    if let Ok(Some(m)) = state.store.conversation_memory(conversation).await {
        if let Some(meta) = read_meta(&m.path) {
            return meta.memory;
        }
    }
    let window = match state.store.get_conversation(conversation).await {
        Ok(c) => chat_settings::effective(&state.settings(), &c.settings).window,
        Err(_) => state.settings().window_size,
    };
    MemoryInfo::new(0, fresh_window(state, window, None), 0)
}

/// `set_conversation_settings`: the conversation's own settings ([`crate::chat_settings`]),
/// validated (`invalid_settings` naming the field; a model of its own must be downloaded or
/// imported: `no_model` otherwise). A model change keeps the memory: the next turn rebuilds it
/// from the text when it belongs to another model (the memory rule). A change of the system
/// prompt or window it uses drops its memory and snapshots when it has messages — the memory
/// was built with the old ones — so the next turn reads the whole conversation again
/// (`rebuilt`); `busy` then while it generates. Sampling changes apply from the next answer and keep the memory.
pub async fn set_settings(
    state: &AppState,
    conversation: ConversationId,
    dto: &ChatSettingsDto,
) -> CmdResult<ChatSettingsSaved> {
    let c = state.store.get_conversation(conversation).await?;
    let app = state.settings();
    let stored = chat_settings::from_dto(dto, &c.settings)?;
    let own_model_changed = stored.model_repo.is_some()
        && (stored.model_repo != c.settings.model_repo || stored.variant != c.settings.variant);
    if own_model_changed {
        // A folder must be one the model manager imported.
        if let Some(repo) = stored.model_repo.as_deref() {
            if !crate::models::is_choosable(&state.registry(), repo) {
                return Err(CommandError::new(
                    ErrorKind::NoModel,
                    format!("{repo} is not an imported model folder: import it in the model manager first."),
                ));
            }
        }
        // A model of its own must be there to run on (`no_model` naming what is missing).
        let (st, chosen) = (state.clone(), chat_settings::effective(&app, &stored));
        crate::state::blocking(move || super::target(&st, &chosen).map(|_| ())).await?;
    }
    let (before, after) = (
        chat_settings::effective(&app, &c.settings),
        chat_settings::effective(&app, &stored),
    );
    let memory_changed =
        before.system_prompt != after.system_prompt || before.window != after.window;
    let rebuilt = memory_changed && {
        let listing = state.store.list_messages(conversation).await?;
        !(listing.items.is_empty() && listing.skipped.is_empty())
    };
    // The slot keeps a turn from reading the memory while it goes (`busy` while one runs).
    let _slot = if rebuilt {
        Some(Slot::acquire(state, conversation)?)
    } else {
        None
    };
    state
        .store
        .update_conversation_settings(conversation, &stored)
        .await?;
    if rebuilt {
        invalidate_session(state, conversation, None);
        let files = state.store.prune_snapshots(conversation, 0).await?;
        remove_snapshot_files(&files);
        tracing::info!(
            conversation = conversation.0,
            "system prompt or window changed: the memory is rebuilt from the text at the next turn"
        );
    }
    Ok(ChatSettingsSaved {
        settings: chat_settings::to_dto(&stored, &app.sampling),
        rebuilt,
        memory: memory_info(state, conversation).await,
    })
}

/// `reset_memory` ("continue with a fresh memory", module doc): the held memory and the
/// snapshots of `conversation` go, and its next turn rebuilds the memory from the tail of the
/// text (at most the window, at most [`super::FRESH_MEMORY_TOKENS`]). Returns the (empty) meter. `busy` while a reply is generated, `not_found` for an
/// unknown conversation.
pub async fn reset_memory(state: &AppState, conversation: ConversationId) -> CmdResult<MemoryInfo> {
    state.store.get_conversation(conversation).await?;
    // The slot keeps a turn from starting (and reading the memory) while it is reset.
    let (_slot, _cancel) = Slot::acquire(state, conversation)?;
    invalidate_session(state, conversation, None);
    let files = state.store.prune_snapshots(conversation, 0).await?;
    remove_snapshot_files(&files);
    state
        .store
        .set_setting(&fresh_memory_key(conversation), &true)
        .await?;
    tracing::info!(
        conversation = conversation.0,
        snapshots = files.len(),
        "memory reset: the next turn reads the tail of the conversation"
    );
    Ok(memory_info(state, conversation).await)
}
