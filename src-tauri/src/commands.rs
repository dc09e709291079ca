//! The Tauri commands of docs/ipc.md, one thin function each: parse the UI's arguments, call
//! the module that does the work, shape the answer. Every one returns at once; long work
//! (downloads, model loading, generation) runs on worker threads and reports through a
//! [`Channel`]. Arguments arrive camelCase (`repoId` → `repo_id`), as Tauri maps them.

use tauri::ipc::Channel;
use tauri::{AppHandle, Runtime, State};
use tptt_store::{ConversationId, ListScope, MemoryId, MessageId, NewConversation};

use crate::api_server::ApiServerStatus;
use crate::backup;
use crate::chat;
use crate::chat_settings;
use crate::desktop;
use crate::device;
use crate::dto::{
    parse_id, BackupSummary, ChatEvent, ChatSettingsDto, ChatSettingsSaved, ConversationDto,
    ConversationSummary, DeviceInfo, DownloadEvent, ExportFormat, ImportSummary, MemoryInfo,
    MessageDto, ModelEntry, ModelSource, RegenerateResult, SavedMemory, SendResult, SettingsDto,
    VariantEntry, VersionsDto,
};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::memories;
use crate::models;
use crate::runtime::ModelRef;
use crate::settings::AppSettings;
use crate::state::{blocking, lock, AppState};

/// Title of a new conversation (the UI renames it after the first message).
pub const NEW_CHAT_TITLE: &str = "New chat";
/// Most conversations a search returns.
pub const SEARCH_LIMIT: u32 = 200;

fn conversation_id(id: &str) -> CmdResult<ConversationId> {
    parse_id("conversation", id).map(ConversationId)
}

/// The manager's entry for `repo_id`, built on a worker thread (it reads the cache).
async fn entry_of(state: &AppState, repo_id: String) -> CmdResult<ModelEntry> {
    let st = state.clone();
    blocking(move || {
        models::entry(&st.registry(), &st.hub()?, &repo_id)
            .ok_or_else(|| CommandError::internal("A model entry is missing", repo_id))
    })
    .await
}

// ---- Models -------------------------------------------------------------------------------

/// `list_models`.
#[tauri::command]
pub async fn list_models(state: State<'_, AppState>) -> CmdResult<Vec<ModelEntry>> {
    let st = state.inner().clone();
    blocking(move || Ok(models::entries(&st.registry(), &st.hub()?))).await
}

/// `refresh_variants`: lists the repository on the hub (an imported folder is scanned again).
#[tauri::command]
pub async fn refresh_variants(
    state: State<'_, AppState>,
    repo_id: String,
) -> CmdResult<Vec<VariantEntry>> {
    if models::source_of(&state.registry(), &repo_id) != Some(ModelSource::Local) {
        tptt_hub::validate_repo_id(&repo_id)?;
        let (st, r) = (state.inner().clone(), repo_id.clone());
        let listed = blocking(move || models::list_on_hub(&st.hub()?, &r)).await?;
        state
            .update_registry(|reg| {
                reg.listings.insert(repo_id.clone(), listed);
            })
            .await?;
    }
    let st = state.inner().clone();
    let entry = blocking(move || Ok(models::entry(&st.registry(), &st.hub()?, &repo_id))).await?;
    Ok(entry.and_then(|e| e.variants).unwrap_or_default())
}

/// `add_model`: remembers a hub repository (no network: its variants come with
/// `refresh_variants`).
#[tauri::command]
pub async fn add_model(state: State<'_, AppState>, repo_id: String) -> CmdResult<ModelEntry> {
    let repo_id = repo_id.trim().to_string();
    tptt_hub::validate_repo_id(&repo_id).map_err(|_| {
        CommandError::new(
            ErrorKind::InvalidRepoId,
            format!("{repo_id:?} is not a Hugging Face repository id: use the form owner/name."),
        )
    })?;
    if !repo_id.contains('/') {
        return Err(CommandError::new(
            ErrorKind::InvalidRepoId,
            format!("{repo_id:?} lacks its owner: use the form owner/name."),
        ));
    }
    let registry = state.registry();
    if models::source_of(&registry, &repo_id).is_none() {
        state
            .update_registry(|r| r.added.push(repo_id.clone()))
            .await?;
    }
    entry_of(&state, repo_id).await
}

/// `import_local_model`: a folder of TPTT variants (kept where it is).
#[tauri::command]
pub async fn import_local_model(state: State<'_, AppState>, path: String) -> CmdResult<ModelEntry> {
    let canonical = blocking(move || models::check_local_folder(&path)).await?;
    let id = canonical.display().to_string();
    if !state.registry().local.contains(&id) {
        state.update_registry(|r| r.local.push(id.clone())).await?;
    }
    entry_of(&state, id).await
}

