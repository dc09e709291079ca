// GENERATED from the Rust types of src-tauri (src/ipc_types.rs): do not edit.
// Regenerate: TPTT_WRITE_IPC=1 cargo test --workspace --all-targets ipc_contract
/* eslint-disable */

import type { Channel } from '@tauri-apps/api/core';

// ---- Values the Rust side spells as strings ----

/** A device preference (src/device.rs `DevicePref`). */
export type Device = "auto" | "cpu" | "cuda" | "metal";

/** The UI theme (src/settings.rs `Theme`). */
export type Theme = "light" | "dark" | "system";

/** How a memory stores its KV cache (src/settings.rs `KvSetting`). */
export type KvFormat = "auto" | "q8_0" | "f16" | "f32";

/** Who wrote a message (the store's `Role`). */
export type Role = "system" | "user" | "assistant";

/** How far a message got (the store's `MessageStatus`). */
export type MessageStatus = "complete" | "partial" | "error";

// ---- Types ----

/**
 * What kind of failure, as the UI branches on it (docs/ipc.md).
 */
export type ErrorKind = "no_model" | "model_load" | "download" | "network" | "auth" | "disk_full" | "invalid_settings" | "invalid_repo_id" | "not_a_tptt_repo" | "not_found" | "busy" | "database" | "generation" | "input_too_long" | "internal";

/**
 * A command's failure: `{ kind, message }` on the wire.
 */
export type CommandError = { 
/**
 * What kind of failure.
 */
kind: ErrorKind, 
/**
 * For people: what happened and the way forward.
 */
message: string, };

/**
 * `ModelEntry.source`.
 */
export type ModelSource = "catalog" | "added" | "local" | "cache";

/**
 * `VariantEntry`.
 */
export type VariantEntry = { 
/**
 * The variant's folder name.
 */
name: string, 
/**
 * `operator_mode` of its config (`delta_rule`, ...), empty when unknown.
 */
operatorMode: string, 
/**
 * Complete in the cache (or a local folder): usable offline.
 */
downloaded: boolean, 
/**
 * Bytes of the variant's own files (adapter, config), without the shared base.
 */
sizeBytes: number | null, };

/**
 * `ModelEntry`.
 */
export type ModelEntry = { 
/**
 * Hub id (`owner/name`) or, for an imported folder, its absolute path.
 */
repoId: string, 
/**
 * Display name.
 */
title: string, 
/**
 * Where the entry comes from.
 */
source: ModelSource, 
/**
 * One line about it.
 */
description: string, 
/**
 * `None` until the repository has been listed (or a variant downloaded).
 */
variants: Array<VariantEntry> | null, 
/**
 * The base model of the variants, when known.
 */
baseModel: string | null, 
/**
 * Bytes of that base model, which every variant needs beside its own files (downloaded
 * once, shared by the variants), when known.
 */
baseSizeBytes: number | null, };

/**
 * `DownloadEvent`.
 */
export type DownloadEvent = { "kind": "progress", 
/**
 * The current file, relative to its repository.
 */
file: string, 
/**
 * Bytes of it on disk.
 */
fileBytes: number, 
/**
 * Its size.
 */
fileTotal: number, 
/**
 * Bytes of the whole download complete.
 */
bytes: number, 
/**
 * Bytes of the whole download.
 */
total: number, 
/**
 * Recent speed.
 */
bytesPerSec: number, } | { "kind": "done" } | { "kind": "cancelled" } | { "kind": "error", 
/**
 * For people.
 */
message: string, 
/**
 * The error kind (`network`, `auth`, `disk_full`, `download`...).
 */
errorKind: ErrorKind, };

/**
 * `Settings.sampling`.
 */
export type Sampling = { 
/**
 * Softmax temperature (0: greedy).
 */
temperature: number, 
/**
 * Top-k (0: off).
 */
topK: number, 
/**
 * Nucleus threshold (1: off).
 */
topP: number, 
/**
 * Min-p (0: off).
 */
minP: number, 
/**
 * Repetition penalty (1: off).
 */
repeatPenalty: number, 
/**
 * Tokens the penalty looks back on.
 */
repeatLastN: number, 
/**
 * Answer length limit.
 */
maxNewTokens: number, 
/**
 * Fixed seed, or a fresh one per answer.
 */
seed: number | null, };

/**
 * `Settings.apiServer`: the local OpenAI-compatible API server.
 */
