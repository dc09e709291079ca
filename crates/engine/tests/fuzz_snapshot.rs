//! Structured fuzzing of the snapshot loader (`tptt_engine::snapshot::load`): a real snapshot,
//! mutated, fed a fixed number of times with a fixed seed.
//!
//! * resealed: the file taken apart ([`RawSnapshot`]), metadata values, tensor shapes, dtypes
//!   and bytes changed, then put back together with the checksum recomputed, so that the
//!   loader's value checks (not its checksum) are what is exercised;
//! * raw: bytes flipped, overwritten, cut or inserted without resealing (the checksum and the
//!   safetensors framing must catch them).
//!
//! Every input must be refused with `Error::Snapshot` or restore a session that then reads a
//! token and generates — never a panic, a hang, or memory out of proportion with the file
//! (harness: `crates/tptt/tests/support/fuzz.rs`).

#[path = "../../tptt/tests/support/fuzz.rs"]
mod fuzz;

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{token_ids, Fixture, Scratch};
use proptest::prelude::*;
use tptt_engine::snapshot::testing::RawSnapshot;
use tptt_engine::snapshot::{self};
use tptt_engine::{
    CancelToken, Error, GenerateOptions, ModelIdentity, SamplingParams, Session, SessionOptions,
};

use fuzz::{apply, check_bounded, mutations, Mutation};

const MIB: usize = 1 << 20;

/// One structured edit of a snapshot.
#[derive(Debug, Clone)]
enum Edit {
    /// A metadata key (by index, mod the count) set to a value.
    Meta(usize, String),
    /// A tensor's bytes: XOR at a position (mod its length).
    Bytes(usize, usize, u8),
    /// A tensor's 4-byte value at a position set (a u32 or f32 on a boundary).
    Word(usize, usize, u32),
    /// A tensor reshaped (its data cut or zero-extended to match, or left as is).
    Shape(usize, Vec<usize>, bool),
    /// A tensor's dtype changed.
    Dtype(usize, u8),
    /// A tensor removed.
    Remove(usize),
}

fn meta_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("7".to_string()),
        Just("8".to_string()),
        Just("13".to_string()),
        Just("14".to_string()),
        Just("15".to_string()),
        Just("4096".to_string()),
        Just("none".to_string()),
        Just("continue".to_string()),
        Just("reference".to_string()),
        Just("f32".to_string()),
        Just(String::new()),
        Just("-1".to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("{}".to_string()),
        any::<u32>().prop_map(|x| x.to_string()),
        "[ -~]{0,12}",
    ]
}

fn word() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(7),
        Just(8),
        Just(14),
        Just(299),
        Just(300),
        Just(u32::MAX),
        Just(f32::NAN.to_bits()),
        Just(f32::INFINITY.to_bits()),
        Just(f32::MAX.to_bits()),
        Just(1e-30f32.to_bits()),
        any::<u32>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let dims = prop::collection::vec(
        prop_oneof![
            Just(0usize),
            Just(1),
            Just(2),
            Just(5),
            Just(8),
            Just(16),
            Just(32),
            0usize..70
        ],
        0..4,
    );
    prop_oneof![
        3 => (any::<usize>(), meta_value()).prop_map(|(i, v)| Edit::Meta(i, v)),
        3 => (any::<usize>(), any::<usize>(), 1u8..).prop_map(|(t, at, m)| Edit::Bytes(t, at, m)),
        3 => (any::<usize>(), any::<usize>(), word()).prop_map(|(t, at, w)| Edit::Word(t, at, w)),
        2 => (any::<usize>(), dims, any::<bool>()).prop_map(|(t, d, fit)| Edit::Shape(t, d, fit)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(t, d)| Edit::Dtype(t, d)),
        1 => any::<usize>().prop_map(Edit::Remove),
    ]
}

fn apply_edit(raw: &mut RawSnapshot, e: &Edit) {
    let names: Vec<String> = raw.tensors.keys().cloned().collect();
    let mut keys: Vec<String> = raw.meta.keys().cloned().collect();
    keys.sort();
    let tensor = |i: usize| names.get(i % names.len().max(1)).cloned();
    match e {
        Edit::Meta(i, v) => {
            if let Some(k) = keys.get(i % keys.len().max(1)) {
                raw.meta.insert(k.clone(), v.clone());
            }
        }
        Edit::Bytes(t, at, mask) => {
            if let Some(t) = tensor(*t).and_then(|n| raw.tensors.get_mut(&n)) {
                let len = t.data.len();
                if len > 0 {
                    t.data[at % len] ^= mask;
                }
            }
        }
        Edit::Word(t, at, w) => {
            if let Some(t) = tensor(*t).and_then(|n| raw.tensors.get_mut(&n)) {
                let words = t.data.len() / 4;
                if words > 0 {
                    let at = at % words * 4;
                    t.data[at..at + 4].copy_from_slice(&w.to_le_bytes());
                }
            }
        }
        Edit::Shape(t, dims, fit) => {
            if let Some(t) = tensor(*t).and_then(|n| raw.tensors.get_mut(&n)) {
                t.shape = dims.clone();
                if *fit {
                    t.data.resize(dims.iter().product::<usize>() * 4, 0);
                }
            }
        }
        Edit::Dtype(t, d) => {
            use safetensors::Dtype::*;
            let all = [F32, U32, F16, BF16, F64, I32, U8, BOOL, I64, U64];
            if let Some(t) = tensor(*t).and_then(|n| raw.tensors.get_mut(&n)) {
                t.dtype = all[*d as usize % all.len()];
            }
        }
        Edit::Remove(t) => {
            if let Some(n) = tensor(*t) {
                raw.tensors.remove(&n);
            }
        }
    }
}