/// `pick_model_folder`: the native folder dialog; the chosen folder (then given to
/// `import_local_model`), or `null` when the user cancels.
#[tauri::command]
pub async fn pick_model_folder<R: Runtime>(app: AppHandle<R>) -> CmdResult<Option<String>> {
    let picked = desktop::pick_folder(&app, "Import a model folder").await?;
    Ok(picked.map(|p| p.display().to_string()))
}

/// `download_variant`: returns once the download thread runs; events go to `on_event`.
#[tauri::command]
pub async fn download_variant(
    state: State<'_, AppState>,
    repo_id: String,
    variant: String,
    on_event: Channel<DownloadEvent>,
) -> CmdResult<()> {
    if models::source_of(&state.registry(), &repo_id) == Some(ModelSource::Local) {
        let _ = on_event.send(DownloadEvent::Done);
        return Ok(());
    }
    models::start_download(&state, &repo_id, &variant, on_event)
}

/// `cancel_download`.
#[tauri::command]
pub async fn cancel_download(
    state: State<'_, AppState>,
    repo_id: String,
    variant: String,
) -> CmdResult<()> {
    models::cancel_download(&state, &repo_id, &variant);
    Ok(())
}

/// `remove_variant`: deletes a downloaded variant from the cache (its base stays, shared).
/// For an imported folder nothing is deleted from disk: the import is forgotten.
#[tauri::command]
pub async fn remove_variant(
    state: State<'_, AppState>,
    repo_id: String,
    variant: String,
) -> CmdResult<()> {
    let in_use = lock(&state.model)
        .as_ref()
        .is_some_and(|m| m.key.model.id() == repo_id && m.key.variant == variant);
    if in_use {
        if lock(&state.generation).is_some() {
            return Err(CommandError::new(
                ErrorKind::Busy,
                "This variant is generating a reply: stop it first.",
            ));
        }
        *lock(&state.session) = None;
        *lock(&state.model) = None;
    }
    match models::model_ref(&state.registry(), &repo_id) {
        ModelRef::Local(_) => {
            state
                .update_registry(|r| r.local.retain(|p| p != &repo_id))
                .await?;
            Ok(())
        }
        ModelRef::Hub(repo) => {
            let st = state.inner().clone();
            blocking(move || {
                st.hub()?
                    .remove_variant(&repo, &variant)
                    .map(|_| ())
                    .map_err(CommandError::hub)
            })
            .await
        }
    }
}

// ---- Settings -----------------------------------------------------------------------------

/// `get_settings`.
#[tauri::command]
pub async fn get_settings(state: State<'_, AppState>) -> CmdResult<SettingsDto> {
    Ok(state.settings().to_dto(state.token.is_set()))
}

/// `set_settings`: validated (`invalid_settings` names the field), stored, and in effect for
/// the next message.
#[tauri::command]
pub async fn set_settings(
    state: State<'_, AppState>,
    settings: serde_json::Value,
) -> CmdResult<SettingsDto> {
    let dto: SettingsDto = serde_json::from_value(settings)
        .map_err(|e| CommandError::new(ErrorKind::InvalidSettings, format!("settings: {e}")))?;
    let s = AppSettings::from_dto(&dto)?;
    // A memory precision the chosen model cannot use is refused with the reason (read from its
    // config; a model chosen later, or a conversation's own, falls back to the automatic
    // choice when loaded: `KvSetting::format_for`).
    if let (Some(repo), Some(variant)) = (s.model_repo.clone(), s.variant.clone()) {
        let st = state.inner().clone();
        let head_dim = crate::state::blocking(move || {
            let model = crate::models::model_ref(&st.registry(), &repo);
            crate::runtime::variant_files(&st.hub()?, &model, &variant)
                .map(|f| f.config.base.head_dim)
        })
        .await;
        // Files that cannot be read now are reported when the model loads.
        if let Ok(dim) = head_dim {
            s.kv_format.check_head_dim(dim)?;
        }
    }
    if let Some(repo) = s.model_repo.as_deref() {
        if !models::is_choosable(&state.registry(), repo) {
            return Err(CommandError::new(
                ErrorKind::InvalidSettings,
                format!("modelRepo: {repo} is not an imported model folder: import it in the model manager first"),
            ));
        }
    }
    state.save_settings(s).await?;
    state.api_server.apply(&state).await;
    Ok(state.settings().to_dto(state.token.is_set()))
}

/// `api_server_status`: whether the local API server listens, where, or why it cannot.
#[tauri::command]
pub async fn api_server_status(state: State<'_, AppState>) -> CmdResult<ApiServerStatus> {
    Ok(state.api_server.status(&state))
}

/// `set_hf_token`: stores (or with null, forgets) the token; never echoed.
#[tauri::command]
pub async fn set_hf_token(state: State<'_, AppState>, token: Option<String>) -> CmdResult<()> {
    state.token.write(token.as_deref())
}

