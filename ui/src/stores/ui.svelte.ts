// App-wide UI state: which screen is shown, the notices (errors with a way forward), focus
// requests that cross components (Ctrl/Cmd+K → search), and the applied theme.

import { ApiError } from '../services/api';
import { helpFor, type Remedy } from '../lib/errors';
import type { Theme } from '../services/types';

export type Screen = 'chat' | 'models' | 'memories' | 'settings';

export interface NoticeAction {
  label: string;
  run: () => void;
}

export interface Notice {
  id: number;
  tone: 'error' | 'info';
  title: string;
  detail: string;
  hint: string;
  actions: NoticeAction[];
}

class UiStore {
  screen = $state<Screen>('chat');
  notices = $state<Notice[]>([]);
  /** Bumped to ask the sidebar's search box for focus. */
  searchFocus = $state(0);
  /** Bumped to ask the composer for focus. */
  composerFocus = $state(0);
  private nextId = 1;

  show(screen: Screen) {
    this.screen = screen;
  }

  info(title: string, detail = '') {
    return this.push({ tone: 'info', title, detail, hint: '', actions: [] });
  }

  /**
   * Shows an error with its way forward: the kind's remedy (open a screen) and, when given,
   * a retry of what failed.
   */
  error(err: unknown, options: { retry?: () => void; context?: string } = {}) {
    const e = err instanceof ApiError ? err : new ApiError('internal', String(err));
    const help = helpFor(e.kind);
    const actions: NoticeAction[] = [];
    const remedy: Remedy = help.remedy;
    if (remedy === 'open-models') actions.push({ label: 'Open model manager', run: () => this.show('models') });
    if (remedy === 'open-settings') actions.push({ label: 'Open settings', run: () => this.show('settings') });
    if (options.retry) actions.push({ label: 'Retry', run: options.retry });
    return this.push({
      tone: 'error',
      title: options.context ? `${options.context}: ${help.title.toLowerCase()}` : help.title,
      detail: e.message,
      hint: help.hint,
      actions,
    });
  }

  private push(n: Omit<Notice, 'id'>): number {
    const id = this.nextId++;
    // The same message twice in a row is shown once.
    this.notices = [
      ...this.notices.filter((x) => !(x.title === n.title && x.detail === n.detail)),
      { ...n, id },
    ].slice(-4);
    if (n.tone === 'info') setTimeout(() => this.dismiss(id), 4000);
    return id;
  }

  dismiss(id: number) {
    this.notices = this.notices.filter((n) => n.id !== id);
  }

  focusSearch() {
    this.searchFocus++;
  }

  focusComposer() {
    this.composerFocus++;
  }
}

export const ui = new UiStore();

/** Applies a theme to the document (`system` follows the OS through CSS). */
export function applyTheme(theme: Theme) {
  document.documentElement.dataset.theme = theme;
}
