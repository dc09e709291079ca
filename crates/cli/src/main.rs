//! `tptt`: the command-line front end of the engine (inspect, logits, generate, chat, inject,
//! bench, eval, distill).
//! Thin by design: argument parsing and printing; the work lives in the `tptt` and
//! `tptt-engine` crates.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tptt::model::{LoadOptions, Model};

mod bench;
mod chat;
mod distill;
mod eval;
mod serve;
use tptt::repo::TpttRepo;
use tptt::state::KvChoice;

#[derive(Parser)]
#[command(name = "tptt", version, about = "Run TPTT (Titans) models locally")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
pub(crate) struct ModelArgs {
    /// The TPTT repository folder (one subfolder per variant).
    pub(crate) repo: PathBuf,
    /// Variant subfolder (optional when the repo has only one).
    #[arg(long)]
    pub(crate) variant: Option<String>,
    /// Base model folder, overriding `base_model_name`.
    #[arg(long)]
    pub(crate) base: Option<PathBuf>,
    /// Keep the base's own lm_head instead of the reference's re-tie to the embeddings.
    #[arg(long)]
    pub(crate) no_retie: bool,
    /// Override mag_weight (0 switches the linear branch off).
    #[arg(long)]
    pub(crate) mag_weight: Option<f32>,
    /// Override max_chunk_size.
    #[arg(long)]
    pub(crate) max_chunk_size: Option<usize>,
}

#[derive(clap::Args, Clone)]
pub(crate) struct GenArgs {
    /// Apply the chat template (or the built-in Alpaca format) to the prompt.
    #[arg(long)]
    pub(crate) chat: bool,
    /// System prompt (with --chat / in chat).
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_new_tokens: usize,
    /// Greedy decoding (temperature 0, no penalty).
    #[arg(long)]
    pub(crate) greedy: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub(crate) temperature: Option<f32>,
    /// Top-k (0 = off).
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// Top-p / nucleus (1 = off).
    #[arg(long)]
    pub(crate) top_p: Option<f32>,
    /// Min-p (0 = off).
    #[arg(long)]
    pub(crate) min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    #[arg(long)]
    pub(crate) repeat_penalty: Option<f32>,
    /// Tokens the repetition penalty looks back over.
    #[arg(long)]
    pub(crate) repeat_last_n: Option<usize>,
    /// RNG seed.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Do not stop at EOS.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Softmax window (KV positions kept); defaults to max_self_attn_length, else 8192.
    #[arg(long, value_parser = parse_window)]
    pub(crate) window: Option<usize>,
    /// How the softmax KV cache is stored: auto (8-bit where the model's heads allow, else
    /// f16), q8_0 (8-bit blocks, 34/128 of f32's memory), f16 (half), f32 (exact).
    #[arg(long, default_value = "auto", value_parser = parse_kv)]
    pub(crate) kv: KvChoice,
}

/// `--window N` (every subcommand that has it): a number of positions between 1 and
/// [`tptt::state::MAX_WINDOW`] (0 would divide by zero in the KV ring, a huge one asks for an
/// absurd cache); clap reports a refusal as `invalid value … for '--window <WINDOW>': …`.
pub(crate) fn parse_window(s: &str) -> std::result::Result<usize, String> {
    let w: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("--window must be a whole number of positions ({e})"))?;
    tptt::state::validate_window("--window", w)
}

