// The data types of the IPC contract, docs/ipc.md, one for one. Field names are the wire's
// (camelCase). Nothing here knows Svelte or the DOM.

// ---- Errors -------------------------------------------------------------------------------

export type ErrorKind =
  | 'no_model'
  | 'model_load'
  | 'download'
  | 'network'
  | 'auth'
  | 'disk_full'
  | 'invalid_settings'
  | 'invalid_repo_id'
  | 'not_a_tptt_repo'
  | 'not_found'
  | 'busy'
  | 'database'
  | 'generation'
  | 'input_too_long'
  | 'internal';

/** What every command rejects with. */
export interface CommandError {
  kind: ErrorKind;
  message: string;
}

// ---- Models -------------------------------------------------------------------------------

export type ModelSource = 'catalog' | 'added' | 'local' | 'cache';

export interface VariantEntry {
  name: string;
  operatorMode: string;
  downloaded: boolean;
  sizeBytes: number | null;
}

export interface ModelEntry {
  repoId: string;
  title: string;
  source: ModelSource;
  description: string;
  /** null until the repo's files have been listed (refresh_variants). */
  variants: VariantEntry[] | null;
  baseModel: string | null;
  /** Bytes of the base model every variant needs beside its own files (shared), when known. */
  baseSizeBytes: number | null;
}

export type DownloadEvent =
  | {
      kind: 'progress';
      file: string;
      fileBytes: number;
      fileTotal: number;
      bytes: number;
      total: number;
      bytesPerSec: number;
    }
  | { kind: 'done' }
  | { kind: 'cancelled' }
  | { kind: 'error'; errorKind?: ErrorKind; message: string };

// ---- Settings -----------------------------------------------------------------------------

export type Device = 'auto' | 'cpu' | 'cuda' | 'metal';
export type Theme = 'light' | 'dark' | 'system';

export interface Sampling {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repeatPenalty: number;
  repeatLastN: number;
  maxNewTokens: number;
  seed: number | null;
}

export interface Settings {
  modelRepo: string | null;
  variant: string | null;
  device: Device;
  sampling: Sampling;
  systemPrompt: string;
  /** null: the model's own softmax window. */
  windowSize: number | null;
  theme: Theme;
  /** Whether a Hugging Face token is stored; the token itself is never sent to the UI. */
  hfTokenSet: boolean;
}

export interface DeviceInfo {
  compiled: string[];
  inUse: string;
  name: string;
}

// ---- Conversations ------------------------------------------------------------------------

export interface ConversationSummary {
  id: string;
  title: string;
  /** ISO 8601. */
  updatedAt: string;
  modelRepo: string | null;
  variant: string | null;
  preview: string;
}

export type Role = 'user' | 'assistant' | 'system';
export type MessageStatus = 'complete' | 'partial' | 'error';

export interface Stats {
  /** Prompt tokens read (when stopped while reading it, as many as were read). */
  promptTokens: number;
  generatedTokens: number;
  /** From the moment the prompt began to be read to the first token (model loading excluded). */
  ttftMs: number;
  prefillTokensPerS: number;
  decodeTokensPerS: number;
  /** How long loading the model took, when this answer's turn loaded it. */
  loadMs: number | null;
}

export type MemoryVerdict = 'unknown' | 'healthy' | 'strained' | 'broken';

/**
 * The model's surprise on the text its memory read, as perplexities over the conversation's start
 * and over the recent text (null until enough was read), and the verdict on their ratio.
 */
export interface MemoryHealth {
  verdict: MemoryVerdict;
  earlyPerplexity: number | null;
  recentPerplexity: number | null;
  /** recentPerplexity / earlyPerplexity. */
  ratio: number | null;
}

/** The softmax window's fill, how many earlier tokens live only in the recurrent memory, and its health. */
export interface MemoryInfo {
  windowSize: number;
  windowFill: number;
  recurrentOnlyTokens: number;
  totalTokens: number;
  health: MemoryHealth;
}

export interface Message {
  id: string;
  role: Role;
  content: string;
  status: MessageStatus;
  /**
   * Why an answer is not complete, when known: the failure of an `error` answer; on a `partial`
   * one, that the app closed while it was written (shown as interrupted, not as stopped).
   */
  error: string | null;
  stats: Stats | null;
  createdAt: string;
}

export interface Conversation {
  id: string;
  title: string;
  modelRepo: string | null;
  variant: string | null;
  messages: Message[];
  memory: MemoryInfo;
}

export type ExportFormat = 'markdown' | 'json';

// ---- Chat ---------------------------------------------------------------------------------

export type ChatEvent =
  | { kind: 'started'; memory: MemoryInfo; promptTokens: number; loadMs: number | null }
  /** Part of a long prompt has been read: how far, how long it took, and the memory now. */
  | { kind: 'prefill'; read: number; total: number; elapsedMs: number; memory: MemoryInfo }
  /** The prompt has been read (before the first token): the memory after it, with its health. */
  | { kind: 'memory'; memory: MemoryInfo }
  /** `generated`: tokens generated so far (a piece may hold several). */
  | { kind: 'token'; text: string; generated: number }
  | { kind: 'done'; stats: Stats; memory: MemoryInfo }
  | { kind: 'stopped'; stats: Stats; memory: MemoryInfo }
  | { kind: 'error'; errorKind?: ErrorKind; message: string; partial: string };

export interface SendResult {
  userMessageId: string;
  assistantMessageId: string;
}

export interface RegenerateResult {
  assistantMessageId: string;
}