/// `device_info`.
#[tauri::command]
pub async fn device_info(state: State<'_, AppState>) -> CmdResult<DeviceInfo> {
    if let Some(m) = lock(&state.model).as_ref() {
        return Ok(DeviceInfo {
            compiled: device::compiled(),
            in_use: m.device.kind.as_str().into(),
            name: m.device.name.clone(),
        });
    }
    let pref = state.settings().device;
    let r = device::resolve(pref).unwrap_or_else(|_| device::cpu());
    Ok(DeviceInfo {
        compiled: device::compiled(),
        in_use: r.kind.as_str().into(),
        name: r.name,
    })
}

// ---- Conversations ------------------------------------------------------------------------

/// `list_conversations`: most recent first; a query searches titles and messages. The first
/// call after a start that had to set the database aside reports that, as a `database` error
/// (the next call lists).
#[tauri::command]
pub async fn list_conversations(
    state: State<'_, AppState>,
    query: Option<String>,
) -> CmdResult<Vec<ConversationSummary>> {
    if let Some(notice) = state.take_notices().into_iter().next() {
        return Err(notice);
    }
    let query = query.unwrap_or_default();
    if !query.trim().is_empty() {
        let hits = state.store.search(&query, SEARCH_LIMIT).await?;
        return Ok(hits
            .items
            .iter()
            .filter(|h| !h.conversation.archived)
            .map(|h| {
                ConversationSummary::new(
                    &h.conversation,
                    h.message.as_ref().map(|m| m.snippet.as_str()).unwrap_or(""),
                )
            })
            .collect());
    }
    summaries(&state, ListScope::Active).await
}

/// `list_archived_conversations`: the archived conversations, most recent first.
#[tauri::command]
pub async fn list_archived_conversations(
    state: State<'_, AppState>,
) -> CmdResult<Vec<ConversationSummary>> {
    summaries(&state, ListScope::Archived).await
}

/// The listed conversations of `scope` (pinned first, then most recent), each with the start of
/// its last message.
async fn summaries(state: &AppState, scope: ListScope) -> CmdResult<Vec<ConversationSummary>> {
    let listing = state.store.list_conversations(scope).await?;
    let mut out = Vec::with_capacity(listing.items.len());
    for c in &listing.items {
        out.push(summary(state, c).await);
    }
    Ok(out)
}

/// A conversation's summary, previewing its last message.
async fn summary(state: &AppState, c: &tptt_store::Conversation) -> ConversationSummary {
    let last = match state.store.last_message(c.id).await {
        Ok(m) => m.map(|m| m.content).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(conversation = c.id.0, error = %e, "no preview");
            String::new()
        }
    };
    ConversationSummary::new(c, &last)
}

/// A `true` / `false` argument taken as JSON, so that anything else is an error naming it.
fn flag(name: &str, value: &serde_json::Value) -> CmdResult<bool> {
    value.as_bool().ok_or_else(|| {
        CommandError::new(
            ErrorKind::InvalidSettings,
            format!("{name}: {value} is not true or false"),
        )
    })
}

/// `set_conversation_pinned`: a pinned conversation is listed first. Its summary after.
#[tauri::command]
pub async fn set_conversation_pinned(
    state: State<'_, AppState>,
    id: String,
    pinned: serde_json::Value,
) -> CmdResult<ConversationSummary> {
    let id = conversation_id(&id)?;
    let pinned = flag("pinned", &pinned)?;
    state.store.set_pinned(id, pinned).await?;
    let c = state.store.get_conversation(id).await?;
    Ok(summary(&state, &c).await)
}

/// `set_conversation_archived`: an archived conversation leaves the main list and its search for
/// the archived list; it opens and continues as before. Its summary after.
#[tauri::command]
pub async fn set_conversation_archived(
    state: State<'_, AppState>,
    id: String,
    archived: serde_json::Value,
) -> CmdResult<ConversationSummary> {
    let id = conversation_id(&id)?;
    let archived = flag("archived", &archived)?;
    state.store.set_archived(id, archived).await?;
    let c = state.store.get_conversation(id).await?;
    Ok(summary(&state, &c).await)
}

/// `create_conversation`: empty, on the model the settings choose.
#[tauri::command]
pub async fn create_conversation(state: State<'_, AppState>) -> CmdResult<ConversationSummary> {
    let s = state.settings();
    let new = NewConversation {
        model: s.model_repo.clone(),
        variant: s.variant.clone(),
        ..NewConversation::titled(NEW_CHAT_TITLE)
    };
    let c = state.store.create_conversation(&new).await?;
    Ok(ConversationSummary::new(&c, ""))
}

/// `get_conversation`: messages and the memory meter.
#[tauri::command]
pub async fn get_conversation(
    state: State<'_, AppState>,
    id: String,
) -> CmdResult<ConversationDto> {
    let id = conversation_id(&id)?;
    conversation_dto(&state, id).await
}