/// `--kv auto|q8_0|f16|f32`: the KV cache format (resolved against the model once loaded:
/// `Model::kv_format`).
pub(crate) fn parse_kv(s: &str) -> std::result::Result<KvChoice, String> {
    KvChoice::parse(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = KvChoice::ALL.iter().map(|f| f.as_str()).collect();
        format!("--kv must be one of {}, got {s:?}", names.join(", "))
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// List the variants of a repo and describe one.
    Inspect {
        /// The TPTT repository folder.
        repo: PathBuf,
        /// Describe only this variant.
        #[arg(long)]
        variant: Option<String>,
        /// Base model folder, overriding `base_model_name`.
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// One full-sequence forward (no cache); writes an f32 tensor `logits` [seq, vocab].
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids (parsed here, so an empty list reaches the engine's check).
        #[arg(long, required = true)]
        ids: String,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate from a prompt (raw text, or a chat turn with --chat), streaming the output.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt: raw text, or the user message with --chat. Appended to --load-state.
        #[arg(long, default_value = "")]
        prompt: String,
        #[command(flatten)]
        gen: GenArgs,
        /// Continue from a saved state (the prompt is appended to it).
        #[arg(long)]
        load_state: Option<PathBuf>,
        /// Save the state after the prompt and the generated tokens.
        #[arg(long)]
        save_state: Option<PathBuf>,
        /// Print the generated token ids (comma-separated, one line) instead of text.
        #[arg(long)]
        print_ids: bool,
    },
    /// Interactive chat in the terminal; the conversation's memory is kept between turns.
    /// Commands: /save FILE, /load FILE, /reset, /quit.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        gen: GenArgs,
        /// Start from a saved chat state.
        #[arg(long)]
        load_state: Option<PathBuf>,
    },
    /// Make a TPTT repo from a plain Hugging Face model folder (untrained injection, no LoRA).
    Inject {
        /// The base model folder (config.json + safetensors).
        base: PathBuf,
        /// Output repo folder.
        #[arg(long)]
        out: PathBuf,
        /// Operator modes, one variant each.
        #[arg(long, value_delimiter = ',', default_value = "delta_product")]
        modes: Vec<String>,
        /// MaG weight of the injected variants.
        #[arg(long, default_value_t = 0.125)]
        mag_weight: f64,
    },
    /// Measure speed (prefill, decode vs history, resume, memory) against the memory-bandwidth
    /// limit, the base transformer, the reference tptt and llama.cpp (issue 6).
    Bench(bench::BenchArgs),
    /// Serve the variant over an OpenAI-compatible HTTP API (issue 15): /v1/models,
    /// /v1/chat/completions, /v1/completions; conversations resume from their saved state.
    Serve(serve::ServeArgs),
    /// Long-context quality: perplexity by position bucket over long texts and recall probes at
    /// a distance, for the variant, the same weights without memory, and full attention.
    Eval(eval::EvalArgs),
    /// Train the memory: LoRA on q/k/v/o of a plain base, distilled from the same base with
    /// full attention on long texts (resumable; writes a normal TPTT variant).
    Distill(distill::DistillArgs),
}

pub(crate) fn load(args: &ModelArgs) -> Result<(Model, tptt::repo::VariantFiles)> {
    let files = variant_files(args)?;
    Ok((load_model(args, &files)?, files))
}

/// The files of the variant `args` name.
pub(crate) fn variant_files(args: &ModelArgs) -> Result<tptt::repo::VariantFiles> {
    let repo = TpttRepo::open(&args.repo)?;
    Ok(repo.variant(args.variant.as_deref(), args.base.as_deref())?)
}

/// The model of `files`, with `args`' overrides.
pub(crate) fn load_model(args: &ModelArgs, files: &tptt::repo::VariantFiles) -> Result<Model> {
    let opts = LoadOptions {
        retie_lm_head: !args.no_retie,
        // f16 / bf16 matrices stay as stored (half the memory; widened exactly as multiplied).
        half_weights: true,
        ..Default::default()
    };
    let mut model =
        Model::load(files, &opts).with_context(|| format!("loading variant {}", files.name))?;
    if let Some(m) = args.mag_weight {
        if !m.is_finite() {
            bail!("--mag-weight must be a finite number, got {m}");
        }
        model.set_mag_weight(m);
    }
    if let Some(c) = args.max_chunk_size {
        model.set_max_chunk_size(c)?;
    }
    Ok(model)
}

pub(crate) fn tokenizer(files: &tptt::repo::VariantFiles) -> Result<tokenizers::Tokenizer> {
    Ok(tptt_engine::chat_model::load_tokenizer(files)?)
}

fn inspect(repo: &Path, variant: Option<&str>, base: Option<&Path>) -> Result<()> {
    let repo = TpttRepo::open(repo)?;
    println!("repo: {}", repo.root.display());
    println!("variants: {}", repo.variants.join(", "));
    let names: Vec<String> = match variant {
        Some(v) => {
            // Asking for one variant that cannot be resolved is the command failing.
            repo.variant(Some(v), base)?;
            vec![v.to_string()]
        }
        None => repo.variants.clone(),
    };
    let mut failed = Vec::new();
    for name in names {
        println!("\n[{name}]");
        match repo.variant(Some(&name), base) {
            Ok(f) => {
                let (b, t) = (&f.config.base, &f.config.tptt);
                println!("  architecture: {} ({} layers, hidden {}, heads {}/{} kv, head_dim {}, vocab {})", b.arch.name(), b.num_layers, b.hidden_size, b.num_heads, b.num_kv_heads, b.head_dim, b.vocab_size);
                if let Some(dims) = &b.layer_dims {
                    let heads: Vec<String> = dims
                        .iter()
                        .map(|d| format!("{}/{}", d.num_heads, d.num_kv_heads))
                        .collect();
                    let ffn: Vec<String> = dims
                        .iter()
                        .map(|d| d.intermediate_size.to_string())
                        .collect();
                    println!(
                        "  per layer: heads/kv {} · ffn {}",
                        heads.join(" "),
                        ffn.join(" ")
                    );
                }
                println!("  base: {}", f.base_dir.display());
                println!(
                    "  operator_mode: {} (order {}, alpha {:?}, beta {:?}, linear {}, trick {:?})",
                    t.operator_mode,
                    t.recurrent.order,
                    t.recurrent.alpha_gate,
                    t.recurrent.beta_gate,
                    t.recurrent.linear,
                    t.recurrent.trick
                );
                println!(
                    "  mag_weight {} cross_gate {} base_scale_attn {} max_chunk_size {} max_self_attn_length {:?} linear_precision {}",
                    t.mag_weight, t.cross_gate, t.base_scale_attn, t.max_chunk_size, t.max_self_attn_length, t.linear_precision
                );
                match &t.lora {
                    Some(l) => println!(
                        "  lora: r {} alpha {} rslora {} (scale {})",
                        l.r,
                        l.alpha,
                        l.use_rslora,
                        l.scale()
                    ),
                    None => {
                        println!("  lora: none (full projection weights or untrained injection)")
                    }
                }
                let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                let base_bytes: u64 = tptt::weights::weight_files(&f.base_dir)
                    .map(|v| v.iter().map(|p| size(p)).sum())
                    .unwrap_or(0);
                let adapter_bytes = f.adapter.as_deref().map(size).unwrap_or(0);
                println!(
                    "  sizes: base weights {:.1} MB, adapter {:.1} MB",
                    base_bytes as f64 / 1e6,
                    adapter_bytes as f64 / 1e6
                );
                println!(
                    "  tokenizer: {}",
                    f.tokenizer
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none".into())
                );
            }
            Err(e) => {
                println!("  error: {e}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} variants cannot be loaded:\n  {}",
            failed.len(),
            repo.variants.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

/// Parse `--ids` ("1,2,3"; spaces allowed; "" is the empty list, refused by the engine).
fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--ids: {t:?} is not a token id (a non-negative integer)"))
        })
        .collect()
}

fn logits(args: &ModelArgs, ids: &str, out: &Path) -> Result<()> {
    let ids = parse_ids(ids)?;
    let (model, _) = load(args)?;
    let logits = model.forward_full(&ids)?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("logits".to_string(), logits)]),
        out,
    )
    .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn inject(base: &Path, out: &Path, modes: &[String], mag: f64) -> Result<()> {
    if !mag.is_finite() {
        bail!("--mag-weight must be a finite number, got {mag}");
    }
    let base_cfg = tptt::config::read_json_object(&base.join("config.json"))?;
    tptt::config::BaseConfig::from_json(&base_cfg, Some(&base.join("config.json")))?;
    let base_abs =
        std::fs::canonicalize(base).with_context(|| format!("resolving {}", base.display()))?;
    for mode in modes {
        tptt::config::RecurrentConfig::from_operator_mode(mode)?;
        let dir = out.join(format!("{mode}_mag{mag}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cfg = base_cfg.clone();
        let extra = serde_json::json!({
            "model_type": "tptt",
            "architectures": ["TpttModel"],
            "base_model_name": base_abs.display().to_string(),
            "operator_mode": mode,
            "mag_weight": mag,
            "cross_gate": false,
            "base_scale_attn": false,
            "max_chunk_size": 64,
            "max_self_attn_length": null,
            "linear_precision": "float32",
            "lora_config": null,
        });
        if let serde_json::Value::Object(m) = extra {
            cfg.extend(m);
        }
        let text = serde_json::to_string_pretty(&cfg)?;
        std::fs::write(dir.join("config.json"), text)
            .with_context(|| format!("writing {}", dir.display()))?;
        println!("{}", dir.display());
    }
    Ok(())
}

/// Exit status of an internal error — a panic, i.e. a bug in `tptt` (sysexits.h `EX_SOFTWARE`).
/// Errors the user can act on (bad input, missing files) exit with 1, argument errors with 2
/// (clap), and nothing exits with Rust's 101.
pub(crate) const EXIT_INTERNAL: i32 = 70;

/// The last panic seen by [`install_panic_net`]'s hook: message, thread and place.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The last-resort net for panics. This is a net, not a fix: every panic is a bug, and inputs
/// are meant to be refused with an `error:` line before they reach code that could panic. When
/// one slips through anyway, the user gets one line — `internal error: <what, where>; please
/// report it` — and exit status [`EXIT_INTERNAL`], instead of Rust's panic message and
/// status 101. The hook only records the panic (quietly, unless `RUST_BACKTRACE` is set, which
/// keeps Rust's own report with its backtrace for whoever debugs it); `main` prints the line
/// when the panic reaches it, or when a panic caught on another thread comes back as
/// `tptt_engine::Error::Panicked`.
fn install_panic_net() {
    let rust_report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            rust_report(info);
        }
        let message = tptt_engine::error::panic_message(info.payload());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed thread")
            .to_string();
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = format!("{message} (thread {thread}{place})");
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(what);
        }
    }));
}

