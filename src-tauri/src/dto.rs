//! The UI's JSON: the camelCase data types of docs/ipc.md, one for one, and their conversions
//! from store and engine types. Only this crate knows these shapes (STYLE habit 9).
//!
//! Their TypeScript types are generated from these (ts-rs, [`crate::ipc_types`]) into
//! `ui/src/services/ipc.gen.ts`; a test fails when the checked-in file differs. Integers are
//! `number`s there (`#[ts(type = "number")]`: every count fits in 2^53).
//!
//! Ids travel as strings of decimal digits (the UI treats them as opaque strings); they are
//! parsed back with [`parse_id`].

use serde::{Deserialize, Serialize};
use tptt_engine::{GenerationStats, Health, Session, Surprise};
use tptt_store::{
    Conversation as StoredConversation, Message as StoredMessage, MessageStatus, Role,
};
use ts_rs::TS;

use crate::error::{CommandError, ErrorKind};

/// How `export_conversation` writes a conversation (its `format` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// Markdown, one section per message.
    Markdown,
    /// JSON: the conversation and its messages.
    Json,
}

impl ExportFormat {
    /// The format named `s` on the wire.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "markdown" => Some(Self::Markdown),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// `ModelEntry`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct ModelEntry {
    /// Hub id (`owner/name`) or, for an imported folder, its absolute path.
    pub repo_id: String,
    /// Display name.
    pub title: String,
    /// Where the entry comes from.
    pub source: ModelSource,
    /// One line about it.
    pub description: String,
    /// `None` until the repository has been listed (or a variant downloaded).
    pub variants: Option<Vec<VariantEntry>>,
    /// The base model of the variants, when known.
    pub base_model: Option<String>,
    /// Bytes of that base model, which every variant needs beside its own files (downloaded
    /// once, shared by the variants), when known.
    #[ts(type = "number | null")]
    pub base_size_bytes: Option<u64>,
}

/// `ModelEntry.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    /// One of the published TPTT repositories.
    Catalog,
    /// Added by repository id.
    Added,
    /// An imported local folder.
    Local,
    /// A TPTT repository found in the Hugging Face cache (downloaded by another tool or an
    /// earlier install), neither in the catalog nor added.
    Cache,
}

/// `VariantEntry`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct VariantEntry {
    /// The variant's folder name.
    pub name: String,
    /// `operator_mode` of its config (`delta_rule`, ...), empty when unknown.
    pub operator_mode: String,
    /// Complete in the cache (or a local folder): usable offline.
    pub downloaded: bool,
    /// Bytes of the variant's own files (adapter, config), without the shared base.
    #[ts(type = "number | null")]
    pub size_bytes: Option<u64>,
}

/// `DownloadEvent`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum DownloadEvent {
    /// Bytes arrived (or a file started, finished, or was found complete).
    Progress {
        /// The current file, relative to its repository.
        file: String,
        /// Bytes of it on disk.
        #[ts(type = "number")]
        file_bytes: u64,
        /// Its size.
        #[ts(type = "number")]
        file_total: u64,
        /// Bytes of the whole download complete.
        #[ts(type = "number")]
        bytes: u64,
        /// Bytes of the whole download.
        #[ts(type = "number")]
        total: u64,
        /// Recent speed.
        bytes_per_sec: f64,
    },
    /// Every file is complete and verified.
    Done,
    /// Cancelled; what was downloaded is kept and resumes next time.
    Cancelled,
    /// Failed; what was downloaded is kept and resumes next time.
    Error {
        /// For people.
        message: String,
        /// The error kind (`network`, `auth`, `disk_full`, `download`...).
        error_kind: ErrorKind,
    },
}

