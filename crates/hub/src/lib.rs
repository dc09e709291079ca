//! Hugging Face hub access for TPTT Chat: list a repository, discover its TPTT variants, and
//! download a variant with its base model into the standard Hugging Face cache, with progress,
//! cancellation, resumption and verification; find completed downloads offline.
//!
//! Main types: [`Hub`] (built from a [`HubConfig`]), [`RepoInfo`] / [`RepoFile`] (a listing),
//! [`Variant`] (a discovered variant), [`LocalVariant`] (the folders of a complete download),
//! [`Progress`] (download events), [`Error`].
//!
//! A TPTT repository holds one subfolder per variant, each with a TPTT `config.json` (one with
//! `model_type: "tptt"` or a `base_model_name`) and an `adapter_model.safetensors`; the base
//! weights come from the hub repository named by `base_model_name` (within
//! `base_model_subfolder` when set).
//!
//! Invariants:
//! - Files live in the layout `huggingface_hub` uses (see `cache.rs`), so downloads made by
//!   other HF tools are reused and ours are usable by them.
//! - A snapshot entry exists only for a complete, verified file; bytes in flight live in
//!   `blobs/{etag}.incomplete` and are never read as content. `refs/main` and the download
//!   record are written only once a whole variant (and its base) is complete.
//! - The token is sent to the endpoint's origin only, never logged, never in `Debug` output or
//!   error messages.
//!
//! The API is blocking (`reqwest::blocking`): call it from a worker thread (`std::thread` or
//! `spawn_blocking`), never directly inside an async executor. Progress arrives through a
//! callback on that thread; cancellation is an [`AtomicBool`](std::sync::atomic::AtomicBool)
//! checked between 64 KiB chunks (a stalled connection is abandoned after 60 s).
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use tptt_hub::{Hub, HubConfig, ProgressKind};
//!
//! let hub = Hub::new(HubConfig::from_env())?;
//! let variants = hub.discover_variants("ffurfaro/Titans-Llama-3.2-1B")?;
//! let cancel = AtomicBool::new(false); // raise it from another thread to stop
//! let local = match hub.local_variant("ffurfaro/Titans-Llama-3.2-1B", &variants[0].name) {
//!     Ok(done) => done, // already complete: no network needed
//!     Err(_) => hub.download_variant(
//!         "ffurfaro/Titans-Llama-3.2-1B",
//!         &variants[0].name,
//!         |p| if p.kind == ProgressKind::Bytes {
//!             eprintln!("{}: {}/{} bytes, {:.0} B/s", p.path, p.done_bytes, p.total_bytes, p.bytes_per_sec)
//!         },
//!         &cancel,
//!     )?,
//! };
//! // Load with the tptt crate: TpttRepo::open(&local.repo_snapshot)?
//! //     .variant(Some(&local.variant), Some(&local.base_dir))
//! # Ok::<(), tptt_hub::Error>(())
//! ```
//!
//! Downloads may run at the same time (two variants sharing a base, a listing refreshed
//! meanwhile, two programs on one cache): each blob is written by one of them under a lock
//! per blob (`lock.rs`), the others wait and reuse it. Nothing read from the network grows
//! without bound: a listing is cut off past [`MAX_LISTING_BYTES`], the JSON files read to plan
//! a download past [`MAX_JSON_FILE_BYTES`], any file past the size its `HEAD` announced.

mod cache;
mod config;
mod download;
mod error;
mod http;
mod lock;
mod progress;
#[cfg(feature = "testing")]
pub mod testing;
mod variant;

use std::fmt;
use std::path::{Path, PathBuf};

pub use config::{HubConfig, DEFAULT_ENDPOINT, DEFAULT_MAX_RETRIES};
pub use error::{Error, Result};
pub use progress::{Progress, ProgressKind, SpeedMeter};
pub use variant::{
    is_tptt_config, repo_id_of_cache_folder, MAX_CACHED_REPOS, REMOVE_WAIT, TOKENIZER_FILES,
};

/// The branch every listing and download uses.
pub const MAIN: &str = "main";

/// The most bytes read of a repository listing (the hub's JSON): a repository with tens of
/// thousands of files lists in a few MiB; a longer answer is refused ([`Error::TooLarge`]).
pub const MAX_LISTING_BYTES: u64 = 16 << 20;

/// The most bytes of a JSON file read to find variants or plan a download (`config.json`,
/// `model.safetensors.index.json`, the download records): real ones are kilobytes; a larger one
/// is refused ([`Error::TooLarge`]) before its bytes are downloaded when the hub announces its
/// size.
pub const MAX_JSON_FILE_BYTES: u64 = 4 << 20;

/// A handle on one hub endpoint and one cache folder. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Hub {
    config: HubConfig,
    http: http::Http,
}

/// A repository at one commit, as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInfo {
    /// `owner/name`.
    pub repo_id: String,
    /// The revision asked for (e.g. `main`).
    pub revision: String,
    /// The commit that revision points to; every file is fetched at this commit.
    pub commit_sha: String,
    /// Every file, sorted as the hub lists them.
    pub files: Vec<RepoFile>,
    /// The repository is gated: downloading needs a token whose account accepted its terms.
    pub gated: bool,
}

