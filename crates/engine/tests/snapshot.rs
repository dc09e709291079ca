//! State snapshots (`tptt_engine::snapshot`):
//!
//! * save → restore → continue gives exactly (bit for bit) the tokens and logits of continuing
//!   without the round trip, for every fixture variant of both bases, with a window that has
//!   filled and one that has not; the snapshot reports its size and position;
//! * a snapshot restored onto another model, variant or config, or a corrupt, truncated, foreign
//!   or missing file, is refused with a clear error, never a panic.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{token_ids, Fixture, Scratch, REPOS};
use tokenizers::Tokenizer;
use tptt::linear::CarryMode;
use tptt::state::KvFormat;
use tptt_engine::identity::LegacyDigests;
use tptt_engine::snapshot::{self, config_hash};
use tptt_engine::{
    CancelToken, Error, FinishReason, GenerateOptions, ModelIdentity, SamplingParams, Session,
    SessionOptions,
};

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    let params = SamplingParams {
        max_new_tokens,
        ..SamplingParams::greedy()
    };
    GenerateOptions {
        params,
        eos_ids: vec![2],
        ignore_eos: true,
        ..Default::default()
    }
}

fn generate(session: &mut Session, prompt: &[u32], n: usize, tok: &Tokenizer) -> Vec<u32> {
    let out = session
        .generate(prompt, &greedy(n), tok, &CancelToken::new(), &mut |_| {})
        .expect("generate");
    assert_eq!(out.finish, FinishReason::MaxTokens);
    assert_eq!(out.ids.len(), n);
    out.ids
}

/// Bitwise equality of two logit vectors (the round trip must not change a single value).
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Continue `session` greedily for `n` tokens, then feed `extra` one by one; returns the ids and
/// every logit vector seen (after each generated token and each extra token).
fn continue_and_record(
    session: &mut Session,
    n: usize,
    extra: &[u32],
    tok: &Tokenizer,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut logits = vec![session
        .last_logits
        .clone()
        .expect("logits to continue from")];
    let ids = generate(session, &[], n, tok);
    logits.push(session.last_logits.clone().expect("logits"));
    for &id in extra {
        session.feed(&[id], None).expect("feed");
        logits.push(session.last_logits.clone().expect("logits"));
    }
    (ids, logits)
}

fn round_trip(fx: &Fixture, opts: SessionOptions, scratch: &Scratch) {
    let label = format!("{} {opts:?}", fx.label());
    let tok = fx.tokenizer();
    let vocab = fx.model.config().base.vocab_size;
    let model = fx.arc();
    let identity = fx.identity();
    let mut live = Session::new(model.clone(), opts);
    generate(&mut live, &token_ids(13, vocab, 3), 7, &tok);
    let path = scratch.path(&format!(
        "{}-{}-{}.tptt-state",
        fx.files.name,
        opts.window.unwrap_or(0),
        opts.kv_format.as_str()
    ));
    let bytes = snapshot::save(&live, &identity, &path).expect("save");

    // The snapshot reports its size and what it holds.
    assert_eq!(
        bytes,
        std::fs::metadata(&path).expect("snapshot written").len(),
        "{label}: reported size"
    );
    let info = snapshot::info(&path).expect("info");
    assert_eq!(info.bytes, bytes, "{label}");
    assert_eq!(info.identity, identity, "{label}");
    assert_eq!(
        (info.pos, info.kv_len, info.window),
        (live.state.pos, live.state.kv_len(), live.state.window),
        "{label}"
    );

    let mut restored = snapshot::load(model.clone(), &identity, &path).expect("load");
    assert_eq!(restored.tokens, live.tokens, "{label}: tokens");
    assert_eq!(restored.surprise, live.surprise, "{label}: surprise record");
    assert_eq!(restored.state.pos, live.state.pos, "{label}: pos");
    assert_eq!(
        restored.state.key_pos, live.state.key_pos,
        "{label}: key positions"
    );
    assert_eq!(restored.state.mode, live.state.mode, "{label}: mode");
    assert_eq!(
        restored.state.kv_format, live.state.kv_format,
        "{label}: the snapshot keeps the KV format"
    );
    assert_eq!(restored.state.window, live.state.window, "{label}: window");
    for (a, b) in restored.state.layers.iter().zip(&live.state.layers) {
        assert_eq!(a.linear, b.linear, "{label}: linear carry");
        // Restored at the capacity the next in-place write needs (no reallocation then).
        if restored.state.mode == CarryMode::Continue {
            let cap = a.k.as_ref().map_or(0, |k| k.dim(1).expect("KV slots"));
            let need = restored
                .state
                .window
                .map_or(restored.state.kv_len() + 1, |w| {
                    w.min(restored.state.kv_len() + 1)
                });
            assert!(cap >= need, "{label}: restored KV capacity {cap} < {need}");
        }
    }

    let extra = token_ids(5, vocab, 17);
    let (want_ids, want_logits) = continue_and_record(&mut live, 9, &extra, &tok);
    let (got_ids, got_logits) = continue_and_record(&mut restored, 9, &extra, &tok);
    assert_eq!(got_ids, want_ids, "{label}: continued ids");
    for (step, (g, w)) in got_logits.iter().zip(&want_logits).enumerate() {
        assert!(
            same_bits(g, w),
            "{label}: logits differ at step {step} (max |Δ| {:e})",
            common::max_abs_diff(g, w)
        );
    }
    // KV capacity is an allocation detail until the window is full; then it is W slots in both.
    if live.state.window == Some(live.state.kv_len()) {
        assert_eq!(
            restored.state.size_bytes(),
            live.state.size_bytes(),
            "{label}: state size with a full window"
        );
    }
}

