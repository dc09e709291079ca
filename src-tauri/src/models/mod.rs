//! The model manager: the catalog of published TPTT repositories, repositories added by id,
//! imported local folders ([`Registry`], stored in the database under [`REGISTRY_KEY`]), the
//! TPTT repositories another tool left in the Hugging Face cache ([`Hub::cached_repos`]), their
//! variants (listed from the hub, or found in the cache / the folder without any network), and
//! downloads on worker threads with progress through a channel, cancel and resume.
//!
//! Variants are never hard-coded: a repository's variants are the subfolders holding a TPTT
//! `config.json`, as `tptt_hub::Hub::discover_variants` (network) or the cache /
//! `tptt::repo::TpttRepo` (offline) find them. Listings are remembered so the manager shows
//! them offline; downloaded variants always show, from the cache.
//!
//! Downloads of different variants run side by side, also when they share a base: the hub crate
//! writes each file once (a lock per blob) and the other download reuses it. Imported folders are
//! files written by strangers: their sizes are walked without following links to folders, within
//! bounds ([`dir_size`]), and their configs read only when small regular files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tauri::ipc::Channel;
use tptt_hub::{Hub, Progress, ProgressKind};

use crate::dto::{DownloadEvent, ModelEntry, ModelSource, VariantEntry};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::runtime::ModelRef;
use crate::state::{lock, AppState};

pub mod registry;
pub use registry::{source_of, Listed, ListedVariant, Registry, CATALOG, REGISTRY_KEY};

/// Every entry: the catalog, then added repositories, then imported folders, then the TPTT
/// repositories found in the Hugging Face cache that none of those names.
pub fn entries(registry: &Registry, hub: &Hub) -> Vec<ModelEntry> {
    let mut out: Vec<ModelEntry> = CATALOG
        .iter()
        .map(|(repo, title, description)| {
            hub_entry(
                registry,
                hub,
                repo,
                title,
                ModelSource::Catalog,
                description,
            )
        })
        .collect();
    for repo in &registry.added {
        let title = repo.rsplit('/').next().unwrap_or(repo);
        out.push(hub_entry(
            registry,
            hub,
            repo,
            title,
            ModelSource::Added,
            &format!("Added by repository id: {repo}"),
        ));
    }
    for path in &registry.local {
        out.push(local_entry(Path::new(path)));
    }
    for repo in hub.cached_repos() {
        if source_of(registry, &repo).is_some() {
            continue;
        }
        let title = repo.rsplit('/').next().unwrap_or(&repo).to_string();
        let description = format!(
            "Found in your Hugging Face cache ({}): usable without downloading.",
            hub.cache_dir().display()
        );
        out.push(hub_entry(
            registry,
            hub,
            &repo,
            &title,
            ModelSource::Cache,
            &description,
        ));
    }
    out
}

/// The entry of `repo_id`, whatever its source.
pub fn entry(registry: &Registry, hub: &Hub, repo_id: &str) -> Option<ModelEntry> {
    entries(registry, hub)
        .into_iter()
        .find(|e| e.repo_id == repo_id)
}