/// `switch_version`: shows version `version` of the continuation `message_id` starts
/// ([`chat::switch_version`]); the conversation as it is then.
#[tauri::command]
pub async fn switch_version(
    state: State<'_, AppState>,
    conversation_id: String,
    message_id: String,
    version: serde_json::Value,
) -> CmdResult<ConversationDto> {
    let id = self::conversation_id(&conversation_id)?;
    let message = MessageId(parse_id("message", &message_id)?);
    // Taken as JSON so that -1, 1.5 or "2" get an error naming the field.
    let version = version
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v >= 1)
        .ok_or_else(|| {
            CommandError::new(
                ErrorKind::InvalidSettings,
                format!("version: {version} is not a version number (1, 2, 3…)"),
            )
        })?;
    chat::switch_version(&state, id, message, version).await?;
    conversation_dto(&state, id).await
}

/// A conversation with its messages (each first message of a continuation with versions
/// carrying them), its memory meter and its own settings.
async fn conversation_dto(state: &AppState, id: ConversationId) -> CmdResult<ConversationDto> {
    let c = state.store.get_conversation(id).await?;
    let listing = state.store.list_messages(id).await?;
    if !listing.skipped.is_empty() {
        tracing::warn!(
            conversation = id.0,
            skipped = listing.skipped.len(),
            "unreadable messages left out"
        );
    }
    let versions = state.store.list_versions(id).await?;
    let messages = listing
        .items
        .iter()
        .map(|m| MessageDto {
            versions: versions
                .iter()
                .find(|v| v.position == m.position)
                .map(|v| VersionsDto {
                    current: v.current,
                    total: v.total,
                }),
            ..MessageDto::from(m)
        })
        .collect();
    let memory = chat::memory_info(state, id).await;
    let settings = chat_settings::to_dto(&c.settings, &state.settings().sampling);
    Ok(ConversationDto {
        id: c.id.0.to_string(),
        title: c.title,
        model_repo: c.model,
        variant: c.variant,
        messages,
        memory,
        settings,
    })
}

/// `set_conversation_settings`: the conversation's own system prompt and sampling (`null`:
/// the app's), see [`chat::set_settings`]. The settings are taken as JSON so that a malformed
/// value is an `invalid_settings` error naming its field.
#[tauri::command]
pub async fn set_conversation_settings(
    state: State<'_, AppState>,
    id: String,
    settings: serde_json::Value,
) -> CmdResult<ChatSettingsSaved> {
    let id = conversation_id(&id)?;
    let dto: ChatSettingsDto = serde_json::from_value(settings)
        .map_err(|e| CommandError::new(ErrorKind::InvalidSettings, format!("settings: {e}")))?;
    chat::set_settings(&state, id, &dto).await
}

/// `branch_conversation`: a new conversation, a copy of `id` up to and including `message_id`,
/// continuing from that message's saved state when there is one ([`chat::branch`]).
#[tauri::command]
pub async fn branch_conversation(
    state: State<'_, AppState>,
    id: String,
    message_id: String,
) -> CmdResult<ConversationSummary> {
    let id = conversation_id(&id)?;
    let message = MessageId(parse_id("message", &message_id)?);
    chat::branch(&state, id, message).await
}

/// `save_memory`: the conversation's memory saved under `name` ([`memories::save`]).
#[tauri::command]
pub async fn save_memory(
    state: State<'_, AppState>,
    conversation_id: String,
    name: String,
) -> CmdResult<SavedMemory> {
    let id = self::conversation_id(&conversation_id)?;
    memories::save(&state, id, &name).await
}

/// `list_memories`: the saved memories, most recent first.
#[tauri::command]
pub async fn list_memories(state: State<'_, AppState>) -> CmdResult<Vec<SavedMemory>> {
    memories::list(&state).await
}

/// `rename_memory`.
#[tauri::command]
pub async fn rename_memory(state: State<'_, AppState>, id: String, name: String) -> CmdResult<()> {
    memories::rename(&state, MemoryId(parse_id("memory", &id)?), &name).await
}

/// `delete_memory`: with its file.
#[tauri::command]
pub async fn delete_memory(state: State<'_, AppState>, id: String) -> CmdResult<()> {
    memories::delete(&state, MemoryId(parse_id("memory", &id)?)).await
}

/// `new_chat_from_memory`: a new chat whose memory starts as the saved one.
#[tauri::command]
pub async fn new_chat_from_memory(
    state: State<'_, AppState>,
    id: String,
) -> CmdResult<ConversationSummary> {
    memories::new_chat(&state, MemoryId(parse_id("memory", &id)?)).await
}

/// `pick_document`: a document chosen in the native open dialog, read and checked
/// ([`crate::documents`]); `null` when cancelled. Its text stays here: `send_document` reads it
/// again from `path`.
#[tauri::command]
pub async fn pick_document<R: Runtime>(
    app: AppHandle<R>,
) -> CmdResult<Option<crate::documents::DocumentInfo>> {
    let Some(path) = desktop::pick_document(&app).await? else {
        return Ok(None);
    };
    document_info(path).await.map(Some)
}

