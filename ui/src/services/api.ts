// The services layer: one typed function per command of docs/ipc.md, stateless. Every rejection
// becomes an `ApiError` with the contract's `kind`, so stores and components never see Tauri's
// raw error shapes. Streams are `Channel`s whose handler is set before the command is sent (a
// handler set later would miss the first messages).

import { Channel, invoke, type InvokeArgs } from '@tauri-apps/api/core';
import { listen, type UnlistenFn } from '@tauri-apps/api/event';
import { getCurrentWebview } from '@tauri-apps/api/webview';
import { ERROR_KINDS, LAUNCH_EVENT, type Commands } from './ipc.gen';
import type {
  ChatEvent,
  ChatSettings,
  LaunchEvent,
  CommandError,
  DownloadEvent,
  ErrorKind,
  ExportFormat,
  Settings,
} from './types';

const KINDS: ReadonlySet<string> = new Set<string>(ERROR_KINDS);

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

type Name = keyof Commands;
type Args<K extends Name> = Commands[K]['args'];
/** A command's arguments, or none when it takes none. */
type ArgList<K extends Name> = Args<K> extends Record<string, never> ? [] : [args: Args<K>];

/**
 * Invokes `command` with the arguments and result its generated signature (`Commands`, from the
 * Rust declarations) gives it: a call that no longer fits the backend fails the type check.
 */
async function call<K extends Name>(command: K, ...args: ArgList<K>): Promise<Commands[K]['result']> {
  try {
    return await invoke<Commands[K]['result']>(command, args[0] as InvokeArgs | undefined);
  } catch (err) {
    throw toApiError(err, command);
  }
}

function channel<E>(onEvent: (event: E) => void): Channel<E> {
  return new Channel<E>(onEvent);
}

// ---- Models -------------------------------------------------------------------------------

export const listModels = () => call('list_models');

export const refreshVariants = (repoId: string) =>
  call('refresh_variants', { repoId });

export const addModel = (repoId: string) => call('add_model', { repoId });

export const importLocalModel = (path: string) => call('import_local_model', { path });

/** Starts a download and returns once it is under way; progress arrives through `onEvent`. */
export const downloadVariant = (
  repoId: string,
  variant: string,
  onEvent: (event: DownloadEvent) => void,
) => call('download_variant', { repoId, variant, onEvent: channel(onEvent) });

export const cancelDownload = (repoId: string, variant: string) =>
  call('cancel_download', { repoId, variant });

export const removeVariant = (repoId: string, variant: string) =>
  call('remove_variant', { repoId, variant });

// ---- Settings -----------------------------------------------------------------------------

export const getSettings = () => call('get_settings');

export const setSettings = (settings: Settings) => call('set_settings', { settings });

/** Stores (or with null, forgets) the Hugging Face token. It is never read back. */
export const setHfToken = (token: string | null) => call('set_hf_token', { token });

export const deviceInfo = () => call('device_info');

/** Whether the local API server listens, where, or why it cannot. */
export const apiServerStatus = () => call('api_server_status');

// ---- Conversations ------------------------------------------------------------------------

export const listConversations = (query: string | null) =>
  call('list_conversations', { query });

export const createConversation = () => call('create_conversation');

export const getConversation = (id: string) => call('get_conversation', { id });

/**
 * A conversation's own system prompt and sampling (`null`: the app's). `rebuilt` says its memory
 * was dropped (the system prompt it uses changed), so the next message reads it all again.
 */
export const setConversationSettings = (id: string, settings: ChatSettings) =>
  call('set_conversation_settings', { id, settings });

/**
 * "Branch from here": a new conversation, a copy of `id` up to and including `messageId`, that
 * continues from that message's saved state when there is one (else it reads the text again).
 */
export const branchConversation = (id: string, messageId: string) =>
  call('branch_conversation', { id, messageId });

export const listArchivedConversations = () => call('list_archived_conversations');

export const setConversationPinned = (id: string, pinned: boolean) =>
  call('set_conversation_pinned', { id, pinned });

export const setConversationArchived = (id: string, archived: boolean) =>
  call('set_conversation_archived', { id, archived });

/** Saves the conversation's memory (as after its last answer) under `name`. */
export const saveMemory = (conversationId: string, name: string) => call('save_memory', { conversationId, name });

