//! One file from the hub into the cache: reuse, resume, verify, cancel.
//!
//! For each file: a complete snapshot entry is reused without any request; else a `HEAD` gives
//! the blob name and size; an existing complete blob is linked; else the bytes go to
//! `blobs/{etag}.incomplete`, resumed from its length with a `Range` request, checked
//! (size always, SHA-256 when the hub announced one), synced, and only then renamed to
//! `blobs/{etag}` and linked from the snapshot. A corrupt file is deleted; an interrupted or
//! cancelled one stays `.incomplete` for the next attempt (and `.tptt/@partial/{etag}` notes
//! which paths it is for, so that removing their variant deletes it). Everything from the
//! `.incomplete` file's opening to the snapshot link happens under the blob's lock
//! (`lock.rs`); a download that finds it held waits, then reuses the blob the other one
//! completed (or resumes the partial file it left).
//!
//! Sizes are the `HEAD`'s: bytes past it are never written (the file is refused and deleted,
//! so a body that never ends is cut off), fewer is a broken transfer (resumed).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use crate::cache::{self, RepoCache};
use crate::error::{display_url, io_error, network, Error, Result};
use crate::http::{content_range_start, is_sha256, FileMeta};
use crate::lock::BlobLock;
use crate::progress::{Progress, ProgressKind, SpeedMeter};
use crate::{Hub, RepoFile, RepoInfo, MAX_JSON_FILE_BYTES};

/// Read size per chunk; the cancel flag is checked between chunks.
const CHUNK: usize = 64 * 1024;
/// Minimum interval between two [`ProgressKind::Bytes`] events.
const EMIT_EVERY: Duration = Duration::from_millis(100);

/// Progress bookkeeping and the cancel flag for one call.
pub(crate) struct Transfer<'a> {
    sink: Option<&'a mut dyn FnMut(&Progress)>,
    cancel: &'a AtomicBool,
    ev: Progress,
    /// Bytes of the files complete so far.
    done_files_bytes: u64,
    meter: SpeedMeter,
    net_bytes: u64,
    last_emit: Option<Instant>,
}

impl<'a> Transfer<'a> {
    pub(crate) fn new(sink: Option<&'a mut dyn FnMut(&Progress)>, cancel: &'a AtomicBool) -> Self {
        Self {
            sink,
            cancel,
            ev: Progress {
                kind: ProgressKind::FileStarted,
                repo_id: String::new(),
                path: String::new(),
                file_bytes: 0,
                file_size: 0,
                done_bytes: 0,
                total_bytes: 0,
                files_done: 0,
                files_total: 0,
                bytes_per_sec: 0.0,
            },
            done_files_bytes: 0,
            meter: SpeedMeter::default(),
            net_bytes: 0,
            last_emit: None,
        }
    }

    pub(crate) fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    pub(crate) fn set_plan(&mut self, total_bytes: u64, files_total: usize) {
        self.ev.total_bytes = total_bytes;
        self.ev.files_total = files_total;
    }

    fn emit(&mut self, kind: ProgressKind) {
        self.ev.kind = kind;
        self.ev.done_bytes = self.done_files_bytes + self.ev.file_bytes;
        self.ev.bytes_per_sec = self.meter.rate();
        if let Some(sink) = self.sink.as_mut() {
            sink(&self.ev);
        }
    }

    fn set_file(&mut self, repo_id: &str, path: &str, size: u64, on_disk: u64) {
        if self.ev.repo_id != repo_id {
            self.ev.repo_id = repo_id.to_string();
        }
        self.ev.path.clear();
        self.ev.path.push_str(path);
        self.ev.file_size = size;
        self.ev.file_bytes = on_disk;
    }

    /// The listing's size was `planned`, the file turned out to be `actual` bytes.
    fn correct_total(&mut self, planned: u64, actual: u64) {
        self.ev.total_bytes = self
            .ev
            .total_bytes
            .saturating_sub(planned)
            .saturating_add(actual);
    }

