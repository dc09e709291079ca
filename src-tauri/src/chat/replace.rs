//! A regenerated answer on its way (`regenerate`, module doc of [`super`]): it replaces the old
//! one at its first token, or is given up if its turn ends before it.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tauri::ipc::Channel;
use tptt_store::{ConversationId, Message, MessageId};

use super::memory::{invalidate_session, remove_snapshot_files};
use super::turn::block_on;
use crate::dto::ChatEvent;
use crate::state::{lock, AppState};

/// A regenerated answer on its way ([`regenerate`]): replaces the old one at its first token,
/// or is given up if the turn ends before it.
pub(super) struct Replacing {
    pub(super) state: AppState,
    pub(super) conversation: ConversationId,
    /// The answer being replaced (position as stored).
    pub(super) old: Message,
    /// The new answer.
    pub(super) new: MessageId,
    pub(super) progress: Mutex<ReplaceProgress>,
}

#[derive(Default)]
pub(super) struct ReplaceProgress {
    /// Replaced or given up: nothing more to do.
    pub(super) settled: bool,
    /// A token came (the new answer has started).
    pub(super) started: bool,
}

/// The one field of a [`ChatEvent`] that [`Replacing`] reads.
#[derive(Deserialize)]
pub(super) struct EventKind {
    kind: String,
}

impl Replacing {
    /// Sees each event of the turn before the UI does.
    fn on_event(&self, kind: &str) {
        let mut p = lock(&self.progress);
        if p.settled {
            return;
        }
        match kind {
            // The first token: tried once here; a failure is tried again at the end.
            "token" if !p.started => {
                p.started = true;
                p.settled = self.replace();
            }
            "done" => p.settled = self.replace(),
            "stopped" | "error" if p.started => p.settled = self.replace(),
            "stopped" | "error" => p.settled = self.give_up(),
            _ => {}
        }
    }

    /// The new answer takes the old one's place. Whether it did.
    fn replace(&self) -> bool {
        match block_on(
            self.state
                .store
                .finish_replacing_answer(self.old.id, self.new),
        ) {
            Ok(files) => {
                remove_snapshot_files(&files);
                tracing::debug!(
                    old = self.old.id.0,
                    new = self.new.0,
                    "regenerated: the new answer replaces the old one"
                );
                true
            }
            Err(e) => {
                // Both answers stay stored; the next start settles them (store doc).
                tracing::error!(error = %e, "cannot put the regenerated answer in place of the old one");
                false
            }
        }
    }

    /// The new answer ended before it started: it goes, the old one stays. Whether it went.
    fn give_up(&self) -> bool {
        match block_on(self.state.store.abandon_replacing_answer(self.new)) {
            Ok(files) => {
                remove_snapshot_files(&files);
                // The held memory (after a stop) read the abandoned turn, not the old answer.
                invalidate_session(&self.state, self.conversation, Some(self.old.position));
                tracing::info!(
                    conversation = self.conversation.0,
                    "the regenerated answer ended before its first token: the old answer is kept"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot drop the regenerated answer that did not start");
                false
            }
        }
    }
}

/// The typed channel a turn sends to: each event goes on to `raw` (the UI's), after
/// `replacing` has seen it.
pub(super) fn forward_events(
    raw: Channel<tauri::ipc::InvokeResponseBody>,
    replacing: Option<Arc<Replacing>>,
) -> Channel<ChatEvent> {
    Channel::new(move |body: tauri::ipc::InvokeResponseBody| {
        if let (Some(r), tauri::ipc::InvokeResponseBody::Json(json)) = (&replacing, &body) {
            match serde_json::from_str::<EventKind>(json) {
                Ok(e) => r.on_event(&e.kind),
                Err(e) => tracing::warn!(error = %e, "a chat event without a kind"),
            }
        }
        raw.send(body)
    })
}
