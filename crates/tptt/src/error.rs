//! The engine's error type: one enum, a doc on every variant, no panics on bad input.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a TPTT model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read (missing, permissions, ...).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file could not be written (disk full, permissions, ...); nothing half-written is left
    /// in its place.
    #[error("cannot write {path}: {message}")]
    Write {
        /// The file that failed.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A JSON file (config, index) is not valid JSON or not of the expected form.
    #[error("invalid JSON in {path}: {message}")]
    Json {
        /// The file that failed to parse.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A configuration value is missing, out of range or inconsistent.
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The config file, when the value came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// `operator_mode` names no mode the reference knows.
    #[error("unknown operator_mode {0:?}; known modes: delta_rule, delta_rule_gelu, delta_product, delta_product_r, delta_product_c, gated_delta_rule, gated_delta_product, delta_rule_v, delta_rule_kv")]
    UnknownOperatorMode(String),
    /// The base model's architecture is not one this engine implements.
    #[error("unsupported base architecture {0:?} (supported: llama, mistral, qwen2, gemma3_text, olmo, olmoe)")]
    UnsupportedArchitecture(String),
    /// A weight file is corrupt, truncated or not a safetensors file.
    #[error("invalid weight file {path}: {message}")]
    Weights {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is not in the weight files.
    #[error("missing tensor {name:?} in {location}")]
    MissingTensor {
        /// The checkpoint name of the tensor.
        name: String,
        /// Where it was looked for.
        location: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint name of the tensor.
        name: String,
        /// The shape found in the file.
        got: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// An adapter tensor does not fit the base weight it adapts (a LoRA factor whose shape
    /// disagrees with the base projection or with `lora_config.r`, or a full replacement weight
    /// of another shape than the base's).
    #[error("adapter {path}: tensor {key:?} has shape {got:?}, expected {expected:?} ({detail})")]
    AdapterShapeMismatch {
        /// The adapter file.
        path: PathBuf,
        /// The adapter key.
        key: String,
        /// The shape found in the adapter.
        got: Box<[usize]>,
        /// The shape the base weight (and `lora_config.r`) imply.
        expected: Box<[usize]>,
        /// Which base weight and rank the expectation comes from.
        detail: String,
    },
    /// The adapter file holds a key that matches nothing in the model.
    #[error("adapter {path}: key {key:?} does not match any weight of the base model")]
    UnexpectedAdapterKey {
        /// The adapter file.
        path: PathBuf,
        /// The unmatched key.
        key: String,
    },
    /// A repository or variant could not be found on disk.
    #[error("{0}")]
    NotFound(String),
    /// A token id is outside the vocabulary, or the input is empty.
    #[error("invalid input: {0}")]
    Input(String),
    /// A snapshot/state does not match the model it is used with.
    #[error("state mismatch: {0}")]
    State(String),
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            path: None,
            message: message.into(),
        }
    }
}
