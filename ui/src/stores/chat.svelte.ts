// The open conversation and the generation in flight.
//
// Invariants:
// - At most one generation runs (the backend answers `busy` otherwise); `live` describes it,
//   whichever conversation is on screen. Its events are matched by a sequence number, so a late
//   event from an older stream never touches a newer one.
// - Channel events may arrive before `send_message` resolves: the new messages carry placeholder
//   ids until then, and events address the live message, not an id.
// - Tokens are buffered and applied at most every FLUSH_MS (each application re-renders the
//   answer's markdown: at a fast model's rate, once a frame, that is CPU taken from the model);
//   every terminal event applies the buffer first, so a stopped or failed answer keeps all the
//   text that arrived.
// - A failed command puts the messages back as they were; the composer's draft is only cleared
//   once the backend has the message (drafts.svelte.ts).
// - The memory's health is the meter's (`memory.health`): the `memory` event brings it once the
//   prompt is read, before the answer streams; `resetMemory` replaces a broken memory with an
//   empty one (its health `unknown`, so the warning goes).
// - The meter shows what the model has read, live: the backend's memory from `started`, each
//   `prefill` (a long prompt being read) and `memory`, plus the tokens generated since (each is
//   read too). A stream ended here (Stop not confirmed in time) keeps the meter last shown, and
//   the backend's late end still updates the meter and the answer's stats.
// - TTFT has one meaning, live and saved: from the moment the prompt began to be read (`started`)
//   to the first token; the model's loading is shown apart.

import * as api from '../services/api';
import type { ChatEvent, ChatSettings, Conversation, DocumentInfo, MemoryInfo, Message, Stats } from '../services/types';
import { titleFrom } from '../lib/format';
import { UNKNOWN_HEALTH } from '../lib/health';
import { conversations } from './conversations.svelte';
import { drafts, NEW_CHAT } from './drafts.svelte';
import { settings } from './settings.svelte';
import { ui } from './ui.svelte';

/** A message as shown: the contract's, plus the error text of a failed generation. */
export interface ChatMessage extends Message {
  errorText?: string;
}

export interface OpenConversation extends Omit<Conversation, 'messages'> {
  messages: ChatMessage[];
}

export interface LiveGeneration {
  seq: number;
  conversationId: string;
  /** The assistant message being written (a placeholder id until the command returns). */
  messageId: string;
  text: string;
  startedAt: number;
  firstTokenAt: number | null;
  lastTokenAt: number | null;
  tokens: number;
  /** Tokens generated so far, as the backend counts them (a piece may hold several). */
  generated: number;
  /** When `started` came: the prompt began to be read (the TTFT's start). */
  promptStartedAt: number | null;
  /** The model's loading, when this turn loaded it. */
  loadMs: number | null;
  /** The prompt's reading: tokens read, in all, and how long it has taken so far. */
  prompt: { read: number; total: number; elapsedMs: number } | null;
  memory: MemoryInfo | null;
  stopping: boolean;
  /**
   * Regenerate: the answer being replaced. The backend keeps it until the new one's first token
   * (docs/ipc.md): if the turn ends before any (an error, a stop), it is shown again.
   */
  replaces: ChatMessage | null;
  /** Regenerate or edit: what it replaces is kept as a version (the pager is refreshed at the end). */
  versioned: boolean;
}

const LAST_KEY = 'tptt-chat.last-conversation';

/** Remembers the open conversation, so the app reopens where it was. */
function remember(id: string | null) {
  try {
    if (id) localStorage.setItem(LAST_KEY, id);
    else localStorage.removeItem(LAST_KEY);
  } catch {
    // not remembering is fine
  }
}

const EMPTY_MEMORY: MemoryInfo = {
  windowSize: 0,
  windowFill: 0,
  recurrentOnlyTokens: 0,
  totalTokens: 0,
  health: UNKNOWN_HEALTH,
};
/** Least time between two renders of a streaming answer's text. */
const FLUSH_MS = 100;
/** How long to wait for the backend's `stopped` after a successful stop command. */
const STOP_GRACE_MS = 5000;