export type ApiServerSettings = { 
/**
 * Whether it runs (serving the model chosen in Settings).
 */
enabled: boolean, 
/**
 * Its port on 127.0.0.1 (0: any free port).
 */
port: number, 
/**
 * The key clients must send as `Authorization: Bearer <key>` ("" for none).
 */
apiKey: string, };

/**
 * `Settings`. Numbers are `f64` on the way in so that a wrong value is reported by field
 * (`invalid_settings`) rather than as a deserialization failure.
 */
export type Settings = { 
/**
 * Model (hub id or imported folder).
 */
modelRepo: string | null, 
/**
 * Variant of that model.
 */
variant: string | null, 
/**
 * `auto`, `cpu`, `cuda`, `metal`.
 */
device: Device, 
/**
 * Sampling parameters.
 */
sampling: Sampling, 
/**
 * System prompt ("" for none).
 */
systemPrompt: string, 
/**
 * Softmax window (`None`: the model's).
 */
windowSize: number | null, 
/**
 * `light`, `dark`, `system`.
 */
theme: Theme, 
/**
 * The local OpenAI-compatible API server (off by default).
 */
apiServer: ApiServerSettings, 
/**
 * How memories store their softmax keys and values: `f32` (exact) or `f16` (half the
 * memory). New memories and memories reopened from a snapshot use it.
 */
kvFormat: KvFormat, 
/**
 * Whether a Hugging Face token is stored (ignored on the way in).
 */
hfTokenSet: boolean, };

/**
 * `ApiServerStatus`: what the local API server is doing.
 */
export type ApiServerStatus = { "state": "off" } | { "state": "listening", 
/**
 * The base URL clients use (`http://127.0.0.1:PORT/v1`).
 */
url: string, 
/**
 * The model id requests name (the model chosen in Settings), if any is chosen.
 */
modelId: string | null, 
/**
 * Requests answered since it started.
 */
served: number, } | { "state": "failed", 
/**
 * What went wrong and what to do.
 */
message: string, };

/**
 * `device_info()`.
 */
export type DeviceInfo = { 
/**
 * Devices compiled into this build (`cpu` always; `cuda`, `metal` with their features).
 */
compiled: Array<string>, 
/**
 * The device the loaded model runs on, else the one the setting would pick now.
 */
inUse: string, 
/**
 * For people, e.g. `CPU (16 threads)` or `CUDA device 0`.
 */
name: string, };

/**
 * `ConversationSummary`.
 */
export type ConversationSummary = { 
/**
 * Id.
 */
id: string, 
/**
 * Title.
 */
title: string, 
/**
 * ISO 8601.
 */
updatedAt: string, 
/**
 * Model of the last answer (or chosen when it was created).
 */
modelRepo: string | null, 
/**
 * Its variant.
 */
variant: string | null, 
/**
 * The start of the last message (or of the search hit).
 */
preview: string, 
/**
 * Listed first.
 */
pinned: boolean, 
/**
 * In the archived list, not the main one.
 */
archived: boolean, };

/**
 * `Stats`.
 */
export type Stats = { 
/**
 * Tokens fed before generating (the turn's prompt: what it added to the memory).
 */
promptTokens: number, 
/**
 * Tokens generated.
 */
generatedTokens: number, 
/**
 * Time to the first generated token from the moment the prompt began to be read (its
 * reading included; the model's loading, `load_ms`, not).
 */
ttftMs: number, 
/**
 * Prompt tokens per second.
 */
prefillTokensPerS: number, 
/**
 * Generated tokens per second after the first.
 */
decodeTokensPerS: number, 
/**
 * How long loading the model took, when this turn loaded it (absent from answers saved
 * before it was recorded).
 */
loadMs: number | null, };

/**
 * `MemoryHealth.verdict`: [`tptt_engine::Health`] on the wire.
 */
export type MemoryVerdict = "unknown" | "healthy" | "strained" | "broken";

/**
 * `MemoryHealth`: the model's surprise on the text its memory read, as perplexities — over
 * the conversation's start and over the recent samples — and the verdict on their ratio
 * (`tptt_engine::health`). `null` figures until enough text was read.
 */
export type MemoryHealth = { 
/**
 * The verdict.
 */
verdict: MemoryVerdict, 
/**
 * Perplexity over the conversation's start.
 */
earlyPerplexity: number | null, 
/**
 * Perplexity over the recent samples.
 */
recentPerplexity: number | null, 
/**
 * `recentPerplexity / earlyPerplexity`.
 */
ratio: number | null, };

