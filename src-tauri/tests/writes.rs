//! Writes that keep the user's text, through the app: a regenerate that fails or is stopped
//! before its first token leaves the old answer as it was; an answer the app was killed in the
//! middle of is there at the next start, shown as interrupted, and the conversation goes on.
//! (The real `kill -9` of the app is in tests/e2e.)

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

/// A copy of two variants of the tiny Llama repository and its base, to break one of them.
fn tiny_copy(dir: &Path) -> String {
    let repo = dir.join("tptt-llama");
    for variant in ["delta_rule", "delta_product"] {
        copy_dir(&tiny_llama().join(variant), &repo.join(variant));
    }
    copy_dir(&tiny().join("llama-base"), &dir.join("llama-base"));
    repo.display().to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn messages(app: &TestApp, c: &str) -> Vec<Value> {
    app.conversation(c)["messages"]
        .as_array()
        .expect("messages")
        .clone()
}

fn regenerate(app: &TestApp, c: &str) -> (String, Vec<Value>) {
    let (ch, rx) = channel();
    let r = block_on(tptt_chat::commands::regenerate(app.state(), c.into(), ch))
        .expect("regenerate accepted");
    (r.assistant_message_id, until_end(&rx))
}

/// The model of the new answer cannot load: the old answer is still there, same id, same
/// text; the failed attempt left no message. Once the model loads, the new answer takes the
/// old one's place.
#[test]
fn a_regenerate_that_cannot_start_keeps_the_old_answer() {
    let dir = tempfile::tempdir().expect("dir");
    let models = tempfile::tempdir().expect("models");
    let repo_path = tiny_copy(models.path());
    let app = TestApp::offline(dir.path());
    let entry = app.ok("import_local_model", json!({ "path": repo_path }));
    let repo = entry["repoId"].as_str().expect("repo id").to_string();
    app.choose(&repo, "delta_rule", 8);
    let c = app.new_conversation();
    let (_, events) = send(&app, &c, "Hello there");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let before = messages(&app, &c);
    assert_eq!(before.len(), 2);

    // The other variant's weights are damaged: its load fails on the turn thread.
    std::fs::write(
        models
            .path()
            .join("tptt-llama/delta_product/adapter_model.safetensors"),
        b"not safetensors at all",
    )
    .expect("damage");
    app.choose(&repo, "delta_product", 8);
    let (failed_id, events) = regenerate(&app, &c);
    assert_eq!(last_kind(&events), "error", "{events:?}");
    assert_eq!(events.last().expect("error")["errorKind"], "model_load");
    assert_eq!(
        messages(&app, &c),
        before,
        "the old answer is kept as it was"
    );
    assert_ne!(before[1]["id"].as_str(), Some(failed_id.as_str()));

    // With a model that loads, the new answer replaces the old one.
    app.choose(&repo, "delta_rule", 8);
    let (new_id, events) = regenerate(&app, &c);
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let after = messages(&app, &c);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1]["id"].as_str(), Some(new_id.as_str()));
    assert_eq!(
        after[1]["content"].as_str(),
        Some(streamed_text(&events).as_str())
    );
    assert_eq!(after[1]["status"], "complete");
}

/// Stopped while the new answer's prompt is read (no token yet): the old answer stays; the
/// conversation goes on from it.
#[test]
fn a_regenerate_stopped_before_its_first_token_keeps_the_old_answer() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 8);
    let c = app.new_conversation();
    // A long paste, stopped while it is read: an empty, stopped answer after it.
    let paste = "The quick brown fox jumps over the lazy dog. ".repeat(20_000);
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::send_message(
        app.state(),
        c.clone(),
        paste,
        ch,
    ))
    .expect("send");
    app.ok("stop_generation", json!({ "conversationId": c }));
    assert_eq!(last_kind(&until_end(&rx)), "stopped");
    let before = messages(&app, &c);
    assert_eq!(before.len(), 2);

    // Regenerating reads the whole paste again (nothing before it to start from): stopped
    // right away, before any token.
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::regenerate(app.state(), c.clone(), ch)).expect("regenerate");
    app.ok("stop_generation", json!({ "conversationId": c }));
    let events = until_end(&rx);
    assert_eq!(last_kind(&events), "stopped", "{events:?}");
    assert_eq!(streamed_text(&events), "", "stopped before the first token");
    let after = messages(&app, &c);
    assert!(
        after == before,
        "the old answer is kept as it was: {} became {}",
        brief(&before),
        brief(&after)
    );
}