/** `memory` after `fed` more tokens were read (the window holds the last `windowSize`). */
export function advanceMemory(memory: MemoryInfo, fed: number): MemoryInfo {
  const totalTokens = memory.totalTokens + fed;
  const windowFill = memory.windowSize ? Math.min(totalTokens, memory.windowSize) : totalTokens;
  return {
    windowSize: memory.windowSize,
    windowFill,
    recurrentOnlyTokens: totalTokens - windowFill,
    totalTokens,
    health: memory.health ?? UNKNOWN_HEALTH,
  };
}

class ChatStore {
  /** The conversation on screen; null for a new chat not created yet. */
  conversation = $state<OpenConversation | null>(null);
  /** The id being opened or shown (the sidebar's selection). */
  selectedId = $state<string | null>(null);
  loading = $state(false);
  loadError = $state<api.ApiError | null>(null);
  live = $state<LiveGeneration | null>(null);
  /** A command (send, regenerate, edit) is on its way to the backend. */
  sending = $state(false);
  /** `reset_memory` is on its way to the backend. */
  resetting = $state(false);
  /** `switch_version` is on its way to the backend. */
  switching = $state(false);

  private openSeq = 0;
  private genSeq = 0;
  /** A stream ended here before the backend confirmed its end: its late end still counts. */
  private late: { seq: number; conversationId: string; messageId: string } | null = null;
  private pending = '';
  private frame: ReturnType<typeof setTimeout> | null = null;

  /** The drafts key of what is on screen. */
  get draftKey(): string {
    return this.selectedId ?? NEW_CHAT;
  }

  /** The live generation if it belongs to the conversation on screen. */
  get liveHere(): LiveGeneration | null {
    const live = this.live;
    return live && this.conversation && live.conversationId === this.conversation.id ? live : null;
  }

  /**
   * The memory meter's figures: what the model has read, live — the backend's latest meter
   * (before the turn, while a long prompt is read, once it is read) plus the tokens generated
   * since.
   */
  get memory(): MemoryInfo | null {
    const c = this.conversation;
    if (!c) return null;
    const live = this.liveHere;
    const base = live?.memory ?? c.memory;
    if (!base.windowSize) return null;
    return live?.generated ? advanceMemory(base, live.generated) : base;
  }

  /**
   * "Continue with a fresh memory": the backend drops the conversation's memory (its next turn
   * rebuilds it from the text's tail: at most the window, at most 1024 tokens), and the meter
   * shows the empty one.
   */
  async resetMemory(): Promise<boolean> {
    const conv = this.conversation;
    if (!conv || this.resetting || this.live) return false;
    this.resetting = true;
    try {
      const memory = await api.resetMemory(conv.id);
      if (this.conversation?.id === conv.id) conv.memory = memory;
      ui.info('The memory was reset', 'The next message rebuilds it from the most recent part of the conversation.');
      return true;
    } catch (err) {
      ui.error(err, { context: 'Resetting the memory' });
      return false;
    } finally {
      this.resetting = false;
    }
  }

  /**
   * Saves the open conversation's own settings. Resolves with whether its memory is rebuilt
   * (the system prompt it uses changed); rejects with the backend's `ApiError` (a refused value
   * names its field), for the dialog to show beside it.
   */
  async saveChatSettings(settings: ChatSettings): Promise<{ rebuilt: boolean } | null> {
    const conv = this.conversation;
    if (!conv) return null;
    const saved = await api.setConversationSettings(conv.id, settings);
    if (this.conversation?.id === conv.id) {
      conv.settings = saved.settings;
      conv.memory = saved.memory;
    }
    return { rebuilt: saved.rebuilt };
  }

