//! The Tauri commands of docs/ipc.md, one thin function each: parse the UI's arguments, call
//! the module that does the work, shape the answer. Every one returns at once; long work
//! (downloads, model loading, generation) runs on worker threads and reports through a
//! [`Channel`]. Arguments arrive camelCase (`repoId` → `repo_id`), as Tauri maps them.

use tauri::ipc::Channel;
use tauri::State;
use tptt_store::{ConversationId, ListScope, MessageId, NewConversation};

use crate::chat;
use crate::device;
use crate::dto::{
    parse_id, ChatEvent, ConversationDto, ConversationSummary, DeviceInfo, DownloadEvent,
    MemoryInfo, MessageDto, ModelEntry, ModelSource, RegenerateResult, SendResult, SettingsDto,
    VariantEntry,
};
use crate::error::{CmdResult, CommandError, ErrorKind};
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
    state.save_settings(s).await?;
    Ok(state.settings().to_dto(state.token.is_set()))
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
    let listing = state.store.list_conversations(ListScope::Active).await?;
    let mut out = Vec::with_capacity(listing.items.len());
    for c in &listing.items {
        let last = match state.store.last_message(c.id).await {
            Ok(m) => m.map(|m| m.content).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(conversation = c.id.0, error = %e, "no preview");
                String::new()
            }
        };
        out.push(ConversationSummary::new(c, &last));
    }
    Ok(out)
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
    let c = state.store.get_conversation(id).await?;
    let listing = state.store.list_messages(id).await?;
    if !listing.skipped.is_empty() {
        tracing::warn!(
            conversation = id.0,
            skipped = listing.skipped.len(),
            "unreadable messages left out"
        );
    }
    let memory = chat::memory_info(&state, id).await;
    Ok(ConversationDto {
        id: c.id.0.to_string(),
        title: c.title,
        model_repo: c.model,
        variant: c.variant,
        messages: listing.items.iter().map(MessageDto::from).collect(),
        memory,
    })
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
    match format.as_str() {
        "markdown" => Ok(state.store.export_markdown(id).await?),
        "json" => Ok(state.store.export_json(id).await?),
        other => Err(CommandError::new(
            ErrorKind::InvalidSettings,
            format!("format: must be markdown or json, got {other:?}"),
        )),
    }
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

/// `edit_and_resend`: `message_id` gets `content`, everything after it goes, a new answer
/// follows (one transaction).
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
/// webview).
#[tauri::command]
pub async fn open_url(url: String) -> CmdResult<()> {
    let ok_scheme = ["https://", "http://", "mailto:"].iter().any(|s| {
        url.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    });
    if !ok_scheme || url.chars().any(char::is_control) {
        return Err(CommandError::new(
            ErrorKind::Internal,
            "Only http, https and mailto links can be opened.",
        ));
    }
    #[cfg(target_os = "linux")]
    let mut cmd = std::process::Command::new("xdg-open");
    #[cfg(target_os = "macos")]
    let mut cmd = std::process::Command::new("open");
    #[cfg(target_os = "windows")]
    let mut cmd = {
        let mut c = std::process::Command::new("rundll32");
        c.arg("url.dll,FileProtocolHandler");
        c
    };
    cmd.arg(&url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| CommandError::internal("Cannot open the link in a browser", e))?;
    // Reap the opener when it exits (it hands the URL over and returns).
    std::thread::spawn(move || child.wait());
    Ok(())
}
