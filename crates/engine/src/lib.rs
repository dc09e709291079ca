//! `tptt-engine`: text generation around a TPTT model.
//!
//! This crate turns a conversation into a prompt, logits into tokens and tokens into streamed
//! text. The model-independent pieces, each usable and tested on its own:
//!
//! - [`template`]: [`Message`]s rendered by a [`PromptFormat`] — the model's Hugging Face Jinja
//!   chat template ([`ChatTemplate`], rendered as `transformers` does) or the built-in Alpaca
//!   format — plus the special tokens and EOS ids from `tokenizer_config.json` /
//!   `generation_config.json`.
//! - [`sampler`]: [`SamplingParams`] (validated once) and a seeded [`Sampler`]: repetition
//!   penalty, greedy, temperature, top-k, top-p, min-p.
//! - [`detok`]: [`IncrementalDecoder`], token ids to text pieces that are always whole UTF-8
//!   characters.
//! - [`stop`]: [`StopMatcher`], stop strings over streamed text, never emitting a stop string or
//!   a possible start of one.
//! - [`error`]: the crate's [`Error`] and [`Result`].
//!
//! A generation step chains them: `model → logits → Sampler::sample → id →
//! IncrementalDecoder::push → text → StopMatcher::push → UI`, ending on an EOS id, a stop
//! string, `max_new_tokens` or cancellation. The model-driving parts build on these modules:
//!
//! - [`session`]: a [`Session`] (one conversation: the model [`tptt::model::State`], the tokens
//!   read, the last logits) and the generation loop; its module doc states the memory semantics
//!   and where they differ from the reference.
//! - [`chat`]: [`ChatTranscript`], chat turns that feed only what they add to the state.
//! - [`chat_model`]: [`ChatModel`], a loaded model with its tokenizer, format, EOS ids and
//!   identity (the CLI and the app load it alike), and [`prepare_process`].
//! - [`snapshot`]: sessions saved to / restored from versioned safetensors files, refused on
//!   another model, variant, config or weights ([`identity`]: [`ModelIdentity`]).
//! - [`worker`]: the [`Engine`] that runs jobs on its own OS thread.
//! - [`health`]: [`Surprise`], the model's surprise on what a conversation read, and the
//!   verdict on whether its memory still helps ([`Health`]).
//! - [`eval`]: long-context evaluation — perplexity by position bucket over a long text, and
//!   recall probes at a distance (`tptt eval`, the bench).

pub mod chat;
pub mod chat_model;
pub mod detok;
mod digest;
pub mod error;
pub mod eval;
pub mod health;
pub mod identity;
pub mod sampler;
pub mod session;
pub mod snapshot;
pub mod stop;
pub mod template;
pub mod worker;

pub use chat::{ChatTranscript, ChatTurn, ReadMark};
pub use chat_model::{prepare_process, ChatFiles, ChatModel};
pub use detok::IncrementalDecoder;
pub use error::{Error, Result};
pub use health::{Health, Surprise};
pub use sampler::{Sampler, SamplingParams};
pub use session::{
    CancelToken, Event, FinishReason, GenerateOptions, GenerationStats, Outcome, Session,
    SessionOptions,
};
pub use snapshot::ModelIdentity;
pub use stop::{StopMatcher, StopResult};
pub use template::{
    ChatTemplate, GenerationConfig, Message, PromptFormat, Role, SpecialTokens, TokenizerConfig,
};
pub use tptt::state::KvFormat;
pub use worker::{Engine, Job, JobResult};