/// A hub repository's entry: its remembered listing merged with what the cache holds.
fn hub_entry(
    registry: &Registry,
    hub: &Hub,
    repo: &str,
    title: &str,
    source: ModelSource,
    description: &str,
) -> ModelEntry {
    let local = hub.local_variants(repo);
    let listed = registry.listings.get(repo);
    let mut variants: BTreeMap<String, VariantEntry> = BTreeMap::new();
    if let Some(l) = listed {
        for v in &l.variants {
            variants.insert(
                v.name.clone(),
                VariantEntry {
                    name: v.name.clone(),
                    operator_mode: v.operator_mode.clone(),
                    downloaded: false,
                    size_bytes: v.size_bytes,
                },
            );
        }
    }
    for lv in &local {
        let config = read_config(&lv.variant_dir.join("config.json"));
        let e = variants
            .entry(lv.variant.clone())
            .or_insert_with(|| VariantEntry {
                name: lv.variant.clone(),
                operator_mode: operator_mode(config.as_ref()),
                downloaded: true,
                size_bytes: Some(dir_size(&lv.variant_dir)),
            });
        e.downloaded = true;
    }
    let base_model = listed
        .and_then(|l| l.base_model.clone())
        .or_else(|| local.first().map(|l| l.base_model_name.clone()));
    // The base as the cache holds it (once a variant is downloaded), else as the hub lists it.
    let base_size_bytes = local
        .first()
        .map(|l| dir_size(&l.base_dir))
        .filter(|n| *n > 0)
        .or_else(|| listed.and_then(|l| l.base_size_bytes));
    ModelEntry {
        repo_id: repo.to_string(),
        title: title.to_string(),
        source,
        description: description.to_string(),
        variants: (listed.is_some() || !local.is_empty()).then(|| variants.into_values().collect()),
        base_model,
        base_size_bytes,
    }
}

/// An imported folder's entry (its variants are always known: the folder is here).
fn local_entry(path: &Path) -> ModelEntry {
    let title = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let (variants, base_model, description) = match tptt::repo::TpttRepo::open(path) {
        Ok(repo) => {
            let mut base = None;
            let variants = repo
                .variants
                .iter()
                .map(|name| {
                    let dir = if name == "." {
                        path.to_path_buf()
                    } else {
                        path.join(name)
                    };
                    let config = read_config(&dir.join("config.json"));
                    if base.is_none() {
                        base = config
                            .as_ref()
                            .and_then(|c| c.get("base_model_name"))
                            .and_then(|b| b.as_str())
                            .map(str::to_string);
                    }
                    VariantEntry {
                        name: name.clone(),
                        operator_mode: operator_mode(config.as_ref()),
                        downloaded: true,
                        size_bytes: Some(dir_size(&dir)),
                    }
                })
                .collect();
            (
                variants,
                base,
                format!("Imported folder {}", path.display()),
            )
        }
        Err(e) => (
            Vec::new(),
            None::<String>,
            format!(
                "Imported folder {} — not readable any more: {e}",
                path.display()
            ),
        ),
    };
    // The base folder the variants name, found as loading finds it.
    let base_size_bytes = base_model
        .as_deref()
        .and_then(|b| tptt::repo::resolve_base(b, path).ok())
        .map(|dir| dir_size(&dir));
    ModelEntry {
        repo_id: path.display().to_string(),
        title,
        source: ModelSource::Local,
        description,
        variants: Some(variants),
        base_model,
        base_size_bytes,
    }
}