/// `inspect_document`: the document at `path` (a file dropped on the window) read and checked,
/// as `pick_document` does.
#[tauri::command]
pub async fn inspect_document(path: String) -> CmdResult<crate::documents::DocumentInfo> {
    document_info(std::path::PathBuf::from(path)).await
}

async fn document_info(path: std::path::PathBuf) -> CmdResult<crate::documents::DocumentInfo> {
    blocking(move || {
        let doc = crate::documents::read(&path)?;
        Ok(crate::documents::DocumentInfo::of(&path, &doc))
    })
    .await
}

/// `send_document`: the document at `path` with `content` (the question; may be empty) as one
/// message, answered like `send_message` ([`chat::send_document`]).
#[tauri::command]
pub async fn send_document(
    state: State<'_, AppState>,
    conversation_id: String,
    path: String,
    content: String,
    on_event: Channel<ChatEvent>,
) -> CmdResult<SendResult> {
    let id = self::conversation_id(&conversation_id)?;
    let (user, answer) = chat::send_document(
        &state,
        id,
        std::path::PathBuf::from(path),
        content,
        on_event,
    )
    .await?;
    Ok(SendResult {
        user_message_id: user.0.to_string(),
        assistant_message_id: answer.0.to_string(),
    })
}

/// `export_backup`: every conversation (with its memory state when `include_states`) into one
/// file chosen in the native save dialog ([`backup::write`]); `null` when cancelled.
#[tauri::command]
pub async fn export_backup<R: Runtime>(
    app: AppHandle<R>,
    state: State<'_, AppState>,
    include_states: serde_json::Value,
) -> CmdResult<Option<BackupSummary>> {
    let include_states = flag("includeStates", &include_states)?;
    let day = tptt_store::Timestamp::now().to_string();
    let suggested = format!("tptt-chat-backup-{}.zip", day.get(..10).unwrap_or("today"));
    let Some(path) = desktop::pick_save_path(
        &app,
        "Back up all conversations",
        &suggested,
        ("TPTT Chat backup", "zip"),
    )
    .await?
    else {
        return Ok(None);
    };
    backup::write(&state, &path, include_states).await.map(Some)
}

/// `import_backup`: a backup chosen in the native open dialog, imported as new conversations
/// ([`backup::import`]); `null` when cancelled.
#[tauri::command]
pub async fn import_backup<R: Runtime>(
    app: AppHandle<R>,
    state: State<'_, AppState>,
) -> CmdResult<Option<ImportSummary>> {
    let Some(path) =
        desktop::pick_open_file(&app, "Import a backup", ("TPTT Chat backup", &["zip"])).await?
    else {
        return Ok(None);
    };
    let done = backup::import(&state, &path).await?;
    Ok(Some(ImportSummary {
        conversations: done.conversations as u32,
        states: done.states as u32,
    }))
}

/// `rename_conversation`.
#[tauri::command]
pub async fn rename_conversation(
    state: State<'_, AppState>,
    id: String,
    title: String,
) -> CmdResult<()> {
    let id = conversation_id(&id)?;
    if title.trim().is_empty() {
        return Err(CommandError::new(
            ErrorKind::InvalidSettings,
            "title: must not be empty",
        ));
    }
    Ok(state.store.rename_conversation(id, title.trim()).await?)
}

/// `delete_conversation`: with its messages and state snapshots. `busy` while it generates.
#[tauri::command]
pub async fn delete_conversation(state: State<'_, AppState>, id: String) -> CmdResult<()> {
    let id = conversation_id(&id)?;
    if chat::is_generating(&state, id) {
        return Err(CommandError::new(
            ErrorKind::Busy,
            "This conversation is generating a reply: stop it first.",
        ));
    }
    let files = state.store.delete_conversation(id).await?;
    chat::remove_snapshot_files(&files);
    chat::invalidate_session(&state, id, None);
    if let Err(e) = state
        .store
        .delete_setting(&chat::fresh_memory_key(id))
        .await
    {
        tracing::warn!(error = %e, "cannot remove the conversation's fresh-memory mark");
    }
    let dir = state.config.snapshots_dir().join(id.0.to_string());
    if dir.is_dir() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove the conversation's snapshot folder");
        }
    }
    Ok(())
}

/// `export_conversation`: Markdown or JSON, the text verbatim.
#[tauri::command]
pub async fn export_conversation(
    state: State<'_, AppState>,
    id: String,
    format: String,
) -> CmdResult<String> {
    let id = conversation_id(&id)?;
    match ExportFormat::parse(&format) {
        Some(ExportFormat::Markdown) => Ok(state.store.export_markdown(id).await?),
        Some(ExportFormat::Json) => Ok(state.store.export_json(id).await?),
        None => Err(CommandError::new(
            ErrorKind::InvalidSettings,
            format!("format: must be markdown or json, got {format:?}"),
        )),
    }
}