#[test]
fn save_restore_continue_is_exact_for_every_variant() {
    let scratch = Scratch::new("roundtrip");
    for repo in REPOS {
        for v in common::variants(repo) {
            let fx = Fixture::load(repo, &v);
            // A window that has not filled (config's or the default) and one that has (8 < 20).
            round_trip(&fx, SessionOptions::default(), &scratch);
            round_trip(
                &fx,
                SessionOptions {
                    window: Some(8),
                    ..Default::default()
                },
                &scratch,
            );
            // A compact (f16) cache is saved and restored as such: the same bits continue.
            round_trip(
                &fx,
                SessionOptions {
                    window: Some(8),
                    kv_format: KvFormat::F16,
                    ..Default::default()
                },
                &scratch,
            );
        }
    }
    // An 8-bit cache (heads of 32 values: the synthetic repo) is saved and restored as such,
    // with a window that has filled and without one.
    let fx = Fixture::synthetic_d32(&scratch.path("synthetic"));
    for window in [Some(8), None] {
        round_trip(
            &fx,
            SessionOptions {
                window,
                kv_format: KvFormat::Q8_0,
                ..Default::default()
            },
            &scratch,
        );
    }
    // The reference-compatible mode round-trips too (its mode is part of the snapshot).
    let fx = Fixture::load("tptt-llama", "delta_product");
    round_trip(
        &fx,
        SessionOptions {
            mode: CarryMode::Reference,
            window: Some(64),
            ..Default::default()
        },
        &scratch,
    );
}

/// A snapshot of `tptt-llama/delta_product` (order 2: every kind of carry present), 20 tokens.
fn saved(scratch: &Scratch) -> (Fixture, std::path::PathBuf) {
    let fx = Fixture::load("tptt-llama", "delta_product");
    let mut s = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(8),
            ..Default::default()
        },
    );
    generate(&mut s, &token_ids(12, 300, 5), 8, &fx.tokenizer());
    let path = scratch.path("base.tptt-state");
    snapshot::save(&s, &fx.identity(), &path).expect("save");
    (fx, path)
}

/// The reason of an `Error::Snapshot` (any other outcome fails the test).
fn snapshot_reason(r: tptt_engine::Result<Session>, what: &str) -> String {
    match r {
        Err(Error::Snapshot { reason, .. }) => reason,
        Err(e) => panic!("{what}: expected Error::Snapshot, got {e:?}"),
        Ok(_) => panic!("{what}: the snapshot was accepted"),
    }
}

fn load_onto(fx: &Fixture, identity: &ModelIdentity, path: &Path) -> tptt_engine::Result<Session> {
    snapshot::load(fx.arc(), identity, path)
}