/**
 * `MemoryInfo`: the softmax window's fill, what lives only in the recurrent memory, and the
 * memory's health.
 */
export type MemoryInfo = { 
/**
 * Positions the softmax KV window holds at most (0 when unknown).
 */
windowSize: number, 
/**
 * Positions it holds now.
 */
windowFill: number, 
/**
 * Tokens read earlier than the window: they live only in the linear (recurrent) memory.
 */
recurrentOnlyTokens: number, 
/**
 * Tokens the conversation's memory has read in all.
 */
totalTokens: number, 
/**
 * The model's surprise on what it read (absent from sidecars written before it existed:
 * `unknown`).
 */
health: MemoryHealth, };

/**
 * `Versions`: a position's versions (what regenerate and edit replaced is kept).
 */
export type Versions = { 
/**
 * The version shown, from 1.
 */
current: number, 
/**
 * How many there are (at least 2).
 */
total: number, };

/**
 * `Attachment`: a document attached to a message.
 */
export type Attachment = { 
/**
 * The file's name.
 */
name: string, 
/**
 * `text`, `markdown`, `code`, `html` or `pdf`.
 */
kind: string, 
/**
 * The file's size.
 */
bytes: number, 
/**
 * Characters of its text.
 */
chars: number, };

/**
 * `DocumentInfo`: a document chosen to attach — where it is (sent back with the message) and
 * what its attachment will show; its text stays in the backend.
 */
export type DocumentInfo = { 
/**
 * Where it is.
 */
path: string, 
/**
 * The file's name.
 */
name: string, 
/**
 * `text`, `markdown`, `code`, `html` or `pdf`.
 */
kind: string, 
/**
 * The file's size.
 */
bytes: number, 
/**
 * Characters of its text.
 */
chars: number, };

/**
 * `Message`.
 */
export type Message = { 
/**
 * Id.
 */
id: string, 
/**
 * `user`, `assistant`, `system`.
 */
role: Role, 
/**
 * The text, verbatim.
 */
content: string, 
/**
 * `complete`, `partial`, `error`.
 */
status: MessageStatus, 
/**
 * Why an answer is not complete, when known: the failure of an `error` answer, or, on a
 * `partial` one, that the app closed while it was written (it is then shown as
 * interrupted, not as stopped).
 */
error: string | null, 
/**
 * Generation statistics of an answer.
 */
stats: Stats | null, 
/**
 * ISO 8601.
 */
createdAt: string, 
/**
 * The versions of the continuation this message starts, when regenerate or edit made
 * more than one (`switch_version` shows another).
 */
versions: Versions | null, 
/**
 * The document attached to it: `content` is then the text typed with it, the document's
 * text (which the model read) is not sent.
 */
attachment: Attachment | null, };

/**
 * `ChatModel`: a model (hub id or imported folder, as `ModelEntry.repoId`) and its variant.
 */
export type ChatModel = { 
/**
 * The model.
 */
repoId: string, 
/**
 * Its variant.
 */
variant: string, };

/**
 * `ChatSettings`: one conversation's own settings. `null` follows the app's (`Settings`), so
 * a chat without settings of its own changes with them.
 */
export type ChatSettings = { 
/**
 * This chat's model and variant, or `null` for the app's.
 */
model: ChatModel | null, 
/**
 * This chat's softmax window (tokens), or `null` for the app's.
 */
windowSize: number | null, 
/**
 * This chat's system prompt ("" for none), or `null` for the app's.
 */
systemPrompt: string | null, 
/**
 * This chat's sampling, or `null` for the app's.
 */
sampling: Sampling | null, };

/**
 * What `set_conversation_settings` did.
 */
export type ChatSettingsSaved = { 
/**
 * The settings as stored.
 */
settings: ChatSettings, 
/**
 * Whether the conversation's memory was dropped (its system prompt or window changed: the
 * memory was built with the old one), so its next message reads the whole conversation
 * again.
 */
rebuilt: boolean, 
/**
 * The memory meter after the change.
 */
memory: MemoryInfo, };

/**
 * `Conversation`.
 */
