//! Backup and restore: every conversation (the versions shown, archived ones included) in one
//! file, with or without its memory state, imported on this or another machine as new
//! conversations. Nothing that exists is touched by an import.
//!
//! The file is a ZIP archive (entries stored, not compressed: states are floats, and a stored
//! entry can be checked and copied as it is), readable with any unzip tool:
//! - `backup.json` ([`Manifest`]): `format` = [`BACKUP_FORMAT`], `version` =
//!   [`BACKUP_VERSION`], the app version that wrote it, and the conversations with their
//!   messages and settings;
//! - `states/<n>.safetensors` (and `states/<n>.json`, its memory meter): with states, each
//!   conversation's latest snapshot, named in its `state` entry with the model key it was taken
//!   with and the message it follows;
//! - `pages/<name>.kvpage`: the KV pages those snapshots keep their softmax window in
//!   (`tptt_engine::snapshot::save_paged`), each once, listed in the `pages` of the states that
//!   use them (a page's name is the digest of its bytes, checked when the state loads).
//!
//! Import reads and checks everything before it changes anything: the format and version (a
//! newer backup is refused with the way out), every value (roles, statuses, settings, a state's
//! message, entry names of the form above only), and every state entry, copied out to a
//! temporary folder with its size and CRC-32 checked (a truncated or edited archive fails
//! there). Then the conversations go into the store in one transaction, and each state is put
//! in place and recorded as the conversation's snapshot: it reopens without re-reading when the
//! model, variant and config match (the snapshot's own identity check decides at load),
//! otherwise its memory is rebuilt from the text, as for any conversation.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tptt_store::{
    ConversationId, ConversationSettings, ImportConversation, ImportMessage, ListScope,
    MessageStatus, ModelKey, NewSnapshot, Role, Timestamp,
};

use crate::chat::{meta_path, remove_snapshot_files, Slot};
use crate::dto::BackupSummary;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::settings::storage_error;
use crate::state::{blocking, AppState};

/// The `format` of a backup's manifest.
pub const BACKUP_FORMAT: &str = "tptt-chat-backup";
/// The manifest version written; a newer one is refused.
pub const BACKUP_VERSION: u32 = 1;
/// The manifest's entry.
const MANIFEST: &str = "backup.json";
/// The largest manifest read (text of every conversation).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// The largest state entry read.
const MAX_STATE_BYTES: u64 = 64 << 30;
/// The largest KV page entry read (a page holds at most
/// `tptt_engine::snapshot::PAGE_POSITIONS` positions of every layer's keys and values).
const MAX_PAGE_BYTES: u64 = 4 << 30;

/// `backup.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`BACKUP_FORMAT`].
    pub format: String,
    /// [`BACKUP_VERSION`] when written.
    pub version: u32,
    /// The app version that wrote it.
    pub app_version: String,
    /// When (ms since the epoch).
    pub created_at: i64,
    /// Whether states were included.
    pub states: bool,
    /// The conversations, most recently updated first.
    pub conversations: Vec<BackupConversation>,
}

/// One conversation of a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupConversation {
    /// Title.
    pub title: String,
    /// Created (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Model of its next message.
    pub model: Option<String>,
    /// Its variant.
    pub variant: Option<String>,
    /// Its own settings (the store's JSON).
    pub settings: ConversationSettings,
    /// Archived.
    pub archived: bool,
    /// Pinned.
    pub pinned: bool,
    /// Messages in order.
    pub messages: Vec<BackupMessage>,
    /// Its latest memory state, when states are included and it has one.
    pub state: Option<BackupState>,
}

/// One message of a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupMessage {
    /// `user`, `assistant`, `system`.
    pub role: String,
    /// Text, verbatim.
    pub content: String,
    /// `complete`, `partial`, `error`.
    pub status: String,
    /// Why it is not complete.
    pub error: Option<String>,
    /// Created (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
    /// Prompt tokens, when known.
    pub token_count: Option<u32>,
    /// Generation statistics.
    pub stats: Option<serde_json::Value>,
    /// The document attached to it (its text is part of `content`).
    #[serde(default)]
    pub attachment: Option<tptt_store::Attachment>,
}

