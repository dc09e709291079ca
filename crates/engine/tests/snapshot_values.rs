//! Snapshots whose checksum is right but whose values are wrong are refused with an
//! `Error::Snapshot` naming the value, never restored, never a panic.
//!
//! Each test takes a real snapshot apart ([`RawSnapshot`]), spoils one value, puts it back
//! together with the checksum recomputed (so the loader's integrity check passes and its value
//! checks are what is tested) and loads it: one test per class of bad value. The file's own
//! framing (truncation, header lengths) is tested last.

mod common;

use std::path::{Path, PathBuf};

use common::{token_ids, Fixture, Scratch};
use tptt::linear::CarryMode;
use tptt_engine::snapshot::testing::RawSnapshot;
use tptt_engine::snapshot::{self};
use tptt_engine::{
    CancelToken, Error, GenerateOptions, ModelIdentity, SamplingParams, Session, SessionOptions,
};

const WINDOW: usize = 8;

/// A session of `tptt-llama/delta_product` (order 2: it carries the `prev` buffer too) after 20
/// tokens with a window of 8, in `mode`, saved and taken apart.
struct Saved {
    fx: Fixture,
    raw: RawSnapshot,
    scratch: Scratch,
}

impl Saved {
    fn new(mode: CarryMode) -> Self {
        let fx = Fixture::load("tptt-llama", "delta_product");
        let scratch = Scratch::new(&format!("values-{mode:?}"));
        let mut s = Session::new(
            fx.arc(),
            SessionOptions {
                window: Some(WINDOW),
                mode,
                ..Default::default()
            },
        );
        let opts = GenerateOptions {
            params: SamplingParams {
                max_new_tokens: 8,
                ..SamplingParams::greedy()
            },
            ignore_eos: true,
            ..Default::default()
        };
        // Reference mode refuses calls longer than the window: a short prompt.
        s.generate(
            &token_ids(6, 300, 5),
            &opts,
            &fx.tokenizer(),
            &CancelToken::new(),
            &mut |_| {},
        )
        .expect("generate");
        let path = scratch.path("good.tptt-state");
        snapshot::save(&s, &fx.identity(), &path).expect("save");
        let raw = RawSnapshot::parse(&std::fs::read(&path).expect("read")).expect("parse");
        Self { fx, raw, scratch }
    }

    fn identity(&self) -> ModelIdentity {
        self.fx.identity()
    }

    /// Write `raw` (checksum recomputed) and load it.
    fn load(&self, raw: &RawSnapshot) -> tptt_engine::Result<Session> {
        let path = self.write(&raw.to_bytes().expect("serialize"));
        snapshot::load(self.fx.arc(), &self.identity(), &path)
    }

    fn write(&self, bytes: &[u8]) -> PathBuf {
        let path = self.scratch.path("crafted.tptt-state");
        std::fs::write(&path, bytes).expect("write");
        path
    }

    /// A copy with `edit` applied, loaded: must be refused with a reason holding every word.
    fn refused(&self, what: &str, edit: impl FnOnce(&mut RawSnapshot), words: &[&str]) {
        let mut raw = self.raw.clone();
        edit(&mut raw);
        let reason = reason(self.load(&raw), what);
        for w in words {
            assert!(
                reason.contains(w),
                "{what}: the reason does not name {w:?}: {reason}"
            );
        }
    }
}

fn reason(r: tptt_engine::Result<Session>, what: &str) -> String {
    match r {
        Err(Error::Snapshot { reason, .. }) => {
            eprintln!("{what}: {reason}");
            reason
        }
        Err(e) => panic!("{what}: expected Error::Snapshot, got {e:?}"),
        Ok(_) => panic!("{what}: the crafted snapshot was accepted"),
    }
}

fn set_meta(raw: &mut RawSnapshot, key: &str, value: &str) {
    raw.meta.insert(key.into(), value.into());
}

#[test]
fn an_untouched_file_taken_apart_and_put_back_still_loads() {
    // Guards every test below: the rebuilt file is accepted, so each refusal is the spoiled value's.
    for mode in [CarryMode::Continue, CarryMode::Reference] {
        let saved = Saved::new(mode);
        let s = saved.load(&saved.raw).expect("the rebuilt file loads");
        assert_eq!(s.state.pos, 14);
        assert_eq!(s.state.mode, mode);
    }
}