/// Messages in a line: id, role, text length, status (the paste is too long to print).
fn brief(messages: &[Value]) -> String {
    messages
        .iter()
        .map(|m| {
            format!(
                "[{} {} {} chars {}]",
                m["id"],
                m["role"],
                m["content"].as_str().map_or(0, str::len),
                m["status"]
            )
        })
        .collect()
}

/// The app died while an answer streamed (the state a `kill -9` leaves: the user's message, the
/// answer's text as last saved, status `partial`, no stats). The next start shows that text as
/// interrupted, and the next message is answered from the saved memory plus the text since.
#[test]
fn an_answer_cut_by_the_app_dying_is_kept_and_the_conversation_goes_on() {
    let dir = tempfile::tempdir().expect("dir");
    let (c, mem1) = {
        let app = TestApp::offline(dir.path());
        app.use_tiny("delta_rule", 8);
        let c = app.new_conversation();
        let (_, events) = send(&app, &c, "Remember the number 7.");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        (c, events.last().expect("done")["memory"].clone())
    };
    // What the dead process left: its last writes, through the store as it made them.
    block_on(async {
        let store = tptt_store::Store::open(dir.path().join("conversations.sqlite3"))
            .await
            .expect("store");
        let id = tptt_store::ConversationId(c.parse().expect("id"));
        store
            .add_message(
                id,
                &tptt_store::NewMessage::new(tptt_store::Role::User, "Tell me a long story."),
            )
            .await
            .expect("user");
        let answer = store
            .add_message(id, &tptt_store::NewMessage::streaming_answer())
            .await
            .expect("answer");
        store
            .update_message(
                answer.id,
                &tptt_store::MessageUpdate::new(
                    "Once upon a time",
                    tptt_store::MessageStatus::Partial,
                ),
            )
            .await
            .expect("partial save");
        // No close: the process is gone.
        std::mem::forget(store);
    });

    let app = TestApp::offline(dir.path());
    let msgs = messages(&app, &c);
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    assert_eq!(msgs[3]["content"], "Once upon a time");
    assert_eq!(msgs[3]["status"], "partial");
    assert_eq!(
        msgs[3]["error"].as_str(),
        Some(tptt_store::messages::INTERRUPTED),
        "shown as interrupted, not as stopped or still streaming"
    );
    assert!(!tptt_chat::chat::is_generating(
        &app.state(),
        tptt_store::ConversationId(c.parse().expect("id"))
    ));

    app.choose(&tiny_llama().display().to_string(), "delta_rule", 8);
    let (_, events) = send(&app, &c, "Go on.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    // From the snapshot after turn 1, reading the interrupted turn and the new message.
    assert_eq!(events[0]["memory"], mem1, "{events:?}");
    let done = events.last().expect("done");
    let prompt = done["stats"]["promptTokens"].as_u64().expect("prompt");
    // The same two messages with nothing in between feed less.
    let other = app.new_conversation();
    send(&app, &other, "Remember the number 7.");
    let (_, direct) = send(&app, &other, "Go on.");
    let direct = direct.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        prompt > direct,
        "the interrupted turn was read too: {prompt} tokens fed, {direct} without it"
    );
    let msgs = messages(&app, &c);
    assert_eq!(msgs.len(), 6);
    assert_eq!(msgs[3]["content"], "Once upon a time", "still there");
    assert_eq!(msgs[5]["status"], "complete");
}
