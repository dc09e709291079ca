// The model manager's state: the catalog/added/imported models and the downloads in flight,
// keyed by `repoId::variant`. A download's channel keeps feeding this store while the user is on
// another screen.

import * as api from '../services/api';
import type { DownloadEvent, ErrorKind, ModelEntry } from '../services/types';
import { settings } from './settings.svelte';
import { ui } from './ui.svelte';

export interface DownloadState {
  status: 'starting' | 'running' | 'error';
  file: string;
  fileBytes: number;
  fileTotal: number;
  bytes: number;
  total: number;
  bytesPerSec: number;
  errorKind: ErrorKind | null;
  error: string | null;
}

export const downloadKey = (repoId: string, variant: string) => `${repoId}::${variant}`;

class ModelsStore {
  items = $state<ModelEntry[]>([]);
  loaded = $state(false);
  loadError = $state<api.ApiError | null>(null);
  downloads = $state<Record<string, DownloadState>>({});
  /** Repos whose variants are being listed. */
  listing = $state<Record<string, boolean>>({});
  /** Per-repo listing errors. */
  listErrors = $state<Record<string, api.ApiError>>({});

  /** Models with at least one downloaded variant. */
  get usable(): ModelEntry[] {
    return this.items.filter((m) => m.variants?.some((v) => v.downloaded));
  }

  async load() {
    try {
      this.items = await api.listModels();
      this.loadError = null;
    } catch (err) {
      this.loadError = api.toApiError(err);
    } finally {
      this.loaded = true;
    }
  }

  private replace(entry: ModelEntry) {
    const i = this.items.findIndex((m) => m.repoId === entry.repoId);
    if (i >= 0) this.items[i] = entry;
    else this.items.push(entry);
  }

  async refresh(repoId: string) {
    if (this.listing[repoId]) return;
    this.listing[repoId] = true;
    delete this.listErrors[repoId];
    try {
      const variants = await api.refreshVariants(repoId);
      const m = this.items.find((x) => x.repoId === repoId);
      if (m) m.variants = variants;
    } catch (err) {
      this.listErrors[repoId] = api.toApiError(err);
    } finally {
      delete this.listing[repoId];
    }
  }

  /** Adds a repo by id; throws the ApiError for the form to show. */
  async add(repoId: string): Promise<ModelEntry> {
    const entry = await api.addModel(repoId.trim());
    this.replace(entry);
    if (entry.variants === null) void this.refresh(entry.repoId);
    return entry;
  }

  /**
   * Imports a folder. When no model is chosen yet, its first variant becomes the one in use (as
   * the first download does); the variant chosen is returned with the entry (null: none was).
   */
  async importLocal(path: string): Promise<{ entry: ModelEntry; chosen: string | null }> {
    const entry = await api.importLocalModel(path.trim());
    this.replace(entry);
    const first = entry.variants?.find((v) => v.downloaded)?.name ?? null;
    if (!first || !settings.value || settings.ready) return { entry, chosen: null };
    try {
      await settings.use(entry.repoId, first);
      return { entry, chosen: first };
    } catch (err) {
      ui.error(err, { context: 'Choosing the model' });
      return { entry, chosen: null };
    }
  }

  /** The native folder dialog: the folder chosen, or null (cancelled). Throws the ApiError. */
  pickFolder(): Promise<string | null> {
    return api.pickModelFolder();
  }

  async download(repoId: string, variant: string) {
    const key = downloadKey(repoId, variant);
    const current = this.downloads[key];
    if (current && current.status !== 'error') return;
    this.downloads[key] = {
      status: 'starting',
      file: '',
      fileBytes: 0,
      fileTotal: 0,
      bytes: current?.bytes ?? 0,
      total: current?.total ?? 0,
      bytesPerSec: 0,
      errorKind: null,
      error: null,
    };
    const onEvent = (event: DownloadEvent) => this.onDownloadEvent(repoId, variant, event);
    try {
      await api.downloadVariant(repoId, variant, onEvent);
    } catch (err) {
      const e = api.toApiError(err);
      const d = this.downloads[key];
      if (d) {
        d.status = 'error';
        d.errorKind = e.kind;
        d.error = e.message;
      }
    }
  }

  private onDownloadEvent(repoId: string, variant: string, event: DownloadEvent) {
    const key = downloadKey(repoId, variant);
    const d = this.downloads[key];
    switch (event.kind) {
      case 'progress':
        if (!d) return;
        d.status = 'running';
        d.file = event.file;
        d.fileBytes = event.fileBytes;
        d.fileTotal = event.fileTotal;
        d.bytes = event.bytes;
        d.total = event.total;
        d.bytesPerSec = event.bytesPerSec;
        break;
      case 'done': {
        delete this.downloads[key];
        const v = this.items.find((m) => m.repoId === repoId)?.variants?.find((x) => x.name === variant);
        if (v) v.downloaded = true;
        ui.info('Download complete', `${repoId} · ${variant} is ready to use.`);
        // The first model downloaded becomes the one in use.
        if (settings.value && !settings.ready) {
          settings.use(repoId, variant).catch((err) => ui.error(err, { context: 'Choosing the model' }));
        }
        void this.load();
        break;
      }
      case 'cancelled':
        delete this.downloads[key];
        break;
      case 'error':
        if (!d) return;
        d.status = 'error';
        d.errorKind = event.errorKind ?? 'download';
        d.error = event.message;
        break;
    }
  }

  async cancel(repoId: string, variant: string) {
    const key = downloadKey(repoId, variant);
    try {
      await api.cancelDownload(repoId, variant);
      // The channel's `cancelled` event clears the entry; a download that never started has none.
      if (this.downloads[key]?.status === 'starting') delete this.downloads[key];
    } catch (err) {
      ui.error(err, { context: 'Cancelling the download' });
    }
  }

  /** Clears a failed download's error (the user chose not to retry). */
  dismiss(repoId: string, variant: string) {
    delete this.downloads[downloadKey(repoId, variant)];
  }

  async remove(repoId: string, variant: string) {
    try {
      await api.removeVariant(repoId, variant);
      const v = this.items.find((m) => m.repoId === repoId)?.variants?.find((x) => x.name === variant);
      if (v) v.downloaded = false;
      await settings.load();
    } catch (err) {
      ui.error(err, { context: 'Removing the variant' });
    }
  }
}

export const models = new ModelsStore();
