//! Chat turns on a carried state: feed only what each turn adds.
//!
//! A [`Session`](crate::Session) keeps everything it has read in its state, so a chat turn must
//! not re-read the conversation. [`ChatTranscript`] remembers *which rendered text* the session
//! has read — as a [`ReadMark`] (the length and a hash of that text, small enough to store next
//! to a state snapshot) — and [`ChatTranscript::turn`] renders the whole conversation with the
//! prompt format, then:
//!
//! * if the rendering starts with the text already read, the turn feeds only the suffix beyond
//!   it (the new user message, the generation prompt, and whatever the template closes the
//!   previous answer with that the model did not generate itself);
//! * otherwise (the state was restored without a mark, the last answer was stopped or cut short,
//!   the template re-renders earlier turns differently, the system prompt changed), the turn
//!   feeds the system messages and the messages the session has not read, rendered on their own:
//!   the state keeps the earlier turns, in the form it read them.
//!
//! After generating, [`ChatTranscript::record`] extends the mark with the raw answer (special
//! tokens included) when the answer ended normally, and forgets it otherwise.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::session::FinishReason;
use crate::template::{Message, PromptFormat, Role};

/// What a session has read of a rendered conversation: its length in bytes and a 64-bit FNV-1a
/// hash of its bytes. Not cryptographic: it only tells whether a new rendering starts with the
/// same text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadMark {
    /// Bytes of rendered text read.
    pub len: usize,
    /// FNV-1a 64 of those bytes.
    pub hash: u64,
}

impl ReadMark {
    /// The mark of `text`.
    pub fn of(text: &str) -> Self {
        Self {
            len: text.len(),
            hash: fnv1a(text.as_bytes()),
        }
    }

    /// Whether `text` starts with the text this mark was taken of.
    pub fn is_prefix_of(&self, text: &str) -> bool {
        text.len() >= self.len
            && text.is_char_boundary(self.len)
            && fnv1a(&text.as_bytes()[..self.len]) == self.hash
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One turn's prompt text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    /// The whole conversation rendered, ending with the generation prompt.
    pub full: String,
    /// What to feed the session: the suffix of `full` beyond what it read, or the fallback.
    pub text: String,
    /// Whether `text` is a suffix of `full` (the session's text stays known).
    pub extends: bool,
}

/// The rendered text a session has read (module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTranscript {
    read: Option<ReadMark>,
}

impl ChatTranscript {
    /// A fresh session: nothing read yet.
    pub fn fresh() -> Self {
        Self {
            read: Some(ReadMark::of("")),
        }
    }

    /// A session whose text is unknown (a state loaded without its mark).
    pub fn unknown() -> Self {
        Self { read: None }
    }

    /// A session that read the text of `mark` (`None`: unknown).
    pub fn from_mark(mark: Option<ReadMark>) -> Self {
        Self { read: mark }
    }

    /// The mark of the text read, if known.
    pub fn mark(&self) -> Option<ReadMark> {
        self.read
    }

    /// Forget the text read (a turn was cut short while feeding).
    pub fn forget(&mut self) {
        self.read = None;
    }

    /// The prompt for answering the last of `messages` (the whole conversation, system messages
    /// included). `unread` is how many messages at the end the session has not read; it is
    /// used only by the fallback (module doc), which renders the system messages and those.
    pub fn turn(
        &self,
        format: &PromptFormat,
        messages: &[Message],
        unread: usize,
    ) -> Result<ChatTurn> {
        let full = format.render(messages, true)?;
        if let Some(mark) = self.read.filter(|m| m.is_prefix_of(&full)) {
            let text = full[mark.len..].to_string();
            return Ok(ChatTurn {
                full,
                text,
                extends: true,
            });
        }
        let unread = unread.clamp(1, messages.len().max(1));
        let start = messages.len().saturating_sub(unread);
        let mut turn: Vec<Message> = messages[..start]
            .iter()
            .filter(|m| m.role == Role::System)
            .cloned()
            .collect();
        turn.extend(messages[start..].iter().cloned());
        let text = format.render(&turn, true)?;
        Ok(ChatTurn {
            full,
            text,
            extends: false,
        })
    }

