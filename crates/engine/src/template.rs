//! Chat prompts: turning a conversation into the text a model was trained on.
//!
//! A conversation is a slice of [`Message`]s. A [`PromptFormat`] renders it:
//!
//! - [`PromptFormat::Jinja`] holds a [`ChatTemplate`], the Hugging Face `chat_template` of the
//!   model (from `tokenizer_config.json`, a `chat_template.jinja` file, or the list-of-named-
//!   templates form, where `"default"` is taken). It is compiled once with minijinja configured
//!   the way `transformers` configures Jinja2 (`apply_chat_template`): `trim_blocks` and
//!   `lstrip_blocks` on, loop controls (`break`/`continue`), Python string/dict methods
//!   (`.strip()`, `.startswith()`, `.items()`… via `minijinja-contrib`'s pycompat), and the same
//!   extras: `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that writes
//!   Python's `json.dumps` (`", "`/`": "` separators, no HTML escaping, `ensure_ascii=False`,
//!   `indent`, `separators`, `sort_keys`); `{% generation %}` blocks (transformers'
//!   assistant-mask extension) render their body unchanged. The context holds `messages` (a
//!   list of `{"role", "content"}` maps), `add_generation_prompt`, `tools` and `documents`
//!   (both `none`), and each special token that is set: `bos_token`, `eos_token`, `unk_token`,
//!   `pad_token`. Differences from Python Jinja2 that remain: `strftime_now` formats UTC (there
//!   is no time-zone database here), and a Python `None` prints as `none`.
//! - [`PromptFormat::Alpaca`] is the built-in plain-text instruction format, for models without
//!   a chat template (TPTT fine-tunes of base models).
//!
//! [`PromptFormat::from_tokenizer_config`] picks Jinja when the model ships a chat template,
//! else Alpaca. Errors never panic: a template that does not parse is
//! [`Error::TemplateSyntax`] when it is loaded, one that fails while rendering is
//! [`Error::TemplateRender`], and a `raise_exception` call is [`Error::TemplateException`]
//! carrying the template's message.
//!
//! # Bounded rendering
//! A chat template is code from a stranger's repository, run on every turn. Each render is
//! bounded ([`RenderLimits::for_messages`]), so a hostile or broken template (nested
//! `range()` loops, a recursive macro, `'x' * 10**10`, a huge `tojson(indent=…)`) ends with
//! [`Error::TemplateLimit`] naming the template's origin (the `tokenizer_config.json` or
//! `chat_template.jinja` path, [`ChatTemplate::origin`]) and the limit, instead of hanging or
//! exhausting memory:
//! - fuel (minijinja's budget: one per instruction, one per 64 bytes of data created, checked
//!   before large values are made): [`FUEL_BASE`] + [`FUEL_PER_MESSAGE`] per message + one per
//!   [`CONTENT_BYTES_PER_FUEL`] bytes of content, at most [`MAX_FUEL`]; real templates use
//!   hundreds of times less on short conversations and 4-5 times less on huge pastes
//!   (measured). A hostile template on a short conversation stops in about 0.1 s, on the
//!   largest budget in about 4 s;
//! - output: [`OUTPUT_BASE_BYTES`] + [`OUTPUT_PER_CONTENT_BYTE`] per content byte +
//!   [`OUTPUT_PER_MESSAGE`] per message;
//! - nesting of calls: [`RECURSION_LIMIT`];
//! - the stack: a render runs on a thread of its own whose stack is sized to its fuel
//!   ([`render_stack_bytes`]), so values nested as deep as the fuel allows are dropped and
//!   printed without overflowing it.
//!
//! Not covered: minijinja 3.1 lets a template put a namespace inside itself
//! (`{% set ns.me = ns %}`), and printing or comparing such a cyclic value recurses without end
//! (a stack overflow aborts the process). Templates cannot be checked for this without
//! minijinja's parser internals; no real template does it.
//!
//! # The Alpaca format
//!
//! The prompt is a list of blocks joined by one blank line (`"\n\n"`):
//!
//! 1. The preamble: [`ALPACA_PREAMBLE`],
//!    `Below is an instruction that describes a task. Write a response that appropriately
//!    completes the request.` When the conversation has system messages, their contents
//!    (joined by `"\n\n"`) replace it; a system message with empty content removes it.
//! 2. One block per user or assistant message, in order:
//!    `### Instruction:\n{user content}` and `### Response:\n{assistant content}`. Earlier turns
//!    of a multi-turn conversation are thus previous instruction/response pairs.
//! 3. With `add_generation_prompt`, a final `### Response:\n` block (ending in that newline:
//!    the model writes the answer right after it).
//!
//! Single turn, `add_generation_prompt = true` (the classic Alpaca prompt without input):
//!
//! ```text
//! Below is an instruction that describes a task. Write a response that appropriately completes the request.
//!
//! ### Instruction:
//! What is the capital of France?
//!
//! ### Response:
//!
//! ```
//!
//! i.e. `"{preamble}\n\n### Instruction:\n{u1}\n\n### Response:\n"`; two turns give
//! `"{preamble}\n\n### Instruction:\n{u1}\n\n### Response:\n{a1}\n\n### Instruction:\n{u2}\n\n### Response:\n"`.
//! Without `add_generation_prompt` a conversation ending in an assistant message ends with that
//! message's text (no trailing newline), so a partial answer can be continued.
//! [`alpaca_with_input`] renders the classic instruction + input prompt
//! ([`ALPACA_PREAMBLE_WITH_INPUT`], `### Input:`). Alpaca prompts are encoded with the
//! tokenizer's special tokens (BOS) added, see [`PromptFormat::add_special_tokens`], and
//! [`ALPACA_STOP_STRINGS`] end a reply that starts a new section.
//!
//! Provenance: this is the Stanford Alpaca / alpaca-lora prompt. The upstream TPTT repository
//! (fabienfrfr/tptt) has fine-tuned on alpaca-cleaned with other layouts over time: an early
//! README used `### Instruction:\n…\n\n### Input:\n…\n\n### Response:\n…` with no preamble
//! (an empty system message gives that, minus the `### Input:` block), its current
//! `scripts/train.py` a bare `{instruction}\n{input}\n{output}`. A checkpoint's own model card
//! decides which prompt suits it best.
//!
//! Special tokens: [`TokenizerConfig`] reads `bos_token`/`eos_token`/`unk_token`/`pad_token`
//! (plain strings or `AddedToken` objects) into [`SpecialTokens`], and
//! [`SpecialTokens::eos_token_ids`] resolves the ids that end generation from
//! `generation_config.json` ([`GenerationConfig`]) and the tokenizer's vocabulary.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{panic_message, Error, Result};

/// The default Alpaca preamble (the original Stanford Alpaca "no input" prompt).
pub const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. \
Write a response that appropriately completes the request.";

/// The Alpaca preamble used when an input accompanies the instruction.
pub const ALPACA_PREAMBLE_WITH_INPUT: &str = "Below is an instruction that describes a task, \
paired with an input that provides further context. \
Write a response that appropriately completes the request.";

/// Section headers that end an Alpaca reply: a model that starts a new section has finished.
pub const ALPACA_STOP_STRINGS: &[&str] = &["### Instruction:", "### Input:", "### Response:"];

