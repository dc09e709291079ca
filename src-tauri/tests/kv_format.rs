//! Settings → "Memory precision" (`kvFormat`): a chat's memory keeps its KV cache in the format
//! chosen — new memories, and memories reopened from their snapshot (which hold f32: converted
//! on load) — and a value the engine does not know is refused by field, changing nothing.

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
        assert_eq!(app.ok("get_settings", json!({}))["kvFormat"], "f32");
        app.use_tiny("delta_rule", 8);
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
