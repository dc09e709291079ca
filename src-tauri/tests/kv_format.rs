//! Settings → "Memory precision" (`kvFormat`): a chat's memory keeps its KV cache in the format
//! chosen — new memories, and memories reopened from their snapshot (which keep the format they
//! were saved in: converted on load) — automatic by default (f16 on the tiny model, whose heads
//! of 16 values cannot hold 8-bit blocks); 8-bit on that model, and a value the engine does not
//! know, are refused by field, changing nothing.

mod common;

use common::*;
use serde_json::json;
use tptt::state::KvFormat;

fn held_format(app: &TestApp) -> Option<KvFormat> {
    tptt_chat::state::lock(&app.state().session)
        .as_ref()
        .map(|c| c.session.state.kv_format)
}

fn set_kv(app: &TestApp, kv: &str) {
    let mut s = app.ok("get_settings", json!({}));
    s["kvFormat"] = json!(kv);
    let saved = app.ok("set_settings", json!({"settings": s}));
    assert_eq!(saved["kvFormat"], kv);
}

#[test]
fn a_chat_memory_follows_the_precision_setting_and_keeps_it_when_reopened() {
    let dir = tempfile::tempdir().expect("dir");
    let c = {
        let app = TestApp::offline(dir.path());
        assert_eq!(app.ok("get_settings", json!({}))["kvFormat"], "auto");
        app.use_tiny("delta_rule", 8);
        // 8-bit blocks hold 32 values of a head; the tiny model's heads have 16.
        let mut s = app.ok("get_settings", json!({}));
        s["kvFormat"] = json!("q8_0");
        let e = app
            .invoke("set_settings", json!({"settings": s}))
            .expect_err("q8_0 on heads of 16");
        assert_eq!(e["kind"], "invalid_settings", "{e}");
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("kvFormat") && msg.contains("blocks of 32"),
            "{msg}"
        );
        assert_eq!(app.ok("get_settings", json!({}))["kvFormat"], "auto");
        set_kv(&app, "f16");
        let c = app.new_conversation();
        let (_, events) = send(&app, &c, "Remember the number 7.");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        assert_eq!(
            held_format(&app),
            Some(KvFormat::F16),
            "a new memory in f16"
        );
        let (_, events) = send(&app, &c, "And then?");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        c
    };
    // Reopened: restored from its snapshot, stored in f16 again.
    let app = TestApp::offline(dir.path());
    let (_, events) = send(&app, &c, "Which number?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(held_format(&app), Some(KvFormat::F16));

    // Back to exact: the next reopened memory is f32.
    set_kv(&app, "f32");
    drop(app);
    let app = TestApp::offline(dir.path());
    let (_, events) = send(&app, &c, "Once more.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(held_format(&app), Some(KvFormat::F32));

    // Automatic: f16 here (8-bit cannot serve these heads).
    set_kv(&app, "auto");
    drop(app);
    let app = TestApp::offline(dir.path());
    let (_, events) = send(&app, &c, "And now?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(held_format(&app), Some(KvFormat::F16));
    set_kv(&app, "f32");

    // Hostile values: refused by field, nothing changed.
    for bad in [json!("q4"), json!(""), json!(16), json!(null)] {
        let mut s = app.ok("get_settings", json!({}));
        s["kvFormat"] = bad.clone();
        let e = app
            .invoke("set_settings", json!({"settings": s}))
            .expect_err("refused");
        assert_eq!(e["kind"], "invalid_settings", "{bad}: {e}");
        let msg = e["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("kvFormat") || msg.starts_with("settings"),
            "{bad}: {msg}"
        );
    }
    assert_eq!(app.ok("get_settings", json!({}))["kvFormat"], "f32");
}