/// `Settings.sampling`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "Sampling")]
pub struct SamplingDto {
    /// Softmax temperature (0: greedy).
    pub temperature: f64,
    /// Top-k (0: off).
    #[serde(serialize_with = "whole")]
    pub top_k: f64,
    /// Nucleus threshold (1: off).
    pub top_p: f64,
    /// Min-p (0: off).
    pub min_p: f64,
    /// Repetition penalty (1: off).
    pub repeat_penalty: f64,
    /// Tokens the penalty looks back on.
    #[serde(serialize_with = "whole")]
    pub repeat_last_n: f64,
    /// Answer length limit.
    #[serde(serialize_with = "whole")]
    pub max_new_tokens: f64,
    /// Fixed seed, or a fresh one per answer.
    #[serde(serialize_with = "whole_opt")]
    pub seed: Option<f64>,
}

/// `Settings`. Numbers are `f64` on the way in so that a wrong value is reported by field
/// (`invalid_settings`) rather than as a deserialization failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "Settings")]
pub struct SettingsDto {
    /// Model (hub id or imported folder).
    pub model_repo: Option<String>,
    /// Variant of that model.
    pub variant: Option<String>,
    /// `auto`, `cpu`, `cuda`, `metal`.
    #[ts(type = "Device")]
    pub device: String,
    /// Sampling parameters.
    pub sampling: SamplingDto,
    /// System prompt ("" for none).
    pub system_prompt: String,
    /// Softmax window (`None`: the model's).
    #[serde(serialize_with = "whole_opt")]
    pub window_size: Option<f64>,
    /// `light`, `dark`, `system`.
    #[ts(type = "Theme")]
    pub theme: String,
    /// The local OpenAI-compatible API server (off by default).
    #[serde(default)]
    pub api_server: crate::api_server::ApiServerDto,
    /// How memories store their softmax keys and values: `f32` (exact) or `f16` (half the
    /// memory). New memories and memories reopened from a snapshot use it.
    #[serde(default = "f32_name")]
    #[ts(type = "KvFormat")]
    pub kv_format: String,
    /// Whether a Hugging Face token is stored (ignored on the way in).
    #[serde(default)]
    pub hf_token_set: bool,
}

fn f32_name() -> String {
    "f32".into()
}

/// A whole number written as an integer (`512`, not `512.0`).
pub(crate) fn whole<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && *v >= 0.0 && *v <= 9_007_199_254_740_991.0 {
        s.serialize_u64(*v as u64)
    } else {
        s.serialize_f64(*v)
    }
}

fn whole_opt<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => whole(v, s),
        None => s.serialize_none(),
    }
}

/// `device_info()`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    /// Devices compiled into this build (`cpu` always; `cuda`, `metal` with their features).
    pub compiled: Vec<String>,
    /// The device the loaded model runs on, else the one the setting would pick now.
    pub in_use: String,
    /// For people, e.g. `CPU (16 threads)` or `CUDA device 0`.
    pub name: String,
}

/// `ConversationSummary`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct ConversationSummary {
    /// Id.
    pub id: String,
    /// Title.
    pub title: String,
    /// ISO 8601.
    pub updated_at: String,
    /// Model of the last answer (or chosen when it was created).
    pub model_repo: Option<String>,
    /// Its variant.
    pub variant: Option<String>,
    /// The start of the last message (or of the search hit).
    pub preview: String,
    /// Listed first.
    pub pinned: bool,
    /// In the archived list, not the main one.
    pub archived: bool,
}

/// Characters of a message shown as a preview.
pub const PREVIEW_CHARS: usize = 140;

/// The first [`PREVIEW_CHARS`] characters of `text`, on one line.
pub fn preview(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(PREVIEW_CHARS) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

impl ConversationSummary {
    /// From a stored conversation and its preview text.
    pub fn new(c: &StoredConversation, preview_text: &str) -> Self {
        Self {
            id: c.id.0.to_string(),
            title: c.title.clone(),
            updated_at: c.updated_at.to_string(),
            model_repo: c.model.clone(),
            variant: c.variant.clone(),
            preview: preview(preview_text),
            pinned: c.pinned,
            archived: c.archived,
        }
    }
}

/// `BackupSummary`: what `export_backup` wrote.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct BackupSummary {
    /// Conversations written.
    pub conversations: u32,
    /// Of which with their memory state.
    pub states: u32,
    /// The file's size.
    #[ts(type = "number")]
    pub bytes: u64,
    /// Where.
    pub path: String,
}

