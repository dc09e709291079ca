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
//! saved to a snapshot file (`<data>/states/<conversation>/<answer id>.safetensors`, with a
//! `.json` sidecar holding what text it read and its memory meter), recorded in the store under
//! the model identity (model, variant, config hash); the last [`SNAPSHOTS_KEPT`] are kept, so
//! regenerating the last answer restarts from the state before it. For the next turn:
//! * the state held in memory (the last conversation used) is reused when it belongs to this
//!   conversation and to the loaded model's identity;
//! * else the latest snapshot recorded under the loaded model's **same model, variant and
//!   config hash** is loaded: continuing needs no re-reading of the history;
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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tauri::ipc::Channel;
use tptt::repo::VariantFiles;
use tptt_engine::session::{Event, FinishReason, GenerateOptions, Session, SessionOptions};
use tptt_engine::snapshot::{self, ModelIdentity};
use tptt_engine::{CancelToken, ChatTranscript, Job, ReadMark};
use tptt_store::{
    ConversationId, Message, MessageId, MessageStatus, MessageUpdate, ModelKey, NewMessage,
    NewSnapshot, Role,
};

use crate::dto::{ChatEvent, MemoryInfo, Stats, Verdict};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::runtime::{self, LoadKey, LoadedModel};
use crate::state::{lock, AppState, Running};

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
/// Snapshots kept per conversation (the latest two turns).
pub const SNAPSHOTS_KEPT: u32 = 2;
/// Most tokens a memory rebuilt after [`reset_memory`] reads (when its window is smaller, the
/// window): the span the health takes as a conversation's start
/// ([`tptt_engine::health::EARLY_POSITIONS`]), over which even the untrained demo's memory keeps
/// the model sane (perplexity 26 there, 200 past 3k tokens).
pub const FRESH_MEMORY_TOKENS: usize = tptt_engine::health::EARLY_POSITIONS;

/// The memory of the conversation used last, kept between turns.
pub struct CachedSession {
    /// Its conversation.
    pub conversation: ConversationId,
    /// The state (and tokens, logits).
    pub session: Session,
    /// What rendered text it read.
    pub transcript: ChatTranscript,
    /// The model it belongs to.
    pub identity: ModelIdentity,
    /// Position of the last message it read.
    pub read_position: Option<u32>,
}

/// A snapshot's sidecar: the text its state read, and its memory meter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMeta {
    /// What the state read (`None`: unknown).
    pub mark: Option<ReadMark>,
    /// Its memory.
    pub memory: MemoryInfo,
}

/// The sidecar of snapshot file `path`.
pub fn meta_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("json")
}

