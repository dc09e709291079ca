// The backend's settings and device facts. `save` sends the whole object (the contract's
// set_settings) and keeps what the backend returns; the theme is applied from here.

import * as api from '../services/api';
import type { ApiServerStatus, DeviceInfo, Settings } from '../services/types';
import { applyTheme, ui } from './ui.svelte';

class SettingsStore {
  value = $state<Settings | null>(null);
  device = $state<DeviceInfo | null>(null);
  loadError = $state<api.ApiError | null>(null);
  /** The local API server's state (null until asked). */
  apiServer = $state<ApiServerStatus | null>(null);

  /** Whether a model and variant are chosen, so a message can be sent. */
  get ready(): boolean {
    return !!this.value?.modelRepo && !!this.value?.variant;
  }

  async load() {
    try {
      const [value, device] = await Promise.all([api.getSettings(), api.deviceInfo()]);
      this.value = value;
      this.device = device;
      this.loadError = null;
      applyTheme(value.theme);
    } catch (err) {
      this.loadError = api.toApiError(err);
      ui.error(err, { context: 'Loading settings', retry: () => void this.load() });
    }
  }

  /** Saves; on a validation error throws the ApiError so the form can show it by its field. */
  async save(next: Settings): Promise<Settings> {
    const saved = await api.setSettings($state.snapshot(next) as Settings);
    this.value = saved;
    applyTheme(saved.theme);
    try {
      this.device = await api.deviceInfo();
    } catch {
      // The device line is informative; the settings were saved.
    }
    await this.loadApiServer();
    return saved;
  }

  /** Asks whether the local API server listens (its status line in Settings). */
  async loadApiServer() {
    try {
      this.apiServer = await api.apiServerStatus();
    } catch (err) {
      this.apiServer = { state: 'failed', message: api.toApiError(err).message };
    }
  }

  async setToken(token: string | null) {
    await api.setHfToken(token);
    if (this.value) this.value = { ...this.value, hfTokenSet: token !== null };
    // The backend is the authority on whether a token is stored.
    try {
      this.value = await api.getSettings();
    } catch {
      // keep the optimistic value
    }
  }

  /** Chooses a model and variant (from the model manager's "Use"). */
  /** Opens the app's log folder in the file manager; resolves with its path (throws the ApiError). */
  openLogsFolder(): Promise<string> {
    return api.openLogsFolder();
  }

  async use(repoId: string, variant: string) {
    if (!this.value) await this.load();
    if (!this.value) return;
    await this.save({ ...this.value, modelRepo: repoId, variant });
  }
}

export const settings = new SettingsStore();
