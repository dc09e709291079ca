// Small, pure formatting helpers for numbers, sizes, speeds and dates.

const nf = new Intl.NumberFormat(undefined);

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

/** Seconds left at the current speed, as "12 s" / "3 min" / "2 h". */
export function formatEta(remainingBytes: number, bytesPerSec: number): string {
  if (bytesPerSec <= 0) return '';
  const s = remainingBytes / bytesPerSec;
  if (s < 60) return `${Math.ceil(s)} s left`;
  if (s < 3600) return `${Math.ceil(s / 60)} min left`;
  return `${(s / 3600).toFixed(1)} h left`;
}

export function formatMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
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
