//! Chat turns: send, regenerate, edit-and-resend, stop — and the conversation memory rule.
//!
//! # A turn
//! The command checks what it can at once (the message size, a model is chosen and its files
//! are here, no other generation runs), commits the user's message and an empty `partial`
//! answer to the store, starts a turn thread and returns the ids. The turn thread loads the
//! model if needed, finds the conversation's memory (below), feeds what the turn adds
//! ([`tptt_engine::ChatTranscript`]) and generates on the engine's thread. A long prompt's
//! reading goes to the UI as [`ChatEvent::Prefill`]s (at most every [`PREFILL_EVENT_INTERVAL`],
//! each with the memory meter after what was read, so the meter follows the model); tokens
//! stream to the UI's channel as [`ChatEvent::Token`]s while the answer's text is saved every
//! [`PARTIAL_SAVE_INTERVAL`] (a crash loses at most that much). The end is saved first, then
//! announced: `done` (complete), `stopped` (`stop_generation`: the partial text is kept) or
//! `error` (the partial text is kept with status `error`).
//!
//! Rendering the conversation with the chat template (bounded by the engine's render limits)
//! and tokenizing it run on a helper thread while the turn thread polls Stop, so a huge paste
//! is stoppable at once: the answer is then an empty `partial` one and the memory is as it was.
//! A bug never wedges the app: a panic in the engine's job comes back as an error (the engine
//! thread lives on), a panic on the turn thread is caught around the turn, and both end the
//! turn like an error — partial text saved with status `error`, slot released, an `error`
//! event (kind `internal`) — with the memory the turn had taken dropped, so the next turn
//! rebuilds it from the last snapshot or the text. If the engine thread is gone anyway, the
//! cached model is dropped and the next turn loads it again.
//!
//! # The memory rule
//! A conversation's memory is the TPTT state that has read it. After each turn the state is
//! saved to a snapshot file (`<data>/states/<conversation>/<answer id>.safetensors`, which
//! records what rendered text it read — its `ReadMark`, checksummed with the rest —, and a
//! `.json` sidecar, written atomically, with its memory meter), recorded in the store under
//! the model identity (model, variant, config hash). The file is a paged snapshot: its softmax
//! window lies in KV pages (`<data>/states/kv-pages/`, see [`pages_dir`]) shared with the
//! conversation's earlier turns, so a turn's snapshot costs its recurrent state plus the turn's
//! new positions, and one is kept after every answer (the latest [`SNAPSHOTS_KEPT`]): a branch
//! from any answer, or regenerating any answer, restarts from the state before it without
//! re-reading. Pages no snapshot refers to are removed at start-up
//! ([`crate::cleanup::sweep_unused_pages`]). For the next turn:
//! * the state held in memory (the last conversation used) is reused when it belongs to this
//!   conversation and to the loaded model's identity;
//! * else the latest snapshot recorded under the loaded model's **same model, variant and
//!   config hash** is loaded: continuing needs no re-reading of the history;
//! * else, for a chat started from a saved memory ([`crate::memories`]) of that model, variant
//!   and config, that memory, on which the whole conversation is read (all of it is new to it);
//! * else (another model, variant or config — a switch in the settings, which takes effect for
//!   the next message —, or a snapshot that is missing, corrupt or refused) the memory is
//!   rebuilt from the stored text: the whole conversation is fed again. Once that turn is
//!   saved, the snapshots of other identities are deleted.
//!
//! The softmax window setting applies to memories created from then on (new conversations,
//! rebuilt ones); an existing memory keeps the window it was built with (the meter shows it).
//!
//! # Memory health and the way out
//! Once a turn's prompt is read, the session's surprise record
//! ([`tptt_engine::health::Surprise`]) goes to the UI in a [`ChatEvent::Memory`] before any of
//! the answer; a `broken` verdict is logged too, and generation goes on (the user decides, and
//! Stop is there). [`reset_memory`] is the way out ("continue with a fresh memory"): it drops
//! the held memory and the conversation's snapshots and marks the conversation (a setting,
//! [`fresh_memory_key`], so it survives a restart). The next turn then rebuilds the memory
//! from the text reading only its tail — the last `min(window, FRESH_MEMORY_TOKENS)` tokens of
//! the rendered conversation — so the linear memory starts empty and the long paste that
//! drowned it is not read again; the mark goes once that turn's snapshot is saved. The tail is
//! bounded by [`FRESH_MEMORY_TOKENS`] as well as by the window because an untrained memory can
//! drown the model well inside the window: the demo model's window is 8192 tokens, its memory
//! breaks past ~3k, and re-reading a 5k-token paste within the window broke it again.