/// Reads a snapshot's sidecar.
pub fn read_meta(snapshot: &Path) -> Option<SnapshotMeta> {
    std::fs::read(meta_path(snapshot))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Removes snapshot files (and their sidecars) the store no longer refers to.
pub fn remove_snapshot_files(paths: &[PathBuf]) {
    for p in paths {
        for f in [p.clone(), meta_path(p)] {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %f.display(), error = %e, "cannot remove a snapshot file");
                }
            }
        }
    }
}

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

    fn release(&mut self) {
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

/// What a turn will run on: checked before anything is stored.
pub struct Target {
    key: LoadKey,
    files: VariantFiles,
}

/// The model the settings choose, with its files: `no_model` when none is chosen or its
/// files are gone.
pub fn target(state: &AppState) -> CmdResult<Target> {
    let s = state.settings();
    let (Some(repo), Some(variant)) = (s.model_repo.as_deref(), s.variant.as_deref()) else {
        return Err(CommandError::new(
            ErrorKind::NoModel,
            "No model is chosen: download a model in the model manager, then pick it and a variant in Settings.",
        ));
    };
    let model = crate::models::model_ref(&state.registry(), repo);
    let files = runtime::variant_files(&state.hub()?, &model, variant)?;
    Ok(Target {
        key: LoadKey {
            model,
            variant: variant.to_string(),
            device: s.device,
        },
        files,
    })
}

/// [`target`] on a worker thread (it reads the cache through a blocking hub client).
async fn find_target(state: &AppState) -> CmdResult<Target> {
    let st = state.clone();
    crate::state::blocking(move || target(&st)).await
}

/// Drops the cached memory of `conversation` if it read the message at `from_position` or a
/// later one (they are being deleted); `None` drops it whatever it read.
pub fn invalidate_session(
    state: &AppState,
    conversation: ConversationId,
    from_position: Option<u32>,
) {
    let mut g = lock(&state.session);
    let stale = g.as_ref().is_some_and(|c| {
        c.conversation == conversation
            && from_position.is_none_or(|from| c.read_position.is_some_and(|p| p >= from))
    });
    if stale {
        *g = None;
    }
}

/// Everything a turn thread needs.
pub struct TurnCtx {
    /// Shared state.
    pub state: AppState,
    /// The conversation.
    pub conversation: ConversationId,
    /// The answer being written (stored as an empty `partial` message).
    pub answer: Message,
    /// Where events go.
    pub channel: Channel<ChatEvent>,
    /// Stop.
    pub cancel: CancelToken,
    /// The model.
    pub target: Target,
}

/// Starts the turn thread; the slot goes with it.
pub fn spawn_turn(ctx: TurnCtx, slot: Slot) -> CmdResult<()> {
    let answer = ctx.answer.id;
    let state = ctx.state.clone();
    let started = std::thread::Builder::new()
        .name("tptt-turn".into())
        .spawn(move || run_turn(ctx, slot));
    if let Err(e) = started {
        let update = MessageUpdate {
            error: Some("the turn could not start".into()),
            ..MessageUpdate::new("", MessageStatus::Error)
        };
        if let Err(e) = tauri::async_runtime::block_on(state.store.update_message(answer, &update))
        {
            tracing::warn!(error = %e, "cannot mark the answer as failed");
        }
        return Err(CommandError::internal("Cannot start the generation", e));
    }
    Ok(())
}

/// How a turn ended normally.
struct Finished {
    stopped: bool,
    stats: Stats,
    memory: MemoryInfo,
}

/// The turn thread's body: [`drive`], then the end saved and announced (module doc). A panic
/// inside `drive` (a bug outside the engine, whose own panics come back as errors) is caught
/// here and ends the turn like an error: the partial answer is saved with status `error`, the
/// slot is released and an `error` event sent. The memory the turn had taken is not put back
/// (it may be half-updated): the next turn restores it from its snapshot or the text.
fn run_turn(ctx: TurnCtx, mut slot: Slot) {
    let partial = Arc::new(Mutex::new(String::new()));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drive(&ctx, &partial)))
        .unwrap_or_else(|payload| {
            let message = tptt_engine::error::panic_message(payload.as_ref());
            tracing::error!(%message, "the turn panicked");
            Err(internal_failure(&message))
        });
    let event = match result {
        Ok(f) if f.stopped => ChatEvent::Stopped {
            stats: f.stats,
            memory: f.memory,
        },
        Ok(f) => ChatEvent::Done {
            stats: f.stats,
            memory: f.memory,
        },
        Err(e) => {
            let text = lock(&partial).clone();
            let update = MessageUpdate {
                error: Some(e.message.clone()),
                ..MessageUpdate::new(text.clone(), MessageStatus::Error)
            };
            if let Err(se) = block_on(ctx.state.store.update_message(ctx.answer.id, &update)) {
                // The event below still carries the text to the UI.
                tracing::error!(error = %se, "cannot save the failed answer");
            }
            ChatEvent::Error {
                message: e.message,
                partial: text,
                error_kind: e.kind,
            }
        }
    };
    slot.release();
    if ctx.channel.send(event).is_err() {
        tracing::debug!("the chat channel is closed (the window went away)");
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tauri::async_runtime::block_on(f)
}

/// The error of a turn that hit a bug (a panic, in the engine or on the turn thread).
fn internal_failure(message: &str) -> CommandError {
    CommandError::new(
        ErrorKind::Internal,
        format!(
            "The answer stopped on an internal error ({message}). This is a bug: please report it. What was written so far is kept, and the conversation's memory is rebuilt for your next message."
        ),
    )
}

/// Drops `model` from the cache when it is still the one cached: its engine thread is gone, so
/// the next turn loads the model again instead of failing on a dead thread.
fn forget_model(state: &AppState, model: &Arc<LoadedModel>) {
    let mut g = lock(&state.model);
    if g.as_ref().is_some_and(|m| Arc::ptr_eq(m, model)) {
        tracing::warn!("the generation thread is gone: the model is loaded again next turn");
        *g = None;
    }
}

/// The model for `target`, loading it (and dropping another one first) when needed; with how
/// long the loading took, when it was loaded now.
fn ensure_model(
    state: &AppState,
    target: &Target,
) -> CmdResult<(Arc<LoadedModel>, Option<Duration>)> {
    {
        let mut g = lock(&state.model);
        match g.as_ref() {
            Some(m) if m.key == target.key => return Ok((m.clone(), None)),
            Some(_) => *g = None,
            None => {}
        }
    }
    // The cached memory holds the old weights (and device) alive: let both go before loading;
    // it is in its snapshot.
    *lock(&state.session) = None;
    let started = Instant::now();
    let loaded = Arc::new(runtime::load(target.key.clone(), &target.files)?);
    *lock(&state.model) = Some(loaded.clone());
    Ok((loaded, Some(started.elapsed())))
}

