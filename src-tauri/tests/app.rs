//! The app's commands on Tauri's mock runtime, with a temporary data folder and the tiny
//! fixture models (tests/fixtures/tiny): settings, device, model manager, chat (stream, stop,
//! regenerate, edit and resend), snapshots and reopening, memory health and reset, bad input.

mod common;

use common::*;
use serde_json::json;

#[test]
fn settings_round_trip_and_name_the_bad_field() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    let defaults = app.ok("get_settings", json!({}));
    assert_eq!(defaults["device"], "auto");
    assert_eq!(defaults["theme"], "system");
    assert_eq!(defaults["modelRepo"], json!(null));
    assert_eq!(defaults["hfTokenSet"], false);

    let mut s = defaults.clone();
    s["theme"] = json!("dark");
    s["systemPrompt"] = json!("Be brief.");
    s["windowSize"] = json!(256);
    s["sampling"]["topP"] = json!(0.5);
    s["sampling"]["seed"] = json!(42);
    let saved = app.ok("set_settings", json!({"settings": s}));
    assert_eq!(saved, s);

    for (path, value, field) in [
        (("sampling", "topP"), json!(1.5), "sampling.topP"),
        (("sampling", "temperature"), json!("hot"), "settings"),
        (
            ("sampling", "maxNewTokens"),
            json!(0),
            "sampling.maxNewTokens",
        ),
    ] {
        let mut bad = s.clone();
        bad[path.0][path.1] = value;
        let msg = app.err("set_settings", json!({"settings": bad}), "invalid_settings");
        assert!(msg.starts_with(field), "{msg}");
    }
    let mut bad = s.clone();
    bad["windowSize"] = json!(-3);
    assert!(app
        .err("set_settings", json!({"settings": bad}), "invalid_settings")
        .starts_with("windowSize"));
    let mut bad = s.clone();
    bad["device"] = json!("cuda");
    if !cfg!(feature = "cuda") {
        assert!(app
            .err("set_settings", json!({"settings": bad}), "invalid_settings")
            .contains("not compiled"));
    }
    // A path that is not an imported folder is not a model to choose.
    let mut bad = s.clone();
    bad["modelRepo"] = json!("/");
    bad["variant"] = json!("etc");
    assert!(app
        .err("set_settings", json!({"settings": bad}), "invalid_settings")
        .starts_with("modelRepo: / is not an imported model folder"));
    // A refused change changed nothing.
    assert_eq!(app.ok("get_settings", json!({})), s);

    // The token: stored, flagged, never echoed; a user-only file.
    app.ok("set_hf_token", json!({"token": "hf_abcdefSECRET"}));
    let with_token = app.ok("get_settings", json!({}));
    assert_eq!(with_token["hfTokenSet"], true);
    assert!(!with_token.to_string().contains("SECRET"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("config/hf_token"))
            .expect("token file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "only the user may read the token file");
    }
    drop(app);

    // A new app on the same folder reads them back.
    let again = TestApp::offline(dir.path());
    let mut expected = s.clone();
    expected["hfTokenSet"] = json!(true);
    assert_eq!(again.ok("get_settings", json!({})), expected);
    again.ok("set_hf_token", json!({"token": null}));
    assert_eq!(again.ok("get_settings", json!({}))["hfTokenSet"], false);
}

#[test]
fn device_info_reports_what_is_compiled_and_used() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    let info = app.ok("device_info", json!({}));
    let compiled: Vec<&str> = info["compiled"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(compiled.contains(&"cpu"));
    assert_eq!(compiled.contains(&"cuda"), cfg!(feature = "cuda"));
    assert_eq!(compiled.contains(&"metal"), cfg!(feature = "metal"));
    assert!(compiled.contains(&info["inUse"].as_str().expect("in use")));
    assert!(!info["name"].as_str().expect("name").is_empty());
    // Once a model runs on the CPU, that is what is reported.
    app.use_tiny("delta_rule", 2);
    let c = app.new_conversation();
    let (_, events) = send(&app, &c, "Hi");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let info = app.ok("device_info", json!({}));
    assert_eq!(info["inUse"], "cpu");
    assert!(info["name"].as_str().expect("name").starts_with("CPU"));
}

#[test]
fn the_model_manager_lists_adds_and_imports() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    let list = app.ok("list_models", json!({}));
    let repos: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["repoId"].as_str())
        .collect();
    for r in [
        "ffurfaro/Titans-Llama-3.2-1B",
        "ffurfaro/Titans-Qwen2.5-1.5B",
        "ffurfaro/Titans-OLMo-1B-hf",
        "ffurfaro/Titans-v2-Mistral-7B-v0.3",
        "ffurfaro/Titanesque-gemma-3-270m",
        "ffurfaro/Titans-OpenELM-1_1B",
    ] {
        assert!(repos.contains(&r), "{r} in the catalog");
    }
    // Variants are unknown until listed: never invented.
    assert!(list
        .as_array()
        .expect("list")
        .iter()
        .all(|m| m["variants"].is_null() && m["source"] == "catalog"));

    app.err(
        "add_model",
        json!({"repoId": "not a repo"}),
        "invalid_repo_id",
    );
    app.err("add_model", json!({"repoId": "../etc"}), "invalid_repo_id");
    let added = app.ok("add_model", json!({"repoId": "someone/Titans-Other"}));
    assert_eq!(added["source"], "added");
    assert!(added["variants"].is_null());
    // Offline, listing fails with a network error and changes nothing.
    app.err(
        "refresh_variants",
        json!({"repoId": "someone/Titans-Other"}),
        "network",
    );

    app.err(
        "import_local_model",
        json!({"path": tiny().display().to_string()}),
        "not_a_tptt_repo",
    );
    app.err(
        "import_local_model",
        json!({"path": "/no/such/folder"}),
        "not_a_tptt_repo",
    );
    let local = app.ok(
        "import_local_model",
        json!({"path": tiny_llama().display().to_string()}),
    );
    assert_eq!(local["source"], "local");
    assert_eq!(local["baseModel"], "llama-base");
    // The base the variants need (found beside the folder, as loading finds it) and its size.
    let base_bytes: u64 = std::fs::read_dir(tiny().join("llama-base"))
        .expect("base fixture")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert_eq!(local["baseSizeBytes"].as_u64(), Some(base_bytes));
    let variants = local["variants"].as_array().expect("variants");
    assert!(variants.len() >= 10, "{variants:?}");
    let dr = variants
        .iter()
        .find(|v| v["name"] == "delta_rule")
        .expect("delta_rule");
    assert_eq!(dr["operatorMode"], "delta_rule");
    assert_eq!(dr["downloaded"], true);
    assert!(dr["sizeBytes"].as_u64().expect("size") > 0);
    // Importing twice keeps one entry; the list shows catalog, added, local.
    app.ok(
        "import_local_model",
        json!({"path": tiny_llama().display().to_string()}),
    );
    let list = app.ok("list_models", json!({}));
    let sources: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["source"].as_str())
        .collect();
    assert_eq!(sources.iter().filter(|s| **s == "local").count(), 1);
    assert_eq!(sources.iter().filter(|s| **s == "added").count(), 1);
    // Forgetting an import leaves its files alone.
    let repo = local["repoId"].as_str().expect("id");
    app.ok(
        "remove_variant",
        json!({"repoId": repo, "variant": "delta_rule"}),
    );
    assert!(tiny_llama().join("delta_rule/config.json").is_file());
    assert!(!app
        .ok("list_models", json!({}))
        .as_array()
        .expect("list")
        .iter()
        .any(|m| m["source"] == "local"));
}

#[test]
fn without_a_model_nothing_is_stored_and_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    let c = app.new_conversation();
    let (ch, _rx) = channel();
    let e = block_on(tptt_chat::commands::send_message(
        app.state(),
        c.clone(),
        "Hello".into(),
        ch,
    ))
    .expect_err("no model");
    assert_eq!(e.kind, tptt_chat::ErrorKind::NoModel);
    assert!(e.message.contains("model manager"), "{}", e.message);
    assert_eq!(app.conversation(&c)["messages"], json!([]));
    // Unknown conversations and oversized messages are refused before anything is stored.
    app.use_tiny("delta_rule", 4);
    let (ch, _rx) = channel();
    let e = block_on(tptt_chat::commands::send_message(
        app.state(),
        "999".into(),
        "Hello".into(),
        ch,
    ))
    .expect_err("no such conversation");
    assert_eq!(e.kind, tptt_chat::ErrorKind::NotFound);
    let (ch, _rx) = channel();
    let huge = "x".repeat(tptt_chat::chat::MAX_MESSAGE_BYTES + 1);
    let e = block_on(tptt_chat::commands::send_message(
        app.state(),
        c.clone(),
        huge,
        ch,
    ))
    .expect_err("too long");
    assert_eq!(e.kind, tptt_chat::ErrorKind::InputTooLong);
    assert_eq!(app.conversation(&c)["messages"], json!([]));
    app.err("get_conversation", json!({"id": "nope"}), "not_found");
}