/// Name of the compiled template inside its minijinja environment (shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant (the system prompt).
    System,
    /// The person chatting.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role as chat templates spell it: `"system"`, `"user"`, `"assistant"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// The special tokens a tokenizer config names, as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token (`bos_token`).
    pub bos: Option<String>,
    /// End-of-sequence token (`eos_token`).
    pub eos: Option<String>,
    /// Unknown token (`unk_token`).
    pub unk: Option<String>,
    /// Padding token (`pad_token`).
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// The token ids that end generation, in order and without duplicates:
    /// `generation_config.json`'s `eos_token_id` (one id or a list) first, then the id of the
    /// `eos_token` string in `tokenizer`'s vocabulary. May be empty; a named EOS token missing
    /// from the vocabulary is logged and skipped.
    pub fn eos_token_ids(
        &self,
        tokenizer: &Tokenizer,
        generation: Option<&GenerationConfig>,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        if let Some(generation) = generation {
            ids.extend_from_slice(&generation.eos_token_ids);
        }
        if let Some(eos) = &self.eos {
            match tokenizer.token_to_id(eos) {
                Some(id) => ids.push(id),
                None => tracing::warn!(eos, "the eos_token is not in the tokenizer's vocabulary"),
            }
        }
        let mut seen = Vec::with_capacity(ids.len());
        ids.retain(|id| {
            let new = !seen.contains(id);
            seen.push(*id);
            new
        });
        ids
    }

    /// The beginning-of-sequence id: `generation_config.json`'s `bos_token_id`, else the id of
    /// the `bos_token` string.
    pub fn bos_token_id(
        &self,
        tokenizer: &Tokenizer,
        generation: Option<&GenerationConfig>,
    ) -> Option<u32> {
        generation
            .and_then(|g| g.bos_token_id)
            .or_else(|| self.bos.as_deref().and_then(|b| tokenizer.token_to_id(b)))
    }
}

/// What the engine needs from `tokenizer_config.json`: the chat template and special tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Where [`TokenizerConfig::chat_template`] was read from (the file's path, or
    /// `tokenizer_config.json` for JSON text): named by errors about the template.
    pub template_origin: Option<String>,
    /// The special tokens it names.
    pub special: SpecialTokens,
}

/// `tokenizer_config.json` as written by `transformers` (only the fields used here).
#[derive(Debug, Deserialize)]
struct RawTokenizerConfig {
    #[serde(default)]
    chat_template: Option<RawChatTemplate>,
    #[serde(default)]
    bos_token: Option<RawToken>,
    #[serde(default)]
    eos_token: Option<RawToken>,
    #[serde(default)]
    unk_token: Option<RawToken>,
    #[serde(default)]
    pad_token: Option<RawToken>,
}

/// `chat_template`: one template, or a list of named ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawChatTemplate {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token: a plain string or an `AddedToken` object with `content`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawToken {
    Plain(String),
    Added { content: String },
}

impl RawToken {
    fn into_string(self) -> String {
        match self {
            RawToken::Plain(s) | RawToken::Added { content: s } => s,
        }
    }
}

impl TokenizerConfig {
    /// Parses the text of a `tokenizer_config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::parse(json, "tokenizer_config.json")
    }

    /// Reads a `tokenizer_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Reads a model directory the way `transformers` does: `tokenizer_config.json` (optional),
    /// whose template is overridden by `chat_template.jinja` or, failing that, by the
    /// `chat_template` of `chat_template.json` when those files exist.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() {
            Self::from_file(&config_path)?
        } else {
            Self::default()
        };
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        if jinja.is_file() {
            config.chat_template = Some(read(&jinja)?);
            config.template_origin = Some(jinja.display().to_string());
        } else if json.is_file() {
            let file = json.display().to_string();
            let raw: RawTokenizerConfig = parse_json(&read(&json)?, &file)?;
            if let Some(template) = raw.chat_template {
                config.chat_template = Some(pick_template(template, &file)?);
                config.template_origin = Some(file);
            }
        }
        Ok(config)
    }

    fn parse(json: &str, file: &str) -> Result<Self> {
        let raw: RawTokenizerConfig = parse_json(json, file)?;
        let chat_template = raw
            .chat_template
            .map(|t| pick_template(t, file))
            .transpose()?;
        Ok(Self {
            template_origin: chat_template.as_ref().map(|_| file.to_string()),
            chat_template,
            special: SpecialTokens {
                bos: raw.bos_token.map(RawToken::into_string),
                eos: raw.eos_token.map(RawToken::into_string),
                unk: raw.unk_token.map(RawToken::into_string),
                pad: raw.pad_token.map(RawToken::into_string),
            },
        })
    }
}

/// The `"default"` template of the named-templates form (the first one, with a warning, when
/// none is called that).
fn pick_template(raw: RawChatTemplate, file: &str) -> Result<String> {
    match raw {
        RawChatTemplate::Single(t) => Ok(t),
        RawChatTemplate::Named(mut list) => {
            if let Some(i) = list.iter().position(|t| t.name == "default") {
                return Ok(list.swap_remove(i).template);
            }
            if list.is_empty() {
                return Err(Error::InvalidConfig {
                    file: file.to_string(),
                    reason: "`chat_template` is an empty list".into(),
                });
            }
            let first = list.swap_remove(0);
            tracing::warn!(
                name = first.name,
                "no chat template is named \"default\"; using the first one"
            );
            Ok(first.template)
        }
    }
}

/// What the engine needs from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerationConfig {
    /// `bos_token_id`, if set.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id, a list, or none.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl GenerationConfig {
    /// Parses the text of a `generation_config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::parse(json, "generation_config.json")
    }

    /// Reads a `generation_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    fn parse(json: &str, file: &str) -> Result<Self> {
        let raw: RawGenerationConfig = parse_json(json, file)?;
        Ok(Self {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
        })
    }
}

/// The largest `tokenizer_config.json`, `generation_config.json` or chat template read. Real
/// ones are kilobytes to a few megabytes (a config listing thousands of added tokens); a file
/// past this is refused before it is read, not loaded whole into memory.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

fn read(path: &Path) -> Result<String> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_big = || Error::InvalidConfig {
        file: path.display().to_string(),
        reason: format!("the file is larger than {} MiB", MAX_CONFIG_BYTES >> 20),
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut text = String::new();
    // One byte past the cap tells a file at the cap from a longer one (one that grew since).
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    Ok(text)
}

fn parse_json<T: serde::de::DeserializeOwned>(json: &str, file: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|source| Error::Json {
        file: file.to_string(),
        source,
    })
}

/// The bounds of one render of a chat template (module doc, "Bounded rendering"): a fuel
/// budget (minijinja's count of instructions executed and data created, one fuel per
/// instruction and per 64 bytes), the most bytes the template may write, and the nesting depth
/// of calls. [`RenderLimits::for_messages`] scales the first two with the conversation, so a
/// real template renders any conversation the app accepts while a hostile one (nested
/// `range()` loops, a recursive macro, a string multiplied a billion times) ends with
/// [`Error::TemplateLimit`] in well under a second on a short conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    /// Fuel for the whole render.
    pub fuel: u64,
    /// Most bytes of output.
    pub max_output_bytes: usize,
}