mod branch;
pub mod held;
mod memory;
pub(crate) mod model;
mod prepare;
mod replace;
mod slot;
mod turn;
mod versions;

#[cfg(test)]
mod test_hooks;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tauri::ipc::Channel;
use tptt_store::{ConversationId, Message, MessageId, NewMessage, Role};

use crate::chat_settings;
use crate::dto::ChatEvent;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::state::{lock, AppState};

pub use branch::branch;
pub use held::CachedSession;
pub use memory::{
    fresh_memory_key, invalidate_session, memory_info, meta_path, pages_dir, read_meta,
    remove_snapshot_files, reset_memory, set_settings, share_file, state_disk_bytes, SnapshotMeta,
};
pub use model::{target, Target};
pub use slot::Slot;
pub use turn::{spawn_turn, TurnCtx};
pub use versions::switch_version;

use model::find_target;
use replace::{forward_events, Replacing};

/// The largest message accepted, in bytes (4 MiB). TPTT has no context limit — what leaves
/// the softmax window lives on in the recurrent memory —, so a long paste is accepted and fed
/// in blocks (stoppable); this bound only keeps one message within what the UI and the
/// database handle comfortably. A longer one is refused with `input_too_long` before anything
/// is stored; the UI keeps it in the message box.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// How often a streaming answer's text is saved (`AppConfig::partial_save_every`).
pub const PARTIAL_SAVE_INTERVAL: Duration = Duration::from_secs(2);
/// Least time between two `prefill` events of a turn: a fast model reads a block in
/// milliseconds, and every event costs the webview a render that would take CPU from the model.
pub const PREFILL_EVENT_INTERVAL: Duration = Duration::from_millis(250);
/// Snapshots kept per conversation: one per answer, the latest this many (a turn's snapshot
/// costs its recurrent state plus its new positions' keys and values: the softmax window lies
/// in KV pages shared between turns).
pub const SNAPSHOTS_KEPT: u32 = 1000;
/// Most tokens a memory rebuilt after [`reset_memory`] reads (when its window is smaller, the
/// window): the span the health takes as a conversation's start
/// ([`tptt_engine::health::EARLY_POSITIONS`]), over which even the untrained demo's memory keeps
/// the model sane (perplexity 26 there, 200 past 3k tokens).
pub const FRESH_MEMORY_TOKENS: usize = tptt_engine::health::EARLY_POSITIONS;

