//! A turn's thread (module doc of [`super`], "A turn"): the model, the memory, the prepared text
//! fed and the answer generated on the engine's thread, streamed to the UI and saved as it
//! grows; the end saved, then announced.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tauri::ipc::Channel;
use tptt_engine::session::{Event, FinishReason, GenerateOptions};
use tptt_engine::{CancelToken, Job};
use tptt_store::{ConversationId, Message, MessageStatus, MessageUpdate};

use super::held::CachedSession;
use super::memory::{fresh_memory_key, fresh_memory_marked, memory_for, save_snapshot};
use super::model::{ensure_model, forget_model, Target};
use super::prepare::{engine_message, prepare_stoppable, PrepareJob, Prepared};
use super::slot::Slot;
use super::{FRESH_MEMORY_TOKENS, PREFILL_EVENT_INTERVAL};
use crate::dto::{ChatEvent, MemoryInfo, Stats, Verdict};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::runtime::LoadedModel;
use crate::state::{lock, AppState};

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
    /// The conversation's settings over the app's, as the turn started.
    pub settings: crate::chat_settings::Effective,
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
pub(super) struct Finished {
    pub(super) stopped: bool,
    pub(super) stats: Stats,
    pub(super) memory: MemoryInfo,
}

/// The turn thread's body: [`drive`], then the end saved and announced (module doc). A panic
/// inside `drive` (a bug outside the engine, whose own panics come back as errors) is caught
/// here and ends the turn like an error: the partial answer is saved with status `error`, the
/// slot is released and an `error` event sent. The memory the turn had taken is not put back
/// (it may be half-updated): the next turn restores it from its snapshot or the text.
pub(super) fn run_turn(ctx: TurnCtx, mut slot: Slot) {
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

pub(super) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tauri::async_runtime::block_on(f)
}

/// The error of a turn that hit a bug (a panic, in the engine or on the turn thread).
pub(super) fn internal_failure(message: &str) -> CommandError {
    CommandError::new(
        ErrorKind::Internal,
        format!(
            "The answer stopped on an internal error ({message}). This is a bug: please report it. What was written so far is kept, and the conversation's memory is rebuilt for your next message."
        ),
    )
}

/// The turn, in its phases: the model and the memory ([`ensure_model`], [`memory_for`]), the
/// text made ready ([`prepare_stoppable`]), fed and answered on the engine's thread
/// ([`generate`]), the result saved ([`persist`]).
pub(super) fn drive(ctx: &TurnCtx, partial: &Arc<Mutex<String>>) -> CmdResult<Finished> {
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
        ctx.settings.window,
    );
    #[cfg(test)]
    super::test_hooks::maybe_panic_in_drive(&history);
    let (job, fresh_tail) = prepare_job(ctx, &model, &mem, &history);
    let Some(prepared) = prepare_stoppable(job, &ctx.cancel)? else {
        return stopped_while_prepared(ctx, mem, load_ms);
    };
    if fresh_tail {
        tracing::info!(
            conversation = ctx.conversation.0,
            text_tokens = prepared.text_tokens,
            reading = prepared.ids.len(),
            "fresh memory: reading the tail of the conversation that fits in the window"
        );
    }
    let turn = prepared.turn.clone();
    let generated = generate(ctx, &model, mem, prepared, load_ms, partial, &history)?;
    persist(ctx, &model, &turn, generated, fresh_tail, load_ms)
}

/// The prepare job of a turn over `history` (the messages before the answer) with `mem`, and
/// whether it reads only the tail of the text (a fresh memory after `reset_memory`: the tail
/// that fits in its window and in [`FRESH_MEMORY_TOKENS`]).
fn prepare_job(
    ctx: &TurnCtx,
    model: &LoadedModel,
    mem: &CachedSession,
    history: &[Message],
) -> (PrepareJob, bool) {
    let mut messages: Vec<tptt_engine::Message> = Vec::with_capacity(history.len() + 1);
    if !ctx.settings.system_prompt.trim().is_empty() {
        messages.push(tptt_engine::Message::system(
            ctx.settings.system_prompt.clone(),
        ));
    }
    messages.extend(history.iter().map(engine_message));
    let unread = history
        .iter()
        .filter(|m| mem.read_position.is_none_or(|p| m.position > p))
        .count();
    let fresh_tail =
        mem.session.state.pos == 0 && fresh_memory_marked(&ctx.state, ctx.conversation);
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
    (job, fresh_tail)
}

/// Stopped while the turn was rendered or tokenized: nothing was fed, so the memory is as it
/// was and stays held; the answer is an empty partial one.
fn stopped_while_prepared(
    ctx: &TurnCtx,
    mem: CachedSession,
    load_ms: Option<f64>,
) -> CmdResult<Finished> {
    let state = &ctx.state;
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
    Ok(Finished {
        stopped: true,
        stats: Stats {
            load_ms,
            ..Stats::default()
        },
        memory,
    })
}