/// `ImportSummary`: what `import_backup` brought in.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct ImportSummary {
    /// Conversations imported (new ones; nothing that existed was touched).
    pub conversations: u32,
    /// Of which with their memory state (they reopen without re-reading on the same model).
    pub states: u32,
}

/// `SavedMemory`: a primed memory of the library (`list_memories`).
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct SavedMemory {
    /// Id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The model it was saved with (only it, with the same variant, can use it).
    pub model_repo: String,
    /// That model's variant.
    pub variant: String,
    /// Tokens it has read.
    #[ts(type = "number")]
    pub tokens: u64,
    /// Its file's size.
    #[ts(type = "number")]
    pub size_bytes: u64,
    /// The title of the chat it was saved from.
    pub source_title: String,
    /// ISO 8601.
    pub created_at: String,
}

impl From<&tptt_store::Memory> for SavedMemory {
    fn from(m: &tptt_store::Memory) -> Self {
        Self {
            id: m.id.0.to_string(),
            name: m.name.clone(),
            model_repo: m.key.model.clone(),
            variant: m.key.variant.clone(),
            tokens: m.token_count,
            size_bytes: m.size_bytes,
            source_title: m.source_title.clone(),
            created_at: m.created_at.to_string(),
        }
    }
}

/// `Conversation`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "Conversation")]
pub struct ConversationDto {
    /// Id.
    pub id: String,
    /// Title.
    pub title: String,
    /// Model.
    pub model_repo: Option<String>,
    /// Variant.
    pub variant: Option<String>,
    /// Messages in order.
    pub messages: Vec<MessageDto>,
    /// The conversation's memory as last saved (or as held now).
    pub memory: MemoryInfo,
    /// Its own settings (what is `null` there follows the app's).
    pub settings: ChatSettingsDto,
}

/// `ChatSettings`: one conversation's own settings. `null` follows the app's (`Settings`), so
/// a chat without settings of its own changes with them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "ChatSettings")]
pub struct ChatSettingsDto {
    /// This chat's model and variant, or `null` for the app's.
    pub model: Option<ChatModelDto>,
    /// This chat's softmax window (tokens), or `null` for the app's.
    #[serde(default, serialize_with = "whole_opt")]
    pub window_size: Option<f64>,
    /// This chat's system prompt ("" for none), or `null` for the app's.
    pub system_prompt: Option<String>,
    /// This chat's sampling, or `null` for the app's.
    pub sampling: Option<SamplingDto>,
}

/// `ChatModel`: a model (hub id or imported folder, as `ModelEntry.repoId`) and its variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "ChatModel")]
pub struct ChatModelDto {
    /// The model.
    pub repo_id: String,
    /// Its variant.
    pub variant: String,
}

/// `LaunchEvent`, emitted as the event [`LAUNCH_EVENT`] when the app is started again with
/// `--model FOLDER` while it runs: the running app follows that command line.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum LaunchEvent {
    /// The folder was imported (if new) and its variant chosen: the UI reloads its settings and
    /// models.
    #[serde(rename_all = "camelCase")]
    ModelChosen {
        /// The folder's id (its canonical path).
        repo_id: String,
        /// The variant chosen.
        variant: String,
    },
    /// The command line could not be followed (the folder went away since it was checked...).
    Error {
        /// For people.
        message: String,
    },
}

/// The name of the event that carries a [`LaunchEvent`].
pub const LAUNCH_EVENT: &str = "launch";

/// What `set_conversation_settings` did.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct ChatSettingsSaved {
    /// The settings as stored.
    pub settings: ChatSettingsDto,
    /// Whether the conversation's memory was dropped (its system prompt or window changed: the
    /// memory was built with the old one), so its next message reads the whole conversation
    /// again.
    pub rebuilt: bool,
    /// The memory meter after the change.
    pub memory: MemoryInfo,
}

