//! One engine run of the bench (module doc of [`super`], step 3): prefill, decode after each
//! history length, snapshot size and restore-vs-re-read time to first token, peak RSS.

use super::*;

pub(super) struct ResumeResult {
    pub(super) history: usize,
    pub(super) restore_ttft_s: f64,
    /// Of the best restore: `snapshot::load` alone, and the first step after it.
    pub(super) restore_load_s: f64,
    pub(super) restore_step_s: f64,
    pub(super) reread_ttft_s: f64,
    pub(super) snapshot_bytes: u64,
    pub(super) state_bytes: usize,
    pub(super) kv_len: usize,
    pub(super) branch: BranchResult,
}

/// Per-turn snapshots (paged, format 6) at the resume point: what one more turn costs on disk,
/// and the time to the first token of a message sent in a branch from the earlier turn.
pub(super) struct BranchResult {
    /// The paged snapshot at the resume point: its file and its pages.
    pub(super) first_file_bytes: u64,
    pub(super) first_page_bytes: u64,
    /// The next turn's snapshot: what it added (file + new pages), for `turn_tokens` tokens.
    pub(super) turn_bytes: u64,
    pub(super) turn_tokens: usize,
    /// Best of two: `load_paged` of the earlier turn + reading a `message_tokens` message.
    pub(super) ttft_s: f64,
    pub(super) load_s: f64,
    pub(super) message_tokens: usize,
}

/// Tokens of the turn the bench adds after the resume point, and of the message sent in the
/// branch.
const BRANCH_TURN_TOKENS: usize = 128;
const BRANCH_MESSAGE_TOKENS: usize = 16;