#[test]
fn a_message_streams_is_saved_and_regenerates_and_edits() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 12);
    let c = app.new_conversation();

    let (ids, events) = send(&app, &c, "Hello there");
    assert_eq!(events[0]["kind"], "started", "{events:?}");
    assert_eq!(events[0]["memory"]["totalTokens"], 0);
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let done = events.last().expect("done");
    let stats = &done["stats"];
    let generated = stats["generatedTokens"].as_u64().expect("generated");
    assert!((1..=12).contains(&generated), "{stats}");
    assert!(stats["promptTokens"].as_u64().expect("prompt") > 0);
    assert!(stats["ttftMs"].as_f64().expect("ttft") >= 0.0);
    let mem1 = done["memory"].clone();
    assert_eq!(
        mem1["totalTokens"].as_u64(),
        Some(stats["promptTokens"].as_u64().unwrap_or(0) + generated)
    );
    assert_eq!(
        mem1["recurrentOnlyTokens"].as_u64().unwrap_or(0)
            + mem1["windowFill"].as_u64().unwrap_or(0),
        mem1["totalTokens"].as_u64().unwrap_or(0)
    );
    let first_answer = streamed_text(&events);

    // Stored: the user's message, then the answer as streamed, complete, with its stats.
    let conv = app.conversation(&c);
    let msgs = conv["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["id"], ids["userMessageId"]);
    assert_eq!(
        (msgs[0]["role"].as_str(), msgs[0]["content"].as_str()),
        (Some("user"), Some("Hello there"))
    );
    assert_eq!(msgs[1]["id"], ids["assistantMessageId"]);
    assert_eq!(msgs[1]["content"].as_str(), Some(first_answer.as_str()));
    assert_eq!(msgs[1]["status"], "complete");
    assert_eq!(
        msgs[1]["stats"]["generatedTokens"].as_u64(),
        Some(generated)
    );
    assert_eq!(conv["memory"], mem1);
    assert_eq!(
        conv["modelRepo"].as_str(),
        Some(tiny_llama().display().to_string().as_str())
    );
    assert_eq!(conv["variant"], "delta_rule");
    // A snapshot file (and its sidecar) at the turn boundary.
    let states = dir.path().join("states").join(&c);
    let files: Vec<String> = std::fs::read_dir(&states)
        .expect("states folder")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let answer_id = ids["assistantMessageId"].as_str().expect("id");
    assert!(
        files.contains(&format!("{answer_id}.safetensors")),
        "{files:?}"
    );
    assert!(files.contains(&format!("{answer_id}.json")), "{files:?}");

    // Turn 2 feeds only what it adds: it starts from turn 1's memory.
    let (_, events2) = send(&app, &c, "And then?");
    assert_eq!(last_kind(&events2), "done", "{events2:?}");
    assert_eq!(
        events2[0]["memory"], mem1,
        "turn 2 continues the memory of turn 1"
    );
    let second_answer = streamed_text(&events2);
    let mem2 = events2.last().expect("done")["memory"].clone();

    // Regenerate: the last answer is replaced; greedy from the restored memory (the snapshot
    // after turn 1) gives the same answer again, feeding only the last message.
    let (ch, rx) = channel();
    let r =
        block_on(tptt_chat::commands::regenerate(app.state(), c.clone(), ch)).expect("regenerate");
    let events3 = until_end(&rx);
    assert_eq!(last_kind(&events3), "done", "{events3:?}");
    assert_eq!(
        events3[0]["memory"], mem1,
        "regenerating restarts from the memory before the answer"
    );
    assert_eq!(streamed_text(&events3), second_answer);
    assert_eq!(events3.last().expect("done")["memory"], mem2);
    let msgs = app.conversation(&c)["messages"]
        .as_array()
        .expect("messages")
        .clone();
    assert_eq!(msgs.len(), 4);
    assert_eq!(
        msgs[3]["id"].as_str(),
        r.assistant_message_id.as_str().into()
    );

    // Edit and resend the first message: everything after it goes.
    let first_user = msgs[0]["id"].as_str().expect("id").to_string();
    let (ch, rx) = channel();
    let r = block_on(tptt_chat::commands::edit_and_resend(
        app.state(),
        c.clone(),
        first_user,
        "Hello there".into(),
        ch,
    ))
    .expect("edit");
    let events4 = until_end(&rx);
    assert_eq!(last_kind(&events4), "done", "{events4:?}");
    assert_eq!(
        events4[0]["memory"]["totalTokens"], 0,
        "nothing before the edited message: a fresh memory"
    );
    assert_eq!(
        streamed_text(&events4),
        first_answer,
        "same text, same greedy answer"
    );
    let msgs = app.conversation(&c)["messages"]
        .as_array()
        .expect("messages")
        .clone();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["id"].as_str(), Some(r.user_message_id.as_str()));
    // Only the latest snapshots are kept: the new answer's, and the latest of each version the
    // regenerate and the edit replaced (kept to switch back to).
    let kept = std::fs::read_dir(&states)
        .expect("states")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .count();
    assert_eq!(kept, 3);

    // Editing someone else's message, or a message of another conversation, is refused.
    let (ch, _rx) = channel();
    let answer = msgs[1]["id"].as_str().expect("id").to_string();
    let e = block_on(tptt_chat::commands::edit_and_resend(
        app.state(),
        c.clone(),
        answer,
        "x".into(),
        ch,
    ))
    .expect_err("not a user message");
    assert_eq!(e.kind, tptt_chat::ErrorKind::NotFound);
}

#[test]
fn stop_keeps_the_partial_answer_and_a_1mb_paste_is_kept_whole() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 64);
    let c = app.new_conversation();
    // 1 MiB of text: stored first, then fed in blocks; stopping ends the feed at once.
    let paste: String = "The quick brown fox jumps over the lazy dog. ".repeat((1 << 20) / 45 + 1);
    let (ch, rx) = channel();
    let r = block_on(tptt_chat::commands::send_message(
        app.state(),
        c.clone(),
        paste.clone(),
        ch,
    ))
    .expect("accepted");
    // The message is stored before generation: visible at once, whole.
    let msgs = app.conversation(&c)["messages"]
        .as_array()
        .expect("messages")
        .clone();
    assert_eq!(msgs[0]["content"].as_str().map(str::len), Some(paste.len()));
    assert_eq!(msgs[1]["status"], "partial");
    // Another generation meanwhile is refused.
    let other = app.new_conversation();
    let (ch2, _rx2) = channel();
    let e = block_on(tptt_chat::commands::send_message(
        app.state(),
        other,
        "Hi".into(),
        ch2,
    ))
    .expect_err("busy");
    assert_eq!(e.kind, tptt_chat::ErrorKind::Busy);
    app.ok("stop_generation", json!({"conversationId": c}));
    let events = until_end(&rx);
    assert_eq!(last_kind(&events), "stopped", "{events:?}");
    let conv = app.conversation(&c);
    let answer = conv["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["id"].as_str() == Some(r.assistant_message_id.as_str()))
        .expect("answer")
        .clone();
    assert_eq!(answer["status"], "partial");
    assert_eq!(
        answer["content"].as_str(),
        Some(streamed_text(&events).as_str())
    );

    // Stopping while decoding keeps the text streamed so far.
    let c2 = app.new_conversation();
    let mut s = app.ok("get_settings", json!({}));
    s["sampling"]["maxNewTokens"] = json!(60000);
    app.ok("set_settings", json!({"settings": s}));
    let (ch, rx) = channel();
    let r = block_on(tptt_chat::commands::send_message(
        app.state(),
        c2.clone(),
        "Tell me everything".into(),
        ch,
    ))
    .expect("send");
    let mut events = Vec::new();
    loop {
        let e = rx.recv_timeout(STREAM_TIMEOUT).expect("event");
        let kind = e["kind"].as_str().unwrap_or_default().to_string();
        events.push(e);
        if kind == "token" {
            break;
        }
        assert_ne!(kind, "error", "{events:?}");
        if kind == "done" {
            break;
        }
    }
    app.ok("stop_generation", json!({"conversationId": c2}));
    if last_kind(&events) != "done" {
        events.extend(until_end(&rx));
    }
    let end = last_kind(&events).to_string();
    assert!(end == "stopped" || end == "done", "{events:?}");
    let stored = app.conversation(&c2)["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .find(|m| m["id"].as_str() == Some(r.assistant_message_id.as_str()))
        .expect("answer")
        .clone();
    assert_eq!(
        stored["content"].as_str(),
        Some(streamed_text(&events).as_str())
    );
    assert_eq!(
        stored["status"],
        if end == "stopped" {
            "partial"
        } else {
            "complete"
        }
    );
}

#[test]
fn a_reopened_conversation_continues_from_its_snapshot_and_a_switch_rebuilds() {
    let dir = tempfile::tempdir().expect("dir");
    let (c, mem1) = {
        let app = TestApp::offline(dir.path());
        app.use_tiny("delta_rule", 8);
        let c = app.new_conversation();
        let (_, events) = send(&app, &c, "Remember the number 7.");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        (c, events.last().expect("done")["memory"].clone())
    };
    // The snapshot records what text its state read (checksummed with it), the sidecar the meter.
    let states = dir.path().join("states").join(&c);
    let snap = std::fs::read_dir(&states)
        .expect("states")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("a snapshot");
    // A safetensors file: an 8-byte little-endian header length, then the JSON header.
    let bytes = std::fs::read(&snap).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mark: tptt_engine::ReadMark = serde_json::from_str(
        header["__metadata__"]["read_mark"]
            .as_str()
            .expect("a read mark"),
    )
    .expect("mark");
    assert!(mark.len > 0, "{mark:?}");
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.with_extension("json")).expect("sidecar"))
            .expect("sidecar JSON");
    assert_eq!(sidecar["memory"], mem1);
    // A new app on the same folder: the conversation, its memory meter, and its state.
    let app = TestApp::offline(dir.path());
    let conv = app.conversation(&c);
    assert_eq!(
        conv["memory"], mem1,
        "the meter comes from the snapshot, without loading anything"
    );
    assert_eq!(conv["messages"].as_array().map(Vec::len), Some(2));
    let (_, events) = send(&app, &c, "Which number?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    // Restored, not re-read: the turn starts at turn 1's memory and feeds only the new turn.
    assert_eq!(events[0]["memory"], mem1);
    let done = events.last().expect("done");
    let prompt = done["stats"]["promptTokens"].as_u64().expect("prompt");
    let total1 = mem1["totalTokens"].as_u64().expect("total");
    assert_eq!(
        done["memory"]["totalTokens"].as_u64(),
        Some(total1 + prompt + done["stats"]["generatedTokens"].as_u64().unwrap_or(0))
    );
    assert!(
        prompt < total1,
        "fed {prompt} tokens, less than the {total1} already read"
    );

    // Another variant: the memory does not match, so it is rebuilt from the text (the whole
    // conversation is fed again), and the old snapshots go once the new one is saved.
    let repo = tiny_llama().display().to_string();
    app.choose(&repo, "delta_product", 8);
    let (_, events) = send(&app, &c, "And now?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(
        events[0]["memory"]["totalTokens"], 0,
        "rebuilt from the text"
    );
    let rebuilt_prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        rebuilt_prompt > total1,
        "the whole history was fed: {rebuilt_prompt}"
    );
    let conv_id = tptt_store::ConversationId(c.parse().expect("id"));
    let snaps = block_on(app.state().store.list_snapshots(conv_id))
        .expect("snapshots")
        .items;
    assert!(!snaps.is_empty());
    assert!(
        snaps.iter().all(|s| s.key.variant == "delta_product"),
        "{snaps:?}"
    );
    assert!(snaps.iter().all(|s| s.path.is_file()));
    assert_eq!(app.conversation(&c)["variant"], "delta_product");

    // A damaged snapshot is refused and the memory rebuilt; the chat goes on.
    drop(app);
    for s in &snaps {
        let mut bytes = std::fs::read(&s.path).expect("read");
        let n = bytes.len();
        bytes[n - 5] ^= 0x55;
        std::fs::write(&s.path, bytes).expect("write");
    }
    let app = TestApp::offline(dir.path());
    app.choose(&repo, "delta_product", 4);
    let (_, events) = send(&app, &c, "Still there?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(
        events[0]["memory"]["totalTokens"], 0,
        "a corrupt snapshot is not used"
    );
}

