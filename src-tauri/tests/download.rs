//! The model manager against a fake Hugging Face hub on 127.0.0.1 (`tptt_hub::testing`)
//! serving the tiny fixture model: listing, a gated base that needs the token, progress,
//! cancel and resume, a corrupt file, then chatting offline from the cache, and removal.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tptt_hub::testing::{FakeHub, FakeRepo, Faults};

const REPO: &str = "tptt-test/Titans-Tiny";
const BASE: &str = "tptt-test/llama-base";
const TOKEN: &str = "hf_fakeTokenForTests";

/// The tiny Llama repository as a hub repository whose variants name the hub base, and that
/// base, gated (it needs [`TOKEN`]).
fn fake_hub() -> FakeHub {
    let mut repo = FakeRepo::from_dir(REPO, &tiny().join("tptt-llama"));
    for f in repo
        .files
        .iter_mut()
        .filter(|f| f.path.ends_with("/config.json"))
    {
        let mut v: Value = serde_json::from_slice(&f.bytes).expect("config JSON");
        v["base_model_name"] = json!(BASE);
        f.bytes = serde_json::to_vec(&v).expect("JSON");
    }
    let mut base = FakeRepo::from_dir(BASE, &tiny().join("llama-base"));
    base.gated = true;
    FakeHub::start(vec![repo, base], Some(TOKEN))
}

fn download(app: &TestApp, variant: &str) -> Vec<Value> {
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::download_variant(
        app.state(),
        REPO.into(),
        variant.into(),
        ch,
    ))
    .expect("download starts");
    until_end(&rx)
}