/// Fuel every render gets, whatever the conversation: the fixed part of a real template (a
/// long default system prompt, a date, tool-handling branches) costs hundreds of fuel; 2 M is
/// thousands of times that, and under 0.1 s of rendering here for a hostile template.
pub const FUEL_BASE: u64 = 2_000_000;
/// Fuel per message. Measured: SmolLM2's template spends 26 fuel on a short message, a
/// DeepSeek-R1 one 57, a Mistral-Small-3.1 one (alternation checks, a filtered copy of the
/// list) 59; this leaves a margin of 300, which also pays for templates that rebuild a list of
/// the messages in a loop (quadratic: they run out only past ~50 000 messages).
pub const FUEL_PER_MESSAGE: u64 = 20_000;
/// Bytes of message content one fuel pays for. Measured: the same templates spend 1/16 to 1/21
/// fuel per byte (each copy of a byte costs 1/64: concatenations, `split('</think>')`); one fuel
/// per 4 bytes leaves a margin of 4 to 5.
pub const CONTENT_BYTES_PER_FUEL: u64 = 4;
/// The most fuel any render gets: at 1/4 fuel per byte, conversations of up to ~55 MiB of
/// text; about 4 s of a hostile template's work. It bounds the render thread's stack
/// ([`render_stack_bytes`]).
pub const MAX_FUEL: u64 = 16_000_000;
/// Output every render may write, whatever the conversation (a default system prompt, headers).
pub const OUTPUT_BASE_BYTES: usize = 1 << 20;
/// Output allowed per byte of message content: a real template writes each message once.
pub const OUTPUT_PER_CONTENT_BYTE: usize = 4;
/// Output allowed per message beyond its content: role headers and separators (tens of bytes
/// in real templates).
pub const OUTPUT_PER_MESSAGE: usize = 4 << 10;
/// Deepest nesting of calls (macros, `loop()`, nested blocks) a render may reach, in
/// minijinja's units (a macro call counts several): minijinja's own ceiling without its
/// `stacker` feature, enough for any real template; a recursive macro ends there with
/// [`Error::TemplateLimit`].
pub const RECURSION_LIMIT: usize = 500;

impl RenderLimits {
    /// The limits for rendering `messages` (module doc, "Bounded rendering").
    pub fn for_messages(messages: &[Message]) -> Self {
        let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        let n = messages.len();
        Self {
            fuel: FUEL_BASE
                .saturating_add(FUEL_PER_MESSAGE.saturating_mul(n as u64))
                .saturating_add(bytes as u64 / CONTENT_BYTES_PER_FUEL)
                .min(MAX_FUEL),
            max_output_bytes: OUTPUT_BASE_BYTES
                .saturating_add(OUTPUT_PER_CONTENT_BYTE.saturating_mul(bytes))
                .saturating_add(OUTPUT_PER_MESSAGE.saturating_mul(n)),
        }
    }
}

/// The stack of the thread a render with `fuel` runs on. A template can nest values (a list in
/// a list in a namespace attribute, once per loop turn) as deep as its fuel allows, about one
/// level per 8.5 fuel, and minijinja drops and prints them recursively (about 100 bytes of
/// stack a level, measured): 32 bytes per fuel keeps that within the stack, so deep nesting
/// ends on the fuel, never in a stack overflow (tested at [`MAX_FUEL`]). The stack is address
/// space reserved (at most ~540 MiB), not memory used.
pub fn render_stack_bytes(fuel: u64) -> usize {
    const BASE: usize = 32 << 20;
    const PER_FUEL: u64 = 32;
    BASE.saturating_add(
        usize::try_from(fuel.min(MAX_FUEL).saturating_mul(PER_FUEL)).unwrap_or(usize::MAX),
    )
}

/// A compiled Hugging Face chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    source: Arc<str>,
    origin: Arc<str>,
    special: SpecialTokens,
    env: Arc<Environment<'static>>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

/// What [`ChatTemplate::origin`] says of a template made with [`ChatTemplate::new`] alone.
pub const INLINE_ORIGIN: &str = "a template given as text";

/// The output of a render, refusing to grow past `cap` bytes.
struct CappedOutput {
    out: Vec<u8>,
    cap: usize,
}

/// The I/O error [`CappedOutput`] returns past its cap (found again in the error's sources).
#[derive(Debug)]
struct OutputCapReached(usize);

impl fmt::Display for OutputCapReached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the output passed {} bytes", self.0)
    }
}

impl std::error::Error for OutputCapReached {}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > self.cap {
            return Err(std::io::Error::other(OutputCapReached(self.cap)));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles `source`; `special` fills `bos_token` and friends when rendering.
    pub fn new(source: impl Into<String>, special: SpecialTokens) -> Result<Self> {
        let source: String = source.into();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(syntax_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", py_tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_recursion_limit(RECURSION_LIMIT);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(syntax_error)?;
        Ok(Self {
            source: source.into(),
            origin: INLINE_ORIGIN.into(),
            special,
            env: Arc::new(env),
        })
    }

    /// The same template, saying it came from `origin` (a file path, "tokenizer_config.json of
    /// X") in its errors.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into().into();
        self
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from ([`INLINE_ORIGIN`] unless [`ChatTemplate::with_origin`]
    /// said).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The special tokens it is rendered with.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the opening of an
    /// assistant turn. Bounded by [`RenderLimits::for_messages`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_limits(
            messages,
            add_generation_prompt,
            RenderLimits::for_messages(messages),
        )
    }

    /// [`ChatTemplate::render`] within `limits`: past one, [`Error::TemplateLimit`] naming the
    /// template's origin and the limit. Runs on a thread of its own whose stack is sized to
    /// the fuel ([`render_stack_bytes`]); the caller's thread waits.
    pub fn render_with_limits(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        limits: RenderLimits,
    ) -> Result<String> {
        let stack = render_stack_bytes(limits.fuel);
        std::thread::scope(|scope| {
            let render = std::thread::Builder::new()
                .name("tptt-template".into())
                .stack_size(stack)
                .spawn_scoped(scope, || {
                    self.render_here(messages, add_generation_prompt, limits)
                })
                .map_err(|e| {
                    Error::Generate(format!(
                        "cannot start the template thread ({stack} bytes of stack): {e}"
                    ))
                })?;
            render.join().unwrap_or_else(|payload| {
                Err(Error::Panicked {
                    message: panic_message(payload.as_ref()),
                })
            })
        })
    }

