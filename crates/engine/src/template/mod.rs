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
//!   `pad_token`. Maps keep their insertion order, as Python dicts do. A difference from Python
//!   Jinja2 that remains: a Python `None` prints as `none`.
//! - [`PromptFormat::Alpaca`] is the built-in plain-text instruction format, for models without
//!   a chat template (TPTT fine-tunes of base models).
//!
//! [`PromptFormat::from_tokenizer_config`] picks Jinja when the model ships a chat template,
//! else Alpaca. Errors never panic: a template that does not parse is
//! [`Error::TemplateSyntax`] when it is loaded, one that fails while rendering is
//! [`Error::TemplateRender`], and a `raise_exception` call is [`Error::TemplateException`]
//! carrying the template's message.
//!
//! The pieces, one concern each:
//! - [`files`]: the model's files — `tokenizer_config.json` (the template and the special
//!   tokens), `chat_template.jinja` / `chat_template.json`, `generation_config.json` (the ids that
//!   end generation); each read within [`MAX_CONFIG_BYTES`];
//! - [`jinja`]: [`ChatTemplate`], a compiled Hugging Face template and its render;
//! - [`limits`]: the bounds of one render ([`RenderLimits`], "Bounded rendering" there);
//! - `pyjson`: the `tojson` filter, Python's `json.dumps`;
//! - `strftime`: `strftime_now`, the local time as Python's `strftime` writes it;
//! - [`alpaca`]: the built-in Alpaca format.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub mod alpaca;
pub mod files;
pub mod jinja;
pub mod limits;
mod pyjson;
mod strftime;

#[cfg(test)]
mod fixtures;

pub use alpaca::{
    alpaca_with_input, render_alpaca, ALPACA_PREAMBLE, ALPACA_PREAMBLE_WITH_INPUT,
    ALPACA_STOP_STRINGS,
};
pub use files::{GenerationConfig, SpecialTokens, TokenizerConfig, MAX_CONFIG_BYTES};
pub use jinja::{ChatTemplate, INLINE_ORIGIN};
pub use limits::{
    render_stack_bytes, RenderLimits, CONTENT_BYTES_PER_FUEL, FUEL_BASE, FUEL_PER_MESSAGE,
    MAX_FUEL, OUTPUT_BASE_BYTES, OUTPUT_PER_CONTENT_BYTE, OUTPUT_PER_MESSAGE, RECURSION_LIMIT,
};

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
    use super::fixtures::SMOLLM2_CONFIG;
    use super::*;

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
    fn no_template_means_alpaca() {
        let format =
            PromptFormat::from_tokenizer_config_json(r#"{"eos_token": "</s>"}"#).expect("loads");
        assert!(matches!(format, PromptFormat::Alpaca));
        assert!(format.add_special_tokens());
        assert_eq!(format.stop_strings(), ALPACA_STOP_STRINGS);
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
}
