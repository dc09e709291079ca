//! The one generation slot: at most one turn runs at a time, in the whole app.

use tptt_engine::CancelToken;
use tptt_store::ConversationId;

use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::state::{lock, AppState, Running};

/// The one generation slot: held from the command's checks to the turn's end, released
/// before the final event is sent (so the UI may send again at once), and on drop.
pub struct Slot {
    state: AppState,
    armed: bool,
}

impl Slot {
    /// Takes the slot for `conversation`, or `busy`.
    pub fn acquire(
        state: &AppState,
        conversation: ConversationId,
    ) -> CmdResult<(Self, CancelToken)> {
        let mut g = lock(&state.generation);
        if g.is_some() {
            return Err(CommandError::new(
                ErrorKind::Busy,
                "A reply is still being generated: wait for it, or stop it.",
            ));
        }
        let cancel = CancelToken::new();
        *g = Some(Running {
            conversation,
            cancel: cancel.clone(),
        });
        Ok((
            Self {
                state: state.clone(),
                armed: true,
            },
            cancel,
        ))
    }

    pub(super) fn release(&mut self) {
        if self.armed {
            *lock(&self.state.generation) = None;
            self.armed = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}
