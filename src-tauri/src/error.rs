//! The error every command returns: [`CommandError`], serialized as `{ kind, message }`
//! (docs/ipc.md, "Error kinds").
//!
//! Library errors (store, hub, engine, model) are sorted into an [`ErrorKind`] the UI can act on
//! and a message for people; the library error itself, with its source chain, goes to the log
//! (`tracing`), not to the UI. Hub and engine messages are written for users and carry no
//! secrets (the hub never puts the token in an error), so their `Display` is the message.

use serde::Serialize;
use ts_rs::TS;

/// What kind of failure, as the UI branches on it (docs/ipc.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No model is chosen, or the chosen variant is not (any more) in the cache.
    NoModel,
    /// The chosen model could not be loaded (files damaged, unsupported, device unavailable).
    ModelLoad,
    /// A download failed (a corrupt file, a repository that is not usable).
    Download,
    /// The hub cannot be reached.
    Network,
    /// A gated or private repository needs a (valid) Hugging Face token.
    Auth,
    /// The disk is full.
    DiskFull,
    /// A settings value is out of range; the message names the field.
    InvalidSettings,
    /// Not an `owner/name` repository id.
    InvalidRepoId,
    /// A folder that holds no TPTT variant.
    NotATpttRepo,
    /// The conversation, message, repository or variant does not exist.
    NotFound,
    /// A generation (or this download) is already running.
    Busy,
    /// The conversation database failed.
    Database,
    /// Generation failed.
    Generation,
    /// The message is larger than the app accepts.
    InputTooLong,
    /// Anything else (a bug): the log has the detail.
    Internal,
}

/// A command's failure: `{ kind, message }` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// For people: what happened and the way forward.
    pub message: String,
}

/// `Result` of a command.
pub type CmdResult<T> = Result<T, CommandError>;

impl CommandError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// `internal`, logging `detail` (never sent).
    pub fn internal(context: &str, detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "{context}");
        Self::new(
            ErrorKind::Internal,
            format!("{context}. The log has the details."),
        )
    }

    /// A store error, sorted (module doc).
    pub fn store(e: tptt_store::Error) -> Self {
        use tptt_store::Error as E;
        tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "store error");
        match e {
            E::ConversationNotFound(id) => Self::new(ErrorKind::NotFound, format!("Conversation {id} does not exist (it may have been deleted).")),
            E::MessageNotFound(id) => Self::new(ErrorKind::NotFound, format!("Message {id} does not exist (it may have been deleted).")),
            E::MemoryNotFound(id) => Self::new(ErrorKind::NotFound, format!("Memory {id} does not exist (it may have been deleted).")),
            E::DiskFull(_) => Self::new(ErrorKind::DiskFull, "The disk is full: the change was not saved, nothing saved before was lost. Free some space and try again."),
            E::Busy(_) => Self::new(ErrorKind::Database, "Another program keeps the conversation database locked. Close it (or another copy of TPTT Chat) and try again."),
            E::Damaged(_) | E::Corrupt { .. } => Self::new(
                ErrorKind::Database,
                "The conversation database is damaged. Restart TPTT Chat: it moves the damaged file aside (kept for recovery) and starts a new one.",
            ),
            E::Malformed(row) => Self::new(ErrorKind::Database, format!("A stored row cannot be read ({row}); the others are intact.")),
            other => Self::new(ErrorKind::Database, format!("The conversation database failed: {other}")),
        }
    }

    /// A hub error, sorted (module doc).
    pub fn hub(e: tptt_hub::Error) -> Self {
        use tptt_hub::Error as E;
        tracing::warn!(error = %e, "hub error");
        let message = e.to_string();
        let kind = match &e {
            E::Network { .. } | E::Http { .. } | E::InvalidEndpoint { .. } => ErrorKind::Network,
            E::Unauthorized { .. } => ErrorKind::Auth,
            E::NotFound { .. } | E::VariantNotFound { .. } => ErrorKind::NotFound,
            E::DiskFull { .. } => ErrorKind::DiskFull,
            E::InvalidRepoId(_) => ErrorKind::InvalidRepoId,
            E::NotCached { .. } => ErrorKind::NoModel,
            E::Busy { .. } => ErrorKind::Busy,
            _ => ErrorKind::Download,
        };
        Self::new(kind, message)
    }

    /// A model that failed to load.
    pub fn model_load(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, what, "model load failed");
        Self::new(ErrorKind::ModelLoad, format!("{what} could not be loaded: {e}. Download the variant again, or choose another one."))
    }
}

impl From<tptt_store::Error> for CommandError {
    fn from(e: tptt_store::Error) -> Self {
        Self::store(e)
    }
}

impl From<tptt_hub::Error> for CommandError {
    fn from(e: tptt_hub::Error) -> Self {
        Self::hub(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_kind_and_message() {
        let e = CommandError::new(
            ErrorKind::InvalidSettings,
            "sampling.topP must be in (0, 1]",
        );
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"kind": "invalid_settings", "message": "sampling.topP must be in (0, 1]"})
        );
        for (kind, name) in [
            (ErrorKind::NotATpttRepo, "not_a_tptt_repo"),
            (ErrorKind::DiskFull, "disk_full"),
            (ErrorKind::NoModel, "no_model"),
        ] {
            assert_eq!(
                serde_json::to_value(kind).expect("json"),
                serde_json::json!(name)
            );
        }
    }

    #[test]
    fn store_errors_are_sorted() {
        let e = CommandError::store(tptt_store::Error::ConversationNotFound(
            tptt_store::ConversationId(7),
        ));
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = CommandError::hub(tptt_hub::Error::InvalidRepoId("a b".into()));
        assert_eq!(e.kind, ErrorKind::InvalidRepoId);
        let e = CommandError::hub(tptt_hub::Error::Unauthorized {
            repo_id: "m/l".into(),
            status: 401,
            token_sent: false,
        });
        assert_eq!(e.kind, ErrorKind::Auth);
    }
}
