//! `tptt bench`: the speed of the engine against the physical limit and the baselines of issue 6,
//! in one run, same model, same threads.
//!
//! Measured, in this order:
//! 1. memory bandwidth ([`measure::bandwidth`]): read-only and read-modify-write passes over a
//!    1 GiB buffer (≫ LLC) on huge pages, each of `--threads` threads on its own part; measured
//!    again after each decode that is compared with it (right after the 1B-class one, after the
//!    engine run for SmolLM2's), and the best read-only pass of all is that decode's ceiling (a
//!    decode only reads);
//! 2. bytes of weights read per decode token (every weight tensor in f32, `lm_head` included,
//!    the embedding only once when tied: decoding reads one row of it);
//! 3. for (a) our engine with TPTT and (b) the same weights with the linear branch off
//!    (`mag_weight = 0`): prefill tok/s (one 512-token forward), decode tok/s after each history
//!    length, snapshot size and time to first token after restoring a snapshot vs re-reading the
//!    history, peak RSS;
//! 4. `tptt_overhead`: decode of (a) and (b) after the shortest history again, their steps
//!    alternating (paired, so both see the same machine; the separate runs of 3. stay in the
//!    table); `long_history_flatness` likewise from (a)'s decodes after the shortest and the
//!    longest history, their steps alternating at the longest;
//! 5. (c) the reference tptt 0.12.1 (`scripts/bench/reference_bench.py`, when a Python with
//!    `tptt` is found), (d) llama.cpp's `llama-bench` on the GGUF (when installed) and our
//!    engine on the same GGUF, in a child process so that its peak memory is its own
//!    ([`quantized`]: `quant_rss_vs_file`);
//! 6. the OpenAI-compatible API: a 20-turn conversation through our server, and through
//!    llama.cpp's `llama-server` on the GGUF when installed ([`api_turn`]).
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

mod api_turn;
mod baselines;
mod engine_run;
mod long_context;
mod measure;
mod model1b;
mod quantized;
mod subject;
mod versus;

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

use baselines::*;
use engine_run::*;
use long_context::*;
use measure::*;
use quantized::*;
use subject::*;

/// Greedy steps timed per decode measurement.
pub(super) const DECODE_STEPS: usize = 32;

/// Bytes of the bandwidth buffer (far larger than any last-level cache).
pub(super) const BANDWIDTH_BYTES: usize = 1 << 30;
/// Passes of each kind over it (the best counts).
pub(super) const BANDWIDTH_PASSES: usize = 5;

/// What the injection into a plain folder uses (the demo model's settings).
pub(super) const INJECT_MODE: &str = "delta_product";

pub(super) const INJECT_MAG: f32 = 0.125;

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
    /// How the softmax KV cache is stored in every measurement: auto (what `tptt chat` and
    /// the app use: 8-bit where the model's heads allow, else f16), q8_0, f16 or f32 (exact).
    #[arg(long, default_value = "auto", value_parser = crate::parse_kv)]
    kv: tptt::state::KvChoice,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Short histories (decode after 128 / 1k / 4k, resume after 2k) for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Skip the 1B-class model (written once under target/bench-1b, ~3.3 GB, and measured in
    /// full runs; `--quick` skips it too).
    #[arg(long)]
    no_1b: bool,
    /// Measure only the memory bandwidth and the 1B-class model (writing it first if needed).
    #[arg(long, conflicts_with = "no_1b")]
    only_1b: bool,
    /// (Internal) measure our engine on this GGUF alone and print one JSON object: the
    /// quantized measurement runs in a child process so that its peak memory is its own.
    #[arg(long, hide = true)]
    quantized_child: Option<PathBuf>,
    /// Text of the long-context quality check (`tptt eval` numbers in the JSON): default
    /// Debian's GPL-3 text; `none` skips it.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    eval_text: PathBuf,
}

/// History lengths and sizes of one run.
pub(super) struct Plan {
    prefill: usize,
    decode_at: Vec<usize>,
    resume_at: usize,
    prefill_repeats: usize,
    quick: bool,
    kv: tptt::state::KvFormat,
}

