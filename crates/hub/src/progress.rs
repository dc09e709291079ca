//! Download progress as the UI shows it: [`Progress`] events and the [`SpeedMeter`] behind
//! their `bytes_per_sec`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What a [`Progress`] event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressKind {
    /// A file's transfer starts; `file_bytes` counts what an earlier attempt left (resume).
    FileStarted,
    /// Bytes arrived (at most about ten events a second).
    Bytes,
    /// The file was verified (size, SHA-256 when known) and is in the snapshot.
    FileDone,
    /// The file was already complete in the cache: nothing was transferred.
    FileReused,
    /// Every file is complete: `done_bytes == total_bytes`, `files_done == files_total`.
    Finished,
}

/// One progress event of a download; the callback receives it by reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// What happened.
    pub kind: ProgressKind,
    /// The repository of the current file (the TPTT repo or its base model).
    pub repo_id: String,
    /// The current file, relative to its repository (empty on [`ProgressKind::Finished`]).
    pub path: String,
    /// Bytes of the current file on disk, including those resumed from an earlier attempt.
    pub file_bytes: u64,
    /// Size of the current file.
    pub file_size: u64,
    /// Bytes of the whole download complete so far (reused and resumed bytes included).
    pub done_bytes: u64,
    /// Bytes of the whole download (every file, reused ones included).
    pub total_bytes: u64,
    /// Files complete so far.
    pub files_done: usize,
    /// Files in the whole download.
    pub files_total: usize,
    /// Recent network speed in bytes per second (over the last few seconds; 0 when idle).
    pub bytes_per_sec: f64,
}

/// Network speed over a sliding window of recent samples.
#[derive(Debug, Clone)]
pub struct SpeedMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl Default for SpeedMeter {
    fn default() -> Self {
        Self::new(Duration::from_secs(3))
    }
}

impl SpeedMeter {
    /// A meter averaging over `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Record that `total` bytes have been transferred by `now` (a running total).
    pub fn record(&mut self, now: Instant, total: u64) {
        self.samples.push_back((now, total));
        // Keep one sample older than the window, so the rate spans the whole window.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the window (0 with fewer than two samples).
    pub fn rate(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                b1.saturating_sub(*b0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speed_is_bytes_over_the_window() {
        let t0 = Instant::now();
        let mut m = SpeedMeter::new(Duration::from_secs(2));
        assert_eq!(m.rate(), 0.0);
        m.record(t0, 0);
        assert_eq!(m.rate(), 0.0);
        m.record(t0 + Duration::from_secs(1), 1000);
        assert!((m.rate() - 1000.0).abs() < 1e-9);
        // A faster second half: the old samples fall out of the window.
        for s in 2..=6 {
            m.record(t0 + Duration::from_secs(s), 1000 + (s - 1) * 4000);
        }
        assert!((m.rate() - 4000.0).abs() < 1e-9, "{}", m.rate());
    }
}