/// One file of a [`RepoInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path within the repository, `/`-separated (checked: it cannot leave the repository).
    pub path: String,
    /// Size in bytes (`None` when the server did not say).
    pub size: Option<u64>,
    /// SHA-256 of the content, for files stored with Git LFS (weights, adapters).
    pub lfs_sha256: Option<String>,
    /// Git blob id (the `ETag` of small files).
    pub blob_id: Option<String>,
}

impl RepoInfo {
    /// The file at `path`, if listed.
    pub fn file(&self, path: &str) -> Option<&RepoFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// A TPTT variant found in a repository.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// The subfolder's name (`"."` when the repository root itself is the only variant).
    pub name: String,
    /// Its `config.json`, parsed.
    pub config_json: serde_json::Value,
    /// The hub id (or path) of the base model, when the config names one; the `tptt` loader
    /// refuses a variant without it.
    pub base_model_name: Option<String>,
    /// The folder of the base repository that holds the base weights, if any.
    pub base_model_subfolder: Option<String>,
}

/// The local folders of a complete variant download (from [`Hub::download_variant`] or
/// [`Hub::local_variant`]).
///
/// To load it with the `tptt` crate: `TpttRepo::open(&repo_snapshot)?.variant(Some(&variant),
/// Some(&base_dir))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVariant {
    /// The TPTT repository.
    pub repo_id: String,
    /// The variant's name.
    pub variant: String,
    /// The TPTT repository's commit.
    pub repo_commit: String,
    /// `snapshots/{repo_commit}` of the TPTT repository (root tokenizer files live here).
    pub repo_snapshot: PathBuf,
    /// The variant folder inside it (`config.json`, `adapter_model.safetensors`).
    pub variant_dir: PathBuf,
    /// The base model's repository.
    pub base_model_name: String,
    /// The base repository's commit.
    pub base_commit: String,
    /// `snapshots/{base_commit}` of the base (its root `config.json`).
    pub base_snapshot: PathBuf,
    /// The folder with the base weights: `base_snapshot`, or its `base_model_subfolder`.
    pub base_dir: PathBuf,
}

impl Hub {
    /// A hub client. Fails only on an unusable endpoint URL or token (a token with characters
    /// that cannot go in an HTTP header). No request is made.
    pub fn new(config: HubConfig) -> Result<Self> {
        let http = http::Http::new(&config.endpoint, config.token.as_deref())?;
        Ok(Self { config, http })
    }

    /// The configuration in use.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The cache folder (`HF_HUB_CACHE`).
    pub fn cache_dir(&self) -> &Path {
        &self.config.cache_dir
    }

    /// List `repo_id` at `revision` (a branch, tag or commit): the commit it points to and
    /// every file with its size. One request.
    pub fn list_files(&self, repo_id: &str, revision: &str) -> Result<RepoInfo> {
        validate_repo_id(repo_id)?;
        self.http.repo_info(repo_id, revision)
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.http.endpoint().as_str())
            .field("cache_dir", &self.config.cache_dir)
            .field("token", &self.http.has_token().then_some("<redacted>"))
            .finish()
    }
}

/// `owner/name` (or a bare `name`) of letters, digits, `-`, `_`, `.`, at most 96 characters
/// per part, no `..`: what the hub accepts, and nothing that could escape a folder.
pub fn validate_repo_id(repo_id: &str) -> Result<()> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    let part_ok = |p: &&str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && !p.contains("..")
            && !p.contains("--")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if (1..=2).contains(&parts.len()) && parts.iter().all(part_ok) {
        Ok(())
    } else {
        Err(Error::InvalidRepoId(repo_id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_folders_are_read_as_huggingface_hub_names_them() {
        assert_eq!(
            repo_id_of_cache_folder("models--ffurfaro--Titans-Llama-3.2-1B").as_deref(),
            Some("ffurfaro/Titans-Llama-3.2-1B")
        );
        assert_eq!(
            repo_id_of_cache_folder("models--gpt2").as_deref(),
            Some("gpt2")
        );
        for not_a_model in [
            "datasets--a--b",
            "spaces--a--b",
            ".locks",
            "models--",
            "models--a--b--c",
            "models--..--etc",
            "models--a--b c",
        ] {
            assert_eq!(repo_id_of_cache_folder(not_a_model), None, "{not_a_model}");
        }
    }

    #[test]
    fn repo_ids() {
        for ok in [
            "ffurfaro/Titans-Llama-3.2-1B",
            "gpt2",
            "meta-llama/Llama-3.2-1B",
            "google/gemma-3-270m",
            "a_b/c.d",
        ] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "a/b/c",
            "../x",
            "a/..",
            "a/.x",
            "a b/c",
            "a/b?c",
            "/abs/path",
            "a--b/c",
        ] {
            assert!(
                matches!(validate_repo_id(bad), Err(Error::InvalidRepoId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn hub_can_move_between_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Hub>();
        send_sync::<Error>();
        send_sync::<LocalVariant>();
    }

    #[test]
    fn hub_debug_hides_the_token() {
        let hub = Hub::new(
            HubConfig::new("http://127.0.0.1:1", "/tmp/c").with_token(Some("hf_topsecret".into())),
        )
        .expect("hub");
        let shown = format!("{hub:?}");
        assert!(!shown.contains("hf_topsecret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