impl Plan {
    fn new(quick: bool, kv: tptt::state::KvFormat) -> Self {
        if quick {
            Self {
                prefill: 512,
                decode_at: vec![128, 1024, 4096],
                resume_at: 2048,
                prefill_repeats: 2,
                quick,
                kv,
            }
        } else {
            Self {
                prefill: 512,
                decode_at: vec![128, 4096, 32768],
                resume_at: 16384,
                prefill_repeats: 2,
                quick,
                kv,
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

pub(super) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// UTC date and time from the system clock, `YYYY-MM-DDTHH:MM:SSZ`.
pub(super) fn utc_now() -> String {
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

pub(super) fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

pub(super) fn cpu_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

pub(super) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
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
    if let Some(gguf) = &args.quantized_child {
        return quantized::child(args, gguf);
    }
    let load_start = std::time::Instant::now();
    let loadavg_start = loadavg();
    let started = utc_now();
    if args.only_1b {
        let b = bandwidth(threads)?;
        progress(format!(
            "bandwidth: read-only {:.2} GB/s (the ceiling), read-modify-write {:.2}",
            b.read_gb_s, b.rmw_gb_s
        ));
        let m = model1b::measure(args, threads, b.ceiling())?;
        println!(
            "{}",
            serde_json::to_string(&json!({
                "bench": "tptt bench --only-1b",
                "date_utc": started,
                "threads": threads,
                "loadavg_start": loadavg_start,
                "loadavg_end": loadavg(),
                "model_1b": m,
                "elapsed_s": load_start.elapsed().as_secs_f64(),
            }))?
        );
        return Ok(());
    }

    let dir = args.model_dir.clone().unwrap_or_else(default_model_dir);
    progress(format!("loading {} ({} threads)", dir.display(), threads));
    let load_t = Instant::now();
    let subject = load_subject(&dir, args.variant.as_deref())?;
    let load_s = load_t.elapsed().as_secs_f64();
    let b = subject.model.config().base.clone();
    let kv = subject.model.kv_format(args.kv).context("--kv")?;
    let plan = Plan::new(args.quick, kv);
    let ids = random_ids(plan.history_len().max(plan.prefill), b.vocab_size, IDS_SEED);

    progress(format!(
        "memory bandwidth: {} MiB, {BANDWIDTH_PASSES} read and read-modify-write passes",
        BANDWIDTH_BYTES >> 20
    ));
    let mut bandwidth = bandwidth(threads)?;
    progress(format!(
        "bandwidth: read-only {:.2} GB/s, read-modify-write {:.2} (huge pages: {}); weights {:.1} MB per token",
        bandwidth.read_gb_s,
        bandwidth.rmw_gb_s,
        bandwidth.huge_pages,
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
    // The decode's ceiling: the best read-only pass at the start or after this engine run
    // (whose first measurement is that decode).
    bandwidth.merge(measure::bandwidth(threads)?);
    let bw = bandwidth.ceiling();
    let bw_limit = bw * 1e9 / subject.weight_bytes as f64;
    progress(format!(
        "bandwidth ceiling {bw:.2} GB/s (best read-only pass of {}) → limit {bw_limit:.1} tok/s",
        bandwidth.read_runs.len()
    ));
    let bb = run_engine(
        "base",
        base_model.clone(),
        &base_identity,
        &plan,
        args.window,
        &ids,
    )?;
    let short = plan.short();
    let (ab_tptt, ab_base) = paired_decode(&tptt_model, &base_model, args.window, kv, &ids, short)?;
    progress(format!(
        "[paired] decode after {short}, TPTT and base alternating: {ab_tptt:.2} / {ab_base:.2} tok/s"
    ));
    drop((tptt_model, base_model));

    let reference = reference(&subject, threads, args.quick);
    if let Baseline::Missing(why) = &reference {
        progress(format!("[reference] not available: {why}"));
    }
    let rounds = if args.quick { 1 } else { versus::ROUNDS };
    let vs = versus::versus(
        rounds,
        || quantized(&subject, args, threads),
        || llamacpp(&subject, threads),
    );
    let (quant, llama) = (&vs.ours, &vs.llama);
    if let Baseline::Missing(why) = quant {
        progress(format!("[quantized] not measured: {why}"));
    }
    if let Baseline::Missing(why) = llama {
        progress(format!("[llama.cpp] not available: {why}"));
    }

    let model_1b: Result<Value, String> = if args.quick || args.no_1b {
        Err(format!(
            "skipped ({})",
            if args.quick { "--quick" } else { "--no-1b" }
        ))
    } else {
        model1b::measure(args, threads, bw).map_err(|e| format!("{e:#}"))
    };
    if let Err(why) = &model_1b {
        progress(format!("[1b] not measured: {why}"));
    }

    let long_context = long_context(&subject, &dir, &args.eval_text, args.quick, kv);
    let (ctx_vs_full, ctx_vs_window) = match &long_context {
        Ok((_, vs_full, vs_window)) => (*vs_full, *vs_window),
        Err(why) => {
            progress(format!("[long context] not measured: {why}"));
            (None, None)
        }
    };

    let turns = if args.quick {
        api_turn::QUICK_TURNS
    } else {
        api_turn::TURNS
    };
    let api_text = std::fs::read_to_string(&args.eval_text).unwrap_or_default();
    let user = api_turn::messages(&api_text, turns);
    let api_ours = match api_turn::ours(&subject, args.window, kv, &user) {
        Ok(v) => Baseline::Measured(v),
        Err(e) => Baseline::Missing(format!("{e:#}")),
    };
    if let Baseline::Missing(why) = &api_ours {
        progress(format!("[api] our server's conversation failed: {why}"));
    }
    let api_llama = api_turn::llama_server(&subject, threads, &user);
    if let Baseline::Missing(why) = &api_llama {
        progress(format!("[api] llama-server not measured: {why}"));
    }

    // The last turn both servers answered (llama-server refuses turns past its context).
    let api_common = match (api_ours.num("turns_served"), api_llama.num("turns_served")) {
        (Some(a), Some(b)) => a.min(b) as usize,
        _ => 0,
    };

    // What the weights hold in memory (f32, the embedding once when tied).
    let weights_resident = subject.model.num_params() * 4;

    let long = plan.long();
    let a_short = a.decode_at(short);
    let ratios = json!({
        "decode_vs_bandwidth_limit": ratio(a_short, Some(bw_limit)),
        "decode_vs_reference": ratio(a_short, reference.num("decode_tok_s")),
        "prefill_vs_reference": ratio(Some(a.prefill_tok_s), reference.num("prefill_tok_s")),
        "tptt_overhead": ratio(Some(ab_tptt), Some(ab_base)),
        // Paired (both decodes in the same minutes) where measured; else the two separate runs.
        "long_history_flatness": a
            .flatness_paired
            .map_or_else(|| ratio(a.decode_at(long), a_short), |(_, _, s, l)| ratio(Some(l), Some(s))),
        "resume_speedup": ratio(Some(a.resume.reread_ttft_s), Some(a.resume.restore_ttft_s)),
        "resume_ttft_s": Some(a.resume.restore_ttft_s),
        "branch_ttft_s": Some(a.resume.branch.ttft_s),
        "turn_snapshot_mb": Some(a.resume.branch.turn_bytes as f64 / 1e6),
        "snapshot_mb_16k": Some(a.resume.snapshot_bytes as f64 / 1e6),
        "kv_f16_decode_speedup": a.kv_paired.map(|(_, f32s, f16s, _)| f16s / f32s),
        "kv_q8_decode_speedup": a.kv_paired.and_then(|(_, f32s, _, q8s)| q8s.map(|q| q / f32s)),
        "peak_rss_vs_weights_kv": ratio(a.app_peak_rss.map(|p| p as f64), Some((weights_resident + a.kv_bytes) as f64)),
        "peak_rss_run_vs_weights_kv": ratio(a.peak_rss.map(|p| p as f64), Some((weights_resident + a.kv_bytes) as f64)),
        "quant_decode_vs_llamacpp": vs.decode_ratio,
        "quant_prefill_vs_llamacpp": vs.prefill_ratio,
        "quant_rss_vs_file": rss_vs_file(quant),
        "long_context_ppl_vs_full_attention": ctx_vs_full,
        "long_context_ppl_vs_same_window": ctx_vs_window,
        "api_turn_ttft_s": api_ours.num("last_turn_ttft_s"),
        "api_turn_speedup_vs_llama_server": ratio(api_turn::ttft_of(&api_llama, api_common), api_turn::ttft_of(&api_ours, api_common)),
    });
    let mut ratios = ratios;
    for key in [
        "decode1b_vs_bandwidth_limit",
        "quant1b_decode_vs_llamacpp",
        "quant1b_prefill_vs_llamacpp",
        "quant1b_rss_vs_file",
    ] {
        let v = model_1b
            .as_ref()
            .ok()
            .and_then(|m| m["ratios"][key].as_f64());
        ratios[key] = json!(v);
    }
    let r = |k: &str| ratios.get(k).and_then(Value::as_f64);
    let check = |v: Option<f64>, ok: fn(f64) -> bool| v.map(ok);
    let mut targets = json!({
        // Above 1 the ceiling was measured too low: a broken measurement, not a success.
        "decode_vs_bandwidth_limit >= 0.7": check(r("decode_vs_bandwidth_limit"), |x| (0.7..=1.0).contains(&x)),
        "decode_vs_reference >= 5": check(r("decode_vs_reference"), |x| x >= 5.0),
        "prefill_vs_reference >= 3": check(r("prefill_vs_reference"), |x| x >= 3.0),
        "tptt_overhead >= 0.9": check(r("tptt_overhead"), |x| x >= 0.9),
        // Issue 16's target (issue 6 asked 0.9, above the physical bound of the default
        // configuration: see the `long_history_flatness_bound` note).
        "long_history_flatness >= 0.8": check(r("long_history_flatness"), |x| x >= 0.8),
        "resume_ttft_s <= 0.3": check(r("resume_ttft_s"), |x| x <= 0.3),
        "resume_speedup >= 20": check(r("resume_speedup"), |x| x >= 20.0),
        "branch_ttft_s <= 0.3": check(r("branch_ttft_s"), |x| x <= 0.3),
        "quant_decode_vs_llamacpp >= 1.0": check(r("quant_decode_vs_llamacpp"), |x| x >= 1.0),
        "quant_prefill_vs_llamacpp >= 0.8": check(r("quant_prefill_vs_llamacpp"), |x| x >= 0.8),
        "quant_rss_vs_file <= 1.3": check(r("quant_rss_vs_file"), |x| x <= 1.3),
        "decode1b_vs_bandwidth_limit >= 0.7": check(r("decode1b_vs_bandwidth_limit"), |x| (0.7..=1.0).contains(&x)),
        "quant1b_decode_vs_llamacpp >= 1.0": check(r("quant1b_decode_vs_llamacpp"), |x| x >= 1.0),
        "quant1b_prefill_vs_llamacpp >= 0.8": check(r("quant1b_prefill_vs_llamacpp"), |x| x >= 0.8),
        "quant1b_rss_vs_file <= 1.3": check(r("quant1b_rss_vs_file"), |x| x <= 1.3),
        "long_context_ppl_vs_full_attention <= 1.2": check(r("long_context_ppl_vs_full_attention"), |x| x <= 1.2),
        "long_context_ppl_vs_same_window <= 0.8": check(r("long_context_ppl_vs_same_window"), |x| x <= 0.8),
    });
    let mut notes = serde_json::Map::new();
    if r("decode1b_vs_bandwidth_limit").is_some_and(|x| x > 1.0) {
        notes.insert(
            "decode1b_vs_bandwidth_limit".into(),
            json!("BROKEN MEASUREMENT: the 1B decode moved more bytes per second than the measured ceiling; the target is reported as not met"),
        );
    }
    notes.insert(
        "quant_rss_vs_file".into(),
        json!("peak RSS of our engine on the GGUF (a child process: tokenizer, weights as stored, the largest KV it held, a 512-token prefill's activations, runtime) less that KV, over the file's size; quant1b_rss_vs_file the same on the 1B-class Q4_K GGUF (no tokenizer there)"),
    );
    notes.insert(
        "decode_vs_bandwidth_limit".into(),
        json!(format!(
            "decode tok/s after {short} over the ceiling ({bw:.1} GB/s: the best read-only pass, at the start or after the engine run that measured the decode) / bytes of weights per token; the read-modify-write passes ({:.1} GB/s of traffic, half of it write-backs) are no ceiling for a stream that only reads",
            bandwidth.rmw_gb_s,
        )),
    );
    if r("decode_vs_bandwidth_limit").is_some_and(|x| x > 1.0) {
        notes.insert(
            "decode_vs_bandwidth_limit".into(),
            json!("BROKEN MEASUREMENT: decode moved more bytes per second than the measured ceiling, which is impossible for a real limit; the target is reported as not met"),
        );
    }
    notes.insert(
        "long_context_ppl_vs_full_attention".into(),
        json!(format!("perplexity of the TPTT model with a {LONG_CONTEXT_WINDOW}-token window over positions from 4× the window to the end of the eval text, over (c) the same weights with full attention; `..._vs_same_window` over (b) the branch off with the same window (issue 18's targets); see `long_context`")),
    );
    let quant_note = match (quant, llama) {
        (Baseline::Measured(_), Baseline::Measured(_)) => "ours: the GGUF base (its Q4_1 matrices used as stored, see crates/tptt/src/gguf.rs) with the same TPTT injection; llama.cpp: llama-bench pp512/tg128".to_string(),
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
    let kv_bytes = |n: usize| (2 * b.total_kv_heads() * kv.row_bytes(b.head_dim) * n) as f64;
    let w = subject.weight_bytes as f64;
    let kv_bytes4 = |n: usize| (2 * b.total_kv_heads() * b.head_dim * 4 * n) as f64;
    let flatness_bound = (w + kv_bytes(kv_at(short))) / (w + kv_bytes(kv_at(long)));
    // Above the bound (with 2 % for timing) the short decode was measured slow, not the long one
    // fast: a broken measurement, reported as not met.
    let flatness_broken = r("long_history_flatness").is_some_and(|x| x > 1.02 * flatness_bound);
    if flatness_broken {
        targets["long_history_flatness >= 0.8"] = json!(false);
    }
    notes.insert(
        "long_history_flatness_bound".into(),
        json!(format!(
            "bytes per step: weights {:.1} MB + {} KV {:.1} MB at {long} (kv {}) vs {:.1} MB at {short}: the ratio cannot exceed {flatness_bound:.2} at any bandwidth (every layer reading its whole KV)",
            w / 1e6,
            kv.as_str(),
            kv_bytes(kv_at(long)) / 1e6,
            kv_at(long),
            kv_bytes(kv_at(short)) / 1e6
        )),
    );
    if flatness_broken {
        notes.insert(
            "long_history_flatness".into(),
            json!(format!("BROKEN MEASUREMENT: {} is above the bound {flatness_bound:.2} (the decode after {short} tokens was measured during a slow spell); the target is reported as not met", fmt_opt(r("long_history_flatness"), 2))),
        );
    }
    if args.quick {
        if !flatness_broken {
            notes.insert("long_history_flatness".into(), json!(format!("--quick: decode at {long} / at {short} tokens of history (the full run uses 32768)")));
        }
        notes.insert(
            "resume_speedup".into(),
            json!(format!(
                "--quick: resume after {} tokens (the full run uses 16384)",
                plan.resume_at
            )),
        );
    }
    notes.insert(
        "branch_ttft_s".into(),
        json!(format!(
            "a snapshot after every turn (paged, format 6: the KV window in pages shared between turns): load the snapshot of the turn at {} tokens after a later turn was saved, read a {}-token message, first token's logits; best of 2, page cache warm",
            a.resume.history, a.resume.branch.message_tokens
        )),
    );
    notes.insert(
        "peak_rss_vs_weights_kv".into(),
        json!(format!(
            "peak RSS of (a)'s session alone decoding at the longest history ({}; the run's cloned states freed and the heap trimmed first) over weights ({:.1} MB: parameters × 4 B) + its KV buffers ({:.1} MB, {}); the rest, {:.1} MB, is activations, the linear carries, the runtime and allocator slack",
            fmt_opt(a.app_peak_rss.map(|p| p as f64 / 1e6), 1) + " MB",
            weights_resident as f64 / 1e6,
            a.kv_bytes as f64 / 1e6,
            kv.as_str(),
            a.app_peak_rss.map_or(0.0, |p| p as f64 - (weights_resident + a.kv_bytes) as f64) / 1e6,
        )),
    );
    notes.insert(
        "peak_rss_run_vs_weights_kv".into(),
        json!(format!(
            "the same over the whole engine run ({}): it adds the bench's own copies of the state (each decode measurement runs on a clone, the paired f32/f16/q8_0 one on three, the resume and branch measurements restore more), which an app holding one conversation does not have",
            fmt_opt(a.peak_rss.map(|p| p as f64 / 1e6), 1) + " MB",
        )),
    );
    notes.insert(
        "kv_f16_decode_speedup".into(),
        json!(format!(
            "decode after {long} tokens of history with the KV cache in f16 over f32: the same state in both formats, steps alternating (paired; separate runs on this machine differ by more than the effect). Bound: (weights + f32 KV) / (weights + f16 KV) bytes = {:.2}",
            (w + kv_bytes4(kv_at(long))) / (w + kv_bytes4(kv_at(long)) / 2.0)
        )),
    );
    notes.insert(
        "kv_q8_decode_speedup".into(),
        json!(format!(
            "decode after {long} tokens of history with the KV cache in 8-bit blocks (q8_0) over f32, taking turns with the f32 and f16 steps (null where the heads are not whole blocks). Bound: (weights + f32 KV) / (weights + q8_0 KV) bytes = {:.2}; the attention over a long window is compute-bound on this CPU, so it runs below that",
            (w + kv_bytes4(kv_at(long))) / (w + kv_bytes4(kv_at(long)) * 34.0 / 128.0)
        )),
    );
    notes.insert(
        "snapshot_mb_16k".into(),
        json!(format!(
            "size of the (unpaged) snapshot of the session after {} tokens{}; the KV window is stored in the run's --kv format (f16: half of f32's; q8_0: 34/128)",
            a.resume.history,
            if args.quick { " (--quick; the full run uses 16384)" } else { "" }
        )),
    );
    notes.insert(
        "turn_snapshot_mb".into(),
        json!(format!(
            "disk added by the snapshot of one more {}-token turn after {} tokens: its file (recurrent state, logits, token ids) plus the pages of its new positions",
            a.resume.branch.turn_tokens, a.resume.history
        )),
    );
    let api_note = format!(
        "TTFT of turn {turns} of a conversation sent through the OpenAI-compatible API (each request the whole history plus a new ~{} -character message of the eval text, streamed, greedy, answers of at most {} tokens; measured by the client, loopback). Ours continues from the conversation's saved recurrent state (only the new message is read){}",
        api_turn::MESSAGE_CHARS,
        api_turn::ANSWER_TOKENS,
        match &api_llama {
            Baseline::Measured(v) => format!(
                "; the speedup is llama-server's TTFT over ours at turn {api_common}, the last both answered (llama-server: the base GGUF without TPTT, its prompt cache on{})",
                v["refused"].as_str().map_or(String::new(), |why| format!(
                    "; it refused turn {}: {why}",
                    api_common + 1
                ))
            ),
            Baseline::Missing(why) => format!("; llama-server not measured: {why}"),
        }
    );
    notes.insert("api_turn_ttft_s".into(), json!(api_note));
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
        "kv_format": kv.as_str(),
        "plan": {"prefill_tokens": plan.prefill, "decode_histories": plan.decode_at, "decode_steps": DECODE_STEPS, "resume_history": plan.resume_at},
        "bandwidth": {"gb_per_s": bw, "runs_gb_per_s": bandwidth.read_runs, "rmw_gb_per_s": bandwidth.rmw_gb_s, "rmw_runs_gb_per_s": bandwidth.rmw_runs, "buffer_bytes": BANDWIDTH_BYTES, "threads": threads, "huge_pages": bandwidth.huge_pages, "method": format!("STREAM-like: each thread its own part of the buffer (on transparent huge pages, as the weights); read-only passes (sum of every 64-bit word, 8 accumulators, AVX2 loads where present) and read-modify-write passes (every word + 1, 2 bytes of traffic per byte), {BANDWIDTH_PASSES} each, at the start and after the engine run; the ceiling (gb_per_s) is the best read-only pass: a decode only reads"), "read_gb_per_s": bandwidth.read_gb_s},
        "bandwidth_limit_decode_tok_s": bw_limit,
        "engine": {"tptt": a.to_json(), "base": bb.to_json()},
        "paired_decode": {"history": short, "tptt_tok_s": ab_tptt, "base_tok_s": ab_base, "steps_each": 2 * DECODE_STEPS, "method": "TPTT and base steps alternating, order swapped every round; 1 / median step"},
        "reference": reference.to_json(),
        "llamacpp": llama.to_json(),
        "quantized": quant.to_json(),
        "model_1b": match &model_1b {
            Ok(v) => v.clone(),
            Err(why) => json!({ "not_measured": why }),
        },
        "api_turn": {"ours": api_ours.to_json(), "llama_server": api_llama.to_json()},
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
        &report, &a, &bb, &plan, bw, bw_limit, &subject, threads, &reference, llama,
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
        format!(
            "TTFT branch from an earlier turn, {} history (s)",
            a.resume.history
        ),
        format!("{:.3}", a.resume.branch.ttft_s),
        format!("{:.3}", b.resume.branch.ttft_s),
        String::new(),
    );
    row(
        format!("disk per turn ({} tokens)", a.resume.branch.turn_tokens),
        mb(a.resume.branch.turn_bytes),
        mb(b.resume.branch.turn_bytes),
        String::new(),
    );
    row(
        "peak RSS, decoding (session alone)".into(),
        a.app_peak_rss.map(mb).unwrap_or_else(|| "?".into()),
        b.app_peak_rss.map(mb).unwrap_or_else(|| "?".into()),
        String::new(),
    );
    row(
        "peak RSS, whole run".into(),
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
