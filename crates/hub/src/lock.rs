//! Locks that keep downloads of the same blob apart, and removals away from running downloads.
//!
//! - [`BlobLock`]: one per blob, taken before its `.incomplete` file is opened and held until
//!   the blob is complete and linked (or the attempt ends). A second download of the same blob
//!   (another variant sharing the base, a listing refresh, another copy of the app, a Python
//!   `huggingface_hub`) waits, then finds the blob complete and reuses it — or, when the first
//!   one stopped, resumes its `.incomplete`. So two writers never append to one file.
//!   Two layers: in this process a set of held keys with a condition variable; across
//!   processes an advisory lock ([`File::try_lock`]: `flock` on Unix, `LockFileEx` on Windows)
//!   on `{cache}/.locks/models--{org}--{name}/{etag}.lock`, the very file `huggingface_hub`
//!   locks for that blob. The in-process layer is not redundant: where `flock` is emulated
//!   with per-process `fcntl` locks (NFS) threads of one process would not exclude each other,
//!   and where the file system has no locks at all the download still runs (with a warning),
//!   excluding the other threads of this process. The lock file is left in place (as
//!   `huggingface_hub` leaves its own): deleting it could let a third party lock a new inode
//!   while another waits on the old one.
//! - [`VariantGuard`]: marks a variant download as running in this process, so that
//!   [`crate::Hub::remove_variant`] waits for it to stop (a cancel) or refuses (it still runs)
//!   instead of deleting files the download then writes again.
//!
//! Every wait is a short-sleep loop that checks the caller's cancel flag or deadline: no wait
//! outlives a cancel.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{io_error, Result};

/// How often a wait checks its cancel flag or deadline.
const POLL: Duration = Duration::from_millis(25);

/// Keys held in this process, and the condition variable their release signals.
struct Held {
    keys: Mutex<BTreeMap<PathBuf, usize>>,
    released: Condvar,
}

static BLOBS: Held = Held::new();
static VARIANTS: Held = Held::new();

impl Held {
    const fn new() -> Self {
        Self {
            keys: Mutex::new(BTreeMap::new()),
            released: Condvar::new(),
        }
    }

    /// The map, taking over a poisoned lock (a panic between two statements of this module
    /// leaves it consistent).
    fn map(&self) -> MutexGuard<'_, BTreeMap<PathBuf, usize>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until `key` is free and take it; `stop` is asked between waits (an `Err` or
    /// `Ok(true)` ends the wait: the error, or `Ok(false)` for "gave up").
    fn take_exclusive(&self, key: &Path, stop: &mut dyn FnMut() -> Result<bool>) -> Result<bool> {
        let mut map = self.map();
        while map.contains_key(key) {
            if stop()? {
                return Ok(false);
            }
            map = self
                .released
                .wait_timeout(map, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        map.insert(key.to_path_buf(), 1);
        Ok(true)
    }

    /// Wait until `key` is free, without taking it.
    fn wait_free(&self, key: &Path, stop: &mut dyn FnMut() -> Result<bool>) -> Result<bool> {
        let mut map = self.map();
        while map.contains_key(key) {
            if stop()? {
                return Ok(false);
            }
            map = self
                .released
                .wait_timeout(map, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(true)
    }

    /// Count one more holder of `key` (shared use).
    fn add(&self, key: &Path) {
        *self.map().entry(key.to_path_buf()).or_insert(0) += 1;
    }

    /// One holder of `key` fewer; wakes the waiters when it is free.
    fn release(&self, key: &Path) {
        let mut map = self.map();
        if let Some(n) = map.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                map.remove(key);
            }
        }
        drop(map);
        self.released.notify_all();
    }
}

/// Exclusive right to write one blob (module doc). Released on drop.
#[derive(Debug)]
pub(crate) struct BlobLock {
    key: PathBuf,
    /// Holds the cross-process lock; closing it releases the lock. `None` where the file
    /// system has no locks.
    _file: Option<File>,
}

impl BlobLock {
    /// Take the lock whose file is `path`, waiting for other holders; `stop` is asked
    /// between waits: an `Err` (a cancel) is returned, `Ok(true)` gives up (`Ok(None)`).
    /// `on_wait` is called once if the lock is busy (for a log line).
    pub(crate) fn acquire(
        path: &Path,
        stop: &mut dyn FnMut() -> Result<bool>,
        on_wait: &mut dyn FnMut(),
    ) -> Result<Option<Self>> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        // One key per file however the cache folder was spelled.
        let key = match (std::fs::canonicalize(dir), path.file_name()) {
            (Ok(d), Some(n)) => d.join(n),
            _ => path.to_path_buf(),
        };
        let mut waited = false;
        let mut stop_waiting = || {
            if !waited {
                waited = true;
                on_wait();
            }
            stop()
        };
        if !BLOBS.take_exclusive(&key, &mut stop_waiting)? {
            return Ok(None);
        }
        // From here on the key is ours: a failure must give it back.
        let taken = Taken(&key);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    if stop_waiting()? {
                        return Ok(None);
                    }
                    std::thread::sleep(POLL);
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot lock across processes here; only this process's downloads are kept apart");
                    std::mem::forget(taken);
                    return Ok(Some(Self { key, _file: None }));
                }
            }
        }
        std::mem::forget(taken);
        Ok(Some(Self {
            key,
            _file: Some(file),
        }))
    }

    /// [`BlobLock::acquire`] that gives up at `deadline`.
    pub(crate) fn acquire_until(path: &Path, deadline: Instant) -> Result<Option<Self>> {
        Self::acquire(path, &mut || Ok(Instant::now() >= deadline), &mut || {})
    }
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        // The file (and its cross-process lock) closes after this, with the struct's fields.
        BLOBS.release(&self.key);
    }
}

