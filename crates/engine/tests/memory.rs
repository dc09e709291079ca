//! Bounded memory: a long conversation keeps exactly `W` softmax positions and a state of
//! constant size once the window has filled, whatever the length (here 20 000 tokens, mostly fed
//! one at a time, the decode path).

mod common;

use std::time::Instant;

use common::{token_ids, Fixture, Scratch};
use tptt_engine::snapshot;
use tptt_engine::{Session, SessionOptions};

const WINDOW: usize = 64;
const TOKENS: usize = 20_000;

/// Feed plan: one prompt block, a long stretch of single tokens, a few multi-token calls (one
/// longer than the window), single tokens to the end.
fn calls() -> Vec<usize> {
    let mut plan = vec![40];
    plan.extend(std::iter::repeat_n(1, 9_000));
    plan.extend([7, 3, 150, 64, 65, 2]);
    let fed: usize = plan.iter().sum();
    plan.extend(std::iter::repeat_n(1, TOKENS - fed));
    plan
}

fn long_session(repo: &str, variant: &str) {
    let fx = Fixture::load(repo, variant);
    let ids = token_ids(TOKENS, fx.model.config().base.vocab_size, 23);
    let mut session = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(WINDOW),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let mut at = 0;
    let mut sizes = Vec::new(); // (pos, size_bytes) sampled after the window filled
    let scratch = Scratch::new("memory");
    let mut snapshot_bytes = Vec::new(); // (pos, file size) once the kept history is full too
    for n in calls() {
        assert!(session.feed(&ids[at..at + n], None).expect("feed"));
        at += n;
        let st = &session.state;
        assert_eq!(st.pos, at);
        assert_eq!(
            st.kv_len(),
            at.min(WINDOW),
            "{variant}: KV positions after {at} tokens"
        );
        if at >= WINDOW {
            // The window holds exactly the last W positions.
            let mut held = st.key_pos.clone();
            held.sort_unstable();
            assert!(
                held.iter().copied().eq(at - WINDOW..at),
                "{variant}: window after {at} tokens holds {:?}..",
                &held[..4]
            );
            if at % 1000 < n || sizes.is_empty() {
                sizes.push((at, st.size_bytes()));
            }
            if at % 5000 < n && at > snapshot::HISTORY_KEPT {
                let bytes =
                    snapshot::save(&session, &fx.identity(), &scratch.path("long.tptt-state"))
                        .expect("save");
                // The header also carries the surprise record: bounded (at most
                // `RECENT_SAMPLES` values) but of varying width; count without it.
                let surprise = serde_json::to_string(&session.surprise).expect("surprise json");
                snapshot_bytes.push((at, bytes - surprise.len() as u64));
            }
        }
    }
    assert_eq!(at, TOKENS);
    let logits = session.last_logits.as_ref().expect("logits");
    assert!(
        logits.iter().all(|x| x.is_finite()),
        "{variant}: non-finite logits after {TOKENS} tokens"
    );
    let first = sizes[0].1;
    assert!(sizes.len() >= 20, "sampled {} times", sizes.len());
    assert!(
        sizes.iter().all(|&(_, s)| s == first),
        "{variant}: state size changed after the window filled: {sizes:?}"
    );
    // On disk too: only the header's numbers (`pos`, checksum, the surprise record) may change
    // length.
    assert!(snapshot_bytes.len() >= 3, "{snapshot_bytes:?}");
    let spread = snapshot_bytes.iter().map(|&(_, b)| b).max().unwrap_or(0)
        - snapshot_bytes.iter().map(|&(_, b)| b).min().unwrap_or(0);
    assert!(
        spread <= 16,
        "{variant}: snapshot size grows with the conversation: {snapshot_bytes:?}"
    );
    eprintln!("{repo}/{variant}: {TOKENS} tokens in {:.1}s, state {first} bytes (sampled {} times), snapshots {snapshot_bytes:?}", started.elapsed().as_secs_f64(), sizes.len());
}

#[test]
fn twenty_thousand_tokens_keep_the_window_and_the_state_size() {
    // Order 2 (every carry present) on the Llama base.
    long_session("tptt-llama", "delta_product");
}