fn variant_entry(app: &TestApp, variant: &str) -> Value {
    let list = app.ok("list_models", json!({}));
    let model = list
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["repoId"] == REPO)
        .expect("listed")
        .clone();
    model["variants"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == variant).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn download_with_token_cancel_resume_then_chat_offline_and_remove() {
    let fake = fake_hub();
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::start(dir.path(), &fake.url);

    let added = app.ok("add_model", json!({"repoId": REPO}));
    assert!(added["variants"].is_null());
    let variants = app.ok("refresh_variants", json!({"repoId": REPO}));
    let names: Vec<&str> = variants
        .as_array()
        .expect("variants")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        names.contains(&"delta_rule") && names.contains(&"gated_delta_product"),
        "{names:?}"
    );
    let dr = variants
        .as_array()
        .expect("variants")
        .iter()
        .find(|v| v["name"] == "delta_rule")
        .expect("delta_rule");
    assert_eq!(dr["operatorMode"], "delta_rule");
    assert_eq!(dr["downloaded"], false);
    assert!(dr["sizeBytes"].as_u64().expect("size") > 30_000);
    assert_eq!(
        app.ok("list_models", json!({}))
            .as_array()
            .expect("list")
            .iter()
            .find(|m| m["repoId"] == REPO)
            .expect("entry")["baseModel"],
        BASE
    );

    // The base is gated: without a token the download stops with `auth`.
    let events = download(&app, "delta_rule");
    assert_eq!(last_kind(&events), "error", "{events:?}");
    assert_eq!(events.last().expect("end")["errorKind"], "auth");
    app.ok("set_hf_token", json!({"token": TOKEN}));

    // Slow weights: cancel mid-way, then resume where it stopped.
    fake.set_faults(Faults {
        slow: Some(("model.safetensors".into(), Duration::from_millis(40))),
        ..Default::default()
    });
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::download_variant(
        app.state(),
        REPO.into(),
        "delta_rule".into(),
        ch,
    ))
    .expect("starts");
    // The same download twice at once is refused.
    let (ch2, _rx2) = channel();
    let e = block_on(tptt_chat::commands::download_variant(
        app.state(),
        REPO.into(),
        "delta_rule".into(),
        ch2,
    ))
    .expect_err("busy");
    assert_eq!(e.kind, tptt_chat::ErrorKind::Busy);
    loop {
        let e = rx.recv_timeout(STREAM_TIMEOUT).expect("progress");
        assert_eq!(e["kind"], "progress", "{e}");
        if e["file"] == "base: model.safetensors" && e["fileBytes"].as_u64().unwrap_or(0) > 0 {
            assert!(e["total"].as_u64().unwrap_or(0) >= e["bytes"].as_u64().unwrap_or(0));
            break;
        }
    }
    app.ok(
        "cancel_download",
        json!({"repoId": REPO, "variant": "delta_rule"}),
    );
    let rest = until_end(&rx);
    assert_eq!(last_kind(&rest), "cancelled", "{rest:?}");
    assert_eq!(variant_entry(&app, "delta_rule")["downloaded"], false);

    fake.set_faults(Faults::default());
    fake.clear_log();
    let events = download(&app, "delta_rule");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert!(events.iter().any(|e| e["kind"] == "progress"));
    let resumed = fake.log().iter().any(|l| {
        l.server == "cdn"
            && l.method == "GET"
            && l.range.as_deref().is_some_and(|r| r != "bytes=0-")
    });
    assert!(
        resumed,
        "the weights resumed with a Range request: {:?}",
        fake.log()
    );
    assert!(
        fake.log()
            .iter()
            .all(|l| l.server == "hub" || l.authorization.is_none()),
        "the token goes to the hub only"
    );
    assert_eq!(variant_entry(&app, "delta_rule")["downloaded"], true);
    assert_eq!(variant_entry(&app, "delta_product")["downloaded"], false);
    // The base the variants need is in the cache now: its size is known (weights included).
    let base_bytes = app
        .ok("list_models", json!({}))
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["repoId"] == REPO)
        .expect("entry")["baseSizeBytes"]
        .as_u64();
    let weights = std::fs::metadata(tiny().join("llama-base/model.safetensors"))
        .expect("fixture")
        .len();
    assert!(base_bytes.is_some_and(|b| b > weights), "{base_bytes:?}");
    app.choose(REPO, "delta_rule", 6);
    drop(app);

    // Offline (no hub at all): the downloaded variant chats from the cache.
    let app = TestApp::offline(dir.path());
    assert_eq!(variant_entry(&app, "delta_rule")["downloaded"], true);
    let c = app.new_conversation();
    let (_, events) = send(&app, &c, "Hello offline");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(app.conversation(&c)["modelRepo"], REPO);

    // Removed from the cache: a clear `no_model` with the way forward, and nothing stored.
    app.ok(
        "remove_variant",
        json!({"repoId": REPO, "variant": "delta_rule"}),
    );
    assert_eq!(variant_entry(&app, "delta_rule")["downloaded"], false);
    let (ch, _rx) = channel();
    let e = block_on(tptt_chat::commands::send_message(
        app.state(),
        c.clone(),
        "Still here?".into(),
        ch,
    ))
    .expect_err("no model");
    assert_eq!(e.kind, tptt_chat::ErrorKind::NoModel);
    assert!(e.message.contains("Download it"), "{}", e.message);
    assert_eq!(
        app.conversation(&c)["messages"].as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn a_corrupt_download_is_an_error_and_nothing_is_usable() {
    let fake = fake_hub();
    fake.set_faults(Faults {
        corrupt: vec!["model.safetensors".into()],
        ..Default::default()
    });
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::start(dir.path(), &fake.url);
    app.ok("set_hf_token", json!({"token": TOKEN}));
    app.ok("add_model", json!({"repoId": REPO}));
    let events = download(&app, "delta_rule");
    assert_eq!(last_kind(&events), "error", "{events:?}");
    let end = events.last().expect("end");
    assert_eq!(end["errorKind"], "download");
    assert!(
        end["message"]
            .as_str()
            .expect("message")
            .contains("corrupt"),
        "{end}"
    );
    assert_ne!(
        variant_entry(&app, "delta_rule")["downloaded"],
        true,
        "a failed download is not usable"
    );
    // An unknown variant fails the same clear way.
    let events = download(&app, "no_such_variant");
    assert_eq!(last_kind(&events), "error", "{events:?}");
}
