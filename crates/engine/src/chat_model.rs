//! [`ChatModel`]: a loaded TPTT model with everything chatting with it needs — its tokenizer,
//! prompt format, the ids that end an answer and the identity its snapshots are keyed by —,
//! assembled the same way for the CLI (`tptt generate`, `tptt chat`) and the desktop app; and
//! [`prepare_process`], the process-wide set-up both do first.

use std::path::Path;
use std::sync::Arc;

use tokenizers::Tokenizer;
use tptt::model::Model;
use tptt::repo::VariantFiles;

use crate::error::{Error, Result};
use crate::snapshot::ModelIdentity;
use crate::template::{GenerationConfig, PromptFormat, TokenizerConfig};

/// A model ready to chat with (module doc).
#[derive(Debug, Clone)]
pub struct ChatModel {
    /// The weights.
    pub model: Arc<Model>,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template, or the built-in Alpaca format.
    pub format: PromptFormat,
    /// Ids that end an answer: `generation_config.json`'s, the tokenizer's `eos_token`, then
    /// the base config's, without duplicates.
    pub eos_ids: Vec<u32>,
    /// What its state snapshots are keyed by.
    pub identity: ModelIdentity,
}

/// What a chat needs from a variant's files besides the weights: the tokenizer, its config and
/// the generation config. Read before the weights ([`ChatModel::from_parts`]): a broken
/// tokenizer fails in a second instead of after a long weight load, and the memory its parse
/// frees is reused by the weights instead of adding to the process's peak.
#[derive(Debug, Clone)]
pub struct ChatFiles {
    tokenizer: Tokenizer,
    tcfg: TokenizerConfig,
    gcfg: Option<GenerationConfig>,
}

impl ChatFiles {
    /// Read from `files`.
    pub fn read(files: &VariantFiles) -> Result<Self> {
        let tokenizer = load_tokenizer(files)?;
        let tcfg = match &files.tokenizer_config {
            Some(p) => TokenizerConfig::from_file(p)?,
            None => TokenizerConfig::default(),
        };
        let gcfg = files
            .generation_config
            .as_deref()
            .map(GenerationConfig::from_file)
            .transpose()?;
        // Parsing tokenizer.json goes through a JSON tree several times the tokenizer's size
        // (tens of MB for a 128k vocabulary), freed by now but kept by the heap tuned for
        // inference. Read before the weights, it would add to the load's peak: give it back.
        tptt::alloc::release_free_memory();
        Ok(Self {
            tokenizer,
            tcfg,
            gcfg,
        })
    }
}

impl ChatModel {
    /// `model`, loaded from `files`, with its tokenizer, format and EOS ids read from those
    /// files, under the name `model_id` (what identifies it in snapshots: a hub repository id,
    /// a folder).
    pub fn new(model: Model, files: &VariantFiles, model_id: impl Into<String>) -> Result<Self> {
        Self::from_parts(model, ChatFiles::read(files)?, files, model_id)
    }

    /// [`ChatModel::new`] with the chat files read before the model was loaded.
    pub fn from_parts(
        model: Model,
        parts: ChatFiles,
        files: &VariantFiles,
        model_id: impl Into<String>,
    ) -> Result<Self> {
        let identity = ModelIdentity::of(model_id, files, model.config())?;
        Self::assemble(
            model,
            parts.tokenizer,
            &parts.tcfg,
            parts.gcfg.as_ref(),
            identity,
        )
    }

    /// `model`, with its tokenizer, format and EOS ids read from one plain model folder `dir`
    /// (`tokenizer.json`, and `tokenizer_config.json` / `generation_config.json` when there):
    /// a base with TPTT injected at load, which has no variant files. Snapshots are keyed by
    /// `identity`.
    pub fn from_folder(model: Model, dir: &Path, identity: ModelIdentity) -> Result<Self> {
        let tokenizer = tokenizer_file(&dir.join("tokenizer.json"))?;
        let tcfg_path = dir.join("tokenizer_config.json");
        let tcfg = if tcfg_path.is_file() {
            TokenizerConfig::from_file(&tcfg_path)?
        } else {
            TokenizerConfig::default()
        };
        let gcfg_path = dir.join("generation_config.json");
        let gcfg = if gcfg_path.is_file() {
            Some(GenerationConfig::from_file(&gcfg_path)?)
        } else {
            None
        };
        Self::assemble(model, tokenizer, &tcfg, gcfg.as_ref(), identity)
    }

    /// The EOS ids (the tokenizer's and generation config's, then the base config's, without
    /// duplicates) and the prompt format, around the parts.
    fn assemble(
        model: Model,
        tokenizer: Tokenizer,
        tcfg: &TokenizerConfig,
        gcfg: Option<&GenerationConfig>,
        identity: ModelIdentity,
    ) -> Result<Self> {
        let mut eos_ids = tcfg.special.eos_token_ids(&tokenizer, gcfg);
        for id in &model.config().base.eos_token_ids {
            if !eos_ids.contains(id) {
                eos_ids.push(*id);
            }
        }
        let format = PromptFormat::from_tokenizer_config(tcfg)?;
        // Loading read files and converted tensors through buffers now free; with the heap
        // tuned for inference (a high trim threshold) they would stay resident for the process's
        // life. Give them back once, so that what a loaded model holds is what it uses.
        tptt::alloc::release_free_memory();
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            format,
            eos_ids,
            identity,
        })
    }
}

/// The variant's `tokenizer.json` (from the variant, the repository or the base).
pub fn load_tokenizer(files: &VariantFiles) -> Result<Tokenizer> {
    let path = files
        .tokenizer
        .as_deref()
        .ok_or_else(|| Error::InvalidConfig {
            file: files.dir.join("tokenizer.json").display().to_string(),
            reason: "no tokenizer.json in the variant, the repository or the base".into(),
        })?;
    tokenizer_file(path)
}

fn tokenizer_file(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::InvalidConfig {
        file: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// What a program that runs models does first, while it is still single-threaded (the
/// environment is only safe to change then): pins the thread count candle and rayon use
/// (`RAYON_NUM_THREADS`, to the CPUs available, unless set — unset, candle re-reads the CPU
/// count on every matmul, ~10% of decode time) and tunes the allocator for inference
/// ([`tptt::alloc::tune_for_inference`]).
pub fn prepare_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tptt::alloc::tune_for_inference();
}