export type Conversation = { 
/**
 * Id.
 */
id: string, 
/**
 * Title.
 */
title: string, 
/**
 * Model.
 */
modelRepo: string | null, 
/**
 * Variant.
 */
variant: string | null, 
/**
 * Messages in order.
 */
messages: Array<Message>, 
/**
 * The conversation's memory as last saved (or as held now).
 */
memory: MemoryInfo, 
/**
 * Its own settings (what is `null` there follows the app's).
 */
settings: ChatSettings, };

/**
 * `SavedMemory`: a primed memory of the library (`list_memories`).
 */
export type SavedMemory = { 
/**
 * Id.
 */
id: string, 
/**
 * Its name.
 */
name: string, 
/**
 * The model it was saved with (only it, with the same variant, can use it).
 */
modelRepo: string, 
/**
 * That model's variant.
 */
variant: string, 
/**
 * Tokens it has read.
 */
tokens: number, 
/**
 * Its file's size.
 */
sizeBytes: number, 
/**
 * The title of the chat it was saved from.
 */
sourceTitle: string, 
/**
 * ISO 8601.
 */
createdAt: string, };

/**
 * `BackupSummary`: what `export_backup` wrote.
 */
export type BackupSummary = { 
/**
 * Conversations written.
 */
conversations: number, 
/**
 * Of which with their memory state.
 */
states: number, 
/**
 * The file's size.
 */
bytes: number, 
/**
 * Where.
 */
path: string, };

/**
 * `ImportSummary`: what `import_backup` brought in.
 */
export type ImportSummary = { 
/**
 * Conversations imported (new ones; nothing that existed was touched).
 */
conversations: number, 
/**
 * Of which with their memory state (they reopen without re-reading on the same model).
 */
states: number, };

/**
 * `ChatEvent`, streamed through the `onEvent` channel of the chat commands.
 */
export type ChatEvent = { "kind": "started", 
/**
 * Memory before the turn.
 */
memory: MemoryInfo, 
/**
 * Tokens of the prompt the turn is about to read.
 */
promptTokens: number, 
/**
 * How long loading the model took, when this turn loaded it (`null` when it was
 * loaded already). Not part of the time to first token.
 */
loadMs: number | null, } | { "kind": "prefill", 
/**
 * Prompt tokens read so far.
 */
read: number, 
/**
 * Prompt tokens in all.
 */
total: number, 
/**
 * Since the prompt began to be read.
 */
elapsedMs: number, 
/**
 * The memory after the tokens read so far (the health as before the turn).
 */
memory: MemoryInfo, } | { "kind": "memory", 
/**
 * Memory after the prompt.
 */
memory: MemoryInfo, } | { "kind": "token", 
/**
 * The piece (whole UTF-8 characters).
 */
text: string, 
/**
 * Tokens generated so far (each one read into the memory too): the piece may be the
 * text of several.
 */
generated: number, } | { "kind": "done", 
/**
 * Statistics.
 */
stats: Stats, 
/**
 * Memory after the turn.
 */
memory: MemoryInfo, } | { "kind": "stopped", 
/**
 * Statistics.
 */
stats: Stats, 
/**
 * Memory after the turn.
 */
memory: MemoryInfo, } | { "kind": "error", 
/**
 * For people.
 */
message: string, 
/**
 * The text generated before the failure.
 */
partial: string, 
/**
 * The error kind (`model_load`, `no_model`, `generation`, `database`...).
 */
errorKind: ErrorKind, };

/**
 * `send_message` / `edit_and_resend` result.
 */
export type SendResult = { 
/**
 * The stored user message.
 */
userMessageId: string, 
/**
 * The answer being generated (stored as `partial` until it ends).
 */
assistantMessageId: string, };

/**
 * `regenerate` result.
 */
export type RegenerateResult = { 
/**
 * The new answer.
 */
assistantMessageId: string, };

/**
 * How `export_conversation` writes a conversation (its `format` argument).
 */
export type ExportFormat = "markdown" | "json";

/**
 * `LaunchEvent`, emitted as the event [`LAUNCH_EVENT`] when the app is started again with
 * `--model FOLDER` while it runs: the running app follows that command line.
 */
export type LaunchEvent = { "kind": "modelChosen", 
/**
 * The folder's id (its canonical path).
 */
repoId: string, 
/**
 * The variant chosen.
 */
variant: string, } | { "kind": "error", 
/**
 * For people.
 */
message: string, };