    fn file_started(&mut self, repo_id: &str, path: &str, size: u64, on_disk: u64) {
        self.set_file(repo_id, path, size, on_disk);
        self.meter.record(Instant::now(), self.net_bytes);
        self.emit(ProgressKind::FileStarted);
    }

    fn bytes(&mut self, file_bytes: u64, received: u64) {
        self.ev.file_bytes = file_bytes;
        self.net_bytes += received;
        let now = Instant::now();
        if self
            .last_emit
            .is_none_or(|t| now.duration_since(t) >= EMIT_EVERY)
        {
            self.last_emit = Some(now);
            self.meter.record(now, self.net_bytes);
            self.emit(ProgressKind::Bytes);
        }
    }

    fn file_finished(&mut self, kind: ProgressKind) {
        self.ev.file_bytes = self.ev.file_size;
        self.meter.record(Instant::now(), self.net_bytes);
        self.emit(kind);
        self.done_files_bytes += self.ev.file_size;
        self.ev.file_bytes = 0;
        self.ev.files_done += 1;
    }

    fn file_reused(&mut self, repo_id: &str, path: &str, size: u64) {
        self.set_file(repo_id, path, size, size);
        self.file_finished(ProgressKind::FileReused);
    }

    pub(crate) fn finished(&mut self) {
        self.ev.path.clear();
        self.ev.file_size = 0;
        self.ev.file_bytes = 0;
        self.emit(ProgressKind::Finished);
    }

    /// Sleep `d`, waking early when cancelled.
    fn pause(&self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check_cancel()?;
            std::thread::sleep(
                Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())),
            );
        }
        self.check_cancel()
    }
}

/// How one `GET` attempt ended (errors aside).
enum Attempt {
    /// The body ended (the caller checks whether the file is complete).
    BodyEnded,
    /// The server could not continue from our offset: start the file over.
    StartOver,
}

impl Hub {
    /// Make `file` of `repo` (at the listed commit) complete in the cache; returns its
    /// snapshot path.
    pub(crate) fn fetch_file(
        &self,
        repo: &RepoInfo,
        file: &RepoFile,
        tx: &mut Transfer<'_>,
    ) -> Result<PathBuf> {
        self.fetch_file_within(repo, file, None, tx)
    }

    /// [`Hub::fetch_file`] for a JSON file this crate reads whole (a `config.json`, an index):
    /// refused with [`Error::TooLarge`] when the listing or the `HEAD` says it is over
    /// [`MAX_JSON_FILE_BYTES`], before any of its bytes are downloaded.
    pub(crate) fn fetch_small(
        &self,
        repo: &RepoInfo,
        file: &RepoFile,
        tx: &mut Transfer<'_>,
    ) -> Result<PathBuf> {
        self.fetch_file_within(repo, file, Some(MAX_JSON_FILE_BYTES), tx)
    }

