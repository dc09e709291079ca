//! A conversation exported as Markdown (to read) or JSON (to keep or process).
//!
//! Model output is text, and both exports keep every character of it: nothing is escaped or
//! rewritten. The Markdown export adds only structure around the text: a `## Role` heading per
//! message, a note under a partial or failed answer, and — when a message leaves a code fence
//! open (an answer stopped inside a code block) — a closing fence after it, so the messages
//! that follow still render as text. The JSON export is the full record: every field of the
//! conversation and of each message, timestamps in RFC 3339.
//!
//! A conversation with a message that cannot be read is not exported (the error names the
//! row), rather than exported without it.

use serde::Serialize;

use crate::conversations::Conversation;
use crate::error::{Error, Result};
use crate::messages::Message;
use crate::types::{ConversationId, MessageStatus, Role};
use crate::Store;

/// `format` field of the JSON export.
pub const JSON_FORMAT: &str = "tptt-chat-conversation";
/// `version` field of the JSON export.
pub const JSON_VERSION: u32 = 1;

/// The JSON export's document.
#[derive(Serialize)]
struct JsonExport<'a> {
    format: &'static str,
    version: u32,
    conversation: &'a Conversation,
    messages: &'a [Message],
}

/// The fence (e.g. "```" or "~~~~") that closes a code block `text` leaves open, if any
/// (CommonMark: a fence is 3+ backticks or tildes indented by at most 3 spaces; it is closed
/// by a fence of the same character, at least as long, with nothing after it).
fn open_fence(text: &str) -> Option<String> {
    let mut open: Option<(char, usize)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start_matches(' ');
        if line.len() - trimmed.len() > 3 {
            continue;
        }
        let Some(ch) = trimmed.chars().next().filter(|c| matches!(c, '`' | '~')) else {
            continue;
        };
        let run = trimmed.chars().take_while(|&c| c == ch).count();
        if run < 3 {
            continue;
        }
        let rest = &trimmed[run..]; // `ch` is ASCII: `run` bytes
        match open {
            None => {
                // A backtick fence's info string may not contain a backtick.
                if ch == '`' && rest.contains('`') {
                    continue;
                }
                open = Some((ch, run));
            }
            Some((open_ch, open_run)) => {
                if ch == open_ch && run >= open_run && rest.trim().is_empty() {
                    open = None;
                }
            }
        }
    }
    open.map(|(ch, run)| ch.to_string().repeat(run))
}

/// Appends `text` and a blank line (adding the newline `text` may lack).
fn push_block(out: &mut String, text: &str) {
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
}

/// Appends text verbatim, then the fence it leaves open (if any) on the next line, then a
/// blank line.
fn push_text(out: &mut String, text: &str) {
    if text.is_empty() {
        return;
    }
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
    if let Some(fence) = open_fence(text) {
        out.push_str(&fence);
        out.push('\n');
    }
    out.push('\n');
}

fn heading(role: Role) -> &'static str {
    match role {
        Role::System => "## System",
        Role::User => "## User",
        Role::Assistant => "## Assistant",
    }
}

/// The Markdown document for a conversation and its messages.
pub fn to_markdown(conversation: &Conversation, messages: &[Message]) -> String {
    let mut out = String::new();
    let title = conversation.title.trim();
    let title = if title.is_empty() {
        "Untitled conversation".to_owned()
    } else {
        // A heading is one line.
        title.lines().collect::<Vec<_>>().join(" ")
    };
    push_block(&mut out, &format!("# {title}"));
    let mut meta = String::new();
    if let Some(model) = &conversation.model {
        meta.push_str(&format!("- Model: `{model}`"));
        if let Some(variant) = &conversation.variant {
            meta.push_str(&format!(", variant `{variant}`"));
        }
        meta.push('\n');
    }
    meta.push_str(&format!(
        "- Created: {}\n",
        conversation.created_at.to_human()
    ));
    meta.push_str(&format!(
        "- Updated: {}\n",
        conversation.updated_at.to_human()
    ));
    push_block(&mut out, &meta);
    if let Some(prompt) = conversation.settings.system_prompt.as_deref() {
        push_block(&mut out, "## System prompt");
        push_text(&mut out, prompt);
    }
    for message in messages {
        push_block(&mut out, heading(message.role));
        push_text(&mut out, &message.content);
        match message.status {
            MessageStatus::Complete => {}
            MessageStatus::Partial => push_block(
                &mut out,
                "*(Partial: generation was stopped before the end.)*",
            ),
            MessageStatus::Error => match message.error.as_deref() {
                Some(error) if !error.is_empty() => {
                    let error = error.lines().collect::<Vec<_>>().join(" ");
                    push_block(&mut out, &format!("*(Generation failed: {error})*"))
                }
                _ => push_block(&mut out, "*(Generation failed.)*"),
            },
        }
    }
    // One newline at the end of the file: drop the last block's separator.
    if out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// The JSON document for a conversation and its messages (pretty-printed).
pub fn to_json(conversation: &Conversation, messages: &[Message]) -> Result<String> {
    let doc = JsonExport {
        format: JSON_FORMAT,
        version: JSON_VERSION,
        conversation,
        messages,
    };
    Ok(serde_json::to_string_pretty(&doc)?)
}

impl Store {
    /// A conversation and its messages, all of them readable.
    async fn conversation_for_export(
        &self,
        id: ConversationId,
    ) -> Result<(Conversation, Vec<Message>)> {
        let conversation = self.get_conversation(id).await?;
        let listing = self.list_messages(id).await?;
        if let Some(bad) = listing.skipped.into_iter().next() {
            return Err(Error::Malformed(bad));
        }
        Ok((conversation, listing.items))
    }

    /// The conversation as Markdown (see the [module docs](self)).
    pub async fn export_markdown(&self, id: ConversationId) -> Result<String> {
        let (conversation, messages) = self.conversation_for_export(id).await?;
        Ok(to_markdown(&conversation, &messages))
    }

    /// The conversation as JSON: `{"format": "tptt-chat-conversation", "version": 1,
    /// "conversation": {...}, "messages": [...]}`.
    pub async fn export_json(&self, id: ConversationId) -> Result<String> {
        let (conversation, messages) = self.conversation_for_export(id).await?;
        to_json(&conversation, &messages)
    }
}

#[cfg(test)]
mod tests {
    use super::open_fence;

    #[test]
    fn open_fences_are_found() {
        let cases: &[(&str, Option<&str>)] = &[
            ("no code", None),
            ("```rust\nfn main() {}\n```\n", None),
            ("```rust\nfn main() {", Some("```")),
            ("````\n```\nstill inside", Some("````")),
            ("~~~\ncode\n~~~", None),
            ("~~~\ncode\n```", Some("~~~")),
            ("    ```\nindented code, not a fence", None),
            ("``` a`b\nnot a fence: backtick in info", None),
            ("```\n```` closes too\n", Some("```")),
            ("```\n````\n", None),
        ];
        for &(text, expected) in cases {
            assert_eq!(open_fence(text).as_deref(), expected, "{text:?}");
        }
    }
}