/// A conversation's memory state in a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupState {
    /// The index of the message it follows.
    pub message: usize,
    /// The model key it was taken with.
    pub model: String,
    /// Its variant.
    pub variant: String,
    /// Its config hash (the engine's numerics key).
    pub config_hash: String,
    /// The entry holding it (`states/<n>.safetensors`).
    pub file: String,
    /// The entry holding its meter (`states/<n>.json`), when there is one.
    pub meta: Option<String>,
    /// The entry's size.
    pub size_bytes: u64,
    /// Tokens it has read.
    pub token_count: u64,
    /// The KV pages it refers to (entries `pages/<name>.kvpage`); none for a snapshot that
    /// holds its KV cache itself, or in a backup written before pages existed.
    #[serde(default)]
    pub pages: Vec<String>,
}

/// The entry of KV page `name`.
fn page_entry(name: &str) -> String {
    format!("pages/{name}.kvpage")
}

/// A refused backup file: `invalid_settings` with what is wrong and what to do.
fn refused(why: impl std::fmt::Display) -> CommandError {
    CommandError::new(
        ErrorKind::InvalidSettings,
        format!("This file cannot be imported: {why}. Nothing was changed."),
    )
}

/// Writes every conversation (and, with `include_states`, its latest snapshot) to `path`, via
/// a `.partial` file renamed at the end. `busy` while a reply is generated (its state is being
/// written).
pub async fn write(
    state: &AppState,
    path: &Path,
    include_states: bool,
) -> CmdResult<BackupSummary> {
    let (_slot, _cancel) = Slot::acquire(state, ConversationId(0))?;
    let listing = state.store.list_conversations(ListScope::All).await?;
    let mut conversations = Vec::with_capacity(listing.items.len());
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let pages_dir = crate::chat::pages_dir(&state.config.snapshots_dir());
    let mut pages_written = std::collections::HashSet::new();
    for c in &listing.items {
        let messages = state.store.list_messages(c.id).await?;
        if !messages.skipped.is_empty() {
            tracing::warn!(
                conversation = c.id.0,
                skipped = messages.skipped.len(),
                "unreadable messages left out of the backup"
            );
        }
        let mut snapshot = None;
        if include_states {
            let latest = state.store.list_snapshots(c.id).await?.items.pop();
            if let Some(s) = latest.filter(|s| s.path.is_file()) {
                let pages = match tptt_engine::snapshot::page_names(&s.path) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::warn!(conversation = c.id.0, error = %e, "a snapshot left out of the backup: it cannot be read");
                        None
                    }
                };
                let pages = pages.filter(|p| {
                    let whole = p
                        .iter()
                        .all(|n| tptt_engine::snapshot::page_path(&pages_dir, n).is_file());
                    if !whole {
                        tracing::warn!(conversation = c.id.0, "a snapshot left out of the backup: some of its KV pages are missing (its chat is rebuilt from the text after an import)");
                    }
                    whole
                });
                let index = messages.items.iter().position(|m| m.id == s.message_id);
                if let (Some(index), Some(pages)) = (index, pages) {
                    for name in &pages {
                        if pages_written.insert(name.clone()) {
                            files.push((
                                page_entry(name),
                                tptt_engine::snapshot::page_path(&pages_dir, name),
                            ));
                        }
                    }
                    let n = files.len();
                    let file = format!("states/{n}.safetensors");
                    let meta_file = meta_path(&s.path);
                    let meta = meta_file.is_file().then(|| format!("states/{n}.json"));
                    files.push((file.clone(), s.path.clone()));
                    if let Some(m) = &meta {
                        files.push((m.clone(), meta_file));
                    }
                    snapshot = Some(BackupState {
                        message: index,
                        model: s.key.model.clone(),
                        variant: s.key.variant.clone(),
                        config_hash: s.key.config_hash.clone(),
                        file,
                        meta,
                        size_bytes: std::fs::metadata(&s.path).map_or(s.size_bytes, |m| m.len()),
                        token_count: s.token_count,
                        pages,
                    });
                }
            }
        }
        conversations.push(BackupConversation {
            title: c.title.clone(),
            created_at: c.created_at.as_millis(),
            updated_at: c.updated_at.as_millis(),
            model: c.model.clone(),
            variant: c.variant.clone(),
            settings: c.settings.clone(),
            archived: c.archived,
            pinned: c.pinned,
            messages: messages
                .items
                .iter()
                .map(|m| BackupMessage {
                    role: m.role.as_str().to_string(),
                    content: m.content.clone(),
                    status: m.status.as_str().to_string(),
                    error: m.error.clone(),
                    created_at: m.created_at.as_millis(),
                    updated_at: m.updated_at.as_millis(),
                    token_count: m.token_count,
                    stats: m.stats.clone(),
                    attachment: m.attachment.clone(),
                })
                .collect(),
            state: snapshot,
        });
    }
    let manifest = Manifest {
        format: BACKUP_FORMAT.into(),
        version: BACKUP_VERSION,
        app_version: env!("CARGO_PKG_VERSION").into(),
        created_at: Timestamp::now().as_millis(),
        states: include_states,
        conversations,
    };
    let summary = BackupSummary {
        conversations: manifest.conversations.len() as u32,
        states: manifest
            .conversations
            .iter()
            .filter(|c| c.state.is_some())
            .count() as u32,
        bytes: 0,
        path: path.display().to_string(),
    };
    let path = path.to_path_buf();
    blocking(move || {
        let partial = path.with_extension("partial");
        let written = write_zip(&partial, &manifest, &files);
        let bytes = match written.and_then(|()| {
            std::fs::rename(&partial, &path)?;
            Ok(std::fs::metadata(&path)?.len())
        }) {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(storage_error("the backup", e));
            }
        };
        tracing::info!(path = %path.display(), conversations = summary.conversations, states = summary.states, bytes, "backup written");
        Ok(BackupSummary { bytes, ..summary })
    })
    .await
}