#[test]
fn a_window_of_zero_or_beyond_the_bound_is_refused() {
    let saved = Saved::new(CarryMode::Continue);
    let too_big = (tptt::state::MAX_WINDOW + 1).to_string();
    for w in ["0", too_big.as_str()] {
        saved.refused(
            &format!("window {w}"),
            |r| set_meta(r, "window", w),
            &["window", w],
        );
    }
    saved.refused("window x", |r| set_meta(r, "window", "x"), &["window", "x"]);
    // `info` (the app's listing) refuses it too.
    let mut raw = saved.raw.clone();
    set_meta(&mut raw, "window", "0");
    let path = saved.write(&raw.to_bytes().expect("serialize"));
    assert!(
        matches!(snapshot::info(&path), Err(Error::Snapshot { reason, .. }) if reason.contains("window")),
        "info of a window-0 snapshot"
    );
}

#[test]
fn an_unknown_mode_or_dtype_is_refused() {
    let saved = Saved::new(CarryMode::Continue);
    saved.refused(
        "mode",
        |r| set_meta(r, "mode", "sideways"),
        &["mode", "sideways"],
    );
    saved.refused("dtype", |r| set_meta(r, "dtype", "f16"), &["dtype", "f16"]);
}

#[test]
fn counts_that_disagree_with_the_tensors_are_refused() {
    let saved = Saved::new(CarryMode::Continue);
    saved.refused(
        "kv_len",
        |r| set_meta(r, "kv_len", "7"),
        &["kv_len", "\"7\"", "8"],
    );
    saved.refused(
        "history_len",
        |r| set_meta(r, "history_len", "3"),
        &["history_len", "14"],
    );
    // More token ids than tokens read.
    saved.refused(
        "tokens longer than pos",
        |r| {
            let mut t = r.u32s("tokens").expect("tokens");
            t.push(1);
            r.set_u32("tokens", &[t.len()], &t);
            set_meta(r, "history_len", &t.len().to_string());
        },
        &["15 token ids", "14 tokens"],
    );
}

#[test]
fn a_position_count_that_disagrees_with_the_ring_is_refused() {
    let saved = Saved::new(CarryMode::Continue);
    // 14 tokens read, window 8: the ring holds positions 6..14. Another pos breaks the ring.
    for pos in ["15", "7", "0", "99999999999"] {
        saved.refused(
            &format!("pos {pos}"),
            |r| set_meta(r, "pos", pos),
            &["key_pos"],
        );
    }
    // A smaller window than the cache holds.
    saved.refused(
        "window 4",
        |r| set_meta(r, "window", "4"),
        &["key_pos", "4"],
    );
}

#[test]
fn key_positions_outside_the_ring_invariant_are_refused() {
    let saved = Saved::new(CarryMode::Continue);
    let good = saved.raw.u32s("key_pos").expect("key_pos");
    let mut sorted = good.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (6..14).collect::<Vec<u32>>(),
        "the last 8 positions"
    );
    type Spoil = fn(&mut [u32]);
    let cases: [(&str, Spoil); 4] = [
        ("two slots swapped", |k| k.swap(0, 1)),
        ("a duplicated position", |k| k[1] = k[0]),
        ("a position not yet read", |k| k[6] = 14),
        ("an old position", |k| k[0] = 0),
    ];
    for (what, spoil) in cases {
        saved.refused(
            what,
            |r| {
                let mut k = good.clone();
                spoil(&mut k);
                r.set_u32("key_pos", &[8], &k);
            },
            &["key_pos", "slot"],
        );
    }
    // A shorter list (metadata and KV tensors in step with it): not the last min(pos, W).
    saved.refused(
        "7 positions",
        |r| {
            let k: Vec<u32> = good[..7].to_vec();
            r.set_u32("key_pos", &[7], &k);
            set_meta(r, "kv_len", "7");
            for l in 0..2 {
                for kv in ["k", "v"] {
                    let name = format!("layers.{l}.{kv}");
                    let x = r.f32s(&name).expect("kv");
                    // [2, 8, 16] → [2, 7, 16]
                    let y: Vec<f32> = (0..2)
                        .flat_map(|h| x[h * 8 * 16..h * 8 * 16 + 7 * 16].to_vec())
                        .collect();
                    r.set_f32(&name, &[2, 7, 16], &y);
                }
            }
        },
        &["key_pos", "7 cached positions"],
    );
}

