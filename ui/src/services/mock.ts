// An in-memory backend implementing the whole of docs/ipc.md, installed with `mockIPC` from
// `@tauri-apps/api/mocks`. Used by `npm run dev:mock` (the UI in a plain browser) and by the
// browser tests (`npm run build:mock`). Arguments are taken as the real backend receives them: JSON
// round-tripped, channels as `__CHANNEL__:<id>` strings; channel messages go back through Tauri's
// own callback path with message indices, so ordering code in `Channel` is exercised too.
//
// Controls for tests live on `window.__tpttMock` (see `MockControl`); the starting state is picked
// by the page's `?scenario=` (`ready`, the default: a model downloaded and chosen, three
// conversations; `empty`: nothing downloaded, no conversations).
//
// Memory health: a user message that contains `[[memory:broken]]` or is longer than 12,000
// characters (a long paste, as drowns the untrained demo model) breaks the conversation's memory
// (verdict `broken` in the `memory` event of its turn, and after); `[[memory:strained]]` strains
// it. A broken or strained memory stays so until `reset_memory`.

import { emit } from '@tauri-apps/api/event';
import { mockIPC, mockWindows } from '@tauri-apps/api/mocks';
import { freshMemoryTokens } from '../lib/health';
import type {
  ApiServerStatus,
  ChatEvent,
  ChatSettings,
  ChatSettingsSaved,
  LaunchEvent,
  CommandError,
  Conversation,
  ConversationSummary,
  DeviceInfo,
  DownloadEvent,
  ErrorKind,
  MemoryHealth,
  MemoryInfo,
  Message,
  SavedMemory,
  DocumentInfo,
  BackupSummary,
  ImportSummary,
  ModelEntry,
  Settings,
  Stats,
  VariantEntry,
} from './types';
import { LAUNCH_EVENT, type Commands } from './ipc.gen';

export type Scenario = 'ready' | 'empty';

/** What the mock receives: the arguments JSON round-tripped, so a channel is its id string. */
type OnWire<T> = T extends { toJSON(): string } ? string : T;
type WireArgs<A> = { [P in keyof A]: OnWire<A[P]> };
/** A handler per command, typed by the generated signatures. */
type Handlers = {
  [K in keyof Commands]: (
    args: WireArgs<Commands[K]['args']>,
  ) => Commands[K]['result'] | Promise<Commands[K]['result']>;
};

interface Timing {
  /** Delay before the turn starts (`started`): loading the model the first time, preparing the turn, ms. */
  firstTokenMs: number;
  /** How fast a prompt is read, tokens/s (0: at once). Prompts over one block (512) send `prefill` events. */
  prefillTokensPerS: number;
  /** How long a stop takes to be confirmed (`stopped`), ms: a real model ends its block first. */
  stopMs: number;
  /** Delay between tokens, ms. */
  tokenMs: number;
  /** Progress ticks a download takes from 0 to done. */
  downloadTicks: number;
  /** Delay between progress ticks, ms. */
  downloadTickMs: number;
  /** Delay of refresh_variants (the "network"), ms. */
  listMs: number;
}

interface Generation {
  conversationId: string;
  message: Message;
  tokens: string[];
  sent: number;
  channel: string;
  timer: ReturnType<typeof setTimeout> | null;
  /** When the prompt began to be read (`started`). */
  promptStartedAt: number | null;
  /** When it was read. */
  promptReadAt: number | null;
  firstTokenAt: number | null;
  promptTokens: number;
  /** Prompt tokens read so far. */
  read: number;
  /** The memory before the turn. */
  before: MemoryInfo;
  /** The model's loading, when this turn loaded it. */
  loadMs: number | null;
  /** Stop was asked (a second stop changes nothing). */
  stopping: boolean;
  failAfter: { after: number; kind: ErrorKind; message: string } | null;
  /** Regenerate: the old answer, kept until the first token (docs/ipc.md). */
  replaces: Message | null;
}

interface Download {
  repoId: string;
  variant: string;
  channel: string;
  timer: ReturnType<typeof setInterval>;
}

interface StoredConversation {
  id: string;
  title: string;
  modelRepo: string | null;
  variant: string | null;
  updatedAt: string;
  messages: Message[];
  /** The memory's health after its last turn (absent: measured from its size). */
  health?: MemoryHealth;
  /** Tokens of the text the memory has not read (dropped by `reset_memory`). */
  unreadTokens?: number;
  /** Reset: the next turn reads only the text's tail. */
  freshMemory?: boolean;
  /** Its turns have no saved memory (an older app's chat, or another model's): a branch reads its text again. */
  noSnapshots?: boolean;
  /** Its own settings (absent: the app's). */
  settings?: ChatSettings;
  /** Tokens of the saved memory it started from (its meter starts there). */
  primedTokens?: number;
  /** Listed first. */
  pinned?: boolean;
  /** In the archived list. */
  archived?: boolean;
  /** The positions with more than one version (absent: none). */
  versions?: VersionSet[];
}

/** The versions of one position, as the store keeps them (`crates/store/src/versions.rs`). */
interface VersionSet {
  position: number;
  /** The version shown. */
  shown: number;
  /** The others: each continuation with the version sets of its later positions. */
  held: { version: number; messages: Message[]; sets: VersionSet[] }[];
}

export interface MockControl {
  /** Starts over from a scenario (closes streams and downloads silently). */
  reset(scenario?: Scenario): void;
  /** The text of the next replies (null: a built-in markdown answer). */
  setReply(text: string | null): void;
  setTiming(timing: Partial<Timing>): void;
  /** The next call of `command` rejects with `{ kind, message }`. */
  failNext(command: string, kind: ErrorKind, message?: string): void;
  /**
   * The app started again with `--model` while it runs: a `modelChosen` event chooses that
   * (listed) model and variant as the backend does, then the event reaches the UI.
   */
  launchAgain(event: LaunchEvent): Promise<void>;
  /** The next generation streams `afterTokens` tokens, then ends with an error event. */
  failGeneration(afterTokens: number, kind?: ErrorKind, message?: string): void;
  /** The next download fails with an error event at this fraction of its bytes. */
  failDownload(atFraction: number, kind?: ErrorKind, message?: string): void;
  /** Every command called so far, with its arguments (channels as strings). */
  readonly calls: { command: string; args: Record<string, unknown> }[];
  /** URLs passed to open_url. */
  readonly openedUrls: string[];
  /**
   * What the native dialogs answer from now on: a path, or null (the user cancels). Unset (the
   * default): a save dialog takes the suggested file in /home/user/Documents, a folder dialog is
   * cancelled.
   */
  setDialogAnswer(path: string | null): void;
  /** What the document dialog answers (undefined: a default Markdown file; null: cancelled). */
  setDocument(doc: DocumentInfo | null | undefined): void;
  /** Files dropped on the window, as Tauri reports them. */
  dropFiles(paths: string[]): Promise<void>;
  /** The conversation titled `title` keeps no saved memory of its turns (a branch of it reads its text). */
  forgetSnapshots(title: string): void;
  /** Files written by save_conversation, with their text. */
  readonly savedFiles: { path: string; text: string }[];
  /** Folders opened in the file manager (open_logs_folder). */
  readonly openedFolders: string[];
  /** The backend's state, for assertions. */
  readonly state: MockState;
}

