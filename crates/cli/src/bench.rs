//! `tptt bench`: the speed of the engine against the physical limit and the baselines of issue 6,
//! in one run, same model, same threads.
//!
//! Measured, in this order:
//! 1. memory bandwidth: a streaming read of a 1 GiB buffer (≫ LLC) by `--threads` threads,
//!    best of 3. The read is glibc's vectorised `memcmp` of two equal halves (slice `==`), so the
//!    number does not depend on how this crate is optimised (the dev profile builds it at -O0);
//! 2. bytes of weights read per decode token (every weight tensor in f32, `lm_head` included,
//!    the embedding only once when tied: decoding reads one row of it);
//! 3. for (a) our engine with TPTT and (b) the same weights with the linear branch off
//!    (`mag_weight = 0`): prefill tok/s (one 512-token forward), decode tok/s after each history
//!    length, snapshot size and time to first token after restoring a snapshot vs re-reading the
//!    history, peak RSS;
//! 4. `tptt_overhead`: decode of (a) and (b) after the shortest history again, their steps
//!    alternating (paired, so both see the same machine; the separate runs of 3. stay in the
//!    table);
//! 5. (c) the reference tptt 0.12.1 (`scripts/bench/reference_bench.py`, when a Python with
//!    `tptt` is found) and (d) llama.cpp's `llama-bench` on the GGUF (when installed).
//!
//! Histories are random token ids fed through [`Session::feed`] in blocks of 512 (the app's
//! path). A decode measurement runs on a clone of the state at that point: one warm-up step,
//! then `DECODE_STEPS` greedy steps (`Model::forward` of one token + argmax); the rate is
//! 1 / the median step (the machine may be shared), the mean is reported too. Both times to
//! first token end when the first new token has been sampled *and* fed (one decode step):
//! restore = `snapshot::load` + step; re-read = `Session::feed` of the whole history from a
//! fresh session (timed while the history is built) + step. The snapshot is read back from the
//! page cache (written just before), as when a chat is reopened in a running app.
//!
//! Peak RSS is the kernel's `VmHWM`, reset (`/proc/self/clear_refs` ← 5) before each engine run
//! so that each gets its own peak; it is process-wide (the weights are shared by (a) and (b)).
//!
//! Output: a table, or with `--json` one JSON object on stdout (progress goes to stderr) whose
//! `ratios` object holds the numbers other tools read (names fixed by issue 6).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use serde_json::{json, Value};
use tptt::config::TpttSettings;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model, State};
use tptt::repo::TpttRepo;
use tptt_engine::session::{Session, SessionOptions};
use tptt_engine::snapshot::{self, config_hash, ModelIdentity};

/// Softmax window of the long-context check (the memory is judged past 4× it).
const LONG_CONTEXT_WINDOW: usize = 512;

/// `tptt eval`'s figures on one text for the bench JSON: the report and the two ratios of the
/// perplexity past 4× the window (TPTT / full attention, TPTT / same window without memory).
fn long_context(
    subject: &Subject,
    dir: &Path,
    text: &Path,
    quick: bool,
) -> std::result::Result<(Value, Option<f64>, Option<f64>), String> {
    if text.as_os_str() == "none" {
        return Err("--eval-text none".into());
    }
    let tok_path = [
        dir.join("tokenizer.json"),
        subject.base_dir.join("tokenizer.json"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or("no tokenizer.json next to the model")?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| e.to_string())?;
    let max = if quick { 2560 } else { 8192 };
    let texts = crate::eval::read_texts(&tokenizer, &[text.to_path_buf()], Some(max))
        .map_err(|e| format!("{e:#}"))?;
    let from = 4 * LONG_CONTEXT_WINDOW;
    let len = texts[0].1.len();
    if len <= from + 1 {
        return Err(format!(
            "{} has {len} tokens, fewer than 4× the window",
            text.display()
        ));
    }
    progress(format!(
        "[long context] {} ({len} tokens), window {LONG_CONTEXT_WINDOW}",
        text.display()
    ));
    let plan = crate::eval::EvalPlan {
        texts: &texts,
        configs: crate::eval::CONFIGS.to_vec(),
        window: LONG_CONTEXT_WINDOW,
        edges: vec![0, LONG_CONTEXT_WINDOW, from, len],
        full_max_tokens: max,
        probe_distances: if quick { vec![512] } else { vec![1024, 4096] },
    };
    let results =
        crate::eval::evaluate(&subject.model, &tokenizer, &plan).map_err(|e| format!("{e:#}"))?;
    let past = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.buckets.as_ref().ok())
            .and_then(|b| b.last().filter(|b| b.tokens > 0).map(|b| b.perplexity()))
    };
    let (t, w, f) = (past("tptt"), past("no_memory"), past("full_attention"));
    let report = crate::eval::to_json(&subject.label, &texts, &results);
    Ok((report, ratio(t, f), ratio(t, w)))
}