/// A conversation whose snapshot was saved before format version 5 (FNV digests, recorded
/// under the version 4 key) reopens from it without re-reading, and the next save moves it to
/// the current format and key.
#[test]
fn a_snapshot_saved_by_the_previous_format_reopens_without_re_reading() {
    use tptt_engine::snapshot::testing::RawSnapshot;
    let dir = tempfile::tempdir().expect("dir");
    let (c, mem1) = {
        let app = TestApp::offline(dir.path());
        app.use_tiny("delta_rule", 8);
        let c = app.new_conversation();
        let (_, events) = send(&app, &c, "Remember the number 7.");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        (c, events.last().expect("done")["memory"].clone())
    };
    let conv_id = tptt_store::ConversationId(c.parse().expect("id"));
    {
        // Rewrite the snapshot as the version 4 writer wrote it, and its record as it was kept.
        let app = TestApp::offline(dir.path());
        let store = &app.state().store;
        let snaps = block_on(store.list_snapshots(conv_id))
            .expect("snapshots")
            .items;
        let [snap] = &snaps[..] else {
            panic!("one snapshot expected: {snaps:?}")
        };
        let files = tptt::repo::TpttRepo::open(tiny_llama())
            .and_then(|r| r.variant(Some("delta_rule"), None))
            .expect("variant");
        let model =
            tptt::model::Model::load(&files, &tptt::model::LoadOptions::default()).expect("model");
        let id = tptt_engine::ModelIdentity::of(snap.key.model.clone(), &files, model.config())
            .expect("identity");
        assert_eq!(snap.key.config_hash, id.numerics_key(), "the app's key");
        // The app saves paged snapshots (format 6); version 4 kept the KV cache in the file:
        // written back as one (format 5) first.
        let pages = tptt_chat::chat::pages_dir(&app.state().config.snapshots_dir());
        let (session, mark) =
            tptt_engine::snapshot::load_paged(std::sync::Arc::new(model), &id, &snap.path, &pages)
                .expect("load");
        tptt_engine::snapshot::save_marked(&session, &id, mark, &snap.path).expect("save");
        let mut raw = RawSnapshot::parse(&std::fs::read(&snap.path).expect("read")).expect("parse");
        raw.meta.insert("version".into(), "4".into());
        raw.meta
            .insert("config_hash".into(), id.v4.config_hash.clone());
        raw.meta.insert("weights".into(), id.v4.weights.clone());
        std::fs::write(&snap.path, raw.to_bytes().expect("bytes")).expect("write");
        let key_v4 =
            tptt_store::ModelKey::new(&snap.key.model, &snap.key.variant, id.numerics_key_v4());
        block_on(store.record_snapshot(&tptt_store::NewSnapshot {
            conversation_id: conv_id,
            message_id: snap.message_id,
            key: key_v4.clone(),
            path: snap.path.clone(),
            size_bytes: snap.size_bytes,
            token_count: snap.token_count,
        }))
        .expect("record");
        block_on(store.delete_stale_snapshots(conv_id, &key_v4)).expect("drop the v5 record");
    }
    let app = TestApp::offline(dir.path());
    let (_, events) = send(&app, &c, "Which number?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(
        events[0]["memory"], mem1,
        "restored from the version 4 snapshot, not re-read"
    );
    let snaps = block_on(app.state().store.list_snapshots(conv_id))
        .expect("snapshots")
        .items;
    let newest = snaps.last().expect("a snapshot");
    let bytes = std::fs::read(&newest.path).expect("read");
    let raw = RawSnapshot::parse(&bytes).expect("parse");
    assert_eq!(
        raw.meta.get("version").map(String::as_str),
        Some("6"),
        "saved paged"
    );
    assert!(
        snaps.iter().all(|s| s.key == newest.key),
        "the version 4 record went once the new one was saved: {snaps:?}"
    );
}

#[test]
fn commands_over_ipc_send_search_rename_export_delete() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 4);
    let c = app.new_conversation();
    // Through the IPC, with a JavaScript channel id as the UI sends it.
    let r = app.ok("send_message", json!({"conversationId": c, "content": "Unique words zebracorn", "onEvent": "__CHANNEL__:77"}));
    let answer = r["assistantMessageId"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + STREAM_TIMEOUT;
    loop {
        let conv = app.conversation(&c);
        let m = conv["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .find(|m| m["id"].as_str() == Some(answer.as_str()))
            .cloned()
            .expect("answer");
        if m["status"] == "complete" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the answer completes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The generation slot is free again.
    let deadline = std::time::Instant::now() + STREAM_TIMEOUT;
    while tptt_chat::chat::is_generating(
        &app.state(),
        tptt_store::ConversationId(c.parse().expect("id")),
    ) {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    app.ok("rename_conversation", json!({"id": c, "title": "Zoo talk"}));
    let other = app.new_conversation();
    let all = app.ok("list_conversations", json!({"query": null}));
    let ids: Vec<&str> = all
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [other.as_str(), c.as_str()], "most recent first");
    let mine = all
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["id"] == json!(c))
        .expect("listed")
        .clone();
    assert_eq!(mine["title"], "Zoo talk");
    assert!(mine["updatedAt"].as_str().expect("date").ends_with('Z'));
    let found = app.ok("list_conversations", json!({"query": "zebracorn"}));
    assert_eq!(found.as_array().map(Vec::len), Some(1));
    assert!(found[0]["preview"]
        .as_str()
        .expect("preview")
        .contains("zebracorn"));
    assert_eq!(
        app.ok("list_conversations", json!({"query": "Zoo"}))[0]["id"],
        json!(c)
    );

    let md = app.ok(
        "export_conversation",
        json!({"id": c, "format": "markdown"}),
    );
    assert!(md
        .as_str()
        .expect("text")
        .contains("Unique words zebracorn"));
    // Pinned first; archived leave the list (and its search) for the archived one.
    let pinned = app.ok("set_conversation_pinned", json!({"id": c, "pinned": true}));
    assert_eq!(
        (pinned["id"].as_str(), &pinned["pinned"]),
        (Some(c.as_str()), &json!(true))
    );
    let order = |list: serde_json::Value| -> Vec<String> {
        list.as_array()
            .expect("list")
            .iter()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(
        order(app.ok("list_conversations", json!({"query": null}))),
        [c.clone(), other.clone()]
    );
    let archived = app.ok(
        "set_conversation_archived",
        json!({"id": other, "archived": true}),
    );
    assert_eq!(archived["archived"], json!(true));
    assert_eq!(
        order(app.ok("list_conversations", json!({"query": null}))),
        [c.as_str()]
    );
    assert_eq!(
        order(app.ok("list_archived_conversations", json!({}))),
        [other.as_str()]
    );
    app.ok(
        "set_conversation_archived",
        json!({"id": other, "archived": false}),
    );
    assert_eq!(
        order(app.ok("list_archived_conversations", json!({}))),
        Vec::<String>::new()
    );
    for bad in [json!("yes"), json!(1), json!(null)] {
        app.err(
            "set_conversation_pinned",
            json!({"id": c, "pinned": bad}),
            "invalid_settings",
        );
        app.err(
            "set_conversation_archived",
            json!({"id": c, "archived": bad}),
            "invalid_settings",
        );
    }
    app.err(
        "set_conversation_pinned",
        json!({"id": "999999", "pinned": true}),
        "not_found",
    );

    let js = app.ok("export_conversation", json!({"id": c, "format": "json"}));
    assert!(serde_json::from_str::<serde_json::Value>(js.as_str().expect("text")).is_ok());
    app.err(
        "export_conversation",
        json!({"id": c, "format": "pdf"}),
        "invalid_settings",
    );

    app.ok("delete_conversation", json!({"id": c}));
    app.err("get_conversation", json!({"id": c}), "not_found");
    assert!(
        !dir.path().join("states").join(&c).exists(),
        "its snapshots went with it"
    );
    app.err(
        "rename_conversation",
        json!({"id": c, "title": "x"}),
        "not_found",
    );
    app.err("open_url", json!({"url": "file:///etc/passwd"}), "internal");
}

#[test]
fn a_damaged_database_is_moved_aside_with_a_notice() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("conversations.sqlite3"), vec![0x42u8; 8192]).expect("garbage");
    let app = TestApp::offline(dir.path());
    let msg = app.err("list_conversations", json!({"query": null}), "database");
    assert!(msg.contains("moved aside"), "{msg}");
    assert_eq!(
        app.ok("list_conversations", json!({"query": null})),
        json!([])
    );
    let moved = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("conversations.sqlite3.corrupt-")
        });
    assert!(moved, "the damaged file is kept beside");
    // And the app works on the new database.
    let c = app.new_conversation();
    assert_eq!(app.conversation(&c)["title"], "New chat");
}

