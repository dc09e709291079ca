//! The engine's error type.
//!
//! One [`Error`] enum for the whole crate, in the `thiserror` style: every variant says what went
//! wrong in words a log reader understands, and keeps the underlying error as its `source` where
//! there is one (a `minijinja::Error` carries the template line, an I/O error the OS reason).
//! Values are validated where they enter (sampling parameters, templates, configs), so the hot
//! generation loop only ever sees the [`Error::InvalidLogits`] kind of failure.

use std::path::PathBuf;

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the model-independent parts of generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A sampling parameter is outside its valid range (for example a negative temperature or a
    /// `top_p` above 1). Raised by `SamplingParams::validate` and `Sampler::new`.
    #[error("invalid sampling parameter `{name}` = {value}: {expected}")]
    InvalidSamplingParam {
        /// The field name, as spelled in `SamplingParams`.
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// What the value must be.
        expected: &'static str,
    },

    /// The logits handed to the sampler cannot be sampled from: empty, NaN, `+inf`, or every
    /// entry `-inf`. Usually a sign of a numerical problem in the model.
    #[error("cannot sample from these logits: {0}")]
    InvalidLogits(String),

    /// A chat template does not compile (a Jinja syntax error).
    #[error("the chat template does not parse: {message}")]
    TemplateSyntax {
        /// Short description, with the template line where minijinja knows it.
        message: String,
        /// The minijinja error, with its debug info.
        #[source]
        source: minijinja::Error,
    },

    /// The chat template called `raise_exception(message)` — the template's own way of saying the
    /// conversation is not one it supports (for example roles that do not alternate).
    #[error("the chat template rejected the conversation: {0}")]
    TemplateException(String),

    /// Rendering a chat template failed for another reason (an unknown filter, a type error...).
    #[error("the chat template failed to render: {message}")]
    TemplateRender {
        /// Short description, with the template line where minijinja knows it.
        message: String,
        /// The minijinja error, with its debug info.
        #[source]
        source: minijinja::Error,
    },

    /// The conversation cannot be rendered by the built-in format (for example it is empty).
    #[error("invalid conversation: {0}")]
    InvalidConversation(String),

    /// A configuration file (`tokenizer_config.json`, `generation_config.json`) has a field of
    /// the wrong shape or an unusable value.
    #[error("invalid {file}: {reason}")]
    InvalidConfig {
        /// Which file (or JSON document) was being read.
        file: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A configuration file is not valid JSON.
    #[error("cannot parse {file} as JSON: {source}")]
    Json {
        /// Which file (or JSON document) was being read.
        file: String,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The tokenizer failed (decoding ids it does not know, for example).
    #[error("tokenizer error: {0}")]
    Tokenizer(#[source] tokenizers::Error),
    /// The model failed (load, forward, bad token id, state mismatch).
    #[error(transparent)]
    Model(Box<tptt::Error>),
    /// A state snapshot is corrupt, truncated, foreign, or belongs to another model/variant/config.
    #[error("state snapshot {path}: {reason}")]
    Snapshot {
        /// The snapshot file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Generation cannot start (e.g. an empty prompt with nothing to continue from).
    #[error("cannot generate: {0}")]
    Generate(String),
    /// A panic was caught: in a job on the engine thread (a bug in a kernel, in the sampler, in
    /// the caller's sink...), which keeps serving later jobs while the job's possibly
    /// half-updated session is dropped ([`crate::JobResult::session`] is `None`); or on the
    /// thread rendering a chat template.
    #[error("a panic was caught ({message}); this is a bug, please report it")]
    Panicked {
        /// The panic's message (its `&str`/`String` payload), or a placeholder for another
        /// payload type.
        message: String,
    },
    /// A chat template used up a render limit: the template is hostile or broken, not the
    /// conversation (the limits scale with the conversation's size, see
    /// [`crate::template::RenderLimits`]).
    #[error("the chat template ({template}) exceeded its {limit} while rendering {messages} messages; the template is broken or hostile: fix it or use another model")]
    TemplateLimit {
        /// Where the template came from (`tokenizer_config.json of <model>`, `chat_template.jinja`...).
        template: String,
        /// Which limit, in words (the fuel budget with its value, the output size cap...).
        limit: String,
        /// How many messages were being rendered.
        messages: usize,
    },
}

impl From<tptt::Error> for Error {
    /// Boxed: a model error is large (it carries candle's), and every `Result` of the engine
    /// would carry its size.
    fn from(e: tptt::Error) -> Self {
        Error::Model(Box::new(e))
    }
}

/// The message of a caught panic: its `&str` or `String` payload (what `panic!` formats), else
/// a placeholder. For [`Error::Panicked`] and the callers that catch panics themselves.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