#[test]
fn snapshot_of_another_model_variant_or_config_is_refused() {
    let scratch = Scratch::new("identity");
    let (fx, path) = saved(&scratch);

    let other_variant = Fixture::load("tptt-llama", "delta_rule");
    let reason = snapshot_reason(
        load_onto(&other_variant, &other_variant.identity(), &path),
        "another variant",
    );
    assert!(
        reason.contains("\"delta_product\"") && reason.contains("\"delta_rule\""),
        "another variant: {reason}"
    );

    let other_base = Fixture::load("tptt-qwen2", "delta_product");
    let reason = snapshot_reason(
        load_onto(&other_base, &other_base.identity(), &path),
        "another model",
    );
    assert!(
        reason.contains("tptt-llama") && reason.contains("tptt-qwen2"),
        "another model: {reason}"
    );

    // The same variant with a changed setting is another config.
    let mut changed = fx.model.clone();
    changed.set_mag_weight(0.25);
    let identity = ModelIdentity {
        config_hash: config_hash(changed.config()),
        ..fx.identity()
    };
    assert_ne!(
        identity.config_hash,
        fx.identity().config_hash,
        "mag_weight is part of the config hash"
    );
    let reason = snapshot_reason(
        snapshot::load(Arc::new(changed), &identity, &path),
        "another config",
    );
    assert!(reason.contains("configuration"), "another config: {reason}");

    let mut chunked = fx.model.clone();
    chunked.set_max_chunk_size(3).expect("chunk");
    let identity = ModelIdentity {
        config_hash: config_hash(chunked.config()),
        ..fx.identity()
    };
    let reason = snapshot_reason(
        snapshot::load(Arc::new(chunked), &identity, &path),
        "another chunk size",
    );
    assert!(
        reason.contains("configuration"),
        "another chunk size: {reason}"
    );

    // The untouched file still loads onto its own model.
    load_onto(&fx, &fx.identity(), &path).expect("own model");
}

/// Where a safetensors file's data section starts.
fn data_start(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize
}

#[test]
fn corrupt_truncated_foreign_and_missing_files_are_refused() {
    let scratch = Scratch::new("corrupt");
    let (fx, path) = saved(&scratch);
    let identity = fx.identity();
    let good = std::fs::read(&path).expect("read snapshot");
    let start = data_start(&good);
    let bad = scratch.path("bad.tptt-state");

    // Flipped bytes in the tensor data: at the start, middle and end of the data section.
    for at in [start, start + (good.len() - start) / 2, good.len() - 1] {
        let mut b = good.clone();
        b[at] ^= 0x5a;
        std::fs::write(&bad, &b).expect("write");
        let reason = snapshot_reason(
            load_onto(&fx, &identity, &bad),
            &format!("byte {at} flipped"),
        );
        assert!(reason.contains("corrupt"), "byte {at} flipped: {reason}");
    }

    // Truncated: inside the data, inside the header, before the header length, empty.
    for len in [good.len() - 1, good.len() - 100, start - 10, 5, 0] {
        std::fs::write(&bad, &good[..len]).expect("write");
        let reason = snapshot_reason(
            load_onto(&fx, &identity, &bad),
            &format!("truncated to {len}"),
        );
        assert!(
            reason.contains("not a valid snapshot file"),
            "truncated to {len}: {reason}"
        );
    }

    // A safetensors file that is not a snapshot: the fixture's own weights.
    let weights = common::fixtures().join("llama-base/model.safetensors");
    let reason = snapshot_reason(load_onto(&fx, &identity, &weights), "weights file");
    assert!(
        reason.contains("not a TPTT Chat state snapshot"),
        "weights file: {reason}"
    );
    // Not a safetensors file at all.
    std::fs::write(&bad, b"{\"hello\": \"world\"}").expect("write");
    let reason = snapshot_reason(load_onto(&fx, &identity, &bad), "JSON file");
    assert!(
        reason.contains("not a valid snapshot file"),
        "JSON file: {reason}"
    );

    // A missing file is an I/O error naming the path.
    let missing = scratch.path("missing.tptt-state");
    match load_onto(&fx, &identity, &missing) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("missing.tptt-state"), "{e}"),
        Err(e) => panic!("missing file: expected Error::Io, got {e:?}"),
        Ok(_) => panic!("missing file accepted"),
    }
    assert!(matches!(snapshot::info(&missing), Err(Error::Io { .. })));
}