/// `Message`.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "Message")]
pub struct MessageDto {
    /// Id.
    pub id: String,
    /// `user`, `assistant`, `system`.
    #[ts(type = "Role")]
    pub role: Role,
    /// The text, verbatim.
    pub content: String,
    /// `complete`, `partial`, `error`.
    #[ts(type = "MessageStatus")]
    pub status: MessageStatus,
    /// Why an answer is not complete, when known: the failure of an `error` answer, or, on a
    /// `partial` one, that the app closed while it was written (it is then shown as
    /// interrupted, not as stopped).
    pub error: Option<String>,
    /// Generation statistics of an answer.
    pub stats: Option<Stats>,
    /// ISO 8601.
    pub created_at: String,
    /// The versions of the continuation this message starts, when regenerate or edit made
    /// more than one (`switch_version` shows another).
    pub versions: Option<VersionsDto>,
    /// The document attached to it: `content` is then the text typed with it, the document's
    /// text (which the model read) is not sent.
    pub attachment: Option<AttachmentDto>,
}

/// `Attachment`: a document attached to a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "Attachment")]
pub struct AttachmentDto {
    /// The file's name.
    pub name: String,
    /// `text`, `markdown`, `code`, `html` or `pdf`.
    pub kind: String,
    /// The file's size.
    #[ts(type = "number")]
    pub bytes: u64,
    /// Characters of its text.
    #[ts(type = "number")]
    pub chars: u64,
}

/// `Versions`: a position's versions (what regenerate and edit replaced is kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "Versions")]
pub struct VersionsDto {
    /// The version shown, from 1.
    pub current: u32,
    /// How many there are (at least 2).
    pub total: u32,
}

impl From<&StoredMessage> for MessageDto {
    fn from(m: &StoredMessage) -> Self {
        let attached = m.attachment.as_ref().filter(|a| a.fits(&m.content));
        let content = match attached {
            Some(a) => format!("{}{}", &m.content[..a.start], &m.content[a.end..])
                .trim()
                .to_string(),
            None => m.content.clone(),
        };
        Self {
            id: m.id.0.to_string(),
            role: m.role,
            content,
            attachment: attached.map(|a| AttachmentDto {
                name: a.name.clone(),
                kind: a.kind.clone(),
                bytes: a.bytes,
                chars: m.content[a.start..a.end].chars().count() as u64,
            }),
            status: m.status,
            error: m.error.clone(),
            stats: m
                .stats
                .as_ref()
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
            created_at: m.created_at.to_string(),
            versions: None,
        }
    }
}

/// `Stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Tokens fed before generating (the turn's prompt: what it added to the memory).
    #[ts(type = "number")]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[ts(type = "number")]
    pub generated_tokens: u64,
    /// Time to the first generated token from the moment the prompt began to be read (its
    /// reading included; the model's loading, `load_ms`, not).
    pub ttft_ms: f64,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second after the first.
    pub decode_tokens_per_s: f64,
    /// How long loading the model took, when this turn loaded it (absent from answers saved
    /// before it was recorded).
    #[serde(default)]
    pub load_ms: Option<f64>,
}

impl From<&GenerationStats> for Stats {
    fn from(s: &GenerationStats) -> Self {
        Self {
            prompt_tokens: s.prompt_tokens as u64,
            generated_tokens: s.generated_tokens as u64,
            ttft_ms: s.time_to_first_token.as_secs_f64() * 1000.0,
            prefill_tokens_per_s: s.prefill_tokens_per_s,
            decode_tokens_per_s: s.decode_tokens_per_s,
            load_ms: None,
        }
    }
}

/// `MemoryInfo`: the softmax window's fill, what lives only in the recurrent memory, and the
/// memory's health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct MemoryInfo {
    /// Positions the softmax KV window holds at most (0 when unknown).
    #[ts(type = "number")]
    pub window_size: u64,
    /// Positions it holds now.
    #[ts(type = "number")]
    pub window_fill: u64,
    /// Tokens read earlier than the window: they live only in the linear (recurrent) memory.
    #[ts(type = "number")]
    pub recurrent_only_tokens: u64,
    /// Tokens the conversation's memory has read in all.
    #[ts(type = "number")]
    pub total_tokens: u64,
    /// The model's surprise on what it read (absent from sidecars written before it existed:
    /// `unknown`).
    #[serde(default)]
    pub health: MemoryHealth,
}

