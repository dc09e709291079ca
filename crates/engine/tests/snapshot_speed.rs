//! Snapshot save/restore timing at a realistic size (ignored by default; it needs the real
//! SmolLM2-135M-Instruct in `TPTT_SMOLLM2_DIR` for the model shape, and about 1.2 GB of memory):
//!
//! ```text
//! TPTT_SMOLLM2_DIR=models/smollm2-135m-instruct \
//!   cargo test -p tptt-engine --test snapshot_speed -- --ignored --nocapture
//! ```
//!
//! The state is synthetic but has the benchmark's shape: 30 layers, 3 KV heads × 8192 cached
//! positions × 64 (a full 8192-token window after 16k tokens), the linear branch's 9 × 64 × 64
//! state, pooling rows and order-2 buffer per layer, 4096 history tokens and the last logits
//! (383 MB on disk). Prints the median of several runs of `save`, `load` (file in the page
//! cache) and the first decode step after a restore.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tptt::config::TpttSettings;
use tptt::linear::{CarryMode, LinearCarry, PrevToken};
use tptt::model::{LoadOptions, Model};
use tptt::state::{LayerState, State};
use tptt_engine::snapshot::{self, config_hash};
use tptt_engine::{ModelIdentity, Session};

const WINDOW: usize = 8192;
const POS: usize = 16384;
const RUNS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Deterministic, non-repeating values (so a lazy copy or a zero page cannot fake a fast run).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn synthetic_session(model: Arc<Model>) -> Session {
    let b = model.config().base.clone();
    let (nh, nkv, d) = (b.num_heads, b.num_kv_heads, b.head_dim);
    let layers = (0..b.num_layers)
        .map(|i| {
            let kv = |s: u32| {
                Tensor::from_vec(values(nkv * WINDOW * d, s), (nkv, WINDOW, d), &Device::Cpu)
                    .expect("kv tensor")
            };
            let row = |s: u32, n: usize| values(n, s);
            let seed = 1000 * i as u32;
            LayerState {
                k: Some(kv(seed + 1)),
                v: Some(kv(seed + 2)),
                linear: LinearCarry {
                    state: row(seed + 3, nh * d * d),
                    pool_k: vec![row(seed + 4, nkv * d), row(seed + 5, nkv * d)],
                    pool_v: vec![row(seed + 6, nkv * d), row(seed + 7, nkv * d)],
                    prev: Some(PrevToken {
                        q: row(seed + 8, nh * d),
                        k: row(seed + 9, nh * d),
                        v: row(seed + 10, nh * d),
                        alpha: row(seed + 11, nh * d),
                        beta: row(seed + 12, nh * d),
                    }),
                },
            }
        })
        .collect();
    // Continue mode: slot = position mod W, so after POS tokens slot s holds POS − W + s.
    let key_pos = (0..WINDOW).map(|s| POS - WINDOW + s).collect();
    let state = State {
        pos: POS,
        key_pos,
        layers,
        mode: CarryMode::Continue,
        window: Some(WINDOW),
        kv_format: Default::default(),
    };
    let tokens = (0..4096u32)
        .map(|i| (i * 7919) % b.vocab_size as u32)
        .collect();
    let logits = values(b.vocab_size, 99);
    Session::from_parts(model, state, tokens, Some(logits))
}

/// SmolLM2-135M-Instruct from `TPTT_SMOLLM2_DIR` with an untrained injection, and an identity
/// for its snapshots; `None` when the variable is not set.
fn smollm2() -> Option<(Arc<Model>, ModelIdentity)> {
    let dir = std::env::var_os("TPTT_SMOLLM2_DIR").map(PathBuf::from)?;
    let settings = TpttSettings::injected("delta_product", 0.125, &dir.display().to_string())
        .expect("settings");
    let model =
        Arc::new(Model::load_plain(&dir, settings, &LoadOptions::default()).expect("model"));
    let identity = ModelIdentity {
        model: dir.display().to_string(),
        variant: "delta_product".into(),
        config_hash: config_hash(model.config()),
        weights: "the synthetic model of this test".into(),
        v4: Default::default(),
    };
    Some((model, identity))
}