#[test]
fn a_streaming_answer_is_saved_while_it_streams() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::start_with(dir.path(), "http://127.0.0.1:9", |c| {
        c.partial_save_every = std::time::Duration::from_millis(5)
    });
    app.use_tiny("delta_rule", 60000);
    // Sampled (seeded, so the same every run) rather than greedy: a long answer.
    let mut s = app.ok("get_settings", json!({}));
    s["sampling"]["temperature"] = json!(1.0);
    s["sampling"]["topK"] = json!(0);
    s["sampling"]["minP"] = json!(0.0);
    app.ok("set_settings", json!({"settings": s}));
    let c = app.new_conversation();
    let (ch, rx) = channel();
    let r = block_on(tptt_chat::commands::send_message(
        app.state(),
        c.clone(),
        "Go on and on".into(),
        ch,
    ))
    .expect("send");
    let answer_of = |app: &TestApp| {
        app.conversation(&c)["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .find(|m| m["id"].as_str() == Some(r.assistant_message_id.as_str()))
            .cloned()
            .expect("answer")
    };
    let mut events = Vec::new();
    let mut saved_midway = None;
    loop {
        let e = rx.recv_timeout(STREAM_TIMEOUT).expect("event");
        let end = matches!(e["kind"].as_str(), Some("done" | "stopped" | "error"));
        events.push(e);
        if end {
            break;
        }
        if saved_midway.is_none() && events.iter().filter(|e| e["kind"] == "token").count() >= 30 {
            let m = answer_of(&app);
            if m["status"] == "partial" && !m["content"].as_str().unwrap_or_default().is_empty() {
                saved_midway = Some(m["content"].as_str().unwrap_or_default().to_string());
                app.ok("stop_generation", json!({"conversationId": c}));
            }
        }
    }
    let midway = saved_midway.expect("the streaming text was saved before the answer ended");
    assert_eq!(last_kind(&events), "stopped", "{events:?}");
    let text = streamed_text(&events);
    assert!(
        text.starts_with(&midway),
        "what was saved midway is a prefix of the answer"
    );
    assert_eq!(answer_of(&app)["content"].as_str(), Some(text.as_str()));
}

/// The index of the first event of `kind`.
fn first_of(events: &[serde_json::Value], kind: &str) -> Option<usize> {
    events.iter().position(|e| e["kind"] == kind)
}

#[test]
fn the_memory_health_comes_before_the_answer_and_a_reset_reads_only_the_window() {
    const WINDOW: u64 = 48;
    const FRESH: usize = tptt_chat::chat::FRESH_MEMORY_TOKENS;
    let dir = tempfile::tempdir().expect("dir");
    let c = {
        let app = TestApp::offline(dir.path());
        app.use_tiny("delta_rule", 6);
        let mut s = app.ok("get_settings", json!({}));
        s["windowSize"] = json!(WINDOW);
        app.ok("set_settings", json!({"settings": s}));
        let c = app.new_conversation();
        // Long enough for a verdict (one token in 8 is scored, 24 scores are needed), and longer
        // than a fresh memory reads.
        let paste = "The quick brown fox jumps over the lazy dog. ".repeat(300);
        let (_, events) = send(&app, &c, &paste);
        assert_eq!(last_kind(&events), "done", "{events:?}");
        let at = first_of(&events, "memory").expect("a memory event");
        assert_eq!(events[0]["kind"], "started");
        assert!(
            events[1..at].iter().all(|e| e["kind"] == "prefill"),
            "the memory comes right after started and the prompt's progress: {events:?}"
        );
        assert!(first_of(&events, "token").is_none_or(|t| t > at));
        let done = events.last().expect("done");
        let prompt = done["stats"]["promptTokens"].as_u64().expect("prompt");
        assert!(prompt > FRESH as u64 + 100, "{prompt}");
        let memory = &events[at]["memory"];
        assert_eq!(memory["totalTokens"].as_u64(), Some(prompt));
        assert_eq!(memory["windowFill"].as_u64(), Some(prompt.min(WINDOW)));
        assert_eq!(memory["windowSize"].as_u64(), Some(WINDOW));
        let health = &memory["health"];
        assert!(
            ["healthy", "strained", "broken"].contains(&health["verdict"].as_str().unwrap_or("")),
            "{health}"
        );
        let early = health["earlyPerplexity"].as_f64().expect("early");
        let recent = health["recentPerplexity"].as_f64().expect("recent");
        let ratio = health["ratio"].as_f64().expect("ratio");
        assert!(early >= 1.0 && recent >= 1.0, "{health}");
        assert!((ratio - recent / early).abs() < 1e-6 * ratio, "{health}");
        // The answer's own tokens are not scored: the health after it is the prompt's.
        assert_eq!(&done["memory"]["health"], health);
        assert_eq!(app.conversation(&c)["memory"], done["memory"]);

        // The way out: the memory and its snapshots go, the meter is empty.
        let conv_id = tptt_store::ConversationId(c.parse().expect("id"));
        assert!(!block_on(app.state().store.list_snapshots(conv_id))
            .expect("snapshots")
            .items
            .is_empty());
        let fresh = app.ok("reset_memory", json!({"conversationId": c}));
        assert_eq!(fresh["totalTokens"], 0);
        assert_eq!(fresh["windowSize"].as_u64(), Some(WINDOW));
        assert_eq!(fresh["health"]["verdict"], "unknown");
        assert!(block_on(app.state().store.list_snapshots(conv_id))
            .expect("snapshots")
            .items
            .is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("states").join(&c))
            .expect("states folder")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "snapshot files left: {left:?}");
        assert_eq!(app.conversation(&c)["memory"], fresh);

        // Errors: an unknown conversation, a malformed id, a reply being generated.
        assert!(app
            .err(
                "reset_memory",
                json!({"conversationId": "987654"}),
                "not_found"
            )
            .contains("987654"));
        app.err("reset_memory", json!({"conversationId": "x"}), "not_found");
        let other = app.new_conversation();
        let mut s = app.ok("get_settings", json!({}));
        s["sampling"]["maxNewTokens"] = json!(60000);
        app.ok("set_settings", json!({"settings": s.clone()}));
        let (ch, rx) = channel();
        block_on(tptt_chat::commands::send_message(
            app.state(),
            other.clone(),
            "Tell me everything".into(),
            ch,
        ))
        .expect("send");
        app.err("reset_memory", json!({"conversationId": c}), "busy");
        app.ok("stop_generation", json!({"conversationId": other}));
        until_end(&rx);
        s["sampling"]["maxNewTokens"] = json!(6);
        app.ok("set_settings", json!({"settings": s}));
        c
    };

    // After a restart (the mark is stored): the memory is rebuilt from the last WINDOW tokens
    // of the conversation only, not from the whole paste.
    let app = TestApp::offline(dir.path());
    let (_, events) = send(&app, &c, "Go on.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(events[0]["memory"]["totalTokens"], 0, "a fresh memory");
    let done = events.last().expect("done").clone();
    let generated = done["stats"]["generatedTokens"]
        .as_u64()
        .expect("generated");
    assert_eq!(done["stats"]["promptTokens"].as_u64(), Some(WINDOW));
    assert_eq!(
        done["memory"]["totalTokens"].as_u64(),
        Some(WINDOW + generated)
    );
    assert_eq!(done["memory"]["windowFill"].as_u64(), Some(WINDOW));
    let at = first_of(&events, "memory").expect("memory event");
    assert_eq!(events[at]["memory"]["totalTokens"].as_u64(), Some(WINDOW));
    // The mark is spent once that memory is saved; the next turn continues it.
    let conv_id = tptt_store::ConversationId(c.parse().expect("id"));
    let mark: Option<bool> = block_on(
        app.state()
            .store
            .get_setting(&tptt_chat::chat::fresh_memory_key(conv_id)),
    )
    .expect("setting");
    assert_eq!(mark, None);
    let (_, events) = send(&app, &c, "And then?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(events[0]["memory"], done["memory"]);
    let fed = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(fed < WINDOW, "only the new turn is fed: {fed}");

    // With a window larger than FRESH_MEMORY_TOKENS, a fresh memory reads that many: an
    // untrained memory can drown the model well inside its window.
    let mut s = app.ok("get_settings", json!({}));
    s["windowSize"] = json!(4096);
    app.ok("set_settings", json!({"settings": s}));
    assert_eq!(
        app.ok("reset_memory", json!({"conversationId": c}))["windowSize"],
        4096
    );
    let (_, events) = send(&app, &c, "Once more.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let done = events.last().expect("done");
    let generated = done["stats"]["generatedTokens"]
        .as_u64()
        .expect("generated");
    assert_eq!(done["stats"]["promptTokens"].as_u64(), Some(FRESH as u64));
    assert_eq!(done["memory"]["windowSize"], 4096);
    assert_eq!(
        done["memory"]["windowFill"].as_u64(),
        Some(FRESH as u64 + generated)
    );
}

/// The `totalTokens` of an event's memory.
fn total_of(e: &serde_json::Value) -> u64 {
    e["memory"]["totalTokens"]
        .as_u64()
        .expect("memory.totalTokens")
}

#[test]
fn a_long_paste_reports_its_reading_and_the_memory_follows_what_was_read() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 6);
    let c = app.new_conversation();
    let (_, first) = send(&app, &c, "Hello there");
    assert_eq!(last_kind(&first), "done", "{first:?}");
    let before = total_of(first.last().expect("done"));
    // The first turn loaded the model: its load time is reported, apart from the TTFT.
    assert!(
        first[0]["loadMs"].as_f64().is_some_and(|ms| ms > 0.0),
        "{:?}",
        first[0]
    );
    assert!(first.last().expect("done")["stats"]["loadMs"]
        .as_f64()
        .is_some());

    let paste = "The quick brown fox jumps over the lazy dog. ".repeat(400);
    let (_, events) = send(&app, &c, &paste);
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let started = &events[0];
    assert_eq!(started["kind"], "started");
    assert_eq!(started["loadMs"], serde_json::Value::Null, "loaded already");
    assert_eq!(total_of(started), before);
    let total = started["promptTokens"].as_u64().expect("promptTokens");
    let done = events.last().expect("done");
    assert_eq!(done["stats"]["promptTokens"].as_u64(), Some(total));
    assert!(total > 1024, "{total}");
    // The reading's progress: counting up, below the whole, the meter at what was read.
    let prefill: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["kind"] == "prefill").collect();
    assert!(
        !prefill.is_empty(),
        "a paste of {total} tokens reports its reading"
    );
    let mut last_read = 0;
    for p in &prefill {
        let read = p["read"].as_u64().expect("read");
        assert!(read > last_read && read < total, "{prefill:?}");
        assert_eq!(p["total"].as_u64(), Some(total));
        assert!(p["elapsedMs"].as_f64().is_some_and(|ms| ms > 0.0));
        assert_eq!(total_of(p), before + read, "the meter follows the reading");
        last_read = read;
    }
    let read_at = first_of(&events, "memory").expect("memory");
    assert_eq!(total_of(&events[read_at]), before + total);
    // While decoding, each token says how many were generated; the end's meter is the backend's.
    let generated: Vec<u64> = events
        .iter()
        .filter(|e| e["kind"] == "token")
        .map(|e| e["generated"].as_u64().expect("generated"))
        .collect();
    assert!(generated.windows(2).all(|w| w[0] <= w[1]), "{generated:?}");
    let all = done["stats"]["generatedTokens"]
        .as_u64()
        .expect("generated");
    assert!(generated.last().is_some_and(|g| *g <= all));
    assert_eq!(total_of(done), before + total + all);
    assert_eq!(app.conversation(&c)["memory"], done["memory"]);
    assert_eq!(done["stats"]["loadMs"], serde_json::Value::Null);
    let ttft = done["stats"]["ttftMs"].as_f64().expect("ttft");
    let speed = done["stats"]["prefillTokensPerS"].as_f64().expect("speed");
    assert!(ttft > 0.0 && speed > 0.0);

    // Stopped while the paste is read: the stop counts what was read, the meter is the memory's,
    // and the conversation goes on.
    let c2 = app.new_conversation();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(2000);
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::send_message(
        app.state(),
        c2.clone(),
        long,
        ch,
    ))
    .expect("send");
    let mut events = Vec::new();
    loop {
        let e = rx.recv_timeout(STREAM_TIMEOUT).expect("event");
        let kind = e["kind"].as_str().unwrap_or_default().to_string();
        events.push(e);
        assert!(kind != "done" && kind != "error", "{events:?}");
        if kind == "prefill" {
            break;
        }
    }
    app.ok("stop_generation", json!({"conversationId": c2}));
    app.ok("stop_generation", json!({"conversationId": c2})); // twice: harmless
    events.extend(until_end(&rx));
    let stopped = events.last().expect("end");
    assert_eq!(stopped["kind"], "stopped", "{events:?}");
    let whole = events[0]["promptTokens"].as_u64().expect("promptTokens");
    let read = stopped["stats"]["promptTokens"].as_u64().expect("read");
    let seen = events
        .iter()
        .filter(|e| e["kind"] == "prefill")
        .map(|e| e["read"].as_u64().unwrap_or(0))
        .max();
    assert!(
        seen.is_some_and(|s| s <= read) && read < whole,
        "read {read} of {whole}: {events:?}"
    );
    assert_eq!(total_of(stopped), read);
    assert_eq!(app.conversation(&c2)["memory"], stopped["memory"]);
    let (_, next) = send(&app, &c2, "Still there?");
    assert_eq!(last_kind(&next), "done", "{next:?}");
}

