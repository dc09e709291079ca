//! [`AppHost`]: the API server's model is the one chosen in the app's Settings, loaded like a
//! chat's (the same cache, the same engine thread, so API requests and the user's chats queue
//! behind each other and never load a second copy of the weights).
//!
//! A request that finds the chosen model not loaded starts loading it in the background and
//! gets a 503 `model_loading` (clients retry); a load that failed is remembered for
//! [`RETRY_FAILED_LOAD`] (503 `model_unavailable` with the reason), so a broken model is not
//! loaded again for every request.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tptt_api::{ApiError, Host, Runner, Serving};
use tptt_engine::worker::{Job, JobResult};
use tptt_engine::ChatModel;
use tptt_store::ConversationSettings;

use crate::chat::model::{ensure_model, target};
use crate::chat_settings::effective;
use crate::runtime::{LoadKey, LoadedModel, ModelRef};
use crate::settings::AppSettings;
use crate::state::{lock, AppState, Inner};

/// How long a failed load is answered from memory before a request tries again.
pub const RETRY_FAILED_LOAD: Duration = Duration::from_secs(60);

/// The id API clients name for the model `settings` choose: `<repository or folder
/// name>/<variant>`.
pub fn model_id(settings: &AppSettings) -> Option<String> {
    let (repo, variant) = (
        settings.model_repo.as_deref()?,
        settings.variant.as_deref()?,
    );
    let name = match ModelRef::parse(repo) {
        ModelRef::Hub(id) => id,
        ModelRef::Local(path) => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
    };
    Some(format!("{name}/{variant}"))
}

/// A load in progress or failed.
#[derive(Debug, Clone)]
enum Load {
    Running(LoadKey),
    Failed(LoadKey, String, Instant),
}

/// The app as the API server's host (module doc). Holds the app's state weakly: the state owns
/// the server, which owns this.
pub struct AppHost {
    state: Weak<Inner>,
    load: Arc<Mutex<Option<Load>>>,
}

impl AppHost {
    /// The host of `state`'s chosen model.
    pub fn new(state: &AppState) -> Arc<Self> {
        Arc::new(Self {
            state: state.downgrade(),
            load: Arc::new(Mutex::new(None)),
        })
    }

    fn state(&self) -> Result<AppState, ApiError> {
        AppState::upgrade(&self.state).ok_or_else(|| ApiError::unavailable("TPTT Chat is closing."))
    }
}

/// A loaded model's engine thread, as the API's runner.
struct AppRunner(Arc<LoadedModel>);

impl Runner for AppRunner {
    fn submit(&self, job: Job) -> tptt_engine::Result<std::sync::mpsc::Receiver<JobResult>> {
        self.0.engine.submit(job)
    }
}

impl Host for AppHost {
    fn model_id(&self) -> Option<String> {
        model_id(&self.state().ok()?.settings())
    }

    fn serving(&self) -> Result<Serving, ApiError> {
        let state = self.state()?;
        let settings = state.settings();
        let Some(id) = model_id(&settings) else {
            return Err(ApiError::unavailable(
                "No model is chosen in TPTT Chat: choose a model and a variant in its Settings.",
            ));
        };
        let chosen = effective(&settings, &ConversationSettings::default());
        let (Some(repo), Some(variant)) = (chosen.model_repo.as_deref(), chosen.variant.clone())
        else {
            return Err(ApiError::unavailable("No model is chosen in TPTT Chat."));
        };
        let key = LoadKey {
            model: crate::models::model_ref(&state.registry(), repo),
            variant,
            device: settings.device,
        };
        let loaded = lock(&state.model).clone();
        if let Some(m) = loaded.filter(|m| m.key == key) {
            return Ok(Serving {
                model_id: id,
                chat: ChatModel {
                    model: m.model.clone(),
                    tokenizer: m.tokenizer.clone(),
                    format: m.format.clone(),
                    eos_ids: m.eos_ids.clone(),
                    identity: m.identity.clone(),
                },
                window: chosen.window.map(|w| w as usize),
                kv_format: settings.kv_format.format_for(&m.model),
                runner: Arc::new(AppRunner(m)),
            });
        }
        let mut load = lock(&self.load);
        match &*load {
            Some(Load::Running(k)) if *k == key => return Err(ApiError::loading(&id)),
            Some(Load::Failed(k, why, at)) if *k == key && at.elapsed() < RETRY_FAILED_LOAD => {
                return Err(ApiError::unavailable(format!(
                    "The model {id} cannot be loaded: {why}"
                )));
            }
            _ => {}
        }
        *load = Some(Load::Running(key.clone()));
        drop(load);
        let slot = self.load.clone();
        let spawned = std::thread::Builder::new()
            .name("api-model-load".into())
            .spawn(move || {
                let outcome =
                    target(&state, &chosen).and_then(|t| ensure_model(&state, &t).map(|_| ()));
                let mut g = lock(&slot);
                *g = match outcome {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %e.message, "the API server's model cannot be loaded");
                        Some(Load::Failed(key, e.message, Instant::now()))
                    }
                };
            });
        if let Err(e) = spawned {
            *lock(&self.load) = None;
            return Err(ApiError::internal(format!(
                "cannot start loading the model: {e}"
            )));
        }
        Err(ApiError::loading(&id))
    }
}