/// `save_conversation`: the native save dialog, then the export ([`export_conversation`]'s
/// text) written to the chosen file; returns its path, or `null` when the user cancels.
#[tauri::command]
pub async fn save_conversation<R: Runtime>(
    app: AppHandle<R>,
    state: State<'_, AppState>,
    id: String,
    format: String,
) -> CmdResult<Option<String>> {
    let text = export_conversation(state.clone(), id.clone(), format.clone()).await?;
    let title = state
        .store
        .get_conversation(conversation_id(&id)?)
        .await?
        .title;
    let (filter, ext) = if format == "json" {
        ("JSON", "json")
    } else {
        ("Markdown", "md")
    };
    let suggested = format!("{}.{ext}", export_file_stem(&title));
    let Some(path) =
        desktop::pick_save_path(&app, "Export the conversation", &suggested, (filter, ext)).await?
    else {
        return Ok(None);
    };
    let shown = path.display().to_string();
    blocking(move || {
        std::fs::write(&path, text).map_err(|e| {
            tracing::warn!(path = %path.display(), error = %e, "export not written");
            CommandError::new(
                ErrorKind::Internal,
                format!(
                    "The conversation could not be written to {}: {e}.",
                    path.display()
                ),
            )
        })
    })
    .await?;
    Ok(Some(shown))
}

/// A file name from a conversation's title: letters, digits, spaces, `_` and `-`, at most 60
/// characters, else `conversation` (as the UI named downloads).
pub fn export_file_stem(title: &str) -> String {
    let kept: String = title
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '_' | '-'))
        .collect();
    let stem: String = kept.trim().chars().take(60).collect();
    let stem = stem.trim().to_string();
    if stem.is_empty() {
        "conversation".to_string()
    } else {
        stem
    }
}

/// `open_logs_folder`: the app's log folder ([`crate::AppConfig::log_dir`]) in the system's file
/// manager (created when missing); returns its path.
#[tauri::command]
pub async fn open_logs_folder(state: State<'_, AppState>) -> CmdResult<String> {
    let dir = state.config.log_dir();
    let shown = dir.display().to_string();
    blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| CommandError::internal("Cannot create the logs folder", e))?;
        desktop::open_folder(&dir)
    })
    .await?;
    Ok(shown)
}

// ---- Chat ---------------------------------------------------------------------------------

/// `send_message`: the user's message is stored before generation starts; returns at once.
#[tauri::command]
pub async fn send_message(
    state: State<'_, AppState>,
    conversation_id: String,
    content: String,
    on_event: Channel<ChatEvent>,
) -> CmdResult<SendResult> {
    let id = self::conversation_id(&conversation_id)?;
    let (user, answer) = chat::send(&state, id, content, on_event).await?;
    Ok(SendResult {
        user_message_id: user.0.to_string(),
        assistant_message_id: answer.0.to_string(),
    })
}

/// `regenerate`: replaces the last answer once the new one has started. The channel is taken
/// untyped: [`chat::regenerate`] sees each event before passing it on.
#[tauri::command]
pub async fn regenerate(
    state: State<'_, AppState>,
    conversation_id: String,
    on_event: Channel<tauri::ipc::InvokeResponseBody>,
) -> CmdResult<RegenerateResult> {
    let id = self::conversation_id(&conversation_id)?;
    let answer = chat::regenerate(&state, id, on_event).await?;
    Ok(RegenerateResult {
        assistant_message_id: answer.0.to_string(),
    })
}

/// `edit_and_resend`: a new message with `content` takes the place of `message_id`, which is
/// kept with what followed as a version; a new answer follows (one transaction).
#[tauri::command]
pub async fn edit_and_resend(
    state: State<'_, AppState>,
    conversation_id: String,
    message_id: String,
    content: String,
    on_event: Channel<ChatEvent>,
) -> CmdResult<SendResult> {
    let id = self::conversation_id(&conversation_id)?;
    let message = MessageId(parse_id("message", &message_id)?);
    let (user, answer) = chat::edit_and_resend(&state, id, message, content, on_event).await?;
    Ok(SendResult {
        user_message_id: user.0.to_string(),
        assistant_message_id: answer.0.to_string(),
    })
}

/// `stop_generation`: the partial answer is kept (`stopped` event).
#[tauri::command]
pub async fn stop_generation(state: State<'_, AppState>, conversation_id: String) -> CmdResult<()> {
    let id = self::conversation_id(&conversation_id)?;
    chat::stop(&state, id);
    Ok(())
}