fn write_zip(path: &Path, manifest: &Manifest, files: &[(String, PathBuf)]) -> std::io::Result<()> {
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    let mut zip = zip::ZipWriter::new(File::create(path)?);
    zip.start_file(MANIFEST, options)
        .map_err(std::io::Error::other)?;
    serde_json::to_writer(&mut zip, manifest).map_err(std::io::Error::other)?;
    for (name, from) in files {
        zip.start_file(name.as_str(), options)
            .map_err(std::io::Error::other)?;
        std::io::copy(&mut File::open(from)?, &mut zip)?;
    }
    let file = zip.finish().map_err(std::io::Error::other)?;
    file.sync_all()
}

/// What [`import`] brought in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Conversations.
    pub conversations: usize,
    /// Of which with their memory state.
    pub states: usize,
}

/// A state copied out of a backup, checked, to put in place once its conversation is in.
struct Extracted {
    /// The index of the message it follows.
    message: usize,
    /// The model key it was taken with.
    key: ModelKey,
    /// Tokens it has read.
    tokens: u64,
    /// The state file (in the import's temporary folder).
    file: PathBuf,
    /// Its meter, when the backup had it.
    meta: Option<PathBuf>,
    /// The KV pages it refers to, copied out: (name, file in the import's folder).
    pages: Vec<(String, PathBuf)>,
}

/// The conversations ready for the store, and per conversation its extracted state.
struct Checked {
    conversations: Vec<ImportConversation>,
    states: Vec<Option<Extracted>>,
}