interface MockState {
  models: ModelEntry[];
  settings: Settings;
  hfToken: string | null;
  conversations: StoredConversation[];
  /** Saved memories, most recent first. */
  memories: SavedMemory[];
  device: DeviceInfo;
}

declare global {
  interface Window {
    __tpttMock?: MockControl;
  }
}

// ---- Fixtures -----------------------------------------------------------------------------

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

const VARIANT_NAMES: [string, string][] = [
  ['delta_rule', 'delta_rule'],
  ['delta_product', 'delta_product'],
  ['delta_product_r', 'delta_product_r'],
  ['gated_delta_product', 'gated_delta_product'],
];

interface CatalogItem {
  repoId: string;
  title: string;
  description: string;
  baseModel: string;
  adapterBytes: number;
  baseBytes: number;
  gated: boolean;
}

const CATALOG: CatalogItem[] = [
  {
    repoId: 'ffurfaro/Titanesque-gemma-3-270m',
    title: 'Titanesque Gemma 3 270M',
    description: 'The smallest TPTT model: quick on any CPU, a good first download.',
    baseModel: 'google/gemma-3-270m',
    adapterBytes: 12 * MiB,
    baseBytes: 540 * MiB,
    gated: false,
  },
  {
    repoId: 'ffurfaro/Titans-OLMo-1B-hf',
    title: 'Titans OLMo 1B',
    description: 'OLMo 1B with a linear-attention memory; fully open weights.',
    baseModel: 'allenai/OLMo-1B-hf',
    adapterBytes: 24 * MiB,
    baseBytes: 4.7 * GiB,
    gated: false,
  },
  {
    repoId: 'ffurfaro/Titans-Llama-3.2-1B',
    title: 'Titans Llama 3.2 1B',
    description: 'Llama 3.2 1B; the base model is gated and needs a Hugging Face token.',
    baseModel: 'meta-llama/Llama-3.2-1B',
    adapterBytes: 22 * MiB,
    baseBytes: 2.5 * GiB,
    gated: true,
  },
  {
    repoId: 'ffurfaro/Titans-Qwen2.5-1.5B',
    title: 'Titans Qwen2.5 1.5B',
    description: 'Qwen2.5 1.5B with a delta-rule memory.',
    baseModel: 'Qwen/Qwen2.5-1.5B',
    adapterBytes: 30 * MiB,
    baseBytes: 3.1 * GiB,
    gated: false,
  },
  {
    repoId: 'ffurfaro/Titans-v2-Mistral-7B-v0.3',
    title: 'Titans v2 Mistral 7B v0.3',
    description: 'The largest: best answers, needs a GPU or patience.',
    baseModel: 'mistralai/Mistral-7B-v0.3',
    adapterBytes: 80 * MiB,
    baseBytes: 14.5 * GiB,
    gated: false,
  },
];

const DEFAULT_SETTINGS: Settings = {
  modelRepo: null,
  variant: null,
  device: 'auto',
  sampling: {
    temperature: 0.7,
    topK: 40,
    topP: 0.95,
    minP: 0.05,
    repeatPenalty: 1.1,
    repeatLastN: 64,
    maxNewTokens: 512,
    seed: null,
  },
  systemPrompt: 'You are a helpful assistant.',
  windowSize: null,
  theme: 'system',
  apiServer: { enabled: false, port: 8484, apiKey: '' },
  kvFormat: 'auto',
  hfTokenSet: false,
};

/** A port the mock's "other program" holds: the API server cannot listen there. */
export const MOCK_PORT_IN_USE = 8080;

/** The mock model's own softmax window when settings leave it null. */
const MODEL_WINDOW = 512;

/** A user message with this marker breaks the memory (see the module comment). */
export const BROKEN_MARKER = '[[memory:broken]]';
/** A user message with this marker strains the memory. */
export const STRAINED_MARKER = '[[memory:strained]]';
/** A user message longer than this breaks the memory too. */
const BROKEN_MESSAGE_CHARS = 12_000;

function health(verdict: MemoryHealth['verdict'], early: number, recent: number): MemoryHealth {
  return { verdict, earlyPerplexity: early, recentPerplexity: recent, ratio: recent / early };
}

const UNKNOWN: MemoryHealth = { verdict: 'unknown', earlyPerplexity: null, recentPerplexity: null, ratio: null };
/** As measured on the untrained demo after a long paste. */
const BROKEN: MemoryHealth = health('broken', 26.4, 203.7);
const STRAINED: MemoryHealth = health('strained', 26.4, 79.2);

const DEFAULT_REPLY = [
  'Here is how a **TPTT** model keeps a long chat going:',
  '',
  '1. The *softmax window* attends to the most recent tokens exactly.',
  '2. Older tokens are folded into a **linear-attention memory** of constant size.',
  '3. Reopening a chat restores that memory from a snapshot, so nothing is re-read.',
  '',
  '```rust',
  'fn step(state: &mut State, k: &[f32], v: &[f32]) {',
  '    // delta rule: S += beta * (v - S k) k^T',
  '    state.update(k, v);',
  '}',
  '```',
  '',
  'See the [paper](https://arxiv.org/abs/2506.17671) for details.',
].join('\n');

// ---- The backend --------------------------------------------------------------------------

function now(): string {
  return new Date().toISOString();
}

function clone<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

/** The device's name as the backend words it (src-tauri/src/device.rs). */
function deviceName(kind: string): string {
  return kind === 'cpu' ? 'CPU (8 threads)' : `${kind.toUpperCase()} device 0`;
}

/** `memory` after `fed` more tokens were read (negative: before they were). */
function advance(memory: MemoryInfo, fed: number): MemoryInfo {
  const totalTokens = Math.max(0, memory.totalTokens + fed);
  const windowFill = Math.min(totalTokens, memory.windowSize);
  return { ...memory, windowFill, recurrentOnlyTokens: totalTokens - windowFill, totalTokens };
}

function fail(kind: ErrorKind, message: string): CommandError {
  return { kind, message };
}

/** A rough token count (4 characters a token), enough for the memory meter. */
function countTokens(text: string): number {
  return Math.ceil(text.length / 4);
}

/** Splits a reply into word-sized tokens, whitespace kept. */
function tokenize(text: string): string[] {
  return text.match(/\s*\S+|\s+/g) ?? [];
}

function variantsFor(item: CatalogItem, downloaded: string[] = []): VariantEntry[] {
  return VARIANT_NAMES.map(([name, operatorMode], i) => ({
    name,
    operatorMode,
    downloaded: downloaded.includes(name),
    sizeBytes: item.adapterBytes + i * MiB,
  }));
}

