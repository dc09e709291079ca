// The sampling form's fields (the Settings screen and a chat's own settings share them), and the
// settings forms' errors: beside the field a backend refusal names (`sampling.topP: …` → `topP`).

import { toApiError } from '../services/api';
import { SETTINGS_LIMITS, type Sampling } from '../services/types';
import { helpFor } from './errors';

export type NumField = { key: Exclude<keyof Sampling, 'seed'>; label: string; min: number; max?: number; step: number; help: string };

export const samplingFields: NumField[] = [
  { key: 'temperature', label: 'Temperature', min: 0, max: 5, step: 0.05, help: '0 always picks the likeliest token.' },
  { key: 'topK', label: 'Top-k', min: 0, max: SETTINGS_LIMITS.topK, step: 1, help: '0 turns it off.' },
  { key: 'topP', label: 'Top-p', min: 0.01, max: 1, step: 0.01, help: '1 turns it off.' },
  { key: 'minP', label: 'Min-p', min: 0, max: 0.99, step: 0.01, help: '0 turns it off.' },
  { key: 'repeatPenalty', label: 'Repeat penalty', min: 1, max: 2, step: 0.01, help: '1 turns it off.' },
  { key: 'repeatLastN', label: 'Repeat window', min: 0, max: SETTINGS_LIMITS.repeatLastN, step: 1, help: 'Tokens the penalty looks back over.' },
  { key: 'maxNewTokens', label: 'Max new tokens', min: 1, max: SETTINGS_LIMITS.maxNewTokens, step: 1, help: 'Longest answer.' },
];

/** The field a backend `invalid_settings` message names first (`sampling.topP: …` → `topP`). */
export function fieldOf(message: string): string | null {
  const m = /^([A-Za-z.]+)\s*:/.exec(message);
  return m ? m[1].split('.').pop() ?? null : null;
}

/** The first sampling field that is not a number (an emptied input), as an error to show. */
export function missingNumber(s: Sampling): { field: string; message: string } | null {
  for (const f of samplingFields) {
    const v = s[f.key];
    if (typeof v !== 'number' || !Number.isFinite(v)) return { field: f.key, message: `${f.key}: a number is needed` };
  }
  return null;
}

/** An error as the settings forms show it: beside `field` when there is one. */
export type FormError = { field: string | null; message: string; title: string };

/** A value caught before anything is sent (`field: why`). */
export function localError(local: { field: string; message: string }): FormError {
  return { ...local, title: helpFor('invalid_settings').title };
}

/** A save the backend refused: beside its field when it names one. */
export function saveError(err: unknown): FormError {
  const e = toApiError(err);
  return { field: e.kind === 'invalid_settings' ? fieldOf(e.message) : null, message: e.message, title: helpFor(e.kind).title };
}