/// `reset_memory`: "continue with a fresh memory" — the conversation's held memory and
/// snapshots go; its next turn rebuilds the memory from the tail of the text that fits in the
/// softmax window. Returns the (empty) memory meter.
#[tauri::command]
pub async fn reset_memory(
    state: State<'_, AppState>,
    conversation_id: String,
) -> CmdResult<MemoryInfo> {
    let id = self::conversation_id(&conversation_id)?;
    chat::reset_memory(&state, id).await
}

// ---- App ----------------------------------------------------------------------------------

/// `open_url`: an `http(s):` or `mailto:` link, in the system's browser (never in the app's
/// window), through `tauri-plugin-opener` ([`crate::desktop::open_link`]), once
/// [`checked_link`] accepts it.
#[tauri::command]
pub async fn open_url(url: String) -> CmdResult<()> {
    let url = checked_link(&url).map_err(|why| {
        tracing::warn!(url = %url.chars().take(200).collect::<String>(), why, "link refused");
        CommandError::new(
            ErrorKind::Internal,
            format!("This link was not opened: {why}."),
        )
    })?;
    blocking(move || desktop::open_link(url.as_str())).await
}

/// The longest link [`open_url`] opens, in bytes (long enough for a map or search link, short
/// enough that no opener chokes on it).
pub const MAX_LINK_BYTES: usize = 8192;

/// The link policy of [`open_url`] (links come from model output: a stranger's text).
/// Returns the link as it will be handed to the system's opener (normalized: scheme in lower
/// case, host in punycode, unsafe characters percent-encoded), or why it is refused:
/// - anything but `http:`, `https:` and `mailto:` (`file:`, `javascript:`, `data:`, custom
///   schemes that start programs), in any letter case;
/// - a link over [`MAX_LINK_BYTES`], or with a control character, whitespace or an invisible
///   formatting character (bidi overrides, zero-width marks) anywhere: the text shown would not
///   be the link opened;
/// - `http(s)` without a host, or with a user name or password before the host
///   (`https://bank.example@evil.example/` shows one site and opens another);
/// - `mailto:` with a header other than `subject` and `body` (`attach`/`attachment` make
///   some mail clients attach a local file; `to`/`cc`/`bcc` add recipients the text did not
///   show), header names compared after percent-decoding and ignoring case; with a `;` in its
///   query (some clients split on it), an address that decodes to `?`, `&` or a control
///   character (a client that decodes first would find headers there), or a `#` fragment.
pub fn checked_link(url: &str) -> Result<tauri::Url, String> {
    if url.len() > MAX_LINK_BYTES {
        return Err(format!(
            "it is {} bytes long; at most {MAX_LINK_BYTES} are opened",
            url.len()
        ));
    }
    if let Some(c) = url.chars().find(|&c| hidden_char(c)) {
        return Err(format!(
            "it contains the character U+{:04X} (a space, control or invisible character)",
            u32::from(c)
        ));
    }
    let parsed = tauri::Url::parse(url).map_err(|e| format!("it is not a valid link ({e})"))?;
    match parsed.scheme() {
        "http" | "https" => {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err("it names no site".into());
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(
                    "it carries a user name or password before the site's name, which can hide the site it really opens"
                        .into(),
                );
            }
        }
        "mailto" => {
            if parsed.fragment().is_some() {
                return Err("a mail link cannot have a `#` part".into());
            }
            let address = percent_decoded(parsed.path());
            if address.contains(['?', '&']) || address.chars().any(hidden_char) {
                return Err("its address hides extra fields".into());
            }
            if let Some(query) = parsed.query() {
                if query.contains(';') {
                    return Err("its fields are separated by `;`".into());
                }
                for (name, _) in parsed.query_pairs() {
                    if !["subject", "body"]
                        .iter()
                        .any(|ok| name.eq_ignore_ascii_case(ok))
                    {
                        let name: String = name.chars().take(40).collect();
                        return Err(format!(
                            "a mail link may only fill in a subject and a body, and this one sets `{name}`"
                        ));
                    }
                }
            }
        }
        other => {
            let other: String = other.chars().take(40).collect();
            return Err(format!(
                "only web (http, https) and mail (mailto) links are opened, not `{other}:`"
            ));
        }
    }
    Ok(parsed)
}

