// The sidebar's list: conversation summaries, pinned first then most recent first, filtered by
// the search query on the backend (titles and messages); or the archived ones. Searches are
// debounced and answered in order (a slow old answer never replaces a newer one).

import * as api from '../services/api';
import type { ConversationSummary, ExportFormat } from '../services/types';
import { ui } from './ui.svelte';

const SEARCH_DELAY_MS = 150;

class ConversationsStore {
  items = $state<ConversationSummary[]>([]);
  query = $state('');
  loaded = $state(false);
  loadError = $state<api.ApiError | null>(null);
  /** The archived conversations are listed instead of the others. */
  archivedView = $state(false);
  private seq = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;

  async load() {
    const seq = ++this.seq;
    const q = this.query.trim();
    try {
      const items = this.archivedView ? await api.listArchivedConversations() : await api.listConversations(q ? q : null);
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
    // The search is over the main list: typing leaves the archived one.
    if (this.archivedView && query.trim()) this.archivedView = false;
    this.query = query;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.load(), SEARCH_DELAY_MS);
  }

  /** Puts a summary at the top (a new or just-updated conversation) without a round trip. */
  upsert(summary: ConversationSummary) {
    if (this.archivedView) return;
    this.items = [summary, ...this.items.filter((c) => c.id !== summary.id)];
  }

  /** Lists the archived conversations (true) or the others (false). */
  showArchived(archived: boolean) {
    if (this.archivedView === archived) return;
    this.archivedView = archived;
    this.items = [];
    this.loaded = false;
    void this.load();
  }

  async setPinned(id: string, pinned: boolean): Promise<boolean> {
    try {
      await api.setConversationPinned(id, pinned);
      await this.load();
      return true;
    } catch (err) {
      ui.error(err, { context: pinned ? 'Pinning' : 'Unpinning' });
      return false;
    }
  }

  /** Archives a conversation (it leaves this list for the archived one) or restores it. */
  async setArchived(id: string, archived: boolean): Promise<boolean> {
    try {
      await api.setConversationArchived(id, archived);
      this.items = this.items.filter((c) => c.id !== id);
      ui.info(archived ? 'Chat archived' : 'Chat restored', archived ? 'It is under “Archived chats”.' : 'It is back in the list.');
      return true;
    } catch (err) {
      ui.error(err, { context: archived ? 'Archiving' : 'Restoring' });
      return false;
    }
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
