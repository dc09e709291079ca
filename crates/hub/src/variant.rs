//! TPTT variants on the hub and in the cache: discovery, the download plan, the record of a
//! complete download, and offline lookup.
//!
//! The plan for variant `v` of repo `R` whose config names base `B` (subfolder `s`):
//! - from `R`: `v/config.json`, `v/adapter_model.safetensors`, `v/generation_config.json` and
//!   `v/`'s tokenizer files; the root's `generation_config.json` and tokenizer files;
//! - from `B`: the root's `config.json`, `generation_config.json` and tokenizer files; the same
//!   in `s/` when set; the weights in `s/` (or the root): `model.safetensors.index.json` and
//!   the shards its `weight_map` names, else `model.safetensors`.
//!
//! Only listed files are fetched; nothing else in the repositories (READMEs, `.py` files,
//! `consolidated.safetensors`, other variants) is.
//!
//! When the plan is complete, a record `models--{R}/.tptt/{commit}/{v}.json` lists every file
//! with its size, and `refs/main` of both repositories moves to the downloaded commits.
//! [`Hub::local_variant`] trusts a record only after checking each file is there with its
//! size; without a record (a cache filled by other tools) it requires the variant's config and
//! adapter and the base's config and complete weights.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::{self, RepoCache, RECORDS};
use crate::download::Transfer;
use crate::error::{io_error, Error, Result};
use crate::http::{is_safe_name, is_safe_repo_path};
use crate::lock::{BlobLock, VariantGuard};
use crate::progress::Progress;
use crate::{
    validate_repo_id, Hub, LocalVariant, RepoFile, RepoInfo, Variant, MAIN, MAX_JSON_FILE_BYTES,
};

/// Tokenizer files fetched from the variant folder, the repository root and the base.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

const CONFIG: &str = "config.json";
const ADAPTER: &str = "adapter_model.safetensors";
const GENERATION_CONFIG: &str = "generation_config.json";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// How long [`Hub::remove_variant`] waits for a download of the variant to stop (a cancelled
/// one stops at its next 64 KiB chunk).
pub const REMOVE_WAIT: Duration = Duration::from_secs(3);

/// A TPTT config: `model_type` is `"tptt"` or it names a `base_model_name` (as the `tptt`
/// crate decides).
pub fn is_tptt_config(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("tptt")
        || config.get("base_model_name").is_some()
}

/// The record of a complete download (see the module doc).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    variant: String,
    repo_commit: String,
    base_model_name: String,
    base_commit: String,
    base_model_subfolder: Option<String>,
    files: Vec<RecordFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RecordFile {
    /// `true` for a file of the base repository.
    base: bool,
    path: String,
    size: u64,
}

impl Variant {
    fn from_config(name: &str, config_json: Value) -> Self {
        let text = |k: &str| {
            config_json
                .get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Self {
            name: name.to_string(),
            base_model_name: text("base_model_name"),
            base_model_subfolder: text("base_model_subfolder")
                .map(|s| s.trim_matches('/').to_string())
                .filter(|s| !s.is_empty()),
            config_json,
        }
    }
}

/// `"{dir}/"`, or `""` for the root (`"."` or `""`).
fn prefix(dir: &str) -> String {
    match dir.trim_matches('/') {
        "" | "." => String::new(),
        d => format!("{d}/"),
    }
}

/// Folders (direct children of the root) that hold a `config.json`, sorted.
fn config_folders(info: &RepoInfo) -> Vec<String> {
    let set: BTreeSet<String> = info
        .files
        .iter()
        .filter_map(|f| f.path.strip_suffix("/config.json"))
        .filter(|d| !d.is_empty() && !d.contains('/'))
        .map(str::to_string)
        .collect();
    set.into_iter().collect()
}

/// A variant name is one folder name, or `"."` for the root.
fn validate_variant(name: &str) -> Result<()> {
    if name == "." || (is_safe_repo_path(name) && !name.contains('/')) {
        Ok(())
    } else {
        Err(Error::VariantNotFound {
            repo_id: String::new(),
            variant: name.to_string(),
            available: Vec::new(),
        })
    }
}

/// Push `dir/{name}` for each listed name, once.
fn push_listed<'a>(out: &mut Vec<&'a RepoFile>, info: &'a RepoInfo, dir: &str, names: &[&str]) {
    let p = prefix(dir);
    for n in names {
        if let Some(f) = info.file(&format!("{p}{n}")) {
            if !out.iter().any(|g| g.path == f.path) {
                out.push(f);
            }
        }
    }
}