#[test]
#[ignore = "timing harness: needs TPTT_SMOLLM2_DIR and ~1.2 GB of memory"]
fn snapshot_save_and_load_times_at_benchmark_size() {
    let Some((model, identity)) = smollm2() else {
        eprintln!("TPTT_SMOLLM2_DIR is not set: skipping");
        return;
    };
    let session = synthetic_session(model.clone());
    let scratch = std::env::temp_dir().join(format!("tptt-snapshot-speed-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let path = scratch.join("bench.tptt-state");

    let mut saves = Vec::new();
    let mut bytes = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        bytes = snapshot::save(&session, &identity, &path).expect("save");
        saves.push(t.elapsed());
    }
    let _ = std::fs::read(&path).expect("warm the page cache");
    let mut loads = Vec::new();
    let mut firsts = Vec::new();
    let mut seconds = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let mut restored = snapshot::load(model.clone(), &identity, &path).expect("load");
        loads.push(t.elapsed());
        let t = Instant::now();
        restored.feed(&[42], None).expect("first decode step");
        firsts.push(t.elapsed());
        let t = Instant::now();
        restored.feed(&[43], None).expect("second decode step");
        seconds.push(t.elapsed());
        assert_eq!(restored.state.pos, POS + 2);
    }
    // The restored state equals the saved one.
    let restored = snapshot::load(model.clone(), &identity, &path).expect("load");
    assert_eq!(restored.state.key_pos, session.state.key_pos);
    assert_eq!(restored.tokens, session.tokens);
    assert_eq!(restored.last_logits, session.last_logits);
    for (a, b) in restored.state.layers.iter().zip(&session.state.layers) {
        assert_eq!(a.linear, b.linear);
        for (x, y) in [(&a.k, &b.k), (&a.v, &b.v)] {
            let (x, y) = (x.as_ref().expect("kv"), y.as_ref().expect("kv"));
            assert_eq!(x.dims(), y.dims());
            let (x, y): (Vec<f32>, Vec<f32>) = (
                x.flatten_all().and_then(|t| t.to_vec1()).expect("x"),
                y.flatten_all().and_then(|t| t.to_vec1()).expect("y"),
            );
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "KV values differ after the round trip"
            );
        }
    }
    eprintln!(
        "snapshot of {:.1} MB: save median {:.1} ms, load median {:.1} ms (min {:.1}), first decode step median {:.1} ms, second {:.1} ms; loads {:?}",
        bytes as f64 / 1e6,
        median(saves).as_secs_f64() * 1e3,
        median(loads.clone()).as_secs_f64() * 1e3,
        loads.iter().min().expect("runs").as_secs_f64() * 1e3,
        median(firsts).as_secs_f64() * 1e3,
        median(seconds).as_secs_f64() * 1e3,
        loads.iter().map(|d| (d.as_secs_f64() * 1e3).round() as u64).collect::<Vec<_>>(),
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The branch of a long chat, timed: a paged snapshot (format 6) of the benchmark-size state
/// loaded, then a 16-token message read (the first token's logits): the median of each part,
/// and the same message read by the state that was saved (no restore before it).
#[test]
#[ignore = "timing harness: needs TPTT_SMOLLM2_DIR and ~1.6 GB of memory"]
fn paged_branch_message_times_at_benchmark_size() {
    let Some((model, identity)) = smollm2() else {
        eprintln!("TPTT_SMOLLM2_DIR is not set: skipping");
        return;
    };
    let session = synthetic_session(model.clone());
    let scratch = std::env::temp_dir().join(format!("tptt-branch-speed-{}", std::process::id()));
    let (path, pages) = (scratch.join("turn.state"), scratch.join("kv-pages"));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let saved =
        snapshot::save_paged(&session, &identity, None, &path, &pages, &[]).expect("save_paged");
    let message: Vec<u32> = (0..16u32).map(|i| 100 + i * 37).collect();
    let (mut loads, mut reads, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t = Instant::now();
        let (mut branch, _) =
            snapshot::load_paged(model.clone(), &identity, &path, &pages).expect("load");
        loads.push(t.elapsed());
        let t = Instant::now();
        branch.feed(&message, None).expect("message");
        reads.push(t.elapsed());
        let mut live = session.try_clone().expect("copy");
        let t = Instant::now();
        live.feed(&message, None).expect("message");
        plain.push(t.elapsed());
        assert_eq!(
            branch.last_logits, live.last_logits,
            "the branch reads as the live state"
        );
    }
    eprintln!(
        "paged snapshot {:.1} MB + {} pages ({:.1} MB): load median {:.1} ms, 16-token message {:.1} ms after the load, {:.1} ms on the live state",
        saved.file_bytes as f64 / 1e6,
        saved.pages,
        saved.new_page_bytes as f64 / 1e6,
        median(loads).as_secs_f64() * 1e3,
        median(reads).as_secs_f64() * 1e3,
        median(plain).as_secs_f64() * 1e3,
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
