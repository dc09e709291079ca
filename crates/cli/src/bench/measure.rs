//! The measurements: memory bandwidth, decode rates (alone and paired), peak RSS, and the
//! small helpers they share.

use super::*;

/// The memory bandwidth, measured as STREAM does: every thread on its own part of a buffer far
/// larger than the last-level cache, several passes, the best one; a read-only pass (sum every
/// word) and a read-modify-write one (add one to every word: two bytes of traffic per byte), with
/// the wide-load kernels of `tptt::cpu::stream` (optimised in every profile). The buffer is on
/// transparent huge pages where the kernel grants them, as the weights are
/// (`tptt::alloc::advise_huge_pages`): with 4 KiB pages a stream pays a TLB miss every 4 KiB and
/// the pass reads ~10 % less than a decode can.
///
/// The ceiling of a decode is the read-only pass: a decode step only reads. The
/// read-modify-write pass moves more bytes in all, but half of them are write-backs of dirty
/// lines, which the caches issue on their own; the reads within it come slower than the
/// read-only pass's (measured in C on an Intel Xeon, 2 threads, huge pages: read-only 30.6 GB/s, read-modify-write 24.8
/// GB/s of reads + 24.8 of writes), so no read-only stream can reach its total.
#[derive(Debug, Clone)]
pub(super) struct Bandwidth {
    /// Best read-only pass, GB/s (1e9).
    pub(super) read_gb_s: f64,
    /// Every read-only pass.
    pub(super) read_runs: Vec<f64>,
    /// Best read-modify-write pass, GB/s of traffic (read + written).
    pub(super) rmw_gb_s: f64,
    /// Every read-modify-write pass.
    pub(super) rmw_runs: Vec<f64>,
    /// Whether the kernel took the huge-page advice for the buffer (every measurement merged in).
    pub(super) huge_pages: bool,
}

impl Bandwidth {
    /// The ceiling of a read-only stream (a decode step): the best read-only pass.
    pub(super) fn ceiling(&self) -> f64 {
        self.read_gb_s
    }

    /// Adds the passes of a later measurement: the machine's rate drifts over a run (its
    /// neighbours come and go), so a ratio taken against passes measured minutes away from the
    /// decode would let a slow spell during the passes pass for a fast decode. Bounding each
    /// decode by the best pass measured before and after it keeps the ceiling a ceiling.
    pub(super) fn merge(&mut self, other: Bandwidth) {
        self.read_gb_s = self.read_gb_s.max(other.read_gb_s);
        self.read_runs.extend(other.read_runs);
        self.rmw_gb_s = self.rmw_gb_s.max(other.rmw_gb_s);
        self.rmw_runs.extend(other.rmw_runs);
        self.huge_pages &= other.huge_pages;
    }
}