#[test]
fn reference_mode_positions_must_increase() {
    let saved = Saved::new(CarryMode::Reference);
    let good = saved.raw.u32s("key_pos").expect("key_pos");
    assert!(good.windows(2).all(|w| w[0] < w[1]), "{good:?}");
    let n = good.len();
    saved.refused(
        "reversed pair",
        |r| {
            let mut k = good.clone();
            k.swap(n - 1, n - 2);
            r.set_u32("key_pos", &[n], &k);
        },
        &["key_pos", "not increasing"],
    );
    saved.refused(
        "position not yet read",
        |r| {
            let mut k = good.clone();
            k[n - 1] = 14;
            r.set_u32("key_pos", &[n], &k);
        },
        &["key_pos", "14"],
    );
}

#[test]
fn carried_tensors_of_the_wrong_shape_are_refused() {
    let saved = Saved::new(CarryMode::Continue);
    let reshape = |name: &'static str, shape: &'static [usize]| {
        move |r: &mut RawSnapshot| {
            let n: usize = shape.iter().product();
            r.set_f32(name, shape, &vec![0.5; n]);
        }
    };
    // pool rows are Hkv·D = 32 wide, at most 2 of them; any width was accepted before.
    saved.refused(
        "pool_k 16 wide",
        reshape("layers.0.pool_k", &[2, 16]),
        &["layer 0", "pool_k", "[2, 16]", "32"],
    );
    saved.refused(
        "pool_v of 3 rows",
        reshape("layers.1.pool_v", &[3, 32]),
        &["layer 1", "pool_v", "[3, 32]"],
    );
    saved.refused(
        "pool_k one row, pool_v two",
        reshape("layers.0.pool_k", &[1, 32]),
        &["layer 0", "1 pooled key rows but 2 value rows"],
    );
    saved.refused(
        "prev",
        reshape("layers.1.prev", &[5, 32]),
        &["layer 1", "prev", "[5, 32]", "[5, 64]"],
    );
    saved.refused(
        "state",
        reshape("layers.0.state", &[3 * 16 * 16]),
        &["layer 0", "recurrent state"],
    );
    saved.refused(
        "keys",
        reshape("layers.1.k", &[2, 8, 8]),
        &["layer 1", "KV cache"],
    );
    saved.refused(
        "values of other heads",
        reshape("layers.0.v", &[1, 8, 16]),
        &["layer 0", "KV cache"],
    );
    saved.refused(
        "last_logits",
        reshape("last_logits", &[299]),
        &["last_logits", "299", "300"],
    );
    saved.refused(
        "a layer missing",
        |r| {
            r.tensors.remove("layers.1.state");
        },
        &["layers.1.state"],
    );
    saved.refused(
        "a layer too many",
        |r| r.set_f32("layers.2.state", &[2 * 16 * 16], &[0.0; 2 * 16 * 16]),
        &["more than 2 layers"],
    );
    saved.refused(
        "tokens as f32",
        |r| {
            let t = r.u32s("tokens").expect("tokens");
            let f: Vec<f32> = t.iter().map(|&x| x as f32).collect();
            r.set_f32("tokens", &[f.len()], &f);
        },
        &["tokens", "U32"],
    );
}

fn name_label(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("k") => "cached keys",
        Some("v") => "cached values",
        Some("state") => "recurrent state",
        _ => "pool_k",
    }
}