/// Gives an in-process key back if [`BlobLock::acquire`] fails after taking it.
struct Taken<'a>(&'a Path);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        BLOBS.release(self.0);
    }
}

/// A variant download running in this process (module doc). Released on drop.
#[derive(Debug)]
pub(crate) struct VariantGuard {
    key: PathBuf,
}

/// The key of a variant: its repository's cache folder (made absolute without touching the
/// disk: the folder may not exist yet) and its name.
fn variant_key(repo_dir: &Path, variant: &str) -> PathBuf {
    std::path::absolute(repo_dir)
        .unwrap_or_else(|_| repo_dir.to_path_buf())
        .join(".tptt")
        .join("downloading")
        .join(variant)
}

impl VariantGuard {
    /// Mark `variant` (of the repository cached in `repo_dir`) as downloading; several
    /// downloads of one variant may run (they share blobs through [`BlobLock`]).
    pub(crate) fn start(repo_dir: &Path, variant: &str) -> Self {
        let key = variant_key(repo_dir, variant);
        VARIANTS.add(&key);
        Self { key }
    }

    /// Wait until no download of `variant` runs in this process, at most until `deadline`;
    /// `false` when one still runs.
    pub(crate) fn wait_none(repo_dir: &Path, variant: &str, deadline: Instant) -> bool {
        let key = variant_key(repo_dir, variant);
        VARIANTS
            .wait_free(&key, &mut || Ok(Instant::now() >= deadline))
            .unwrap_or(false)
    }
}

impl Drop for VariantGuard {
    fn drop(&mut self) {
        VARIANTS.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(150)
    }

    #[test]
    fn a_blob_lock_excludes_threads_and_is_released_on_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(".locks").join("m").join("e.lock");
        let first = BlobLock::acquire_until(&path, soon())
            .expect("lock")
            .expect("free");
        // The same file through another spelling of the folder is the same lock.
        let other = dir.path().join(".locks/m/../m/e.lock");
        let t = std::thread::spawn(move || BlobLock::acquire_until(&other, soon()));
        assert!(
            t.join().expect("thread").expect("no error").is_none(),
            "held"
        );
        drop(first);
        let again = BlobLock::acquire_until(&path, soon()).expect("lock");
        assert!(again.is_some(), "released on drop");
    }

    #[test]
    fn a_lock_held_by_another_process_is_waited_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("e.lock");
        // Another open file description locking the file: what another process holds.
        let other = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("open");
        other.lock().expect("lock");
        let mut waited = false;
        let deadline = soon();
        let got = BlobLock::acquire(&path, &mut || Ok(Instant::now() >= deadline), &mut || {
            waited = true
        })
        .expect("no error");
        assert!(got.is_none() && waited, "busy across processes");
        other.unlock().expect("unlock");
        assert!(BlobLock::acquire_until(&path, soon())
            .expect("lock")
            .is_some());
    }

    #[test]
    fn a_cancel_ends_the_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("e.lock");
        let _held = BlobLock::acquire_until(&path, soon())
            .expect("lock")
            .expect("free");
        let r = BlobLock::acquire(&path, &mut || Err(crate::Error::Cancelled), &mut || {});
        assert!(matches!(r, Err(crate::Error::Cancelled)), "{r:?}");
    }

    #[test]
    fn removal_waits_for_running_variant_downloads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("models--o--n");
        assert!(VariantGuard::wait_none(&repo, "v", soon()));
        let a = VariantGuard::start(&repo, "v");
        let b = VariantGuard::start(&repo, "v");
        assert!(!VariantGuard::wait_none(&repo, "v", soon()));
        assert!(VariantGuard::wait_none(&repo, "w", soon()), "per variant");
        drop(a);
        assert!(!VariantGuard::wait_none(&repo, "v", soon()), "b still runs");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(b);
        });
        assert!(VariantGuard::wait_none(
            &repo,
            "v",
            Instant::now() + Duration::from_secs(10)
        ));
        t.join().expect("thread");
    }
}