/// Greedy steps timed per decode measurement.
const DECODE_STEPS: usize = 32;
/// Bytes of the bandwidth buffer.
const BANDWIDTH_BYTES: usize = 1 << 30;
/// What the injection into a plain folder uses (the demo model's settings).
const INJECT_MODE: &str = "delta_product";
const INJECT_MAG: f32 = 0.125;

/// `tptt bench` arguments.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct BenchArgs {
    /// A plain Hugging Face model folder (TPTT is injected: delta_product, mag 0.125) or a TPTT
    /// repo (with --variant). Default: $TPTT_SMOLLM2_DIR, else models/smollm2-135m-instruct.
    model_dir: Option<PathBuf>,
    /// Variant of a TPTT repo.
    #[arg(long)]
    variant: Option<String>,
    /// Threads for every measurement (sets RAYON_NUM_THREADS; torch threads for the reference).
    #[arg(long)]
    threads: Option<usize>,
    /// Softmax window (KV positions kept); default: the config's, else 8192.
    #[arg(long, value_parser = crate::parse_window)]
    window: Option<usize>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Short histories (decode after 128 / 1k / 4k, resume after 2k) for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Text of the long-context quality check (`tptt eval` numbers in the JSON): default
    /// Debian's GPL-3 text; `none` skips it.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    eval_text: PathBuf,
}

/// History lengths and sizes of one run.
struct Plan {
    prefill: usize,
    decode_at: Vec<usize>,
    resume_at: usize,
    prefill_repeats: usize,
    quick: bool,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                prefill: 512,
                decode_at: vec![128, 1024, 4096],
                resume_at: 2048,
                prefill_repeats: 2,
                quick,
            }
        } else {
            Self {
                prefill: 512,
                decode_at: vec![128, 4096, 32768],
                resume_at: 16384,
                prefill_repeats: 2,
                quick,
            }
        }
    }
    /// Tokens the history must reach.
    fn history_len(&self) -> usize {
        self.decode_at
            .iter()
            .copied()
            .chain([self.resume_at])
            .max()
            .unwrap_or(0)
    }
    fn short(&self) -> usize {
        self.decode_at.iter().copied().min().unwrap_or(0)
    }
    fn long(&self) -> usize {
        self.decode_at.iter().copied().max().unwrap_or(0)
    }
}

/// The model under test and where it came from.
struct Subject {
    model: Model,
    identity: ModelIdentity,
    /// Folder given to the reference script (the plain base folder).
    base_dir: PathBuf,
    label: String,
    weight_bytes: u64,
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn default_model_dir() -> PathBuf {
    std::env::var_os("TPTT_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/smollm2-135m-instruct"))
}

fn load_subject(dir: &Path, variant: Option<&str>) -> Result<Subject> {
    if !dir.is_dir() {
        bail!(
            "model folder {} does not exist (pass MODEL_DIR, or set TPTT_SMOLLM2_DIR; scripts/smollm2/fetch.sh makes models/smollm2-135m-instruct)",
            dir.display()
        );
    }
    let cfg_path = dir.join("config.json");
    let plain = cfg_path.is_file()
        && !tptt::config::is_tptt_config(&tptt::config::read_json_object(&cfg_path)?);
    let opts = LoadOptions::default();
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let (model, variant_name, base_dir, label) = if plain {
        if let Some(v) = variant {
            bail!(
                "--variant {v}: {} is a plain Hugging Face model folder, not a TPTT repo",
                dir.display()
            );
        }
        let settings =
            TpttSettings::injected(INJECT_MODE, INJECT_MAG, &canonical.display().to_string())?;
        let model = Model::load_plain(dir, settings, &opts)
            .with_context(|| format!("loading {}", dir.display()))?;
        let label = format!(
            "{} + injected {INJECT_MODE}, mag {INJECT_MAG}",
            dir.display()
        );
        (
            model,
            format!("{INJECT_MODE}_mag{INJECT_MAG}"),
            dir.to_path_buf(),
            label,
        )
    } else {
        let repo = TpttRepo::open(dir)?;
        let files = repo.variant(variant, None)?;
        let model = Model::load(&files, &opts)
            .with_context(|| format!("loading variant {}", files.name))?;
        let label = format!("{} variant {}", dir.display(), files.name);
        (model, files.name.clone(), files.base_dir.clone(), label)
    };
    let b = &model.config().base;
    // Decoding reads every weight once, lm_head included; of the embedding only one row, so a
    // separate (untied) embedding does not count. LoadOptions::default() re-ties lm_head.
    let tied = opts.retie_lm_head || b.tie_word_embeddings;
    let params = model.num_params()
        - if tied {
            0
        } else {
            b.vocab_size * b.hidden_size
        };
    let weight_bytes = (params * std::mem::size_of::<f32>()) as u64;
    // The bench saves and restores its own snapshots within one run, on weights it loaded
    // once: they need no fingerprint.
    let identity = ModelIdentity {
        model: canonical.display().to_string(),
        variant: variant_name,
        config_hash: config_hash(model.config()),
        weights: "this bench run".into(),
    };
    Ok(Subject {
        model,
        identity,
        base_dir,
        label,
        weight_bytes,
    })
}