function seedConversations(): StoredConversation[] {
  const repo = 'ffurfaro/Titanesque-gemma-3-270m';
  const at = (minutesAgo: number) => new Date(Date.now() - minutesAgo * 60_000).toISOString();
  const msg = (id: string, role: Message['role'], content: string, minutesAgo: number): Message => ({
    id,
    role,
    content,
    status: 'complete',
    error: null,
    stats:
      role === 'assistant'
        ? {
            promptTokens: 40,
            generatedTokens: countTokens(content),
            ttftMs: 180,
            prefillTokensPerS: 950,
            decodeTokensPerS: 42.5,
            loadMs: null,
          }
        : null,
    createdAt: at(minutesAgo),
    versions: null,
    attachment: null,
  });
  const long = 'The meeting notes continue. '.repeat(2400);
  return [
    {
      id: 'c-memory',
      title: 'Linear attention memory',
      modelRepo: repo,
      variant: 'delta_rule',
      updatedAt: at(5),
      messages: [
        msg('m1', 'user', 'Summarise these notes, please:\n\n' + long, 8),
        msg('m2', 'assistant', 'The notes say the meeting continued, at length.', 7),
        msg('m3', 'user', 'How does the model still remember the beginning?', 6),
        msg(
          'm4',
          'assistant',
          'Tokens that left the softmax window live on in the **recurrent memory**.',
          5,
        ),
      ],
    },
    {
      id: 'c-rust',
      title: 'Rust borrow checker tips',
      modelRepo: repo,
      variant: 'delta_rule',
      updatedAt: at(60 * 26),
      messages: [
        msg('m5', 'user', 'Why does the borrow checker reject two mutable borrows?', 60 * 26 + 1),
        msg('m6', 'assistant', 'Because `&mut` promises **exclusive** access.', 60 * 26),
      ],
    },
    {
      id: 'c-lisbon',
      title: 'Trip to Lisbon',
      modelRepo: repo,
      variant: 'delta_product',
      updatedAt: at(60 * 24 * 9),
      messages: [
        msg('m7', 'user', 'Three things to see in Lisbon?', 60 * 24 * 9 + 1),
        msg('m8', 'assistant', 'Alfama, Belém and the LX Factory.', 60 * 24 * 9),
      ],
    },
  ];
}

function initialState(scenario: Scenario): MockState {
  const models: ModelEntry[] = CATALOG.map((item) => ({
    repoId: item.repoId,
    title: item.title,
    source: 'catalog',
    description: item.description,
    variants: null,
    baseModel: item.baseModel,
    baseSizeBytes: item.baseBytes,
  }));
  const settings = clone(DEFAULT_SETTINGS);
  let conversations: StoredConversation[] = [];
  if (scenario === 'ready') {
    models[0].variants = variantsFor(CATALOG[0], ['delta_rule', 'delta_product']);
    settings.modelRepo = CATALOG[0].repoId;
    settings.variant = 'delta_rule';
    conversations = seedConversations();
  }
  return {
    models,
    settings,
    hfToken: null,
    conversations,
    memories: [],
    device: { compiled: ['cpu', 'cuda'], inUse: 'cuda', name: deviceName('cuda') },
  };
}

/** Where the mock's logs folder is (open_logs_folder). */
const MOCK_LOG_DIR = '/home/user/.local/share/tptt-chat/logs';

class MockBackend implements MockControl {
  state: MockState;
  calls: { command: string; args: Record<string, unknown> }[] = [];
  openedUrls: string[] = [];
  savedFiles: { path: string; text: string }[] = [];
  openedFolders: string[] = [];
  private dialogAnswer: string | null | undefined = undefined;
  /** What `pick_document` answers (undefined: a default document; null: cancelled). */
  private documentAnswer: DocumentInfo | null | undefined = undefined;
  /** What `import_backup` brings in (default: a copy of the conversations as they are). */
  private backupSource: StoredConversation[] | null = null;
  private reply: string | null = null;
  private timing: Timing = {
    firstTokenMs: 120,
    prefillTokensPerS: 0,
    stopMs: 0,
    tokenMs: 40,
    downloadTicks: 30,
    downloadTickMs: 100,
    listMs: 250,
  };
  private failures = new Map<string, CommandError>();
  private generationFailure: Generation['failAfter'] = null;
  private downloadFailure: { at: number; kind: ErrorKind; message: string } | null = null;
  private generation: Generation | null = null;
  /** The model (repo/variant) the last turn ran on: another one is "loaded" by the next turn. */
  private loaded: string | null = null;
  private downloads = new Map<string, Download>();
  private channelIndex = new Map<string, number>();
  private nextId = 1;

  constructor(scenario: Scenario) {
    this.state = initialState(scenario);
  }

  // ---- Controls ----

  reset(scenario: Scenario = 'ready') {
    if (this.generation?.timer) clearTimeout(this.generation.timer);
    this.generation = null;
    this.loaded = null;
    for (const d of this.downloads.values()) clearInterval(d.timer);
    this.downloads.clear();
    this.failures.clear();
    this.generationFailure = null;
    this.downloadFailure = null;
    this.dialogAnswer = undefined;
    this.documentAnswer = undefined;
    this.savedFiles = [];
    this.openedFolders = [];
    this.state = initialState(scenario);
  }

  setDialogAnswer(path: string | null) {
    this.dialogAnswer = path;
  }

  setDocument(doc: DocumentInfo | null | undefined) {
    this.documentAnswer = doc;
  }

  forgetSnapshots(title: string) {
    const c = this.state.conversations.find((x) => x.title === title);
    if (!c) throw new Error(`no conversation titled ${title}`);
    c.noSnapshots = true;
  }

  setReply(text: string | null) {
    this.reply = text;
  }

  setTiming(timing: Partial<Timing>) {
    this.timing = { ...this.timing, ...timing };
  }

  async launchAgain(event: LaunchEvent) {
    if (event.kind === 'modelChosen') {
      this.state.settings = { ...this.state.settings, modelRepo: event.repoId, variant: event.variant };
    }
    await emit(LAUNCH_EVENT, event);
  }

  failNext(command: string, kind: ErrorKind, message = `Injected ${kind} failure.`) {
    this.failures.set(command, fail(kind, message));
  }

  failGeneration(afterTokens: number, kind: ErrorKind = 'generation', message = 'The model failed.') {
    this.generationFailure = { after: afterTokens, kind, message };
  }

  failDownload(atFraction: number, kind: ErrorKind = 'network', message = 'The connection was lost.') {
    this.downloadFailure = { at: atFraction, kind, message };
  }

  // ---- Plumbing ----

  private id(prefix: string): string {
    return `${prefix}-${Date.now().toString(36)}-${this.nextId++}`;
  }

  /** Sends one message down a channel the way Tauri does: `{ message, index }`. */
  private emit(channel: string, message: ChatEvent | DownloadEvent) {
    const id = Number(channel.replace('__CHANNEL__:', ''));
    const index = this.channelIndex.get(channel) ?? 0;
    this.channelIndex.set(channel, index + 1);
    const internals = (window as unknown as { __TAURI_INTERNALS__: { runCallback(id: number, data: unknown): void } })
      .__TAURI_INTERNALS__;
    internals.runCallback(id, { message: clone(message), index });
  }

  async handle(command: string, rawArgs: unknown): Promise<unknown> {
    const args = (rawArgs ? JSON.parse(JSON.stringify(rawArgs)) : {}) as Record<string, unknown>;
    this.calls.push({ command, args });
    const injected = this.failures.get(command);
    if (injected) {
      this.failures.delete(command);
      throw injected;
    }
    const result = await this.dispatch(command, args);
    return result === undefined ? null : clone(result);
  }