/// Imports the backup at `path` (module doc). `invalid_settings` for a file that is not one,
/// is damaged, or comes from a newer version; nothing is changed then.
pub async fn import(state: &AppState, path: &Path) -> CmdResult<Imported> {
    // One folder per import, even for two in the same millisecond.
    static IMPORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = IMPORTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = state
        .config
        .snapshots_dir()
        .join(format!("import-{}-{n}", Timestamp::now().as_millis()));
    let (path, dir) = (path.to_path_buf(), work.clone());
    let checked = blocking(move || read_and_check(&path, &dir)).await;
    let checked = match checked {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    let imported = match state
        .store
        .import_conversations(&checked.conversations)
        .await
    {
        Ok(i) => i,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e.into());
        }
    };
    let mut with_state = 0;
    for (done, st) in imported.iter().zip(checked.states) {
        let Some(Extracted {
            message: index,
            key,
            tokens,
            file,
            meta,
            pages,
        }) = st
        else {
            continue;
        };
        let Some(&message) = done.messages.get(index) else {
            continue;
        };
        let dir = state
            .config
            .snapshots_dir()
            .join(done.conversation.0.to_string());
        let to = dir.join(format!("{}.safetensors", message.0));
        // Its pages first (a page already here has the same bytes: its name is their digest).
        let pages_dir = crate::chat::pages_dir(&state.config.snapshots_dir());
        let pages_placed = std::fs::create_dir_all(&pages_dir).and_then(|()| {
            pages.iter().try_for_each(|(name, from)| {
                let to = tptt_engine::snapshot::page_path(&pages_dir, name);
                match to.is_file() {
                    true => Ok(()),
                    false => std::fs::rename(from, &to),
                }
            })
        });
        if let Err(e) = pages_placed {
            tracing::warn!(error = %e, "an imported state's pages could not be put in place: that chat is rebuilt from its text");
            continue;
        }
        let placed = std::fs::create_dir_all(&dir).and_then(|()| std::fs::rename(&file, &to));
        if let Err(e) = placed {
            tracing::warn!(error = %e, "an imported state could not be put in place: that chat is rebuilt from its text");
            continue;
        }
        if let Some(meta) = meta {
            let _ = std::fs::rename(meta, meta_path(&to));
        }
        let size = std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
        let recorded = state
            .store
            .record_snapshot(&NewSnapshot {
                conversation_id: done.conversation,
                message_id: message,
                key,
                path: to.clone(),
                size_bytes: size,
                token_count: tokens,
            })
            .await;
        match recorded {
            Ok(_) => with_state += 1,
            Err(e) => {
                tracing::warn!(error = %e, "an imported state could not be recorded: that chat is rebuilt from its text");
                remove_snapshot_files(&[to]);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    tracing::info!(
        conversations = imported.len(),
        states = with_state,
        "backup imported"
    );
    Ok(Imported {
        conversations: imported.len(),
        states: with_state,
    })
}

/// Opens, parses and checks the backup, copying its states out into `dir` (module doc).
fn read_and_check(path: &Path, dir: &Path) -> CmdResult<Checked> {
    let file = File::open(path)
        .map_err(|e| refused(format!("{} cannot be read ({e})", path.display())))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        refused(format!(
            "it is not a TPTT Chat backup, or it was cut short ({e})"
        ))
    })?;
    let manifest: Manifest = {
        let entry = zip.by_name(MANIFEST).map_err(|_| {
            refused(format!(
                "it holds no {MANIFEST}: it is not a TPTT Chat backup"
            ))
        })?;
        if entry.size() > MAX_MANIFEST_BYTES {
            return Err(refused(format!(
                "its {MANIFEST} is larger than {} GiB",
                MAX_MANIFEST_BYTES >> 30
            )));
        }
        let mut text = Vec::new();
        entry
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| refused(format!("its {MANIFEST} is damaged ({e})")))?;
        // A first look at the format and version, so that a newer backup says so rather than
        // failing on a field this version does not know.
        let head: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| refused(format!("its {MANIFEST} is not valid JSON ({e})")))?;
        if head.get("format").and_then(|f| f.as_str()) != Some(BACKUP_FORMAT) {
            return Err(refused(
                "it is not a TPTT Chat backup (its format is not tptt-chat-backup)",
            ));
        }
        match head.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(BACKUP_VERSION) => {}
            Some(v) if v > u64::from(BACKUP_VERSION) => {
                return Err(CommandError::new(
                    ErrorKind::InvalidSettings,
                    format!("This backup was made by a newer version of TPTT Chat (backup format {v}; this one reads {BACKUP_VERSION}). Update the app to import it. Nothing was changed."),
                ))
            }
            other => return Err(refused(format!("its version is {other:?}, not a backup version"))),
        }
        serde_json::from_value(head)
            .map_err(|e| refused(format!("its {MANIFEST} is not valid ({e})")))?
    };
    let now = Timestamp::now().as_millis();
    let clamp = |t: i64| t.clamp(0, now);
    let mut conversations = Vec::with_capacity(manifest.conversations.len());
    let mut states = Vec::with_capacity(manifest.conversations.len());
    std::fs::create_dir_all(dir).map_err(|e| storage_error("the import", e))?;
    // The pages copied out so far (one file per page, whichever states share it).
    let mut extracted_pages = std::collections::HashMap::new();
    for (ci, c) in manifest.conversations.iter().enumerate() {
        let mut messages = Vec::with_capacity(c.messages.len());
        for (mi, m) in c.messages.iter().enumerate() {
            let at = || format!("conversation {} message {}", ci + 1, mi + 1);
            let role: Role = m
                .role
                .parse()
                .map_err(|e| refused(format!("{}: {e}", at())))?;
            let status: MessageStatus = m
                .status
                .parse()
                .map_err(|e| refused(format!("{}: {e}", at())))?;
            if m.content.len() > crate::chat::MAX_MESSAGE_BYTES {
                return Err(refused(format!("{} is longer than a message can be", at())));
            }
            messages.push(ImportMessage {
                role,
                content: m.content.clone(),
                status,
                error: m.error.clone(),
                created_at: Timestamp(clamp(m.created_at)),
                updated_at: Timestamp(clamp(m.updated_at)),
                token_count: m.token_count,
                stats: m.stats.clone(),
                attachment: m.attachment.clone().filter(|a| a.fits(&m.content)),
            });
        }
        let state = match &c.state {
            Some(s) if manifest.states => Some(extract_state(
                &mut zip,
                ci,
                s,
                c.messages.len(),
                dir,
                &mut extracted_pages,
            )?),
            _ => None,
        };
        states.push(state);
        conversations.push(ImportConversation {
            title: c.title.clone(),
            created_at: Timestamp(clamp(c.created_at)),
            updated_at: Timestamp(clamp(c.updated_at)),
            model: c.model.clone(),
            variant: c.variant.clone(),
            settings: c.settings.clone(),
            archived: c.archived,
            pinned: c.pinned,
            messages,
        });
    }
    Ok(Checked {
        conversations,
        states,
    })
}