/// Prints the internal-error line for a panic whose payload message is `fallback` and exits.
fn internal_error(fallback: &str) -> ! {
    let what = LAST_PANIC
        .lock()
        .ok()
        .and_then(|mut p| p.take())
        .unwrap_or_else(|| fallback.to_string());
    eprintln!("internal error: {what}; this is a bug in tptt, please report it");
    std::process::exit(EXIT_INTERNAL);
}

fn main() {
    install_panic_net();
    tptt_engine::prepare_process();
    let cli = Cli::parse();
    let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&cli))) {
        Ok(result) => result,
        Err(payload) => internal_error(&tptt_engine::error::panic_message(payload.as_ref())),
    };
    if let Err(e) = result {
        let panicked = e.chain().any(|cause| {
            matches!(
                cause.downcast_ref::<tptt_engine::Error>(),
                Some(tptt_engine::Error::Panicked { .. })
            )
        });
        if panicked {
            internal_error(&format!("{e:#}"));
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs the command.
fn run(cli: &Cli) -> Result<()> {
    // A panic on purpose, so tests can check the net (debug builds only: the tests' builds).
    #[cfg(debug_assertions)]
    if std::env::var_os("TPTT_TEST_PANIC").is_some() {
        panic!("TPTT_TEST_PANIC is set");
    }
    match &cli.cmd {
        Cmd::Inspect {
            repo,
            variant,
            base,
        } => inspect(repo, variant.as_deref(), base.as_deref()),
        Cmd::Logits { model, ids, out } => logits(model, ids, out),
        Cmd::Generate {
            model,
            prompt,
            gen,
            load_state,
            save_state,
            print_ids,
        } => chat::generate(
            model,
            prompt,
            gen,
            load_state.as_deref(),
            save_state.as_deref(),
            *print_ids,
        ),
        Cmd::Chat {
            model,
            gen,
            load_state,
        } => chat::chat(model, gen, load_state.as_deref()),
        Cmd::Inject {
            base,
            out,
            modes,
            mag_weight,
        } => inject(base, out, modes, *mag_weight),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Serve(args) => serve::run(args),
        Cmd::Eval(args) => eval::run(args),
        Cmd::Distill(args) => distill::run(args),
    }
}