  private dispatch(command: string, args: Record<string, unknown>): unknown {
    const handlers = this.handlers as unknown as Record<string, ((a: Record<string, unknown>) => unknown) | undefined>;
    const handler = Object.hasOwn(handlers, command) ? handlers[command] : undefined;
    if (!handler) throw fail('internal', `unknown command ${command}`);
    return handler(args);
  }

  /**
   * One handler per command, typed by the generated `Commands` (a command added to the backend
   * fails the type check here until the mock has it). The mock keeps to shapes and its fixtures'
   * state (what exists, what is downloaded, what is busy); the backend's value rules (bounds,
   * formats) are not copied here: tests that need a refusal inject it with `failNext`.
   */
  private readonly handlers: Handlers = {
    list_models: () => this.state.models,
    refresh_variants: (a) => this.refreshVariants(a.repoId),
    add_model: (a) => this.addModel(a.repoId),
    import_local_model: (a) => this.importLocal(a.path),
    pick_model_folder: () => this.dialogAnswer ?? null,
    download_variant: (a) => this.startDownload(a.repoId, a.variant, a.onEvent),
    cancel_download: (a) => this.cancelDownload(a.repoId, a.variant),
    remove_variant: (a) => this.removeVariant(a.repoId, a.variant),
    get_settings: () => this.settingsOut(),
    set_settings: (a) => this.setSettings(a.settings),
    set_hf_token: (a) => {
      this.state.hfToken = a.token && a.token.trim() ? a.token.trim() : null;
      return null;
    },
    device_info: () => this.state.device,
    api_server_status: () => this.apiServerStatus(),
    list_conversations: (a) => this.listConversations(a.query ?? null),
    list_archived_conversations: () => this.listConversations(null, true),
    set_conversation_pinned: (a) => this.setFlag(a.id, 'pinned', a.pinned),
    set_conversation_archived: (a) => this.setFlag(a.id, 'archived', a.archived),
    create_conversation: () => this.createConversation(),
    get_conversation: (a) => this.getConversation(a.id),
    set_conversation_settings: (a) => this.setChatSettings(a.id, a.settings),
    branch_conversation: (a) => this.branch(a.id, a.messageId),
    save_memory: (a) => this.saveMemory(a.conversationId, a.name),
    list_memories: () => this.state.memories,
    rename_memory: (a) => {
      const m = this.findMemory(a.id);
      m.name = this.memoryName(a.name);
      return null;
    },
    delete_memory: (a) => {
      this.findMemory(a.id);
      this.state.memories = this.state.memories.filter((m) => m.id !== a.id);
      return null;
    },
    new_chat_from_memory: (a) => this.newChatFromMemory(a.id),
    switch_version: (a) => this.switchVersion(a.conversationId, a.messageId, a.version),
    rename_conversation: (a) => {
      const c = this.find(a.id);
      c.title = a.title.trim();
      return null;
    },
    delete_conversation: (a) => {
      this.find(a.id);
      if (this.generation?.conversationId === a.id) this.stop(a.id);
      this.state.conversations = this.state.conversations.filter((c) => c.id !== a.id);
      return null;
    },
    export_conversation: (a) => this.exportConversation(a.id, a.format),
    save_conversation: (a) => this.saveConversation(a.id, a.format),
    export_backup: (a) => this.exportBackup(a.includeStates),
    import_backup: () => this.importBackup(),
    open_logs_folder: () => {
      this.openedFolders.push(MOCK_LOG_DIR);
      return MOCK_LOG_DIR;
    },
    send_message: (a) => this.send(a.conversationId, a.content, a.onEvent),
    pick_document: () => this.pickDocument(),
    inspect_document: (a) => this.inspectDocument(a.path),
    send_document: (a) => this.sendDocument(a.conversationId, a.path, a.content, a.onEvent),
    regenerate: (a) => this.regenerate(a.conversationId, a.onEvent),
    edit_and_resend: (a) => this.editAndResend(a.conversationId, a.messageId, a.content, a.onEvent),
    stop_generation: (a) => {
      this.stop(a.conversationId);
      return null;
    },
    reset_memory: (a) => this.resetMemory(a.conversationId),
    open_url: (a) => {
      this.openedUrls.push(a.url);
      return null;
    },
  };

  // ---- Models ----

  private model(repoId: string): ModelEntry {
    const m = this.state.models.find((x) => x.repoId === repoId);
    if (!m) throw fail('not_found', `No model ${repoId}.`);
    return m;
  }

  private variant(repoId: string, name: string): VariantEntry {
    const v = this.model(repoId).variants?.find((x) => x.name === name);
    if (!v) throw fail('not_found', `No variant ${name} in ${repoId}.`);
    return v;
  }

  private async refreshVariants(repoId: string): Promise<VariantEntry[]> {
    const m = this.model(repoId);
    await new Promise((r) => setTimeout(r, this.timing.listMs));
    if (m.source === 'local') return m.variants ?? [];
    const item = CATALOG.find((c) => c.repoId === repoId) ?? {
      ...CATALOG[0],
      repoId,
      adapterBytes: 16 * MiB,
    };
    const downloaded = (m.variants ?? []).filter((v) => v.downloaded).map((v) => v.name);
    m.variants = variantsFor(item, downloaded);
    return m.variants;
  }

  private addModel(repoId: string): ModelEntry {
    const id = repoId.trim();
    const existing = this.state.models.find((m) => m.repoId === id);
    if (existing) return existing;
    const entry: ModelEntry = {
      repoId: id,
      title: id.split('/')[1],
      source: 'added',
      description: 'Added by repository id.',
      variants: null,
      baseModel: null,
      baseSizeBytes: null,
    };
    this.state.models.push(entry);
    return entry;
  }

  private importLocal(path: string): ModelEntry {
    const p = path.trim();
    if (!p.startsWith('/') && !/^[A-Za-z]:\\/.test(p)) {
      throw fail('not_a_tptt_repo', `${path} is not an absolute folder path.`);
    }
    if (/not-tptt|empty/i.test(p)) {
      throw fail('not_a_tptt_repo', `${path} has no variant subfolder with a TPTT config.json.`);
    }
    const name = p.replace(/[\\/]+$/, '').split(/[\\/]/).pop() || 'local-model';
    const entry: ModelEntry = {
      repoId: p,
      title: name,
      source: 'local',
      description: `Imported from ${p}.`,
      variants: [{ name: 'delta_rule', operatorMode: 'delta_rule', downloaded: true, sizeBytes: 909 }],
      baseModel: '../models/smollm2-135m-instruct',
      baseSizeBytes: 540 * MiB,
    };
    this.state.models = this.state.models.filter((m) => m.repoId !== p);
    this.state.models.push(entry);
    return entry;
  }

