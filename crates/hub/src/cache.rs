//! The standard Hugging Face cache layout, shared with `huggingface_hub` and `hf-hub`:
//!
//! ```text
//! {cache_dir}/models--{org}--{name}/
//!   blobs/{etag}                  complete, verified content (SHA-256 for LFS files, git blob id else)
//!   blobs/{etag}.incomplete       a transfer in progress or interrupted: never read as content
//!   snapshots/{commit}/{path}     relative symlink to ../../blobs/{etag} (hard link or copy where
//!                                 symlinks are not allowed)
//!   refs/{revision}               the commit a branch pointed to when last downloaded
//!   .tptt/                        ours, ignored by the HF tools: download records (variant.rs)
//!     @partial/{etag}             the repository paths whose bytes blobs/{etag}.incomplete holds
//! {cache_dir}/.locks/models--{org}--{name}/{etag}.lock
//!                                 the blob's download lock (lock.rs), where huggingface_hub
//!                                 takes it
//! ```
//!
//! Invariants: a snapshot entry exists only for a complete, verified blob, so any file found in
//! a snapshot can be used as is; entries, refs and records are replaced by a rename of a
//! uniquely named temporary file, never rewritten in place, so a reader (or a second writer)
//! never sees half of one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{io_error, Result};

/// Our own folder inside a repository's cache folder (ignored by `huggingface_hub`).
pub(crate) const RECORDS: &str = ".tptt";
/// Inside [`RECORDS`]: one file per `.incomplete` blob naming the paths it is for. `@` is not
/// allowed in a commit id, so it never clashes with a record folder.
const PARTIAL: &str = "@partial";

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    dir: PathBuf,
    /// `{cache_dir}/.locks/models--{org}--{name}`.
    locks: PathBuf,
}

impl RepoCache {
    pub(crate) fn new(cache_dir: &Path, repo_id: &str) -> Self {
        let name = format!("models--{}", repo_id.replace('/', "--"));
        Self {
            dir: cache_dir.join(&name),
            locks: cache_dir.join(".locks").join(name),
        }
    }

    /// `models--{org}--{name}`.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub(crate) fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    /// The lock file of `blobs/{etag}` (module doc).
    pub(crate) fn lock_file(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    fn partial_marker(&self, etag: &str) -> PathBuf {
        self.dir.join(RECORDS).join(PARTIAL).join(etag)
    }

    /// The repository paths noted for `blobs/{etag}.incomplete`.
    pub(crate) fn partial_paths(&self, etag: &str) -> Vec<String> {
        std::fs::read_to_string(self.partial_marker(etag))
            .map(|s| {
                s.lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Note that `blobs/{etag}.incomplete` holds bytes of `path`, so that removing the variant
    /// `path` belongs to can delete it. Called with the blob's lock held. A failure is logged:
    /// the download does not depend on it.
    pub(crate) fn note_partial(&self, etag: &str, path: &str) {
        let mut paths = self.partial_paths(etag);
        if paths.iter().any(|p| p == path) {
            return;
        }
        paths.push(path.to_string());
        self.write_partial(etag, &paths);
    }

    /// Replace the paths noted for `etag` (none: forget it). Called with the blob's lock held.
    pub(crate) fn write_partial(&self, etag: &str, paths: &[String]) {
        let marker = self.partial_marker(etag);
        let result = if paths.is_empty() {
            match std::fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&marker, e)),
                _ => Ok(()),
            }
        } else {
            let mut text = paths.join("\n");
            text.push('\n');
            write_atomic(&marker, text.as_bytes())
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot note which files a partial download is for");
        }
    }

    /// Every `(etag, paths)` noted for a partial download of this repository.
    pub(crate) fn partials(&self) -> Vec<(String, Vec<String>)> {
        let Ok(rd) = std::fs::read_dir(self.dir.join(RECORDS).join(PARTIAL)) else {
            return Vec::new();
        };
        let mut out: Vec<(String, Vec<String>)> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            // Not a marker being written (`write_atomic`'s temporary files).
            .filter(|n| !(n.starts_with('.') && n.ends_with(".tmp")))
            .map(|etag| {
                let paths = self.partial_paths(&etag);
                (etag, paths)
            })
            .collect();
        out.sort();
        out
    }

    pub(crate) fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// `snapshots/{commit}/{path}` (`path` already checked safe, `/`-separated).
    pub(crate) fn pointer(&self, commit: &str, path: &str) -> PathBuf {
        path.split('/')
            .fold(self.snapshot(commit), |p, c| p.join(c))
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        revision
            .split('/')
            .fold(self.dir.join("refs"), |p, c| p.join(c))
    }

    /// The commit `refs/{revision}` names, if any.
    pub(crate) fn read_ref(&self, revision: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    }

    /// Point `refs/{revision}` at `commit` (written to a temporary file, then renamed).
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.ref_path(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        write_atomic(&path, commit.as_bytes())
    }

    /// Snapshot folders to search offline: `refs/main`'s first, then the others, newest first.
    pub(crate) fn snapshots(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Some(c) = self.read_ref("main") {
            let p = self.snapshot(&c);
            if p.is_dir() {
                out.push(p);
            }
        }
        let mut rest: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir(self.dir.join("snapshots"))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir() && !out.contains(p))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    (
                        std::fs::metadata(&p)
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH),
                        p,
                    )
                })
                .collect();
        rest.sort();
        out.extend(rest.into_iter().rev().map(|(_, p)| p));
        out
    }
}