impl MemoryInfo {
    /// From a state's position, window and KV fill (health unknown).
    pub fn new(total: usize, window: Option<usize>, fill: usize) -> Self {
        Self {
            window_size: window.unwrap_or(0) as u64,
            window_fill: fill as u64,
            recurrent_only_tokens: total.saturating_sub(fill) as u64,
            total_tokens: total as u64,
            health: MemoryHealth::default(),
        }
    }

    /// Of a session: its state's meter and its surprise record.
    pub fn of(session: &Session) -> Self {
        let state = &session.state;
        Self {
            health: MemoryHealth::of(&session.surprise),
            ..Self::new(state.pos, state.window, state.kv_len())
        }
    }

    /// The meter after `fed` more tokens were read by a sliding-window state
    /// (`CarryMode::Continue`: the window holds the last `min(total, window)` positions), with
    /// the surprise record after them.
    pub fn after_reading(&self, fed: usize, surprise: &Surprise) -> Self {
        Self {
            health: MemoryHealth::of(surprise),
            ..self.advanced(fed)
        }
    }

    /// The meter after `fed` more tokens were read, its health as it was.
    pub fn advanced(&self, fed: usize) -> Self {
        let total = self.total_tokens.saturating_add(fed as u64);
        let fill = if self.window_size == 0 {
            total
        } else {
            total.min(self.window_size)
        };
        Self {
            window_size: self.window_size,
            window_fill: fill,
            recurrent_only_tokens: total - fill,
            total_tokens: total,
            health: self.health,
        }
    }
}

/// `MemoryHealth.verdict`: [`tptt_engine::Health`] on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
#[ts(rename = "MemoryVerdict")]
pub enum Verdict {
    /// Too little read yet to tell.
    #[default]
    Unknown,
    /// Recent text is about as predictable as the conversation's start.
    Healthy,
    /// Recent text reads noticeably more surprising than the start.
    Strained,
    /// The model no longer predicts the text: its answers are unreliable.
    Broken,
}

impl From<Health> for Verdict {
    fn from(h: Health) -> Self {
        match h {
            Health::Unknown => Self::Unknown,
            Health::Healthy => Self::Healthy,
            Health::Strained => Self::Strained,
            Health::Broken => Self::Broken,
        }
    }
}

/// `MemoryHealth`: the model's surprise on the text its memory read, as perplexities — over
/// the conversation's start and over the recent samples — and the verdict on their ratio
/// (`tptt_engine::health`). `null` figures until enough text was read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct MemoryHealth {
    /// The verdict.
    pub verdict: Verdict,
    /// Perplexity over the conversation's start.
    pub early_perplexity: Option<f64>,
    /// Perplexity over the recent samples.
    pub recent_perplexity: Option<f64>,
    /// `recentPerplexity / earlyPerplexity`.
    pub ratio: Option<f64>,
}

impl MemoryHealth {
    /// Of a session's surprise record (non-finite figures are sent as `null`).
    pub fn of(s: &Surprise) -> Self {
        let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
        Self {
            verdict: s.verdict().into(),
            early_perplexity: finite(s.early_perplexity()),
            recent_perplexity: finite(s.recent_perplexity()),
            ratio: finite(s.ratio()),
        }
    }
}