    fn render_here(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        limits: RenderLimits,
    ) -> Result<String> {
        // Fuel is a setting of the environment: a clone (its templates are shared, not
        // recompiled) carries this render's budget.
        let mut env = Environment::clone(&self.env);
        env.set_fuel(Some(limits.fuel));
        let template = env.get_template(TEMPLATE_NAME).map_err(render_error)?;
        let count = messages.len();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(OrderedMap(vec![
                    (Value::from("role"), Value::from(m.role.as_str())),
                    (Value::from("content"), Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let special = [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("unk_token", &self.special.unk),
            ("pad_token", &self.special.pad),
        ];
        for (name, token) in special {
            if let Some(token) = token {
                ctx.insert(name, Value::from(token.as_str()));
            }
        }
        let mut output = CappedOutput {
            out: Vec::new(),
            cap: limits.max_output_bytes,
        };
        let rendered = template.render_captured_to(Value::from(ctx), &mut output);
        if let Err(e) = rendered {
            return Err(self
                .limit_error(&e, &limits, count)
                .unwrap_or_else(|| render_error(e)));
        }
        // minijinja writes whole `str`s: the bytes are UTF-8.
        String::from_utf8(output.out).map_err(|e| {
            render_error(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("the output is not UTF-8: {e}"),
            ))
        })
    }

    /// [`Error::TemplateLimit`] when `e` is a render limit being hit.
    fn limit_error(
        &self,
        e: &minijinja::Error,
        limits: &RenderLimits,
        messages: usize,
    ) -> Option<Error> {
        let limit = if e.kind() == ErrorKind::OutOfFuel {
            format!(
                "work budget ({} fuel for this conversation: one per instruction and per 64 bytes of data)",
                limits.fuel
            )
        } else if e.kind() == ErrorKind::InvalidOperation
            && e.detail() == Some("recursion limit exceeded")
        {
            format!("recursion limit ({RECURSION_LIMIT} levels of nested calls)")
        } else {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
            let mut capped = false;
            while let Some(err) = cause {
                if err.downcast_ref::<OutputCapReached>().is_some() {
                    capped = true;
                    break;
                }
                // An io::Error hides its payload from `source()`: look inside it.
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    if io
                        .get_ref()
                        .is_some_and(|inner| inner.downcast_ref::<OutputCapReached>().is_some())
                    {
                        capped = true;
                        break;
                    }
                }
                cause = err.source();
            }
            if !capped {
                return None;
            }
            format!(
                "output size limit ({} bytes for this conversation)",
                limits.max_output_bytes
            )
        };
        Some(Error::TemplateLimit {
            template: self.origin.to_string(),
            limit,
            messages,
        })
    }
}

/// Rewrites `transformers`' `{% generation %}` / `{% endgeneration %}` block (its
/// `AssistantTracker` extension, which marks assistant text for training masks and renders its
/// body unchanged) into the equivalent `{% if true %}` / `{% endif %}`, keeping any `-`
/// whitespace control, so templates that use it compile here.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        // The tag closes after its opening `{%` (in `{%}`, the `%}` overlaps it and does not).
        let Some(close) = tag[2..].find("%}").map(|c| c + 2) else {
            // Unclosed tag: left as is for the parser to report.
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (dash_l, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner),
        };
        let (body, dash_r) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{dash_l} {r} {dash_r}%}}")),
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// A map that keeps insertion order (as Python dicts do), so `message|tojson` and
/// `message.items()` list `role` before `content` like `transformers` does.
#[derive(Debug)]
struct OrderedMap(Vec<(Value, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| k.clone()).collect())
    }
}

/// The error `raise_exception` attaches as source, so a render failure can be told apart from
/// the template deliberately rejecting the conversation.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn syntax_error(source: minijinja::Error) -> Error {
    Error::TemplateSyntax {
        message: source.to_string(),
        source,
    }
}

fn render_error(source: minijinja::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(err) = cause {
        if let Some(raised) = err.downcast_ref::<RaisedException>() {
            return Error::TemplateException(raised.0.clone());
        }
        cause = err.source();
    }
    Error::TemplateRender {
        message: source.to_string(),
        source,
    }
}

/// `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: Value) -> std::result::Result<Value, minijinja::Error> {
    let message = message.to_string();
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedException(message)),
    )
}

/// `strftime_now(format)`: the current time formatted like Python's `strftime` (in UTC).
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("clock out of range: {e}"),
        )
    })?;
    Ok(format_utc(format, secs))
}

/// Python/C `strftime` for a UTC timestamp. Supports `%a %A %b %B %h %d %e %H %I %j %m %M %p
/// %S %y %Y %F %T %D %R %n %t %%` and glibc's `-` flag (no padding, as in `%-d`); other
/// directives are copied unchanged.
fn format_utc(format: &str, secs: i64) -> String {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, rem / 60 % 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = day_of_year(year, month, day);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match d {
            'a' => day_name[..3].to_string(),
            'A' => day_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'B' => month_name.to_string(),
            'd' => num(day as i64, 2),
            'e' if unpadded => day.to_string(),
            'e' => format!("{day:2}"),
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'j' => num(yday as i64, 3),
            'm' => num(month as i64, 2),
            'M' => num(minute, 2),
            'p' => if hour < 12 { "AM" } else { "PM" }.to_string(),
            'S' => num(second, 2),
            'y' => num(year.rem_euclid(100), 2),
            'Y' => year.to_string(),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            'R' => format!("{hour:02}:{minute:02}"),
            'D' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'n' => "\n".to_string(),
            't' => "\t".to_string(),
            '%' => "%".to_string(),
            other => {
                if unpadded {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&piece);
    }
    out
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn day_of_year(year: i64, month: u32, day: u32) -> u32 {
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    CUMULATIVE[(month - 1) as usize] + day + u32::from(leap && month > 2)
}

/// `tojson` as `transformers` defines it:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`;
/// positional arguments follow that order.
///
/// Bounded like minijinja's own `tojson`: the text may not outgrow what the render's remaining
/// fuel pays for (16 units a byte, as minijinja charges serialization), checked as it grows, so
/// `tojson(indent=10**12)` or a deep `indent` fails with `OutOfFuel` instead of allocating.
fn py_tojson(
    state: &State,
    value: &Value,
    positional: &[Value],
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let arg = |i: usize, name: &str| -> std::result::Result<Option<Value>, minijinja::Error> {
        match positional.get(i) {
            Some(v) => Ok(Some(v.clone())),
            None => kwargs.get::<Option<Value>>(name),
        }
    };
    if positional.len() > 4 {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    // Bytes of JSON the remaining fuel pays for (no fuel set: unbounded).
    let max_bytes = state.fuel_levels().map_or(usize::MAX, |(_, remaining)| {
        usize::try_from(remaining.saturating_mul(JSON_BYTES_PER_FUEL)).unwrap_or(usize::MAX)
    });
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.to_string()),
        Some(v) => {
            let n = usize::try_from(i64::try_from(v)?).unwrap_or(0);
            if n > max_bytes {
                return Err(json_too_big(max_bytes));
            }
            Some(" ".repeat(n))
        }
    };
    let (item_sep, key_sep) = match arg(2, "separators")? {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let parts: Vec<String> = v.try_iter()?.map(|p| p.to_string()).collect();
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be an (item, key) pair",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let mut writer = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
        depth: 0,
        max_bytes,
    };
    writer.value(value)?;
    // Charged as minijinja charges its own serializations (the engine adds the returned
    // string's bytes itself).
    state.consume_fuel(writer.out.len() as u64 / JSON_BYTES_PER_FUEL)?;
    Ok(Value::from(writer.out))
}

/// The deepest nesting `tojson` writes (Python's default recursion limit is 1000).
const MAX_JSON_DEPTH: usize = 500;

/// Bytes of `tojson` output one fuel pays for (minijinja charges 16 of its 64 units per
/// serialized byte).
const JSON_BYTES_PER_FUEL: u64 = 4;

/// The error of a `tojson` past what the render's fuel pays for.
fn json_too_big(max_bytes: usize) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::OutOfFuel,
        format!("tojson: the JSON would pass the {max_bytes} bytes the remaining fuel pays for"),
    )
}

/// Python's `json.dumps` over minijinja values.
struct PyJson {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
    depth: usize,
    /// The most bytes `out` may grow to.
    max_bytes: usize,
}

impl PyJson {
    /// Fails once `out` plus `more` bytes would pass `max_bytes`.
    fn room_for(&self, more: usize) -> std::result::Result<(), minijinja::Error> {
        if self.out.len().saturating_add(more) > self.max_bytes {
            return Err(json_too_big(self.max_bytes));
        }
        Ok(())
    }