    fn fetch_file_within(
        &self,
        repo: &RepoInfo,
        file: &RepoFile,
        limit: Option<u64>,
        tx: &mut Transfer<'_>,
    ) -> Result<PathBuf> {
        tx.check_cancel()?;
        let over = |size: Option<u64>| match (limit, size) {
            (Some(limit), Some(size)) if size > limit => Err(too_large(repo, file, limit)),
            _ => Ok(()),
        };
        over(file.size)?;
        let cache = RepoCache::new(&self.config.cache_dir, &repo.repo_id);
        let pointer = cache.pointer(&repo.commit_sha, &file.path);
        let planned = file.size.unwrap_or(0);
        if cache::is_complete(&pointer, file.size) {
            tracing::debug!(repo_id = %repo.repo_id, path = %file.path, "reusing cached file");
            tx.file_reused(&repo.repo_id, &file.path, planned);
            return Ok(pointer);
        }
        let meta = self
            .http
            .file_meta(&repo.repo_id, &repo.commit_sha, &file.path)?;
        over(Some(meta.size))?;
        if file.size.is_some_and(|s| s != meta.size) {
            tracing::warn!(repo_id = %repo.repo_id, path = %file.path, listed = planned, served = meta.size, "file size differs from the listing; using the served size");
        }
        tx.correct_total(planned, meta.size);
        let blob = cache.blob(&meta.etag);
        if cache::is_complete(&blob, Some(meta.size)) {
            cache::link(&blob, &pointer)?;
            tx.file_reused(&repo.repo_id, &file.path, meta.size);
            return Ok(pointer);
        }
        // One writer per blob (lock.rs): another download of it (a variant sharing the base,
        // a listing refresh, another program) finishes or stops first.
        let lock = BlobLock::acquire(
            &cache.lock_file(&meta.etag),
            &mut || tx.check_cancel().map(|()| false),
            &mut || {
                tracing::info!(repo_id = %repo.repo_id, path = %file.path, "waiting for another download of the same file")
            },
        )?
        .ok_or(Error::Cancelled)?;
        if cache::is_complete(&blob, Some(meta.size)) {
            cache::link(&blob, &pointer)?;
            drop(lock);
            tx.file_reused(&repo.repo_id, &file.path, meta.size);
            return Ok(pointer);
        }
        // The listing's LFS hash, else an ETag that is a SHA-256 (X-Linked-Etag of LFS files).
        let expected_sha = file
            .lfs_sha256
            .clone()
            .or_else(|| is_sha256(&meta.etag).then(|| meta.etag.clone()))
            .map(|h| h.to_ascii_lowercase());
        self.download_blob(repo, file, &meta, &cache, expected_sha.as_deref(), tx)?;
        cache::link(&blob, &pointer)?;
        drop(lock);
        tx.file_finished(ProgressKind::FileDone);
        Ok(pointer)
    }

    /// [`Hub::write_blob`], keeping the note of what `blobs/{etag}.incomplete` is for exactly
    /// as long as that file exists (a removed variant's partial files go with it). Called with
    /// the blob's lock held.
    fn download_blob(
        &self,
        repo: &RepoInfo,
        file: &RepoFile,
        meta: &FileMeta,
        cache: &RepoCache,
        expected_sha: Option<&str>,
        tx: &mut Transfer<'_>,
    ) -> Result<()> {
        let result = self.write_blob(repo, file, meta, cache, expected_sha, tx);
        if !cache.incomplete(&meta.etag).exists() {
            cache.write_partial(&meta.etag, &[]);
        }
        result
    }

