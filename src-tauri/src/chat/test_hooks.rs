//! Test-only hooks, compiled only into this crate's unit tests (`cfg(test)`): a user message
//! whose text is exactly one of these makes its turn fail or stall at a chosen place, so the
//! tests below can check what a bug (or a slow tokenizer) there does to a turn.

use tptt_store::{Message, Role};

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