/// Streaming read bandwidth with `threads` threads, GB/s (1e9), each run and the best.
fn bandwidth(threads: usize) -> Result<(f64, Vec<f64>)> {
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
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
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

fn argmax_tensor(logits: &Tensor) -> Result<u32> {
    let ids = logits
        .argmax_keepdim(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    ids.first().copied().context("empty logits")
}

fn argmax_slice(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// One greedy decode step: feed `id`, return the next.
fn step(model: &Model, state: &mut State, id: u32) -> Result<u32> {
    argmax_tensor(&model.forward(&[id], state, Logits::Last)?)
}

/// Decode speed from `state` (on a clone; the caller's state is untouched).
#[derive(Debug, Clone, Copy)]
struct DecodeRate {
    history: usize,
    /// 1 / median step time: robust to another process stealing the CPU for a moment.
    tok_s: f64,
    /// Steps / total time.
    tok_s_mean: f64,
    kv_len: usize,
}

fn decode_rate(
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
fn paired_decode(
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

fn read_status_kb(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn peak_rss_bytes() -> Option<u64> {
    read_status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Reset the kernel's peak-RSS counter to the current RSS; false where the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

struct ResumeResult {
    history: usize,
    restore_ttft_s: f64,
    /// Of the best restore: `snapshot::load` alone, and the first step after it.
    restore_load_s: f64,
    restore_step_s: f64,
    reread_ttft_s: f64,
    snapshot_bytes: u64,
    state_bytes: usize,
    kv_len: usize,
}

struct EngineRun {
    mag_weight: f32,
    prefill_tok_s: f64,
    prefill_s: f64,
    decode: Vec<DecodeRate>,
    resume: ResumeResult,
    peak_rss: Option<u64>,
    peak_rss_reset: bool,
    window: Option<usize>,
}

impl EngineRun {
    fn decode_at(&self, history: usize) -> Option<f64> {
        self.decode
            .iter()
            .find(|d| d.history == history)
            .map(|d| d.tok_s)
    }

    fn to_json(&self) -> Value {
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
            },
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_scope": if self.peak_rss_reset { "this engine run (VmHWM reset before it; weights included)" } else { "process since start (VmHWM could not be reset)" },
        })
    }
}

/// One engine configuration through every measurement.
fn run_engine(
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
    {
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
    }

    // The long history, block by block, as a reopened chat would be re-read.
    let mut session = Session::new(model.clone(), opts);
    let used_window = session.state.window;
    let mut fed = Duration::ZERO;
    let mut resume = None;
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
        let logits = session.last_logits.clone().unwrap_or_default();
        if plan.decode_at.contains(&end) && end != short {
            let r = decode_rate(&model, &session.state, &logits, end)?;
            progress(format!(
                "[{name}] decode after {end}: {:.2} tok/s (mean {:.2}, kv {})",
                r.tok_s, r.tok_s_mean, r.kv_len
            ));
            decode.push(r);
        }
        if end == plan.resume_at {
            // Re-read: the feed so far plus the first step (on a clone, so the history stays).
            let mut st = session.state.clone();
            let t = Instant::now();
            step(&model, &mut st, argmax_slice(&logits))?;
            let reread = fed + t.elapsed();
            drop(st);
            let snapshot_bytes = snapshot::save(&session, identity, &snap_path)?;
            let (mut restore, mut restore_load, mut restore_step) = (f64::INFINITY, 0.0, 0.0);
            for _ in 0..2 {
                let t = Instant::now();
                let mut restored = snapshot::load(model.clone(), identity, &snap_path)?;
                let loaded = t.elapsed().as_secs_f64();
                let first = argmax_slice(restored.last_logits.as_deref().unwrap_or_default());
                restored.feed(&[first], None)?;
                let total = t.elapsed().as_secs_f64();
                if total < restore {
                    (restore, restore_load, restore_step) = (total, loaded, total - loaded);
                }
            }
            let _ = std::fs::remove_file(&snap_path);
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
            });
        }
    }
    let resume = resume.context("the resume point was never reached")?;
    decode.sort_by_key(|d| d.history);
    Ok(EngineRun {
        mag_weight: model.config().tptt.mag_weight,
        prefill_tok_s,
        prefill_s,
        decode,
        resume,
        peak_rss: peak_rss_bytes(),
        peak_rss_reset,
        window: used_window,
    })
}

/// Outcome of a baseline: its JSON, or why it is missing.
enum Baseline {
    Measured(Value),
    Missing(String),
}

impl Baseline {
    fn num(&self, key: &str) -> Option<f64> {
        match self {
            Baseline::Measured(v) => v.get(key).and_then(Value::as_f64),
            Baseline::Missing(_) => None,
        }
    }
    fn to_json(&self) -> Value {
        match self {
            Baseline::Measured(v) => {
                let mut v = v.clone();
                if let Value::Object(m) = &mut v {
                    m.insert("available".into(), Value::Bool(true));
                }
                v
            }
            Baseline::Missing(why) => json!({"available": false, "why": why}),
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

fn find_script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TPTT_REF_SCRIPT") {
        return Some(PathBuf::from(p));
    }
    let rel = Path::new("scripts/bench/reference_bench.py");
    let in_tree = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    [rel.to_path_buf(), in_tree]
        .into_iter()
        .find(|p| p.is_file())
}

/// (c) the reference tptt 0.12.1 through the committed script.
fn reference(subject: &Subject, threads: usize, quick: bool) -> Baseline {
    let python = std::env::var("TPTT_REF_PYTHON").unwrap_or_else(|_| "python3".into());
    let Some(script) = find_script() else {
        return Baseline::Missing("scripts/bench/reference_bench.py not found (run from the repository root or set TPTT_REF_SCRIPT)".into());
    };
    let t = &subject.model.config().tptt;
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg(&subject.base_dir)
        .args(["--threads", &threads.to_string(), "--json"])
        .args([
            "--operator-mode",
            &t.operator_mode,
            "--mag-weight",
            &t.mag_weight.to_string(),
        ]);
    if quick {
        cmd.arg("--quick");
    }
    progress(format!(
        "[reference] {python} {} (this takes minutes)",
        script.display()
    ));
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            return Baseline::Missing(format!(
                "cannot run {python} ({e}); set TPTT_REF_PYTHON to a Python with tptt 0.12.1"
            ))
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = match out.status.code() {
            Some(3) => format!(
                "{python} cannot import the reference stack: {}",
                tail(&stderr, 1)
            ),
            c => format!("reference script failed (exit {c:?}): {}", tail(&stderr, 3)),
        };
        return Baseline::Missing(why);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        Some(v) if v.get("decode_tok_s").is_some_and(Value::is_number) => {
            if subject.model.config().tptt.lora.is_some() {
                let mut v = v;
                if let Value::Object(m) = &mut v {
                    m.insert("note".into(), json!("injected into the variant's base without its LoRA adapter (same shapes, same work per token)"));
                }
                return Baseline::Measured(v);
            }
            Baseline::Measured(v)
        }
        _ => Baseline::Missing(format!(
            "reference script printed no result JSON: {}",
            tail(&stdout, 2)
        )),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn find_gguf(subject: &Subject) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TPTT_BENCH_GGUF") {
        return Some(PathBuf::from(p));
    }
    let mut dirs = vec![subject.base_dir.clone(), subject.base_dir.join("../.cache")];
    if let Some(c) = std::env::var_os("SMOLLM2_CACHE_DIR") {
        dirs.insert(0, PathBuf::from(c));
    }
    dirs.into_iter().find_map(|d| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        v.sort();
        v.into_iter().next()
    })
}