/// A conversation's own settings: its sampling and system prompt win over the app's, other
/// conversations keep following the app's; a new system prompt rebuilds the memory (it read the
/// old one); bad values are refused by field.
#[test]
fn a_conversation_has_its_own_system_prompt_and_sampling() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 8);
    let own = app.new_conversation();
    let other = app.new_conversation();
    assert_eq!(
        app.conversation(&own)["settings"],
        json!({"model": null, "windowSize": null, "systemPrompt": null, "sampling": null}),
        "a new chat follows the app"
    );

    let mut sampling = app.ok("get_settings", json!({}))["sampling"].clone();
    sampling["maxNewTokens"] = json!(2);
    let saved = app.ok(
        "set_conversation_settings",
        json!({"id": own, "settings": {"systemPrompt": null, "sampling": sampling}}),
    );
    assert_eq!(
        saved["rebuilt"], false,
        "nothing to rebuild: no messages yet"
    );
    assert_eq!(saved["settings"]["sampling"]["maxNewTokens"], 2);
    assert_eq!(app.conversation(&own)["settings"], saved["settings"]);

    let generated = |events: &[serde_json::Value]| {
        events.last().expect("done")["stats"]["generatedTokens"]
            .as_u64()
            .expect("generated")
    };
    let (_, events) = send(&app, &own, "Count to ten.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert!(generated(&events) <= 2, "this chat's limit: {events:?}");
    let (_, events) = send(&app, &other, "Count to ten.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert!(generated(&events) > 2, "the app's limit (8) elsewhere");
    let first_prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");

    // A system prompt of its own (longer than anything the template adds), once the chat has
    // messages: its memory is rebuilt.
    let terse = "You are a terse assistant. ".repeat(12);
    let saved = app.ok(
        "set_conversation_settings",
        json!({"id": other, "settings": {"systemPrompt": terse, "sampling": null}}),
    );
    assert_eq!(saved["rebuilt"], true);
    assert_eq!(saved["memory"]["totalTokens"], 0);
    let (_, events) = send(&app, &other, "Again.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(events[0]["memory"]["totalTokens"], 0, "read from the text");
    let prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        prompt > first_prompt,
        "the whole conversation, with its system prompt, was read: {prompt} vs {first_prompt}"
    );
    // The same prompt again changes nothing.
    let same = app.ok(
        "set_conversation_settings",
        json!({"id": other, "settings": {"systemPrompt": terse, "sampling": null}}),
    );
    assert_eq!(same["rebuilt"], false);

    // A softmax window of its own: the memory is rebuilt with it.
    let windowed = app.ok(
        "set_conversation_settings",
        json!({"id": other, "settings": {"systemPrompt": terse, "sampling": null, "windowSize": 16}}),
    );
    assert_eq!(windowed["rebuilt"], true);
    assert_eq!(windowed["settings"]["windowSize"], 16);
    assert_eq!(
        windowed["memory"]["windowSize"], 16,
        "the empty meter shows the chat's window"
    );
    let (_, events) = send(&app, &other, "Once more.");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(events.last().expect("done")["memory"]["windowSize"], 16);
    let msg = app.err(
        "set_conversation_settings",
        json!({"id": other, "settings": {"systemPrompt": terse, "sampling": null, "windowSize": 0}}),
        "invalid_settings",
    );
    assert!(msg.starts_with("windowSize:"), "{msg}");

    // Bad input, by field; an unknown conversation.
    let mut bad = sampling.clone();
    bad["topP"] = json!(0);
    let msg = app.err(
        "set_conversation_settings",
        json!({"id": own, "settings": {"systemPrompt": null, "sampling": bad}}),
        "invalid_settings",
    );
    assert!(msg.starts_with("sampling.topP:"), "{msg}");
    let msg = app.err(
        "set_conversation_settings",
        json!({"id": own, "settings": {"systemPrompt": "x".repeat(70_000), "sampling": null}}),
        "invalid_settings",
    );
    assert!(msg.starts_with("systemPrompt:"), "{msg}");
    app.err(
        "set_conversation_settings",
        json!({"id": own, "settings": "not settings"}),
        "invalid_settings",
    );
    app.err(
        "set_conversation_settings",
        json!({"id": "999999", "settings": {"systemPrompt": null, "sampling": null}}),
        "not_found",
    );
    assert_eq!(
        app.conversation(&own)["settings"]["sampling"]["maxNewTokens"],
        2,
        "a refused change leaves the settings as they were"
    );
}

/// A conversation's own model and variant: its turns run on them while other conversations
/// follow the app's choice; one that is not there is refused before anything is stored.
#[test]
fn a_conversation_can_run_on_its_own_model_variant() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    let repo = app.use_tiny("delta_rule", 4);
    let own = app.new_conversation();
    let other = app.new_conversation();
    let saved = app.ok(
        "set_conversation_settings",
        json!({"id": own, "settings": {"model": {"repoId": repo, "variant": "delta_product"}, "systemPrompt": null, "sampling": null}}),
    );
    assert_eq!(saved["settings"]["model"]["variant"], "delta_product");
    assert_eq!(saved["rebuilt"], false);
    for c in [&own, &other] {
        let (_, events) = send(&app, c, "Hello there.");
        assert_eq!(last_kind(&events), "done", "{events:?}");
    }
    assert_eq!(app.conversation(&own)["variant"], "delta_product");
    assert_eq!(app.conversation(&other)["variant"], "delta_rule");
    // Back and forth: the memory follows the model that runs (rebuilt from the text when the
    // model changes, by the memory rule), and the chat goes on.
    app.ok(
        "set_conversation_settings",
        json!({"id": own, "settings": {"model": null, "systemPrompt": null, "sampling": null}}),
    );
    let (_, events) = send(&app, &own, "And now?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(
        events[0]["memory"]["totalTokens"], 0,
        "another model: rebuilt"
    );
    assert_eq!(app.conversation(&own)["variant"], "delta_rule");

    let msg = app.err(
        "set_conversation_settings",
        json!({"id": own, "settings": {"model": {"repoId": repo, "variant": "no_such_variant"}, "systemPrompt": null, "sampling": null}}),
        "no_model",
    );
    assert!(msg.contains("no_such_variant"), "{msg}");
    app.err(
        "set_conversation_settings",
        json!({"id": own, "settings": {"model": {"repoId": "", "variant": "x"}, "systemPrompt": null, "sampling": null}}),
        "invalid_settings",
    );
    // Paths in disguise are names that are not downloaded, nothing more.
    for (repo_id, variant) in [
        ("../../../etc", "passwd"),
        ("owner/name", "../../secrets"),
        ("/", "."),
    ] {
        app.err(
            "set_conversation_settings",
            json!({"id": own, "settings": {"model": {"repoId": repo_id, "variant": variant}, "systemPrompt": null, "sampling": null}}),
            "no_model",
        );
    }
    let mut huge = app.ok("get_settings", json!({}))["sampling"].clone();
    huge["maxNewTokens"] = json!(1e300);
    let msg = app.err(
        "set_conversation_settings",
        json!({"id": own, "settings": {"model": null, "systemPrompt": null, "sampling": huge}}),
        "invalid_settings",
    );
    assert!(msg.starts_with("sampling.maxNewTokens:"), "{msg}");
    assert_eq!(
        app.conversation(&own)["settings"]["model"],
        serde_json::Value::Null,
        "a refused model leaves the settings as they were"
    );
}

