//! The carried state (`CarryMode::Continue`) against one full forward, for every fixture variant
//! of both bases (every operator mode and option):
//!
//! * decoding token by token through a [`Session`] gives the logits of `Model::forward_full`
//!   with `max_chunk_size = 1` (the recurrent form the one-token calls use);
//! * a multi-token continuation from a carried state equals one call under the same chunking
//!   (chunk 8 with calls of 24 + 16, chunk 1 with arbitrary splits).

mod common;

use candle_core::Tensor;
use common::{max_abs_diff, token_ids, Fixture, REPOS};
use tptt::linear::CarryMode;
use tptt::model::{Logits, Model};
use tptt_engine::{Session, SessionOptions};

/// Max |Δlogit| between equivalent computations in different call shapes (f32 reassociation).
const TOL: f32 = 1e-4;
/// Tokens per sequence.
const LEN: usize = 40;

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("[S, V] f32 logits")
}

/// Every (repo, variant) of the fixtures, loaded.
fn all_fixtures() -> Vec<Fixture> {
    let mut out = Vec::new();
    for repo in REPOS {
        for v in common::variants(repo) {
            out.push(Fixture::load(repo, &v));
        }
    }
    assert_eq!(
        out.len(),
        35,
        "expected 16 variants per base, 3 for OpenELM"
    );
    out
}

/// Logits `[S, V]` of `ids` run as consecutive calls of `splits` tokens from one carried state.
fn split_calls(model: &Model, ids: &[u32], splits: &[usize]) -> Vec<Vec<f32>> {
    assert_eq!(
        splits.iter().sum::<usize>(),
        ids.len(),
        "splits cover the sequence"
    );
    let mut st = model.new_state(CarryMode::Continue, model.config_window());
    let mut out = Vec::new();
    let mut at = 0;
    for &n in splits {
        let logits = model
            .forward(&ids[at..at + n], &mut st, Logits::All)
            .expect("forward call");
        out.extend(rows(&logits));
        at += n;
    }
    assert_eq!(st.pos, ids.len());
    out
}

fn worst_row_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "rows");
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| (max_abs_diff(x, y), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 { d } else { m })
}

#[test]
fn token_by_token_session_equals_full_forward_at_chunk_one() {
    let mut failures = Vec::new();
    let mut overall = 0f32;
    for fx in all_fixtures() {
        let mut model = fx.model.clone();
        model.set_max_chunk_size(1).expect("chunk 1");
        let ids = token_ids(LEN, model.config().base.vocab_size, 7);
        let full = rows(&model.forward_full(&ids).expect("full forward"));
        let mut session = Session::new(std::sync::Arc::new(model), SessionOptions::default());
        let mut stepped = Vec::new();
        for &id in &ids {
            assert!(session.feed(&[id], None).expect("decode step"));
            stepped.push(session.last_logits.clone().expect("logits after a token"));
        }
        assert_eq!(session.tokens, ids);
        let (d, at) = worst_row_diff(&full, &stepped);
        overall = overall.max(d);
        if d > TOL {
            failures.push(format!("{}: max |Δ| {d:e} at token {at}", fx.label()));
        }
    }
    eprintln!("token-by-token vs full forward (chunk 1): max |Δlogit| {overall:e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn continuation_from_carried_state_equals_one_call_under_same_chunking() {
    // (max_chunk_size, call lengths): every split keeps each call's chunking equal to the
    // single call's (40 → 8 with chunk 8; 24 → 8 and 16 → 8).
    let plans: [(usize, &[usize]); 4] = [
        (8, &[24, 16]),
        (8, &[8, 16, 16]),
        (1, &[5, 1, 13, 2, 19]),
        (1, &[39, 1]),
    ];
    let mut failures = Vec::new();
    let mut overall = 0f32;
    for fx in all_fixtures() {
        for (chunk, splits) in plans {
            let mut model = fx.model.clone();
            model.set_max_chunk_size(chunk).expect("chunk size");
            let ids = token_ids(LEN, model.config().base.vocab_size, 11);
            let one = split_calls(&model, &ids, &[LEN]);
            let parts = split_calls(&model, &ids, splits);
            let (d, at) = worst_row_diff(&one, &parts);
            overall = overall.max(d);
            if d > TOL {
                failures.push(format!(
                    "{} chunk {chunk} calls {splits:?}: max |Δ| {d:e} at token {at}",
                    fx.label()
                ));
            }
        }
    }
    eprintln!("split calls vs one call: max |Δlogit| {overall:e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