  private startDownload(repoId: string, variant: string, channel: string): null {
    const v = this.variant(repoId, variant);
    const key = `${repoId}::${variant}`;
    if (this.downloads.has(key)) throw fail('busy', 'This variant is already downloading.');
    const item = CATALOG.find((c) => c.repoId === repoId);
    if (item?.gated && !this.state.hfToken) {
      throw fail('auth', `${item.baseModel} is gated: accept its licence on Hugging Face and add a token.`);
    }
    const baseBytes = item?.baseBytes ?? 300 * MiB;
    const files: [string, number][] = [
      [`${variant}/adapter_model.safetensors`, v.sizeBytes ?? 10 * MiB],
      ['base: model.safetensors', baseBytes],
      ['base: tokenizer.json', 7 * MiB],
    ];
    const total = files.reduce((s, [, n]) => s + n, 0);
    const failure = this.downloadFailure;
    this.downloadFailure = null;
    let tick = 0;
    const timer = setInterval(() => {
      tick++;
      const bytes = Math.min(total, Math.round((total * tick) / this.timing.downloadTicks));
      if (failure && bytes >= total * failure.at) {
        clearInterval(timer);
        this.downloads.delete(key);
        this.emit(channel, { kind: 'error', errorKind: failure.kind, message: failure.message });
        return;
      }
      let before = 0;
      let file = files[files.length - 1];
      for (const f of files) {
        if (bytes < before + f[1]) {
          file = f;
          break;
        }
        before += f[1];
      }
      const fileBytes = Math.min(file[1], bytes - before);
      const bytesPerSec = Math.round(total / this.timing.downloadTicks / (this.timing.downloadTickMs / 1000));
      this.emit(channel, {
        kind: 'progress',
        file: file[0],
        fileBytes,
        fileTotal: file[1],
        bytes,
        total,
        bytesPerSec,
      });
      if (bytes >= total) {
        clearInterval(timer);
        this.downloads.delete(key);
        v.downloaded = true;
        this.emit(channel, { kind: 'done' });
      }
    }, this.timing.downloadTickMs);
    this.downloads.set(key, { repoId, variant, channel, timer });
    return null;
  }

  private cancelDownload(repoId: string, variant: string): null {
    const key = `${repoId}::${variant}`;
    const d = this.downloads.get(key);
    if (!d) return null;
    clearInterval(d.timer);
    this.downloads.delete(key);
    this.emit(d.channel, { kind: 'cancelled' });
    return null;
  }

  private removeVariant(repoId: string, variant: string): null {
    const v = this.variant(repoId, variant);
    v.downloaded = false;
    const s = this.state.settings;
    if (s.modelRepo === repoId && s.variant === variant) {
      s.variant = null;
    }
    return null;
  }

  // ---- Settings ----

  private settingsOut(): Settings {
    return { ...this.state.settings, hfTokenSet: this.state.hfToken !== null };
  }

  private setSettings(next: Settings): Settings {
    const bad = (field: string, why: string) => {
      throw fail('invalid_settings', `${field}: ${why}`);
    };
    if (next.device !== 'auto' && !this.state.device.compiled.includes(next.device)) {
      bad('device', `${next.device} is not compiled into this build`);
    }
    if (next.modelRepo !== null) {
      const m = this.state.models.find((x) => x.repoId === next.modelRepo);
      if (!m) bad('modelRepo', 'unknown model');
      if (next.variant !== null) {
        const v = m?.variants?.find((x) => x.name === next.variant);
        if (!v?.downloaded) bad('variant', 'not downloaded');
      }
    }
    this.state.settings = { ...clone(next), hfTokenSet: this.state.hfToken !== null };
    const d = this.state.device;
    d.inUse = next.device === 'auto' ? (d.compiled.includes('cuda') ? 'cuda' : 'cpu') : next.device;
    d.name = deviceName(d.inUse);
    return this.settingsOut();
  }

  /** The API server as the backend reports it: it listens where the settings say, except on
   * [`MOCK_PORT_IN_USE`]; a request count the mock never serves. */
  private apiServerStatus(): ApiServerStatus {
    const a = this.state.settings.apiServer;
    if (!a.enabled) return { state: 'off' };
    if (a.port === MOCK_PORT_IN_USE) {
      return {
        state: 'failed',
        message: `Port ${a.port} is already in use by another program: choose another port (or 0 for any free one).`,
      };
    }
    const s = this.state.settings;
    const name = s.modelRepo?.split('/').pop();
    return {
      state: 'listening',
      url: `http://127.0.0.1:${a.port === 0 ? 49152 : a.port}/v1`,
      modelId: s.modelRepo && s.variant ? `${s.modelRepo.startsWith('/') ? name : s.modelRepo}/${s.variant}` : null,
      served: 0,
    };
  }

  // ---- Conversations ----

  private find(id: string): StoredConversation {
    const c = this.state.conversations.find((x) => x.id === id);
    if (!c) throw fail('not_found', 'That conversation no longer exists.');
    return c;
  }

  private summary(c: StoredConversation): ConversationSummary {
    const last = c.messages[c.messages.length - 1];
    return {
      id: c.id,
      title: c.title,
      updatedAt: c.updatedAt,
      modelRepo: c.modelRepo,
      variant: c.variant,
      preview: last ? last.content.slice(0, 120).replace(/\s+/g, ' ') : '',
      pinned: c.pinned ?? false,
      archived: c.archived ?? false,
    };
  }

  /** The main list (pinned first, then most recent) or a search in it; or the archived list. */
  private listConversations(query: string | null, archived = false): ConversationSummary[] {
    const q = query?.trim().toLowerCase() ?? '';
    const rank = (c: StoredConversation) => (!q && c.pinned ? 1 : 0);
    return this.state.conversations
      .filter((c) => (c.archived ?? false) === archived)
      .filter(
        (c) =>
          !q ||
          c.title.toLowerCase().includes(q) ||
          c.messages.some((m) => m.content.toLowerCase().includes(q)),
      )
      .sort((x, y) => rank(y) - rank(x) || y.updatedAt.localeCompare(x.updatedAt))
      .map((c) => this.summary(c));
  }

  /** `set_conversation_pinned` / `set_conversation_archived`: the flag must be a boolean. */
  private setFlag(id: string, name: 'pinned' | 'archived', value: unknown): ConversationSummary {
    const c = this.find(id);
    if (typeof value !== 'boolean') throw fail('invalid_settings', `${name}: ${JSON.stringify(value)} is not true or false`);
    c[name] = value;
    // As the store: archiving is a change of the conversation, pinning is not.
    if (name === 'archived') c.updatedAt = now();
    return this.summary(c);
  }

  private createConversation(): ConversationSummary {
    const c: StoredConversation = {
      id: this.id('c'),
      title: 'New chat',
      modelRepo: this.state.settings.modelRepo,
      variant: this.state.settings.variant,
      updatedAt: now(),
      messages: [],
    };
    this.state.conversations.push(c);
    return this.summary(c);
  }

  /** Tokens of the whole conversation text. */
  private textTokens(c: StoredConversation): number {
    const system = countTokens(this.state.settings.systemPrompt);
    return c.messages.reduce((n, m) => n + countTokens(m.content) + 4 + this.documentTokens(m), system);
  }

  /** Tokens of a message's attached document (its text stays in the backend: about 4 characters a token). */
  private documentTokens(m: Message): number {
    return m.attachment ? Math.ceil(m.attachment.chars / 4) : 0;
  }

  private memory(c: StoredConversation, extra = 0): MemoryInfo {
    const windowSize = this.state.settings.windowSize ?? MODEL_WINDOW;
    // A chat started from a saved memory reads its own text (system prompt included) at its first turn.
    const text = c.primedTokens !== undefined && c.messages.length === 0 ? 0 : this.textTokens(c);
    const totalTokens = Math.max(0, text - (c.unreadTokens ?? 0)) + (c.primedTokens ?? 0) + extra;
    const windowFill = Math.min(totalTokens, windowSize);
    return {
      windowSize,
      windowFill,
      recurrentOnlyTokens: totalTokens - windowFill,
      totalTokens,
      health: c.health ?? this.measured(totalTokens),
    };
  }

