//! A turn's text made ready for the engine: the conversation rendered with the chat template
//! (bounded by the engine's render limits) and tokenized, on a helper thread while the turn
//! thread polls Stop.

use std::sync::Arc;
use std::time::Duration;

use tptt_engine::{CancelToken, ChatTranscript};
use tptt_store::{Message, Role};

use super::memory::tail_that_fits;
use super::turn::internal_failure;
use crate::error::{CmdResult, CommandError, ErrorKind};

pub(super) fn engine_message(m: &Message) -> tptt_engine::Message {
    let role = match m.role {
        Role::System => tptt_engine::Role::System,
        Role::User => tptt_engine::Role::User,
        Role::Assistant => tptt_engine::Role::Assistant,
    };
    tptt_engine::Message::new(role, m.content.clone())
}

/// How often a turn being prepared looks at its cancel token.
pub(super) const STOP_POLL: Duration = Duration::from_millis(25);

/// What [`prepare`] needs, owned (it runs on a helper thread).
pub(super) struct PrepareJob {
    pub(super) format: tptt_engine::PromptFormat,
    pub(super) tokenizer: Arc<tokenizers::Tokenizer>,
    pub(super) transcript: ChatTranscript,
    pub(super) messages: Vec<tptt_engine::Message>,
    pub(super) unread: usize,
    pub(super) add_special: bool,
    /// After `reset_memory`: read only this many tokens of the tail.
    pub(super) tail_limit: Option<usize>,
}

/// A turn ready to feed.
pub(super) struct Prepared {
    pub(super) turn: tptt_engine::ChatTurn,
    pub(super) ids: Vec<u32>,
    /// Tokens of the turn's text before a fresh memory's tail was cut.
    pub(super) text_tokens: usize,
}

/// Renders the turn with the chat template (bounded, see `tptt_engine::template`) and
/// tokenizes it: the slow part of a turn before the engine, seconds for a 4 MiB paste.
pub(super) fn prepare(job: PrepareJob) -> CmdResult<Prepared> {
    #[cfg(test)]
    super::test_hooks::maybe_slow_prepare(&job.messages);
    let turn = job
        .transcript
        .turn(&job.format, &job.messages, job.unread)
        .map_err(|e| {
            CommandError::new(
                ErrorKind::Generation,
                format!("The conversation cannot be put in the model's chat format: {e}"),
            )
        })?;
    let encode = |text: &str| {
        job.tokenizer
            .encode(text, job.add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| {
                CommandError::new(
                    ErrorKind::Generation,
                    format!("The message cannot be tokenized: {e}"),
                )
            })
    };
    let mut ids = encode(turn.text.as_str())?;
    let text_tokens = ids.len();
    if let Some(limit) = job.tail_limit {
        ids = tail_that_fits(ids, &encode("")?, limit);
    }
    Ok(Prepared {
        turn,
        ids,
        text_tokens,
    })
}

/// [`prepare`] on a helper thread while this one polls `cancel` every [`STOP_POLL`]: Stop is
/// answered at once (`Ok(None)`) even while a huge paste is tokenized, which cannot be
/// interrupted; the helper then finishes in the background (bounded: the message size is) and
/// its result is dropped. A panic in the helper is an internal error.
pub(super) fn prepare_stoppable(
    job: PrepareJob,
    cancel: &CancelToken,
) -> CmdResult<Option<Prepared>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tptt-prepare".into())
        .spawn(move || {
            // The turn may have been stopped and gone: nobody to tell then.
            let _ = tx.send(prepare(job));
        })
        .map_err(|e| CommandError::internal("Cannot start the tokenizing thread", e))?;
    loop {
        match rx.recv_timeout(STOP_POLL) {
            Ok(prepared) => return prepared.map(Some),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if cancel.is_cancelled() => {
                return Ok(None)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(internal_failure(
                    "the thread rendering and tokenizing the turn panicked",
                ))
            }
        }
    }
}