#[test]
fn non_finite_or_absurd_carried_values_are_refused() {
    let saved = Saved::new(CarryMode::Continue);
    let poison = |name: &'static str, at: usize, x: f32| {
        move |r: &mut RawSnapshot| {
            let shape = r.tensors[name].shape.clone();
            let mut v = r.f32s(name).expect(name);
            v[at] = x;
            r.set_f32(name, &shape, &v);
        }
    };
    for (name, label, x) in [
        ("layers.0.k", "cached keys", f32::NAN),
        ("layers.1.v", "cached values", f32::INFINITY),
        ("layers.0.state", "recurrent state", f32::NAN),
        ("layers.1.state", "recurrent state", f32::INFINITY),
        ("layers.0.pool_v", "pool_v", f32::NEG_INFINITY),
        ("layers.1.prev", "prev", f32::NAN),
        ("last_logits", "last_logits", f32::NAN),
    ] {
        saved.refused(name, poison(name, 3, x), &[label, "index 3"]);
    }
    // Finite but absurd: overflows the first product it enters.
    for name in [
        "layers.0.k",
        "layers.1.v",
        "layers.0.state",
        "layers.1.pool_k",
    ] {
        saved.refused(
            name,
            poison(name, 5, 3e38),
            &[name_label(name), "index 5", "1e15"],
        );
    }
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let saved = Saved::new(CarryMode::Continue);
    for id in [300u32, u32::MAX] {
        saved.refused(
            &format!("token {id}"),
            |r| {
                let mut t = r.u32s("tokens").expect("tokens");
                t[2] = id;
                r.set_u32("tokens", &[t.len()], &t);
            },
            &[&id.to_string(), "tokens[2]", "vocabulary of 300"],
        );
    }
}

/// `bytes` with its 8-byte header length replaced.
fn with_header_len(bytes: &[u8], len: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[..8].copy_from_slice(&len.to_le_bytes());
    b
}

#[test]
fn broken_framing_is_refused_without_allocating_what_the_header_claims() {
    let saved = Saved::new(CarryMode::Continue);
    let good = saved.raw.to_bytes().expect("serialize");
    let header_len = u64::from_le_bytes(good[..8].try_into().expect("8 bytes"));
    let load = |bytes: &[u8]| {
        let path = saved.write(bytes);
        snapshot::load(saved.fx.arc(), &saved.identity(), &path)
    };
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("empty file".into(), Vec::new()),
        ("4 bytes".into(), good[..4].to_vec()),
        (
            "cut inside the header".into(),
            good[..8 + header_len as usize / 2].to_vec(),
        ),
        (
            "cut inside the data".into(),
            good[..good.len() - 7].to_vec(),
        ),
        (
            "header longer than the file".into(),
            with_header_len(&good, good.len() as u64),
        ),
        // A header length of 2^40 / 2^63 must be compared with the file, not allocated.
        (
            "header of 2^40 bytes".into(),
            with_header_len(&good, 1 << 40),
        ),
        (
            "header of 2^63 bytes".into(),
            with_header_len(&good, 1 << 63),
        ),
        ("header length 0".into(), with_header_len(&good, 0)),
    ];
    for (what, bytes) in cases {
        let r = reason(load(&bytes), &what);
        assert!(r.contains("not a valid snapshot file"), "{what}: {r}");
    }
    // A huge header that is really there (a 1 MiB metadata value): parsed, and the checksum
    // still holds, so it loads — the size is bounded by the file, which is the point.
    let mut raw = saved.raw.clone();
    set_meta(&mut raw, "note", &"x".repeat(1 << 20));
    assert!(saved.load(&raw).is_ok(), "a large but honest header");
}

#[test]
fn the_checks_hold_for_a_file_written_by_save_too() {
    // Values spoiled in the session before `save` (the file is then entirely consistent with
    // itself): the loader judges them against the model.
    let fx = Fixture::load("tptt-llama", "delta_rule");
    let scratch = Scratch::new("values-save");
    let mut s = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(WINDOW),
            ..Default::default()
        },
    );
    s.feed(&token_ids(12, 300, 9), None).expect("feed");
    let path = |name: &str| -> PathBuf { scratch.path(name) };
    let check = |t: &Session, what: &str, word: &str, p: &Path| {
        snapshot::save(t, &fx.identity(), p).expect("save");
        let r = reason(snapshot::load(fx.arc(), &fx.identity(), p), what);
        assert!(r.contains(word), "{what}: {r}");
    };
    let mut t = s.try_clone().expect("copy");
    t.state.window = Some(0);
    check(&t, "window 0", "window", &path("w0.tptt-state"));
    let mut t = s.try_clone().expect("copy");
    t.state.layers[1].linear.pool_k = vec![vec![0.0; 5]];
    t.state.layers[1].linear.pool_v = vec![vec![0.0; 5]];
    check(&t, "pool 5 wide", "pool_k", &path("pool.tptt-state"));
    let mut t = s.try_clone().expect("copy");
    t.tokens[0] = 1000;
    check(&t, "token 1000", "1000", &path("tok.tptt-state"));
}