  /** A memory working as it should: healthy once enough was read to tell. */
  private measured(totalTokens: number): MemoryHealth {
    return totalTokens < 200 ? UNKNOWN : health('healthy', 24.3, 25.9);
  }

  /** The health after reading the conversation's last user message. */
  private nextHealth(c: StoredConversation): MemoryHealth {
    const text = c.messages.findLast((m) => m.role === 'user')?.content ?? '';
    if (text.includes(BROKEN_MARKER) || text.length > BROKEN_MESSAGE_CHARS) return BROKEN;
    if (text.includes(STRAINED_MARKER)) return STRAINED;
    const now = c.health?.verdict;
    if (now === 'broken' || now === 'strained') return c.health as MemoryHealth;
    return this.measured(this.memory(c).totalTokens);
  }

  /** `reset_memory`: drops the memory; the next turn reads the text's tail (at most the window, at most 1024 tokens). */
  private resetMemory(id: string): MemoryInfo {
    const c = this.find(id);
    if (this.generation) throw fail('busy', 'A reply is still being generated: wait for it, or stop it.');
    c.unreadTokens = this.textTokens(c);
    c.freshMemory = true;
    c.health = UNKNOWN;
    return this.memory(c);
  }

  private getConversation(id: string): Conversation {
    const c = this.find(id);
    const sets = c.versions ?? [];
    return {
      id: c.id,
      title: c.title,
      modelRepo: c.modelRepo,
      variant: c.variant,
      messages: c.messages.map((m, i) => {
        const set = sets.find((s) => s.position === i);
        return { ...m, versions: set ? { current: set.shown, total: set.held.length + 1 } : null };
      }),
      memory: this.memory(c),
      settings: c.settings ?? { model: null, windowSize: null, systemPrompt: null, sampling: null },
    };
  }

  /**
   * Keeps `tail` (the messages from `position` on, taken out by the caller) as a version of
   * `position`, with the version sets of later positions; what follows is the newest version.
   */
  private stash(c: StoredConversation, position: number, tail: Message[]) {
    const sets = c.versions ?? [];
    const nested = sets.filter((s) => s.position > position);
    c.versions = sets.filter((s) => s.position <= position);
    let set = c.versions.find((s) => s.position === position);
    if (!set) {
      set = { position, shown: 1, held: [] };
      c.versions.push(set);
    }
    set.held.push({ version: set.shown, messages: tail, sets: nested });
    set.shown = Math.max(...set.held.map((h) => h.version)) + 1;
  }

  private findMemory(id: string): SavedMemory {
    const m = this.state.memories.find((x) => x.id === id);
    if (!m) throw fail('not_found', `Memory ${id} does not exist (it may have been deleted).`);
    return m;
  }

  /** A memory's name as the backend takes it: trimmed, 1 to 200 characters. */
  private memoryName(name: string): string {
    const clean = name.trim();
    if (!clean) throw fail('invalid_settings', 'name: give the memory a name');
    if ([...clean].length > 200) throw fail('invalid_settings', 'name: at most 200 characters');
    return clean;
  }

  /** `save_memory`: the chat's memory after its last answer (none yet: `not_found`). */
  private saveMemory(conversationId: string, name: string): SavedMemory {
    const clean = this.memoryName(name);
    const c = this.find(conversationId);
    if (this.generation) throw fail('busy', 'A reply is still being generated: wait for it, or stop it.');
    if (!c.messages.some((m) => m.role === 'assistant')) {
      throw fail('not_found', 'This chat has no saved memory yet: its memory is saved after each answer.');
    }
    const tokens = this.memory(c).totalTokens;
    const m: SavedMemory = {
      id: this.id('mem'),
      name: clean,
      modelRepo: c.modelRepo ?? this.state.settings.modelRepo ?? '',
      variant: c.variant ?? this.state.settings.variant ?? '',
      tokens,
      sizeBytes: 4 * MiB + tokens * 46_080,
      sourceTitle: c.title,
      createdAt: now(),
    };
    this.state.memories.unshift(m);
    return m;
  }

  /** `new_chat_from_memory`: a chat titled as the memory, whose meter starts at its tokens. */
  private newChatFromMemory(id: string): ConversationSummary {
    const m = this.findMemory(id);
    const c: StoredConversation = {
      id: this.id('c'),
      title: m.name,
      modelRepo: m.modelRepo,
      variant: m.variant,
      updatedAt: now(),
      messages: [],
      primedTokens: m.tokens,
    };
    this.state.conversations.push(c);
    return this.summary(c);
  }

  /** `switch_version`, as the store does it: the shown continuation and the chosen one swap. */
  private switchVersion(id: string, messageId: string, version: unknown): Conversation {
    const c = this.find(id);
    if (typeof version !== 'number' || !Number.isInteger(version) || version < 1 || version > 0xffffffff) {
      throw fail('invalid_settings', `version: ${JSON.stringify(version)} is not a version number (1, 2, 3…)`);
    }
    const at = c.messages.findIndex((m) => m.id === messageId);
    if (at < 0) throw fail('not_found', `Message ${messageId} is not shown in this conversation.`);
    if (this.generation) throw fail('busy', 'A reply is still being generated: wait for it, or stop it.');
    const set = (c.versions ?? []).find((s) => s.position === at);
    const target = set?.held.find((h) => h.version === version);
    if (!set || (!target && set.shown !== version)) throw fail('not_found', `This message has no version ${version}.`);
    if (target) {
      const tail = c.messages.splice(at);
      const sets = c.versions ?? [];
      const nested = sets.filter((s) => s.position > at);
      c.versions = sets.filter((s) => s.position <= at);
      set.held = set.held.filter((h) => h !== target);
      set.held.push({ version: set.shown, messages: tail, sets: nested });
      set.shown = version;
      c.messages.push(...target.messages);
      c.versions.push(...target.sets);
    }
    return this.getConversation(id);
  }

  private branch(id: string, messageId: string): ConversationSummary {
    const c = this.find(id);
    const at = c.messages.findIndex((m) => m.id === messageId);
    if (at < 0) throw fail('not_found', `Message ${messageId} does not exist (it may have been deleted).`);
    if (this.generation?.conversationId === id && at === c.messages.length - 1) {
      throw fail('busy', 'This answer is still being written: branch from it once it is done, or stop it.');
    }
    const branch: StoredConversation = {
      ...clone(c),
      id: this.id('conv'),
      title: `${c.title} (branch)`,
      updatedAt: now(),
      messages: clone(c.messages.slice(0, at + 1)).map((m) => ({ ...m, id: this.id('msg') })),
    };
    // Without a saved memory at that turn, the branch's first message reads its text.
    if (c.noSnapshots) branch.unreadTokens = this.textTokens(branch);
    this.state.conversations.unshift(branch);
    return this.summary(branch);
  }