    fn value(&mut self, v: &Value) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(v)?,
            ValueKind::String | ValueKind::Plain => self.string(&v.to_string())?,
            ValueKind::Bytes | ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), |w, i| w.value(&items[i]))?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let value = v.get_item(&key)?;
                    entries.push((self.key(&key)?, value));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container('{', '}', entries.len(), |w, i| {
                    w.string(&entries[i].0)?;
                    w.out.push_str(&w.key_sep.clone());
                    w.value(&entries[i].1)
                })?;
            }
            ValueKind::Invalid => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("cannot serialize {v:?} to JSON"),
                ))
            }
            _ => self.string(&v.to_string())?,
        }
        Ok(())
    }

    /// `len` items between `open` and `close`, laid out like `json.dumps`.
    fn container(
        &mut self,
        open: char,
        close: char,
        len: usize,
        mut item: impl FnMut(&mut Self, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        if self.depth >= MAX_JSON_DEPTH {
            // Python's json.dumps stops at its recursion limit too; here it guards our stack.
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: the value is nested more than {MAX_JSON_DEPTH} levels deep"),
            ));
        }
        self.depth += 1;
        for i in 0..len {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.room_for(sep.len())?;
                self.out.push_str(&sep);
            }
            self.newline()?;
            item(self, i)?;
        }
        self.depth -= 1;
        self.newline()?;
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self) -> std::result::Result<(), minijinja::Error> {
        if let Some(indent) = &self.indent {
            self.room_for(indent.len().saturating_mul(self.depth).saturating_add(1))?;
            self.out.push('\n');
            for _ in 0..self.depth {
                self.out.push_str(indent);
            }
        }
        Ok(())
    }

    /// Dict keys become strings as in Python: `1` → `"1"`, `true` → `"true"`, `None` → `"null"`.
    fn key(&self, key: &Value) -> std::result::Result<String, minijinja::Error> {
        Ok(match key.kind() {
            ValueKind::String => key.to_string(),
            ValueKind::None | ValueKind::Undefined => "null".to_string(),
            ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
            ValueKind::Number => {
                let mut w = PyJson {
                    out: String::new(),
                    indent: None,
                    item_sep: String::new(),
                    key_sep: String::new(),
                    ensure_ascii: false,
                    sort_keys: false,
                    depth: 0,
                    max_bytes: usize::MAX,
                };
                w.number(key)?;
                w.out
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("JSON keys must be str, int, float, bool or None, not {key:?}"),
                ))
            }
        })
    }

    fn number(&mut self, v: &Value) -> std::result::Result<(), minijinja::Error> {
        if v.is_integer() {
            self.out.push_str(&v.to_string());
            return Ok(());
        }
        let f = f64::try_from(v.clone())?;
        if f.is_nan() {
            self.out.push_str("NaN");
        } else if f.is_infinite() {
            self.out
                .push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            // Python's float repr: always a '.' or an exponent, and a signed exponent.
            let s = format!("{f:?}");
            match s.split_once('e') {
                Some((mantissa, exp)) if !exp.starts_with('-') => {
                    self.out.push_str(&format!("{mantissa}e+{exp}"))
                }
                _ => self.out.push_str(&s),
            }
        }
        Ok(())
    }

    /// Writes `s` quoted; checked after (its escaped form is at most 6 bytes per byte of a value
    /// that exists already).
    fn string(&mut self, s: &str) -> std::result::Result<(), minijinja::Error> {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
        self.room_for(0)
    }
}

/// Renders `messages` in the built-in Alpaca format described in the module docs.
pub fn render_alpaca(messages: &[Message], add_generation_prompt: bool) -> String {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let mut blocks: Vec<String> = Vec::with_capacity(messages.len() + 2);
    if system.is_empty() {
        blocks.push(ALPACA_PREAMBLE.to_string());
    } else {
        let preamble = system.join("\n\n");
        if !preamble.is_empty() {
            blocks.push(preamble);
        }
    }
    for m in messages {
        match m.role {
            Role::System => {}
            Role::User => blocks.push(format!("### Instruction:\n{}", m.content)),
            Role::Assistant => blocks.push(format!("### Response:\n{}", m.content)),
        }
    }
    if add_generation_prompt {
        blocks.push("### Response:\n".to_string());
    }
    blocks.join("\n\n")
}