/// A session of `tptt-llama/delta_product` after 14 tokens with a window of 8, saved.
fn saved(fx: &Fixture, scratch: &Scratch) -> Vec<u8> {
    let mut s = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(8),
            ..Default::default()
        },
    );
    s.feed(&token_ids(14, 300, 3), None).expect("feed");
    let path = scratch.path("good.tptt-state");
    snapshot::save(&s, &fx.identity(), &path).expect("save");
    std::fs::read(&path).expect("read")
}

/// Load `bytes` as a snapshot on its own thread (bounded: the KV buffer is at most about twice
/// the file's, the rest small), and run what was accepted: one token read, two generated.
fn load_case(
    what: &str,
    fx: &Fixture,
    identity: &ModelIdentity,
    scratch: &Scratch,
    n: &AtomicUsize,
    bytes: &[u8],
) -> Result<bool, String> {
    let path = scratch.path(&format!(
        "case-{}.tptt-state",
        n.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let (model, identity, tokenizer, p) =
        (fx.arc(), identity.clone(), fx.tokenizer(), path.clone());
    let r = check_bounded(what, bytes.len(), 16, 4 * MIB, move || {
        let mut s = match snapshot::load(model, &identity, &p) {
            Ok(s) => s,
            Err(e @ Error::Snapshot { .. }) => return Err(e.to_string()),
            Err(e) => panic!("expected Error::Snapshot, got {e:?}"),
        };
        // What was accepted must work: a failure here is a hole in the checks (a panic is
        // how this closure reports it as a failure rather than a refusal).
        if let Err(e) = s.feed(&[5], None) {
            panic!("accepted, then feed failed: {e}");
        }
        let opts = GenerateOptions {
            params: SamplingParams {
                max_new_tokens: 2,
                ..SamplingParams::greedy()
            },
            ignore_eos: true,
            ..Default::default()
        };
        if let Err(e) = s.generate(&[], &opts, &tokenizer, &CancelToken::new(), &mut |_| {}) {
            panic!("accepted, then generate failed: {e}");
        }
        Ok(())
    });
    let _ = std::fs::remove_file(&path);
    r
}

#[test]
fn fuzz_resealed_snapshots() {
    let fx = Fixture::load("tptt-llama", "delta_product");
    let scratch = Scratch::new("fuzz-resealed");
    let good = saved(&fx, &scratch);
    let raw = RawSnapshot::parse(&good).expect("parse");
    let identity = fx.identity();
    let n = AtomicUsize::new(0);
    // The untouched file, rebuilt, is accepted: refusals below are the edits'.
    assert!(load_case(
        "untouched",
        &fx,
        &identity,
        &scratch,
        &n,
        &raw.to_bytes().expect("bytes")
    )
    .expect("untouched"));
    fuzz::run(
        "snapshot (resealed)",
        11,
        6_000,
        prop::collection::vec(edit(), 1..4),
        |edits: Vec<Edit>| {
            let mut r = raw.clone();
            for e in &edits {
                apply_edit(&mut r, e);
            }
            // A header the safetensors writer refuses (data not matching a shape) is written
            // raw: the loader must refuse it too.
            let bytes = match r.to_bytes() {
                Ok(b) => b,
                Err(_) => return Ok(false),
            };
            let accepted = load_case("resealed", &fx, &identity, &scratch, &n, &bytes)?;
            Ok(accepted)
        },
    );
}

#[test]
fn fuzz_raw_snapshot_bytes() {
    let fx = Fixture::load("tptt-llama", "delta_product");
    let scratch = Scratch::new("fuzz-raw");
    let good = saved(&fx, &scratch);
    let header = 8 + u64::from_le_bytes(good[..8].try_into().expect("8 bytes")) as usize;
    let identity = fx.identity();
    let n = AtomicUsize::new(0);
    fuzz::run(
        "snapshot (raw bytes)",
        12,
        5_000,
        mutations(header, 4),
        |edits: Vec<Mutation>| {
            let bytes = apply(&good, &edits);
            let accepted = load_case("raw", &fx, &identity, &scratch, &n, &bytes)?;
            // Without resealing, only an edit that changed nothing (or only the JSON's
            // spacing) can pass the checksum.
            if accepted && bytes != good {
                let (a, b) = (RawSnapshot::parse(&bytes), RawSnapshot::parse(&good));
                if a.ok() != b.ok() {
                    return Err(format!("a changed file passed the checksum: {edits:?}"));
                }
            }
            Ok(accepted)
        },
    );
}

#[test]
fn fuzz_harness_sees_an_unbounded_allocation() {
    // The harness itself: an allocation out of proportion with the input is reported.
    let r = check_bounded("probe", 100, 16, MIB, || {
        let v = vec![1u8; 64 * MIB];
        std::hint::black_box(&v);
        Ok(())
    });
    assert!(
        r.is_err(),
        "a 64 MiB allocation for 100 bytes went unnoticed"
    );
}
