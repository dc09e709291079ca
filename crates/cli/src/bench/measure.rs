//! The measurements: memory bandwidth, decode rates (alone and paired), peak RSS, and the
//! small helpers they share.

use super::*;

/// Streaming read bandwidth with `threads` threads, GB/s (1e9), each run and the best.
pub(super) fn bandwidth(threads: usize) -> Result<(f64, Vec<f64>)> {
    // memset writes every page, so the reads hit real memory (not the shared zero page).
    let buf = vec![0x5au8; BANDWIDTH_BYTES];
    let per = BANDWIDTH_BYTES / threads;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let all_equal = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        let (a, b) = part.split_at(part.len() / 2);
                        a == &b[..a.len()] // memcmp: reads both halves, i.e. the whole part
                    })
                })
                .collect();
            handles.into_iter().all(|h| h.join().unwrap_or(false))
        });
        let dt = start.elapsed().as_secs_f64();
        if !all_equal {
            bail!("bandwidth buffer compared unequal (a thread failed)");
        }
        runs.push(BANDWIDTH_BYTES as f64 / dt / 1e9);
    }
    let best = runs.iter().copied().fold(0.0, f64::max);
    Ok((best, runs))
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
    let mut st = state.clone();
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
    ids: &[u32],
    history: usize,
) -> Result<(f64, f64)> {
    let opts = SessionOptions {
        mode: CarryMode::Continue,
        window,
    };
    let mut sides = Vec::new();
    for model in [tptt, base] {
        let mut s = Session::new(model.clone(), opts);
        s.feed(&ids[..history], None)?;
        let mut st = s.state.clone();
        let id = step(
            model,
            &mut st,
            argmax_slice(s.last_logits.as_deref().unwrap_or_default()),
        )?; // warm-up
        sides.push((model, st, id, Vec::with_capacity(2 * DECODE_STEPS)));
    }
    for round in 0..2 * DECODE_STEPS {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (model, st, id, times) = &mut sides[i];
            let t = Instant::now();
            *id = step(model, st, *id)?;
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let rate = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        let n = times.len();
        1.0 / ((times[(n - 1) / 2] + times[n / 2]) / 2.0)
    };
    let a = rate(&mut sides[0].3);
    let b = rate(&mut sides[1].3);
    Ok((a, b))
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
