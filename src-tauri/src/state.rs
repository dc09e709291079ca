//! The app's state, shared by every command and worker thread: [`AppState`] (a cheap handle on
//! [`Inner`]) built from an [`AppConfig`] (where its files live, where the hub is).
//!
//! Locks are `std::sync::Mutex`es held for a few statements, never across an `.await` or a
//! model call; a poisoned lock (a panicking thread) is taken over as is ([`lock`]): every value
//! behind one stays consistent between statements.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tptt_engine::CancelToken;
use tptt_hub::{Hub, HubConfig};
use tptt_store::{ConversationId, Store};

use crate::chat::held::CachedSession;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::models::registry::{Registry, REGISTRY_KEY};
use crate::runtime::LoadedModel;
use crate::settings::{AppSettings, TokenFile, SETTINGS_KEY};

/// Where the app keeps its files and finds the hub.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The conversation database and the state snapshots.
    pub data_dir: PathBuf,
    /// The Hugging Face token file.
    pub config_dir: PathBuf,
    /// Hub endpoint and model cache (the token in it is the environment's; a stored one wins).
    pub hub: HubConfig,
    /// How often a streaming answer's text is saved ([`crate::chat::PARTIAL_SAVE_INTERVAL`]).
    pub partial_save_every: std::time::Duration,
}

/// Overrides the per-user folders (both data and config go under it): for tests and
/// end-to-end runs on a throwaway folder.
pub const DATA_DIR_ENV: &str = "TPTT_CHAT_DATA_DIR";

impl AppConfig {
    /// The per-user folders of `directories` (`~/.local/share/tptt-chat`,
    /// `~/.config/tptt-chat` on Linux), or `$TPTT_CHAT_DATA_DIR`; the hub as
    /// `huggingface_hub` finds it (`HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`).
    pub fn from_env() -> Result<Self, String> {
        let hub = HubConfig::from_env();
        if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            return Ok(Self::in_dir(&dir, hub));
        }
        let dirs = directories::ProjectDirs::from("org", "tptt", "tptt-chat")
            .ok_or("no home folder: set TPTT_CHAT_DATA_DIR to a folder for the app's data")?;
        Ok(Self {
            data_dir: dirs.data_dir().to_path_buf(),
            config_dir: dirs.config_dir().to_path_buf(),
            hub,
            partial_save_every: crate::chat::PARTIAL_SAVE_INTERVAL,
        })
    }

    /// Everything under one folder, with an explicit hub (tests).
    pub fn in_dir(dir: &Path, hub: HubConfig) -> Self {
        Self {
            data_dir: dir.to_path_buf(),
            config_dir: dir.join("config"),
            hub,
            partial_save_every: crate::chat::PARTIAL_SAVE_INTERVAL,
        }
    }

    /// The conversation database.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("conversations.sqlite3")
    }

    /// The log files ([`crate::logging`]).
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// The state snapshots (one folder per conversation).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.data_dir.join("states")
    }
}

/// The generation running now (at most one).
#[derive(Debug, Clone)]
pub struct Running {
    /// Its conversation.
    pub conversation: ConversationId,
    /// Stops it.
    pub cancel: CancelToken,
}

/// Everything the commands share (module doc).
pub struct Inner {
    /// Folders and hub.
    pub config: AppConfig,
    /// The conversation database.
    pub store: Store,
    /// The Hugging Face token.
    pub token: TokenFile,
    /// Settings (a copy of what is stored).
    pub settings: Mutex<AppSettings>,
    /// The model manager's memory (a copy of what is stored).
    pub registry: Mutex<Registry>,
    /// The loaded model.
    pub model: Mutex<Option<Arc<LoadedModel>>>,
    /// The memory of the last conversation used (one: a state may take hundreds of MB).
    pub session: Mutex<Option<CachedSession>>,
    /// The running generation.
    pub generation: Mutex<Option<Running>>,
    /// Running downloads and their cancel flags.
    pub downloads: Mutex<HashMap<(String, String), Arc<AtomicBool>>>,
    /// Things to tell the user once (the damaged database that was moved aside...).
    pub notices: Mutex<Vec<CommandError>>,
    /// Held while a model loads: a chat and the API server never load two at once.
    pub loading: Mutex<()>,
    /// The local API server ([`crate::api_server`]).
    pub api_server: crate::api_server::ApiControl,
}