/// `ChatEvent`, streamed through the `onEvent` channel of the chat commands.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ChatEvent {
    /// The model is ready and the turn starts; the memory before it.
    Started {
        /// Memory before the turn.
        memory: MemoryInfo,
        /// Tokens of the prompt the turn is about to read.
        #[ts(type = "number")]
        prompt_tokens: u64,
        /// How long loading the model took, when this turn loaded it (`null` when it was
        /// loaded already). Not part of the time to first token.
        load_ms: Option<f64>,
    },
    /// Part of a long prompt has been read (at most every [`PREFILL_EVENT_INTERVAL`], after a
    /// block of the prompt): the progress, and the memory as it is now.
    ///
    /// [`PREFILL_EVENT_INTERVAL`]: crate::chat::PREFILL_EVENT_INTERVAL
    Prefill {
        /// Prompt tokens read so far.
        #[ts(type = "number")]
        read: u64,
        /// Prompt tokens in all.
        #[ts(type = "number")]
        total: u64,
        /// Since the prompt began to be read.
        elapsed_ms: f64,
        /// The memory after the tokens read so far (the health as before the turn).
        memory: MemoryInfo,
    },
    /// The turn's prompt has been read (before the first token): the memory after it, with
    /// its health.
    Memory {
        /// Memory after the prompt.
        memory: MemoryInfo,
    },
    /// Streamed text.
    Token {
        /// The piece (whole UTF-8 characters).
        text: String,
        /// Tokens generated so far (each one read into the memory too): the piece may be the
        /// text of several.
        #[ts(type = "number")]
        generated: u64,
    },
    /// Finished normally; the answer is saved.
    Done {
        /// Statistics.
        stats: Stats,
        /// Memory after the turn.
        memory: MemoryInfo,
    },
    /// Stopped by `stop_generation`; the partial answer is saved.
    Stopped {
        /// Statistics.
        stats: Stats,
        /// Memory after the turn.
        memory: MemoryInfo,
    },
    /// Failed; the partial answer is saved with status `error`.
    Error {
        /// For people.
        message: String,
        /// The text generated before the failure.
        partial: String,
        /// The error kind (`model_load`, `no_model`, `generation`, `database`...).
        error_kind: ErrorKind,
    },
}

/// `send_message` / `edit_and_resend` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct SendResult {
    /// The stored user message.
    pub user_message_id: String,
    /// The answer being generated (stored as `partial` until it ends).
    pub assistant_message_id: String,
}

/// `regenerate` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "camelCase")]
pub struct RegenerateResult {
    /// The new answer.
    pub assistant_message_id: String,
}