/// (d) llama.cpp's llama-bench: pp512 and tg128 on the GGUF.
fn llamacpp(subject: &Subject, threads: usize) -> Baseline {
    let bin = match std::env::var_os("LLAMA_BENCH")
        .map(PathBuf::from)
        .or_else(|| on_path("llama-bench"))
    {
        Some(b) => b,
        None => {
            return Baseline::Missing(
                "llama-bench is not on PATH (set LLAMA_BENCH to its path)".into(),
            )
        }
    };
    let Some(gguf) = find_gguf(subject) else {
        return Baseline::Missing(
            "no GGUF found next to the model or in ../.cache (set TPTT_BENCH_GGUF)".into(),
        );
    };
    progress(format!(
        "[llama.cpp] {} -m {}",
        bin.display(),
        gguf.display()
    ));
    let out = match Command::new(&bin)
        .arg("-m")
        .arg(&gguf)
        .args([
            "-p",
            "512",
            "-n",
            "128",
            "-t",
            &threads.to_string(),
            "-o",
            "json",
        ])
        .output()
    {
        Ok(o) => o,
        Err(e) => return Baseline::Missing(format!("cannot run {} ({e})", bin.display())),
    };
    if !out.status.success() {
        return Baseline::Missing(format!(
            "llama-bench failed (exit {:?}): {}",
            out.status.code(),
            tail(&String::from_utf8_lossy(&out.stderr), 3)
        ));
    }
    let rows: Vec<Value> = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => return Baseline::Missing(format!("llama-bench printed no JSON array ({e})")),
    };
    let rate = |p: u64, n: u64| {
        rows.iter()
            .find(|r| {
                r.get("n_prompt").and_then(Value::as_u64) == Some(p)
                    && r.get("n_gen").and_then(Value::as_u64) == Some(n)
            })
            .and_then(|r| r.get("avg_ts").and_then(Value::as_f64))
    };
    Baseline::Measured(
        json!({"gguf": gguf.display().to_string(), "threads": threads, "pp512_tok_s": rate(512, 0), "tg128_tok_s": rate(0, 128)}),
    )
}

