//! The chat module's tests: turns on the tiny Llama fixture, through the commands.

use super::memory::tail_that_fits;
use super::turn::block_on;
use super::*;
use std::path::Path;

use tptt_engine::ReadMark;
use tptt_store::MessageStatus;

use crate::dto::MemoryInfo;
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
