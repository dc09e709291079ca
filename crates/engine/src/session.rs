//! A [`Session`]: one conversation on a model — its [`State`], the tokens it has read, and the
//! logits after the last one — plus the generation loop.
//!
//! Semantics (where we differ from tptt 0.12.1 on purpose, SPEC §5/§7):
//! * The linear branch's recurrent state, its gate-pooling history and the order-2 buffer are
//!   carried from call to call ([`CarryMode::Continue`]); the reference restarts them every call.
//! * The softmax branch keeps a sliding KV window of `W` positions (`max_self_attn_length`, else
//!   [`DEFAULT_WINDOW`]; a setting may lower it); RoPE positions keep growing and stay exact.
//!   Memory is therefore constant once the window is full, however long the chat.
//! * Prompts are fed in blocks of [`PREFILL_BLOCK`] tokens (bounded memory, cancellable between
//!   blocks; [`Event::Prefill`] after each block but the last tells how far a long prompt is
//!   read); each block's linear chunk size follows the reference rule for that block's length.
//!   Decoding feeds one token per call (chunk 1, the recurrent form).
//! * After generating, the last token is fed too, so the session always holds the logits for the
//!   next token: continuing later (or after a snapshot round trip) is exactly continuing now.
//!
//! [`CarryMode::Reference`] reproduces the reference's cached generation instead (tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tptt::linear::CarryMode;
use tptt::model::{Logits, Model, State};
use tptt::state::KvFormat;

use crate::detok::IncrementalDecoder;
use crate::error::{Error, Result};
use crate::eval::nll;
use crate::health::{Surprise, SURPRISE_STRIDE};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;

/// Softmax window when the config sets none.
pub const DEFAULT_WINDOW: usize = 8192;
/// Prompt tokens per forward call.
pub const PREFILL_BLOCK: usize = 512;

/// A shared flag that stops a generation at the next token (or prefill block).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, unset token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the generation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Has [`CancelToken::cancel`] been called?
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How a session is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Carry semantics.
    pub mode: CarryMode,
    /// Softmax window; `None` uses the config's, else [`DEFAULT_WINDOW`].
    pub window: Option<usize>,
    /// How the softmax KV cache is stored. A compact format needs `CarryMode::Continue`: in the
    /// reference mode the cache stays f32 whatever this says.
    pub kv_format: KvFormat,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            mode: CarryMode::Continue,
            window: None,
            kv_format: KvFormat::F32,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was sampled.
    Eos,
    /// A stop string appeared (not included in the text).
    Stop(String),
    /// `max_new_tokens` reached.
    MaxTokens,
    /// The cancel token was set.
    Cancelled,
}

/// Timing and counts of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens read before generating: the whole prompt, or, when stopped while it was
    /// read, the blocks read until then.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// From the start of the call (the prompt's reading begins) to the first sampled token:
    /// the prompt's reading and the first sampling step, nothing before the call (a caller's
    /// model load or tokenizing is its own to report).
    pub time_to_first_token: Duration,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second (after the first).
    pub decode_tokens_per_s: f64,
}

/// The result of [`Session::generate`]: complete even when stopped early.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Text shown to the user (stop strings removed).
    pub text: String,
    /// Generated token ids (including a final EOS, if any).
    pub ids: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Timing.
    pub stats: GenerationStats,
}

/// Streamed to the caller while generating.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Part of a long prompt has been read: sent after each [`PREFILL_BLOCK`] of the prompt but
    /// the last (the last is announced by [`Event::PromptRead`]), so a prompt of one block sends
    /// none. What lets a caller show how far a long prompt is read, and how fast.
    Prefill {
        /// Prompt tokens read so far (the session has read them: they stay read if stopped).
        read: usize,
        /// Prompt tokens in all.
        total: usize,
        /// Since the prompt began to be read.
        elapsed: Duration,
    },
    /// The prompt has been read (sent once, before the first token, when the prompt is not
    /// empty), with the session's surprise record after it: the moment to tell the user the
    /// memory's health, before any of the answer streams.
    PromptRead {
        /// [`Session::surprise`] after the prompt.
        surprise: Surprise,
    },
    /// New visible text and the id that completed it.
    Token {
        /// The text piece.
        text: String,
        /// The token id.
        id: u32,
        /// Tokens generated so far, this one included (each is fed to the session: its memory
        /// holds the prompt plus these). Can run ahead of the pieces sent, since a token may
        /// complete no visible text.
        generated: usize,
    },
}

