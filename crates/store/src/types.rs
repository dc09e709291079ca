//! The values the store reads and writes: ids, timestamps, roles and statuses, per-conversation
//! settings, the model identity snapshots are keyed by, and [`Listing`].
//!
//! These are plain data with serde derives for export; they know nothing of the UI (the desktop
//! app has its own camelCase DTOs).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::MalformedRow;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A conversation's id (SQLite rowid; never reused after a delete).
    ConversationId
);
id_type!(
    /// A message's id (SQLite rowid; never reused after a delete).
    MessageId
);
id_type!(
    /// A state snapshot's id.
    SnapshotId
);
id_type!(
    /// A primed memory's id (never reused after a delete).
    MemoryId
);

/// A point in time: milliseconds since the Unix epoch, UTC. Serialized as RFC 3339
/// (`2023-11-14T22:13:20.000Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current time from the system clock (0 if the clock is before 1970).
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// `YYYY-MM-DD HH:MM:SS UTC`, for people (the Markdown export).
    pub fn to_human(self) -> String {
        let (y, mo, d, h, mi, s, _) = self.civil();
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
    }

    /// Calendar fields (proleptic Gregorian, UTC): year, month, day, hour, minute, second, ms.
    fn civil(self) -> (i64, u32, u32, u32, u32, u32, u32) {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        // Howard Hinnant's `civil_from_days`.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097); // [0, 146096]
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
        let mp = (5 * doy + 2) / 153; // [0, 11], March-based
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = yoe + era * 400 + i64::from(m <= 2);
        (y, m, d, sod / 3600, sod / 60 % 60, sod % 60, ms)
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 with milliseconds, `Z` suffix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s, ms) = self.civil();
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions to the model (a system prompt kept in the transcript).
    System,
    /// The person using the app.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The name stored in the database (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(format!(
                "unknown role `{other}` (expected system, user or assistant)"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a message is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Written in full: a user's message, or an answer that ended normally.
    #[default]
    Complete,
    /// An answer that was stopped (saved with its stats), is still streaming (no stats), or was
    /// cut short when the app ended (its `error` is [`INTERRUPTED`](crate::messages::INTERRUPTED));
    /// the text is what had been generated.
    Partial,
    /// An answer whose generation failed; the text is what had been generated, the message's
    /// `error` says why.
    Error,
}

impl MessageStatus {
    /// The name stored in the database (`complete`, `partial`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Complete => "complete",
            MessageStatus::Partial => "partial",
            MessageStatus::Error => "error",
        }
    }
}

impl FromStr for MessageStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "complete" => Ok(MessageStatus::Complete),
            "partial" => Ok(MessageStatus::Partial),
            "error" => Ok(MessageStatus::Error),
            other => Err(format!(
                "unknown message status `{other}` (expected complete, partial or error)"
            )),
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sampling parameters of a conversation. Every field is optional: `None` means "the app's
/// default". Names follow `tptt_engine::SamplingParams`; the engine validates the values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingSettings {
    /// Softmax temperature; 0 means greedy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Top-k filter; 0 disables it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Nucleus threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Min-p filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Repetition penalty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens the penalty looks at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<u32>,
    /// Random seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Upper bound on generated tokens per answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<u32>,
}

/// Per-conversation settings, stored as JSON in `conversations.settings`.
///
/// Keys this version does not know (written by a newer one) are kept in [`extra`](Self::extra)
/// and written back unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConversationSettings {
    /// System prompt sent before the conversation; `None` uses the app's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Softmax window (tokens kept in the attention KV cache); `None` uses the model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
    /// The model (repo id or folder) this conversation uses; `None` uses the app's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_repo: Option<String>,
    /// Its variant (set together with `model_repo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Sampling parameters.
    pub sampling: SamplingSettings,
    /// Unknown keys, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What a state snapshot belongs to: a snapshot is usable only by exactly this model, variant
/// and config (mirrors `tptt_engine::ModelIdentity`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelKey {
    /// Hugging Face repo id or local folder.
    pub model: String,
    /// Variant name.
    pub variant: String,
    /// The engine's identity of the loaded numerics: its config hash and weights fingerprint
    /// (`ModelIdentity::numerics_key`).
    pub config_hash: String,
}

impl ModelKey {
    /// A key from its three parts.
    pub fn new(
        model: impl Into<String>,
        variant: impl Into<String>,
        config_hash: impl Into<String>,
    ) -> Self {
        Self {
            model: model.into(),
            variant: variant.into(),
            config_hash: config_hash.into(),
        }
    }
}

/// The rows a query could read, and the ones it had to skip.
///
/// A malformed row (see [`MalformedRow`]) does not hide the others: it is left out of
/// [`items`](Self::items), reported in [`skipped`](Self::skipped), and logged.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing<T> {
    /// The rows that read, in the query's order.
    pub items: Vec<T>,
    /// The rows that did not, with the reason.
    pub skipped: Vec<MalformedRow>,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

impl<T> Listing<T> {
    /// Collects decoded rows, logging each malformed one.
    pub(crate) fn collect(rows: impl IntoIterator<Item = Result<T, MalformedRow>>) -> Self {
        let mut out = Listing::default();
        for row in rows {
            match row {
                Ok(item) => out.items.push(item),
                Err(bad) => {
                    tracing::warn!(table = bad.table, id = ?bad.id, reason = %bad.reason, "skipping a malformed row");
                    out.skipped.push(bad);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339_and_for_people() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
        ];
        for (ms, expected) in cases {
            assert_eq!(Timestamp(ms).to_string(), expected, "{ms}");
        }
        assert_eq!(
            Timestamp(1_700_000_000_123).to_human(),
            "2023-11-14 22:13:20 UTC"
        );
    }

    #[test]
    fn settings_keep_unknown_keys() {
        let json =
            r#"{"system_prompt":"Be brief.","sampling":{"temperature":0.5},"future":{"x":1}}"#;
        let s: ConversationSettings = serde_json::from_str(json).expect("parses");
        assert_eq!(s.system_prompt.as_deref(), Some("Be brief."));
        assert_eq!(s.sampling.temperature, Some(0.5));
        assert_eq!(s.model_repo, None, "a record without a model of its own");
        let back: serde_json::Value = serde_json::to_value(&s).expect("serializes");
        assert_eq!(back["future"]["x"], 1);
        assert!(
            back.get("model_repo").is_none(),
            "nothing written for the app's model"
        );
    }
}

/// A document attached to a user message (schema 5): its text is the part `start..end` (byte
/// offsets) of the message's content — the model reads it with the message —, shown as the
/// attachment rather than as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The file's name.
    pub name: String,
    /// `text`, `markdown`, `code`, `html` or `pdf`.
    pub kind: String,
    /// The file's size on disk.
    pub bytes: u64,
    /// Where its text starts in the content.
    pub start: usize,
    /// Where its text ends in the content.
    pub end: usize,
}

impl Attachment {
    /// Whether its range is a valid part of `content` (within it, on character boundaries).
    pub fn fits(&self, content: &str) -> bool {
        self.start <= self.end
            && self.end <= content.len()
            && content.is_char_boundary(self.start)
            && content.is_char_boundary(self.end)
    }
}