    /// Bring `blobs/{etag}` into existence (module doc), retrying broken transfers.
    fn write_blob(
        &self,
        repo: &RepoInfo,
        file: &RepoFile,
        meta: &FileMeta,
        cache: &RepoCache,
        expected_sha: Option<&str>,
        tx: &mut Transfer<'_>,
    ) -> Result<()> {
        let part = cache.incomplete(&meta.etag);
        let blob = cache.blob(&meta.etag);
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        let io = |e| io_error(&part, e);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(io)?;
        cache.note_partial(&meta.etag, &file.path);
        let mut have = f.metadata().map_err(io)?.len();
        if have > meta.size {
            f.set_len(0).map_err(io)?;
            have = 0;
        }
        let mut hasher = expected_sha.map(|_| Sha256::new());
        if let Some(h) = hasher.as_mut() {
            // Resuming: the hash must cover the bytes an earlier attempt wrote.
            hash_prefix(&mut f, have, h).map_err(io)?;
        }
        f.seek(SeekFrom::Start(have)).map_err(io)?;
        if have > 0 {
            tracing::info!(repo_id = %repo.repo_id, path = %file.path, from = have, of = meta.size, "resuming download");
        }
        tx.file_started(&repo.repo_id, &file.path, meta.size, have);

        let mut failures = 0u32;
        while have < meta.size {
            tx.check_cancel()?;
            let before = have;
            let outcome = self.attempt(repo, file, meta, &mut f, &part, &mut have, &mut hasher, tx);
            let retryable = match outcome {
                Ok(Attempt::BodyEnded) if have == meta.size => break,
                Ok(Attempt::BodyEnded) => Error::Network {
                    url: display_url(&meta.download_url),
                    message: format!("connection closed after {have} of {} bytes", meta.size),
                },
                Ok(Attempt::StartOver) => {
                    f.set_len(0).map_err(io)?;
                    f.seek(SeekFrom::Start(0)).map_err(io)?;
                    have = 0;
                    hasher = expected_sha.map(|_| Sha256::new());
                    tx.bytes(0, 0);
                    Error::Protocol {
                        url: display_url(&meta.download_url),
                        message: "the server could not resume".into(),
                    }
                }
                Err(
                    e @ (Error::Network { .. }
                    | Error::Http {
                        status: 429 | 500..=599,
                        ..
                    }),
                ) => e,
                Err(e) => return Err(e),
            };
            // Progress resets the count: a slow, flaky link still finishes.
            if have > before {
                failures = 0;
            }
            failures += 1;
            if failures > self.config.max_retries {
                return Err(retryable);
            }
            tracing::warn!(repo_id = %repo.repo_id, path = %file.path, at = have, error = %retryable, "transfer interrupted; resuming");
            tx.pause(Duration::from_millis(250u64 << failures.min(5)))?;
        }
        f.sync_all().map_err(io)?;
        drop(f);

        if let (Some(h), Some(expected)) = (hasher, expected_sha) {
            let actual = hex(&h.finalize());
            if actual != expected {
                remove_corrupt(&part);
                return Err(Error::ChecksumMismatch {
                    repo_id: repo.repo_id.clone(),
                    path: file.path.clone(),
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        std::fs::rename(&part, &blob).map_err(|e| io_error(&blob, e))
    }

    /// One `GET` from `*have` on, appending to `f`.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        repo: &RepoInfo,
        file: &RepoFile,
        meta: &FileMeta,
        f: &mut File,
        part: &std::path::Path,
        have: &mut u64,
        hasher: &mut Option<Sha256>,
        tx: &mut Transfer<'_>,
    ) -> Result<Attempt> {
        let io = |e| io_error(part, e);
        let (mut resp, url) = self.http.get_from(
            &meta.download_url,
            *have,
            &repo.repo_id,
            &repo.commit_sha,
            &file.path,
        )?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if content_range_start(&resp) != Some(*have) => {
                return Ok(Attempt::StartOver);
            }
            // The rest of the file, from where we are.
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::RANGE_NOT_SATISFIABLE => return Ok(Attempt::StartOver),
            _ if *have > 0 => {
                // 200: the whole file is coming; start over from this very response.
                f.set_len(0).map_err(io)?;
                f.seek(SeekFrom::Start(0)).map_err(io)?;
                *have = 0;
                if let Some(h) = hasher.as_mut() {
                    *h = Sha256::new();
                }
                tx.bytes(0, 0);
            }
            _ => {}
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            tx.check_cancel()?;
            let n = match resp.read(&mut buf) {
                Ok(0) => return Ok(Attempt::BodyEnded),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(network(&url, &e)),
            };
            if *have + n as u64 > meta.size {
                // Emptied first: deleting an open file can fail on Windows.
                let _ = f.set_len(0);
                remove_corrupt(part);
                return Err(Error::SizeMismatch {
                    repo_id: repo.repo_id.clone(),
                    path: file.path.clone(),
                    expected: meta.size,
                    actual: *have + n as u64,
                });
            }
            f.write_all(&buf[..n]).map_err(io)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            *have += n as u64;
            tx.bytes(*have, n as u64);
        }
    }
}

fn too_large(repo: &RepoInfo, file: &RepoFile, limit: u64) -> Error {
    Error::TooLarge {
        what: format!("{}/{}", repo.repo_id, file.path),
        kind: "a config or index file",
        limit,
    }
}

fn hash_prefix(f: &mut File, len: u64, h: &mut Sha256) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(0))?;
    let mut r = (&mut *f).take(len);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// Delete a corrupt partial file; failing to is logged, not fatal (it is never used as
/// complete: only `.incomplete` files are ever corrupt).
fn remove_corrupt(part: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(part) {
        tracing::warn!(path = %part.display(), error = %e, "could not delete a corrupt partial download");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