/// [`Bandwidth`] with `threads` threads over [`BANDWIDTH_BYTES`], [`BANDWIDTH_PASSES`] each.
pub(super) fn bandwidth(threads: usize) -> Result<Bandwidth> {
    let words = BANDWIDTH_BYTES / 8;
    let mut buf: Vec<u64> = Vec::with_capacity(words);
    let huge_pages = tptt::alloc::advise_huge_pages(&mut buf);
    // Written once, so every page is backed by real memory (not the shared zero page).
    buf.extend(0..words as u64);
    let per = words.div_ceil(threads.max(1));
    let bytes = (words * 8) as f64;
    let mut read_runs = Vec::new();
    let mut rmw_runs = Vec::new();
    let mut check = 0u64;
    for _ in 0..BANDWIDTH_PASSES {
        let start = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(per)
                .map(|part| s.spawn(move || tptt::cpu::stream::read_sum(part)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        read_runs.push(bytes / start.elapsed().as_secs_f64() / 1e9);
        check = sums.iter().fold(check, |a, &s| a.wrapping_add(s));

        let start = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks_mut(per) {
                s.spawn(move || tptt::cpu::stream::add_one(part));
            }
        });
        rmw_runs.push(2.0 * bytes / start.elapsed().as_secs_f64() / 1e9);
    }
    // The sums depend on every word read, so no pass can be optimised away; and word `i`
    // started as `i` and got one added per pass, which the final sum checks.
    let n = words as u64;
    let want = n * (n - 1) / 2 + n * BANDWIDTH_PASSES as u64;
    let got = std::thread::scope(|s| {
        let handles: Vec<_> = buf
            .chunks(per)
            .map(|part| s.spawn(move || tptt::cpu::stream::read_sum(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .fold(0u64, u64::wrapping_add)
    });
    if got != want || check == 0 {
        bail!("the bandwidth passes did not read or write what they should (a thread failed)");
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    Ok(Bandwidth {
        read_gb_s: best(&read_runs),
        read_runs,
        rmw_gb_s: best(&rmw_runs),
        rmw_runs,
        huge_pages,
    })
}

/// Deterministic random token ids (xorshift64*), never special-casing any id.
pub(super) fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as u32 % vocab as u32
        })
        .collect()
}

pub(super) fn argmax_tensor(logits: &Tensor) -> Result<u32> {
    let ids = logits
        .argmax_keepdim(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    ids.first().copied().context("empty logits")
}

pub(super) fn argmax_slice(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// One greedy decode step: feed `id`, return the next.
pub(super) fn step(model: &Model, state: &mut State, id: u32) -> Result<u32> {
    argmax_tensor(&model.forward(&[id], state, Logits::Last)?)
}

/// Decode speed from `state` (on a clone; the caller's state is untouched).
#[derive(Debug, Clone, Copy)]
pub(super) struct DecodeRate {
    pub(super) history: usize,
    /// 1 / median step time: robust to another process stealing the CPU for a moment.
    pub(super) tok_s: f64,
    /// Steps / total time.
    pub(super) tok_s_mean: f64,
    pub(super) kv_len: usize,
}

pub(super) fn decode_rate(
    model: &Model,
    state: &State,
    last_logits: &[f32],
    history: usize,
) -> Result<DecodeRate> {
    let mut st = state.try_clone()?;
    let mut id = step(model, &mut st, argmax_slice(last_logits))?; // warm-up
    let mut times = Vec::with_capacity(DECODE_STEPS);
    for _ in 0..DECODE_STEPS {
        let t = Instant::now();
        id = step(model, &mut st, id)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let median = (times[(DECODE_STEPS - 1) / 2] + times[DECODE_STEPS / 2]) / 2.0;
    Ok(DecodeRate {
        history,
        tok_s: 1.0 / median,
        tok_s_mean: DECODE_STEPS as f64 / total,
        kv_len: state.kv_len(),
    })
}

/// Decode after the same `history` for TPTT and the base, their steps alternating (the order
/// swapped every round), so both see the same machine: the paired measurement behind
/// `tptt_overhead`, where two separate runs would compare the neighbours' load as much as the
/// engines. Returns (TPTT, base) tok/s, each 1 / median step time.
pub(super) fn paired_decode(
    tptt: &Arc<Model>,
    base: &Arc<Model>,
    window: Option<usize>,
    kv: tptt::state::KvFormat,
    ids: &[u32],
    history: usize,
) -> Result<(f64, f64)> {
    let opts = SessionOptions {
        mode: CarryMode::Continue,
        window,
        kv_format: kv,
    };
    let mut sides = Vec::new();
    for model in [tptt, base] {
        let mut s = Session::new(model.clone(), opts);
        s.feed(&ids[..history], None)?;
        let first = argmax_slice(s.last_logits.as_deref().unwrap_or_default());
        sides.push((model.as_ref(), s.state, first));
    }
    alternating_rates(sides)
}

/// Decode from the states after a short and a long history (each with the logits after it),
/// their steps alternating (the order swapped every round): (short, long) tok/s, each
/// 1 / median step. The paired measurement behind `long_history_flatness`: the two decodes,
/// measured minutes apart, once read 1.03 against a physical bound of 0.85 because the
/// short one fell in a slow spell of this shared machine.
pub(super) fn paired_histories(
    model: &Model,
    short: (&State, &[f32]),
    long: (&State, &[f32]),
) -> Result<(f64, f64)> {
    let sides = [short, long]
        .into_iter()
        .map(|(st, logits)| Ok((model, st.try_clone()?, argmax_slice(logits))))
        .collect::<Result<_>>()?;
    alternating_rates(sides)
}

/// Decode from `state` with its KV cache in f32, f16 and 8-bit (where the model's heads allow
/// it), their steps taking turns on clones: tok/s of each (8-bit `None` where it cannot be
/// used), each 1 / median step. The paired measurement behind `kv_f16_decode_speedup` and
/// `kv_q8_decode_speedup` (separate runs here differ by 10–30 %).
pub(super) fn paired_kv_formats(
    model: &Model,
    state: &State,
    last_logits: &[f32],
) -> Result<(f64, f64, Option<f64>)> {
    use tptt::state::KvFormat;
    let first = argmax_slice(last_logits);
    let mut sides = Vec::new();
    for kv in [KvFormat::F32, KvFormat::F16, KvFormat::Q8_0] {
        if kv
            .check(model.config().base.head_dim, model.device())
            .is_err()
        {
            continue;
        }
        let mut st = state.try_clone()?;
        st.set_kv_format(kv)?;
        sides.push((model, st, first));
    }
    let rates = rotating_rates(sides)?;
    Ok((rates[0], rates[1], rates.get(2).copied()))
}

/// Two decoders (model, state, first token) stepped in turn, the order swapped every round,
/// after one warm-up step each: their tok/s, each 1 / median step time.
fn alternating_rates(sides: Vec<(&Model, State, u32)>) -> Result<(f64, f64)> {
    let rates = rotating_rates(sides)?;
    Ok((rates[0], rates[1]))
}

/// Decoders (model, state, first token) stepped in turn, the order rotated every round (each
/// goes first as often as the others), after one warm-up step each: their tok/s, each
/// 1 / median step time.
fn rotating_rates(sides: Vec<(&Model, State, u32)>) -> Result<Vec<f64>> {
    let mut runs = Vec::with_capacity(sides.len());
    for (model, mut st, first) in sides {
        let id = step(model, &mut st, first)?; // warm-up
        runs.push((model, st, id, Vec::with_capacity(2 * DECODE_STEPS)));
    }
    let n = runs.len();
    for round in 0..2 * DECODE_STEPS {
        for k in 0..n {
            let (model, st, id, times) = &mut runs[(round + k) % n];
            let t = Instant::now();
            *id = step(model, st, *id)?;
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(runs
        .iter_mut()
        .map(|r| {
            let times = &mut r.3;
            times.sort_by(f64::total_cmp);
            let m = times.len();
            1.0 / ((times[(m - 1) / 2] + times[m / 2]) / 2.0)
        })
        .collect())
}

pub(super) fn read_status_kb(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(super) fn peak_rss_bytes() -> Option<u64> {
    read_status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Reset the kernel's peak-RSS counter to the current RSS; false where the kernel refuses.
pub(super) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