/// An id from the UI (decimal digits), or `not_found` naming `what`.
pub fn parse_id(what: &str, id: &str) -> Result<i64, CommandError> {
    id.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            CommandError::new(
                ErrorKind::NotFound,
                format!("There is no {what} with id {id:?}."),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_events_are_tagged_camel_case() {
        let e = ChatEvent::Error {
            message: "m".into(),
            partial: "p".into(),
            error_kind: ErrorKind::ModelLoad,
        };
        assert_eq!(
            serde_json::to_value(&e).expect("json"),
            json!({"kind": "error", "message": "m", "partial": "p", "errorKind": "model_load"})
        );
        let e = ChatEvent::Started {
            memory: MemoryInfo::new(100, Some(64), 64),
            prompt_tokens: 7,
            load_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&e).expect("json"),
            json!({"kind": "started", "memory": {"windowSize": 64, "windowFill": 64, "recurrentOnlyTokens": 36, "totalTokens": 100,
                "health": {"verdict": "unknown", "earlyPerplexity": null, "recentPerplexity": null, "ratio": null}},
                "promptTokens": 7, "loadMs": null})
        );
        let e = ChatEvent::Prefill {
            read: 512,
            total: 2000,
            elapsed_ms: 1500.0,
            memory: MemoryInfo::new(612, Some(64), 64),
        };
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(
            (
                &v["kind"],
                &v["read"],
                &v["total"],
                &v["elapsedMs"],
                &v["memory"]["totalTokens"]
            ),
            (
                &json!("prefill"),
                &json!(512),
                &json!(2000),
                &json!(1500.0),
                &json!(612)
            )
        );
        assert_eq!(
            serde_json::to_value(ChatEvent::Token {
                text: "a".into(),
                generated: 3
            })
            .expect("json"),
            json!({"kind": "token", "text": "a", "generated": 3})
        );
        // Stats saved before `loadMs` existed still parse.
        let old: Stats = serde_json::from_value(json!({"promptTokens": 1, "generatedTokens": 2,
            "ttftMs": 3.0, "prefillTokensPerS": 4.0, "decodeTokensPerS": 5.0}))
        .expect("old stats parse");
        assert_eq!(old.load_ms, None);
        let e = DownloadEvent::Progress {
            file: "a".into(),
            file_bytes: 1,
            file_total: 2,
            bytes: 3,
            total: 4,
            bytes_per_sec: 5.0,
        };
        assert_eq!(
            serde_json::to_value(&e).expect("json"),
            json!({"kind": "progress", "file": "a", "fileBytes": 1, "fileTotal": 2, "bytes": 3, "total": 4, "bytesPerSec": 5.0})
        );
        assert_eq!(
            serde_json::to_value(DownloadEvent::Done).expect("json"),
            json!({"kind": "done"})
        );
    }

    #[test]
    fn memory_without_health_parses_as_unknown() {
        // A sidecar's meter as written before the health existed.
        let old: MemoryInfo = serde_json::from_value(json!({
            "windowSize": 64, "windowFill": 64, "recurrentOnlyTokens": 36, "totalTokens": 100
        }))
        .expect("an old meter parses");
        assert_eq!(old, MemoryInfo::new(100, Some(64), 64));
        assert_eq!(old.health.verdict, Verdict::Unknown);
        assert_eq!(old.health.ratio, None);
    }

    #[test]
    fn health_reports_a_collapse_and_the_meter_advances_over_the_prompt() {
        use tptt_engine::health::{EARLY_POSITIONS, RECENT_SAMPLES, SURPRISE_STRIDE};
        let mut s = Surprise::default();
        for i in 0..100 {
            s.record(i * SURPRISE_STRIDE, 26f32.ln());
        }
        let h = MemoryHealth::of(&s);
        assert_eq!(h.verdict, Verdict::Healthy);
        for i in 0..RECENT_SAMPLES {
            s.record(EARLY_POSITIONS * 4 + i * SURPRISE_STRIDE, 200f32.ln());
        }
        let h = MemoryHealth::of(&s);
        assert_eq!(h.verdict, Verdict::Broken);
        let (early, recent, ratio) = (
            h.early_perplexity.expect("early"),
            h.recent_perplexity.expect("recent"),
            h.ratio.expect("ratio"),
        );
        assert!((early - 26.0).abs() < 0.01, "{early}");
        assert!((recent - 200.0).abs() < 0.1, "{recent}");
        assert!((ratio - 200.0 / 26.0).abs() < 0.01, "{ratio}");
        assert_eq!(
            serde_json::to_value(h).expect("json")["verdict"],
            json!("broken")
        );

        let before = MemoryInfo::new(40, Some(64), 40);
        let after = before.after_reading(100, &s);
        assert_eq!(
            (
                after.total_tokens,
                after.window_fill,
                after.recurrent_only_tokens
            ),
            (140, 64, 76)
        );
        assert_eq!(after.health, h);
        let small = MemoryInfo::new(0, Some(64), 0).after_reading(10, &Surprise::default());
        assert_eq!((small.window_fill, small.recurrent_only_tokens), (10, 0));
    }

    #[test]
    fn previews_are_short_single_lines() {
        assert_eq!(preview("a\n\n b  c"), "a b c");
        let long = "é".repeat(500);
        let p = preview(&long);
        assert_eq!(p.chars().count(), PREVIEW_CHARS + 1);
        assert!(p.ends_with('…'));
    }

    #[test]
    fn ids_parse_or_say_not_found() {
        assert_eq!(parse_id("conversation", "42").expect("id"), 42);
        for bad in ["", "x", "-1", "0", "1.5"] {
            assert_eq!(
                parse_id("conversation", bad).expect_err(bad).kind,
                ErrorKind::NotFound
            );
        }
    }
}