#[test]
fn every_single_byte_flip_is_refused_without_panicking() {
    let scratch = Scratch::new("flips");
    let (fx, path) = saved(&scratch);
    let identity = fx.identity();
    let model = fx.arc();
    let good = std::fs::read(&path).expect("read snapshot");
    let start = data_start(&good);
    let bad = scratch.path("bad.tptt-state");
    // Every header byte (length, JSON, padding) and every 13th data byte.
    let positions: Vec<usize> = (0..start).chain((start..good.len()).step_by(13)).collect();
    let mut accepted = Vec::new();
    for &at in &positions {
        for mask in [0x01u8, 0x80] {
            let mut b = good.clone();
            b[at] ^= mask;
            std::fs::write(&bad, &b).expect("write");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                snapshot::load(model.clone(), &identity, &bad)
            }));
            match r {
                Err(_) => panic!("loading a snapshot with byte {at} ^ {mask:#x} panicked"),
                Ok(Ok(_)) => accepted.push(format!("{at} ^ {mask:#x}")),
                Ok(Err(Error::Snapshot { .. })) => {}
                Ok(Err(e)) => panic!("byte {at} ^ {mask:#x}: expected Error::Snapshot, got {e:?}"),
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "{} of {} corrupted files were accepted: {:?}",
        accepted.len(),
        positions.len() * 2,
        &accepted[..accepted.len().min(20)]
    );
}

/// `tests/fixtures/snapshot-v2.tptt-state`: written by the version 2 writer (before the
/// version 3 checksum) from `tptt-llama/delta_product` as in [`saved`] (window 8, 20 tokens),
/// with `model` = `tests/fixtures/tiny/tptt-llama`.
fn v2_fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v2.tptt-state")
}