  /**
   * Shows version `version` of the continuation `messageId` starts (‹ 2/3 ›): the backend swaps
   * the messages, and the memory continues from that version's saved state.
   */
  async switchVersion(messageId: string, version: number): Promise<boolean> {
    const conv = this.conversation;
    if (!conv || this.live || this.switching) return false;
    this.switching = true;
    try {
      const c = await api.switchVersion(conv.id, messageId, version);
      if (this.conversation?.id === conv.id) this.conversation = c;
      void conversations.load();
      return true;
    } catch (err) {
      ui.error(err, { context: 'Showing another version' });
      return false;
    } finally {
      this.switching = false;
    }
  }

  /** "Branch from here": a new chat, the open one up to `messageId`, opened. */
  async branchFrom(messageId: string): Promise<boolean> {
    const conv = this.conversation;
    if (!conv) return false;
    try {
      const summary = await api.branchConversation(conv.id, messageId);
      conversations.upsert(summary);
      await this.open(summary.id);
      // The branch shares the memory saved at that turn; an older chat (or another model's)
      // may have none there: then its first message reads the conversation again.
      const saved = (this.conversation?.memory.totalTokens ?? 0) > 0;
      ui.info(
        'Branched',
        saved
          ? `“${summary.title}” continues from the memory saved at that turn; the original is unchanged.`
          : `“${summary.title}” has no memory saved at that turn (an older chat, or another model): its first message reads the conversation again. The original is unchanged.`,
      );
      return true;
    } catch (err) {
      ui.error(err, { context: 'Branching' });
      return false;
    }
  }

  /** Reopens the conversation that was open when the app last closed (if it still exists). */
  async restore() {
    let id: string | null = null;
    try {
      id = localStorage.getItem(LAST_KEY);
    } catch {
      id = null;
    }
    if (!id) return;
    await this.open(id);
    if (this.loadError) {
      // Gone since (deleted, or a new database): start fresh without an error screen.
      remember(null);
      this.newChat();
    }
  }

  newChat() {
    remember(null);
    this.openSeq++;
    this.conversation = null;
    this.selectedId = null;
    this.loadError = null;
    this.loading = false;
    ui.show('chat');
    ui.focusComposer();
  }

  async open(id: string) {
    ui.show('chat');
    if (this.selectedId === id && this.conversation?.id === id) return;
    const seq = ++this.openSeq;
    this.selectedId = id;
    remember(id);
    this.loading = true;
    this.loadError = null;
    try {
      const c = await api.getConversation(id);
      if (seq !== this.openSeq) return;
      this.conversation = c;
      ui.focusComposer();
    } catch (err) {
      if (seq !== this.openSeq) return;
      this.conversation = null;
      this.loadError = api.toApiError(err);
      if (this.loadError.kind === 'not_found') void conversations.load();
    } finally {
      if (seq === this.openSeq) this.loading = false;
    }
  }

  async reload() {
    const id = this.selectedId;
    if (!id) return;
    this.conversation = null;
    await this.open(id);
  }

  /** Whether a message may be sent now; if not, says why (a notice with the way forward). */
  private canStart(): boolean {
    if (this.live) {
      ui.error(new api.ApiError('busy', 'A reply is still being generated.'));
      return false;
    }
    if (!settings.ready) {
      ui.error(new api.ApiError('no_model', 'Choose a model before sending a message.'));
      return false;
    }
    return true;
  }