/// A handle on the shared state; clones share it.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Takes a lock, taking over a poisoned one (module doc).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AppState {
    /// Deletes the snapshot files a crash left half-written ([`crate::cleanup`]) and starts the
    /// sweep of unused KV pages on a thread of its own, then opens
    /// the database (a damaged one is moved aside and a new one started, with a notice;
    /// one that cannot be opened at all gives an in-memory database, with a notice that
    /// nothing will be kept) and reads the settings and the model registry. Fails only when
    /// not even an in-memory database opens.
    pub async fn open(config: AppConfig) -> Result<Self, tptt_store::Error> {
        crate::cleanup::sweep_snapshot_temps(&config.snapshots_dir());
        let states = config.snapshots_dir();
        let swept = std::thread::Builder::new()
            .name("page-sweep".into())
            .spawn(move || crate::cleanup::sweep_unused_pages(&states));
        if let Err(e) = swept {
            tracing::warn!(error = %e, "cannot start the sweep of unused KV pages");
        }
        let mut notices = Vec::new();
        let path = config.db_path();
        let store = match Store::open(&path).await {
            Ok(s) => s,
            Err(tptt_store::Error::Corrupt { .. }) => match Store::move_aside(&path) {
                Ok(moved) => {
                    notices.push(CommandError::new(
                        ErrorKind::Database,
                        format!(
                            "The conversation database was damaged. It was moved aside to {} (kept for recovery) and a new, empty one was started.",
                            moved.display()
                        ),
                    ));
                    match Store::open(&path).await {
                        Ok(s) => s,
                        Err(e) => memory_store(&mut notices, &path, &e).await?,
                    }
                }
                Err(e) => memory_store(&mut notices, &path, &e).await?,
            },
            Err(e) => memory_store(&mut notices, &path, &e).await?,
        };
        let settings = match store.get_setting::<AppSettings>(SETTINGS_KEY).await {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "stored settings unreadable, using the defaults");
                AppSettings::default()
            }
        };
        let registry = match store.get_setting::<Registry>(REGISTRY_KEY).await {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "stored model list unreadable, starting empty");
                Registry::default()
            }
        };
        let token = TokenFile::new(&config.config_dir);
        Ok(Self(Arc::new(Inner {
            config,
            store,
            token,
            settings: Mutex::new(settings),
            registry: Mutex::new(registry),
            model: Mutex::new(None),
            session: Mutex::new(None),
            generation: Mutex::new(None),
            downloads: Mutex::new(HashMap::new()),
            notices: Mutex::new(notices),
            loading: Mutex::new(()),
            api_server: Default::default(),
        })))
    }

    /// A handle that does not keep the state alive ([`AppState::upgrade`] gets it back).
    pub fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.0)
    }

    /// The state of `weak`, while it lives.
    pub fn upgrade(weak: &Weak<Inner>) -> Option<Self> {
        weak.upgrade().map(Self)
    }

    /// The current settings.
    pub fn settings(&self) -> AppSettings {
        lock(&self.settings).clone()
    }

    /// Stores and adopts `settings`.
    pub async fn save_settings(&self, settings: AppSettings) -> CmdResult<()> {
        self.store.set_setting(SETTINGS_KEY, &settings).await?;
        *lock(&self.settings) = settings;
        Ok(())
    }

    /// The model registry.
    pub fn registry(&self) -> Registry {
        lock(&self.registry).clone()
    }

    /// Changes the registry and stores it.
    pub async fn update_registry(&self, change: impl FnOnce(&mut Registry)) -> CmdResult<Registry> {
        let updated = {
            let mut r = lock(&self.registry);
            change(&mut r);
            r.clone()
        };
        self.store.set_setting(REGISTRY_KEY, &updated).await?;
        Ok(updated)
    }

    /// A hub client with the stored token (else the environment's). Blocking: build, use and
    /// drop it on a worker thread ([`blocking`]), never in an async command (its blocking HTTP
    /// client refuses to live inside the async runtime).
    pub fn hub(&self) -> CmdResult<Hub> {
        let mut config = self.config.hub.clone();
        if let Some(t) = self.token.read() {
            config = config.with_token(Some(t));
        }
        Hub::new(config).map_err(CommandError::hub)
    }

    /// The startup notices, once.
    pub fn take_notices(&self) -> Vec<CommandError> {
        std::mem::take(&mut *lock(&self.notices))
    }
}

/// The fallback when the database file cannot be used: an in-memory one, with a notice.
async fn memory_store(
    notices: &mut Vec<CommandError>,
    path: &Path,
    e: &tptt_store::Error,
) -> Result<Store, tptt_store::Error> {
    tracing::error!(path = %path.display(), error = %e, "cannot open the conversation database");
    notices.push(CommandError::new(
        ErrorKind::Database,
        format!(
            "The conversation database {} cannot be opened ({e}). Conversations of this session will NOT be kept. Free the file (close other copies of TPTT Chat, fix its permissions, or move it away) and restart.",
            path.display()
        ),
    ));
    Store::open_in_memory().await
}

/// Runs blocking work (hub requests, file-system scans, anything holding a [`Hub`]) on the
/// async runtime's blocking pool, off the executor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> CmdResult<T> + Send + 'static,
) -> CmdResult<T> {
    tauri::async_runtime::spawn_blocking(f)
        .await
        .map_err(|e| CommandError::internal("A background task failed", e))?
}