/** Every `ErrorKind`, for telling a command's error from anything else. */
export const ERROR_KINDS: readonly ErrorKind[] = ["no_model", "model_load", "download", "network", "auth", "disk_full", "invalid_settings", "invalid_repo_id", "not_a_tptt_repo", "not_found", "busy", "database", "generation", "input_too_long", "internal"];

/** The event that carries a `LaunchEvent` (the app started again with `--model`). */
export const LAUNCH_EVENT = "launch";

// ---- Commands ----

/**
 * Every command of the IPC (src-tauri/src/ipc_commands.rs): its arguments and its result.
 * `api.ts` calls them through this, so a call that no longer fits fails the type check.
 */
export interface Commands {
  list_models: { args: Record<string, never>; result: Array<ModelEntry> };
  refresh_variants: { args: { repoId: string }; result: Array<VariantEntry> };
  add_model: { args: { repoId: string }; result: ModelEntry };
  import_local_model: { args: { path: string }; result: ModelEntry };
  pick_model_folder: { args: Record<string, never>; result: string | null };
  download_variant: { args: { repoId: string; variant: string; onEvent: Channel<DownloadEvent> }; result: null };
  cancel_download: { args: { repoId: string; variant: string }; result: null };
  remove_variant: { args: { repoId: string; variant: string }; result: null };
  get_settings: { args: Record<string, never>; result: Settings };
  set_settings: { args: { settings: Settings }; result: Settings };
  set_hf_token: { args: { token: string | null }; result: null };
  api_server_status: { args: Record<string, never>; result: ApiServerStatus };
  device_info: { args: Record<string, never>; result: DeviceInfo };
  list_conversations: { args: { query: string | null }; result: Array<ConversationSummary> };
  list_archived_conversations: { args: Record<string, never>; result: Array<ConversationSummary> };
  set_conversation_pinned: { args: { id: string; pinned: boolean }; result: ConversationSummary };
  set_conversation_archived: { args: { id: string; archived: boolean }; result: ConversationSummary };
  create_conversation: { args: Record<string, never>; result: ConversationSummary };
  get_conversation: { args: { id: string }; result: Conversation };
  set_conversation_settings: { args: { id: string; settings: ChatSettings }; result: ChatSettingsSaved };
  branch_conversation: { args: { id: string; messageId: string }; result: ConversationSummary };
  save_memory: { args: { conversationId: string; name: string }; result: SavedMemory };
  list_memories: { args: Record<string, never>; result: Array<SavedMemory> };
  rename_memory: { args: { id: string; name: string }; result: null };
  delete_memory: { args: { id: string }; result: null };
  new_chat_from_memory: { args: { id: string }; result: ConversationSummary };
  switch_version: { args: { conversationId: string; messageId: string; version: number }; result: Conversation };
  rename_conversation: { args: { id: string; title: string }; result: null };
  delete_conversation: { args: { id: string }; result: null };
  export_conversation: { args: { id: string; format: ExportFormat }; result: string };
  save_conversation: { args: { id: string; format: ExportFormat }; result: string | null };
  export_backup: { args: { includeStates: boolean }; result: BackupSummary | null };
  import_backup: { args: Record<string, never>; result: ImportSummary | null };
  open_logs_folder: { args: Record<string, never>; result: string };
  send_message: { args: { conversationId: string; content: string; onEvent: Channel<ChatEvent> }; result: SendResult };
  pick_document: { args: Record<string, never>; result: DocumentInfo | null };
  inspect_document: { args: { path: string }; result: DocumentInfo };
  send_document: { args: { conversationId: string; path: string; content: string; onEvent: Channel<ChatEvent> }; result: SendResult };
  regenerate: { args: { conversationId: string; onEvent: Channel<ChatEvent> }; result: RegenerateResult };
  edit_and_resend: { args: { conversationId: string; messageId: string; content: string; onEvent: Channel<ChatEvent> }; result: SendResult };
  stop_generation: { args: { conversationId: string }; result: null };
  reset_memory: { args: { conversationId: string }; result: MemoryInfo };
  open_url: { args: { url: string }; result: null };
}

// ---- Bounds the backend enforces (src/settings.rs) ----

/** The largest values `set_settings` accepts (the smallest are 0, or 1 for maxNewTokens and windowSize). */
export const SETTINGS_LIMITS = {
  maxNewTokens: 65536,
  topK: 100000,
  repeatLastN: 65536,
  seed: 9007199254740991,
  windowSize: 1048576,
  systemPromptBytes: 65536,
} as const;
