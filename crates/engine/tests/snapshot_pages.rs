//! Paged snapshots (`snapshot::save_paged`, format version 6): the KV cache in pages shared by
//! the snapshots of successive turns.
//!
//! * a snapshot after each turn restores exactly (bit for bit), the latest and an earlier one
//!   (a branch from an older turn), for every fixture variant, windows that have filled and
//!   not, and the reference-compatible mode;
//! * a turn's snapshot writes pages only for that turn's new positions and refers to the pages
//!   of the turn before for the rest; pages whose bytes differ (another history) are not reused;
//! * a missing or corrupt page, a page list that lies (a path, overlaps, gaps, too few
//!   positions), are refused with an error naming the problem, never a panic;
//! * `sweep_pages` removes exactly the pages no kept snapshot refers to, and temporaries.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{token_ids, Fixture, Scratch, REPOS};
use tokenizers::Tokenizer;
use tptt::linear::CarryMode;
use tptt_engine::snapshot::{self, testing::RawSnapshot, PageRef};
use tptt_engine::{
    CancelToken, Error, FinishReason, GenerateOptions, SamplingParams, Session, SessionOptions,
};

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        params: SamplingParams {
            max_new_tokens: n,
            ..SamplingParams::greedy()
        },
        eos_ids: vec![2],
        ignore_eos: true,
        ..Default::default()
    }
}

fn generate(s: &mut Session, prompt: &[u32], n: usize, tok: &Tokenizer) {
    let out = s
        .generate(prompt, &greedy(n), tok, &CancelToken::new(), &mut |_| {})
        .expect("generate");
    assert_eq!(out.finish, FinishReason::MaxTokens);
}