/// Generation settings beyond sampling.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Sampling parameters (validated on use).
    pub params: SamplingParams,
    /// Stop on these ids unless `ignore_eos`.
    pub eos_ids: Vec<u32>,
    /// Generate through EOS.
    pub ignore_eos: bool,
    /// Stop strings.
    pub stop_strings: Vec<String>,
    /// Decode special tokens to nothing in the streamed text.
    pub skip_special_tokens: bool,
}

/// One conversation on a model.
#[derive(Debug)]
pub struct Session {
    model: Arc<Model>,
    /// The model state after [`Session::tokens`].
    pub state: State,
    /// Every token read so far.
    pub tokens: Vec<u32>,
    /// Logits after the last token (`None` before the first).
    pub last_logits: Option<Vec<f32>>,
    /// The model's surprise on the prompts it read (a sample; see [`crate::health`]).
    pub surprise: Surprise,
}

impl Session {
    /// A copy that shares nothing with this session (a fork of the conversation): an error
    /// where its KV cache cannot be copied ([`State::try_clone`]).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            model: Arc::clone(&self.model),
            state: self.state.try_clone()?,
            tokens: self.tokens.clone(),
            last_logits: self.last_logits.clone(),
            surprise: self.surprise.clone(),
        })
    }

    /// A fresh session.
    pub fn new(model: Arc<Model>, opts: SessionOptions) -> Self {
        let window = opts
            .window
            .or_else(|| model.config_window())
            .or(Some(DEFAULT_WINDOW));
        let mut state = model.new_state(opts.mode, window);
        if opts.mode == CarryMode::Continue {
            state.kv_format = opts.kv_format;
        }
        Self {
            model,
            state,
            tokens: Vec::new(),
            last_logits: None,
            surprise: Surprise::default(),
        }
    }

    /// Rebuild a session from its parts (snapshot restore).
    pub fn from_parts(
        model: Arc<Model>,
        state: State,
        tokens: Vec<u32>,
        last_logits: Option<Vec<f32>>,
    ) -> Self {
        Self {
            model,
            state,
            tokens,
            last_logits,
            surprise: Surprise::default(),
        }
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Feed tokens (in blocks of [`PREFILL_BLOCK`]), keeping the last logits. Returns `false`
    /// when cancelled between blocks (what was fed stays fed). A block of more than one token
    /// also keeps every [`SURPRISE_STRIDE`]-th position's logits and records how surprising the
    /// next token was ([`Session::surprise`]); single tokens (the model's own samples) are not
    /// scored.
    pub fn feed(&mut self, ids: &[u32], cancel: Option<&CancelToken>) -> Result<bool> {
        self.feed_reporting(ids, cancel, &mut |_| {})
    }

    /// [`Session::feed`], calling `read` with the number of `ids` read after each block.
    pub fn feed_reporting(
        &mut self,
        ids: &[u32],
        cancel: Option<&CancelToken>,
        read: &mut dyn FnMut(usize),
    ) -> Result<bool> {
        let mut done = 0;
        for block in ids.chunks(PREFILL_BLOCK) {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Ok(false);
            }
            let which = if block.len() > 1 {
                Logits::Every(SURPRISE_STRIDE)
            } else {
                Logits::Last
            };
            let mut rows = self
                .model
                .forward(block, &mut self.state, which)?
                .to_vec2::<f32>()
                .map_err(tptt::Error::from)?;
            let start = self.tokens.len();
            for (r, row) in which.rows(block.len()).into_iter().zip(&rows) {
                if let Some(&next) = block.get(r + 1) {
                    self.surprise.record(start + r + 1, nll(row, next)?);
                }
            }
            self.last_logits = rows.pop();
            self.tokens.extend_from_slice(block);
            done += block.len();
            read(done);
        }
        Ok(true)
    }

    /// Feed `prompt`, then generate. `sink` receives text as it completes. Stopped, cancelled
    /// or failed-midway generations still return what they produced (a failure after the first
    /// token is reported as the error, with the partial outcome inside the session's tokens).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        tokenizer: &Tokenizer,
        cancel: &CancelToken,
        sink: &mut dyn FnMut(Event),
    ) -> Result<Outcome> {
        opts.params.validate()?;
        let mut sampler = Sampler::new(opts.params.clone())?;
        let start = Instant::now();
        let context_start = self.tokens.len().saturating_sub(4);
        let context: Vec<u32> = self.tokens[context_start..]
            .iter()
            .chain(prompt)
            .copied()
            .collect();
        let context = &context[context.len().saturating_sub(4)..];
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let outcome =
            |text: String, ids: Vec<u32>, finish: FinishReason, stats: GenerationStats| Outcome {
                text,
                ids,
                finish,
                stats,
            };
        let total = prompt.len();
        let mut read_so_far = 0;
        let fed_all = self.feed_reporting(prompt, Some(cancel), &mut |read| {
            read_so_far = read;
            if read < total {
                sink(Event::Prefill {
                    read,
                    total,
                    elapsed: start.elapsed(),
                });
            }
        })?;
        if !fed_all {
            // Stopped while reading: the stats count what was read.
            stats.prompt_tokens = read_so_far;
            stats.prefill_tokens_per_s =
                read_so_far as f64 / start.elapsed().as_secs_f64().max(1e-9);
            return Ok(outcome(
                String::new(),
                Vec::new(),
                FinishReason::Cancelled,
                stats,
            ));
        }
        let prefill_time = start.elapsed();
        if !prompt.is_empty() {
            sink(Event::PromptRead {
                surprise: self.surprise.clone(),
            });
            stats.prefill_tokens_per_s = prompt.len() as f64 / prefill_time.as_secs_f64().max(1e-9);
        }
        if self.last_logits.is_none() {
            return Err(Error::Generate(
                "empty prompt and nothing to continue from".into(),
            ));
        }
        let mut detok =
            IncrementalDecoder::with_context(tokenizer, opts.skip_special_tokens, context);
        let mut stop = StopMatcher::new(opts.stop_strings.iter());
        let mut text = String::new();
        let mut ids = Vec::new();
        let mut finish = FinishReason::MaxTokens;
        let mut first_token_at = None;
        let repeat_n = opts.params.repeat_last_n;
        while ids.len() < opts.params.max_new_tokens {
            if cancel.is_cancelled() {
                finish = FinishReason::Cancelled;
                break;
            }
            let mut logits = self.last_logits.clone().unwrap_or_default();
            let history = &self.tokens[self.tokens.len().saturating_sub(repeat_n)..];
            let id = sampler.sample(&mut logits, history)?;
            if first_token_at.is_none() {
                first_token_at = Some(start.elapsed());
            }
            ids.push(id);
            // Feed every sampled token, EOS included: the state then holds the whole turn.
            self.feed(&[id], None)?;
            if !opts.ignore_eos && opts.eos_ids.contains(&id) {
                finish = FinishReason::Eos;
                break;
            }
            if let Some(piece) = detok.push(id)? {
                let r = stop.push(&piece);
                if !r.emit.is_empty() {
                    text.push_str(&r.emit);
                    sink(Event::Token {
                        text: r.emit,
                        id,
                        generated: ids.len(),
                    });
                }
                if r.stopped {
                    finish = FinishReason::Stop(stop.matched().unwrap_or_default().to_string());
                    break;
                }
            }
        }
        if !matches!(finish, FinishReason::Stop(_)) {
            let mut rest = detok
                .flush()?
                .map(|p| stop.push(&p).emit)
                .unwrap_or_default();
            rest.push_str(&stop.finish());
            if !rest.is_empty() {
                text.push_str(&rest);
                sink(Event::Token {
                    text: rest,
                    id: ids.last().copied().unwrap_or_default(),
                    generated: ids.len(),
                });
            }
        }
        stats.generated_tokens = ids.len();
        stats.time_to_first_token = first_token_at.unwrap_or_default();
        let decode_time = start.elapsed().saturating_sub(stats.time_to_first_token);
        if ids.len() > 1 {
            stats.decode_tokens_per_s =
                (ids.len() - 1) as f64 / decode_time.as_secs_f64().max(1e-9);
        }
        Ok(outcome(text, ids, finish, stats))
    }
}
