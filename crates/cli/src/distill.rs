//! `tptt distill`: train the memory of a TPTT variant on this machine — LoRA on q/k/v/o of a
//! plain Hugging Face base, distilled from the same base with full attention
//! (`tptt::train::distill`). Progress (loss, tokens/s, ETA) goes to stderr; a checkpoint is
//! written every `--checkpoint-every` steps under `OUT/.distill/VARIANT/`, and a run started
//! again with the same settings resumes from it (Ctrl-C loses at most those steps). The variant
//! folder `OUT/VARIANT` is written only at the end, atomically: a folder that exists is
//! complete.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tptt::config::TpttSettings;
use tptt::model::{LoadOptions, Model};
use tptt::train::distill::{estimate_step_bytes, DistillConfig, Distiller};

/// `tptt distill` arguments.
#[derive(clap::Args, Clone)]
pub(crate) struct DistillArgs {
    /// The base model folder (config.json, safetensors weights, tokenizer.json).
    base: PathBuf,
    /// The TPTT repo folder to write the variant into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Operator mode of the linear branch.
    #[arg(long, default_value = "delta_product_c")]
    mode: String,
    /// Training texts (UTF-8), read one after the other.
    #[arg(long, required = true, num_args = 1..)]
    text: Vec<PathBuf>,
    /// The student's softmax window (written as max_self_attn_length).
    #[arg(long, default_value_t = 512, value_parser = crate::parse_window)]
    window: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Tokens per episode, a multiple of --seq-len: the text is read in episodes of
    /// consecutive sequences with the memory (linear state and softmax window) carried from one
    /// to the next, so the memory learns on what it holds after this many tokens (default: the
    /// sequence length, independent sequences).
    #[arg(long)]
    episode_len: Option<usize>,
    /// Start from the LoRA of a variant trained before (its folder or its
    /// adapter_model.safetensors; same base, rank and mode) instead of a fresh one; ignored
    /// when resuming from a checkpoint.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Optimisation steps in all (a resumed run continues up to this number).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Peak learning rate (Adam).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// MaG weight of the linear branch.
    #[arg(long, default_value_t = 0.125)]
    mag_weight: f32,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Seed of the LoRA initialisation and of the sequence order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Variant (subfolder) name; default MODE_magM_wW.
    #[arg(long)]
    variant: Option<String>,
    /// `base_model_name` written into the config (default: the base folder's absolute path).
    #[arg(long)]
    base_name: Option<String>,
}