/// A usable snapshot entry: it resolves to a regular file (of `size` bytes when given).
pub(crate) fn is_complete(pointer: &Path, size: Option<u64>) -> bool {
    match std::fs::metadata(pointer) {
        Ok(m) => m.is_file() && size.is_none_or(|s| m.len() == s),
        Err(_) => false,
    }
}

/// A name for a temporary sibling of `path`, unique in this process and among processes:
/// `.{name}.{pid}.{n}.tmp`.
fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Put `made` (a new temporary file) in place of `path` with one rename; the temporary file
/// is removed if that fails.
fn rename_into_place(made: &Path, path: &Path) -> Result<()> {
    std::fs::rename(made, path).map_err(|e| {
        let _ = std::fs::remove_file(made);
        io_error(path, e)
    })
}

/// Write `bytes` to `path` through a uniquely named temporary file and a rename: readers see
/// the old content or the new, and two writers at once each put a whole file in place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let tmp = temp_sibling(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(&tmp, e));
    }
    rename_into_place(&tmp, path)
}

/// Make `pointer` (a snapshot entry) refer to `blob`: a relative symlink, else a hard link,
/// else a copy; made under a temporary name and renamed over any stale entry, so that two
/// threads linking the same entry both succeed and a copy never writes through an old link
/// into the blob itself.
pub(crate) fn link(blob: &Path, pointer: &Path) -> Result<()> {
    let parent = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    let tmp = temp_sibling(pointer);
    if let Some(rel) = relative_to(blob, parent) {
        #[cfg(unix)]
        if std::os::unix::fs::symlink(&rel, &tmp).is_ok() {
            return rename_into_place(&tmp, pointer);
        }
        #[cfg(windows)]
        if std::os::windows::fs::symlink_file(&rel, &tmp).is_ok() {
            return rename_into_place(&tmp, pointer);
        }
        let _ = rel;
    }
    if std::fs::hard_link(blob, &tmp).is_ok() {
        return rename_into_place(&tmp, pointer);
    }
    if let Err(e) = std::fs::copy(blob, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(pointer, e));
    }
    rename_into_place(&tmp, pointer)
}

/// `target` relative to folder `from` (both under the same cache folder).
fn relative_to(target: &Path, from: &Path) -> Option<PathBuf> {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c.as_os_str());
    }
    Some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_huggingface_hub() {
        let c = RepoCache::new(Path::new("/c"), "org/name");
        assert_eq!(c.blob("abc"), Path::new("/c/models--org--name/blobs/abc"));
        assert_eq!(
            c.incomplete("abc"),
            Path::new("/c/models--org--name/blobs/abc.incomplete")
        );
        assert_eq!(
            c.pointer("c0ffee", "v1/config.json"),
            Path::new("/c/models--org--name/snapshots/c0ffee/v1/config.json")
        );
    }

    #[test]
    fn links_are_relative() {
        let rel = relative_to(
            Path::new("/c/m/blobs/abc"),
            Path::new("/c/m/snapshots/sha/v1"),
        )
        .expect("common root");
        assert_eq!(rel, Path::new("../../../blobs/abc"));
        let dir = tempfile::tempdir().expect("temp dir");
        let c = RepoCache::new(dir.path(), "o/n");
        let blob = c.blob("e1");
        std::fs::create_dir_all(blob.parent().expect("parent")).expect("mkdir");
        std::fs::write(&blob, b"hello").expect("write");
        let p = c.pointer("sha", "a/b/f.json");
        link(&blob, &p).expect("link");
        link(&blob, &p).expect("relink replaces");
        assert_eq!(std::fs::read(&p).expect("read through link"), b"hello");
        assert!(is_complete(&p, Some(5)));
        assert!(!is_complete(&p, Some(6)));
        // Moving the whole cache keeps links valid.
        let moved = dir.path().join("moved");
        std::fs::create_dir_all(&moved).expect("mkdir");
        std::fs::rename(dir.path().join("models--o--n"), moved.join("models--o--n")).expect("move");
        assert!(is_complete(
            &RepoCache::new(&moved, "o/n").pointer("sha", "a/b/f.json"),
            Some(5)
        ));
    }

    #[test]
    fn refs_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = RepoCache::new(dir.path(), "o/n");
        assert_eq!(c.read_ref("main"), None);
        c.write_ref("main", "abc123").expect("write ref");
        assert_eq!(c.read_ref("main").as_deref(), Some("abc123"));
        assert!(c.snapshots().is_empty());
        std::fs::create_dir_all(c.snapshot("old")).expect("mkdir");
        std::fs::create_dir_all(c.snapshot("abc123")).expect("mkdir");
        assert_eq!(c.snapshots()[0], c.snapshot("abc123"));
        assert_eq!(c.snapshots().len(), 2);
    }
}
