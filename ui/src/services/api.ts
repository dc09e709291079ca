// The services layer: one typed function per command of docs/ipc.md, stateless. Every rejection
// becomes an `ApiError` with the contract's `kind`, so stores and components never see Tauri's
// raw error shapes. Streams are `Channel`s whose handler is set before the command is sent (a
// handler set later would miss the first messages).

import { Channel, invoke } from '@tauri-apps/api/core';
import type {
  ChatEvent,
  CommandError,
  Conversation,
  ConversationSummary,
  DeviceInfo,
  DownloadEvent,
  ErrorKind,
  ExportFormat,
  MemoryInfo,
  ModelEntry,
  RegenerateResult,
  SendResult,
  Settings,
  VariantEntry,
} from './types';

const KINDS: ReadonlySet<string> = new Set<ErrorKind>([
  'no_model',
  'model_load',
  'download',
  'network',
  'auth',
  'disk_full',
  'invalid_settings',
  'invalid_repo_id',
  'not_a_tptt_repo',
  'not_found',
  'busy',
  'database',
  'generation',
  'input_too_long',
  'internal',
]);

/** A command's failure, as the contract describes it: `{ kind, message }`. */
export class ApiError extends Error implements CommandError {
  readonly kind: ErrorKind;
  /** The command that failed, for logs. */
  readonly command: string;

  constructor(kind: ErrorKind, message: string, command = '') {
    super(message);
    this.name = 'ApiError';
    this.kind = kind;
    this.command = command;
  }
}

/** Turns whatever `invoke` rejected with into an `ApiError`. */
export function toApiError(err: unknown, command = ''): ApiError {
  if (err instanceof ApiError) return err;
  if (typeof err === 'object' && err !== null && 'kind' in err && 'message' in err) {
    const { kind, message } = err as { kind: unknown; message: unknown };
    const k = typeof kind === 'string' && KINDS.has(kind) ? (kind as ErrorKind) : 'internal';
    return new ApiError(k, String(message), command);
  }
  if (err instanceof TypeError && !('__TAURI_INTERNALS__' in window)) {
    return new ApiError(
      'internal',
      'The app backend is not available (run the UI inside TPTT Chat, or use npm run dev:mock).',
      command,
    );
  }
  if (typeof err === 'string') return new ApiError('internal', err, command);
  return new ApiError('internal', err instanceof Error ? err.message : String(err), command);
}

async function call<T>(command: string, args?: Record<string, unknown>): Promise<T> {
  try {
    return await invoke<T>(command, args);
  } catch (err) {
    throw toApiError(err, command);
  }
}

function channel<E>(onEvent: (event: E) => void): Channel<E> {
  return new Channel<E>(onEvent);
}

// ---- Models -------------------------------------------------------------------------------

export const listModels = () => call<ModelEntry[]>('list_models');

export const refreshVariants = (repoId: string) =>
  call<VariantEntry[]>('refresh_variants', { repoId });

export const addModel = (repoId: string) => call<ModelEntry>('add_model', { repoId });

export const importLocalModel = (path: string) => call<ModelEntry>('import_local_model', { path });

/** Starts a download and returns once it is under way; progress arrives through `onEvent`. */
export const downloadVariant = (
  repoId: string,
  variant: string,
  onEvent: (event: DownloadEvent) => void,
) => call<void>('download_variant', { repoId, variant, onEvent: channel(onEvent) });

export const cancelDownload = (repoId: string, variant: string) =>
  call<void>('cancel_download', { repoId, variant });

export const removeVariant = (repoId: string, variant: string) =>
  call<void>('remove_variant', { repoId, variant });

// ---- Settings -----------------------------------------------------------------------------

export const getSettings = () => call<Settings>('get_settings');

export const setSettings = (settings: Settings) => call<Settings>('set_settings', { settings });

/** Stores (or with null, forgets) the Hugging Face token. It is never read back. */
export const setHfToken = (token: string | null) => call<void>('set_hf_token', { token });

export const deviceInfo = () => call<DeviceInfo>('device_info');

// ---- Conversations ------------------------------------------------------------------------

export const listConversations = (query: string | null) =>
  call<ConversationSummary[]>('list_conversations', { query });

export const createConversation = () => call<ConversationSummary>('create_conversation');

export const getConversation = (id: string) => call<Conversation>('get_conversation', { id });

export const renameConversation = (id: string, title: string) =>
  call<void>('rename_conversation', { id, title });

export const deleteConversation = (id: string) => call<void>('delete_conversation', { id });

export const exportConversation = (id: string, format: ExportFormat) =>
  call<string>('export_conversation', { id, format });

/**
 * Exports a conversation to a file the user picks in the native save dialog. Resolves with the
 * file's path, or null when the dialog was cancelled.
 */
export const saveConversation = (id: string, format: ExportFormat) =>
  call<string | null>('save_conversation', { id, format });

// ---- Chat ---------------------------------------------------------------------------------

export const sendMessage = (
  conversationId: string,
  content: string,
  onEvent: (event: ChatEvent) => void,
) => call<SendResult>('send_message', { conversationId, content, onEvent: channel(onEvent) });

export const regenerate = (conversationId: string, onEvent: (event: ChatEvent) => void) =>
  call<RegenerateResult>('regenerate', { conversationId, onEvent: channel(onEvent) });

export const editAndResend = (
  conversationId: string,
  messageId: string,
  content: string,
  onEvent: (event: ChatEvent) => void,
) =>
  call<SendResult>('edit_and_resend', {
    conversationId,
    messageId,
    content,
    onEvent: channel(onEvent),
  });

export const stopGeneration = (conversationId: string) =>
  call<void>('stop_generation', { conversationId });

/**
 * "Continue with a fresh memory": the conversation's memory is dropped; its next turn rebuilds it
 * from the text's tail (at most the window, at most 1024 tokens). Resolves with the (empty)
 * memory meter.
 */
export const resetMemory = (conversationId: string) =>
  call<MemoryInfo>('reset_memory', { conversationId });

// ---- App ----------------------------------------------------------------------------------

/** The native folder dialog: the folder chosen (to import), or null when cancelled. */
export const pickModelFolder = () => call<string | null>('pick_model_folder');

/** Opens the app's log folder in the system's file manager; resolves with its path. */
export const openLogsFolder = () => call<string>('open_logs_folder');

/** Opens an http(s) or mailto link in the system browser (never inside the app's webview). */
export const openUrl = (url: string) => call<void>('open_url', { url });