/// "Branch from here": the branch is a copy up to the message; from an answer it continues from
/// the state saved after that answer (shared, so it survives the source's deletion) without
/// re-reading; from a user message, from the state of the answer before it, reading only that
/// message; the source is untouched.
#[test]
fn a_branch_continues_from_the_state_of_the_answer_it_starts_at() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 6);
    let src = app.new_conversation();
    let (_, first) = send(&app, &src, "Remember the number 7.");
    assert_eq!(last_kind(&first), "done", "{first:?}");
    let mem1 = first.last().expect("done")["memory"].clone();
    let (_, second) = send(&app, &src, "And the number 9.");
    assert_eq!(last_kind(&second), "done", "{second:?}");
    let messages = app.conversation(&src)["messages"].clone();
    let ids: Vec<String> = messages
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 4);

    // From the first answer: its state is shared with the branch.
    let b1 = app.ok(
        "branch_conversation",
        json!({"id": src, "messageId": ids[1]}),
    );
    let b1_id = b1["id"].as_str().expect("id").to_string();
    assert!(
        b1["title"].as_str().expect("title").ends_with("(branch)"),
        "{b1}"
    );
    let conv = app.conversation(&b1_id);
    assert_eq!(conv["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        conv["memory"], mem1,
        "the meter of the state it starts from"
    );
    // The source goes: the branch keeps its state.
    app.ok("delete_conversation", json!({"id": src}));
    let (_, events) = send(&app, &b1_id, "Which number?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(events[0]["memory"], mem1, "continued, not re-read");
    let prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        prompt < mem1["totalTokens"].as_u64().expect("total"),
        "only the new turn was fed: {prompt}"
    );

    // From a user message: from the state of the answer before it, reading only the message.
    let b1_messages: Vec<String> = app.conversation(&b1_id)["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect();
    let b2 = app.ok(
        "branch_conversation",
        json!({"id": b1_id, "messageId": b1_messages[2]}),
    );
    let b2_id = b2["id"].as_str().expect("id").to_string();
    assert_eq!(
        app.conversation(&b2_id)["messages"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    let events = app_regenerate(&app, &b2_id);
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(
        events[0]["memory"], mem1,
        "continued from the first answer's state"
    );
    let prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        prompt < mem1["totalTokens"].as_u64().expect("total"),
        "only the message was fed: {prompt}"
    );
    assert_eq!(
        app.conversation(&b1_id)["messages"]
            .as_array()
            .map(Vec::len),
        Some(4),
        "the source of a branch is untouched"
    );

    // Bad input.
    app.err(
        "branch_conversation",
        json!({"id": b1_id, "messageId": "999999"}),
        "not_found",
    );
    app.err(
        "branch_conversation",
        json!({"id": "999999", "messageId": b1_messages[0]}),
        "not_found",
    );
}

/// A state is kept after every answer, its softmax window in KV pages shared with the turns
/// before it (a turn adds its recurrent state and its new positions, not a whole window); a
/// branch from the first answer of three continues from that answer's state; pages no snapshot
/// uses any more go at the next start once old enough, the others stay.
#[test]
fn every_answer_keeps_a_state_whose_pages_the_next_turns_share() {
    use tptt_engine::snapshot;
    let dir = tempfile::tempdir().expect("dir");
    let states = {
        let app = TestApp::offline(dir.path());
        app.use_tiny("delta_rule", 6);
        let mut settings = app.ok("get_settings", json!({}));
        settings["windowSize"] = json!(64);
        app.ok("set_settings", json!({"settings": settings}));
        let c = app.new_conversation();
        let mut memories = Vec::new();
        for text in ["Remember the number 7.", "And the number 9.", "And 11."] {
            let (_, events) = send(&app, &c, text);
            assert_eq!(last_kind(&events), "done", "{events:?}");
            memories.push(events.last().expect("done")["memory"].clone());
        }
        let conv_id = tptt_store::ConversationId(c.parse().expect("id"));
        let snaps = block_on(app.state().store.list_snapshots(conv_id))
            .expect("snapshots")
            .items;
        assert_eq!(snaps.len(), 3, "one state per answer: {snaps:?}");
        let names = |p: &std::path::Path| -> std::collections::HashSet<String> {
            snapshot::page_names(p)
                .expect("pages")
                .into_iter()
                .collect()
        };
        for pair in snaps.windows(2) {
            assert!(
                !names(&pair[0].path).is_disjoint(&names(&pair[1].path)),
                "a turn shares the pages of the one before"
            );
        }
        // Branch from the first answer: its own state, nothing re-read.
        let first_answer = app.conversation(&c)["messages"][1]["id"]
            .as_str()
            .expect("id")
            .to_string();
        let b = app.ok(
            "branch_conversation",
            json!({"id": c, "messageId": first_answer}),
        );
        let b_id = b["id"].as_str().expect("id").to_string();
        let (_, events) = send(&app, &b_id, "Which number?");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        assert_eq!(events[0]["memory"], memories[0], "continued, not re-read");
        app.ok("delete_conversation", json!({"id": c}));
        app.state().config.snapshots_dir()
    };
    let pages = tptt_chat::chat::pages_dir(&states);
    let all: Vec<std::path::PathBuf> = std::fs::read_dir(&pages)
        .expect("pages")
        .flatten()
        .map(|e| e.path())
        .collect();
    // Aged past the grace period, as if the app had been closed for a while.
    let old = std::time::SystemTime::now() - 2 * tptt_chat::cleanup::PAGE_GRACE;
    for p in &all {
        std::fs::File::options()
            .write(true)
            .open(p)
            .and_then(|f| f.set_modified(old))
            .expect("age");
    }
    let app = TestApp::offline(dir.path());
    // The sweep runs on its own thread at start-up.
    let mut left = all.len();
    for _ in 0..100 {
        left = all.iter().filter(|p| p.exists()).count();
        if left < all.len() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(left < all.len(), "the deleted chat's own pages went");
    assert!(left > 0, "the branch's pages stay");
    let b = app.ok("list_conversations", json!({"query": null}));
    let b_id = b[0]["id"].as_str().expect("id").to_string();
    let (_, events) = send(&app, &b_id, "Still there?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_ne!(
        events[0]["memory"]["totalTokens"], 0,
        "its state still loads"
    );
}

/// Versions: regenerate and edit keep what they replace (`versions` on the message that starts
/// the continuation); `switch_version` shows it again with its ids, and the next turn continues
/// from its saved state, reading only the new message.
#[test]
fn regenerate_and_edit_keep_versions_and_a_switch_continues_from_their_state() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 6);
    let c = app.new_conversation();
    let (_, first) = send(&app, &c, "Remember the number 7.");
    assert_eq!(last_kind(&first), "done", "{first:?}");
    let (ids2, second) = send(&app, &c, "And the number 9.");
    assert_eq!(last_kind(&second), "done", "{second:?}");
    let mem2 = second.last().expect("done")["memory"].clone();
    let a2 = ids2["assistantMessageId"].as_str().expect("id").to_string();
    let ids = |conv: &serde_json::Value| -> Vec<String> {
        conv["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_string())
            .collect()
    };

    // Regenerate: the old answer is version 1, the new one version 2.
    let events = app_regenerate(&app, &c);
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let conv = app.conversation(&c);
    let regenerated = ids(&conv)[3].clone();
    assert_ne!(regenerated, a2);
    assert_eq!(
        conv["messages"][3]["versions"],
        json!({"current": 2, "total": 2})
    );
    assert_eq!(conv["messages"][1]["versions"], json!(null));

    // Back to version 1: the old answer, its id, and the memory saved after it.
    let conv = app.ok(
        "switch_version",
        json!({"conversationId": c, "messageId": regenerated, "version": 1}),
    );
    assert_eq!(ids(&conv)[3], a2);
    assert_eq!(
        conv["messages"][3]["versions"],
        json!({"current": 1, "total": 2})
    );
    assert_eq!(
        conv["memory"], mem2,
        "the meter of the old answer's snapshot"
    );
    let (_, third) = send(&app, &c, "Which numbers?");
    assert_eq!(last_kind(&third), "done", "{third:?}");
    assert_eq!(
        third[0]["memory"], mem2,
        "continued from the old answer's state"
    );
    let prompt = third.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        prompt < mem2["totalTokens"].as_u64().expect("total"),
        "only the new turn was read: {prompt}"
    );
    let mem3 = third.last().expect("done")["memory"].clone();
    let before_edit = ids(&app.conversation(&c));

    // Edit the second message: it and what followed are version 1 of its position.
    let (ch, rx) = channel();
    let edited = block_on(tptt_chat::commands::edit_and_resend(
        app.state(),
        c.clone(),
        before_edit[2].clone(),
        "And the number 4.".into(),
        ch,
    ))
    .expect("edit");
    assert_eq!(last_kind(&until_end(&rx)), "done");
    let conv = app.conversation(&c);
    assert_eq!(ids(&conv).len(), 4);
    assert_eq!(ids(&conv)[2], edited.user_message_id);
    assert_eq!(
        conv["messages"][2]["versions"],
        json!({"current": 2, "total": 2})
    );
    assert_eq!(conv["messages"][2]["content"], "And the number 4.");
    // Back: every message with its id, and the memory of the last answer of that version.
    let conv = app.ok(
        "switch_version",
        json!({"conversationId": c, "messageId": edited.user_message_id, "version": 1}),
    );
    assert_eq!(ids(&conv), before_edit);
    assert_eq!(
        conv["messages"][3]["versions"],
        json!({"current": 1, "total": 2})
    );
    assert_eq!(conv["memory"], mem3);
    let (_, fourth) = send(&app, &c, "Thanks.");
    assert_eq!(
        fourth[0]["memory"], mem3,
        "continued from that version's state"
    );
    // Hidden versions are not conversations of the list.
    let listed = app.ok("list_conversations", json!({"query": null}));
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // Bad input: each a clear error, nothing moves.
    let m = &before_edit[2];
    for (version, kind) in [
        (json!(3), "not_found"),
        (json!(0), "invalid_settings"),
        (json!(-1), "invalid_settings"),
        (json!(1.5), "invalid_settings"),
        (json!("2"), "invalid_settings"),
        (json!(1e300), "invalid_settings"),
    ] {
        app.err(
            "switch_version",
            json!({"conversationId": c, "messageId": m, "version": version}),
            kind,
        );
    }
    app.err(
        "switch_version",
        json!({"conversationId": c, "messageId": "999999", "version": 1}),
        "not_found",
    );
    app.err(
        "switch_version",
        json!({"conversationId": "999999", "messageId": m, "version": 1}),
        "not_found",
    );
    assert_eq!(
        ids(&app.conversation(&c))[..before_edit.len()],
        before_edit[..]
    );
}

/// Saved memories: a chat's memory saved under a name starts new chats that read only their own
/// messages on top of it (nothing of the source is read again); the library lists, renames and
/// deletes them; a chat started from a memory keeps going once the memory is deleted.
#[test]
fn a_saved_memory_starts_new_chats_that_read_only_their_own_messages() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 6);
    let c = app.new_conversation();
    let msg = app.err(
        "save_memory",
        json!({"conversationId": c, "name": "Numbers"}),
        "not_found",
    );
    assert!(msg.contains("no saved memory yet"), "{msg}");
    let (_, first) = send(&app, &c, "Remember the number 7.");
    assert_eq!(last_kind(&first), "done", "{first:?}");
    let mem1 = first.last().expect("done")["memory"].clone();
    let total1 = mem1["totalTokens"].as_u64().expect("total");

    let saved = app.ok(
        "save_memory",
        json!({"conversationId": c, "name": "  Numbers  "}),
    );
    assert_eq!(saved["name"], "Numbers");
    assert_eq!(saved["tokens"].as_u64(), Some(total1));
    assert!(
        saved["sizeBytes"].as_u64().is_some_and(|n| n > 0),
        "{saved}"
    );
    let id = saved["id"].as_str().expect("id").to_string();
    for bad in [json!(""), json!("   "), json!("x".repeat(201))] {
        app.err(
            "save_memory",
            json!({"conversationId": c, "name": bad}),
            "invalid_settings",
        );
    }
    let listed = app.ok("list_memories", json!({}));
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // A new chat from it: its meter is the memory's, and its first turn starts from it.
    let chat = app.ok("new_chat_from_memory", json!({"id": id}));
    assert_eq!(chat["title"], "Numbers");
    let n = chat["id"].as_str().expect("id").to_string();
    assert_eq!(app.conversation(&n)["memory"], mem1);
    let (_, events) = send(&app, &n, "Which number?");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    assert_eq!(
        events[0]["memory"]["totalTokens"].as_u64(),
        Some(total1),
        "started from the saved memory"
    );
    let prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(
        prompt < total1,
        "only the new chat's text was read: {prompt}"
    );

    // Rename, delete: the chat started from it goes on from its own snapshot.
    app.ok("rename_memory", json!({"id": id, "name": "Lucky numbers"}));
    assert_eq!(
        app.ok("list_memories", json!({}))[0]["name"],
        "Lucky numbers"
    );
    app.err(
        "rename_memory",
        json!({"id": id, "name": " "}),
        "invalid_settings",
    );
    let files_before = std::fs::read_dir(dir.path().join("states").join("memories"))
        .expect("memories folder")
        .count();
    assert_eq!(files_before, 2, "the state and its meter");
    app.ok("delete_memory", json!({"id": id}));
    assert_eq!(app.ok("list_memories", json!({})), json!([]));
    let files_after = std::fs::read_dir(dir.path().join("states").join("memories"))
        .expect("memories folder")
        .count();
    assert_eq!(files_after, 0, "its files went with it");
    let mem_n = events.last().expect("done")["memory"].clone();
    let (_, again) = send(&app, &n, "Thanks.");
    assert_eq!(last_kind(&again), "done", "{again:?}");
    assert_eq!(again[0]["memory"], mem_n, "continued from its own state");
    for (cmd, args) in [
        ("new_chat_from_memory", json!({"id": id})),
        ("delete_memory", json!({"id": id})),
        ("rename_memory", json!({"id": id, "name": "x"})),
        ("new_chat_from_memory", json!({"id": "abc"})),
        (
            "save_memory",
            json!({"conversationId": "999999", "name": "x"}),
        ),
    ] {
        app.err(cmd, args, "not_found");
    }
}