/// The TPTT repository's part of the plan (module doc); `v/config.json` comes first.
pub(crate) fn variant_plan<'a>(repo: &'a RepoInfo, variant: &str) -> Vec<&'a RepoFile> {
    let mut out = Vec::new();
    push_listed(
        &mut out,
        repo,
        variant,
        &[CONFIG, ADAPTER, GENERATION_CONFIG],
    );
    push_listed(&mut out, repo, variant, TOKENIZER_FILES);
    push_listed(&mut out, repo, "", &[GENERATION_CONFIG]);
    push_listed(&mut out, repo, "", TOKENIZER_FILES);
    out
}

/// The base's configuration and tokenizer files (module doc).
pub(crate) fn base_small_plan<'a>(
    base: &'a RepoInfo,
    subfolder: Option<&str>,
) -> Vec<&'a RepoFile> {
    let mut out = Vec::new();
    for dir in std::iter::once("").chain(subfolder) {
        push_listed(&mut out, base, dir, &[CONFIG, GENERATION_CONFIG]);
        push_listed(&mut out, base, dir, TOKENIZER_FILES);
    }
    out
}

/// The shard names a `model.safetensors.index.json` maps weights to, sorted, checked safe.
pub(crate) fn index_shards(index: &Value) -> std::result::Result<Vec<String>, String> {
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or("no \"weight_map\" object")?;
    let mut shards = BTreeSet::new();
    for v in map.values() {
        let s = v.as_str().ok_or("a weight_map value is not a string")?;
        if !is_safe_repo_path(s) {
            return Err(format!("unsafe shard name {s:?}"));
        }
        shards.insert(s.to_string());
    }
    if shards.is_empty() {
        return Err("empty weight_map".into());
    }
    Ok(shards.into_iter().collect())
}

