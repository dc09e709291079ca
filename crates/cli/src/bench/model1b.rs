//! The 1B-class bench model (issue 16): Llama-3.2-1B's sizes with random weights
//! ([`tptt::synth`]), written once under `target/bench-1b` (or `$TPTT_BENCH_1B_DIR`) as an f16
//! safetensors base with a TPTT variant (delta_product, mag 0.125) and as a Q4_K GGUF of the
//! same weights, then measured beside SmolLM2:
//! - the safetensors variant, its matrices kept in f16 as the app loads them: decode after
//!   the shortest history against the bandwidth limit for the bytes it reads per token
//!   (`decode1b_vs_bandwidth_limit`);
//! - the GGUF with the same injection, in a child process ([`super::quantized`]): prefill,
//!   decode and peak memory (`quant1b_*_vs_llamacpp`, `quant1b_rss_vs_file`);
//! - llama.cpp's `llama-bench` on the same GGUF, when installed.
//!
//! Writing takes a few minutes (the Q4_K quantization of 1.2 B values) and ~3.3 GB of disk;
//! both files are made in a temporary folder and renamed into place, so a run killed half-way
//! leaves nothing that a later run would take for complete.

use super::*;
use candle_core::quantized::GgmlDType;
use tptt::synth::{self, LlamaShape};

/// Seed of the random weights (fixed: the cached files are the same on every machine).
const SEED: u64 = 0x1b1b_2026;
/// The variant's name in the repository.
const VARIANT: &str = "delta_product_mag0.125";
/// Bumped when what is written changes, so that an older cache is rewritten.
const VERSION: &str = "1";

/// The cache folder.
fn cache_dir() -> PathBuf {
    std::env::var_os("TPTT_BENCH_1B_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-1b"))
}

/// The repository and the GGUF, written first when the cache lacks them.
pub(super) fn ensure() -> Result<(PathBuf, PathBuf)> {
    let dir = cache_dir();
    let done = dir.join(format!("complete-v{VERSION}"));
    let (repo, gguf) = (dir.join("repo"), dir.join("llama-1b-q4_k.gguf"));
    if done.is_file() && repo.is_dir() && gguf.is_file() {
        return Ok((repo, gguf));
    }
    if dir.exists() && !ours(&dir) {
        bail!(
            "{} exists and is not a 1B bench cache (no repo/, GGUF or complete-v* marker): not replacing it",
            dir.display()
        );
    }
    let shape = LlamaShape::LLAMA_3_2_1B;
    progress(format!(
        "[1b] writing the 1B-class model ({:.2} B parameters) into {} (once)",
        shape.parameters() as f64 / 1e9,
        dir.display()
    ));
    // Our own scratch folder beside the cache (a run killed half-way may have left one).
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        if !ours(&tmp) {
            bail!("{} exists and is not ours: not replacing it", tmp.display());
        }
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let t = Instant::now();
    synth::write_repo(
        &tmp.join("repo"),
        &shape,
        candle_core::DType::F16,
        SEED,
        VARIANT,
        INJECT_MODE,
        f64::from(INJECT_MAG),
    )?;
    progress(format!(
        "[1b] f16 safetensors in {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    synth::write_llama_gguf(
        &tmp.join("llama-1b-q4_k.gguf"),
        &shape,
        GgmlDType::Q4K,
        SEED,
    )?;
    progress(format!(
        "[1b] Q4_K GGUF in {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    std::fs::write(tmp.join(format!("complete-v{VERSION}")), "")?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the older cache {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    Ok((repo, gguf))
}

/// Does `dir` hold only what [`ensure`] writes (so that an older or partial cache may be
/// replaced)? An empty folder counts; anything else there is left alone.
fn ours(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name == "repo" || name == "llama-1b-q4_k.gguf" || name.starts_with("complete-v")
    })
}

/// The measurements, as one JSON object (errors inside it, per part).
pub(super) fn measure(args: &BenchArgs, threads: usize, bw_gb_s: f64) -> Result<Value> {
    let (repo, gguf) = ensure()?;
    let dense =
        dense(&repo, threads, bw_gb_s).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let sub = BenchArgs {
        variant: Some(VARIANT.into()),
        quick: true,
        ..args.clone()
    };
    let rounds = if args.quick { 1 } else { super::versus::ROUNDS };
    let vs = super::versus::versus(
        rounds,
        || match child_process(&repo, &sub, threads, &gguf) {
            Ok(v) => Baseline::Measured(v),
            Err(e) => Baseline::Missing(format!("{e:#}")),
        },
        || llamacpp_on(&gguf, threads),
    );
    let (quant, llama) = (&vs.ours, &vs.llama);
    Ok(json!({
        "shape": "Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads of 64, MLP 8192, vocab 128256), random weights",
        "repo": repo.display().to_string(),
        "gguf": gguf.display().to_string(),
        "dense": dense,
        "quantized": quant.to_json(),
        "llamacpp": llama.to_json(),
        "ratios": {
            "decode1b_vs_bandwidth_limit": dense_ratio(&dense),
            "quant1b_decode_vs_llamacpp": vs.decode_ratio,
            "quant1b_prefill_vs_llamacpp": vs.prefill_ratio,
            "quant1b_rss_vs_file": rss_vs_file(quant),
        },
    }))
}

fn dense_ratio(d: &Value) -> Option<f64> {
    ratio(
        d.get("decode_tok_s").and_then(Value::as_f64),
        d.get("bandwidth_limit_tok_s").and_then(Value::as_f64),
    )
}

/// Decode of the safetensors variant after 128 tokens, and its bandwidth limit: the best
/// read-only pass of the run's start (`start_gb_s`) and of a measurement right after the decode.
fn dense(repo: &Path, threads: usize, start_gb_s: f64) -> Result<Value> {
    progress("[1b] loading the f16 safetensors variant");
    let files = TpttRepo::open(repo)?.variant(Some(VARIANT), None)?;
    let model = Arc::new(Model::load(
        &files,
        &LoadOptions {
            half_weights: true,
            ..Default::default()
        },
    )?);
    // Every matrix is read once per token, in f16; of the tied embedding only the head's pass.
    let bytes = model.weight_bytes() as f64;
    let history = 128;
    let ids = random_ids(history, model.config().base.vocab_size, IDS_SEED);
    let mut session = Session::new(
        model.clone(),
        SessionOptions {
            mode: CarryMode::Continue,
            window: None,
            kv_format: model.kv_format(tptt::state::KvChoice::Auto)?,
        },
    );
    session.feed(&ids, None)?;
    let r = decode_rate(
        &model,
        &session.state,
        session.last_logits.as_deref().unwrap_or_default(),
        history,
    )?;
    drop(session);
    let after = super::measure::bandwidth(threads)?;
    let bw_gb_s = start_gb_s.max(after.ceiling());
    let limit = bw_gb_s * 1e9 / bytes;
    progress(format!(
        "[1b] dense decode after {history}: {:.2} tok/s (limit {limit:.2} for {:.2} GB per token)",
        r.tok_s,
        bytes / 1e9
    ));
    Ok(json!({
        "weights_in_memory": "f16 as stored (LoadOptions::half_weights, as the app and the CLI's chat commands load)",
        "weight_bytes_per_token": bytes,
        "bandwidth_gb_s": bw_gb_s,
        "bandwidth_read_after_decode_gb_s": after.read_gb_s,
        "bandwidth_limit_tok_s": limit,
        "decode_tok_s": r.tok_s,
        "decode_tok_s_mean": r.tok_s_mean,
        "decode_history": history,
    }))
}