/// Refuses an empty or oversized message (nothing is stored then).
pub fn check_content(content: &str) -> CmdResult<()> {
    if content.trim().is_empty() {
        return Err(CommandError::new(
            ErrorKind::InvalidSettings,
            "content: the message is empty",
        ));
    }
    if content.len() > MAX_MESSAGE_BYTES {
        return Err(CommandError::new(
            ErrorKind::InputTooLong,
            format!(
                "The message is {:.1} MiB; at most {} MiB can be sent at once. Send it in parts: the model's memory keeps what it has read.",
                content.len() as f64 / (1 << 20) as f64,
                MAX_MESSAGE_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

/// The settings a turn of `conversation` uses: its own over the app's (`not_found` for an
/// unknown conversation).
async fn turn_settings(
    state: &AppState,
    conversation: ConversationId,
) -> CmdResult<chat_settings::Effective> {
    let c = state.store.get_conversation(conversation).await?;
    Ok(chat_settings::effective(&state.settings(), &c.settings))
}

/// `send_message`.
pub async fn send(
    state: &AppState,
    conversation: ConversationId,
    content: String,
    channel: Channel<ChatEvent>,
) -> CmdResult<(MessageId, MessageId)> {
    check_content(&content)?;
    send_new(
        state,
        conversation,
        NewMessage::new(Role::User, content),
        channel,
    )
    .await
}

/// `send_document`: the document at `path` ([`crate::documents`]), read and checked before
/// anything is stored, sent with `question` (which may be empty) as one message.
pub async fn send_document(
    state: &AppState,
    conversation: ConversationId,
    path: std::path::PathBuf,
    question: String,
    channel: Channel<ChatEvent>,
) -> CmdResult<(MessageId, MessageId)> {
    state.store.get_conversation(conversation).await?;
    let doc = crate::state::blocking(move || crate::documents::read(&path)).await?;
    let (content, attachment) = crate::documents::message_content(&doc, &question);
    check_content(&content)?;
    tracing::info!(
        conversation = conversation.0,
        kind = doc.kind,
        bytes = doc.bytes,
        text = doc.text.len(),
        "document attached"
    );
    let message = NewMessage {
        attachment: Some(attachment),
        ..NewMessage::new(Role::User, content)
    };
    send_new(state, conversation, message, channel).await
}

/// A user message (checked) and its answer: stored, then the turn started.
async fn send_new(
    state: &AppState,
    conversation: ConversationId,
    message: NewMessage,
    channel: Channel<ChatEvent>,
) -> CmdResult<(MessageId, MessageId)> {
    let (slot, cancel) = Slot::acquire(state, conversation)?;
    let settings = turn_settings(state, conversation).await?;
    let target = find_target(state, &settings).await?;
    let user = state.store.add_message(conversation, &message).await?;
    let answer = state
        .store
        .add_message(conversation, &NewMessage::streaming_answer())
        .await?;
    let ids = (user.id, answer.id);
    spawn_turn(
        TurnCtx {
            state: state.clone(),
            conversation,
            answer,
            channel,
            cancel,
            target,
            settings,
        },
        slot,
    )?;
    Ok(ids)
}

/// `regenerate`: the last answer is replaced (a conversation that ends with the user's
/// message gets its answer).
///
/// The old answer stays — in the store and, after a restart, on screen — until the new one
/// has started: the new answer is stored after it
/// ([`Store::begin_replacing_answer`](tptt_store::Store::begin_replacing_answer)) and takes
/// its place at its first token (or at `done`, should it end without any). A regenerate that
/// fails or is stopped before its first token (the model does not load, the template fails,
/// Stop during a long prompt...) deletes the new answer and leaves the old one as it was.
/// Once replaced, the old answer is kept as a version of its position (`switch_version`).
/// The first token is the point because before it there is no new text to show instead of the
/// old; `started` only says the model is loaded. The events pass through [`Replacing`] on
/// their way to `channel` (so it is taken untyped), and the replacement is committed before
/// the UI sees the event that caused it.
pub async fn regenerate(
    state: &AppState,
    conversation: ConversationId,
    channel: Channel<tauri::ipc::InvokeResponseBody>,
) -> CmdResult<MessageId> {
    let (slot, cancel) = Slot::acquire(state, conversation)?;
    let settings = turn_settings(state, conversation).await?;
    let target = find_target(state, &settings).await?;
    let messages = state.store.list_messages(conversation).await?.items;
    let nothing = || {
        CommandError::new(
            ErrorKind::NotFound,
            "There is no message of yours to answer in this conversation.",
        )
    };
    let last = messages.last().ok_or_else(nothing)?;
    let (answer, replacing) = match last.role {
        Role::Assistant => {
            let before = messages
                .len()
                .checked_sub(2)
                .and_then(|i| messages.get(i))
                .ok_or_else(nothing)?;
            if before.role != Role::User {
                return Err(nothing());
            }
            let r = state
                .store
                .begin_replacing_answer(conversation, last.id)
                .await?;
            // A memory that read the old answer is no start for the new one.
            invalidate_session(state, conversation, Some(last.position));
            // The turn writes the new answer as the one at the old answer's position (it reads
            // what comes before); the store moves it there once it has started.
            let answer = Message {
                position: r.old.position,
                ..r.new
            };
            let replacing = Arc::new(Replacing {
                state: state.clone(),
                conversation,
                old: r.old,
                new: answer.id,
                progress: Mutex::default(),
            });
            (answer, Some(replacing))
        }
        Role::User => {
            let answer = state
                .store
                .add_message(conversation, &NewMessage::streaming_answer())
                .await?;
            (answer, None)
        }
        Role::System => return Err(nothing()),
    };
    let id = answer.id;
    let started = spawn_turn(
        TurnCtx {
            state: state.clone(),
            conversation,
            answer,
            channel: forward_events(channel, replacing.clone()),
            cancel,
            target,
            settings,
        },
        slot,
    );
    if let Err(e) = started {
        if replacing.is_some() {
            // The turn never ran: the new answer goes, the old one stays.
            match state.store.abandon_replacing_answer(id).await {
                Ok(files) => remove_snapshot_files(&files),
                Err(se) => tracing::error!(error = %se, "cannot drop the regenerated answer"),
            }
        }
        return Err(e);
    }
    Ok(id)
}

/// `edit_and_resend`: a new message of the user's with `content` takes the place of `message`,
/// which is kept with everything after it as a version of its position, and a new answer
/// follows — one transaction
/// ([`Store::edit_and_truncate`](tptt_store::Store::edit_and_truncate)): a failure leaves the
/// conversation as it was.
pub async fn edit_and_resend(
    state: &AppState,
    conversation: ConversationId,
    message: MessageId,
    content: String,
    channel: Channel<ChatEvent>,
) -> CmdResult<(MessageId, MessageId)> {
    check_content(&content)?;
    let (slot, cancel) = Slot::acquire(state, conversation)?;
    let settings = turn_settings(state, conversation).await?;
    let target = find_target(state, &settings).await?;
    let not_yours = || {
        CommandError::new(
            ErrorKind::NotFound,
            format!(
                "Message {} is not one of your messages in this conversation.",
                message.0
            ),
        )
    };
    let m = state.store.get_message(message).await?;
    if m.conversation_id != conversation || m.role != Role::User {
        return Err(not_yours());
    }
    let edited = match state
        .store
        .edit_and_truncate(conversation, message, &content)
        .await
    {
        Ok(e) => e,
        Err(tptt_store::Error::InvalidInput(_)) => return Err(not_yours()),
        Err(e) => return Err(e.into()),
    };
    remove_snapshot_files(&edited.files);
    invalidate_session(state, conversation, Some(m.position));
    let ids = (edited.user.id, edited.answer.id);
    spawn_turn(
        TurnCtx {
            state: state.clone(),
            conversation,
            answer: edited.answer,
            channel,
            cancel,
            target,
            settings,
        },
        slot,
    )?;
    Ok(ids)
}

/// `stop_generation`: stops the conversation's running generation, if any.
pub fn stop(state: &AppState, conversation: ConversationId) {
    if let Some(r) = lock(&state.generation)
        .as_ref()
        .filter(|r| r.conversation == conversation)
    {
        r.cancel.cancel();
    }
}

/// Whether a generation runs for `conversation`.
pub fn is_generating(state: &AppState, conversation: ConversationId) -> bool {
    lock(&state.generation)
        .as_ref()
        .is_some_and(|r| r.conversation == conversation)
}
