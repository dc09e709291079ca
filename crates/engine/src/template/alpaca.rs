//! The built-in Alpaca format, for models without a chat template (TPTT fine-tunes of base
//! models).
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

use super::{Message, Role};

/// The default Alpaca preamble (the original Stanford Alpaca "no input" prompt).
pub const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. \
Write a response that appropriately completes the request.";

/// The Alpaca preamble used when an input accompanies the instruction.
pub const ALPACA_PREAMBLE_WITH_INPUT: &str = "Below is an instruction that describes a task, \
paired with an input that provides further context. \
Write a response that appropriately completes the request.";

/// Section headers that end an Alpaca reply: a model that starts a new section has finished.
pub const ALPACA_STOP_STRINGS: &[&str] = &["### Instruction:", "### Input:", "### Response:"];

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

#[cfg(test)]
mod tests {
    use super::super::PromptFormat;
    use super::*;
    use crate::error::Error;

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
}
