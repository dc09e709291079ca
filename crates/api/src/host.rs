//! What answers the server's requests: a [`Host`] says which model serves now ([`Serving`]: its
//! id, the [`ChatModel`] to render and tokenize with, and the [`Runner`] whose thread generates),
//! or why none does (loading, none chosen, failed to load). `tptt serve` loads one model
//! ([`LoadingHost`]); the desktop app serves whatever model it has loaded, on the same
//! generation thread as its own chats, so the two queue behind each other.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use tptt_engine::worker::{Job, JobResult};
use tptt_engine::{ChatModel, Engine};

use crate::error::ApiError;

/// Runs generation jobs one at a time (an [`Engine`]'s thread).
pub trait Runner: Send + Sync {
    /// Queues `job`; the receiver yields its result when it ends.
    fn submit(&self, job: Job) -> tptt_engine::Result<Receiver<JobResult>>;
}

impl Runner for Engine {
    fn submit(&self, job: Job) -> tptt_engine::Result<Receiver<JobResult>> {
        Engine::submit(self, job)
    }
}

/// The model answering requests now.
#[derive(Clone)]
pub struct Serving {
    /// The id clients name (`GET /v1/models` lists it).
    pub model_id: String,
    /// The model, its tokenizer and prompt format.
    pub chat: ChatModel,
    /// The thread that generates.
    pub runner: Arc<dyn Runner>,
    /// Softmax window of new conversations (`None`: the model's).
    pub window: Option<usize>,
    /// How new conversations store their KV cache.
    pub kv_format: tptt::state::KvFormat,
}

/// Where the server finds its model (module doc).
pub trait Host: Send + Sync {
    /// The id of the model requests should name, when one is chosen (even while it loads).
    fn model_id(&self) -> Option<String>;
    /// The model ready to answer, or why there is none (an error with its status: 503 while
    /// it loads or cannot be loaded).
    fn serving(&self) -> Result<Serving, ApiError>;
}

/// A model loaded once, in the background while the server already answers (`tptt serve`):
/// requests before it is ready get a 503 `model_loading`, and after a failed load a 503 with
/// the reason.
pub struct LoadingHost {
    model_id: String,
    ready: Mutex<Option<Result<Serving, String>>>,
}

impl LoadingHost {
    /// A host of `model_id`, loading.
    pub fn new(model_id: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            model_id: model_id.into(),
            ready: Mutex::new(None),
        })
    }

    /// The load's outcome: the model serves from now on, or every request gets `Err`'s reason.
    pub fn set(&self, loaded: Result<Serving, String>) {
        if let Ok(mut g) = self.ready.lock() {
            *g = Some(loaded);
        }
    }
}

impl Host for LoadingHost {
    fn model_id(&self) -> Option<String> {
        Some(self.model_id.clone())
    }

    fn serving(&self) -> Result<Serving, ApiError> {
        let g = self
            .ready
            .lock()
            .map_err(|_| ApiError::internal("the model's loader failed"))?;
        match &*g {
            None => Err(ApiError::loading(&self.model_id)),
            Some(Ok(s)) => Ok(s.clone()),
            Some(Err(why)) => Err(ApiError::unavailable(format!(
                "The model {} could not be loaded: {why}",
                self.model_id
            ))),
        }
    }
}
