//! The loaded model: [`LoadedModel`] — weights, tokenizer, prompt format, EOS ids, the identity
//! its state snapshots are keyed by, and the [`Engine`] (generation thread) that runs its jobs.
//!
//! One model is loaded at a time. It is loaded lazily, on the turn thread of the first message
//! that needs it, and replaced when the settings name another model, variant or device
//! ([`LoadKey`]): a switch takes effect for the next message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizers::Tokenizer;
use tptt::model::{LoadOptions, Model};
use tptt::repo::{TpttRepo, VariantFiles};
use tptt_engine::snapshot::ModelIdentity;
use tptt_engine::template::PromptFormat;
use tptt_engine::{ChatFiles, ChatModel, Engine};
use tptt_hub::Hub;

use crate::device::{self, DevicePref};
use crate::error::{CmdResult, CommandError, ErrorKind};

/// Which model to load: a hub repository (from the cache) or an imported folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelRef {
    /// A hub repository id; the variant comes from the HF cache (`Hub::local_variant`).
    Hub(String),
    /// An imported folder (absolute path).
    Local(PathBuf),
}

impl ModelRef {
    /// From the settings' `modelRepo`: an absolute path is a local folder, anything else a hub
    /// repository id.
    pub fn parse(model_repo: &str) -> Self {
        let p = Path::new(model_repo);
        if p.is_absolute() {
            Self::Local(p.to_path_buf())
        } else {
            Self::Hub(model_repo.to_string())
        }
    }

    /// The string the settings and the store use.
    pub fn id(&self) -> String {
        match self {
            Self::Hub(r) => r.clone(),
            Self::Local(p) => p.display().to_string(),
        }
    }
}

/// What a loaded model was loaded from and onto.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadKey {
    /// The model.
    pub model: ModelRef,
    /// Its variant.
    pub variant: String,
    /// The device preference it was loaded with.
    pub device: DevicePref,
}

/// A model ready to generate (module doc).
pub struct LoadedModel {
    /// What it was loaded from.
    pub key: LoadKey,
    /// The weights.
    pub model: Arc<Model>,
    /// Its tokenizer (shared with the engine thread).
    pub tokenizer: Arc<Tokenizer>,
    /// Chat template, or the built-in Alpaca format.
    pub format: PromptFormat,
    /// Ids that end an answer.
    pub eos_ids: Vec<u32>,
    /// What its state snapshots are keyed by.
    pub identity: ModelIdentity,
    /// The generation thread.
    pub engine: Engine,
    /// The device it runs on.
    pub device: device::Resolved,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("key", &self.key)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The files of `variant` of `model`, without loading anything: `no_model` when a hub variant
/// is not (completely) in the cache or an imported folder is gone, `model_load` when its files
/// cannot be resolved.
pub fn variant_files(hub: &Hub, model: &ModelRef, variant: &str) -> CmdResult<VariantFiles> {
    match model {
        ModelRef::Hub(repo_id) => {
            let local = hub.local_variant(repo_id, variant).map_err(|e| {
                tracing::info!(repo_id, variant, error = %e, "variant not in the cache");
                CommandError::new(
                    ErrorKind::NoModel,
                    format!(
                        "Variant {variant} of {repo_id} is not downloaded (or was removed from the model cache). Download it in the model manager, or choose another model."
                    ),
                )
            })?;
            let repo = TpttRepo::open(&local.repo_snapshot)
                .map_err(|e| CommandError::model_load(&format!("{repo_id} [{variant}]"), e))?;
            repo.variant(Some(&local.variant), Some(&local.base_dir))
                .map_err(|e| CommandError::model_load(&format!("{repo_id} [{variant}]"), e))
        }
        ModelRef::Local(path) => {
            if !path.is_dir() {
                return Err(CommandError::new(
                    ErrorKind::NoModel,
                    format!("The imported model folder {} is gone. Import it again, or choose another model.", path.display()),
                ));
            }
            let repo = TpttRepo::open(path)
                .map_err(|e| CommandError::model_load(&path.display().to_string(), e))?;
            if !repo.variants.iter().any(|v| v == variant) {
                return Err(CommandError::new(
                    ErrorKind::NoModel,
                    format!(
                        "{} has no variant {variant} any more. Choose another one.",
                        path.display()
                    ),
                ));
            }
            repo.variant(Some(variant), None).map_err(|e| {
                CommandError::model_load(&format!("{} [{variant}]", path.display()), e)
            })
        }
    }
}

/// Load `files` for `key` onto the device it asks for and start its engine thread. Slow
/// (seconds to minutes): call it on a worker thread.
pub fn load(key: LoadKey, files: &VariantFiles) -> CmdResult<LoadedModel> {
    let what = format!("{} [{}]", key.model.id(), key.variant);
    let dev = device::resolve(key.device).map_err(|e| CommandError::model_load(&what, e))?;
    let started = std::time::Instant::now();
    let opts = LoadOptions {
        device: dev.device.clone(),
        // On the CPU, f16 / bf16 matrices stay as stored: half the memory of f32.
        half_weights: true,
        ..Default::default()
    };
    // The tokenizer first: a broken one fails before the long weight load, and the weights
    // reuse the memory its parse freed.
    let parts = ChatFiles::read(files).map_err(|e| CommandError::model_load(&what, e))?;
    let model = Model::load(files, &opts).map_err(|e| CommandError::model_load(&what, e))?;
    let ChatModel {
        model,
        tokenizer,
        format,
        eos_ids,
        identity,
    } = ChatModel::from_parts(model, parts, files, key.model.id())
        .map_err(|e| CommandError::model_load(&what, e))?;
    let engine = Engine::spawn(tokenizer.clone())
        .map_err(|e| CommandError::internal("Cannot start the generation thread", e))?;
    tracing::info!(model = %what, device = %dev.name, secs = started.elapsed().as_secs_f64(), "model loaded");
    Ok(LoadedModel {
        key,
        model,
        tokenizer,
        format,
        eos_ids,
        identity,
        engine,
        device: dev,
    })
}