#[test]
fn version_2_snapshots_still_load_and_continue() {
    let path = v2_fixture();
    let fx = Fixture::load("tptt-llama", "delta_product");
    let info = snapshot::info(&path).expect("info of a v2 file");
    assert_eq!((info.pos, info.kv_len, info.window), (20, 8, Some(8)));
    // A version 2 file is judged by the identity of its time: its config hash is the old one
    // (of the config's `Debug` text), and it has no weights fingerprint to check.
    assert_ne!(info.identity.config_hash, fx.identity().config_hash);
    assert_eq!(info.identity.weights, "");
    let identity = ModelIdentity {
        model: info.identity.model.clone(),
        ..fx.identity()
    };
    let mut restored = snapshot::load(fx.arc(), &identity, &path).expect("a v2 snapshot loads");
    let bytes = std::fs::read(&path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .expect(name)
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let u32s = |name: &str| -> Vec<u32> {
        st.tensor(name)
            .expect(name)
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    assert_eq!(restored.tokens, u32s("tokens"));
    assert_eq!(
        restored.state.key_pos,
        u32s("key_pos")
            .into_iter()
            .map(|p| p as usize)
            .collect::<Vec<_>>()
    );
    assert!(same_bits(
        restored.last_logits.as_deref().expect("logits"),
        &f32s("last_logits")
    ));
    for (i, l) in restored.state.layers.iter().enumerate() {
        assert!(
            same_bits(&l.linear.state, &f32s(&format!("layers.{i}.state"))),
            "layer {i} state"
        );
        for (t, name) in [(&l.k, "k"), (&l.v, "v")] {
            let view = t
                .as_ref()
                .expect("kv")
                .narrow(1, 0, 8)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1::<f32>())
                .expect("kv values");
            assert!(
                same_bits(&view, &f32s(&format!("layers.{i}.{name}"))),
                "layer {i} {name}"
            );
        }
    }
    // It continues, and saving it again writes the current version, which restores the same.
    generate(&mut restored, &[], 3, &fx.tokenizer());
    let scratch = Scratch::new("v2");
    let again = scratch.path("again.tptt-state");
    snapshot::save(&restored, &identity, &again).expect("save as the current version");
    let v3 = std::fs::read(&again).expect("read");
    let (_, md) = safetensors::SafeTensors::read_metadata(&v3).expect("header");
    assert_eq!(
        md.metadata()
            .as_ref()
            .and_then(|m| m.get("version"))
            .map(String::as_str),
        Some(snapshot::SNAPSHOT_VERSION)
    );
    let back = snapshot::load(fx.arc(), &identity, &again).expect("current version load");
    assert_eq!(back.tokens, restored.tokens);
    assert!(same_bits(
        back.last_logits.as_deref().expect("logits"),
        restored.last_logits.as_deref().expect("logits")
    ));

    // The v2 checksum is still checked: a flipped data byte is refused as corrupt.
    let start = data_start(&bytes);
    let bad = scratch.path("bad-v2.tptt-state");
    let mut b = bytes.clone();
    let at = start + (bytes.len() - start) / 3;
    b[at] ^= 0x10;
    std::fs::write(&bad, &b).expect("write");
    let reason = snapshot_reason(snapshot::load(fx.arc(), &identity, &bad), "flipped v2 byte");
    assert!(reason.contains("corrupt"), "{reason}");
}

#[test]
fn unknown_versions_are_refused_clearly() {
    let bytes = std::fs::read(v2_fixture()).expect("read");
    let start = data_start(&bytes);
    let header = std::str::from_utf8(&bytes[8..start]).expect("utf-8 header");
    let tag = "\"version\":\"2\"";
    assert!(header.contains(tag), "fixture header: {header}");
    let scratch = Scratch::new("future");
    let fx = Fixture::load("tptt-llama", "delta_product");
    for v in ["7", "1", "x"] {
        let changed = header.replace(tag, &format!("\"version\":\"{v}\""));
        let mut b = bytes[..8].to_vec();
        b.extend_from_slice(changed.as_bytes());
        b.extend_from_slice(&bytes[start..]);
        let path = scratch.path(&format!("v{v}.tptt-state"));
        std::fs::write(&path, &b).expect("write");
        let reason = snapshot_reason(
            snapshot::load(fx.arc(), &fx.identity(), &path),
            &format!("version {v}"),
        );
        assert!(
            reason.contains(&format!("version \"{v}\" is not supported")),
            "version {v}: {reason}"
        );
        match snapshot::info(&path) {
            Err(Error::Snapshot { reason, .. }) => {
                assert!(reason.contains("not supported"), "{reason}")
            }
            other => panic!("info of version {v}: {other:?}"),
        }
    }
}

#[test]
fn a_surprise_record_with_impossible_values_is_refused() {
    // Written through `save`, so the checksum is right: the values themselves must be checked.
    let scratch = Scratch::new("surprise");
    let fx = Fixture::load("tptt-llama", "delta_rule");
    let mut s = Session::new(fx.arc(), SessionOptions::default());
    s.feed(&token_ids(40, 300, 2), None).expect("feed");
    assert!(s.surprise.samples > 0, "a 40-token prompt is sampled");
    type Spoil = fn(&mut tptt_engine::Surprise);
    let bad: [(&str, Spoil); 4] = [
        ("too many recent samples", |x| x.recent.extend([1.0; 80])),
        ("negative sample", |x| x.recent.push_back(-1.0)),
        ("infinite early sum", |x| x.early_sum = f64::INFINITY),
        ("more kept than recorded", |x| x.samples = 0),
    ];
    for (what, spoil) in bad {
        let mut t = s.try_clone().expect("copy");
        spoil(&mut t.surprise);
        let path = scratch.path("bad-surprise.tptt-state");
        snapshot::save(&t, &fx.identity(), &path).expect("save");
        let reason = snapshot_reason(load_onto(&fx, &fx.identity(), &path), what);
        assert!(reason.contains("surprise record"), "{what}: {reason}");
    }
}

/// The read mark (what rendered text the state read) is kept in the snapshot, under its
/// checksum: it comes back from `load_marked`, a plain `save` records none, an edited mark is a
/// corrupt file, and a resealed file with a malformed mark is refused naming it.
#[test]
fn the_read_mark_is_in_the_snapshot_under_its_checksum() {
    use tptt_engine::snapshot::testing::RawSnapshot;
    use tptt_engine::ReadMark;
    let scratch = Scratch::new("mark");
    let (fx, plain) = saved(&scratch);
    let identity = fx.identity();
    let (_, none) = snapshot::load_marked(fx.arc(), &identity, &plain).expect("load");
    assert_eq!(none, None, "a plain save records no mark");

    let session = load_onto(&fx, &identity, &plain).expect("load");
    let mark = ReadMark::of("<|im_start|>user\nhello<|im_end|>\n");
    let marked = scratch.path("marked.tptt-state");
    snapshot::save_marked(&session, &identity, Some(mark), &marked).expect("save");
    let (restored, got) = snapshot::load_marked(fx.arc(), &identity, &marked).expect("load");
    assert_eq!(got, Some(mark));
    assert_eq!(restored.state.pos, session.state.pos);

    // Another mark written over the original (same length), checksum left as it was: corrupt.
    let bytes = std::fs::read(&marked).expect("read");
    let old = format!("\\\"len\\\":{}", mark.len);
    let new = format!("\\\"len\\\":{}", mark.len ^ 1);
    assert_eq!(old.len(), new.len());
    let at = bytes
        .windows(old.len())
        .position(|w| w == old.as_bytes())
        .expect("the mark is in the header");
    let mut b = bytes.clone();
    b[at..at + new.len()].copy_from_slice(new.as_bytes());
    let bad = scratch.path("edited.tptt-state");
    std::fs::write(&bad, &b).expect("write");
    let reason = snapshot_reason(load_onto(&fx, &identity, &bad), "an edited mark");
    assert!(reason.contains("corrupt"), "{reason}");

    // Resealed with a mark that is not one: refused, naming it.
    let mut raw = RawSnapshot::parse(&bytes).expect("parse");
    raw.meta.insert("read_mark".into(), "{\"len\": -1}".into());
    std::fs::write(&bad, raw.to_bytes().expect("bytes")).expect("write");
    let reason = snapshot_reason(load_onto(&fx, &identity, &bad), "a malformed mark");
    assert!(reason.contains("read mark"), "{reason}");
}

/// `tests/fixtures/snapshot-v4.tptt-state`: written by the version 4 writer (FNV checksum and
/// identity digests) from `tptt-llama/delta_product`, window 8, fed `token_ids(20, vocab, 5)`,
/// with `model` = `tests/fixtures/tiny/tptt-llama`.
#[test]
fn version_4_snapshots_still_load_judged_by_their_fnv_identity() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v4.tptt-state");
    let fx = Fixture::load("tptt-llama", "delta_product");
    let info = snapshot::info(&path).expect("info of a v4 file");
    assert_eq!((info.pos, info.kv_len, info.window), (20, 8, Some(8)));
    // Its digests are the FNV ones of the same fields, not today's.
    let identity = ModelIdentity {
        model: info.identity.model.clone(),
        ..fx.identity()
    };
    assert_ne!(info.identity.config_hash, identity.config_hash);
    assert_eq!(info.identity.config_hash, identity.v4.config_hash);
    assert_eq!(info.identity.weights, identity.v4.weights);
    let restored = snapshot::load(fx.arc(), &identity, &path).expect("a v4 snapshot loads");

    // It holds what the same tokens compute today.
    let mut fresh = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(8),
            ..Default::default()
        },
    );
    fresh
        .feed(&token_ids(20, fx.model.config().base.vocab_size, 5), None)
        .expect("feed");
    assert_eq!(restored.tokens, fresh.tokens);
    assert_eq!(restored.state.key_pos, fresh.state.key_pos);
    let (a, b) = (
        restored.last_logits.as_deref().expect("logits"),
        fresh.last_logits.as_deref().expect("logits"),
    );
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "last logits differ by {worst}");

    // Other weights (by the version 4 fingerprint) are refused.
    let other = ModelIdentity {
        v4: LegacyDigests {
            weights: "0123456789abcdef".into(),
            ..identity.v4.clone()
        },
        ..identity.clone()
    };
    let reason = snapshot_reason(load_onto(&fx, &other, &path), "v4, other weights");
    assert!(reason.contains("other weights"), "{reason}");

    // The FNV checksum is still checked.
    let bytes = std::fs::read(&path).expect("read");
    let start = data_start(&bytes);
    let mut b = bytes.clone();
    b[start + (bytes.len() - start) / 2] ^= 0x04;
    let scratch = Scratch::new("v4");
    let bad = scratch.path("bad-v4.tptt-state");
    std::fs::write(&bad, &b).expect("write");
    let reason = snapshot_reason(load_onto(&fx, &identity, &bad), "flipped v4 byte");
    assert!(reason.contains("corrupt"), "{reason}");
}