/// What the engine gave back for a turn that ended normally (complete or stopped).
struct Generated {
    outcome: tptt_engine::session::Outcome,
    session: tptt_engine::session::Session,
    transcript: tptt_engine::ChatTranscript,
    identity: tptt_engine::snapshot::ModelIdentity,
}

/// Feeds the prepared tokens and generates on the engine's thread, streaming the events to the
/// UI and saving the answer's text every [`PARTIAL_SAVE_INTERVAL`](super::PARTIAL_SAVE_INTERVAL)
/// while it waits. On any failure the session is not given back (see the comment inside).
fn generate(
    ctx: &TurnCtx,
    model: &Arc<LoadedModel>,
    mem: CachedSession,
    prepared: Prepared,
    load_ms: Option<f64>,
    partial: &Arc<Mutex<String>>,
    // The test hooks look at it (a message that makes the sink panic).
    #[cfg_attr(not(test), allow(unused_variables))] history: &[Message],
) -> CmdResult<Generated> {
    let state = &ctx.state;
    let Prepared { turn, ids, .. } = prepared;
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
        params: ctx.settings.sampling.params(),
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
    #[cfg(test)]
    let panic_in_sink = super::test_hooks::panics_in_engine(history);
    #[cfg(not(test))]
    let panic_in_sink = false;
    let sink = event_sink(ctx, before, ids.len(), partial, panic_in_sink);
    let CachedSession {
        session,
        transcript,
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
            forget_model(state, model);
            return Err(CommandError::internal(
                "The generation thread is gone; send again to reload the model",
                e,
            ));
        }
    };
    let result = wait_saving_partial(ctx, model, &rx, partial)?;
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
    Ok(Generated {
        outcome,
        session,
        transcript,
        identity,
    })
}

/// The engine's event sink for a turn: prefill progress (at most every
/// [`PREFILL_EVENT_INTERVAL`]) and the memory after the prompt go to the UI with the meter as
/// read from `before` (`fed` tokens fed); tokens go to the UI and into `partial`.
fn event_sink(
    ctx: &TurnCtx,
    before: MemoryInfo,
    fed: usize,
    partial: &Arc<Mutex<String>>,
    #[cfg_attr(not(test), allow(unused_variables))] panic_in_sink: bool,
) -> Box<dyn FnMut(Event) + Send> {
    let sink_text = partial.clone();
    let channel = ctx.channel.clone();
    let conversation = ctx.conversation;
    let mut last_progress: Option<Instant> = None;
    Box::new(move |e: Event| match e {
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
            super::test_hooks::maybe_panic_in_sink(panic_in_sink);
            lock(&sink_text).push_str(&text);
            let _ = channel.send(ChatEvent::Token {
                text,
                generated: generated as u64,
            });
        }
    })
}

/// Waits for the engine's result, saving the answer's text as it grows every
/// `partial_save_every` (a crash loses at most that much); until the first save, a quarter of
/// that, so that a crash early in an answer (or in a short one: a fast model writes a few hundred
/// words in two seconds) keeps what it had written. A closed result channel (the engine thread
/// is gone) drops the cached model: the next turn loads it again.
fn wait_saving_partial(
    ctx: &TurnCtx,
    model: &Arc<LoadedModel>,
    rx: &std::sync::mpsc::Receiver<tptt_engine::JobResult>,
    partial: &Arc<Mutex<String>>,
) -> CmdResult<tptt_engine::JobResult> {
    let state = &ctx.state;
    let mut saved_len = 0;
    loop {
        let every = match saved_len {
            0 => state.config.partial_save_every / 4,
            _ => state.config.partial_save_every,
        };
        match rx.recv_timeout(every) {
            Ok(r) => return Ok(r),
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
                forget_model(state, model);
                return Err(CommandError::internal(
                    "The generation thread stopped; send again to reload the model",
                    "its result channel closed",
                ));
            }
        }
    }
}

/// Saves a generated answer: its text and stats, the state after it (a snapshot), the
/// conversation's model; the state stays held for the next turn.
fn persist(
    ctx: &TurnCtx,
    model: &LoadedModel,
    turn: &tptt_engine::ChatTurn,
    generated: Generated,
    fresh_tail: bool,
    load_ms: Option<f64>,
) -> CmdResult<Finished> {
    let state = &ctx.state;
    let Generated {
        outcome,
        session,
        mut transcript,
        identity,
    } = generated;
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
    transcript.record(turn, &raw, &outcome.finish);
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