/// A JSON file of the cache, read whole: at most [`MAX_JSON_FILE_BYTES`] (a larger one is
/// [`Error::TooLarge`]), and only a regular file (a FIFO would block the reader forever).
fn read_json(path: &Path) -> Result<Value> {
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    let too_large = || Error::TooLarge {
        what: path.display().to_string(),
        kind: "a config or index file",
        limit: MAX_JSON_FILE_BYTES,
    };
    if !meta.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"),
        });
    }
    if meta.len() > MAX_JSON_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_JSON_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    if bytes.len() as u64 > MAX_JSON_FILE_BYTES {
        return Err(too_large());
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Files this crate or the loader reads whole as JSON: capped at [`MAX_JSON_FILE_BYTES`].
fn is_capped(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == CONFIG || name == WEIGHTS_INDEX
}

fn invalid(repo_id: &str, path: &str, message: impl Into<String>) -> Error {
    Error::InvalidConfig {
        repo_id: repo_id.to_string(),
        path: path.to_string(),
        message: message.into(),
    }
}

impl Hub {
    /// The TPTT variants of `repo_id` at `main`: the root's subfolders whose `config.json` is
    /// a TPTT config ([`is_tptt_config`]), sorted by name; `"."` when there are none and the
    /// root's own `config.json` is one. Only those `config.json` files are downloaded (into
    /// the cache, where [`Hub::download_variant`] reuses them). Folders whose config is not
    /// JSON are skipped with a warning.
    pub fn discover_variants(&self, repo_id: &str) -> Result<Vec<Variant>> {
        let info = self.list_files(repo_id, MAIN)?;
        let never = AtomicBool::new(false);
        let mut tx = Transfer::new(None, &never);
        let mut out = Vec::new();
        let mut candidates: Vec<String> = config_folders(&info);
        if info.file(CONFIG).is_some() {
            candidates.push(".".into());
        }
        for name in candidates {
            if name == "." && !out.is_empty() {
                break;
            }
            let path = format!("{}{CONFIG}", prefix(&name));
            let Some(file) = info.file(&path) else {
                continue;
            };
            let local = match self.fetch_small(&info, file, &mut tx) {
                Ok(local) => local,
                Err(e @ Error::TooLarge { .. }) => {
                    tracing::warn!(repo_id, path, error = %e, "skipping a config.json over the size limit");
                    continue;
                }
                Err(e) => return Err(e),
            };
            match read_json(&local) {
                Ok(v) if is_tptt_config(&v) => out.push(Variant::from_config(&name, v)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(repo_id, path, error = %e, "skipping a config.json that is not JSON")
                }
            }
        }
        Ok(out)
    }

    /// Download variant `variant` of `repo_id` (at `main`) and its base model, skipping files
    /// already complete in the cache (module doc for the file list). `progress` receives
    /// [`Progress`] events on this thread; raising `cancel` stops at the next chunk with
    /// [`Error::Cancelled`]. An interrupted file resumes where it stopped, in this call (up
    /// to [`crate::HubConfig::max_retries`] times) or a later one, even after a restart.
    ///
    /// It always asks the hub for the current commit first, so it needs the network even when
    /// everything is cached: offline, use [`Hub::local_variant`].
    pub fn download_variant(
        &self,
        repo_id: &str,
        variant: &str,
        mut progress: impl FnMut(&Progress),
        cancel: &AtomicBool,
    ) -> Result<LocalVariant> {
        validate_repo_id(repo_id)?;
        validate_variant(variant).map_err(|_| Error::VariantNotFound {
            repo_id: repo_id.to_string(),
            variant: variant.to_string(),
            available: Vec::new(),
        })?;
        // While it runs, `remove_variant` of this variant waits or refuses (lock.rs).
        let _running =
            VariantGuard::start(RepoCache::new(self.cache_dir(), repo_id).dir(), variant);
        // Small files needed to make the plan (configs, index) are fetched silently first;
        // they show up as reused in the plan's progress.
        let mut quiet = Transfer::new(None, cancel);
        quiet.check_cancel()?;
        let repo = self.list_files(repo_id, MAIN)?;
        let config_path = format!("{}{CONFIG}", prefix(variant));
        let not_found = || Error::VariantNotFound {
            repo_id: repo_id.to_string(),
            variant: variant.to_string(),
            available: config_folders(&repo),
        };
        let config_file = repo.file(&config_path).ok_or_else(not_found)?;
        let config = read_json(&self.fetch_small(&repo, config_file, &mut quiet)?)?;
        if !is_tptt_config(&config) {
            return Err(not_found());
        }
        let v = Variant::from_config(variant, config);
        let base_id = v
            .base_model_name
            .clone()
            .ok_or_else(|| invalid(repo_id, &config_path, "no base_model_name"))?;
        validate_repo_id(&base_id).map_err(|_| {
            invalid(
                repo_id,
                &config_path,
                format!("base_model_name {base_id:?} is not a Hugging Face repository id"),
            )
        })?;
        if let Some(s) = &v.base_model_subfolder {
            if !is_safe_repo_path(s) {
                return Err(invalid(
                    repo_id,
                    &config_path,
                    format!("unusable base_model_subfolder {s:?}"),
                ));
            }
        }
        let sub = v.base_model_subfolder.as_deref();
        let base = self.list_files(&base_id, MAIN)?;

        let mut plan: Vec<(&RepoInfo, &RepoFile)> = Vec::new();
        plan.extend(variant_plan(&repo, variant).into_iter().map(|f| (&repo, f)));
        plan.extend(base_small_plan(&base, sub).into_iter().map(|f| (&base, f)));
        let wdir = prefix(sub.unwrap_or(""));
        let index_path = format!("{wdir}{WEIGHTS_INDEX}");
        if let Some(index_file) = base.file(&index_path) {
            let index = read_json(&self.fetch_small(&base, index_file, &mut quiet)?)?;
            let shards = index_shards(&index).map_err(|m| invalid(&base_id, &index_path, m))?;
            plan.push((&base, index_file));
            for s in shards {
                let path = format!("{wdir}{s}");
                let f = base.file(&path).ok_or_else(|| Error::MissingWeights {
                    repo_id: base_id.clone(),
                    message: format!(
                        "{index_path} names {path}, which the repository does not have"
                    ),
                })?;
                plan.push((&base, f));
            }
        } else if let Some(f) = base.file(&format!("{wdir}{WEIGHTS}")) {
            plan.push((&base, f));
        } else {
            return Err(Error::MissingWeights {
                repo_id: base_id,
                message: format!("neither {wdir}{WEIGHTS} nor {index_path}"),
            });
        }

        // Refused before anything is downloaded when the listing already says so.
        if let Some((info, f)) = plan
            .iter()
            .find(|(_, f)| is_capped(&f.path) && f.size.is_some_and(|s| s > MAX_JSON_FILE_BYTES))
        {
            return Err(Error::TooLarge {
                what: format!("{}/{}", info.repo_id, f.path),
                kind: "a config or index file",
                limit: MAX_JSON_FILE_BYTES,
            });
        }

        let mut tx = Transfer::new(Some(&mut progress), cancel);
        tx.set_plan(
            plan.iter().map(|(_, f)| f.size.unwrap_or(0)).sum(),
            plan.len(),
        );
        for (info, file) in &plan {
            if is_capped(&file.path) {
                self.fetch_small(info, file, &mut tx)?;
            } else {
                self.fetch_file(info, file, &mut tx)?;
            }
        }

        let repo_cache = RepoCache::new(self.cache_dir(), repo_id);
        let base_cache = RepoCache::new(self.cache_dir(), &base_id);
        let record = Record {
            variant: variant.to_string(),
            repo_commit: repo.commit_sha.clone(),
            base_model_name: base_id.clone(),
            base_commit: base.commit_sha.clone(),
            base_model_subfolder: v.base_model_subfolder.clone(),
            files: plan
                .iter()
                .map(|(info, f)| {
                    let pointer = RepoCache::new(self.cache_dir(), &info.repo_id)
                        .pointer(&info.commit_sha, &f.path);
                    let size = std::fs::metadata(&pointer).map(|m| m.len()).unwrap_or(0);
                    RecordFile {
                        base: info.repo_id != repo_id,
                        path: f.path.clone(),
                        size,
                    }
                })
                .collect(),
        };
        write_record(&repo_cache, &record)?;
        repo_cache.write_ref(MAIN, &repo.commit_sha)?;
        base_cache.write_ref(MAIN, &base.commit_sha)?;
        tx.finished();
        tracing::info!(repo_id, variant, base = %base_id, "variant downloaded");
        Ok(self.local_from_record(repo_id, &record))
    }

    /// The snapshot folder `refs/main` names for `repo_id`: the commit of the last completed
    /// [`Hub::download_variant`] (or of another HF tool's download). No network. Which files
    /// it holds depends on what was downloaded; use [`Hub::local_variant`] for a loadable
    /// variant.
    pub fn local_snapshot(&self, repo_id: &str) -> Option<PathBuf> {
        validate_repo_id(repo_id).ok()?;
        let cache = RepoCache::new(self.cache_dir(), repo_id);
        let p = cache.snapshot(&cache.read_ref(MAIN)?);
        p.is_dir().then_some(p)
    }

    /// A complete download of `variant`, found without any network (module doc for what
    /// "complete" means). Prefers the commit `refs/main` names, then newer snapshots.
    pub fn local_variant(&self, repo_id: &str, variant: &str) -> Result<LocalVariant> {
        validate_repo_id(repo_id)?;
        let not_cached = || Error::NotCached {
            what: format!("variant {variant:?} of {repo_id}"),
            cache: self.cache_dir().to_path_buf(),
        };
        validate_variant(variant).map_err(|_| not_cached())?;
        let cache = RepoCache::new(self.cache_dir(), repo_id);
        for snap in cache.snapshots() {
            let Some(commit) = snap.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(found) = self.check_record(repo_id, commit, variant) {
                return Ok(found);
            }
            if let Some(found) = self.check_without_record(repo_id, commit, variant) {
                return Ok(found);
            }
        }
        Err(not_cached())
    }

    /// Every variant of `repo_id` that [`Hub::local_variant`] would find, sorted by name.
    /// No network.
    pub fn local_variants(&self, repo_id: &str) -> Vec<LocalVariant> {
        if validate_repo_id(repo_id).is_err() {
            return Vec::new();
        }
        let cache = RepoCache::new(self.cache_dir(), repo_id);
        let mut names = BTreeSet::new();
        for snap in cache.snapshots() {
            let Some(commit) = snap.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Ok(rd) = std::fs::read_dir(cache.record_dir(commit)) {
                names.extend(
                    rd.flatten()
                        .filter_map(|e| record_variant_name(&e.file_name().to_string_lossy())),
                );
            }
            if let Ok(rd) = std::fs::read_dir(&snap) {
                names.extend(
                    rd.flatten()
                        .filter(|e| e.path().join(CONFIG).is_file())
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
            if snap.join(CONFIG).is_file() {
                names.insert(".".into());
            }
        }
        names
            .into_iter()
            .filter_map(|n| self.local_variant(repo_id, &n).ok())
            .collect()
    }

    /// The repositories of the cache that hold at least one variant [`Hub::local_variant`]
    /// would find (a complete TPTT variant and its base), sorted: what another tool
    /// (`huggingface-cli download`, `huggingface_hub`) or an earlier install left there, usable
    /// without any network. Folder names are read as `huggingface_hub` writes them
    /// (`models--{owner}--{name}`); at most [`MAX_CACHED_REPOS`] are looked at. No network.
    pub fn cached_repos(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.cache_dir()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .take(MAX_CACHED_REPOS)
            .filter_map(|e| repo_id_of_cache_folder(&e.file_name().to_string_lossy()))
            .collect();
        ids.sort();
        ids.retain(|id| !self.local_variants(id).is_empty());
        ids
    }

    /// Remove a downloaded variant from the cache: its download records, its folder's snapshot
    /// entries in every snapshot of `repo_id`, the blobs no other entry of the repository
    /// uses, and the partial files (`blobs/*.incomplete`) a cancelled download of its folder
    /// left. The base model and the repository's root files stay (other variants and other HF
    /// tools share them). Returns the bytes removed. No network. The root variant (`"."`)
    /// loses only its records, so [`Hub::local_variant`] no longer finds it complete through
    /// them.
    ///
    /// A download of the variant running in this process is waited for, up to
    /// [`REMOVE_WAIT`] (a cancelled one stops within it), and so is another program writing
    /// one of its partial files; one that still runs then is [`Error::Busy`], with nothing
    /// removed (else the download would write the files again).
    pub fn remove_variant(&self, repo_id: &str, variant: &str) -> Result<u64> {
        validate_repo_id(repo_id)?;
        validate_variant(variant).map_err(|_| Error::VariantNotFound {
            repo_id: repo_id.to_string(),
            variant: variant.to_string(),
            available: Vec::new(),
        })?;
        let cache = RepoCache::new(self.cache_dir(), repo_id);
        let deadline = Instant::now() + REMOVE_WAIT;
        if !VariantGuard::wait_none(cache.dir(), variant, deadline) {
            return Err(Error::Busy {
                what: format!("variant {variant:?} of {repo_id}"),
            });
        }
        let partial_bytes = reclaim_partials(&cache, repo_id, variant, deadline)?;
        let snapshots = cache.snapshots();
        let mut pointers = Vec::new();
        for snap in &snapshots {
            let Some(commit) = snap.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let record = cache.record_path(commit, variant);
            if record.exists() {
                std::fs::remove_file(&record).map_err(|e| io_error(&record, e))?;
            }
            if variant != "." {
                collect_files(&join_rel(snap, variant), &mut pointers);
            }
        }
        // Blobs the entries point to; those that no remaining entry points to go.
        let targets: BTreeSet<PathBuf> = pointers
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        for p in &pointers {
            std::fs::remove_file(p).map_err(|e| io_error(p, e))?;
        }
        for snap in &snapshots {
            if variant != "." {
                let dir = join_rel(snap, variant);
                if dir.is_dir() {
                    std::fs::remove_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
                }
            }
        }
        let mut remaining = Vec::new();
        for snap in &snapshots {
            collect_files(snap, &mut remaining);
        }
        let used: BTreeSet<PathBuf> = remaining
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        let blobs = std::fs::canonicalize(cache.dir().join("blobs")).ok();
        let mut freed = 0;
        for t in targets.difference(&used) {
            // Only blobs of this repository (an entry copied in place is removed with its folder).
            if blobs.as_ref().is_some_and(|b| t.starts_with(b)) {
                freed += std::fs::metadata(t).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(t).map_err(|e| io_error(t, e))?;
            }
        }
        let freed = freed + partial_bytes;
        tracing::info!(repo_id, variant, freed, "variant removed from the cache");
        Ok(freed)
    }

    fn local_from_record(&self, repo_id: &str, r: &Record) -> LocalVariant {
        let repo_snapshot = RepoCache::new(self.cache_dir(), repo_id).snapshot(&r.repo_commit);
        let base_snapshot =
            RepoCache::new(self.cache_dir(), &r.base_model_name).snapshot(&r.base_commit);
        LocalVariant {
            repo_id: repo_id.to_string(),
            variant: r.variant.clone(),
            repo_commit: r.repo_commit.clone(),
            variant_dir: join_rel(&repo_snapshot, &r.variant),
            repo_snapshot,
            base_model_name: r.base_model_name.clone(),
            base_commit: r.base_commit.clone(),
            base_dir: join_rel(
                &base_snapshot,
                r.base_model_subfolder.as_deref().unwrap_or(""),
            ),
            base_snapshot,
        }
    }

    /// A record for `variant` at `commit` whose every file is present with its size.
    fn check_record(&self, repo_id: &str, commit: &str, variant: &str) -> Option<LocalVariant> {
        let cache = RepoCache::new(self.cache_dir(), repo_id);
        let bytes = std::fs::read(cache.record_path(commit, variant)).ok()?;
        let r: Record = serde_json::from_slice(&bytes).ok()?;
        if r.variant != variant
            || r.repo_commit != commit
            || validate_repo_id(&r.base_model_name).is_err()
        {
            return None;
        }
        let base_cache = RepoCache::new(self.cache_dir(), &r.base_model_name);
        let all_there = r.files.iter().all(|f| {
            is_safe_repo_path(&f.path)
                && if f.base {
                    cache::is_complete(&base_cache.pointer(&r.base_commit, &f.path), Some(f.size))
                } else {
                    cache::is_complete(&cache.pointer(commit, &f.path), Some(f.size))
                }
        });
        if !all_there {
            tracing::warn!(
                repo_id,
                variant,
                commit,
                "download record lists files that are missing"
            );
            return None;
        }
        Some(self.local_from_record(repo_id, &r))
    }

    /// Without a record: config + adapter in the variant folder, base config + complete
    /// weights in some snapshot of the base.
    fn check_without_record(
        &self,
        repo_id: &str,
        commit: &str,
        variant: &str,
    ) -> Option<LocalVariant> {
        let snap = RepoCache::new(self.cache_dir(), repo_id).snapshot(commit);
        let dir = join_rel(&snap, variant);
        let config = read_json(&dir.join(CONFIG)).ok()?;
        if !is_tptt_config(&config) || !dir.join(ADAPTER).is_file() {
            return None;
        }
        let v = Variant::from_config(variant, config);
        let base_id = v.base_model_name?;
        validate_repo_id(&base_id).ok()?;
        let sub = v.base_model_subfolder.filter(|s| is_safe_repo_path(s));
        for base_snap in RepoCache::new(self.cache_dir(), &base_id).snapshots() {
            let base_dir = join_rel(&base_snap, sub.as_deref().unwrap_or(""));
            let has_config = base_snap.join(CONFIG).is_file() || base_dir.join(CONFIG).is_file();
            if has_config && weights_complete(&base_dir) {
                let base_commit = base_snap.file_name()?.to_str()?.to_string();
                return Some(self.local_from_record(
                    repo_id,
                    &Record {
                        variant: variant.to_string(),
                        repo_commit: commit.to_string(),
                        base_model_name: base_id,
                        base_commit,
                        base_model_subfolder: sub,
                        files: Vec::new(),
                    },
                ));
            }
        }
        None
    }
}

/// Cache folders [`Hub::cached_repos`] looks at, at most: listing stays quick whatever the
/// cache holds.
pub const MAX_CACHED_REPOS: usize = 10_000;

/// The repository id of a model folder of the cache (`models--{owner}--{name}`, as
/// `huggingface_hub` names them: `/` written `--`), when it is a valid one. Datasets, spaces,
/// `.locks` and anything else are not models.
pub fn repo_id_of_cache_folder(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    let id = rest.split("--").collect::<Vec<_>>().join("/");
    validate_repo_id(&id).ok()?;
    Some(id)
}

/// Delete the partial files noted for `variant`'s folder only (a partial also noted for a
/// file elsewhere stays, for that file). Each is deleted under its blob's lock, waited for
/// until `deadline`: a download writing it then is [`Error::Busy`]. Returns the bytes freed.
fn reclaim_partials(
    cache: &RepoCache,
    repo_id: &str,
    variant: &str,
    deadline: Instant,
) -> Result<u64> {
    if variant == "." {
        // The root's files are every variant's.
        return Ok(0);
    }
    let prefix = format!("{variant}/");
    let mut freed = 0;
    for (etag, paths) in cache.partials() {
        if !is_safe_name(&etag) || !paths.iter().any(|p| p.starts_with(&prefix)) {
            continue;
        }
        let Some(_lock) = BlobLock::acquire_until(&cache.lock_file(&etag), deadline)? else {
            return Err(Error::Busy {
                what: format!("{} of {repo_id}", paths.join(", ")),
            });
        };
        // Read again under the lock: a download may have added a path meanwhile.
        let others: Vec<String> = cache
            .partial_paths(&etag)
            .into_iter()
            .filter(|p| !p.starts_with(&prefix))
            .collect();
        if !others.is_empty() {
            cache.write_partial(&etag, &others);
            continue;
        }
        let part = cache.incomplete(&etag);
        match std::fs::metadata(&part) {
            Ok(m) => {
                std::fs::remove_file(&part).map_err(|e| io_error(&part, e))?;
                freed += m.len();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&part, e)),
        }
        cache.write_partial(&etag, &[]);
        tracing::info!(
            repo_id,
            variant,
            etag,
            "partial download of a removed variant deleted"
        );
    }
    Ok(freed)
}

/// Every file (or link to one) under `dir`, recursively; nothing when it does not exist.
fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => collect_files(&p, out),
            Ok(_) => out.push(p),
            Err(_) => {}
        }
    }
}