  private setChatSettings(id: string, settings: ChatSettings): ChatSettingsSaved {
    const c = this.find(id);
    if (settings.model) {
      // The fixtures' state: a model of its own must be downloaded.
      const { repoId, variant } = settings.model;
      const v = this.state.models.find((m) => m.repoId === repoId)?.variants?.find((x) => x.name === variant);
      if (!v?.downloaded) throw fail('no_model', `${repoId} (${variant}) is not downloaded.`);
    }
    const app = this.state.settings;
    const prompt = (s: ChatSettings | undefined) => s?.systemPrompt ?? app.systemPrompt;
    const window = (s: ChatSettings | undefined) => s?.windowSize ?? app.windowSize;
    const changed = prompt(c.settings) !== prompt(settings) || window(c.settings) !== window(settings);
    const rebuilt = changed && c.messages.length > 0;
    if (rebuilt) {
      if (this.generation?.conversationId === id) throw fail('busy', 'A reply is still being generated: wait for it, or stop it.');
      c.unreadTokens = this.textTokens(c);
      c.health = UNKNOWN;
    }
    c.settings = clone(settings);
    return { settings: clone(settings), rebuilt, memory: this.memory(c) };
  }

  private exportConversation(id: string, format: string): string {
    const c = this.getConversation(id);
    if (format === 'json') return JSON.stringify(c, null, 2);
    if (format !== 'markdown') throw fail('internal', `unknown format ${format}`);
    const lines = [`# ${c.title}`, ''];
    for (const m of c.messages) {
      lines.push(`## ${m.role === 'user' ? 'You' : m.role === 'assistant' ? 'Assistant' : 'System'}`, '', m.content, '');
    }
    return lines.join('\n');
  }

  private saveConversation(id: string, format: string): string | null {
    const text = this.exportConversation(id, format);
    const stem = this.find(id).title.replace(/[^\p{L}\p{N} _-]+/gu, '').trim().slice(0, 60).trim() || 'conversation';
    const path =
      this.dialogAnswer === undefined
        ? `/home/user/Documents/${stem}.${format === 'json' ? 'json' : 'md'}`
        : this.dialogAnswer;
    if (path !== null) this.savedFiles.push({ path, text });
    return path;
  }

  /** `export_backup`: the file chosen (the dialog answer), what went in; null when cancelled. */
  private exportBackup(includeStates: unknown): BackupSummary | null {
    if (typeof includeStates !== 'boolean') throw fail('invalid_settings', `includeStates: ${JSON.stringify(includeStates)} is not true or false`);
    if (this.generation) throw fail('busy', 'A reply is still being generated: wait for it, or stop it.');
    const path = this.dialogAnswer === undefined ? '/home/user/Documents/tptt-chat-backup.zip' : this.dialogAnswer;
    if (path === null) return null;
    const all = this.state.conversations;
    const states = includeStates ? all.filter((c) => c.messages.some((m) => m.role === 'assistant')).length : 0;
    const text = JSON.stringify(all.map((c) => c.messages));
    this.savedFiles.push({ path, text });
    return { conversations: all.length, states, bytes: text.length + states * 8 * MiB, path };
  }

  /** `import_backup`: the last backup written comes back as new conversations; null when cancelled. */
  private importBackup(): ImportSummary | null {
    if (this.dialogAnswer === null) return null;
    const source = this.backupSource ?? this.state.conversations;
    const copies = clone(source).map((c) => ({ ...c, id: this.id('c'), messages: c.messages.map((m) => ({ ...m, id: this.id('m') })) }));
    this.state.conversations.push(...copies);
    return { conversations: copies.length, states: copies.filter((c) => c.messages.some((m) => m.role === 'assistant')).length };
  }

  // ---- Chat ----

  private checkReady(c: StoredConversation) {
    const s = this.state.settings;
    if (!s.modelRepo || !s.variant) {
      throw fail('no_model', 'No model is selected: download one in the model manager.');
    }
    if (this.generation) throw fail('busy', 'A reply is still being generated.');
    c.modelRepo = s.modelRepo;
    c.variant = s.variant;
  }

  private startGeneration(c: StoredConversation, channel: string): Message {
    const message: Message = {
      id: this.id('m'),
      role: 'assistant',
      content: '',
      status: 'partial',
      error: null,
      stats: null,
      createdAt: now(),
      versions: null,
      attachment: null,
    };
    if (c.freshMemory) {
      const windowSize = this.state.settings.windowSize ?? MODEL_WINDOW;
      c.unreadTokens = Math.max(0, this.textTokens(c) - freshMemoryTokens(windowSize));
      c.freshMemory = false;
    }
    // The prompt: the last user message (with its template tokens), read on top of the memory.
    const after = this.memory(c);
    const last = c.messages.at(-1);
    const promptTokens = Math.min(
      after.totalTokens,
      last?.role === 'user' ? countTokens(last.content) + 4 + this.documentTokens(last) : 4,
    );
    const before = advance(after, -promptTokens);
    c.messages.push(message);
    c.updatedAt = now();
    const model = `${this.state.settings.modelRepo}/${this.state.settings.variant}`;
    const g: Generation = {
      conversationId: c.id,
      message,
      tokens: tokenize(this.reply ?? DEFAULT_REPLY),
      sent: 0,
      channel,
      timer: null,
      promptStartedAt: null,
      promptReadAt: null,
      firstTokenAt: null,
      promptTokens,
      read: 0,
      before,
      loadMs: this.loaded === model ? null : this.timing.firstTokenMs,
      stopping: false,
      failAfter: this.generationFailure,
      replaces: null,
    };
    this.loaded = model;
    this.generationFailure = null;
    this.generation = g;
    g.timer = setTimeout(() => {
      g.promptStartedAt = performance.now();
      this.emit(channel, { kind: 'started', memory: before, promptTokens, loadMs: g.loadMs });
      this.readPrompt(g, c);
    }, this.timing.firstTokenMs);
    return message;
  }

  /** Reads the prompt block by block (512 tokens), at `prefillTokensPerS`, as the backend does. */
  private readPrompt(g: Generation, c: StoredConversation) {
    if (this.generation !== g) return;
    const speed = this.timing.prefillTokensPerS;
    if (g.read > 0 && g.read < g.promptTokens) {
      this.emit(g.channel, {
        kind: 'prefill',
        read: g.read,
        total: g.promptTokens,
        elapsedMs: performance.now() - (g.promptStartedAt ?? 0),
        memory: advance(g.before, g.read),
      });
    }
    if (g.read >= g.promptTokens || !(speed > 0)) {
      g.read = g.promptTokens;
      g.promptReadAt = performance.now();
      c.health = this.nextHealth(c);
      this.emit(g.channel, { kind: 'memory', memory: { ...advance(g.before, g.read), health: c.health } });
      this.tick(g, c);
      return;
    }
    const block = Math.min(512, g.promptTokens - g.read);
    g.timer = setTimeout(() => {
      g.read += block;
      this.readPrompt(g, c);
    }, (block / speed) * 1000);
  }