/// A one-page PDF showing `text` (Helvetica), with a correct cross-reference table.
fn tiny_pdf(text: &str) -> Vec<u8> {
    let stream = format!("BT /F1 12 Tf 72 712 Td ({text}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_string(),
        format!(
            "<< /Length {} >>\nstream\n{stream}\nendstream",
            stream.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for o in offsets {
        pdf.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    pdf
}

/// `send_document` on `conversation`: the result or the error, and the events to the end.
fn send_doc(
    app: &TestApp,
    conversation: &str,
    path: &std::path::Path,
    question: &str,
) -> Result<Vec<serde_json::Value>, tptt_chat::CommandError> {
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::send_document(
        app.state(),
        conversation.into(),
        path.display().to_string(),
        question.into(),
        ch,
    ))?;
    Ok(until_end(&rx))
}

/// Documents: a file is read into the chat as one message with its question; the message
/// shows the question and the attachment (name, kind, size, characters), the model read the
/// document (its prompt), and the chat goes on from its snapshot; Markdown, HTML and PDF; bad
/// files are refused before anything is stored.
#[test]
fn a_document_is_read_into_the_chat_and_shown_as_an_attachment() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 6);
    let c = app.new_conversation();
    let notes = dir.path().join("notes.md");
    let text = "# Garden notes\n\nThe roses bloom in June. ".repeat(40);
    std::fs::write(&notes, &text).expect("write");
    // A dropped file is inspected as the dialog's is.
    let info = app.ok("inspect_document", json!({"path": notes}));
    assert_eq!(
        (info["name"].as_str(), info["kind"].as_str()),
        (Some("notes.md"), Some("markdown"))
    );
    assert_eq!(info["chars"].as_u64(), Some(text.chars().count() as u64));
    let events = send_doc(&app, &c, &notes, "What blooms in June?").expect("sent");
    assert_eq!(last_kind(&events), "done", "{events:?}");
    let prompt = events.last().expect("done")["stats"]["promptTokens"]
        .as_u64()
        .expect("prompt");
    assert!(prompt > 200, "the document was read: {prompt} tokens");
    let mem = events.last().expect("done")["memory"].clone();
    let conv = app.conversation(&c);
    let m = &conv["messages"][0];
    assert_eq!(m["content"], "What blooms in June?");
    assert_eq!(m["attachment"]["name"], "notes.md");
    assert_eq!(m["attachment"]["kind"], "markdown");
    assert_eq!(m["attachment"]["bytes"].as_u64(), Some(text.len() as u64));
    assert!(m["attachment"]["chars"]
        .as_u64()
        .is_some_and(|n| n >= text.len() as u64));
    // The chat goes on from its snapshot: nothing read again.
    let (_, next) = send(&app, &c, "And in July?");
    assert_eq!(next[0]["memory"], mem, "continued");

    // HTML and PDF: their text is what is read.
    let page = dir.path().join("page.html");
    std::fs::write(
        &page,
        "<html><script>x()</script><p>Tulips &amp; roses</p></html>",
    )
    .expect("write");
    let pdf = dir.path().join("paper.pdf");
    std::fs::write(&pdf, tiny_pdf("Hello PDF world")).expect("write");
    for (path, kind) in [(&page, "html"), (&pdf, "pdf")] {
        let events = send_doc(&app, &c, path, "").expect("sent");
        assert_eq!(last_kind(&events), "done", "{events:?}");
        let conv = app.conversation(&c);
        let messages = conv["messages"].as_array().expect("messages");
        let user = &messages[messages.len() - 2];
        assert_eq!(user["attachment"]["kind"], kind);
        assert_eq!(user["content"], "", "no question typed");
    }
    let stored = block_on(
        app.state()
            .store
            .list_messages(tptt_store::ConversationId(c.parse().expect("id"))),
    )
    .expect("messages")
    .items;
    let pdf_message = &stored[stored.len() - 2];
    assert!(
        pdf_message.content.contains("Hello PDF world"),
        "{}",
        pdf_message.content
    );
    let html_message = &stored[stored.len() - 4];
    assert!(
        html_message.content.contains("Tulips & roses") && !html_message.content.contains("x()"),
        "{}",
        html_message.content
    );

    // Bad files: refused with the file's name before anything is stored.
    let count = || app.conversation(&c)["messages"].as_array().map(Vec::len);
    let before = count();
    let binary = dir.path().join("movie.mkv");
    std::fs::write(&binary, [0x1a, 0x45, 0xdf, 0xa3, 0, 0, 0, 0]).expect("write");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, b"").expect("write");
    let broken = dir.path().join("broken.pdf");
    std::fs::write(&broken, b"%PDF-1.7\n1 0 obj << /Type /Catalog").expect("write");
    let refused = app.err(
        "inspect_document",
        json!({"path": binary}),
        "invalid_settings",
    );
    assert!(refused.contains("movie.mkv: is a binary file"), "{refused}");
    for (path, says) in [
        (binary, "movie.mkv: is a binary file"),
        (empty, "empty.txt: is empty"),
        (broken, "broken.pdf: is "),
        (dir.path().join("gone.md"), "gone.md: cannot be read"),
    ] {
        let e = send_doc(&app, &c, &path, "?").expect_err("refused");
        assert_eq!(
            e.kind,
            tptt_chat::ErrorKind::InvalidSettings,
            "{}",
            e.message
        );
        assert!(e.message.contains(says), "{}", e.message);
        assert_eq!(count(), before, "nothing stored");
    }
}