/// Finds the conversation's memory for `model` (module doc): the held one, its latest matching
/// snapshot, or a fresh one (then the whole conversation is fed: rebuilt from the text).
fn memory_for(
    state: &AppState,
    conversation: ConversationId,
    model: &LoadedModel,
    history: &[Message],
    answer_position: u32,
) -> CachedSession {
    if let Some(c) = lock(&state.session).take() {
        if c.conversation == conversation
            && c.identity == model.identity
            && c.read_position.is_none_or(|p| p < answer_position)
        {
            return c;
        }
        // Another conversation's (or another model's) memory: it is in its snapshot already.
    }
    let key = model_key(&model.identity);
    match block_on(state.store.latest_snapshot(conversation, &key)) {
        Ok(Some(snap)) => {
            let position = history
                .iter()
                .find(|m| m.id == snap.message_id)
                .map(|m| m.position);
            match (position, snapshot::load(model.model.clone(), &model.identity, &snap.path)) {
                (Some(p), Ok(session)) => {
                    let mark = read_meta(&snap.path).and_then(|m| m.mark);
                    tracing::info!(conversation = conversation.0, tokens = session.state.pos, "memory restored from its snapshot");
                    return CachedSession {
                        conversation,
                        session,
                        transcript: ChatTranscript::from_mark(mark),
                        identity: model.identity.clone(),
                        read_position: Some(p),
                    };
                }
                (_, Err(e)) => tracing::warn!(path = %snap.path.display(), error = %e, "snapshot refused: rebuilding the memory from the text"),
                (None, Ok(_)) => tracing::warn!("snapshot of a message outside the history: rebuilding the memory from the text"),
            }
        }
        Ok(None) => tracing::info!(
            conversation = conversation.0,
            "no snapshot for this model: the memory is built from the text"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up snapshots: rebuilding the memory from the text")
        }
    }
    let window = fresh_window(state, Some(model));
    CachedSession {
        conversation,
        session: Session::new(
            model.model.clone(),
            SessionOptions {
                window,
                ..Default::default()
            },
        ),
        transcript: ChatTranscript::fresh(),
        identity: model.identity.clone(),
        read_position: None,
    }
}

/// The softmax window of a memory created now: the setting, else the model's (when `model` is
/// given, or loaded), else unknown.
fn fresh_window(state: &AppState, model: Option<&LoadedModel>) -> Option<usize> {
    if let Some(w) = state.settings().window_size {
        return Some(w as usize);
    }
    let window_of = |m: &LoadedModel| {
        m.model
            .config_window()
            .unwrap_or(tptt_engine::session::DEFAULT_WINDOW)
    };
    match model {
        Some(m) => Some(window_of(m)),
        None => lock(&state.model).as_ref().map(|m| window_of(m)),
    }
}

/// The setting that marks a conversation whose memory was reset ([`reset_memory`]).
pub fn fresh_memory_key(conversation: ConversationId) -> String {
    format!("chat.freshMemory.{}", conversation.0)
}

/// Whether `conversation`'s next rebuilt memory reads only the tail of the text.
fn fresh_memory_marked(state: &AppState, conversation: ConversationId) -> bool {
    match block_on(
        state
            .store
            .get_setting::<bool>(&fresh_memory_key(conversation)),
    ) {
        Ok(v) => v.unwrap_or(false),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the fresh-memory mark: reading the whole text");
            false
        }
    }
}

/// Of a fresh memory's prompt `ids`, the `limit` tokens it reads: the tail, after the tokens the
/// tokenizer puts before any text (`prefix`, e.g. BOS) when `ids` starts with them.
fn tail_that_fits(ids: Vec<u32>, prefix: &[u32], limit: usize) -> Vec<u32> {
    if ids.len() <= limit {
        return ids;
    }
    let keep = if !prefix.is_empty() && prefix.len() < limit && ids.starts_with(prefix) {
        prefix.len()
    } else {
        0
    };
    let mut out = Vec::with_capacity(limit);
    out.extend_from_slice(&ids[..keep]);
    out.extend_from_slice(&ids[ids.len() - (limit - keep)..]);
    out
}

fn model_key(id: &ModelIdentity) -> ModelKey {
    ModelKey::new(id.model.clone(), id.variant.clone(), id.numerics_key())
}

fn engine_message(m: &Message) -> tptt_engine::Message {
    let role = match m.role {
        Role::System => tptt_engine::Role::System,
        Role::User => tptt_engine::Role::User,
        Role::Assistant => tptt_engine::Role::Assistant,
    };
    tptt_engine::Message::new(role, m.content.clone())
}

/// How often a turn being prepared looks at its cancel token.
const STOP_POLL: Duration = Duration::from_millis(25);

/// What [`prepare`] needs, owned (it runs on a helper thread).
struct PrepareJob {
    format: tptt_engine::PromptFormat,
    tokenizer: Arc<tokenizers::Tokenizer>,
    transcript: ChatTranscript,
    messages: Vec<tptt_engine::Message>,
    unread: usize,
    add_special: bool,
    /// After `reset_memory`: read only this many tokens of the tail.
    tail_limit: Option<usize>,
}

/// A turn ready to feed.
struct Prepared {
    turn: tptt_engine::ChatTurn,
    ids: Vec<u32>,
    /// Tokens of the turn's text before a fresh memory's tail was cut.
    text_tokens: usize,
}