    /// After the answer to `turn`: `raw_answer` is the generated ids decoded with their special
    /// tokens. The mark extends to `turn.full + raw_answer` when the turn extended the text
    /// read and the answer ended on EOS or the token limit; otherwise it is forgotten.
    pub fn record(&mut self, turn: &ChatTurn, raw_answer: &str, finish: &FinishReason) {
        self.read = match finish {
            FinishReason::Eos | FinishReason::MaxTokens if turn.extends => {
                let mut text = String::with_capacity(turn.full.len() + raw_answer.len());
                text.push_str(&turn.full);
                text.push_str(raw_answer);
                Some(ReadMark::of(&text))
            }
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::ChatTemplate;

    fn chatml() -> PromptFormat {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                   {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        PromptFormat::Jinja(ChatTemplate::new(src, Default::default()).expect("template"))
    }

    #[test]
    fn marks_detect_prefixes() {
        let m = ReadMark::of("héllo");
        assert!(m.is_prefix_of("héllo world"));
        assert!(m.is_prefix_of("héllo"));
        assert!(!m.is_prefix_of("hello world"));
        assert!(!m.is_prefix_of("hé"));
        assert!(ReadMark::of("").is_prefix_of("anything"));
        // A length inside a multi-byte character is not a prefix.
        assert!(!ReadMark { len: 2, hash: 0 }.is_prefix_of("héllo"));
    }

    #[test]
    fn a_turn_feeds_only_what_it_adds() {
        let f = chatml();
        let mut t = ChatTranscript::fresh();
        let mut msgs = vec![Message::system("Be brief."), Message::user("Hi")];
        let first = t.turn(&f, &msgs, 2).expect("turn");
        assert!(first.extends);
        assert_eq!(first.text, first.full);
        t.record(&first, "Hello!<|im_end|>", &FinishReason::Eos);

        msgs.push(Message::assistant("Hello!"));
        msgs.push(Message::user("How are you?"));
        let second = t.turn(&f, &msgs, 1).expect("turn");
        assert!(second.extends);
        assert_eq!(
            second.text,
            "\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_stopped_answer_falls_back_to_the_new_turn() {
        let f = chatml();
        let mut t = ChatTranscript::fresh();
        let mut msgs = vec![Message::system("S"), Message::user("Hi")];
        let first = t.turn(&f, &msgs, 2).expect("turn");
        t.record(&first, "Hel", &FinishReason::Cancelled);
        assert_eq!(t.mark(), None);
        msgs.push(Message::assistant("Hel"));
        msgs.push(Message::user("Go on"));
        let second = t.turn(&f, &msgs, 1).expect("turn");
        assert!(!second.extends);
        assert_eq!(
            second.text,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nGo on<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_restored_mark_keeps_extending() {
        let f = PromptFormat::Alpaca;
        let mut t = ChatTranscript::fresh();
        let mut msgs = vec![Message::user("One")];
        let first = t.turn(&f, &msgs, 1).expect("turn");
        t.record(&first, "Uno</s>", &FinishReason::Eos);
        let restored = ChatTranscript::from_mark(t.mark());
        msgs.push(Message::assistant("Uno"));
        msgs.push(Message::user("Two"));
        let second = restored.turn(&f, &msgs, 1).expect("turn");
        // Alpaca renders the answer without the EOS text the model generated: no extension.
        assert_eq!(
            second.extends,
            second.full.starts_with(&(first.full.clone() + "Uno</s>"))
        );
        let unknown = ChatTranscript::unknown().turn(&f, &msgs, 1).expect("turn");
        assert!(!unknown.extends);
        assert!(unknown.text.contains("Two") && !unknown.text.contains("One"));
    }
}