/// A crafted backup: `backup.json` with `manifest`, and `extra` entries.
fn crafted_backup(path: &std::path::Path, manifest: &serde_json::Value, extra: &[(&str, &[u8])]) {
    use std::io::Write;
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).expect("create"));
    zip.start_file("backup.json", options).expect("entry");
    zip.write_all(manifest.to_string().as_bytes())
        .expect("write");
    for (name, bytes) in extra {
        zip.start_file(*name, options).expect("entry");
        zip.write_all(bytes).expect("write");
    }
    zip.finish().expect("finish");
}

/// Backup and restore: every conversation into one file and into another app's data (new
/// conversations, nothing there touched); with states, an imported chat continues without
/// re-reading, without them its memory is rebuilt from the text; a file that is not a backup,
/// cut short, edited, from a newer version or naming entries outside its states is refused with
/// a message and changes nothing.
#[test]
fn a_backup_restores_the_conversations_and_their_memory_in_another_app() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::offline(dir.path());
    app.use_tiny("delta_rule", 6);
    let c = app.new_conversation();
    let (_, first) = send(&app, &c, "Remember the number 7.");
    assert_eq!(last_kind(&first), "done", "{first:?}");
    let mem1 = first.last().expect("done")["memory"].clone();
    app.ok("set_conversation_pinned", json!({"id": c, "pinned": true}));
    let c2 = app.new_conversation();
    let (_, other) = send(&app, &c2, "Hello there.");
    assert_eq!(last_kind(&other), "done", "{other:?}");

    let full = dir.path().join("backup.zip");
    let text_only = dir.path().join("text.zip");
    let written = block_on(tptt_chat::backup::write(&app.state(), &full, true)).expect("backup");
    assert_eq!((written.conversations, written.states), (2, 2));
    // The states' KV pages travel with them, each once.
    let names: Vec<String> = {
        let zip = zip::ZipArchive::new(std::fs::File::open(&full).expect("open")).expect("zip");
        zip.file_names()
            .map(|n| n.map(|s| s.to_string()).unwrap_or_default())
            .collect()
    };
    let pages = names.iter().filter(|n| n.starts_with("pages/")).count();
    assert!(pages > 0, "{names:?}");
    let light =
        block_on(tptt_chat::backup::write(&app.state(), &text_only, false)).expect("backup");
    assert_eq!((light.conversations, light.states), (2, 0));
    assert!(
        light.bytes < written.bytes,
        "{} < {}",
        light.bytes,
        written.bytes
    );

    // Another app's data, with a conversation of its own.
    let dir2 = tempfile::tempdir().expect("dir");
    let app2 = TestApp::offline(dir2.path());
    app2.use_tiny("delta_rule", 6);
    let own = app2.new_conversation();
    let count = |app: &TestApp| {
        app.ok("list_conversations", json!({"query": null}))
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    let done = block_on(tptt_chat::backup::import(&app2.state(), &full)).expect("import");
    assert_eq!((done.conversations, done.states), (2, 2));
    let listed = app2.ok("list_conversations", json!({"query": null}));
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert_eq!(
        listed[0]["pinned"],
        json!(true),
        "the pin came along: {listed}"
    );
    let imported = listed[0]["id"].as_str().expect("id").to_string();
    assert_ne!(imported, own);
    let conv = app2.conversation(&imported);
    assert_eq!(conv["messages"][0]["content"], "Remember the number 7.");
    let without_ids = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        let mut out = v.as_array().expect("messages").clone();
        for m in &mut out {
            m["id"] = json!(null);
        }
        out
    };
    assert_eq!(
        without_ids(&conv["messages"]),
        without_ids(&app.conversation(&c)["messages"]),
        "new ids, everything else as it was"
    );
    assert_eq!(conv["memory"], mem1, "the meter came with the state");
    let (_, next) = send(&app2, &imported, "Which number?");
    assert_eq!(last_kind(&next), "done", "{next:?}");
    assert_eq!(
        next[0]["memory"], mem1,
        "continued from the imported state, nothing re-read"
    );
    assert!(
        app2.conversation(&own)["messages"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "untouched"
    );

    // Without states: the memory is rebuilt from the text at the next turn.
    let ids = |app: &TestApp| -> Vec<String> {
        app.ok("list_conversations", json!({"query": null}))
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["id"].as_str().map(String::from))
            .collect()
    };
    let known = ids(&app2);
    let done = block_on(tptt_chat::backup::import(&app2.state(), &text_only)).expect("import");
    assert_eq!((done.conversations, done.states), (2, 0));
    let plain = ids(&app2)
        .into_iter()
        .filter(|id| !known.contains(id))
        .find(|id| app2.conversation(id)["messages"][0]["content"] == "Remember the number 7.")
        .expect("the imported copy");
    let (_, rebuilt) = send(&app2, &plain, "Which number?");
    assert_eq!(
        rebuilt[0]["memory"]["totalTokens"], 0,
        "rebuilt from the text"
    );

    // Bad files: refused, nothing changes.
    let before = count(&app2);
    let bytes = std::fs::read(&full).expect("read");
    let bad = |name: &str, contents: &[u8]| {
        let p = dir2.path().join(name);
        std::fs::write(&p, contents).expect("write");
        p
    };
    let mut edited = bytes.clone();
    let middle = edited.len() / 2;
    edited[middle] ^= 0x55;
    let newer = dir2.path().join("newer.zip");
    crafted_backup(
        &newer,
        &json!({"format": "tptt-chat-backup", "version": 2, "future": true}),
        &[],
    );
    let foreign = dir2.path().join("foreign.zip");
    crafted_backup(
        &foreign,
        &json!({"format": "something-else", "version": 1}),
        &[],
    );
    let conversation = |state: serde_json::Value| {
        json!({"format": "tptt-chat-backup", "version": 1, "appVersion": "0", "createdAt": 0, "states": true,
            "conversations": [{"title": "x", "createdAt": 0, "updatedAt": 0, "model": null, "variant": null,
                "settings": {}, "archived": false, "pinned": false,
                "messages": [{"role": "user", "content": "hi", "status": "complete", "error": null,
                    "createdAt": 0, "updatedAt": 0, "tokenCount": null, "stats": null}],
                "state": state}]})
    };
    let state_entry = |file: &str, message: usize, size: u64| {
        json!({"message": message, "model": "m", "variant": "v", "configHash": "h", "file": file,
            "meta": null, "sizeBytes": size, "tokenCount": 1})
    };
    let escape = dir2.path().join("escape.zip");
    crafted_backup(
        &escape,
        &conversation(state_entry("../../escape.safetensors", 0, 3)),
        &[("../../escape.safetensors", b"abc")],
    );
    let beyond = dir2.path().join("beyond.zip");
    crafted_backup(
        &beyond,
        &conversation(state_entry("states/0.safetensors", 5, 3)),
        &[("states/0.safetensors", b"abc")],
    );
    let missing = dir2.path().join("missing.zip");
    crafted_backup(
        &missing,
        &conversation(state_entry("states/0.safetensors", 0, 3)),
        &[],
    );
    let lying = dir2.path().join("lying.zip");
    crafted_backup(
        &lying,
        &conversation(state_entry("states/0.safetensors", 0, 1 << 20)),
        &[("states/0.safetensors", b"abc")],
    );
    let with_pages = |pages: serde_json::Value| {
        let mut s = state_entry("states/0.safetensors", 0, 3);
        s["pages"] = pages;
        conversation(s)
    };
    let page_escape = dir2.path().join("page-escape.zip");
    crafted_backup(
        &page_escape,
        &with_pages(json!(["../../escape"])),
        &[("states/0.safetensors", b"abc")],
    );
    let page_missing = dir2.path().join("page-missing.zip");
    crafted_backup(
        &page_missing,
        &with_pages(json!(["0123456789abcdef0123456789abcdef"])),
        &[("states/0.safetensors", b"abc")],
    );
    let bad_role = dir2.path().join("role.zip");
    let mut m = conversation(json!(null));
    m["conversations"][0]["messages"][0]["role"] = json!("admin");
    crafted_backup(&bad_role, &m, &[]);
    for (path, says) in [
        (bad("empty.zip", b""), "not a TPTT Chat backup"),
        (
            bad("text.txt", b"hello, not a zip"),
            "not a TPTT Chat backup",
        ),
        (bad("cut.zip", &bytes[..bytes.len() / 2]), "cut short"),
        (bad("edited.zip", &edited), "damaged"),
        (newer, "newer version"),
        (foreign, "not a TPTT Chat backup"),
        (escape, "not a state entry name"),
        (beyond, "follows message 6 of 1"),
        (missing, "missing"),
        (lying, "bytes"),
        (page_escape, "not a page name"),
        (
            page_missing,
            "pages/0123456789abcdef0123456789abcdef.kvpage is missing",
        ),
        (bad_role, "conversation 1 message 1"),
        (dir2.path().join("absent.zip"), "cannot be read"),
    ] {
        let e = block_on(tptt_chat::backup::import(&app2.state(), &path)).expect_err("refused");
        assert_eq!(
            e.kind,
            tptt_chat::ErrorKind::InvalidSettings,
            "{}: {}",
            path.display(),
            e.message
        );
        assert!(
            e.message.contains(says),
            "{}: {}",
            path.display(),
            e.message
        );
        assert!(e.message.contains("Nothing was changed"), "{}", e.message);
        assert_eq!(count(&app2), before, "{}", path.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir2.path().join("states"))
        .expect("states")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("import-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary folder left: {leftovers:?}"
    );
    assert!(!dir2.path().join("escape.safetensors").exists());
}

/// `regenerate` on `conversation`, to its end.
fn app_regenerate(app: &TestApp, conversation: &str) -> Vec<serde_json::Value> {
    let (ch, rx) = channel();
    block_on(tptt_chat::commands::regenerate(
        app.state(),
        conversation.into(),
        ch,
    ))
    .expect("regenerate");
    until_end(&rx)
}