/// Whether `name` is `states/<digits>.<ext>`.
fn state_entry(name: &str, ext: &str) -> bool {
    name.strip_prefix("states/")
        .and_then(|rest| rest.strip_suffix(ext))
        .is_some_and(|n| !n.is_empty() && n.len() <= 12 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Copies one state (and its meter) out of the archive into `dir`, checked: its name, its
/// size against the manifest's, its CRC-32 (checked by the reader at the end of the entry).
fn extract_state<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    ci: usize,
    s: &BackupState,
    messages: usize,
    dir: &Path,
    extracted_pages: &mut std::collections::HashMap<String, PathBuf>,
) -> CmdResult<Extracted> {
    let at = format!("conversation {}", ci + 1);
    if s.message >= messages {
        return Err(refused(format!(
            "{at}: its state follows message {} of {messages}",
            s.message + 1
        )));
    }
    if !state_entry(&s.file, ".safetensors") {
        return Err(refused(format!(
            "{at}: {:?} is not a state entry name",
            s.file
        )));
    }
    if s.size_bytes > MAX_STATE_BYTES {
        return Err(refused(format!(
            "{at}: its state is larger than {} GiB",
            MAX_STATE_BYTES >> 30
        )));
    }
    let file = dir.join(format!("{ci}.tmp"));
    copy_entry(zip, &s.file, &file, Some(s.size_bytes), &at)?;
    let meta = match &s.meta {
        Some(m) if state_entry(m, ".json") => {
            let out = dir.join(format!("{ci}.json.tmp"));
            copy_entry(zip, m, &out, None, &at)?;
            Some(out)
        }
        Some(m) => return Err(refused(format!("{at}: {m:?} is not a state entry name"))),
        None => None,
    };
    if s.pages.len() > MAX_PAGES_PER_STATE {
        return Err(refused(format!(
            "{at}: its state lists {} pages (at most {MAX_PAGES_PER_STATE})",
            s.pages.len()
        )));
    }
    let mut pages = Vec::with_capacity(s.pages.len());
    for name in &s.pages {
        if !page_name(name) {
            return Err(refused(format!("{at}: {name:?} is not a page name")));
        }
        let file = match extracted_pages.get(name) {
            Some(f) => f.clone(),
            None => {
                let out = dir.join(format!("page-{name}.tmp"));
                copy_entry_within(zip, &page_entry(name), &out, MAX_PAGE_BYTES, &at)?;
                extracted_pages.insert(name.clone(), out.clone());
                out
            }
        };
        pages.push((name.clone(), file));
    }
    Ok(Extracted {
        message: s.message,
        key: ModelKey::new(s.model.clone(), s.variant.clone(), s.config_hash.clone()),
        tokens: s.token_count,
        file,
        meta,
        pages,
    })
}

/// Most pages one state may list (a window of a million positions in pages of 256, twice).
const MAX_PAGES_PER_STATE: usize = 8192;

/// Whether `name` is a KV page's name (32 lowercase hex digits: nothing else reaches a path).
fn page_name(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// [`copy_entry`] of an entry of any size up to `limit` (its own recorded size).
fn copy_entry_within<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    to: &Path,
    limit: u64,
    at: &str,
) -> CmdResult<()> {
    let size = zip
        .by_name(name)
        .map_err(|e| refused(format!("{at}: its entry {name} is missing ({e})")))?
        .size();
    if size > limit {
        return Err(refused(format!(
            "{at}: its entry {name} is larger than {} GiB",
            limit >> 30
        )));
    }
    copy_entry(zip, name, to, Some(size), at)
}

/// Copies entry `name` to `to`: exactly `size` bytes when given (else at most 16 MiB), its
/// CRC-32 checked.
fn copy_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    to: &Path,
    size: Option<u64>,
    at: &str,
) -> CmdResult<()> {
    let entry = zip
        .by_name(name)
        .map_err(|e| refused(format!("{at}: its entry {name} is missing ({e})")))?;
    let limit = size.unwrap_or(16 << 20);
    if entry.size() != size.unwrap_or(entry.size()) || entry.size() > limit {
        return Err(refused(format!(
            "{at}: its entry {name} has {} bytes, not {limit}",
            entry.size()
        )));
    }
    let mut out = File::create(to).map_err(|e| storage_error("the import", e))?;
    let copied = std::io::copy(&mut entry.take(limit + 1), &mut out)
        .map_err(|e| refused(format!("{at}: its entry {name} is damaged ({e})")))?;
    if copied != size.unwrap_or(copied) || copied > limit {
        return Err(refused(format!(
            "{at}: its entry {name} has {copied} bytes, not {limit}"
        )));
    }
    out.flush().map_err(|e| storage_error("the import", e))?;
    Ok(())
}