  private stats(g: Generation): Stats {
    const end = performance.now();
    const start = g.promptStartedAt ?? end;
    const first = g.firstTokenAt ?? end;
    const decodeSecs = Math.max((end - first) / 1000, 1e-3);
    const readSecs = Math.max(((g.promptReadAt ?? end) - start) / 1000, 1e-3);
    return {
      promptTokens: g.read,
      generatedTokens: g.sent,
      ttftMs: Math.round(first - start),
      prefillTokensPerS: Math.round(g.read / readSecs),
      decodeTokensPerS: g.sent > 1 ? Math.round(((g.sent - 1) / decodeSecs) * 10) / 10 : 0,
      loadMs: g.loadMs,
    };
  }

  private tick(g: Generation, c: StoredConversation) {
    if (this.generation !== g) return;
    if (g.failAfter && g.sent >= g.failAfter.after) {
      g.message.status = 'error';
      g.message.error = g.failAfter.message;
      this.generation = null;
      this.settleReplacement(g, c);
      this.emit(g.channel, {
        kind: 'error',
        errorKind: g.failAfter.kind,
        message: g.failAfter.message,
        partial: g.message.content,
      });
      return;
    }
    if (g.sent >= g.tokens.length) {
      g.message.status = 'complete';
      g.message.stats = this.stats(g);
      c.updatedAt = now();
      this.generation = null;
      this.settleReplacement(g, c, true);
      this.emit(g.channel, { kind: 'done', stats: g.message.stats, memory: this.memory(c) });
      return;
    }
    const text = g.tokens[g.sent++];
    if (g.firstTokenAt === null) g.firstTokenAt = performance.now();
    this.settleReplacement(g, c);
    g.message.content += text;
    this.emit(g.channel, { kind: 'token', text, generated: g.sent });
    g.timer = setTimeout(() => this.tick(g, c), this.timing.tokenMs);
  }

  private stop(conversationId: string) {
    const g = this.generation;
    if (!g || g.conversationId !== conversationId || g.stopping) return;
    g.stopping = true;
    if (g.timer) clearTimeout(g.timer);
    g.timer = null;
    if (this.timing.stopMs > 0) g.timer = setTimeout(() => this.stopped(g), this.timing.stopMs);
    else this.stopped(g);
  }

  /** The end of a stopped generation: saved, then announced. */
  private stopped(g: Generation) {
    const conversationId = g.conversationId;
    this.generation = null;
    g.message.status = 'partial';
    g.message.stats = this.stats(g);
    const c = this.state.conversations.find((x) => x.id === conversationId);
    if (c) this.settleReplacement(g, c);
    // The memory holds what was read: the prompt so far, and the tokens generated.
    const memory = { ...advance(g.before, g.read + g.sent), health: c?.health ?? UNKNOWN };
    if (c) c.unreadTokens = Math.max(0, this.textTokens(c) - memory.totalTokens);
    this.emit(g.channel, { kind: 'stopped', stats: g.message.stats, memory });
  }

  private addUser(c: StoredConversation, content: string): Message {
    const m: Message = {
      id: this.id('m'),
      role: 'user',
      content,
      status: 'complete',
      error: null,
      stats: null,
      createdAt: now(),
      versions: null,
      attachment: null,
    };
    c.messages.push(m);
    return m;
  }

  /** `pick_document`: the document the test set (`setDocument`), or a default Markdown file; null when cancelled. */
  private pickDocument(): DocumentInfo | null {
    if (this.documentAnswer === null) return null;
    return this.documentAnswer ?? { path: '/home/user/Documents/notes.md', name: 'notes.md', kind: 'markdown', bytes: 48_213, chars: 47_900 };
  }

  /** `inspect_document`: a dropped file, read as the backend would (`.mkv`: binary, refused). */
  private inspectDocument(path: string): DocumentInfo {
    const name = path.split('/').at(-1) ?? path;
    if (name.endsWith('.mkv')) throw fail('invalid_settings', `${name}: is a binary file, not text`);
    const doc = { path, name, kind: name.endsWith('.pdf') ? 'pdf' : 'text', bytes: 20_480, chars: 19_000 };
    this.documentAnswer = doc;
    return doc;
  }

  /** Files dropped on the window (Tauri's drag-drop event). */
  async dropFiles(paths: string[]) {
    await emit('tauri://drag-drop', { paths, position: { x: 200, y: 200 } });
  }

  /** `send_document`: the message shows the attachment; the model reads the document's tokens. */
  private sendDocument(conversationId: string, path: string, content: string, channel: string) {
    const c = this.find(conversationId);
    this.checkReady(c);
    const doc = this.documentAnswer ?? this.pickDocument();
    if (!doc || doc.path !== path) throw fail('invalid_settings', `${path.split('/').at(-1)}: cannot be read (No such file or directory)`);
    const user = this.addUser(c, content.trim());
    user.attachment = { name: doc.name, kind: doc.kind, bytes: doc.bytes, chars: doc.chars };
    const assistant = this.startGeneration(c, channel);
    return { userMessageId: user.id, assistantMessageId: assistant.id };
  }

  private send(conversationId: string, content: string, channel: string) {
    const c = this.find(conversationId);
    this.checkReady(c);
    const user = this.addUser(c, content);
    const assistant = this.startGeneration(c, channel);
    return { userMessageId: user.id, assistantMessageId: assistant.id };
  }

  private regenerate(conversationId: string, channel: string) {
    const c = this.find(conversationId);
    this.checkReady(c);
    const last = c.messages[c.messages.length - 1];
    if (!last) throw fail('not_found', 'There is nothing to regenerate.');
    const replaces = last.role === 'assistant' ? last : null;
    const assistant = this.startGeneration(c, channel);
    if (this.generation) this.generation.replaces = replaces;
    return { assistantMessageId: assistant.id };
  }

  /**
   * Regenerate, as the backend does it: the new answer takes the old one's place at its first
   * token (or when it completes); ended before that (error, stop), it goes and the old stays.
   */
  private settleReplacement(g: Generation, c: StoredConversation, done = false) {
    const old = g.replaces;
    if (!old) return;
    g.replaces = null;
    if (g.sent > 0 || done) {
      const at = c.messages.indexOf(old);
      c.messages = c.messages.filter((m) => m !== old);
      if (at >= 0) this.stash(c, at, [old]);
    } else {
      c.messages = c.messages.filter((m) => m !== g.message);
    }
  }

  private editAndResend(conversationId: string, messageId: string, content: string, channel: string) {
    const c = this.find(conversationId);
    const i = c.messages.findIndex((m) => m.id === messageId);
    if (i < 0) throw fail('not_found', 'That message no longer exists.');
    this.checkReady(c);
    // One change, as the backend's transaction: the message and what follows are kept as a
    // version of its position, and a new message takes its place.
    this.stash(c, i, c.messages.splice(i));
    const user = this.addUser(c, content);
    const assistant = this.startGeneration(c, channel);
    return { userMessageId: user.id, assistantMessageId: assistant.id };
  }
}

/** Installs the mock backend for this page and exposes its controls on `window.__tpttMock`. */
export function installMockBackend(params: URLSearchParams): MockControl {
  const scenario: Scenario = params.get('scenario') === 'empty' ? 'empty' : 'ready';
  const backend = new MockBackend(scenario);
  mockIPC((command, args) => backend.handle(command, args), { shouldMockEvents: true });
  // The window and webview the app runs in (files dropped on it come as its events).
  mockWindows('main');
  window.__tpttMock = backend;
  return backend;
}
