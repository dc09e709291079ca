// What the user is writing, per conversation (key `new` for a chat not created yet). Drafts
// survive switching conversations, failed sends and restarts (localStorage, written after a
// short pause so a 1 MB paste is not serialised on every keystroke). A draft is cleared only
// once the backend has accepted the message.

const STORAGE_KEY = 'tptt-chat.drafts';
const SAVE_DELAY_MS = 400;

export const NEW_CHAT = 'new';

function load(): Record<string, string> {
  try {
    const raw = localStorage.getItem(STORAGE_KEY);
    const parsed: unknown = raw ? JSON.parse(raw) : {};
    if (parsed && typeof parsed === 'object') {
      return Object.fromEntries(
        Object.entries(parsed as Record<string, unknown>).filter(([, v]) => typeof v === 'string'),
      ) as Record<string, string>;
    }
  } catch {
    // A corrupt entry is dropped; drafts are a convenience, never the only copy of sent text.
  }
  return {};
}

class DraftStore {
  private texts = $state<Record<string, string>>(load());
  private timer: ReturnType<typeof setTimeout> | null = null;

  get(key: string): string {
    return this.texts[key] ?? '';
  }

  set(key: string, text: string) {
    if ((this.texts[key] ?? '') === text) return;
    if (text) this.texts[key] = text;
    else delete this.texts[key];
    this.scheduleSave();
  }

  /** Moves a draft to another key (a new chat that just got its id). */
  move(from: string, to: string) {
    const text = this.texts[from];
    if (text === undefined) return;
    delete this.texts[from];
    this.texts[to] = text;
    this.scheduleSave();
  }

  clear(key: string) {
    this.set(key, '');
  }

  private scheduleSave() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => this.flush(), SAVE_DELAY_MS);
  }

  flush() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify($state.snapshot(this.texts)));
    } catch {
      // Over quota: the drafts stay in memory for this session.
    }
  }
}

export const drafts = new DraftStore();

if (typeof window !== 'undefined') {
  window.addEventListener('pagehide', () => drafts.flush());
}