/// `model.safetensors`, or an index whose every shard is present.
fn weights_complete(dir: &Path) -> bool {
    match read_json(&dir.join(WEIGHTS_INDEX)) {
        Ok(index) => index_shards(&index)
            .is_ok_and(|shards| shards.iter().all(|s| join_rel(dir, s).is_file())),
        Err(_) => dir.join(WEIGHTS).is_file(),
    }
}

/// `base` joined with a `/`-separated relative path (`""` or `"."` is `base`).
fn join_rel(base: &Path, rel: &str) -> PathBuf {
    rel.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .fold(base.to_path_buf(), |p, c| p.join(c))
}

/// Record file names: `{variant}.json`, `@root.json` for `"."`.
fn record_file_name(variant: &str) -> String {
    if variant == "." {
        "@root.json".into()
    } else {
        format!("{variant}.json")
    }
}

fn record_variant_name(file_name: &str) -> Option<String> {
    match file_name.strip_suffix(".json")? {
        "@root" => Some(".".into()),
        n if !n.is_empty() => Some(n.to_string()),
        _ => None,
    }
}

impl RepoCache {
    fn record_dir(&self, commit: &str) -> PathBuf {
        self.dir().join(RECORDS).join(commit)
    }

    fn record_path(&self, commit: &str, variant: &str) -> PathBuf {
        self.record_dir(commit).join(record_file_name(variant))
    }
}