/// Layer 1's cached keys, as f32.
fn layer1_keys(state: &tptt::state::State) -> Vec<f32> {
    state.layers[1]
        .k_view(state.kv_len())
        .expect("view")
        .expect("keys")
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("f32")
}

/// A session of `fx` with a window of 24 and its cache in `kv_format`, after a 20-token prompt
/// and 6 generated tokens.
fn conversation(fx: &Fixture, kv_format: KvFormat, tok: &Tokenizer) -> Session {
    let mut s = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(24),
            kv_format,
            ..Default::default()
        },
    );
    generate(&mut s, &token_ids(20, 300, 9), 6, tok);
    s
}

/// An 8-bit cache is written as its blocks (u8 rows of 34 bytes per 32 values: its KV bytes
/// 34/128 of the f32 conversation's), and converted on request, never misread: 8-bit → f32 is
/// exact, f32 → 8-bit quantizes each block, 8-bit → f16 rounds the blocks' values. A snapshot
/// opened where 8 bits cannot serve is converted too (`State::from_safetensors` on a GPU: f16).
#[test]
fn an_8_bit_cache_in_snapshots_is_kept_and_converted() {
    let scratch = Scratch::new("kv-q8");
    let fx = Fixture::synthetic_d32(&scratch.path("synthetic"));
    let tok = fx.tokenizer();
    let identity = fx.identity();
    let run = |kv_format: KvFormat| conversation(&fx, kv_format, &tok);
    let (s32, s8) = (run(KvFormat::F32), run(KvFormat::Q8_0));
    let (p32, p8) = (
        scratch.path("f32.tptt-state"),
        scratch.path("q8.tptt-state"),
    );
    let b32 = snapshot::save(&s32, &identity, &p32).expect("save f32");
    let b8 = snapshot::save(&s8, &identity, &p8).expect("save q8_0");
    let b = &fx.model.config().base;
    let kv32 = (s32.state.kv_len() * 2 * b.total_kv_heads() * b.head_dim * 4) as u64;
    let saved = b32 - b8;
    assert!(
        saved.abs_diff(kv32 - kv32 * 34 / 128) <= 512,
        "f32 snapshot {b32} B, q8_0 {b8} B: saved {saved} B of a {kv32} B cache"
    );
    let bytes = std::fs::read(&p8).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let keys = st.tensor("layers.0.k").expect("keys");
    assert_eq!(keys.dtype(), safetensors::Dtype::U8);
    assert_eq!(keys.shape(), [b.num_kv_heads, s8.state.kv_len(), 34]);

    // 8-bit file → f32: the blocks' values exactly.
    let mut widened = snapshot::load(fx.arc(), &identity, &p8).expect("load q8_0");
    assert_eq!(widened.state.kv_format, KvFormat::Q8_0);
    let before = layer1_keys(&widened.state);
    assert_eq!(
        before,
        layer1_keys(&s8.state),
        "restored blocks read the same"
    );
    widened.state.set_kv_format(KvFormat::F32).expect("to f32");
    assert_eq!(layer1_keys(&widened.state), before, "8-bit → f32 is exact");
    // → f16: each of those values rounded to the nearest half.
    let mut halved = snapshot::load(fx.arc(), &identity, &p8).expect("load q8_0");
    halved.state.set_kv_format(KvFormat::F16).expect("to f16");
    let want: Vec<f32> = before
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(layer1_keys(&halved.state), want);
    // f32 file → 8-bit: each block quantized, within half a step of its largest value.
    let mut narrowed = snapshot::load(fx.arc(), &identity, &p32).expect("load f32");
    narrowed
        .state
        .set_kv_format(KvFormat::Q8_0)
        .expect("to q8_0");
    assert_eq!(narrowed.state.kv_format, KvFormat::Q8_0);
    let exact = layer1_keys(&s32.state);
    let got = layer1_keys(&narrowed.state);
    for (xs, ys) in exact.chunks(32).zip(got.chunks(32)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in xs.iter().zip(ys) {
            assert!((x - y).abs() <= amax / 254.0 + amax * 1e-3, "{x} vs {y}");
        }
    }
    for s in [&mut widened, &mut halved, &mut narrowed] {
        generate(s, &[], 4, &tok);
        assert!(s
            .last_logits
            .as_ref()
            .expect("logits")
            .iter()
            .all(|x| x.is_finite()));
    }
    // The fixture's heads of 16 cannot hold 8-bit blocks: refused with the reason, the state
    // unchanged.
    let small = Fixture::load("tptt-llama", "delta_product");
    let mut s = Session::new(
        small.arc(),
        SessionOptions {
            window: Some(24),
            ..Default::default()
        },
    );
    generate(&mut s, &token_ids(20, 300, 9), 2, &small.tokenizer());
    let keys = layer1_keys(&s.state);
    let err = s
        .state
        .set_kv_format(KvFormat::Q8_0)
        .expect_err("heads of 16");
    assert!(err.to_string().contains("blocks of 32"), "{err}");
    assert_eq!(s.state.kv_format, KvFormat::F32);
    assert_eq!(layer1_keys(&s.state), keys);
}