export const listMemories = () => call('list_memories');

export const renameMemory = (id: string, name: string) => call('rename_memory', { id, name });

export const deleteMemory = (id: string) => call('delete_memory', { id });

/** A new chat whose memory starts as the saved one. */
export const newChatFromMemory = (id: string) => call('new_chat_from_memory', { id });

/** A document chosen in the open dialog, read and checked; null when cancelled. */
export const pickDocument = () => call('pick_document');

/** The document at `path` (a file dropped on the window), read and checked. */
export const inspectDocument = (path: string) => call('inspect_document', { path });

/**
 * Calls `handler` with the paths of files dropped on the window (Tauri takes the OS drop: the
 * page sees no HTML drop event for files). Resolves with the way to stop listening.
 */
export async function onFileDrop(handler: (paths: string[]) => void): Promise<UnlistenFn> {
  return getCurrentWebview().onDragDropEvent((event) => {
    if (event.payload.type === 'drop' && event.payload.paths.length > 0) handler(event.payload.paths);
  });
}

/** Sends the document at `path` with `content` (the question; may be empty) as one message. */
export const sendDocument = (
  conversationId: string,
  path: string,
  content: string,
  onEvent: (event: ChatEvent) => void,
) => call('send_document', { conversationId, path, content, onEvent: channel(onEvent) });

/** Backs up every conversation into a file chosen in the save dialog; null when cancelled. */
export const exportBackup = (includeStates: boolean) => call('export_backup', { includeStates });

/** Imports a backup chosen in the open dialog, as new conversations; null when cancelled. */
export const importBackup = () => call('import_backup');

/** Shows version `version` of the continuation `messageId` starts; the conversation as it is then. */
export const switchVersion = (conversationId: string, messageId: string, version: number) =>
  call('switch_version', { conversationId, messageId, version });

export const renameConversation = (id: string, title: string) =>
  call('rename_conversation', { id, title });

export const deleteConversation = (id: string) => call('delete_conversation', { id });

export const exportConversation = (id: string, format: ExportFormat) =>
  call('export_conversation', { id, format });

/**
 * Exports a conversation to a file the user picks in the native save dialog. Resolves with the
 * file's path, or null when the dialog was cancelled.
 */
export const saveConversation = (id: string, format: ExportFormat) =>
  call('save_conversation', { id, format });

// ---- Chat ---------------------------------------------------------------------------------

export const sendMessage = (
  conversationId: string,
  content: string,
  onEvent: (event: ChatEvent) => void,
) => call('send_message', { conversationId, content, onEvent: channel(onEvent) });

export const regenerate = (conversationId: string, onEvent: (event: ChatEvent) => void) =>
  call('regenerate', { conversationId, onEvent: channel(onEvent) });

export const editAndResend = (
  conversationId: string,
  messageId: string,
  content: string,
  onEvent: (event: ChatEvent) => void,
) =>
  call('edit_and_resend', {
    conversationId,
    messageId,
    content,
    onEvent: channel(onEvent),
  });

export const stopGeneration = (conversationId: string) =>
  call('stop_generation', { conversationId });

/**
 * "Continue with a fresh memory": the conversation's memory is dropped; its next turn rebuilds it
 * from the text's tail (at most the window, at most 1024 tokens). Resolves with the (empty)
 * memory meter.
 */
export const resetMemory = (conversationId: string) =>
  call('reset_memory', { conversationId });

// ---- App ----------------------------------------------------------------------------------

/** The native folder dialog: the folder chosen (to import), or null when cancelled. */
export const pickModelFolder = () => call('pick_model_folder');

/** Opens the app's log folder in the system's file manager; resolves with its path. */
export const openLogsFolder = () => call('open_logs_folder');

/** Opens an http(s) or mailto link in the system browser (never inside the app's webview). */
export const openUrl = (url: string) => call('open_url', { url });

/**
 * Calls `handler` when the app is started again with `--model` while it runs (the running app
 * has followed that command line: the settings and models changed). Resolves with the function
 * that stops listening.
 */
export const onLaunch = (handler: (event: LaunchEvent) => void): Promise<UnlistenFn> =>
  listen<LaunchEvent>(LAUNCH_EVENT, (e) => handler(e.payload));