/// Continue greedily for 6 tokens then feed 4 more: every logit vector seen, as bits.
fn continuation(s: &mut Session, vocab: usize, tok: &Tokenizer) -> Vec<Vec<u32>> {
    let mut seen = vec![s.last_logits.clone().expect("logits")];
    generate(s, &[], 6, tok);
    seen.push(s.last_logits.clone().expect("logits"));
    for id in token_ids(4, vocab, 91) {
        s.feed(&[id], None).expect("feed");
        seen.push(s.last_logits.clone().expect("logits"));
    }
    seen.iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn pages_of(path: &Path) -> HashSet<String> {
    snapshot::page_names(path)
        .expect("page names")
        .into_iter()
        .collect()
}

/// Three turns saved paged after each; the second restored (a branch) and the third must
/// continue exactly as the live session would.
fn turns(fx: &Fixture, opts: SessionOptions, scratch: &Scratch, tag: &str) {
    let label = format!("{} {opts:?}", fx.label());
    let tok = fx.tokenizer();
    let vocab = fx.model.config().base.vocab_size;
    let identity = fx.identity();
    let pages = scratch.path(&format!("{tag}-pages"));
    let mut live = Session::new(fx.arc(), opts);
    let mut saved: Vec<(PathBuf, Session)> = Vec::new();
    for turn in 0..3u64 {
        generate(&mut live, &token_ids(9, vocab, 10 + turn), 5, &tok);
        let path = scratch.path(&format!("{tag}-turn{turn}.tptt-state"));
        let reuse: Vec<PathBuf> = saved.last().map(|(p, _)| p.clone()).into_iter().collect();
        let s = snapshot::save_paged(&live, &identity, None, &path, &pages, &reuse)
            .expect("save_paged");
        assert_eq!(
            s.file_bytes,
            std::fs::metadata(&path).expect("written").len(),
            "{label}: reported size"
        );
        let kv = live.state.kv_len();
        // The usual mode caches the last positions, one range: always paged. (The
        // reference-compatible mode may keep a first and a last range: then the file holds
        // its KV itself.)
        if opts.mode == CarryMode::Continue {
            assert!(s.pages >= usize::from(kv > 0), "{label}: {s:?}");
        }
        // Per position: layers × (keys + values) × KV heads × head size × 4 bytes.
        let b = &fx.model.config().base;
        let per_position = (2 * b.total_kv_heads() * opts.kv_format.row_bytes(b.head_dim)) as u64;
        if let Some((prev, prev_session)) = saved.last() {
            // Only the positions the previous turn's window did not hold are new.
            let new_positions = live.state.pos - prev_session.state.pos;
            let held_before = match s.pages {
                0 => 0,
                _ => kv.saturating_sub(new_positions),
            };
            assert!(
                s.new_page_bytes <= new_positions.min(kv) as u64 * per_position + 4096,
                "{label} turn {turn}: {} new page bytes for {new_positions} new positions",
                s.new_page_bytes
            );
            let shared = pages_of(&path).intersection(&pages_of(prev)).count();
            assert_eq!(
                shared > 0,
                held_before > 0,
                "{label} turn {turn}: pages shared with the turn before ({held_before} positions were held)"
            );
        }
        let info = snapshot::info(&path).expect("info");
        assert_eq!((info.pos, info.kv_len), (live.state.pos, kv), "{label}");
        saved.push((path, live.try_clone().expect("copy")));
    }
    // Every turn restores exactly, the oldest too (a branch from an earlier turn).
    for (turn, (path, at_save)) in saved.iter().enumerate() {
        let (mut restored, _) =
            snapshot::load_paged(fx.arc(), &identity, path, &pages).expect("load_paged");
        assert_eq!(
            restored.tokens, at_save.tokens,
            "{label} turn {turn}: tokens"
        );
        assert_eq!(
            restored.state.key_pos, at_save.state.key_pos,
            "{label} turn {turn}"
        );
        assert_eq!(
            restored.state.kv_format, at_save.state.kv_format,
            "{label} turn {turn}: KV format"
        );
        let mut twin = at_save.try_clone().expect("copy");
        assert!(
            continuation(&mut restored, vocab, &tok) == continuation(&mut twin, vocab, &tok),
            "{label} turn {turn}: the restored session continues differently"
        );
    }
}

#[test]
fn paged_snapshots_after_every_turn_restore_exactly_and_share_pages() {
    let scratch = Scratch::new("pages");
    let mut n = 0;
    for repo in REPOS {
        for v in common::variants(repo) {
            let fx = Fixture::load(repo, &v);
            for window in [None, Some(8), Some(24)] {
                n += 1;
                let opts = SessionOptions {
                    window,
                    ..Default::default()
                };
                turns(&fx, opts, &scratch, &format!("t{n}"));
            }
            // A compact cache's pages hold f16, shared and restored as such.
            n += 1;
            let opts = SessionOptions {
                window: Some(8),
                kv_format: tptt::state::KvFormat::F16,
                ..Default::default()
            };
            turns(&fx, opts, &scratch, &format!("t{n}"));
        }
    }
    // An 8-bit cache's pages hold its blocks (u8), shared and restored as such.
    let synthetic = Fixture::synthetic_d32(&scratch.path("synthetic"));
    for window in [Some(8), None] {
        n += 1;
        let opts = SessionOptions {
            window,
            kv_format: tptt::state::KvFormat::Q8_0,
            ..Default::default()
        };
        turns(&synthetic, opts, &scratch, &format!("t{n}"));
    }
    let fx = Fixture::load("tptt-llama", "delta_product");
    turns(
        &fx,
        SessionOptions {
            mode: CarryMode::Reference,
            window: Some(16),
            ..Default::default()
        },
        &scratch,
        "reference",
    );
}

/// A session of `tptt-llama/delta_product`, window 16, after a prompt from `seed`.
fn session(fx: &Fixture, seed: u64) -> Session {
    let mut s = Session::new(
        fx.arc(),
        SessionOptions {
            window: Some(16),
            ..Default::default()
        },
    );
    generate(&mut s, &token_ids(12, 300, seed), 6, &fx.tokenizer());
    s
}

#[test]
fn pages_of_another_history_are_not_reused() {
    let scratch = Scratch::new("pages-other");
    let fx = Fixture::load("tptt-llama", "delta_product");
    let pages = scratch.path("pages");
    let a = session(&fx, 1);
    let b = session(&fx, 2);
    let (pa, pb) = (scratch.path("a.state"), scratch.path("b.state"));
    snapshot::save_paged(&a, &fx.identity(), None, &pa, &pages, &[]).expect("save a");
    let saved = snapshot::save_paged(
        &b,
        &fx.identity(),
        None,
        &pb,
        &pages,
        std::slice::from_ref(&pa),
    )
    .expect("save b");
    assert!(saved.new_pages > 0, "{saved:?}");
    assert!(pages_of(&pa).is_disjoint(&pages_of(&pb)));
    let (mut back, _) = snapshot::load_paged(fx.arc(), &fx.identity(), &pb, &pages).expect("load");
    let mut twin = b.try_clone().expect("copy");
    let tok = fx.tokenizer();
    assert!(continuation(&mut back, 300, &tok) == continuation(&mut twin, 300, &tok));
    // Saving the same state again writes nothing new.
    let again = snapshot::save_paged(
        &b,
        &fx.identity(),
        None,
        &pb,
        &pages,
        std::slice::from_ref(&pb),
    )
    .expect("save b again");
    assert_eq!((again.new_pages, again.new_page_bytes), (0, 0), "{again:?}");
}

fn reason(r: tptt_engine::Result<(Session, Option<tptt_engine::ReadMark>)>, what: &str) -> String {
    match r {
        Err(Error::Snapshot { reason, .. }) => reason,
        Err(e) => panic!("{what}: expected Error::Snapshot, got {e:?}"),
        Ok(_) => panic!("{what}: the snapshot was accepted"),
    }
}

#[test]
fn missing_corrupt_or_lying_pages_are_refused() {
    let scratch = Scratch::new("pages-bad");
    let fx = Fixture::load("tptt-llama", "delta_product");
    let identity = fx.identity();
    let pages = scratch.path("pages");
    let s = session(&fx, 3);
    let path = scratch.path("s.state");
    snapshot::save_paged(&s, &identity, None, &path, &pages, &[]).expect("save");
    let load = |p: &Path, dir: &Path| snapshot::load_paged(fx.arc(), &identity, p, dir);
    load(&path, &pages).expect("the intact snapshot loads");

    // The pages are not beside the file: load_marked looks in kv-pages/ there.
    let r = reason(
        snapshot::load_marked(fx.arc(), &identity, &path),
        "no pages beside",
    );
    assert!(r.contains("KV page"), "{r}");

    // A page deleted, then a page corrupted.
    let refs = snapshot::page_refs(&path).expect("refs");
    let page = snapshot::page_path(&pages, &refs[0].0);
    let bytes = std::fs::read(&page).expect("page");
    std::fs::remove_file(&page).expect("rm");
    let r = reason(load(&path, &pages), "missing page");
    assert!(r.contains("KV page") && r.contains("cannot be read"), "{r}");
    let mut bad = bytes.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x40;
    std::fs::write(&page, &bad).expect("write");
    let r = reason(load(&path, &pages), "corrupt page");
    assert!(r.contains("corrupt"), "{r}");
    std::fs::write(&page, &bytes).expect("restore page");
    load(&path, &pages).expect("loads again");

    // Page lists that lie, with a correct checksum.
    let raw = RawSnapshot::parse(&std::fs::read(&path).expect("read")).expect("parse");
    let kv = s.state.kv_len();
    let first = s.state.pos - kv;
    let name = refs[0].0.clone();
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no list", None, "kv_pages"),
        ("not a list", Some("{}".into()), "kv_pages"),
        (
            "a path",
            Some(
                serde_json::to_string(&[PageRef("../../etc/passwd".into(), first, kv)])
                    .unwrap_or_default(),
            ),
            "not a page name",
        ),
        (
            "too few positions",
            Some(
                serde_json::to_string(&[PageRef(name.clone(), first, kv - 1)]).unwrap_or_default(),
            ),
            "positions",
        ),
        (
            "overlapping",
            Some(
                serde_json::to_string(&[
                    PageRef(name.clone(), first, 2),
                    PageRef(name.clone(), first + 1, kv - 1),
                ])
                .unwrap_or_default(),
            ),
            "overlaps",
        ),
        (
            "beyond the page",
            Some(
                serde_json::to_string(&[PageRef(name.clone(), first + 1, kv)]).unwrap_or_default(),
            ),
            "from a page holding",
        ),
        (
            "an unknown page",
            Some(serde_json::to_string(&[PageRef("0".repeat(32), first, kv)]).unwrap_or_default()),
            "cannot be read",
        ),
    ];
    for (what, list, want) in cases {
        let mut r = raw.clone();
        match list {
            Some(l) => r.meta.insert("kv_pages".into(), l),
            None => r.meta.remove("kv_pages"),
        };
        let p = scratch.path(&format!("lie-{}.state", what.replace(' ', "-")));
        std::fs::write(&p, r.to_bytes().expect("bytes")).expect("write");
        let got = reason(load(&p, &pages), what);
        assert!(got.contains(want), "{what}: {got}");
    }
    // A paged file that also holds a layer's keys itself.
    let mut r = raw.clone();
    r.set_f32("layers.0.k", &[1, kv, 4], &vec![0.0; kv * 4]);
    let p = scratch.path("lie-own-keys.state");
    std::fs::write(&p, r.to_bytes().expect("bytes")).expect("write");
    let got = reason(load(&p, &pages), "own keys");
    assert!(got.contains("itself"), "{got}");
}

