// Words for the memory's health (MemoryHealth of docs/ipc.md): the meter's label, its tooltip and
// the chat's warning. Pure functions; nothing here knows Svelte or the DOM.

import type { MemoryHealth } from '../services/types';

/** The health of a memory nothing has been measured on. */
export const UNKNOWN_HEALTH: MemoryHealth = {
  verdict: 'unknown',
  earlyPerplexity: null,
  recentPerplexity: null,
  ratio: null,
};

const VERDICT_WORD: Record<MemoryHealth['verdict'], string> = {
  unknown: 'not measured yet',
  healthy: 'healthy',
  strained: 'strained',
  broken: 'broken',
};

function perplexity(p: number): string {
  return p >= 100 ? String(Math.round(p)) : p >= 10 ? p.toFixed(0) : p.toFixed(1);
}

/** "2.3×", "12×". */
export function formatRatio(ratio: number): string {
  return `${ratio >= 10 ? Math.round(ratio) : ratio.toFixed(1)}×`;
}

/** The meter's line: "Memory: healthy · perplexity 24 → 26". */
export function healthLabel(h: MemoryHealth): string {
  const word = `Memory: ${VERDICT_WORD[h.verdict] ?? h.verdict}`;
  if (h.earlyPerplexity === null || h.recentPerplexity === null) return word;
  return `${word} · perplexity ${perplexity(h.earlyPerplexity)} → ${perplexity(h.recentPerplexity)}`;
}

/** What the figures mean, for the tooltip. */
export function healthExplanation(h: MemoryHealth): string {
  const how =
    'Perplexity is how surprised the model is by the conversation text it reads (lower is better): ' +
    'the first figure is over the start of the conversation, the second over the most recent text. ';
  switch (h.verdict) {
    case 'unknown':
      return how + 'A few hundred tokens are needed before the memory can be judged.';
    case 'healthy':
      return how + 'Recent text is about as predictable as the start: the recurrent memory is helping, or at least not hurting.';
    case 'strained':
      return how + 'Recent text reads noticeably more surprising than the start: the recurrent memory may be starting to blur the model.';
    case 'broken':
      return how + 'The model no longer predicts the text: its recurrent memory has drowned it, and its answers are unreliable.';
  }
}

/** Most tokens a memory rebuilt after `reset_memory` reads (docs/ipc.md), besides its window. */
export const FRESH_MEMORY_TOKENS = 1024;

/** How many tokens a fresh memory with this window reads at most (0: window unknown). */
export function freshMemoryTokens(windowSize: number): number {
  return windowSize > 0 ? Math.min(windowSize, FRESH_MEMORY_TOKENS) : FRESH_MEMORY_TOKENS;
}

/** How much more surprising the recent text is, for the warnings ("7.7×"), or null. */
export function surpriseRatio(h: MemoryHealth): string | null {
  return h.ratio !== null && Number.isFinite(h.ratio) ? formatRatio(h.ratio) : null;
}