/// An f16 cache is written as f16 (its KV bytes half those of the same conversation in f32);
/// a snapshot of one format opened by a session of the other is converted, never misread: f16
/// values widen exactly, f32 ones round to the nearest half.
#[test]
fn kv_formats_in_snapshots_are_kept_and_converted() {
    let scratch = Scratch::new("kv-format");
    let fx = Fixture::load("tptt-llama", "delta_product");
    let tok = fx.tokenizer();
    let identity = fx.identity();
    let run = |kv_format: KvFormat| conversation(&fx, kv_format, &tok);
    let (s32, s16) = (run(KvFormat::F32), run(KvFormat::F16));
    let (p32, p16) = (
        scratch.path("f32.tptt-state"),
        scratch.path("f16.tptt-state"),
    );
    let b32 = snapshot::save(&s32, &identity, &p32).expect("save f32");
    let b16 = snapshot::save(&s16, &identity, &p16).expect("save f16");
    let b = &fx.model.config().base;
    let kv32 = (s32.state.kv_len() * 2 * b.total_kv_heads() * b.head_dim * 4) as u64;
    assert_eq!(s16.state.kv_len(), s32.state.kv_len());
    // The f16 file is smaller by half the f32 KV cache (headers aside).
    let saved = b32 - b16;
    assert!(
        saved.abs_diff(kv32 / 2) <= 512,
        "f32 snapshot {b32} B, f16 {b16} B: saved {saved} B, half the KV cache is {} B",
        kv32 / 2
    );
    // Each file's tensors are in its format.
    let bytes = std::fs::read(&p16).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert_eq!(
        st.tensor("layers.0.k").expect("keys").dtype(),
        safetensors::Dtype::F16
    );
    assert_eq!(
        st.tensor("layers.0.state").expect("state").dtype(),
        safetensors::Dtype::F32
    );

    // f16 file → f32 session: exact widening, then the session continues in f32.
    let mut widened = snapshot::load(fx.arc(), &identity, &p16).expect("load f16");
    assert_eq!(widened.state.kv_format, KvFormat::F16);
    let before: Vec<f32> = layer1_keys(&widened.state);
    widened.state.set_kv_format(KvFormat::F32).expect("to f32");
    let after: Vec<f32> = layer1_keys(&widened.state);
    assert_eq!(before, after, "f16 → f32 is exact");
    assert_eq!(widened.state.kv_bytes(), 2 * s16.state.kv_bytes());
    // f32 file → f16 session: every key rounded to the nearest half.
    let mut narrowed = snapshot::load(fx.arc(), &identity, &p32).expect("load f32");
    assert_eq!(narrowed.state.kv_format, KvFormat::F32);
    narrowed.state.set_kv_format(KvFormat::F16).expect("to f16");
    let want: Vec<f32> = layer1_keys(&s32.state)
        .into_iter()
        .map(|x| half::f16::from_f32(x).to_f32())
        .collect();
    let got: Vec<f32> = layer1_keys(&narrowed.state);
    assert_eq!(got, want, "f32 → f16 rounds each value");
    for s in [&mut widened, &mut narrowed] {
        generate(s, &[], 4, &tok);
        assert!(s
            .last_logits
            .as_ref()
            .expect("logits")
            .iter()
            .all(|x| x.is_finite()));
    }
}
