// The sidebar's list: conversation summaries, most recent first, filtered by the search query
// on the backend (titles and messages). Searches are debounced and answered in order (a slow
// old answer never replaces a newer one).

import * as api from '../services/api';
import type { ConversationSummary, ExportFormat } from '../services/types';
import { ui } from './ui.svelte';

const SEARCH_DELAY_MS = 150;

class ConversationsStore {
  items = $state<ConversationSummary[]>([]);
  query = $state('');
  loaded = $state(false);
  loadError = $state<api.ApiError | null>(null);
  private seq = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;

  async load() {
    const seq = ++this.seq;
    const q = this.query.trim();
    try {
      const items = await api.listConversations(q ? q : null);
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

  search(query: string) {
    this.query = query;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.load(), SEARCH_DELAY_MS);
  }

  /** Puts a summary at the top (a new or just-updated conversation) without a round trip. */
  upsert(summary: ConversationSummary) {
    this.items = [summary, ...this.items.filter((c) => c.id !== summary.id)];
  }

  async rename(id: string, title: string): Promise<boolean> {
    const clean = title.trim();
    if (!clean) return false;
    try {
      await api.renameConversation(id, clean);
      const item = this.items.find((c) => c.id === id);
      if (item) item.title = clean;
      return true;
    } catch (err) {
      ui.error(err, { context: 'Renaming', retry: () => void this.rename(id, clean) });
      return false;
    }
  }

  async remove(id: string): Promise<boolean> {
    try {
      await api.deleteConversation(id);
      this.items = this.items.filter((c) => c.id !== id);
      return true;
    } catch (err) {
      ui.error(err, { context: 'Deleting', retry: () => void this.remove(id) });
      void this.load();
      return false;
    }
  }

  async exportAs(id: string, format: ExportFormat) {
    try {
      // The native save dialog (the backend writes the file); null: the user cancelled.
      const path = await api.saveConversation(id, format);
      if (path) ui.info('Conversation exported', `Saved to ${path}.`);
    } catch (err) {
      ui.error(err, { context: 'Exporting', retry: () => void this.exportAs(id, format) });
    }
  }
}

export const conversations = new ConversationsStore();
