//! Our engine on a quantized GGUF base (the file llama.cpp runs), with the subject's TPTT
//! settings: prefill of the plan's prompt, decode after the shortest history, and the memory
//! the process holds.
//!
//! The measurement runs in a child process (`tptt bench DIR --quantized-child GGUF`), so that
//! its peak RSS is the quantized model's alone — the parent holds the f32 model. The child
//! loads as the app does (tokenizer first, then the weights, then the heap trimmed) and keeps
//! the tokenizer, and prints one JSON object on stdout.

use super::*;

/// Seed of the random histories (the parent's and the child's ids are the same).
pub(super) const IDS_SEED: u64 = 0x7470_7474;

/// Run the child for `gguf` and read its JSON.
pub(super) fn quantized(subject: &Subject, args: &BenchArgs, threads: usize) -> Baseline {
    let Some(gguf) = find_gguf(subject) else {
        return Baseline::Missing(
            "no .gguf next to the model (scripts/smollm2/fetch.sh keeps it in models/.cache)"
                .into(),
        );
    };
    match child_process(&subject.dir, args, threads, &gguf) {
        Ok(v) => Baseline::Measured(v),
        Err(e) => Baseline::Missing(format!("{e:#}")),
    }
}

/// `tptt bench` itself, as a child measuring `gguf`.
pub(super) fn child_process(
    dir: &Path,
    args: &BenchArgs,
    threads: usize,
    gguf: &Path,
) -> Result<Value> {
    let exe = std::env::current_exe().context("the path of this program")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench").arg(dir);
    if let Some(v) = &args.variant {
        cmd.args(["--variant", v]);
    }
    cmd.args(["--threads", &threads.to_string(), "--kv", args.kv.as_str()]);
    if args.quick {
        cmd.arg("--quick");
    }
    cmd.arg("--quantized-child").arg(gguf);
    cmd.stderr(std::process::Stdio::inherit());
    let out = cmd.output().context("starting the quantized measurement")?;
    if !out.status.success() {
        bail!(
            "the quantized measurement failed (exit {:?})",
            out.status.code()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("it printed nothing")?;
    serde_json::from_str(line).context("it printed no JSON object")
}

/// The child: measure `gguf` in this process and print the JSON object.
pub(super) fn child(args: &BenchArgs, gguf: &Path) -> Result<()> {
    let dir = args.model_dir.clone().unwrap_or_else(default_model_dir);
    let (settings, files) = subject_settings(&dir, args.variant.as_deref())?;
    let file_bytes = std::fs::metadata(gguf)
        .with_context(|| format!("reading {}", gguf.display()))?
        .len();
    let peak_reset = reset_peak_rss();
    let tokenizer_path = files
        .as_ref()
        .and_then(|f| f.tokenizer.clone())
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    // Held for the run, as the app holds it.
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).ok();
    // As the app does (`ChatFiles::read`): the parse's garbage given back before the weights.
    tptt::alloc::release_free_memory();
    progress(format!("[quantized] loading {}", gguf.display()));
    let model = Model::load_gguf_plain(gguf, settings, &LoadOptions::default())?;
    tptt::alloc::release_free_memory();
    let rss_loaded = read_status_kb("VmRSS:").map(|kb| kb * 1024);
    let kv = model.kv_format(args.kv).context("--kv")?;
    let plan = Plan::new(args.quick, kv);
    let ids = random_ids(
        plan.history_len().max(plan.prefill),
        model.config().base.vocab_size,
        IDS_SEED,
    );
    let opts = SessionOptions {
        mode: CarryMode::Continue,
        window: None,
        kv_format: plan.kv,
    };
    let model = Arc::new(model);
    {
        let mut warm = Session::new(model.clone(), opts).state;
        model.forward(&ids[..16], &mut warm, Logits::Last)?;
    }
    let mut prefill_s = f64::INFINITY;
    let mut kv_bytes = 0;
    for _ in 0..plan.prefill_repeats {
        let mut st = Session::new(model.clone(), opts).state;
        let start = Instant::now();
        argmax_tensor(&model.forward(&ids[..plan.prefill], &mut st, Logits::Last)?)?;
        prefill_s = prefill_s.min(start.elapsed().as_secs_f64());
        kv_bytes = kv_bytes.max(st.kv_bytes());
    }
    let short = plan.short();
    let mut session = Session::new(model.clone(), opts);
    session.feed(&ids[..short], None)?;
    let r = decode_rate(
        &model,
        &session.state,
        session.last_logits.as_deref().unwrap_or_default(),
        short,
    )?;
    // decode_rate ran on a clone: two states of `short` tokens were held then.
    kv_bytes = kv_bytes.max(2 * session.state.kv_bytes());
    let prefill_tok_s = plan.prefill as f64 / prefill_s;
    progress(format!(
        "[quantized] prefill {prefill_tok_s:.1} tok/s, decode after {short}: {:.2} tok/s",
        r.tok_s
    ));
    let peak = if peak_reset { peak_rss_bytes() } else { None };
    println!(
        "{}",
        json!({
            "gguf": gguf.display().to_string(),
            "weight_bytes": model.weight_bytes(),
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": r.tok_s,
            "decode_history": short,
            "kv": kv.as_str(),
            "file_bytes": file_bytes,
            "peak_rss": peak,
            "kv_bytes": kv_bytes,
            "rss_after_load": rss_loaded,
            "tokenizer_held": tokenizer.is_some(),
            "peak_rss_scope": "this child process from before loading: tokenizer, weights, the largest KV held at once, activations of a 512-token prefill, runtime",
        })
    );
    Ok(())
}

/// Peak RSS less the KV cache, over the GGUF file's size.
pub(super) fn rss_vs_file(m: &Baseline) -> Option<f64> {
    let peak = m.num("peak_rss")?;
    ratio(
        Some(peak - m.num("kv_bytes").unwrap_or(0.0)),
        m.num("file_bytes"),
    )
}
