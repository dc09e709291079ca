// The library of saved memories (a conversation's state under a name): listed most recent
// first, saved from a chat, renamed, deleted, and new chats started from one.

import * as api from '../services/api';
import type { SavedMemory } from '../services/types';
import { chat } from './chat.svelte';
import { conversations } from './conversations.svelte';
import { ui } from './ui.svelte';

class MemoriesStore {
  items = $state<SavedMemory[]>([]);
  loaded = $state(false);
  loadError = $state<api.ApiError | null>(null);
  private seq = 0;

  async load() {
    const seq = ++this.seq;
    try {
      const items = await api.listMemories();
      if (seq !== this.seq) return;
      this.items = items;
      this.loadError = null;
    } catch (err) {
      if (seq !== this.seq) return;
      this.loadError = api.toApiError(err);
    } finally {
      if (seq === this.seq) this.loaded = true;
    }
  }

  /**
   * Saves the open chat's memory as `name`. Rejects with the backend's `ApiError` (a refused
   * name names its field), for the dialog to show beside it.
   */
  async save(conversationId: string, name: string): Promise<SavedMemory> {
    const saved = await api.saveMemory(conversationId, name);
    this.items = [saved, ...this.items.filter((m) => m.id !== saved.id)];
    ui.info('Memory saved', `“${saved.name}” is in Memories: start a new chat from it there.`);
    return saved;
  }

  async rename(id: string, name: string): Promise<boolean> {
    try {
      await api.renameMemory(id, name);
      const m = this.items.find((x) => x.id === id);
      if (m) m.name = name.trim();
      return true;
    } catch (err) {
      ui.error(err, { context: 'Renaming the memory' });
      return false;
    }
  }

  async remove(id: string): Promise<boolean> {
    try {
      await api.deleteMemory(id);
      this.items = this.items.filter((m) => m.id !== id);
      return true;
    } catch (err) {
      ui.error(err, { context: 'Deleting the memory' });
      void this.load();
      return false;
    }
  }

  /** A new chat whose memory starts as the saved one, opened. */
  async newChat(id: string): Promise<boolean> {
    try {
      const summary = await api.newChatFromMemory(id);
      conversations.upsert(summary);
      await chat.open(summary.id);
      return true;
    } catch (err) {
      ui.error(err, { context: 'Starting a chat from the memory' });
      return false;
    }
  }
}

export const memories = new MemoriesStore();
