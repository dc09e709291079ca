//! Start-up cleanup of what a crash leaves in the app's data folder.
//!
//! A state snapshot is written to `<states>/<conversation>/<answer>.tmp`, then renamed to its
//! `.safetensors` name (`tptt_engine::snapshot::save`); a crash or a kill between the two
//! leaves the `.tmp` file, which nothing reads or records. [`sweep_snapshot_temps`], run by
//! [`crate::AppState::open`], deletes those files: `*.tmp` files (regular files, links not
//! followed) directly in the snapshots folder or in a conversation's folder, last written more
//! than [`TMP_GRACE`] ago — a younger one may be a snapshot another copy of the app is
//! writing right now. A backup import's temporary folder (`<states>/import-*`) goes with its
//! `.tmp` files once it is empty and as old.
//!
//! KV pages (`<states>/kv-pages/`, shared by the paged snapshots of successive turns) that no
//! snapshot file refers to any more — their conversation deleted, their turns pruned — go in
//! [`sweep_unused_pages`], run on a thread of its own at start-up: it reads the page list of
//! every snapshot file under `<states>` (conversations, saved memories, an import's folder) and
//! removes the other pages older than [`PAGE_GRACE`] (a younger one may belong to a snapshot
//! being written). If a folder cannot be listed, nothing is removed.
//!
//! Partial downloads (`blobs/*.incomplete` in the model cache) are not swept here: they resume
//! after a restart; removing a variant deletes its own (`tptt_hub::Hub::remove_variant`).

use std::path::Path;
use std::time::{Duration, SystemTime};

/// How old a `.tmp` file must be (since its last write) to be a crash's leftover.
pub const TMP_GRACE: Duration = Duration::from_secs(60);

/// How old an unreferenced KV page must be to be removed.
pub const PAGE_GRACE: Duration = Duration::from_secs(600);

/// Removes the KV pages no snapshot file under `states` refers to (module doc).
pub fn sweep_unused_pages(states: &Path) -> Swept {
    let pages = crate::chat::pages_dir(states);
    if !pages.is_dir() {
        return Swept::default();
    }
    let mut keep = std::collections::HashSet::new();
    let mut folders = vec![states.to_path_buf()];
    while let Some(dir) = folders.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(folder = %dir.display(), error = %e, "cannot list snapshots: unused KV pages are kept");
                return Swept::default();
            }
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() && dir == states && path != pages {
                folders.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|x| x == "safetensors") {
                // A file that cannot be read is refused at load anyway: its pages do not count.
                if let Ok(names) = tptt_engine::snapshot::page_names(&path) {
                    keep.extend(names);
                }
            }
        }
    }
    match tptt_engine::snapshot::sweep_pages(&pages, &keep, PAGE_GRACE) {
        Ok(s) => {
            if s.pages > 0 {
                tracing::info!(
                    pages = s.pages,
                    bytes = s.bytes,
                    "deleted KV pages no snapshot uses"
                );
            }
            Swept {
                files: s.pages,
                bytes: s.bytes,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot sweep unused KV pages");
            Swept::default()
        }
    }
}

/// What a sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Files deleted.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Deletes the leftover snapshot temporaries under `states` (module doc). Never fails: what
/// cannot be read or deleted is logged and left.
pub fn sweep_snapshot_temps(states: &Path) -> Swept {
    let mut swept = Swept::default();
    let cutoff = SystemTime::now()
        .checked_sub(TMP_GRACE)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    sweep_dir(states, cutoff, 1, &mut swept);
    if swept.files > 0 {
        tracing::info!(
            files = swept.files,
            bytes = swept.bytes,
            folder = %states.display(),
            "deleted snapshot files a crash left half-written"
        );
    }
    swept
}

/// A backup import's temporary folder (`import-*`, [`crate::backup`]) that a crash left, older
/// than the grace period: gone once empty (its `.tmp` files swept).
fn remove_import_folder(dir: &Path) {
    let is_import = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("import-"));
    if is_import {
        // Fails, and is left, when not empty.
        if std::fs::remove_dir(dir).is_ok() {
            tracing::info!(folder = %dir.display(), "deleted the folder of an import a crash cut short");
        }
    }
}

/// `.tmp` files of `dir`, and of its subfolders down to `depth` more levels.
fn sweep_dir(dir: &Path, cutoff: SystemTime, depth: usize, swept: &mut Swept) {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(folder = %dir.display(), error = %e, "cannot look for leftover snapshot files");
            return;
        }
    };
    for entry in entries.flatten() {
        // The entry's own type: a link (to a folder or a file elsewhere) is never followed.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            if depth > 0 {
                // Its age before the sweep (deleting its files makes it young).
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t <= cutoff);
                sweep_dir(&path, cutoff, depth - 1, swept);
                if old {
                    remove_import_folder(&path);
                }
            }
            continue;
        }
        if !kind.is_file() || path.extension().is_none_or(|x| x != "tmp") {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.modified().is_ok_and(|t| t > cutoff) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                swept.files += 1;
                swept.bytes += meta.len();
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a leftover snapshot file")
            }
        }
    }
}