/// [`BranchResult`] for `session` (its history ends at the resume point); `ids` supplies the
/// next turn's and the message's tokens.
fn measure_branch(
    model: &Arc<Model>,
    identity: &ModelIdentity,
    session: &Session,
    ids: &[u32],
    name: &str,
) -> Result<BranchResult> {
    let dir = std::env::temp_dir().join(format!("tptt-bench-{}-{name}-turns", std::process::id()));
    let pages = dir.join(snapshot::PAGES_DIR);
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<BranchResult> {
        let at = session.tokens.len();
        let take = |from: usize, n: usize| -> Vec<u32> {
            (0..n).map(|i| ids[(from + i) % ids.len()]).collect()
        };
        let first_path = dir.join("turn-1.state");
        let first = snapshot::save_paged(session, identity, None, &first_path, &pages, &[])?;
        let mut next = session.try_clone()?;
        next.feed(&take(at, BRANCH_TURN_TOKENS), None)?;
        let second = snapshot::save_paged(
            &next,
            identity,
            None,
            &dir.join("turn-2.state"),
            &pages,
            std::slice::from_ref(&first_path),
        )?;
        drop(next);
        let message = take(at + BRANCH_TURN_TOKENS, BRANCH_MESSAGE_TOKENS);
        let (mut best, mut best_load) = (f64::INFINITY, 0.0);
        for _ in 0..2 {
            let t = Instant::now();
            let (mut branch, _) =
                snapshot::load_paged(model.clone(), identity, &first_path, &pages)?;
            branch.state.set_kv_format(session.state.kv_format)?;
            let loaded = t.elapsed().as_secs_f64();
            branch.feed(&message, None)?;
            std::hint::black_box(argmax_slice(
                branch.last_logits.as_deref().unwrap_or_default(),
            ));
            let total = t.elapsed().as_secs_f64();
            if total < best {
                (best, best_load) = (total, loaded);
            }
        }
        Ok(BranchResult {
            first_file_bytes: first.file_bytes,
            first_page_bytes: first.new_page_bytes,
            turn_bytes: second.added_bytes(),
            turn_tokens: BRANCH_TURN_TOKENS,
            ttft_s: best,
            load_s: best_load,
            message_tokens: BRANCH_MESSAGE_TOKENS,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub(super) struct EngineRun {
    pub(super) mag_weight: f32,
    pub(super) prefill_tok_s: f64,
    pub(super) prefill_s: f64,
    pub(super) decode: Vec<DecodeRate>,
    pub(super) resume: ResumeResult,
    pub(super) peak_rss: Option<u64>,
    pub(super) peak_rss_reset: bool,
    /// Peak RSS while the session alone decodes at the longest history (what an app holds):
    /// see [`app_peak_rss`].
    pub(super) app_peak_rss: Option<u64>,
    pub(super) window: Option<usize>,
    /// Decode at the longest history with the KV cache in f32 and in f16, paired: (history,
    /// f32 tok/s, f16 tok/s).
    pub(super) kv_paired: Option<(usize, f64, f64, Option<f64>)>,
    /// Decode after the shortest and the longest history, steps alternating: (short history,
    /// long history, short tok/s, long tok/s): `long_history_flatness` (see
    /// [`super::measure::paired_histories`]).
    pub(super) flatness_paired: Option<(usize, usize, f64, f64)>,
    /// The most the session's KV buffers held (bytes, in the run's format).
    pub(super) kv_bytes: usize,
}

impl EngineRun {
    pub(super) fn decode_at(&self, history: usize) -> Option<f64> {
        self.decode
            .iter()
            .find(|d| d.history == history)
            .map(|d| d.tok_s)
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "mag_weight": self.mag_weight,
            "window": self.window,
            "prefill_tokens": 512,
            "prefill_s": self.prefill_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode": self.decode.iter().map(|d| json!({"history": d.history, "tok_s": d.tok_s, "tok_s_mean": d.tok_s_mean, "kv_len": d.kv_len, "steps": DECODE_STEPS})).collect::<Vec<_>>(),
            "resume": {
                "history": self.resume.history,
                "restore_ttft_s": self.resume.restore_ttft_s,
                "restore_load_s": self.resume.restore_load_s,
                "restore_step_s": self.resume.restore_step_s,
                "reread_ttft_s": self.resume.reread_ttft_s,
                "speedup": self.resume.reread_ttft_s / self.resume.restore_ttft_s,
                "snapshot_bytes": self.resume.snapshot_bytes,
                "state_bytes": self.resume.state_bytes,
                "kv_len": self.resume.kv_len,
                "branch": {
                    "format": "paged snapshot (format 6): recurrent state + logits + token ids in the file, the KV window in pages shared between turns",
                    "first_file_bytes": self.resume.branch.first_file_bytes,
                    "first_page_bytes": self.resume.branch.first_page_bytes,
                    "turn_tokens": self.resume.branch.turn_tokens,
                    "turn_snapshot_bytes": self.resume.branch.turn_bytes,
                    "branch_ttft_s": self.resume.branch.ttft_s,
                    "branch_load_s": self.resume.branch.load_s,
                    "message_tokens": self.resume.branch.message_tokens,
                },
            },
            "flatness_paired": self.flatness_paired.map(|(hs, hl, s, l)| json!({"short_history": hs, "long_history": hl, "short_tok_s": s, "long_tok_s": l, "method": "the states after both histories, steps alternating (order swapped every round); 1 / median step"})),
            "kv_formats_paired": self.kv_paired.map(|(h, a, b, c)| json!({"history": h, "f32_tok_s": a, "f16_tok_s": b, "q8_0_tok_s": c, "method": "the same state, its KV cache in f32, f16 and q8_0 (where the heads allow), steps taking turns; 1 / median step"})),
            "kv_bytes": self.kv_bytes,
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_scope": if self.peak_rss_reset { "this engine run (VmHWM reset before it; weights included)" } else { "process since start (VmHWM could not be reset)" },
            "app_peak_rss_bytes": self.app_peak_rss,
            "app_peak_rss_scope": format!("{APP_PEAK_STEPS} decode steps of the session alone at the longest history, after the run's cloned states were freed and the heap trimmed (VmHWM reset then): weights, the session's KV and carries, activations, runtime"),
        })
    }
}

/// One engine configuration through every measurement.
pub(super) fn run_engine(
    name: &'static str,
    model: Arc<Model>,
    identity: &ModelIdentity,
    plan: &Plan,
    window: Option<usize>,
    ids: &[u32],
) -> Result<EngineRun> {
    let peak_rss_reset = reset_peak_rss();
    let opts = SessionOptions {
        mode: CarryMode::Continue,
        window,
        kv_format: plan.kv,
    };

    // Prefill: one 512-token forward from a fresh state (after a small warm-up call).
    let mut warm = Session::new(model.clone(), opts).state;
    model.forward(&ids[..16], &mut warm, Logits::Last)?;
    drop(warm);
    let mut prefill_s = f64::INFINITY;
    for _ in 0..plan.prefill_repeats {
        let mut st = Session::new(model.clone(), opts).state;
        let start = Instant::now();
        let logits = model.forward(&ids[..plan.prefill], &mut st, Logits::Last)?;
        argmax_tensor(&logits)?;
        prefill_s = prefill_s.min(start.elapsed().as_secs_f64());
    }
    let prefill_tok_s = plan.prefill as f64 / prefill_s;
    progress(format!(
        "[{name}] prefill {}: {prefill_s:.2} s, {prefill_tok_s:.1} tok/s",
        plan.prefill
    ));

    let mut decode = Vec::new();
    // The shortest history on its own (it is shorter than a feeding block).
    let short = plan.short();
    // Kept for the paired decode at the longest history.
    let short_session = {
        let mut s = Session::new(model.clone(), opts);
        s.feed(&ids[..short], None)?;
        let r = decode_rate(
            &model,
            &s.state,
            s.last_logits.as_deref().unwrap_or_default(),
            short,
        )?;
        progress(format!(
            "[{name}] decode after {short}: {:.2} tok/s (mean {:.2})",
            r.tok_s, r.tok_s_mean
        ));
        decode.push(r);
        s
    };

    // The long history, block by block, as a reopened chat would be re-read.
    let mut session = Session::new(model.clone(), opts);
    let used_window = session.state.window;
    let mut fed = Duration::ZERO;
    let mut resume = None;
    let mut kv_paired = None;
    let mut flatness_paired = None;
    let mut kv_bytes = 0;
    let total = plan.history_len();
    let snap_path =
        std::env::temp_dir().join(format!("tptt-bench-{}-{name}.state", std::process::id()));
    let checkpoints: Vec<usize> = plan
        .decode_at
        .iter()
        .copied()
        .filter(|&h| h != short)
        .chain([plan.resume_at])
        .collect();
    let mut last_report = Instant::now();
    while session.tokens.len() < total {
        let pos = session.tokens.len();
        let next_stop = checkpoints
            .iter()
            .copied()
            .filter(|&c| c > pos)
            .min()
            .unwrap_or(total);
        let end = (pos + 512 - pos % 512).min(next_stop);
        let start = Instant::now();
        session.feed(&ids[pos..end], None)?;
        fed += start.elapsed();
        if last_report.elapsed() > Duration::from_secs(20) {
            progress(format!(
                "[{name}] history {end}/{total} ({:.0} tok/s so far)",
                end as f64 / fed.as_secs_f64()
            ));
            last_report = Instant::now();
        }
        kv_bytes = kv_bytes.max(session.state.kv_bytes());
        let logits = session.last_logits.clone().unwrap_or_default();
        if plan.decode_at.contains(&end) && end != short {
            let r = decode_rate(&model, &session.state, &logits, end)?;
            progress(format!(
                "[{name}] decode after {end}: {:.2} tok/s (mean {:.2}, kv {})",
                r.tok_s, r.tok_s_mean, r.kv_len
            ));
            decode.push(r);
            if end == plan.long() && name == "tptt" {
                let (s, l) = paired_histories(
                    &model,
                    (
                        &short_session.state,
                        short_session.last_logits.as_deref().unwrap_or_default(),
                    ),
                    (&session.state, &logits),
                )?;
                progress(format!(
                    "[{name}] decode after {short} and after {end} taking turns: {s:.2} / {l:.2} tok/s"
                ));
                flatness_paired = Some((short, end, s, l));
                let (a, b, c) = paired_kv_formats(&model, &session.state, &logits)?;
                progress(format!(
                    "[{name}] decode after {end}, KV in f32 / f16 / q8_0 taking turns: {a:.2} / {b:.2} / {} tok/s",
                    c.map_or("-".to_string(), |c| format!("{c:.2}"))
                ));
                kv_paired = Some((end, a, b, c));
            }
        }
        if end == plan.resume_at {
            // Re-read: the feed so far plus the first step (on a clone, so the history stays).
            let mut st = session.state.try_clone()?;
            let t = Instant::now();
            step(&model, &mut st, argmax_slice(&logits))?;
            let reread = fed + t.elapsed();
            drop(st);
            let snapshot_bytes = snapshot::save(&session, identity, &snap_path)?;
            let (mut restore, mut restore_load, mut restore_step) = (f64::INFINITY, 0.0, 0.0);
            for _ in 0..2 {
                let t = Instant::now();
                let mut restored = snapshot::load(model.clone(), identity, &snap_path)?;
                // The snapshot kept the run's KV format: this converts nothing (as the app
                // does after a restore, in case the setting changed meanwhile).
                restored.state.set_kv_format(plan.kv)?;
                let loaded = t.elapsed().as_secs_f64();
                let first = argmax_slice(restored.last_logits.as_deref().unwrap_or_default());
                restored.feed(&[first], None)?;
                let total = t.elapsed().as_secs_f64();
                if total < restore {
                    (restore, restore_load, restore_step) = (total, loaded, total - loaded);
                }
            }
            let _ = std::fs::remove_file(&snap_path);
            let branch = measure_branch(&model, identity, &session, ids, name)?;
            progress(format!(
                "[{name}] per-turn snapshots after {end}: the next {}-token turn adds {:.1} MB (first turn {:.1} MB + {:.1} MB of pages); branch from the earlier turn: first token of a {}-token message in {:.3} s (load {:.3})",
                branch.turn_tokens,
                branch.turn_bytes as f64 / 1e6,
                branch.first_file_bytes as f64 / 1e6,
                branch.first_page_bytes as f64 / 1e6,
                branch.message_tokens,
                branch.ttft_s,
                branch.load_s
            ));
            progress(format!(
                "[{name}] resume after {end}: restore {restore:.3} s (load {restore_load:.3} + step {restore_step:.3}) vs re-read {:.2} s, snapshot {:.1} MB",
                reread.as_secs_f64(),
                snapshot_bytes as f64 / 1e6
            ));
            resume = Some(ResumeResult {
                history: end,
                restore_ttft_s: restore,
                restore_load_s: restore_load,
                restore_step_s: restore_step,
                reread_ttft_s: reread.as_secs_f64(),
                snapshot_bytes,
                state_bytes: session.state.size_bytes(),
                kv_len: session.state.kv_len(),
                branch,
            });
        }
    }
    let resume = resume.context("the resume point was never reached")?;
    // The whole run's peak first: measuring the session alone resets the counter.
    let run_peak = peak_rss_bytes();
    let app_peak = app_peak_rss(&model, &mut session)?;
    progress(format!(
        "[{name}] peak memory while decoding after {} tokens, the session alone: {}",
        session.tokens.len(),
        app_peak.map_or("not measurable here".into(), |b| format!(
            "{:.1} MB",
            b as f64 / 1e6
        ))
    ));
    decode.sort_by_key(|d| d.history);
    Ok(EngineRun {
        mag_weight: model.config().tptt.mag_weight,
        prefill_tok_s,
        prefill_s,
        decode,
        resume,
        peak_rss: run_peak,
        peak_rss_reset,
        app_peak_rss: app_peak,
        window: used_window,
        kv_paired,
        flatness_paired,
        kv_bytes,
    })
}

/// Decode steps of [`app_peak_rss`].
const APP_PEAK_STEPS: usize = 32;

/// The peak RSS of [`APP_PEAK_STEPS`] decode steps of `session` alone — what an app holds while
/// it answers at this history — once the states the measurements cloned are freed and the heap's
/// free memory returned (else the counter would start from them). `None` where the kernel's
/// peak counter cannot be reset.
fn app_peak_rss(model: &Model, session: &mut Session) -> Result<Option<u64>> {
    tptt::alloc::release_free_memory();
    if !reset_peak_rss() {
        return Ok(None);
    }
    let mut id = argmax_slice(session.last_logits.as_deref().unwrap_or_default());
    for _ in 0..APP_PEAK_STEPS {
        id = step(model, &mut session.state, id)?;
    }
    Ok(peak_rss_bytes())
}