  /**
   * Sends `content`. Resolves true once the backend has it (the caller may then let the draft
   * go), false if it was not accepted (the draft stays, and a notice says why).
   */
  async send(content: string, document: DocumentInfo | null = null): Promise<boolean> {
    if ((!content.trim() && !document) || this.sending || !this.canStart()) return false;
    this.sending = true;
    try {
      const created = !this.conversation;
      const conv = this.conversation ?? (await this.createFor(content.trim() || (document?.name ?? '')));
      if (!conv) return false;
      const draftKey = conv.id;
      const attachment = document
        ? { name: document.name, kind: document.kind, bytes: document.bytes, chars: document.chars }
        : null;
      const result = await this.start(conv, (seq) => {
        const now = new Date().toISOString();
        conv.messages.push(
          {
            id: `pending-user-${seq}`,
            role: 'user',
            content: content.trim() && document ? content.trim() : content,
            status: 'complete',
            error: null,
            stats: null,
            createdAt: now,
            versions: null,
            attachment,
          },
          this.placeholder(seq),
        );
        return (onEvent) =>
          document ? api.sendDocument(conv.id, document.path, content, onEvent) : api.sendMessage(conv.id, content, onEvent);
      }, () => void this.send(drafts.get(draftKey) || content, document));
      if (!result) {
        if (created) this.abandon(conv);
        return false;
      }
      this.renameMessage(conv, `pending-user-${result.seq}`, result.userMessageId);
      if (drafts.get(draftKey) === content) drafts.clear(draftKey);
      return true;
    } finally {
      this.sending = false;
    }
  }

  async regenerate(): Promise<boolean> {
    const conv = this.conversation;
    if (!conv || this.sending || !this.canStart()) return false;
    this.sending = true;
    try {
      let replaces: ChatMessage | null = null;
      const result = await this.start(conv, (seq) => {
        if (conv.messages.at(-1)?.role === 'assistant') replaces = conv.messages.pop() ?? null;
        conv.messages.push(this.placeholder(seq));
        return (onEvent) => api.regenerate(conv.id, onEvent);
      }, () => void this.regenerate(), () => replaces, true);
      return result !== null;
    } finally {
      this.sending = false;
    }
  }

  /** Replaces a user message (and everything after it) with `content`, and answers again. */
  async editAndResend(messageId: string, content: string): Promise<boolean> {
    const conv = this.conversation;
    if (!conv || !content.trim() || this.sending || !this.canStart()) return false;
    this.sending = true;
    try {
      const result = await this.start(conv, (seq) => {
        const i = conv.messages.findIndex((m) => m.id === messageId);
        if (i >= 0) conv.messages.splice(i);
        conv.messages.push(
          {
            id: `pending-user-${seq}`,
            role: 'user',
            content,
            status: 'complete',
            error: null,
            stats: null,
            createdAt: new Date().toISOString(),
            versions: null,
            attachment: null,
          },
          this.placeholder(seq),
        );
        return (onEvent) => api.editAndResend(conv.id, messageId, content, onEvent);
      }, () => void this.editAndResend(messageId, content), undefined, true);
      if (!result) return false;
      this.renameMessage(conv, `pending-user-${result.seq}`, result.userMessageId);
      return true;
    } finally {
      this.sending = false;
    }
  }

  async stop() {
    const live = this.live;
    if (!live || live.stopping) return;
    live.stopping = true;
    try {
      await api.stopGeneration(live.conversationId);
      const seq = live.seq;
      // If the backend never confirms, end the stream here with what arrived.
      setTimeout(() => {
        const l = this.live;
        if (l?.seq !== seq) return;
        this.late = { seq, conversationId: l.conversationId, messageId: l.messageId };
        this.finish(seq, 'partial', null, null);
      }, STOP_GRACE_MS);
    } catch (err) {
      if (this.live?.seq === live.seq) this.live.stopping = false;
      ui.error(err, { context: 'Stopping' });
    }
  }

  /** Forgets a conversation that was deleted. */
  forget(id: string) {
    if (this.selectedId === id) this.newChat();
  }

  // ---- internals ----

  private async createFor(content: string): Promise<OpenConversation | null> {
    try {
      const summary = await api.createConversation();
      const title = titleFrom(content);
      try {
        await api.renameConversation(summary.id, title);
        summary.title = title;
      } catch {
        // An untitled chat is still a chat; it can be renamed later.
      }
      drafts.move(NEW_CHAT, summary.id);
      this.openSeq++;
      this.selectedId = summary.id;
      remember(summary.id);
      this.conversation = {
        id: summary.id,
        title: summary.title,
        modelRepo: summary.modelRepo,
        variant: summary.variant,
        messages: [],
        memory: EMPTY_MEMORY,
        settings: { model: null, windowSize: null, systemPrompt: null, sampling: null },
      };
      conversations.upsert(summary);
      return this.conversation;
    } catch (err) {
      ui.error(err, { context: 'Starting the chat' });
      return null;
    }
  }

