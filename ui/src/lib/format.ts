// Small, pure formatting helpers for numbers, sizes, speeds and dates.

/**
 * The user's number format, if it groups thousands; else (no locale set: the webview falls back
 * to a POSIX locale that does not group) English grouping, "16,266".
 */
export function intFormat(locale: string | undefined = undefined): Intl.NumberFormat {
  const own = new Intl.NumberFormat(locale, { maximumFractionDigits: 0 });
  return /^\d+$/.test(own.format(1_234_567)) ? new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 }) : own;
}

const nf = intFormat();

export function formatInt(n: number): string {
  return nf.format(Math.round(n));
}

const UNITS = ['B', 'KB', 'MB', 'GB', 'TB'];

/** 1536 → "1.5 KB" (binary multiples, the way file managers show model sizes). */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return '—';
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

export function formatSpeed(bytesPerSec: number): string {
  return `${formatBytes(bytesPerSec)}/s`;
}

/** A wait: "253 ms", "2.91 s", "6 min 39 s", "1 h 02 min". */
export function formatMs(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(2)} s`;
  const s = Math.round(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
}

/** Time left for `remaining` units at `perSecond`: "12 s left", "5 min left", "1.2 h left". */
export function formatTimeLeft(remaining: number, perSecond: number): string {
  if (!(perSecond > 0)) return '';
  const s = remaining / perSecond;
  if (s < 60) return `${Math.ceil(s)} s left`;
  if (s < 3600) return `${Math.ceil(s / 60)} min left`;
  return `${(s / 3600).toFixed(1)} h left`;
}

export function formatRate(perSecond: number): string {
  return perSecond >= 100 ? `${Math.round(perSecond)}` : perSecond.toFixed(1);
}

/** "14:02" today, "Mon" this week, "3 Mar" this year, else "3 Mar 2024". */
export function formatWhen(iso: string, today = new Date()): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  const sameDay = d.toDateString() === today.toDateString();
  if (sameDay) return d.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
  const days = (today.getTime() - d.getTime()) / 86_400_000;
  if (days < 6) return d.toLocaleDateString(undefined, { weekday: 'short' });
  if (d.getFullYear() === today.getFullYear()) {
    return d.toLocaleDateString(undefined, { day: 'numeric', month: 'short' });
  }
  return d.toLocaleDateString(undefined, { day: 'numeric', month: 'short', year: 'numeric' });
}

/** A conversation title from the first line of its first message. */
export function titleFrom(text: string, max = 60): string {
  const line = text.trim().split('\n').find((l) => l.trim()) ?? '';
  const clean = line.replace(/\s+/g, ' ').replace(/^#+\s*/, '').trim();
  if (!clean) return 'New chat';
  return clean.length > max ? `${clean.slice(0, max - 1).trimEnd()}…` : clean;
}