fn write_record(cache: &RepoCache, r: &Record) -> Result<()> {
    let path = cache.record_path(&r.repo_commit, &r.variant);
    let json = serde_json::to_vec_pretty(r).map_err(|e| Error::Io {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    cache::write_atomic(&path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn listing(paths: &[&str]) -> RepoInfo {
        RepoInfo {
            repo_id: "o/n".into(),
            revision: "main".into(),
            commit_sha: "c0".into(),
            files: paths
                .iter()
                .map(|p| RepoFile {
                    path: p.to_string(),
                    size: Some(1),
                    lfs_sha256: None,
                    blob_id: None,
                })
                .collect(),
            gated: false,
        }
    }

    fn paths(files: Vec<&RepoFile>) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn variant_plan_takes_only_what_loading_needs() {
        let repo = listing(&[
            "README.md",
            "modeling_tptt.py",
            "tokenizer.json",
            "v1/config.json",
            "v1/adapter_model.safetensors",
            "v1/README.md",
            "v1/tokenizer_config.json",
            "v2/config.json",
            "v2/adapter_model.safetensors",
        ]);
        assert_eq!(
            paths(variant_plan(&repo, "v1")),
            [
                "v1/config.json",
                "v1/adapter_model.safetensors",
                "v1/tokenizer_config.json",
                "tokenizer.json"
            ]
        );
        assert_eq!(paths(variant_plan(&repo, ".")), ["tokenizer.json"]);
    }

    #[test]
    fn base_plan_reads_the_root_and_the_subfolder() {
        let base = listing(&[
            "config.json",
            "tokenizer.json",
            "w/config.json",
            "w/generation_config.json",
            "original/params.json",
        ]);
        assert_eq!(
            paths(base_small_plan(&base, None)),
            ["config.json", "tokenizer.json"]
        );
        assert_eq!(
            paths(base_small_plan(&base, Some("w"))),
            [
                "config.json",
                "tokenizer.json",
                "w/config.json",
                "w/generation_config.json"
            ]
        );
    }

    #[test]
    fn index_shards_are_deduplicated_and_checked() {
        let idx = json!({"metadata": {}, "weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}});
        assert_eq!(
            index_shards(&idx).expect("valid index"),
            ["m-1.safetensors", "m-2.safetensors"]
        );
        assert!(index_shards(&json!({"weight_map": {"a": "../../x"}})).is_err());
        assert!(index_shards(&json!({"weight_map": {}})).is_err());
        assert!(index_shards(&json!({})).is_err());
    }

    #[test]
    fn tptt_configs_are_recognised() {
        assert!(is_tptt_config(&json!({"model_type": "tptt"})));
        assert!(is_tptt_config(
            &json!({"model_type": "llama", "base_model_name": "x/y"})
        ));
        assert!(!is_tptt_config(&json!({"model_type": "llama"})));
        let v = Variant::from_config(
            "v",
            json!({"base_model_name": " o/b ", "base_model_subfolder": "/w/"}),
        );
        assert_eq!(v.base_model_name.as_deref(), Some("o/b"));
        assert_eq!(v.base_model_subfolder.as_deref(), Some("w"));
    }

    #[test]
    fn record_names_round_trip() {
        for v in [".", "liza-a"] {
            assert_eq!(
                record_variant_name(&record_file_name(v)).as_deref(),
                Some(v)
            );
        }
    }
}
