//! The harness of the loader fuzz tests (`tests/fuzz_loaders.rs` here and
//! `crates/engine/tests/fuzz_snapshot.rs`, which includes this file by path).
//!
//! * [`run`] feeds a fixed number of inputs from a proptest strategy, with a fixed seed (CI is
//!   deterministic), to a loader, each on its own thread: a panic is a failure, and so is an
//!   input that takes longer than [`CASE_TIMEOUT`] (a hang) or makes the loader's thread hold
//!   more memory at once than the bound the caller gives relative to the input's size (an
//!   allocation the header asked for instead of one the file justifies).
//! * [`Mutation`] / [`mutations`]: byte-level edits of a valid file (bit flips, overwrites with
//!   values that sit on boundaries, truncation, insertion) biased towards its header.
//!
//! Memory is measured by a counting global allocator, per thread: the peak of the bytes the
//! case's thread holds at once (allocations of other threads, such as rayon's, are not
//! counted).

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Longest one input may take (debug build, a 2-core machine shared with other jobs).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(30);

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let live = LIVE.with(|l| {
                let v = l.get().saturating_add(size);
                l.set(v);
                v
            });
            PEAK.with(|p| p.set(p.get().max(live)));
        }
    });
}

fn note_free(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            LIVE.with(|l| l.set(l.get().saturating_sub(size)));
        }
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are plain
// thread-local cells with constant initialisers (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What one input did.
pub struct Outcome {
    /// `Ok` (the loader accepted it) or the error's message.
    pub result: Result<(), String>,
    /// Most bytes the loader's thread held at once.
    pub peak_bytes: usize,
}

/// Run `f` on a thread of its own, measuring its peak memory: `Err` if it panicked or did not
/// return within [`CASE_TIMEOUT`] (the thread is then left behind).
pub fn contained(
    f: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<Outcome, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-case".into())
        .spawn(move || {
            TRACK.with(|t| t.set(true));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            TRACK.with(|t| t.set(false));
            let peak = PEAK.with(Cell::get);
            let _ = tx.send(r.map(|result| Outcome {
                result,
                peak_bytes: peak,
            }));
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(panic)) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
        Err(_) => Err(format!("no answer within {CASE_TIMEOUT:?} (a hang?)")),
    }
}

/// Feed `cases` inputs of `strategy` (seeded by `seed`) to `case`, which runs the loader (through
/// [`check_bounded`]) and returns whether the loader accepted it, or `Err` with a description on
/// a failure. A failing input is
/// shrunk a little (bounded), then the test fails with it.
pub fn run<S: Strategy>(
    name: &str,
    seed: u8,
    cases: u32,
    strategy: S,
    case: impl Fn(S::Value) -> Result<bool, String>,
) where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        max_shrink_time: 20_000,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let started = std::time::Instant::now();
    let (seen, accepted) = (Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&strategy, |input| {
        seen.set(seen.get() + 1);
        let ok = case(input).map_err(TestCaseError::fail)?;
        accepted.set(accepted.get() + u32::from(ok));
        Ok(())
    });
    eprintln!(
        "[fuzz] {name}: {} inputs ({} accepted) in {:.1} s",
        seen.get(),
        accepted.get(),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// Check one loader call on `input_len` bytes: no panic, no hang, and at most
/// `per_byte × input_len + fixed` bytes held at once. Returns whether the loader accepted it.
pub fn check_bounded(
    what: &str,
    input_len: usize,
    per_byte: usize,
    fixed: usize,
    f: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<bool, String> {
    let out = contained(f).map_err(|e| format!("{what}: {e}"))?;
    let bound = per_byte.saturating_mul(input_len).saturating_add(fixed);
    if out.peak_bytes > bound {
        return Err(format!(
            "{what}: held {} bytes at once for an input of {input_len} bytes (bound {bound}); result {:?}",
            out.peak_bytes, out.result
        ));
    }
    Ok(out.result.is_ok())
}

/// One byte-level edit of a file.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR the byte at (position mod length) with a mask.
    Flip(usize, u8),
    /// Overwrite 8 (or 4) little-endian bytes at a position with a boundary value.
    Word(usize, u64, bool),
    /// Cut the file at a position.
    Truncate(usize),
    /// Insert bytes at a position.
    Insert(usize, Vec<u8>),
}

/// Values that sit on boundaries: 0, 1, powers of two and their neighbours, all ones.
fn boundary() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(i64::MAX as u64),
        (0u32..64).prop_map(|k| 1u64 << k),
        (1u32..64).prop_map(|k| (1u64 << k) - 1),
        any::<u64>(),
    ]
}

/// A sequence of 1 to `max` edits, positions drawn from `0..hot` three times out of four (the
/// header) and anywhere otherwise (positions are taken mod the length when applied).
pub fn mutations(hot: usize, max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    let pos = prop_oneof![3 => 0..hot.max(1), 1 => any::<usize>()];
    let one = (
        pos,
        any::<u8>(),
        boundary(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 1..16),
        0u8..8,
    )
        .prop_map(|(at, mask, word, wide, bytes, kind)| match kind {
            0..=3 => Mutation::Flip(at, mask.max(1)),
            4..=5 => Mutation::Word(at, word, wide),
            6 => Mutation::Insert(at, bytes),
            _ => Mutation::Truncate(at),
        });
    prop::collection::vec(one, 1..=max)
}

/// `data` with the edits applied in order.
pub fn apply(data: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut b = data.to_vec();
    for m in edits {
        let len = b.len().max(1);
        match m {
            Mutation::Flip(at, mask) => {
                if let Some(x) = b.get_mut(at % len) {
                    *x ^= mask;
                }
            }
            Mutation::Word(at, v, wide) => {
                let bytes = v.to_le_bytes();
                let n = if *wide { 8 } else { 4 };
                let at = at % len;
                for (i, x) in bytes[..n].iter().enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = *x;
                    }
                }
            }
            Mutation::Truncate(at) => b.truncate(at % len),
            Mutation::Insert(at, bytes) => {
                let at = (at % len).min(b.len());
                b.splice(at..at, bytes.iter().copied());
            }
        }
    }
    b
}