/// A variant's `config.json`, when it is a regular file (a FIFO would block the reader) of at
/// most [`tptt_hub::MAX_JSON_FILE_BYTES`] holding JSON.
fn read_config(path: &Path) -> Option<serde_json::Value> {
    use std::io::Read;
    let limit = tptt_hub::MAX_JSON_FILE_BYTES;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > limit {
        tracing::warn!(path = %path.display(), bytes = meta.len(), "config.json skipped: not a regular file, or larger than {limit} bytes");
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > limit {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

fn operator_mode(config: Option<&serde_json::Value>) -> String {
    config
        .and_then(|c| c.get("operator_mode"))
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Folder levels [`dir_size`] descends below the folder it is given: a variant is one or two.
pub const SIZE_WALK_DEPTH: usize = 8;
/// Entries [`dir_size`] looks at, at most: the listing stays quick whatever the folder holds.
pub const SIZE_WALK_ENTRIES: usize = 100_000;

/// Bytes of the files under `dir`. Links to files count (a cache snapshot is made of links to
/// its blobs); links to folders are not followed, so a link loop (`loop -> .`, `a -> b -> a`)
/// cannot make it endless; at most [`SIZE_WALK_DEPTH`] levels and [`SIZE_WALK_ENTRIES`]
/// entries; what cannot be read (a dangling link, a folder without permission) counts 0.
pub fn dir_size(dir: &Path) -> u64 {
    let mut budget = SIZE_WALK_ENTRIES;
    let size = size_below(dir, SIZE_WALK_DEPTH, &mut budget);
    if budget == 0 {
        tracing::warn!(folder = %dir.display(), "folder size: too many files, counting stopped at {SIZE_WALK_ENTRIES}");
    }
    size
}

fn size_below(dir: &Path, depth: usize, budget: &mut usize) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in rd.flatten() {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        // The entry's own type (`DirEntry::file_type` does not follow links).
        let Ok(kind) = e.file_type() else {
            continue;
        };
        total += if kind.is_dir() {
            if depth > 0 {
                size_below(&e.path(), depth - 1, budget)
            } else {
                0
            }
        } else if kind.is_symlink() {
            match std::fs::metadata(e.path()) {
                Ok(m) if m.is_file() => m.len(),
                _ => 0,
            }
        } else {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    total
}

/// Lists `repo_id` on the hub (blocking, network): its variants with their folder sizes.
pub fn list_on_hub(hub: &Hub, repo_id: &str) -> CmdResult<Listed> {
    let info = hub.list_files(repo_id, tptt_hub::MAIN)?;
    let found = hub.discover_variants(repo_id)?;
    let variants = found
        .iter()
        .map(|v| {
            let prefix = if v.name == "." {
                String::new()
            } else {
                format!("{}/", v.name)
            };
            let sizes: Option<u64> = info
                .files
                .iter()
                .filter(|f| {
                    if prefix.is_empty() {
                        !f.path.contains('/')
                    } else {
                        f.path.starts_with(&prefix)
                    }
                })
                .map(|f| f.size)
                .sum();
            ListedVariant {
                name: v.name.clone(),
                operator_mode: operator_mode(Some(&v.config_json)),
                size_bytes: sizes,
            }
        })
        .collect();
    let base_model = found.iter().find_map(|v| v.base_model_name.clone());
    // What a download fetches of the base: its weights and JSON files (a base that cannot be
    // listed, a gated one say, leaves the size unknown).
    let base_size_bytes = base_model.as_deref().and_then(|base| {
        let files = hub.list_files(base, tptt_hub::MAIN).ok()?.files;
        files
            .iter()
            .filter(|f| {
                [".safetensors", ".json", ".gguf", ".model"]
                    .iter()
                    .any(|ext| f.path.ends_with(ext))
            })
            .map(|f| f.size)
            .sum()
    });
    Ok(Listed {
        variants,
        base_model,
        base_size_bytes,
    })
}

/// Imports `path`: it must be a folder whose subfolders (or itself) hold TPTT variants.
/// Returns its canonical path.
pub fn check_local_folder(path: &str) -> CmdResult<PathBuf> {
    let not_tptt = |why: String| CommandError::new(ErrorKind::NotATpttRepo, why);
    let p = Path::new(path.trim());
    if path.trim().is_empty() {
        return Err(not_tptt("No folder was given.".into()));
    }
    let canonical = std::fs::canonicalize(p)
        .map_err(|e| not_tptt(format!("{} cannot be opened: {e}.", p.display())))?;
    if !canonical.is_dir() {
        return Err(not_tptt(format!(
            "{} is not a folder.",
            canonical.display()
        )));
    }
    let repo = tptt::repo::TpttRepo::open(&canonical).map_err(|e| {
        not_tptt(format!("{} is not a TPTT model folder ({e}). Choose a folder with one subfolder per variant, each holding a TPTT config.json.", canonical.display()))
    })?;
    if repo.variants.is_empty() {
        return Err(not_tptt(format!(
            "{} holds no TPTT variant (no subfolder with a TPTT config.json).",
            canonical.display()
        )));
    }
    Ok(canonical)
}

/// Starts downloading `variant` of `repo_id` on a worker thread; events go to `on_event`.
/// `busy` when that variant is already downloading.
pub fn start_download(
    state: &AppState,
    repo_id: &str,
    variant: &str,
    on_event: Channel<DownloadEvent>,
) -> CmdResult<()> {
    tptt_hub::validate_repo_id(repo_id).map_err(CommandError::hub)?;
    let key = (repo_id.to_string(), variant.to_string());
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let mut downloads = lock(&state.downloads);
        if downloads.contains_key(&key) {
            return Err(CommandError::new(
                ErrorKind::Busy,
                format!("Variant {variant} of {repo_id} is already downloading."),
            ));
        }
        downloads.insert(key.clone(), cancel.clone());
    }
    let state2 = state.clone();
    let spawned = std::thread::Builder::new()
        .name("tptt-download".into())
        .spawn(move || {
            let (repo_id, variant) = &key;
            // The hub client is built, used and dropped on this thread (blocking HTTP).
            let result = state2.hub().and_then(|hub| {
                let progress = |p: &Progress| {
                    // Every event but the final one (`done` says it). Sending fails only when the
                    // window is gone; the download goes on regardless.
                    if p.kind != ProgressKind::Finished {
                        let _ = on_event.send(progress_event(repo_id, p));
                    }
                };
                match hub.download_variant(repo_id, variant, progress, &cancel) {
                    Ok(_) => Ok(DownloadEvent::Done),
                    Err(tptt_hub::Error::Cancelled) => Ok(DownloadEvent::Cancelled),
                    Err(e) => Err(CommandError::hub(e)),
                }
            });
            lock(&state2.downloads).remove(&key);
            let event = result.unwrap_or_else(|e| DownloadEvent::Error {
                message: e.message,
                // A variant or file the hub does not have makes the download fail.
                error_kind: if e.kind == ErrorKind::NotFound {
                    ErrorKind::Download
                } else {
                    e.kind
                },
            });
            tracing::info!(repo_id, variant, ?event, "download ended");
            let _ = on_event.send(event);
        });
    if let Err(e) = spawned {
        lock(&state.downloads).remove(&(repo_id.to_string(), variant.to_string()));
        return Err(CommandError::internal(
            "Cannot start the download thread",
            e,
        ));
    }
    Ok(())
}

/// A progress event; the base model's files are shown as `base: <path>`.
fn progress_event(repo_id: &str, p: &Progress) -> DownloadEvent {
    DownloadEvent::Progress {
        file: if p.repo_id == repo_id {
            p.path.clone()
        } else {
            format!("base: {}", p.path)
        },
        file_bytes: p.file_bytes,
        file_total: p.file_size,
        bytes: p.done_bytes,
        total: p.total_bytes,
        bytes_per_sec: p.bytes_per_sec,
    }
}

/// Raises the cancel flag of a running download (nothing when none runs).
pub fn cancel_download(state: &AppState, repo_id: &str, variant: &str) {
    if let Some(flag) = lock(&state.downloads).get(&(repo_id.to_string(), variant.to_string())) {
        flag.store(true, Ordering::SeqCst);
    }
}

/// The model reference of a manager entry id.
/// Whether `repo_id` can name a model to use: a hub id, or a folder the manager imported (any
/// other path is not a model the user chose; `ModelRef::parse` would take it as a folder).
pub fn is_choosable(registry: &Registry, repo_id: &str) -> bool {
    matches!(ModelRef::parse(repo_id), ModelRef::Hub(_))
        || registry.local.iter().any(|p| p == repo_id)
}

pub fn model_ref(registry: &Registry, repo_id: &str) -> ModelRef {
    if registry.local.iter().any(|p| p == repo_id) {
        ModelRef::Local(PathBuf::from(repo_id))
    } else {
        ModelRef::parse(repo_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_holds_valid_repo_ids_and_no_variants() {
        for (repo, title, _) in CATALOG {
            tptt_hub::validate_repo_id(repo).expect("valid id");
            assert!(!title.is_empty());
        }
        let hub = Hub::new(tptt_hub::HubConfig::new(
            "http://127.0.0.1:9",
            tempfile::tempdir().expect("dir").path(),
        ))
        .expect("hub");
        let list = entries(&Registry::default(), &hub);
        assert_eq!(list.len(), CATALOG.len());
        // Nothing listed, nothing downloaded: variants are unknown, not invented.
        assert!(list
            .iter()
            .all(|e| e.variants.is_none() && e.source == ModelSource::Catalog));
    }

    /// Copies the regular files of `from` into `to` (created).
    fn copy_files(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("folder");
        for e in std::fs::read_dir(from).expect("fixture").flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
            }
        }
    }

    #[test]
    fn a_tptt_repo_another_tool_left_in_the_cache_is_listed_and_usable_offline() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
        let cache = tempfile::tempdir().expect("dir");
        // As `huggingface-cli download` leaves them: snapshot folders, no records of ours.
        let repo = "someone/Titans-Tiny";
        let base = "someone/tiny-base";
        let variant_dir = cache
            .path()
            .join("models--someone--Titans-Tiny/snapshots/0123abc/delta_rule");
        copy_files(&fixtures.join("tptt-llama/delta_rule"), &variant_dir);
        let config_path = variant_dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config_path).expect("config")).expect("json");
        config["base_model_name"] = base.into();
        std::fs::write(&config_path, config.to_string()).expect("write config");
        copy_files(
            &fixtures.join("llama-base"),
            &cache
                .path()
                .join("models--someone--tiny-base/snapshots/4567def"),
        );
        let hub =
            Hub::new(tptt_hub::HubConfig::new("http://127.0.0.1:9", cache.path())).expect("hub");

        let mut registry = Registry::default();
        let list = entries(&registry, &hub);
        let found: Vec<&ModelEntry> = list
            .iter()
            .filter(|e| e.source == ModelSource::Cache)
            .collect();
        assert_eq!(found.len(), 1, "only the TPTT repo, not its base: {list:?}");
        let e = found[0];
        assert_eq!(
            (e.repo_id.as_str(), e.title.as_str()),
            (repo, "Titans-Tiny")
        );
        assert_eq!(e.base_model.as_deref(), Some(base));
        let variants = e.variants.as_ref().expect("variants known offline");
        assert_eq!(variants.len(), 1);
        assert!(variants[0].downloaded && variants[0].name == "delta_rule");
        assert!(e.description.contains("Hugging Face cache"));
        // Its files resolve from the cache, as a chat's model load does: nothing to download.
        let files = crate::runtime::variant_files(&hub, &model_ref(&registry, repo), "delta_rule")
            .expect("the variant's files, offline");
        assert!(files
            .adapter
            .as_ref()
            .is_some_and(|a| a.starts_with(cache.path())));

        // Once added by id, it is listed once, as added.
        registry.added.push(repo.to_string());
        let list = entries(&registry, &hub);
        assert!(list.iter().all(|e| e.source != ModelSource::Cache));
        assert_eq!(list.iter().filter(|e| e.repo_id == repo).count(), 1);
    }

    #[test]
    fn a_folder_without_variants_is_not_a_tptt_repo() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(
            check_local_folder(&dir.path().display().to_string())
                .expect_err("empty")
                .kind,
            ErrorKind::NotATpttRepo
        );
        assert_eq!(
            check_local_folder("/no/such/folder")
                .expect_err("missing")
                .kind,
            ErrorKind::NotATpttRepo
        );
        assert_eq!(
            check_local_folder("").expect_err("empty").kind,
            ErrorKind::NotATpttRepo
        );
    }
}