#[test]
fn sweep_removes_only_unreferenced_pages_and_temporaries() {
    let scratch = Scratch::new("pages-sweep");
    let fx = Fixture::load("tptt-llama", "delta_product");
    let identity = fx.identity();
    let pages = scratch.path("pages");
    let tok = fx.tokenizer();
    let mut s = session(&fx, 4);
    let (pa, pb) = (scratch.path("a.state"), scratch.path("b.state"));
    snapshot::save_paged(&s, &identity, None, &pa, &pages, &[]).expect("save a");
    // 40 more positions: the window of 16 moves past every position of turn a.
    generate(&mut s, &token_ids(30, 300, 5), 10, &tok);
    snapshot::save_paged(&s, &identity, None, &pb, &pages, std::slice::from_ref(&pa))
        .expect("save b");
    let only_a: HashSet<String> = pages_of(&pa).difference(&pages_of(&pb)).cloned().collect();
    assert!(!only_a.is_empty());
    let tmp = pages.join(".0123.tmp");
    std::fs::write(&tmp, b"half a page").expect("tmp");

    // Too young: nothing goes.
    let keep = pages_of(&pb);
    let none = snapshot::sweep_pages(&pages, &keep, Duration::from_secs(3600)).expect("sweep");
    assert_eq!(none.pages, 0);
    load_ok(&fx, &pa, &pages);

    std::fs::remove_file(&pa).expect("rm a");
    let swept = snapshot::sweep_pages(&pages, &keep, Duration::ZERO).expect("sweep");
    assert_eq!(swept.pages, only_a.len(), "{swept:?}");
    assert!(!tmp.exists(), "the temporary stays");
    for name in &only_a {
        assert!(!snapshot::page_path(&pages, name).exists());
    }
    load_ok(&fx, &pb, &pages);
    // A missing folder is nothing to sweep.
    let gone = snapshot::sweep_pages(&scratch.path("none"), &keep, Duration::ZERO).expect("sweep");
    assert_eq!(gone, snapshot::Swept::default());
}

fn load_ok(fx: &Fixture, path: &Path, pages: &Path) {
    snapshot::load_paged(fx.arc(), &fx.identity(), path, pages).expect("loads");
}