  /**
   * Undoes a chat created for a first message the backend then refused: the draft goes back to
   * the new chat, and the empty conversation is removed (best effort), so nothing is left
   * half-made.
   */
  private abandon(conv: OpenConversation) {
    if (conv.messages.length > 0) return;
    drafts.move(conv.id, NEW_CHAT);
    if (this.selectedId === conv.id) {
      this.conversation = null;
      this.selectedId = null;
      remember(null);
    }
    conversations.items = conversations.items.filter((c) => c.id !== conv.id);
    api.deleteConversation(conv.id).catch(() => {
      // An empty chat left behind is harmless; the list shows it and it can be deleted.
      void conversations.load();
    });
  }

  private placeholder(seq: number): ChatMessage {
    return {
      id: `pending-assistant-${seq}`,
      role: 'assistant',
      content: '',
      status: 'partial',
      error: null,
      stats: null,
      createdAt: new Date().toISOString(),
      versions: null,
      attachment: null,
    };
  }

  /**
   * Runs one generation command: `prepare` edits the messages optimistically and returns the
   * command to call. On failure the messages are put back and a notice is shown.
   */
  private async start<R extends { assistantMessageId: string }>(
    conv: OpenConversation,
    prepare: (seq: number) => (onEvent: (e: ChatEvent) => void) => Promise<R>,
    retry: () => void,
    replaced: () => ChatMessage | null = () => null,
    versioned = false,
  ): Promise<(R & { seq: number }) | null> {
    const seq = ++this.genSeq;
    const before = conv.messages.slice();
    const command = prepare(seq);
    this.pending = '';
    this.live = {
      seq,
      conversationId: conv.id,
      messageId: `pending-assistant-${seq}`,
      text: '',
      startedAt: performance.now(),
      firstTokenAt: null,
      lastTokenAt: null,
      tokens: 0,
      generated: 0,
      promptStartedAt: null,
      loadMs: null,
      prompt: null,
      memory: null,
      stopping: false,
      replaces: replaced(),
      versioned,
    };
    try {
      const result = await command((event) => this.onEvent(seq, event));
      this.renameMessage(conv, `pending-assistant-${seq}`, result.assistantMessageId);
      if (this.live?.seq === seq) this.live.messageId = result.assistantMessageId;
      if (this.late?.seq === seq) this.late.messageId = result.assistantMessageId;
      void conversations.load();
      return { ...result, seq };
    } catch (err) {
      if (this.live?.seq === seq) this.live = null;
      conv.messages = before;
      const e = api.toApiError(err);
      // Retrying only helps when the failure may pass; `busy` and `no_model` have their own way out.
      const transient = ['database', 'internal', 'network', 'disk_full'].includes(e.kind);
      ui.error(e, transient ? { retry } : {});
      return null;
    }
  }

  private renameMessage(conv: OpenConversation, from: string, to: string) {
    const m = conv.messages.find((x) => x.id === from);
    if (m) m.id = to;
  }