/// Bytes of memory the kernel says are available (Linux), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn read_tokens(tokenizer: &tokenizers::Tokenizer, paths: &[PathBuf]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for p in paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", p.display()))?;
        if text.trim().is_empty() {
            bail!("{} is empty", p.display());
        }
        ids.extend(crate::eval::encode(tokenizer, &text, ids.is_empty())?);
    }
    Ok(ids)
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `tptt distill`.
pub(crate) fn run(args: &DistillArgs) -> Result<()> {
    tptt::alloc::tune_for_training();
    if args.checkpoint_every == 0 || args.steps == 0 {
        bail!("--steps and --checkpoint-every must be at least 1");
    }
    if !args.mag_weight.is_finite() || args.mag_weight <= 0.0 || args.mag_weight >= 1.0 {
        bail!("--mag-weight must be in (0, 1), got {}", args.mag_weight);
    }
    let cfg = DistillConfig {
        window: args.window,
        seq_len: args.seq_len,
        episode_len: args.episode_len.unwrap_or(args.seq_len),
        rank: args.lora_rank,
        alpha: args.lora_alpha,
        lr: args.lr,
        warmup: args.warmup,
        clip: 1.0,
        seed: args.seed,
    };
    cfg.validate()?;
    let base = &args.base;
    let base_cfg_path = base.join("config.json");
    let base_cfg = tptt::config::read_json_object(&base_cfg_path)?;
    let base_abs =
        std::fs::canonicalize(base).with_context(|| format!("resolving {}", base.display()))?;
    let base_name = args
        .base_name
        .clone()
        .unwrap_or_else(|| base_abs.display().to_string());
    let settings = TpttSettings::injected(&args.mode, args.mag_weight, &base_name)?;
    let student = Model::load_plain(base, settings, &LoadOptions::default())
        .with_context(|| format!("loading the base {}", base.display()))?;
    student.check_trainable()?;
    let need = estimate_step_bytes(&student, &cfg)
        .saturating_add((student.weight_bytes() as u64).saturating_mul(2));
    if let Some(avail) = available_memory() {
        if need > avail {
            bail!(
                "a training sequence of {} tokens (episodes of {}) needs about {:.1} GB of memory; {:.1} GB are available: lower --seq-len or --episode-len",
                args.seq_len,
                cfg.episode_len,
                need as f64 / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    let tok_path = base.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
    let tokens = read_tokens(&tokenizer, &args.text)?;
    let variant = args
        .variant
        .clone()
        .unwrap_or_else(|| format!("{}_mag{}_w{}", args.mode, args.mag_weight, args.window));
    if variant.is_empty() || variant.contains(['/', '\\']) || variant.starts_with('.') {
        bail!("--variant {variant:?} is not a folder name");
    }
    // tptt 0.12.1 looks for the adapter in the repo folder itself (and silently runs without
    // it) when the repo's path ends with the variant's name, e.g. `tptt-distilled/distilled`.
    let out_name = args
        .out
        .canonicalize()
        .unwrap_or_else(|_| args.out.clone())
        .to_string_lossy()
        .into_owned();
    if out_name.trim_end_matches('/').ends_with(&variant) {
        bail!(
            "the repo folder {} ends with the variant name {variant:?}: tptt 0.12.1 would then ignore the adapter; choose another --variant or --out",
            args.out.display()
        );
    }
    let mut distiller = Distiller::new(student, cfg, tokens)?;
    let work = args.out.join(".distill").join(&variant);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let ckpt = work.join("checkpoint.safetensors");
    if ckpt.exists() {
        distiller
            .load_checkpoint(&ckpt)
            .with_context(|| format!("resuming from {}", ckpt.display()))?;
        eprintln!(
            "[distill] resuming from step {} ({})",
            distiller.steps_done(),
            ckpt.display()
        );
    } else if let Some(init) = &args.init {
        let file = if init.is_dir() {
            init.join("adapter_model.safetensors")
        } else {
            init.clone()
        };
        distiller
            .init_from_adapter(&file)
            .with_context(|| format!("starting from the adapter {}", file.display()))?;
        eprintln!("[distill] starting from the adapter {}", file.display());
    }
    eprintln!(
        "[distill] {} → {}/{variant}: mode {}, mag {}, window {}, sequences of {} in episodes of {}, LoRA r{} α{}, lr {}, {} steps",
        base.display(),
        args.out.display(),
        args.mode,
        args.mag_weight,
        args.window,
        args.seq_len,
        distiller.config().episode_len,
        args.lora_rank,
        args.lora_alpha,
        args.lr,
        args.steps
    );
    let started = Instant::now();
    let first = distiller.steps_done();
    while distiller.steps_done() < args.steps {
        let r = distiller.step()?;
        let done = r.step - first;
        let secs = started.elapsed().as_secs_f64();
        let per_step = secs / done as f64;
        let segments = distiller.config().episode_len / distiller.config().seq_len;
        let within = if segments > 1 {
            format!(
                " (episode {}, part {}/{segments})",
                (r.step - 1) / segments + 1,
                (r.step - 1) % segments + 1
            )
        } else {
            String::new()
        };
        eprintln!(
            "[distill] step {}/{}{within}  loss {:.4}  past window {:.4}  |grad| {:.3}  lr {:.2e}  {:.0} tok/s  ETA {}",
            r.step,
            args.steps,
            r.loss,
            r.loss_past_window,
            r.grad_norm,
            r.lr,
            args.seq_len as f64 / per_step,
            fmt_duration(per_step * (args.steps - r.step) as f64)
        );
        if r.step % args.checkpoint_every == 0 || r.step == args.steps {
            distiller.save_checkpoint(&ckpt)?;
        }
    }
    let dir = args.out.join(&variant);
    distiller.write_variant(&dir, &base_cfg, &base_name)?;
    eprintln!(
        "[distill] wrote {} after {} steps ({})",
        dir.display(),
        distiller.steps_done(),
        fmt_duration(started.elapsed().as_secs_f64())
    );
    println!("{}", dir.display());
    Ok(())
}