/// Renders the turn with the chat template (bounded, see `tptt_engine::template`) and
/// tokenizes it: the slow part of a turn before the engine, seconds for a 4 MiB paste.
fn prepare(job: PrepareJob) -> CmdResult<Prepared> {
    #[cfg(test)]
    test_hooks::maybe_slow_prepare(&job.messages);
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
fn prepare_stoppable(job: PrepareJob, cancel: &CancelToken) -> CmdResult<Option<Prepared>> {
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

fn drive(ctx: &TurnCtx, partial: &Arc<Mutex<String>>) -> CmdResult<Finished> {
    let state = &ctx.state;
    let (model, load_time) = ensure_model(state, &ctx.target)?;
    let load_ms = load_time.map(|d| d.as_secs_f64() * 1000.0);
    let listing = block_on(state.store.list_messages(ctx.conversation))?;
    let history: Vec<Message> = listing
        .items
        .into_iter()
        .filter(|m| m.position < ctx.answer.position)
        .collect();
    let mem = memory_for(
        state,
        ctx.conversation,
        &model,
        &history,
        ctx.answer.position,
    );
    let settings = state.settings();
    let mut messages: Vec<tptt_engine::Message> = Vec::with_capacity(history.len() + 1);
    if !settings.system_prompt.trim().is_empty() {
        messages.push(tptt_engine::Message::system(settings.system_prompt.clone()));
    }
    messages.extend(history.iter().map(engine_message));
    let unread = history
        .iter()
        .filter(|m| mem.read_position.is_none_or(|p| m.position > p))
        .count();
    #[cfg(test)]
    test_hooks::maybe_panic_in_drive(&history);
    // After `reset_memory`: a fresh memory reads only the tail that fits in its window (and in
    // FRESH_MEMORY_TOKENS).
    let fresh_tail = mem.session.state.pos == 0 && fresh_memory_marked(state, ctx.conversation);
    let tail_limit = fresh_tail.then(|| {
        mem.session
            .state
            .window
            .map_or(FRESH_MEMORY_TOKENS, |w| w.min(FRESH_MEMORY_TOKENS))
    });
    let job = PrepareJob {
        format: model.format.clone(),
        tokenizer: model.tokenizer.clone(),
        transcript: mem.transcript.clone(),
        messages,
        unread,
        add_special: mem.session.tokens.is_empty() && model.format.add_special_tokens(),
        tail_limit,
    };
    let Some(Prepared {
        turn,
        ids,
        text_tokens,
    }) = prepare_stoppable(job, &ctx.cancel)?
    else {
        // Stopped while the turn was rendered or tokenized: nothing was fed, so the memory is
        // as it was and stays held; the answer is an empty partial one.
        let memory = MemoryInfo::of(&mem.session);
        block_on(state.store.update_message(
            ctx.answer.id,
            &MessageUpdate::new("", MessageStatus::Partial),
        ))?;
        *lock(&state.session) = Some(mem);
        tracing::info!(
            conversation = ctx.conversation.0,
            "stopped while the turn was prepared"
        );
        return Ok(Finished {
            stopped: true,
            stats: Stats {
                load_ms,
                ..Stats::default()
            },
            memory,
        });
    };
    if fresh_tail {
        tracing::info!(
            conversation = ctx.conversation.0,
            text_tokens,
            reading = ids.len(),
            "fresh memory: reading the tail of the conversation that fits in the window"
        );
    }
    tracing::info!(
        conversation = ctx.conversation.0,
        read = mem.session.state.pos,
        feeding = ids.len(),
        extends = turn.extends,
        "turn starts"
    );
    let before = MemoryInfo::of(&mem.session);
    let _ = ctx.channel.send(ChatEvent::Started {
        memory: before,
        prompt_tokens: ids.len() as u64,
        load_ms,
    });

    let options = GenerateOptions {
        params: settings.sampling.params(),
        eos_ids: model.eos_ids.clone(),
        ignore_eos: false,
        stop_strings: model
            .format
            .stop_strings()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        skip_special_tokens: true,
    };
    let sink_text = partial.clone();
    let channel = ctx.channel.clone();
    #[cfg(test)]
    let panic_in_sink = test_hooks::panics_in_engine(&history);
    let (conversation, fed) = (ctx.conversation, ids.len());
    let mut last_progress: Option<Instant> = None;
    let sink = Box::new(move |e: Event| match e {
        Event::Prefill {
            read,
            total,
            elapsed,
        } => {
            if last_progress.is_some_and(|t| t.elapsed() < PREFILL_EVENT_INTERVAL) {
                return;
            }
            last_progress = Some(Instant::now());
            let _ = channel.send(ChatEvent::Prefill {
                read: read as u64,
                total: total as u64,
                elapsed_ms: elapsed.as_secs_f64() * 1000.0,
                memory: before.advanced(read),
            });
        }
        Event::PromptRead { surprise } => {
            let memory = before.after_reading(fed, &surprise);
            if memory.health.verdict == Verdict::Broken {
                tracing::warn!(
                    conversation = conversation.0,
                    tokens = memory.total_tokens,
                    early_perplexity = memory.health.early_perplexity,
                    recent_perplexity = memory.health.recent_perplexity,
                    "the memory is broken: the model no longer predicts the conversation (the UI offers a fresh memory)"
                );
            }
            let _ = channel.send(ChatEvent::Memory { memory });
        }
        Event::Token {
            text, generated, ..
        } => {
            #[cfg(test)]
            test_hooks::maybe_panic_in_sink(panic_in_sink);
            lock(&sink_text).push_str(&text);
            let _ = channel.send(ChatEvent::Token {
                text,
                generated: generated as u64,
            });
        }
    });
    let CachedSession {
        session,
        mut transcript,
        identity,
        ..
    } = mem;
    let submitted = model.engine.submit(Job {
        session,
        prompt: ids,
        options,
        sink,
        cancel: ctx.cancel.clone(),
    });
    let rx = match submitted {
        Ok(rx) => rx,
        Err(e) => {
            forget_model(state, &model);
            return Err(CommandError::internal(
                "The generation thread is gone; send again to reload the model",
                e,
            ));
        }
    };
    let mut saved_len = 0;
    let result = loop {
        match rx.recv_timeout(state.config.partial_save_every) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let text = lock(partial).clone();
                if text.len() != saved_len {
                    saved_len = text.len();
                    if let Err(e) = block_on(state.store.update_message(
                        ctx.answer.id,
                        &MessageUpdate::new(text, MessageStatus::Partial),
                    )) {
                        tracing::warn!(error = %e, "cannot save the streaming answer");
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                forget_model(state, &model);
                return Err(CommandError::internal(
                    "The generation thread stopped; send again to reload the model",
                    "its result channel closed",
                ));
            }
        }
    };
    // On any failure the session is not cached: it read part of the turn (or, after a panic,
    // may be half-updated and did not come back), so its snapshot (the state before) stays the
    // memory of record, and the next turn starts from it.
    let (outcome, session) = match (result.outcome, result.session) {
        (Ok(o), Some(session)) => (o, session),
        (Err(tptt_engine::Error::Panicked { message }), _) => {
            tracing::error!(%message, "the generation job panicked");
            return Err(internal_failure(&message));
        }
        (Err(e), _) => {
            tracing::warn!(error = %e, "generation failed");
            return Err(CommandError::new(
                ErrorKind::Generation,
                format!("The answer failed: {e}"),
            ));
        }
        (Ok(_), None) => {
            return Err(internal_failure("the engine returned no session"));
        }
    };
    let stopped = outcome.finish == FinishReason::Cancelled;
    let stats = Stats {
        load_ms,
        ..Stats::from(&outcome.stats)
    };
    let mut stats_json = serde_json::to_value(&stats).unwrap_or_default();
    stats_json["finish"] = serde_json::json!(format!("{:?}", outcome.finish));
    let update = MessageUpdate {
        content: outcome.text.clone(),
        status: if stopped {
            MessageStatus::Partial
        } else {
            MessageStatus::Complete
        },
        error: None,
        token_count: u32::try_from(outcome.ids.len()).ok(),
        stats: Some(stats_json),
    };
    block_on(state.store.update_message(ctx.answer.id, &update))?;
    let raw = model
        .tokenizer
        .decode(&outcome.ids, false)
        .unwrap_or_default();
    transcript.record(&turn, &raw, &outcome.finish);
    let memory = MemoryInfo::of(&session);
    let saved = save_snapshot(
        state,
        ctx.conversation,
        ctx.answer.id,
        &session,
        &identity,
        transcript.mark(),
        memory,
    );
    match saved {
        // Not fatal: the memory is rebuilt from the text when no snapshot matches.
        Err(e) => tracing::warn!(error = %e, "cannot save the state snapshot"),
        // The fresh memory is kept: later rebuilds (another model) read the whole text again.
        Ok(()) if fresh_tail => {
            if let Err(e) = block_on(
                state
                    .store
                    .delete_setting(&fresh_memory_key(ctx.conversation)),
            ) {
                tracing::warn!(error = %e, "cannot clear the fresh-memory mark");
            }
        }
        Ok(()) => {}
    }
    if let Err(e) = block_on(state.store.set_conversation_model(
        ctx.conversation,
        Some(&identity.model),
        Some(&identity.variant),
    )) {
        tracing::warn!(error = %e, "cannot record the conversation's model");
    }
    *lock(&state.session) = Some(CachedSession {
        conversation: ctx.conversation,
        session,
        transcript,
        identity,
        read_position: Some(ctx.answer.position),
    });
    Ok(Finished {
        stopped,
        stats,
        memory,
    })
}

/// Writes the state after `message` and records it; prunes old and stale snapshots.
fn save_snapshot(
    state: &AppState,
    conversation: ConversationId,
    message: MessageId,
    session: &Session,
    identity: &ModelIdentity,
    mark: Option<ReadMark>,
    memory: MemoryInfo,
) -> Result<(), String> {
    let dir = state
        .config
        .snapshots_dir()
        .join(conversation.0.to_string());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{}.safetensors", message.0));
    let bytes = snapshot::save(session, identity, &path).map_err(|e| e.to_string())?;
    let meta = serde_json::to_vec(&SnapshotMeta { mark, memory }).map_err(|e| e.to_string())?;
    std::fs::write(meta_path(&path), meta)
        .map_err(|e| format!("{}: {e}", meta_path(&path).display()))?;
    let key = model_key(identity);
    let new = NewSnapshot {
        conversation_id: conversation,
        message_id: message,
        key: key.clone(),
        path,
        size_bytes: bytes,
        token_count: session.state.pos as u64,
    };
    block_on(state.store.record_snapshot(&new)).map_err(|e| e.to_string())?;
    let old = block_on(state.store.prune_snapshots(conversation, SNAPSHOTS_KEPT))
        .map_err(|e| e.to_string())?;
    remove_snapshot_files(&old);
    let stale = block_on(state.store.delete_stale_snapshots(conversation, &key))
        .map_err(|e| e.to_string())?;
    remove_snapshot_files(&stale);
    tracing::debug!(conversation = conversation.0, bytes, "snapshot saved");
    Ok(())
}

/// The conversation's memory meter: the held memory, else the latest snapshot's, else empty.
pub async fn memory_info(state: &AppState, conversation: ConversationId) -> MemoryInfo {
    let held = lock(&state.session)
        .as_ref()
        .filter(|c| c.conversation == conversation)
        .map(|c| MemoryInfo::of(&c.session));
    if let Some(m) = held {
        return m;
    }
    if let Ok(listing) = state.store.list_snapshots(conversation).await {
        if let Some(meta) = listing.items.last().and_then(|s| read_meta(&s.path)) {
            return meta.memory;
        }
    }
    MemoryInfo::new(0, fresh_window(state, None), 0)
}

/// `reset_memory` ("continue with a fresh memory", module doc): the held memory and the
/// snapshots of `conversation` go, and its next turn rebuilds the memory from the tail of the
/// text (at most the window, at most [`FRESH_MEMORY_TOKENS`]). Returns the (empty) meter. `busy` while a reply is generated, `not_found` for an
/// unknown conversation.
pub async fn reset_memory(state: &AppState, conversation: ConversationId) -> CmdResult<MemoryInfo> {
    state.store.get_conversation(conversation).await?;
    // The slot keeps a turn from starting (and reading the memory) while it is reset.
    let (_slot, _cancel) = Slot::acquire(state, conversation)?;
    invalidate_session(state, conversation, None);
    let files = state.store.prune_snapshots(conversation, 0).await?;
    remove_snapshot_files(&files);
    state
        .store
        .set_setting(&fresh_memory_key(conversation), &true)
        .await?;
    tracing::info!(
        conversation = conversation.0,
        snapshots = files.len(),
        "memory reset: the next turn reads the tail of the conversation"
    );
    Ok(memory_info(state, conversation).await)
}

/// `send_message`.
pub async fn send(
    state: &AppState,
    conversation: ConversationId,
    content: String,
    channel: Channel<ChatEvent>,
) -> CmdResult<(MessageId, MessageId)> {
    check_content(&content)?;
    let (slot, cancel) = Slot::acquire(state, conversation)?;
    let target = find_target(state).await?;
    state.store.get_conversation(conversation).await?;
    let user = state
        .store
        .add_message(conversation, &NewMessage::new(Role::User, content))
        .await?;
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
    let target = find_target(state).await?;
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
            remove_snapshot_files(&r.files);
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

/// A regenerated answer on its way ([`regenerate`]): replaces the old one at its first token,
/// or is given up if the turn ends before it.
struct Replacing {
    state: AppState,
    conversation: ConversationId,
    /// The answer being replaced (position as stored).
    old: Message,
    /// The new answer.
    new: MessageId,
    progress: Mutex<ReplaceProgress>,
}

#[derive(Default)]
struct ReplaceProgress {
    /// Replaced or given up: nothing more to do.
    settled: bool,
    /// A token came (the new answer has started).
    started: bool,
}

/// The one field of a [`ChatEvent`] that [`Replacing`] reads.
#[derive(Deserialize)]
struct EventKind {
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
fn forward_events(
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

/// `edit_and_resend`: `message` (one of the user's) gets `content`, everything after it goes
/// and a new answer follows — one transaction
/// ([`Store::edit_and_truncate`](tptt_store::Store::edit_and_truncate)): a failure leaves the
/// conversation as it was. The message keeps its id.
pub async fn edit_and_resend(
    state: &AppState,
    conversation: ConversationId,
    message: MessageId,
    content: String,
    channel: Channel<ChatEvent>,
) -> CmdResult<(MessageId, MessageId)> {
    check_content(&content)?;
    let (slot, cancel) = Slot::acquire(state, conversation)?;
    let target = find_target(state).await?;
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

/// Test-only hooks, compiled only into this crate's unit tests (`cfg(test)`): a user message
/// whose text is exactly one of these makes its turn fail or stall at a chosen place, so the
/// tests below can check what a bug (or a slow tokenizer) there does to a turn.
#[cfg(test)]
mod test_hooks {
    use super::{Message, Role};

    /// The engine's sink panics on the first token (on the engine thread, inside the job).
    pub const PANIC_IN_ENGINE: &str = "[test hook: the sink panics]";
    /// `drive` panics on the turn thread, after it took the conversation's memory.
    pub const PANIC_IN_DRIVE: &str = "[test hook: drive panics]";
    /// Preparing the turn (rendering, tokenizing) takes 20 s, as a huge paste on a slow
    /// machine might.
    pub const SLOW_PREPARE: &str = "[test hook: tokenizing is slow]";

    fn last_user_is(history: &[Message], hook: &str) -> bool {
        history
            .last()
            .is_some_and(|m| m.role == Role::User && m.content == hook)
    }

    pub fn panics_in_engine(history: &[Message]) -> bool {
        last_user_is(history, PANIC_IN_ENGINE)
    }

    pub fn maybe_panic_in_sink(on: bool) {
        if on {
            panic!("test hook: the sink panics");
        }
    }

    pub fn maybe_panic_in_drive(history: &[Message]) {
        if last_user_is(history, PANIC_IN_DRIVE) {
            panic!("test hook: drive panics");
        }
    }

    pub fn maybe_slow_prepare(messages: &[tptt_engine::Message]) {
        if messages.last().is_some_and(|m| m.content == SLOW_PREPARE) {
            std::thread::sleep(std::time::Duration::from_secs(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    use tauri::ipc::InvokeResponseBody;

    use crate::state::AppConfig;

    /// An app state over `dir` with the tiny Llama fixture chosen (CPU, greedy, 8 tokens).
    fn tiny_app(dir: &Path) -> AppState {
        let hub = tptt_hub::HubConfig::new("http://127.0.0.1:9", dir.join("hf"));
        let state = block_on(AppState::open(AppConfig::in_dir(dir, hub))).expect("app state");
        let repo = std::fs::canonicalize(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/tptt-llama"),
        )
        .expect("fixture");
        let id = repo.display().to_string();
        block_on(state.update_registry(|r| r.local.push(id.clone()))).expect("registry");
        let mut s = state.settings();
        s.model_repo = Some(id);
        s.variant = Some("delta_rule".into());
        s.device = crate::device::DevicePref::Cpu;
        s.sampling.temperature = 0.0;
        s.sampling.repeat_penalty = 1.0;
        s.sampling.max_new_tokens = 8;
        s.sampling.seed = Some(7);
        block_on(state.save_settings(s)).expect("settings");
        state
    }

    fn conversation(state: &AppState) -> ConversationId {
        block_on(
            state
                .store
                .create_conversation(&tptt_store::NewConversation::titled("t")),
        )
        .expect("conversation")
        .id
    }

    /// Sends `content`; the answer's id and a receiver of the turn's events (as JSON).
    fn start(
        state: &AppState,
        c: ConversationId,
        content: &str,
    ) -> (MessageId, mpsc::Receiver<serde_json::Value>) {
        let (tx, rx) = mpsc::channel();
        let channel = Channel::new(move |body: InvokeResponseBody| {
            if let InvokeResponseBody::Json(s) = body {
                let _ = tx.send(serde_json::from_str(&s).expect("event JSON"));
            }
            Ok(())
        });
        let (_, answer) = block_on(send(state, c, content.into(), channel)).expect("send");
        (answer, rx)
    }

    /// The events up to the turn's end.
    fn until_end(rx: &mpsc::Receiver<serde_json::Value>) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            let e = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("the turn ends in time");
            let end = matches!(e["kind"].as_str(), Some("done" | "stopped" | "error"));
            out.push(e);
            if end {
                return out;
            }
        }
    }

    fn stored(state: &AppState, id: MessageId) -> Message {
        block_on(state.store.get_message(id)).expect("stored answer")
    }

    fn streamed(events: &[serde_json::Value]) -> String {
        events
            .iter()
            .filter(|e| e["kind"] == "token")
            .filter_map(|e| e["text"].as_str())
            .collect()
    }

    /// A turn that works after one that failed: `done`, saved complete.
    fn check_next_turn_works(state: &AppState, c: ConversationId) {
        let (answer, rx) = start(state, c, "Hi again");
        let events = until_end(&rx);
        let last = events.last().expect("events");
        assert_eq!(last["kind"], "done", "{events:?}");
        let m = stored(state, answer);
        assert_eq!(m.status, MessageStatus::Complete);
        assert_eq!(m.content, streamed(&events));
        assert!(!is_generating(state, c), "the slot is free");
    }

    #[test]
    fn a_panic_in_the_engine_ends_the_turn_with_an_error_and_the_next_turn_works() {
        let dir = tempfile::tempdir().expect("dir");
        let state = tiny_app(dir.path());
        let c = conversation(&state);
        let (answer, rx) = start(&state, c, "Hello");
        assert_eq!(until_end(&rx).last().expect("end")["kind"], "done");
        let engine_before = lock(&state.model).clone().expect("loaded");

        let (answer2, rx) = start(&state, c, test_hooks::PANIC_IN_ENGINE);
        let events = until_end(&rx);
        let last = events.last().expect("events");
        assert_eq!(last["kind"], "error", "{events:?}");
        assert_eq!(last["errorKind"], "internal");
        let message = last["message"].as_str().expect("message");
        assert!(
            message.contains("the sink panics") && message.contains("report"),
            "{message}"
        );
        let m = stored(&state, answer2);
        assert_eq!(m.status, MessageStatus::Error);
        assert_eq!(m.content, last["partial"].as_str().expect("partial"));
        // The session that panicked is not held; the model (its engine thread alive) is.
        assert!(
            lock(&state.session).is_none(),
            "a half-updated memory is not kept"
        );
        let engine_after = lock(&state.model).clone().expect("still loaded");
        assert!(Arc::ptr_eq(&engine_before, &engine_after));
        assert!(!is_generating(&state, c), "the slot is free");
        // The first answer is untouched.
        assert_eq!(stored(&state, answer).status, MessageStatus::Complete);

        // The next turn works without restarting: the memory comes from the last snapshot.
        check_next_turn_works(&state, c);
    }

    #[test]
    fn a_panic_on_the_turn_thread_saves_the_answer_as_an_error_and_frees_the_slot() {
        let dir = tempfile::tempdir().expect("dir");
        let state = tiny_app(dir.path());
        let c = conversation(&state);
        let (_, rx) = start(&state, c, "Hello");
        assert_eq!(until_end(&rx).last().expect("end")["kind"], "done");
        assert!(lock(&state.session).is_some(), "the memory is held");

        let (answer, rx) = start(&state, c, test_hooks::PANIC_IN_DRIVE);
        let events = until_end(&rx);
        let last = events.last().expect("events");
        assert_eq!(last["kind"], "error", "{events:?}");
        assert_eq!(last["errorKind"], "internal");
        assert!(last["message"]
            .as_str()
            .is_some_and(|m| m.contains("drive panics")));
        assert_eq!(stored(&state, answer).status, MessageStatus::Error);
        assert!(!is_generating(&state, c), "the slot is free");
        assert!(
            lock(&state.session).is_none(),
            "the memory the turn took is not put back"
        );
        check_next_turn_works(&state, c);
    }

    #[test]
    fn stop_while_tokenizing_answers_at_once_and_the_next_turn_works() {
        let dir = tempfile::tempdir().expect("dir");
        let state = tiny_app(dir.path());
        let c = conversation(&state);
        let (answer, rx) = start(&state, c, test_hooks::SLOW_PREPARE);
        std::thread::sleep(Duration::from_millis(200));
        let stopped_at = Instant::now();
        stop(&state, c);
        let events = until_end(&rx);
        let took = stopped_at.elapsed();
        let last = events.last().expect("events");
        assert_eq!(last["kind"], "stopped", "{events:?}");
        // The preparation sleeps 20 s: an answer well before that came from the poll.
        assert!(took < Duration::from_secs(5), "Stop took {took:?}");
        let m = stored(&state, answer);
        assert_eq!(m.status, MessageStatus::Partial);
        assert_eq!(m.content, "");
        assert!(!is_generating(&state, c), "the slot is free");
        check_next_turn_works(&state, c);
    }

    #[test]
    fn oversized_and_empty_messages_are_refused_before_storing() {
        assert_eq!(
            check_content(" \n").expect_err("empty").kind,
            ErrorKind::InvalidSettings
        );
        let big = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert_eq!(
            check_content(&big).expect_err("big").kind,
            ErrorKind::InputTooLong
        );
        check_content(&"y".repeat(1 << 20)).expect("a 1 MiB paste is accepted");
    }

    #[test]
    fn a_fresh_memory_reads_the_tail_after_the_leading_specials() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(tail_that_fits(ids.clone(), &[0], 4), vec![0, 7, 8, 9]);
        // No leading special (or another one): the plain tail.
        assert_eq!(tail_that_fits(ids.clone(), &[], 4), vec![6, 7, 8, 9]);
        assert_eq!(tail_that_fits(ids.clone(), &[5], 4), vec![6, 7, 8, 9]);
        // A prefix as long as the window is not kept whole.
        assert_eq!(
            tail_that_fits(ids.clone(), &[0, 1, 2, 3], 4),
            vec![6, 7, 8, 9]
        );
        // What fits is read whole.
        assert_eq!(tail_that_fits(ids.clone(), &[0], 10), ids);
    }

    #[test]
    fn an_old_sidecar_without_health_still_parses() {
        let old = br#"{"mark":{"len":12,"hash":34},"memory":{"windowSize":64,"windowFill":64,"recurrentOnlyTokens":36,"totalTokens":100}}"#;
        let meta: SnapshotMeta = serde_json::from_slice(old).expect("an old sidecar parses");
        assert_eq!(meta.memory, MemoryInfo::new(100, Some(64), 64));
        assert_eq!(meta.mark, Some(ReadMark { len: 12, hash: 34 }));
    }
}
