//! The standard Hugging Face cache layout, shared with `huggingface_hub` and `hf-hub`:
//!
//! ```text
//! {cache_dir}/models--{org}--{name}/
//!   blobs/{etag}                  complete, verified content (SHA-256 for LFS files, git blob id else)
//!   blobs/{etag}.incomplete       a transfer in progress or interrupted: never read as content
//!   snapshots/{commit}/{path}     relative symlink to ../../blobs/{etag} (hard link or copy where
//!                                 symlinks are not allowed)
//!   refs/{revision}               the commit a branch pointed to when last downloaded
//! ```
//!
//! Invariant: a snapshot entry exists only for a complete, verified blob, so any file found in
//! a snapshot can be used as is.

use std::path::{Path, PathBuf};

use crate::error::{io_error, Result};

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    pub(crate) fn new(cache_dir: &Path, repo_id: &str) -> Self {
        Self {
            dir: cache_dir.join(format!("models--{}", repo_id.replace('/', "--"))),
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
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, commit).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))
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

/// Make `pointer` (a snapshot entry) refer to `blob`: a relative symlink, else a hard link,
/// else a copy. A stale entry is replaced.
pub(crate) fn link(blob: &Path, pointer: &Path) -> Result<()> {
    let parent = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    if std::fs::symlink_metadata(pointer).is_ok() {
        std::fs::remove_file(pointer).map_err(|e| io_error(pointer, e))?;
    }
    if let Some(rel) = relative_to(blob, parent) {
        #[cfg(unix)]
        if std::os::unix::fs::symlink(&rel, pointer).is_ok() {
            return Ok(());
        }
        #[cfg(windows)]
        if std::os::windows::fs::symlink_file(&rel, pointer).is_ok() {
            return Ok(());
        }
        let _ = rel;
    }
    if std::fs::hard_link(blob, pointer).is_ok() {
        return Ok(());
    }
    std::fs::copy(blob, pointer)
        .map(|_| ())
        .map_err(|e| io_error(pointer, e))
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