/// Our engine on the quantized GGUF base (the same file llama.cpp would run), with the same
/// TPTT injection: prefill of the plan's prompt and decode after the shortest history.
fn quantized(subject: &Subject, plan: &Plan, ids: &[u32]) -> Baseline {
    let Some(gguf) = find_gguf(subject) else {
        return Baseline::Missing(
            "no .gguf next to the model (scripts/smollm2/fetch.sh keeps it in models/.cache)"
                .into(),
        );
    };
    let run = || -> Result<Value> {
        progress(format!("[quantized] loading {}", gguf.display()));
        let model = Model::load_gguf_plain(
            &gguf,
            subject.model.config().tptt.clone(),
            &LoadOptions::default(),
        )?;
        let opts = SessionOptions {
            mode: CarryMode::Continue,
            window: None,
        };
        let mut warm = Session::new(Arc::new(model.clone()), opts).state;
        model.forward(&ids[..16], &mut warm, Logits::Last)?;
        let mut prefill_s = f64::INFINITY;
        for _ in 0..plan.prefill_repeats {
            let mut st = Session::new(Arc::new(model.clone()), opts).state;
            let start = Instant::now();
            argmax_tensor(&model.forward(&ids[..plan.prefill], &mut st, Logits::Last)?)?;
            prefill_s = prefill_s.min(start.elapsed().as_secs_f64());
        }
        let short = plan.short();
        let mut session = Session::new(Arc::new(model.clone()), opts);
        session.feed(&ids[..short], None)?;
        let r = decode_rate(
            &model,
            &session.state,
            session.last_logits.as_deref().unwrap_or_default(),
            short,
        )?;
        let prefill_tok_s = plan.prefill as f64 / prefill_s;
        progress(format!(
            "[quantized] prefill {:.1} tok/s, decode after {short}: {:.2} tok/s",
            prefill_tok_s, r.tok_s
        ));
        Ok(
            json!({"gguf": gguf.display().to_string(), "weight_bytes": model.weight_bytes(), "prefill_tok_s": prefill_tok_s, "decode_tok_s": r.tok_s, "decode_history": short}),
        )
    };
    match run() {
        Ok(v) => Baseline::Measured(v),
        Err(e) => Baseline::Missing(format!("{e:#}")),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// UTC date and time from the system clock, `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn cpu_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "—".into())
}

/// `tptt bench`.
pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // Before anything spawns a pool: candle and rayon read it when they first run.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let plan = Plan::new(args.quick);
    let load_start = std::time::Instant::now();
    let loadavg_start = loadavg();
    let started = utc_now();

    let dir = args.model_dir.clone().unwrap_or_else(default_model_dir);
    progress(format!("loading {} ({} threads)", dir.display(), threads));
    let load_t = Instant::now();
    let subject = load_subject(&dir, args.variant.as_deref())?;
    let load_s = load_t.elapsed().as_secs_f64();
    let b = subject.model.config().base.clone();
    let ids = random_ids(
        plan.history_len().max(plan.prefill),
        b.vocab_size,
        0x7470_7474,
    );

    progress(format!(
        "memory bandwidth: streaming read of {} MiB, best of 3",
        BANDWIDTH_BYTES >> 20
    ));
    let (bw, bw_runs) = bandwidth(threads)?;
    let bw_limit = bw * 1e9 / subject.weight_bytes as f64;
    progress(format!(
        "bandwidth {bw:.2} GB/s; weights {:.1} MB per token → limit {bw_limit:.1} tok/s",
        subject.weight_bytes as f64 / 1e6
    ));

    let tptt_model = Arc::new(subject.model.clone());
    let mut base = subject.model.clone();
    base.set_mag_weight(0.0);
    let base_model = Arc::new(base);
    let base_identity = ModelIdentity {
        config_hash: config_hash(base_model.config()),
        ..subject.identity.clone()
    };

    let a = run_engine(
        "tptt",
        tptt_model.clone(),
        &subject.identity,
        &plan,
        args.window,
        &ids,
    )?;
    let bb = run_engine(
        "base",
        base_model.clone(),
        &base_identity,
        &plan,
        args.window,
        &ids,
    )?;
    let short = plan.short();
    let (ab_tptt, ab_base) = paired_decode(&tptt_model, &base_model, args.window, &ids, short)?;
    progress(format!(
        "[paired] decode after {short}, TPTT and base alternating: {ab_tptt:.2} / {ab_base:.2} tok/s"
    ));
    drop((tptt_model, base_model));

    let reference = reference(&subject, threads, args.quick);
    if let Baseline::Missing(why) = &reference {
        progress(format!("[reference] not available: {why}"));
    }
    let llama = llamacpp(&subject, threads);
    let quant = quantized(&subject, &plan, &ids);
    if let Baseline::Missing(why) = &quant {
        progress(format!("[quantized] not measured: {why}"));
    }
    if let Baseline::Missing(why) = &llama {
        progress(format!("[llama.cpp] not available: {why}"));
    }

    let long_context = long_context(&subject, &dir, &args.eval_text, args.quick);
    let (ctx_vs_full, ctx_vs_window) = match &long_context {
        Ok((_, vs_full, vs_window)) => (*vs_full, *vs_window),
        Err(why) => {
            progress(format!("[long context] not measured: {why}"));
            (None, None)
        }
    };

    let long = plan.long();
    let a_short = a.decode_at(short);
    let ratios = json!({
        "decode_vs_bandwidth_limit": ratio(a_short, Some(bw_limit)),
        "decode_vs_reference": ratio(a_short, reference.num("decode_tok_s")),
        "prefill_vs_reference": ratio(Some(a.prefill_tok_s), reference.num("prefill_tok_s")),
        "tptt_overhead": ratio(Some(ab_tptt), Some(ab_base)),
        "long_history_flatness": ratio(a.decode_at(long), a_short),
        "resume_speedup": ratio(Some(a.resume.reread_ttft_s), Some(a.resume.restore_ttft_s)),
        "resume_ttft_s": Some(a.resume.restore_ttft_s),
        "quant_decode_vs_llamacpp": ratio(quant.num("decode_tok_s"), llama.num("tg128_tok_s")),
        "quant_prefill_vs_llamacpp": ratio(quant.num("prefill_tok_s"), llama.num("pp512_tok_s")),
        "long_context_ppl_vs_full_attention": ctx_vs_full,
        "long_context_ppl_vs_same_window": ctx_vs_window,
    });
    let r = |k: &str| ratios.get(k).and_then(Value::as_f64);
    let check = |v: Option<f64>, ok: fn(f64) -> bool| v.map(ok);
    let targets = json!({
        "decode_vs_bandwidth_limit >= 0.7": check(r("decode_vs_bandwidth_limit"), |x| x >= 0.7),
        "decode_vs_reference >= 5": check(r("decode_vs_reference"), |x| x >= 5.0),
        "prefill_vs_reference >= 3": check(r("prefill_vs_reference"), |x| x >= 3.0),
        "tptt_overhead >= 0.9": check(r("tptt_overhead"), |x| x >= 0.9),
        "long_history_flatness >= 0.9": check(r("long_history_flatness"), |x| x >= 0.9),
        "resume_ttft_s <= 0.3": check(r("resume_ttft_s"), |x| x <= 0.3),
        "resume_speedup >= 20": check(r("resume_speedup"), |x| x >= 20.0),
        "quant_decode_vs_llamacpp >= 0.8": check(r("quant_decode_vs_llamacpp"), |x| x >= 0.8),
        "quant_prefill_vs_llamacpp >= 0.5": check(r("quant_prefill_vs_llamacpp"), |x| x >= 0.5),
        "long_context_ppl_vs_full_attention <= 1.2": check(r("long_context_ppl_vs_full_attention"), |x| x <= 1.2),
        "long_context_ppl_vs_same_window <= 0.8": check(r("long_context_ppl_vs_same_window"), |x| x <= 0.8),
    });
    let mut notes = serde_json::Map::new();
    notes.insert(
        "long_context_ppl_vs_full_attention".into(),
        json!(format!("perplexity of the TPTT model with a {LONG_CONTEXT_WINDOW}-token window over positions from 4× the window to the end of the eval text, over (c) the same weights with full attention; `..._vs_same_window` over (b) the branch off with the same window (issue 18's targets); see `long_context`")),
    );
    let quant_note = match (&quant, &llama) {
        (Baseline::Measured(_), Baseline::Measured(_)) => "ours: the GGUF base (Q4_1 re-quantized to Q8_0 at load, see crates/tptt/src/gguf.rs) with the same TPTT injection; llama.cpp: llama-bench pp512/tg128".to_string(),
        (Baseline::Measured(_), Baseline::Missing(why)) => format!("ours measured on the GGUF base (see `quantized`); llama.cpp not available: {why}"),
        (Baseline::Missing(why), _) => format!("our quantized path not measured: {why}"),
    };
    notes.insert("quant_decode_vs_llamacpp".into(), json!(quant_note));
    notes.insert("quant_prefill_vs_llamacpp".into(), json!(quant_note));
    if let Baseline::Missing(why) = &reference {
        notes.insert(
            "decode_vs_reference".into(),
            json!(format!("reference not available: {why}")),
        );
        notes.insert(
            "prefill_vs_reference".into(),
            json!(format!("reference not available: {why}")),
        );
    }
    // The physical bound of long_history_flatness: at the long history a step reads the weights
    // and the KV window, at the short one (almost) only the weights.
    let kv_at = |h: usize| {
        a.decode
            .iter()
            .find(|d| d.history == h)
            .map_or(0, |d| d.kv_len)
    };
    let kv_bytes = |n: usize| (b.num_layers * 2 * b.num_kv_heads * b.head_dim * 4 * n) as f64;
    let w = subject.weight_bytes as f64;
    let flatness_bound = (w + kv_bytes(kv_at(short))) / (w + kv_bytes(kv_at(long)));
    notes.insert(
        "long_history_flatness_bound".into(),
        json!(format!(
            "bytes per step: weights {:.1} MB + f32 KV {:.1} MB at {long} (kv {}) vs {:.1} MB at {short}: the ratio cannot exceed {flatness_bound:.2} at any bandwidth (every layer reading its whole KV)",
            w / 1e6,
            kv_bytes(kv_at(long)) / 1e6,
            kv_at(long),
            kv_bytes(kv_at(short)) / 1e6
        )),
    );
    if args.quick {
        notes.insert("long_history_flatness".into(), json!(format!("--quick: decode at {long} / at {short} tokens of history (the full run uses 32768)")));
        notes.insert(
            "resume_speedup".into(),
            json!(format!(
                "--quick: resume after {} tokens (the full run uses 16384)",
                plan.resume_at
            )),
        );
    }
    notes.insert(
        "decode_tok_s".into(),
        json!("decode tok/s = 1 / median step (Model::forward of one token + argmax, f32) over 32 steps, tok_s_mean = steps / total; the ratios use (a) TPTT at the shortest history, and the reference's median step likewise"),
    );
    if a.window.is_some_and(|w| w < long) {
        notes.insert(
            "window".into(),
            json!(format!("softmax KV window {} positions: beyond it the KV stays constant, the linear branch carries the rest", a.window.unwrap_or(0))),
        );
    }
    let report = json!({
        "bench": "tptt bench",
        "engine_version": env!("CARGO_PKG_VERSION"),
        "date_utc": started,
        "quick": args.quick,
        "threads": threads,
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg(),
            "build": if cfg!(debug_assertions) { "dev profile (dependencies, tptt and tptt-engine at opt-level 3 without debug assertions in dependencies and tptt; tptt-cli at 0)" } else { "release" },
        },
        "model": {
            "label": subject.label,
            "dir": dir.display().to_string(),
            "variant": subject.identity.variant,
            "operator_mode": subject.model.config().tptt.operator_mode,
            "mag_weight": subject.model.config().tptt.mag_weight,
            "layers": b.num_layers, "hidden": b.hidden_size, "heads": b.num_heads, "kv_heads": b.num_kv_heads, "head_dim": b.head_dim, "vocab": b.vocab_size,
            "params": subject.model.num_params(),
            "dtype": "f32",
            "weight_bytes_per_token": subject.weight_bytes,
            "load_s": load_s,
        },
        "plan": {"prefill_tokens": plan.prefill, "decode_histories": plan.decode_at, "decode_steps": DECODE_STEPS, "resume_history": plan.resume_at},
        "bandwidth": {"gb_per_s": bw, "runs_gb_per_s": bw_runs, "buffer_bytes": BANDWIDTH_BYTES, "threads": threads, "method": "memcmp of the two halves of each thread's part (glibc, vectorised), best of 3"},
        "bandwidth_limit_decode_tok_s": bw_limit,
        "engine": {"tptt": a.to_json(), "base": bb.to_json()},
        "paired_decode": {"history": short, "tptt_tok_s": ab_tptt, "base_tok_s": ab_base, "steps_each": 2 * DECODE_STEPS, "method": "TPTT and base steps alternating, order swapped every round; 1 / median step"},
        "reference": reference.to_json(),
        "llamacpp": llama.to_json(),
        "quantized": quant.to_json(),
        "long_context": match &long_context {
            Ok((report, _, _)) => report.clone(),
            Err(why) => json!({ "not_available": why }),
        },
        "ratios": ratios,
        "targets_met": targets,
        "notes": notes,
        "elapsed_s": load_start.elapsed().as_secs_f64(),
    });

    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    print_table(
        &report, &a, &bb, &plan, bw, bw_limit, &subject, threads, &reference, &llama,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_table(
    report: &Value,
    a: &EngineRun,
    b: &EngineRun,
    plan: &Plan,
    bw: f64,
    bw_limit: f64,
    subject: &Subject,
    threads: usize,
    reference: &Baseline,
    llama: &Baseline,
) {
    let mb = |x: u64| format!("{:.1} MB", x as f64 / 1e6);
    println!(
        "tptt bench — {} — {} threads{}",
        subject.label,
        threads,
        if plan.quick { " (--quick)" } else { "" }
    );
    println!(
        "machine: {} | load avg {} → {}",
        report["machine"]["cpu"].as_str().unwrap_or("?"),
        report["machine"]["loadavg_start"].as_str().unwrap_or("?"),
        report["machine"]["loadavg_end"].as_str().unwrap_or("?")
    );
    println!("memory bandwidth {bw:.2} GB/s; weights read per token {} (f32) → bandwidth limit {bw_limit:.1} tok/s", mb(subject.weight_bytes));
    println!(
        "softmax window: {}",
        a.window
            .map(|w| w.to_string())
            .unwrap_or_else(|| "none".into())
    );
    println!();
    println!(
        "{:<34} {:>14} {:>14} {:>14}",
        "", "(a) TPTT", "(b) base", "(c) reference"
    );
    let row = |label: String, x: String, y: String, z: String| {
        println!("{label:<34} {x:>14} {y:>14} {z:>14}")
    };
    let ref_col = |key: &str| match reference {
        Baseline::Measured(_) => fmt_opt(reference.num(key), 2),
        Baseline::Missing(_) => "n/a".into(),
    };
    row(
        format!("prefill {} tok/s", plan.prefill),
        format!("{:.1}", a.prefill_tok_s),
        format!("{:.1}", b.prefill_tok_s),
        ref_col("prefill_tok_s"),
    );
    for d in &a.decode {
        let z = if d.history == plan.short() {
            ref_col("decode_tok_s")
        } else {
            String::new()
        };
        row(
            format!("decode tok/s after {} (kv {})", d.history, d.kv_len),
            format!("{:.2}", d.tok_s),
            fmt_opt(b.decode_at(d.history), 2),
            z,
        );
    }
    row(
        format!("TTFT restore, {} history (s)", a.resume.history),
        format!("{:.3}", a.resume.restore_ttft_s),
        format!("{:.3}", b.resume.restore_ttft_s),
        String::new(),
    );
    row(
        format!("TTFT re-read, {} history (s)", a.resume.history),
        format!("{:.2}", a.resume.reread_ttft_s),
        format!("{:.2}", b.resume.reread_ttft_s),
        String::new(),
    );
    row(
        "snapshot size".into(),
        mb(a.resume.snapshot_bytes),
        mb(b.resume.snapshot_bytes),
        String::new(),
    );
    row(
        "peak RSS".into(),
        a.peak_rss.map(mb).unwrap_or_else(|| "?".into()),
        b.peak_rss.map(mb).unwrap_or_else(|| "?".into()),
        reference
            .num("peak_rss_bytes")
            .map(|x| mb(x as u64))
            .unwrap_or_default(),
    );
    println!();
    match reference {
        Baseline::Missing(why) => println!("(c) reference: not available: {why}"),
        Baseline::Measured(_) => {}
    }
    match llama {
        Baseline::Missing(why) => println!("(d) llama.cpp: not available: {why}"),
        Baseline::Measured(v) => println!(
            "(d) llama.cpp: pp512 {} tok/s, tg128 {} tok/s",
            fmt_opt(v["pp512_tok_s"].as_f64(), 1),
            fmt_opt(v["tg128_tok_s"].as_f64(), 1)
        ),
    }
    let pd = &report["paired_decode"];
    println!(
        "paired decode after {} (TPTT and base alternating, for tptt_overhead): {} / {} tok/s",
        pd["history"],
        fmt_opt(pd["tptt_tok_s"].as_f64(), 2),
        fmt_opt(pd["base_tok_s"].as_f64(), 2)
    );
    println!();
    println!("{:<30} {:>10}   target", "ratio", "value");
    let targets = &report["targets_met"];
    for (name, v) in report["ratios"].as_object().into_iter().flatten() {
        let target = targets.as_object().and_then(|t| {
            t.iter()
                .find(|(k, _)| k.split_whitespace().next() == Some(name.as_str()))
        });
        let verdict = match target {
            Some((k, Value::Bool(true))) => format!("{k}: met"),
            Some((k, Value::Bool(false))) => format!("{k}: NOT met"),
            Some((k, _)) => format!("{k}: not measured"),
            None => String::new(),
        };
        println!("{name:<30} {:>10}   {verdict}", fmt_opt(v.as_f64(), 3));
    }
    for (k, v) in report["notes"].as_object().into_iter().flatten() {
        println!("note ({k}): {}", v.as_str().unwrap_or_default());
    }
}