/// Characters a link must not hold: controls, whitespace, and invisible formatting (zero-width
/// marks, bidi embeddings and overrides, the byte-order mark).
fn hidden_char(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// `s` with its `%XX` escapes decoded (invalid UTF-8 replaced).
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `url` opens (as `opened`, its normalized form, when given).
    fn opens(url: &str, opened: Option<&str>) {
        match checked_link(url) {
            Ok(u) => {
                if let Some(o) = opened {
                    assert_eq!(u.as_str(), o, "{url}");
                }
            }
            Err(why) => panic!("{url:?} was refused: {why}"),
        }
    }

    /// `url` is refused, the reason containing `because`.
    fn refused(url: &str, because: &str) {
        match checked_link(url) {
            Ok(u) => panic!("{url:?} was let through as {u}"),
            Err(why) => assert!(
                why.contains(because),
                "{url:?}: {why:?} (expected {because:?})"
            ),
        }
    }

    #[test]
    fn web_and_plain_mail_links_open() {
        opens(
            "https://example.com/a?b=c#d",
            Some("https://example.com/a?b=c#d"),
        );
        opens("http://example.com", Some("http://example.com/"));
        opens("HtTpS://Example.COM/Path", Some("https://example.com/Path"));
        opens("https://例え.jp/", Some("https://xn--r8jz45g.jp/"));
        opens("https://example.com/a%20b?q=%26", None);
        opens("https://example.com:8443/x", None);
        opens(
            "mailto:someone@example.com",
            Some("mailto:someone@example.com"),
        );
        opens(
            "MAILTO:someone@example.com?Subject=Hi&BODY=See%20you%3B%20bye",
            None,
        );
        opens("mailto:?subject=hi", None);
        opens(
            "mailto:a@example.com?subject=x%26attach%3D%2Fetc%2Fpasswd",
            None,
        );
        opens(
            &format!("https://example.com/{}", "a".repeat(MAX_LINK_BYTES - 30)),
            None,
        );
    }

    #[test]
    fn other_schemes_are_refused() {
        for (url, scheme) in [
            ("file:///etc/passwd", "`file:`"),
            ("javascript:alert(1)", "`javascript:`"),
            ("JaVaScRiPt:alert(1)", "`javascript:`"),
            ("data:text/html,<script>alert(1)</script>", "`data:`"),
            ("vscode://file/etc/passwd", "`vscode:`"),
            ("smb://host/share", "`smb:`"),
            ("ftp://example.com/", "`ftp:`"),
            ("tel:+123", "`tel:`"),
        ] {
            refused(url, scheme);
        }
        // Percent-encoded or missing separators are no scheme at all.
        refused("https%3A//example.com", "not a valid link");
        refused("javascript%3Aalert(1)", "not a valid link");
        refused("//example.com/x", "not a valid link");
        refused("example.com", "not a valid link");
        refused("", "not a valid link");
    }

    #[test]
    fn web_links_need_a_host_and_no_credentials() {
        refused("http:", "not a valid link");
        refused("https://", "not a valid link");
        refused("http://user:pass@example.com/", "user name or password");
        refused(
            "https://bank.example@evil.example/",
            "user name or password",
        );
        refused("https://:secret@example.com/", "user name or password");
        refused("https://%62ank@evil.example/", "user name or password");
    }

    #[test]
    fn hidden_characters_and_huge_links_are_refused() {
        for url in [
            " https://example.com",
            "https://example.com ",
            "https://exa\tmple.com",
            "https://exa\nmple.com",
            "java\nscript:alert(1)",
            "https://example.com/\u{0}",
            "https://example.com/\u{7f}",
            "https://example.com/\u{202E}moc.live",
            "https://exa\u{200B}mple.com",
            "https://example.com/\u{FEFF}",
            "https://example.com/\u{A0}",
            "mailto:a@example.com?subject=\u{2028}",
        ] {
            refused(url, "U+");
        }
        refused(
            &format!("https://example.com/{}", "a".repeat(MAX_LINK_BYTES)),
            "bytes long",
        );
        refused(&"\u{1F600}".repeat(10_000), "bytes long");
    }

    #[test]
    fn mail_links_only_fill_in_a_subject_and_a_body() {
        for (url, header) in [
            ("mailto:a@example.com?attach=/etc/passwd", "`attach`"),
            (
                "mailto:a@example.com?subject=x&attachment=~/.ssh/id_rsa",
                "`attachment`",
            ),
            ("mailto:a@example.com?ATTACH=/etc/passwd", "`ATTACH`"),
            ("mailto:a@example.com?%61ttach=/etc/passwd", "`attach`"),
            (
                "mailto:a@example.com?subject=x&%41TTACH=/etc/passwd",
                "`ATTACH`",
            ),
            ("mailto:a@example.com?cc=b@example.com", "`cc`"),
            ("mailto:a@example.com?bcc=b@example.com", "`bcc`"),
            ("mailto:?to=b@example.com", "`to`"),
            (
                "mailto:a@example.com?subject=x&in-reply-to=<y>",
                "`in-reply-to`",
            ),
            ("mailto:a@example.com?body=x&=y", "``"),
        ] {
            refused(url, header);
        }
        refused("mailto:a@example.com?subject=x;attach=/etc/passwd", "`;`");
        refused(
            "mailto:a@example.com%3Fattach=/etc/passwd",
            "hides extra fields",
        );
        refused(
            "mailto:a@example.com%26attach=/etc/passwd",
            "hides extra fields",
        );
        refused(
            "mailto:a@example.com%0d%0abcc:b@example.com",
            "hides extra fields",
        );
        refused("mailto:a@example.com#x", "`#`");
    }
}