  private onEvent(seq: number, event: ChatEvent) {
    const live = this.live;
    if (!live || live.seq !== seq) {
      this.onLateEnd(seq, event);
      return;
    }
    switch (event.kind) {
      case 'started':
        live.promptStartedAt = performance.now();
        live.loadMs = event.loadMs ?? null;
        live.prompt = { read: 0, total: event.promptTokens ?? 0, elapsedMs: 0 };
        live.memory = event.memory;
        break;
      case 'prefill':
        live.prompt = { read: event.read, total: event.total, elapsedMs: event.elapsedMs };
        live.memory = event.memory;
        break;
      case 'memory':
        // The prompt is read: the meter and its health before the first token.
        if (live.prompt) live.prompt = { ...live.prompt, read: live.prompt.total };
        live.memory = event.memory;
        break;
      case 'token': {
        const now = performance.now();
        if (live.firstTokenAt === null) live.firstTokenAt = now;
        live.lastTokenAt = now;
        live.tokens++;
        live.generated = Math.max(live.generated, event.generated ?? live.tokens);
        this.pending += event.text;
        if (this.frame === null) this.frame = setTimeout(() => this.flush(), FLUSH_MS);
        break;
      }
      case 'done':
        this.finish(seq, 'complete', event.stats, event.memory);
        break;
      case 'stopped':
        this.finish(seq, 'partial', event.stats, event.memory);
        break;
      case 'error': {
        this.flush();
        if (event.partial.length >= live.text.length) live.text = event.partial;
        const kind = event.errorKind ?? 'generation';
        this.finish(seq, 'error', null, null, event.message);
        ui.error(new api.ApiError(kind, event.message), { retry: () => void this.regenerate() });
        break;
      }
    }
  }

  private flush() {
    if (this.frame !== null) clearTimeout(this.frame);
    this.frame = null;
    if (this.live && this.pending) this.live.text += this.pending;
    this.pending = '';
  }

  /**
   * The backend's end of a stream this side already ended (Stop not confirmed in time): the
   * answer's stats and the meter become the backend's.
   */
  private onLateEnd(seq: number, event: ChatEvent) {
    const late = this.late;
    if (!late || late.seq !== seq || (event.kind !== 'stopped' && event.kind !== 'done')) return;
    this.late = null;
    const conv = this.conversation;
    if (!conv || conv.id !== late.conversationId) return;
    const m = conv.messages.find((x) => x.id === late.messageId);
    if (m) m.stats = event.stats;
    conv.memory = event.memory;
  }

  private finish(
    seq: number,
    status: Message['status'],
    stats: Stats | null,
    memory: MemoryInfo | null,
    errorText?: string,
  ) {
    this.flush();
    const live = this.live;
    if (!live || live.seq !== seq) return;
    // A stream ended here after Stop (no backend meter yet): the meter last shown stays, as the
    // stopped memory keeps what it read. After an error the memory goes back to its last
    // snapshot (docs/ipc.md): the meter from before the turn stays.
    const stoppedHere = !memory && status === 'partial' && live.memory;
    const shown = memory ?? (stoppedHere ? (this.liveHere === live ? this.memory : live.memory) : null);
    this.live = null;
    const conv = this.conversation;
    if (conv && conv.id === live.conversationId) {
      const i = conv.messages.findIndex((x) => x.id === live.messageId);
      const m = conv.messages[i];
      if (m && live.replaces && status !== 'complete' && live.tokens === 0 && !live.text) {
        // A regenerate that ended before its first token: the backend kept the old answer.
        conv.messages[i] = live.replaces;
        void conversations.load();
        return;
      }
      if (m) {
        m.content = live.text;
        m.status = status;
        m.stats = stats;
        if (errorText) m.errorText = errorText;
      }
      if (shown) conv.memory = shown;
      if (live.versioned) void this.refreshVersions(conv.id);
    }
    void conversations.load();
  }

  /** After a regenerate or an edit: the backend's versions of the messages on screen (‹ 2/3 ›). */
  private async refreshVersions(id: string) {
    try {
      const fresh = await api.getConversation(id);
      const conv = this.conversation;
      if (!conv || conv.id !== id || this.live) return;
      for (const m of conv.messages) m.versions = fresh.messages.find((f) => f.id === m.id)?.versions ?? null;
    } catch (err) {
      // Only the pager waits: it shows when the conversation is opened again.
      console.warn('cannot refresh the versions', err);
    }
  }
}

export const chat = new ChatStore();
