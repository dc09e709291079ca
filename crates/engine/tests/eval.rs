//! Long-context evaluation and the surprise sample, on the tiny fixtures:
//!
//! * `score_text` (blocks of 512, sliding window) equals the log-softmax of one full forward
//!   where the two must agree (linear branch off, full attention), and the block feeding of a
//!   call with the branch on;
//! * `Logits::Every` returns exactly the `All` rows it names;
//! * a [`Session`]'s surprise sample records the same NLLs `score_text` computes at those
//!   positions;
//! * a recall probe at distance `d` scores what a direct run of fact + filler + question gives.

mod common;

use common::{token_ids, Fixture};
use tptt::linear::CarryMode;
use tptt::model::Logits;
use tptt_engine::eval::{nll, run_probe, score_text, ProbeIds};
use tptt_engine::health::SURPRISE_STRIDE;
use tptt_engine::{Session, SessionOptions};

/// f32 reassociation between call shapes.
const TOL: f32 = 2e-4;

fn nll_rows(rows: &[Vec<f32>], ids: &[u32]) -> Vec<f32> {
    rows.iter()
        .zip(&ids[1..])
        .map(|(r, &t)| nll(r, t).expect("nll"))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn score_text_equals_one_forward_without_memory() {
    let mut fx = Fixture::load("tptt-llama", "delta_product");
    fx.model.set_mag_weight(0.0);
    let ids = token_ids(700, fx.model.config().base.vocab_size, 7);
    let scored = score_text(&fx.model, &ids, None, Default::default(), None, &mut |_| {})
        .expect("score")
        .expect("not cancelled");
    assert_eq!(scored.len(), ids.len() - 1);
    let mut st = fx.model.new_state(CarryMode::Continue, None);
    let full = fx
        .model
        .forward(&ids, &mut st, Logits::All)
        .and_then(|t| Ok(t.to_vec2::<f32>()?))
        .expect("forward");
    let want = nll_rows(&full, &ids);
    let d = max_diff(&scored, &want);
    assert!(d < TOL, "block-fed NLL differs from one forward by {d}");
    // Every value is a real surprise: finite and non-negative.
    assert!(scored.iter().all(|x| x.is_finite() && *x >= 0.0));
}

#[test]
fn score_text_with_memory_and_window_feeds_blocks_of_512() {
    let fx = Fixture::load("tptt-llama", "delta_product_c");
    let ids = token_ids(600, fx.model.config().base.vocab_size, 3);
    let mut seen = Vec::new();
    let scored = score_text(
        &fx.model,
        &ids,
        Some(16),
        Default::default(),
        None,
        &mut |n| seen.push(n),
    )
    .expect("score")
    .expect("not cancelled");
    assert_eq!(seen, vec![512, 600]);
    let mut st = fx.model.new_state(CarryMode::Continue, Some(16));
    let mut rows = Vec::new();
    for block in [&ids[..512], &ids[512..]] {
        let l = fx
            .model
            .forward(block, &mut st, Logits::All)
            .expect("forward");
        rows.extend(l.to_vec2::<f32>().expect("rows"));
    }
    rows.pop();
    assert!(max_diff(&scored, &nll_rows(&rows, &ids)) < 1e-6);
    // A zero window is an error, not a panic.
    assert!(score_text(
        &fx.model,
        &ids,
        Some(0),
        Default::default(),
        None,
        &mut |_| {}
    )
    .is_err());
}

#[test]
fn every_kth_row_is_the_all_row() {
    let fx = Fixture::load("tptt-qwen2", "delta_rule");
    let ids = token_ids(45, fx.model.config().base.vocab_size, 11);
    let all = {
        let mut st = fx.model.new_state(CarryMode::Continue, Some(32));
        fx.model.forward(&ids, &mut st, Logits::All).expect("all")
    };
    for k in [1usize, 2, 8, 44, 45, 100] {
        let mut st = fx.model.new_state(CarryMode::Continue, Some(32));
        let some = fx
            .model
            .forward(&ids, &mut st, Logits::Every(k))
            .expect("every");
        let rows = Logits::Every(k).rows(ids.len());
        assert_eq!(*rows.last().expect("rows"), ids.len() - 1, "k = {k}");
        assert_eq!(some.dim(0).expect("dim"), rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let a = all.get(r).and_then(|t| t.to_vec1::<f32>()).expect("row");
            let b = some.get(i).and_then(|t| t.to_vec1::<f32>()).expect("row");
            assert!(max_diff(&a, &b) < 1e-5, "k = {k}, row {r}");
        }
    }
}

#[test]
fn the_session_samples_the_surprise_score_text_computes() {
    let fx = Fixture::load("tptt-llama", "delta_rule");
    let ids = token_ids(1100, fx.model.config().base.vocab_size, 5);
    let window = Some(64);
    let scored = score_text(
        &fx.model,
        &ids,
        window,
        Default::default(),
        None,
        &mut |_| {},
    )
    .expect("score")
    .expect("not cancelled");
    let mut s = Session::new(
        fx.arc(),
        SessionOptions {
            window,
            ..Default::default()
        },
    );
    s.feed(&ids, None).expect("feed");
    // Blocks of 512: in each, rows S−1, S−1−8, … are kept; the last row's target is unknown.
    let mut want = Vec::new();
    let mut start = 0;
    for block in ids.chunks(512) {
        for r in Logits::Every(SURPRISE_STRIDE).rows(block.len()) {
            if r + 1 < block.len() {
                want.push(scored[start + r]);
            }
        }
        start += block.len();
    }
    assert_eq!(s.surprise.samples as usize, want.len());
    let recent: Vec<f32> = s.surprise.recent.iter().copied().collect();
    let tail = &want[want.len() - recent.len()..];
    assert!(max_diff(&recent, tail) < TOL);
    // Single tokens (generated ones) are not scored.
    let before = s.surprise.samples;
    s.feed(&[3], None).expect("feed one");
    assert_eq!(s.surprise.samples, before);
    // The last logits are still those after the last token.
    let mut st = fx.model.new_state(CarryMode::Continue, window);
    for block in ids.chunks(512) {
        fx.model.forward(block, &mut st, Logits::Last).expect("fwd");
    }
    let last = fx
        .model
        .forward(&[3], &mut st, Logits::Last)
        .and_then(|t| Ok(t.squeeze(0)?.to_vec1::<f32>()?))
        .expect("last");
    assert!(max_diff(s.last_logits.as_deref().expect("logits"), &last) < TOL);
}

#[test]
fn a_probe_scores_what_a_direct_run_gives() {
    let fx = Fixture::load("tptt-llama", "delta_product");
    let probe = ProbeIds {
        fact: token_ids(9, fx.model.config().base.vocab_size, 1),
        question: token_ids(6, fx.model.config().base.vocab_size, 2),
        answer: token_ids(3, fx.model.config().base.vocab_size, 4),
    };
    let filler = token_ids(50, fx.model.config().base.vocab_size, 9);
    // Distances out of order and beyond the filler (cycled).
    let results = run_probe(&fx.model, &probe, &filler, &[70, 20], Some(16), None)
        .expect("probe")
        .expect("not cancelled");
    assert_eq!(
        results.iter().map(|r| r.distance).collect::<Vec<_>>(),
        vec![20, 70]
    );
    for r in &results {
        let mut st = fx.model.new_state(CarryMode::Continue, Some(16));
        fx.model
            .forward(&probe.fact, &mut st, Logits::Last)
            .expect("fact");
        // The filler is fed as the probe feeds it: up to each distance in turn (the linear
        // branch's chunking follows each call's length).
        let mut read = 0;
        for d in [20usize, 70].into_iter().filter(|&d| d <= r.distance) {
            let fill: Vec<u32> = (read..d).map(|i| filler[i % filler.len()]).collect();
            fx.model
                .forward(&fill, &mut st, Logits::Last)
                .expect("fill");
            read = d;
        }
        let qa: Vec<u32> = probe
            .question
            .iter()
            .chain(&probe.answer[..2])
            .copied()
            .collect();
        let rows = fx
            .model
            .forward(&qa, &mut st, Logits::All)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("qa");
        let q = probe.question.len();
        let mean = (0..3)
            .map(|j| nll(&rows[q - 1 + j], probe.answer[j]).expect("nll"))
            .sum::<f32>()
            / 3.0;
        assert!(
            (mean - r.answer_nll).abs() < 1e-3,
            "distance {}: {mean} vs {}",
            r.distance,
            r.answer_nll
        );
    }
    let empty = ProbeIds {
        answer: Vec::new(),
        ..probe.clone()
    };
    assert!(run_probe(&fx.model, &empty, &filler, &[1], Some(16), None).is_err());
    assert!(run_probe(&fx.model, &probe, &[], &[1], Some(16), None).is_err());
}