/// The classic single-turn Alpaca prompt with an input:
/// `"{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"`.
pub fn alpaca_with_input(instruction: &str, input: &str) -> String {
    format!(
        "{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
}

/// How a conversation becomes prompt text.
#[derive(Debug, Clone)]
pub enum PromptFormat {
    /// The model's own Hugging Face chat template.
    Jinja(ChatTemplate),
    /// The built-in Alpaca instruction format.
    Alpaca,
}

impl PromptFormat {
    /// Jinja when `config` has a chat template, else Alpaca.
    pub fn from_tokenizer_config(config: &TokenizerConfig) -> Result<Self> {
        match &config.chat_template {
            Some(source) => {
                let template = ChatTemplate::new(source.as_str(), config.special.clone())?;
                Ok(Self::Jinja(match &config.template_origin {
                    Some(origin) => template.with_origin(origin.as_str()),
                    None => template,
                }))
            }
            None => Ok(Self::Alpaca),
        }
    }

    /// [`PromptFormat::from_tokenizer_config`] on the text of a `tokenizer_config.json`.
    pub fn from_tokenizer_config_json(json: &str) -> Result<Self> {
        Self::from_tokenizer_config(&TokenizerConfig::from_json(json)?)
    }

    /// [`PromptFormat::from_tokenizer_config`] on a `tokenizer_config.json` file.
    pub fn from_tokenizer_config_file(path: &Path) -> Result<Self> {
        Self::from_tokenizer_config(&TokenizerConfig::from_file(path)?)
    }

    /// Renders `messages` (at least one) into the prompt text; with `add_generation_prompt`
    /// the prompt ends where the assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::InvalidConversation("there are no messages".into()));
        }
        match self {
            Self::Jinja(template) => template.render(messages, add_generation_prompt),
            Self::Alpaca => Ok(render_alpaca(messages, add_generation_prompt)),
        }
    }

    /// Whether the rendered prompt should be encoded with the tokenizer's special tokens
    /// (`encode(prompt, add_special_tokens)`): chat templates write their own BOS, as
    /// `apply_chat_template` assumes; Alpaca text relies on the tokenizer adding it.
    pub fn add_special_tokens(&self) -> bool {
        matches!(self, Self::Alpaca)
    }

    /// Strings that end a reply in this format, besides the EOS tokens.
    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self {
            Self::Jinja(_) => &[],
            Self::Alpaca => ALPACA_STOP_STRINGS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tokenizer_config.json` of HuggingFaceTB/SmolLM2-135M-Instruct (the fields used here;
    /// the template verbatim, JSON-escaped as in the file).
    const SMOLLM2_CONFIG: &str = r#"{
      "add_prefix_space": false,
      "bos_token": "<|im_start|>",
      "chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
      "clean_up_tokenization_spaces": false,
      "eos_token": "<|im_end|>",
      "model_max_length": 8192,
      "pad_token": "<|im_end|>",
      "tokenizer_class": "GPT2Tokenizer",
      "unk_token": "<|endoftext|>",
      "vocab_size": 49152
    }"#;

    fn jinja(source: &str) -> ChatTemplate {
        ChatTemplate::new(
            source,
            SpecialTokens {
                bos: Some("<s>".into()),
                eos: Some("</s>".into()),
                ..SpecialTokens::default()
            },
        )
        .expect("template compiles")
    }

    fn check(source: &str, messages: &[Message], expected: &str) {
        let got = jinja(source).render(messages, true).expect("renders");
        assert_eq!(got, expected);
    }

    #[test]
    fn smollm2_chatml_with_generation_prompt() {
        let format = PromptFormat::from_tokenizer_config_json(SMOLLM2_CONFIG).expect("loads");
        assert!(matches!(format, PromptFormat::Jinja(_)));
        let prompt = format
            .render(&[Message::user("What is the capital of France?")], true)
            .expect("renders");
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!format.add_special_tokens());
    }

    #[test]
    fn smollm2_multi_turn_with_system() {
        let format = PromptFormat::from_tokenizer_config_json(SMOLLM2_CONFIG).expect("loads");
        let messages = [
            Message::system("Be terse."),
            Message::user("Hi"),
            Message::assistant("Hello."),
            Message::user("Bye"),
        ];
        assert_eq!(
            format.render(&messages, false).expect("renders"),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        );
    }

    #[test]
    fn special_tokens_come_from_the_config() {
        let config = TokenizerConfig::from_json(SMOLLM2_CONFIG).expect("loads");
        assert_eq!(config.special.bos.as_deref(), Some("<|im_start|>"));
        assert_eq!(config.special.eos.as_deref(), Some("<|im_end|>"));
        assert_eq!(config.special.unk.as_deref(), Some("<|endoftext|>"));
        let added = TokenizerConfig::from_json(
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": null}"#,
        )
        .expect("loads");
        assert_eq!(added.special.bos.as_deref(), Some("<s>"));
        assert_eq!(added.special.eos, None);
        assert_eq!(added.chat_template, None);
    }

    /// The conversation of text-generation-inference's chat template tests. Every expected
    /// string below was checked against Python Jinja2 3.1 configured as `transformers` does
    /// (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
    /// extensions=[loopcontrols])` with its `tojson` and `raise_exception`).
    fn example_chat() -> Vec<Message> {
        vec![
            Message::user("Hello, how are you?"),
            Message::assistant("I'm doing great. How can I help you today?"),
            Message::user("I'd like to show off how chat templating works!"),
        ]
    }

    #[test]
    fn known_templates_render_like_transformers() {
        let cases: [(&str, &str, &str); 4] = [
            (
                // mistralai/Mistral-7B-Instruct-v0.1
                "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
                "<s>[INST] Hello, how are you? [/INST]I'm doing great. How can I help you today?</s> [INST] I'd like to show off how chat templating works! [/INST]",
                "mistral",
            ),
            (
                // Deci/DeciLM-7B-instruct: exercises trim_blocks + lstrip_blocks.
                "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '### User:\\n' + message['content'] }}\n{% elif message['role'] == 'system' %}\n{{ '### System:\\n' + message['content'] }}\n{% elif message['role'] == 'assistant' %}\n{{ '### Assistant:\\n'  + message['content'] }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '### Assistant:' }}\n{% endif %}\n{% endfor %}",
                "### User:\nHello, how are you?\n### Assistant:\nI'm doing great. How can I help you today?\n### User:\nI'd like to show off how chat templating works!\n",
                "decilm",
            ),
            (
                // Qwen/Qwen1.5-72B-Chat
                "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
                "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!",
                "qwen1.5",
            ),
            (
                // TheBloke/deepseek-coder-33B-instruct-AWQ: `-` whitespace control, set in loops.
                "{%- set found_item = false -%}\n{%- for message in messages -%}\n    {%- if message['role'] == 'system' -%}\n        {%- set found_item = true -%}\n    {%- endif -%}\n{%- endfor -%}\n{%- if not found_item -%}\n{{'You are an AI programming assistant.\\n'}}\n{%- endif %}\n{%- for message in messages %}\n    {%- if message['role'] == 'system' %}\n{{ message['content'] }}\n    {%- else %}\n        {%- if message['role'] == 'user' %}\n{{'### Instruction:\\n' + message['content'] + '\\n'}}\n        {%- else %}\n{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{{'### Response:\\n'}}\n",
                "You are an AI programming assistant.\n### Instruction:\nHello, how are you?\n### Response:\nI'm doing great. How can I help you today?\n<|EOT|>\n### Instruction:\nI'd like to show off how chat templating works!\n### Response:\n",
                "deepseek-coder",
            ),
        ];
        for (source, expected, name) in cases {
            let got = jinja(source)
                .render(&example_chat(), false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}\
                      {%- generation -%} [{{ m.content }}] {%- endgeneration -%}\
                      {% else %}{{ m.content }}{% endif %}{% endfor %}{% generation %}.{% endgeneration %}";
        check(
            source,
            &[Message::user("q"), Message::assistant("a")],
            "q[a].",
        );
        assert_eq!(
            rewrite_generation_tags("{% if x %}a{%- endif %}"),
            "{% if x %}a{%- endif %}"
        );
        assert_eq!(rewrite_generation_tags("a {% unclosed"), "a {% unclosed");
        // Found by the fuzz tests: `{%}` used to slice [2..1] and panic.
        assert_eq!(rewrite_generation_tags("{%}"), "{%}");
        assert_eq!(rewrite_generation_tags("{%}x%}{%-%}"), "{%}x%}{%-%}");
        assert!(ChatTemplate::new("{%}", SpecialTokens::default()).is_err());
    }

    #[test]
    fn tools_and_documents_are_none() {
        check(
            "{% if tools is none and documents is none and tools is defined %}ok{% endif %}\
             {% if not tools %}!{% endif %}",
            &[Message::user("x")],
            "ok!",
        );
    }

    #[test]
    fn template_sees_bos_and_eos() {
        check(
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
            &[Message::user("a"), Message::assistant("b")],
            "<s>a</s>b</s>",
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        check(
            source,
            &[Message::user("x"), Message::user("y")],
            "[x]\n[y]\n",
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let source = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                      {{ m.content.strip().upper() }}{% if m.content.startswith(' a') %}!{% endif %}\
                      {% endfor %}{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}";
        check(
            source,
            &[
                Message::user(" ab "),
                Message::user("c"),
                Message::user("d"),
            ],
            "AB!Crole=user;content= ab ;",
        );
    }

    #[test]
    fn tojson_writes_python_json() {
        let source = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|\
                      {{ {'b': [1, 2.0, 1e20, none, true], 'a': 'é\"<'} | tojson(sort_keys=true) }}|\
                      {{ 'é😀\x7f' | tojson(ensure_ascii=true) }}|{{ [1, 2] | tojson(separators=[',', ':']) }}";
        check(
            source,
            &[Message::user("hi")],
            "{\"role\": \"user\", \"content\": \"hi\"}|\
             [\n  {\n    \"role\": \"user\",\n    \"content\": \"hi\"\n  }\n]|\
             {\"a\": \"é\\\"<\", \"b\": [1, 2.0, 1e+20, null, true]}|\
             \"\\u00e9\\ud83d\\ude00\\u007f\"|[1,2]",
        );
    }

    #[test]
    fn broken_template_is_a_syntax_error() {
        for source in [
            "{% for m in messages %}{{ m.content }}",
            "{{ 'unclosed ",
            "{% endif %}",
        ] {
            let err =
                ChatTemplate::new(source, SpecialTokens::default()).expect_err("must not compile");
            assert!(matches!(err, Error::TemplateSyntax { .. }), "{err}");
            assert!(!err.to_string().is_empty());
        }
        let err = PromptFormat::from_tokenizer_config_json(r#"{"chat_template": "{% if %}"}"#)
            .expect_err("must not compile");
        assert!(matches!(err, Error::TemplateSyntax { .. }), "{err}");
    }

    #[test]
    fn render_failure_is_an_error() {
        let t = jinja("{{ messages[0].content | no_such_filter }}");
        let err = t
            .render(&[Message::user("x")], true)
            .expect_err("unknown filter");
        assert!(matches!(err, Error::TemplateRender { .. }), "{err}");
        let t = jinja("{{ messages[0].content + 1 }}");
        let err = t
            .render(&[Message::user("x")], true)
            .expect_err("type error");
        assert!(matches!(err, Error::TemplateRender { .. }), "{err}");
    }

    #[test]
    fn raise_exception_carries_the_message() {
        // The check Llama-2 / Mistral templates make.
        let source = "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                      {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
                      {% endif %}{{ message['content'] }}{% endfor %}";
        let t = jinja(source);
        assert_eq!(
            t.render(&[Message::user("a"), Message::assistant("b")], false)
                .expect("alternating roles render"),
            "ab"
        );
        let err = t
            .render(&[Message::user("a"), Message::user("b")], false)
            .expect_err("must raise");
        match err {
            Error::TemplateException(msg) => assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("expected TemplateException, got {other}"),
        }
    }

    #[test]
    fn strftime_now_renders_a_date() {
        let out = jinja("{{ strftime_now('%Y-%m-%d') }}")
            .render(&[Message::user("x")], true)
            .expect("renders");
        let bytes = out.as_bytes();
        assert_eq!(out.len(), 10, "{out}");
        assert!(bytes[4] == b'-' && bytes[7] == b'-', "{out}");
    }

    #[test]
    fn format_utc_matches_python() {
        // Python: datetime(2024, 2, 29, 13, 5, 9, tzinfo=utc).strftime(...)
        assert_eq!(
            format_utc(
                "%Y-%m-%d %H:%M:%S|%d %b %Y|%A %a %B %j %I%p %y|%%|%e",
                1_709_211_909
            ),
            "2024-02-29 13:05:09|29 Feb 2024|Thursday Thu February 060 01PM 24|%|29"
        );
        assert_eq!(
            format_utc("%-d %-m %F %T %Q", 1_709_211_909),
            "29 2 2024-02-29 13:05:09 %Q"
        );
        assert_eq!(
            format_utc("%Y-%m-%d %H:%M:%S %a", -1),
            "1969-12-31 23:59:59 Wed"
        );
    }

    #[test]
    fn named_templates_pick_default() {
        let json = r#"{"chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"}
        ]}"#;
        let config = TokenizerConfig::from_json(json).expect("loads");
        assert_eq!(config.chat_template.as_deref(), Some("DEFAULT"));
        let only =
            TokenizerConfig::from_json(r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#)
                .expect("loads");
        assert_eq!(only.chat_template.as_deref(), Some("R"));
        let err = TokenizerConfig::from_json(r#"{"chat_template": []}"#).expect_err("empty list");
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }

    #[test]
    fn no_template_means_alpaca() {
        let format =
            PromptFormat::from_tokenizer_config_json(r#"{"eos_token": "</s>"}"#).expect("loads");
        assert!(matches!(format, PromptFormat::Alpaca));
        assert!(format.add_special_tokens());
        assert_eq!(format.stop_strings(), ALPACA_STOP_STRINGS);
    }

    #[test]
    fn malformed_config_is_an_error() {
        let err = TokenizerConfig::from_json("{not json").expect_err("bad JSON");
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let err = TokenizerConfig::from_json(r#"{"chat_template": 3}"#).expect_err("bad type");
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let err = TokenizerConfig::from_file(Path::new("/nonexistent/tokenizer_config.json"))
            .expect_err("missing file");
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn alpaca_single_turn() {
        let prompt = PromptFormat::Alpaca
            .render(&[Message::user("What is the capital of France?")], true)
            .expect("renders");
        assert_eq!(
            prompt,
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
        );
    }

    #[test]
    fn alpaca_multi_turn_with_system_prompt() {
        let messages = [
            Message::system("You are a geography tutor."),
            Message::user("Capital of France?"),
            Message::assistant("Paris."),
            Message::user("And of Italy?"),
        ];
        assert_eq!(
            PromptFormat::Alpaca
                .render(&messages, true)
                .expect("renders"),
            "You are a geography tutor.\n\n\
             ### Instruction:\nCapital of France?\n\n\
             ### Response:\nParis.\n\n\
             ### Instruction:\nAnd of Italy?\n\n\
             ### Response:\n"
        );
    }

    #[test]
    fn alpaca_edge_cases() {
        // Empty system prompt: no preamble at all.
        assert_eq!(
            render_alpaca(&[Message::system(""), Message::user("Hi")], true),
            "### Instruction:\nHi\n\n### Response:\n"
        );
        // No generation prompt, ending on an assistant message: continue it.
        assert_eq!(
            render_alpaca(&[Message::user("Hi"), Message::assistant("Hel")], false),
            format!("{ALPACA_PREAMBLE}\n\n### Instruction:\nHi\n\n### Response:\nHel")
        );
        assert_eq!(
            alpaca_with_input("Translate to French.", "Good morning"),
            format!(
                "{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\nTranslate to French.\n\n\
                 ### Input:\nGood morning\n\n### Response:\n"
            )
        );
        let err = PromptFormat::Alpaca.render(&[], true).expect_err("empty");
        assert!(matches!(err, Error::InvalidConversation(_)), "{err}");
    }

    #[test]
    fn generation_config_eos_forms() {
        let one = GenerationConfig::from_json(r#"{"bos_token_id": 1, "eos_token_id": 2}"#)
            .expect("loads");
        assert_eq!(one.eos_token_ids, vec![2]);
        assert_eq!(one.bos_token_id, Some(1));
        let many = GenerationConfig::from_json(r#"{"eos_token_id": [128001, 128008, 128009]}"#)
            .expect("loads");
        assert_eq!(many.eos_token_ids, vec![128001, 128008, 128009]);
        let none = GenerationConfig::from_json(r#"{"eos_token_id": null}"#).expect("loads");
        assert!(none.eos_token_ids.is_empty());
    }

    #[test]
    fn eos_ids_merge_generation_config_and_tokenizer() {
        let tokenizer: Tokenizer = r#"{
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 3, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true},
                {"id": 4, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "<unk>": 2, "<|im_end|>": 3, "<|endoftext|>": 4},
                      "unk_token": "<unk>"}
        }"#
        .parse()
        .expect("valid tokenizer.json");
        let special = TokenizerConfig::from_json(SMOLLM2_CONFIG)
            .expect("loads")
            .special;
        assert_eq!(special.eos_token_ids(&tokenizer, None), vec![3]);
        let generation = GenerationConfig::from_json(r#"{"eos_token_id": [4, 3]}"#).expect("loads");
        assert_eq!(
            special.eos_token_ids(&tokenizer, Some(&generation)),
            vec![4, 3]
        );
        let unknown = SpecialTokens {
            eos: Some("</s>".into()),
            ..SpecialTokens::default()
        };
        assert!(unknown.eos_token_ids(&tokenizer, None).is_empty());
        assert_eq!(special.bos_token_id(&tokenizer, None), None);
    }

    #[test]
    fn model_dir_prefers_chat_template_jinja() {
        let dir = std::env::temp_dir().join(format!("tptt-engine-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("tokenizer_config.json"), SMOLLM2_CONFIG).expect("write");
        let config = TokenizerConfig::from_model_dir(&dir).expect("loads");
        assert!(config
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("SmolLM")));
        std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}")
            .expect("write");
        let config = TokenizerConfig::from_model_dir(&dir).expect("loads");
        assert_eq!(
            config.chat_template.as_deref(),
            Some("{{ messages[0].content }}")
        );
        assert_eq!(config.special.eos.as_deref(), Some("<|im_end|>"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// Renders `source` on one short message within the default limits, checking it ends
    /// (in seconds: a hang detector, not a speed target).
    fn render_hostile(source: &str) -> Result<String> {
        let template = jinja(source).with_origin("/models/x/tokenizer_config.json");
        let started = std::time::Instant::now();
        let r = template.render(&[Message::user("hi")], true);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{source}: {:?}",
            started.elapsed()
        );
        r
    }

    fn assert_limit(r: Result<String>, which: &str) {
        match r {
            Err(Error::TemplateLimit {
                template, limit, ..
            }) => {
                assert_eq!(template, "/models/x/tokenizer_config.json");
                assert!(limit.contains(which), "{limit}");
            }
            other => panic!("expected the {which} limit, got {other:?}"),
        }
    }

    #[test]
    fn nested_ranges_run_out_of_fuel() {
        let r = render_hostile(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        );
        let shown = r.as_ref().map(|_| ()).expect_err("limit").to_string();
        assert!(
            shown.contains("/models/x/tokenizer_config.json") && shown.contains("work budget"),
            "{shown}"
        );
        assert_limit(r, "work budget");
        // Loops that write nothing cost fuel too.
        assert_limit(
            render_hostile(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            ),
            "work budget",
        );
        // A huge value is refused before it is made.
        assert_limit(render_hostile("{{ 'x' * 10000000000 }}"), "work budget");
    }

    #[test]
    fn a_template_writing_too_much_hits_the_output_cap() {
        // 100 MB of output is within the fuel (1 per 64 bytes) but past the output cap.
        let r = render_hostile("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}");
        assert_limit(r, "output size");
        let limits = RenderLimits::for_messages(&[Message::user("hi")]);
        let capped = jinja("{% for i in range(100) %}{{ 'x' * 1000 }}{% endfor %}")
            .render_with_limits(
                &[Message::user("hi")],
                true,
                RenderLimits {
                    max_output_bytes: 99_999,
                    ..limits
                },
            );
        assert!(
            matches!(capped, Err(Error::TemplateLimit { .. })),
            "{capped:?}"
        );
    }

    #[test]
    fn recursion_ends_in_an_error_not_a_stack_overflow() {
        assert_limit(
            render_hostile("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
            "recursion",
        );
        assert_limit(
            render_hostile(
                "{% macro f(n) %}{% for i in [1, 2] %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(0) }}",
            ),
            "recursion",
        );
    }

    #[test]
    fn values_nested_as_deep_as_the_fuel_allows_do_not_overflow_the_stack() {
        // One level of nesting per loop turn until the fuel runs out: dropping and printing
        // such a value recurses once per level. At the largest budget (the render thread's
        // stack is sized for it).
        let source = "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}\
                      {% for j in range(100000) %}{% set ns.x = {'a': ns.x} %}{% endfor %}\
                      {{ ns.x|length }}{% endfor %}";
        let r = jinja(source).render_with_limits(
            &[Message::user("hi")],
            true,
            RenderLimits {
                fuel: MAX_FUEL,
                max_output_bytes: OUTPUT_BASE_BYTES,
            },
        );
        assert!(matches!(r, Err(Error::TemplateLimit { .. })), "{r:?}");
        assert_limit(
            render_hostile(
                "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}\
                 {% for j in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ ns.x }}",
            ),
            "work budget",
        );
    }

    #[test]
    fn tojson_cannot_allocate_past_the_fuel() {
        for source in [
            "{{ messages | tojson(indent=1000000000000) }}",
            "{{ messages | tojson(indent=10000000) }}",
            "{% set ns = namespace(x=[]) %}{% for i in range(600) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | tojson }}",
        ] {
            let r = render_hostile(source);
            assert!(r.is_err(), "{source}: no error");
        }
        // Ordinary use is unaffected.
        assert_eq!(
            render_hostile("{{ messages[0] | tojson(indent=2) }}").expect("renders"),
            "{\n  \"role\": \"user\",\n  \"content\": \"hi\"\n}"
        );
    }

    #[test]
    fn real_templates_render_long_conversations_within_the_limits() {
        let format = PromptFormat::from_tokenizer_config_json(SMOLLM2_CONFIG).expect("loads");
        // 4000 short messages, then two of 4 MiB (the largest message the app accepts).
        let many: Vec<Message> = (0..4000)
            .map(|i| {
                if i % 2 == 0 {
                    Message::user(format!("question {i}"))
                } else {
                    Message::assistant(format!("answer {i}"))
                }
            })
            .collect();
        let out = format
            .render(&many, true)
            .expect("a long conversation renders");
        assert!(out.ends_with("<|im_start|>assistant\n"));
        let big = [
            Message::user("u".repeat(4 << 20)),
            Message::assistant("a".repeat(4 << 20)),
        ];
        let out = format.render(&big, true).expect("huge messages render");
        assert!(out.len() > 8 << 20);
        // A template that filters and checks every message (as Mistral's and DeepSeek's do)
        // on a long conversation.
        let heavy = jinja(
            "{%- set ns = namespace(sys='', kept=[]) -%}{%- for m in messages -%}\
             {%- if m['role'] == 'system' %}{% set ns.sys = m['content'] %}{% endif -%}\
             {%- if m['role'] not in ['tool'] and not m.get('tool_calls') %}{% set ns.kept = ns.kept + [m] %}{% endif -%}\
             {%- endfor -%}{{ bos_token }}{{ ns.sys }}\
             {%- for m in ns.kept -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
             {{ raise_exception('roles must alternate') }}{%- endif -%}\
             {%- set c = m['content'] -%}{%- if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif -%}\
             {{ '[' + m['role'] + ']' + c.strip() + eos_token }}{%- endfor -%}",
        );
        heavy
            .render(&many, true)
            .expect("a heavy template on 4000 messages");
        heavy.render(&big, true).expect("a heavy template on 8 MiB");
    }

    #[test]
    fn an_oversized_config_is_refused_before_it_is_read() {
        let dir = std::env::temp_dir().join(format!("tptt-engine-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tokenizer_config.json");
        let file = std::fs::File::create(&path).expect("create");
        // Sparse: no disk space used.
        file.set_len(MAX_CONFIG_BYTES + 1).expect("grow");
        match TokenizerConfig::from_file(&path) {
            Err(Error::InvalidConfig { file, reason }) => {
                assert!(file.ends_with("tokenizer_config.json"), "{file}");
                assert!(reason.contains("64 MiB"), "{reason}");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_template_names_where_it_came_from() {
        let dir = std::env::temp_dir().join(format!("tptt-engine-origin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tokenizer_config.json");
        std::fs::write(
            &path,
            r#"{"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"}"#,
        )
        .expect("write");
        let format = PromptFormat::from_tokenizer_config_file(&path).expect("compiles");
        let err = format
            .render(&[Message::user("hi")], true)
            .expect_err("runs out");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        std::fs::write(dir.join("chat_template.jinja"), "{{ 'y' * 10000000000 }}").expect("write");
        let config = TokenizerConfig::from_model_dir(&dir).expect("loads");
        let err = PromptFormat::from_tokenizer_config(&config)
            .expect("compiles")
            .render(&[Message::user("hi")], true)
            .expect_err("runs out");
        assert!(err.to_string().contains("chat_template.jinja"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
