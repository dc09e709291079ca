//! `tptt eval`: long-context quality of a TPTT variant — perplexity by position bucket over long
//! real texts and recall probes at a distance, for
//! (a) the variant with its softmax window (`tptt`),
//! (b) the same weights with the linear branch off and the same window (`no_memory`),
//! (c) the same weights with the branch off and full attention (`full_attention`), when the text
//!     is at most `--full-max-tokens` long (its KV cache grows with the text).
//!
//! The numbers come from `tptt_engine::eval`; this file picks the texts and probes, runs the
//! three configurations and prints a table or one JSON object (`--json`). The bench calls
//! [`evaluate`] with a short text to put the same figures into its JSON.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tptt::model::Model;
use tptt_engine::eval::{
    buckets, default_edges, run_probe, score_text, validate_edges, Bucket, ProbeIds, ProbeResult,
};
use tptt_engine::session::DEFAULT_WINDOW;

use crate::ModelArgs;

/// `tptt eval` arguments.
#[derive(clap::Args, Clone)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Text files to read (each is its own sequence; buckets are summed over them).
    #[arg(long, required = true, num_args = 1..)]
    pub(crate) text: Vec<PathBuf>,
    /// Softmax window of (a) and (b); default: the config's, else 8192.
    #[arg(long, value_parser = crate::parse_window)]
    pub(crate) window: Option<usize>,
    /// How the softmax KV cache is stored: f32 (exact, the default here: an evaluation's
    /// baseline), f16, q8_0 (8-bit blocks) or auto (as `tptt chat` stores it).
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv)]
    pub(crate) kv: tptt::state::KvChoice,
    /// Read at most this many tokens of each text.
    #[arg(long)]
    pub(crate) max_tokens: Option<usize>,
    /// Bucket bounds in positions, e.g. 512,1024,2048,3072,4096 (default: 512, 1024, 2048, …
    /// doubling, up to the longest text).
    #[arg(long, value_delimiter = ',')]
    pub(crate) buckets: Vec<usize>,
    /// Longest text (tokens) that (c) full attention reads; longer ones skip (c).
    #[arg(long, default_value_t = 32768)]
    pub(crate) full_max_tokens: usize,
    /// Recall probes: filler tokens between the fact and the question, counted past the
    /// window (distance = window + d), e.g. 1024,4096. Empty: no probes.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub(crate) probe_distances: Vec<usize>,
    /// Skip the recall probes.
    #[arg(long)]
    pub(crate) no_probes: bool,
    /// Which configurations to run (tptt, no_memory, full_attention): the last two do not
    /// depend on the variant's training, so comparing variants of one base needs them once.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tptt,no_memory,full_attention"
    )]
    pub(crate) configs: Vec<String>,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A recall probe in text: the fact is read first, then filler, then the question, whose
/// expected continuation is the answer.
struct Probe {
    name: &'static str,
    fact: &'static str,
    question: &'static str,
    answer: &'static str,
}

/// Facts a small instruct model recalls with full attention (SmolLM2-135M-Instruct gets each
/// right 1.5k and 2.5k tokens back; a colour and a city it missed were dropped), so a miss at a
/// distance is the memory's.
const PROBES: &[Probe] = &[
    Probe {
        name: "dog",
        fact: "Before we start, a note about me: my dog is called Biscuit. My dog Biscuit is a beagle.\n\n",
        question: "\n\nA question about me: what is my dog called? My dog is called",
        answer: " Biscuit",
    },
    Probe {
        name: "sister",
        fact: "Before we start, a note about me: my sister is called Margaret. My sister Margaret is a doctor.\n\n",
        question: "\n\nA question about me: what is my sister called? My sister is called",
        answer: " Margaret",
    },
    Probe {
        name: "password",
        fact: "Before we start, remember the password. The password is tulip. The password is tulip.\n\n",
        question: "\n\nWhat is the password? The password is",
        answer: " tulip",
    },
    Probe {
        name: "passkey",
        fact: "Before we start, remember the pass key. The pass key is 4721. The pass key is 4721.\n\n",
        question: "\n\nWhat is the pass key? The pass key is",
        answer: " 4721",
    },
];

/// Longest probe distance (and window) accepted.
const MAX_PROBE_DISTANCE: usize = 1 << 20;

/// The three configurations, by name.
pub(crate) const CONFIGS: [&str; 3] = ["tptt", "no_memory", "full_attention"];

/// What [`evaluate`] measured for one configuration.
pub(crate) struct ConfigResult {
    pub(crate) name: &'static str,
    pub(crate) mag_weight: f32,
    pub(crate) window: Option<usize>,
    /// `Err(why)` when skipped.
    pub(crate) buckets: Result<Vec<Bucket>, String>,
    pub(crate) probes: Vec<(&'static str, Vec<ProbeResult>)>,
}

/// Options of [`evaluate`].
pub(crate) struct EvalPlan<'a> {
    pub(crate) texts: &'a [(PathBuf, Vec<u32>)],
    /// Names of [`CONFIGS`] to run.
    pub(crate) configs: Vec<&'static str>,
    pub(crate) window: usize,
    pub(crate) kv: tptt::state::KvChoice,
    pub(crate) edges: Vec<usize>,
    pub(crate) full_max_tokens: usize,
    pub(crate) probe_distances: Vec<usize>,
}

fn progress(what: &str) -> impl FnMut(usize) + '_ {
    move |n| eprint!("\r[eval] {what}: {n} tokens read   ")
}

/// Scores every text and runs the probes under the three configurations.
pub(crate) fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    plan: &EvalPlan<'_>,
) -> Result<Vec<ConfigResult>> {
    let longest = plan.texts.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
    let filler: Vec<u32> = plan
        .texts
        .iter()
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    let probes: Vec<(&'static str, ProbeIds)> = if plan.probe_distances.is_empty() {
        Vec::new()
    } else {
        PROBES
            .iter()
            .map(|p| Ok((p.name, probe_ids(tokenizer, p)?)))
            .collect::<Result<_>>()?
    };
    let distances: Vec<usize> = plan
        .probe_distances
        .iter()
        .map(|d| d + plan.window)
        .collect();
    let mut out = Vec::new();
    for name in plan.configs.iter().copied() {
        let mut m = model.clone();
        let window = match name {
            "full_attention" => None,
            _ => Some(plan.window),
        };
        if name != "tptt" {
            m.set_mag_weight(0.0);
        }
        let mag_weight = m.config().tptt.mag_weight;
        let too_long = name == "full_attention" && longest > plan.full_max_tokens;
        let scored = if too_long {
            Err(format!(
                "skipped: the longest text has {longest} tokens, --full-max-tokens is {}",
                plan.full_max_tokens
            ))
        } else {
            let mut sum: Vec<Bucket> = buckets(&[], &plan.edges);
            for (path, ids) in plan.texts {
                let label = format!("{name}, {}", file_name(path));
                let kv = m.kv_format(plan.kv).context("--kv")?;
                let nll = score_text(&m, ids, window, kv, None, &mut progress(&label))?
                    .context("evaluation cancelled")?;
                for (acc, b) in sum.iter_mut().zip(buckets(&nll, &plan.edges)) {
                    acc.merge(&b);
                }
            }
            eprintln!();
            Ok(sum)
        };
        let mut probe_results = Vec::new();
        let max_distance = distances.iter().copied().max().unwrap_or(0);
        if !(name == "full_attention" && max_distance > plan.full_max_tokens) {
            for (pname, ids) in &probes {
                eprint!("\r[eval] {name}: probe {pname}   ");
                let r = run_probe(&m, ids, &filler, &distances, window, None)?
                    .context("evaluation cancelled")?;
                probe_results.push((*pname, r));
            }
            if !probes.is_empty() {
                eprintln!();
            }
        }
        out.push(ConfigResult {
            name,
            mag_weight,
            window,
            buckets: scored,
            probes: probe_results,
        });
    }
    Ok(out)
}

fn probe_ids(tokenizer: &Tokenizer, p: &Probe) -> Result<ProbeIds> {
    Ok(ProbeIds {
        fact: encode(tokenizer, p.fact, true)?,
        question: encode(tokenizer, p.question, false)?,
        answer: encode(tokenizer, p.answer, false)?,
    })
}

pub(crate) fn encode(tokenizer: &Tokenizer, text: &str, specials: bool) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, specials)
        .map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?
        .get_ids()
        .to_vec())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Reads and tokenizes the texts (each cut to `max_tokens`), refusing unreadable, empty and
/// one-token texts.
pub(crate) fn read_texts(
    tokenizer: &Tokenizer,
    paths: &[PathBuf],
    max_tokens: Option<usize>,
) -> Result<Vec<(PathBuf, Vec<u32>)>> {
    if max_tokens == Some(0) {
        bail!("--max-tokens must be at least 2");
    }
    paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", p.display()))?;
            let mut ids = encode(tokenizer, &text, true)
                .with_context(|| format!("tokenizing {}", p.display()))?;
            if let Some(n) = max_tokens {
                ids.truncate(n);
            }
            if ids.len() < 2 {
                bail!(
                    "{} has {} token(s): a text needs at least 2 to be scored",
                    p.display(),
                    ids.len()
                );
            }
            Ok((p.clone(), ids))
        })
        .collect()
}

/// `tptt eval`.
pub(crate) fn run(args: &EvalArgs) -> Result<()> {
    let (model, files) = crate::load(&args.model)?;
    let tokenizer = crate::tokenizer(&files)?;
    let texts = read_texts(&tokenizer, &args.text, args.max_tokens)?;
    let longest = texts.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
    let edges = if args.buckets.is_empty() {
        default_edges(longest)
    } else {
        validate_edges(&args.buckets)?
    };
    let window = args
        .window
        .or_else(|| model.config_window())
        .unwrap_or(DEFAULT_WINDOW);
    // Each probe reads window + distance tokens per configuration: bound it, so a typo cannot
    // start a run of days.
    if let Some(d) = args
        .probe_distances
        .iter()
        .find(|&&d| d > MAX_PROBE_DISTANCE)
    {
        bail!("--probe-distances: {d} is more than {MAX_PROBE_DISTANCE} tokens");
    }
    if window > MAX_PROBE_DISTANCE {
        bail!("--window {window} is more than {MAX_PROBE_DISTANCE} tokens");
    }
    let configs =
        args.configs
            .iter()
            .map(|c| {
                CONFIGS.iter().copied().find(|k| k == c).with_context(|| {
                    format!("--configs: {c:?} is not one of {}", CONFIGS.join(", "))
                })
            })
            .collect::<Result<Vec<_>>>()?;
    if configs.is_empty() {
        bail!("--configs: name at least one of {}", CONFIGS.join(", "));
    }
    let plan = EvalPlan {
        texts: &texts,
        configs,
        window,
        kv: args.kv,
        edges,
        full_max_tokens: args.full_max_tokens,
        probe_distances: if args.no_probes {
            Vec::new()
        } else {
            args.probe_distances.clone()
        },
    };
    let results = evaluate(&model, &tokenizer, &plan)?;
    let report = to_json(&files.name, &texts, &results);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&files.name, &texts, window, &results);
    }
    Ok(())
}

/// The JSON form (also embedded in the bench's).
pub(crate) fn to_json(
    variant: &str,
    texts: &[(PathBuf, Vec<u32>)],
    results: &[ConfigResult],
) -> Value {
    let configs: serde_json::Map<String, Value> = results
        .iter()
        .map(|r| {
            let buckets = match &r.buckets {
                Ok(b) => json!(b
                    .iter()
                    .map(|b| json!({
                        "start": b.start,
                        "end": b.end,
                        "tokens": b.tokens,
                        "perplexity": (b.tokens > 0).then(|| b.perplexity()),
                    }))
                    .collect::<Vec<_>>()),
                Err(why) => json!({ "not_available": why }),
            };
            let probes: Vec<Value> = r
                .probes
                .iter()
                .flat_map(|(name, rs)| {
                    rs.iter().map(move |p| {
                        json!({
                            "probe": name,
                            "distance": p.distance,
                            "recalled": p.recalled,
                            "answer_nll": p.answer_nll,
                        })
                    })
                })
                .collect();
            (
                r.name.to_string(),
                json!({
                    "mag_weight": r.mag_weight,
                    "window": r.window,
                    "buckets": buckets,
                    "probes": probes,
                }),
            )
        })
        .collect();
    json!({
        "variant": variant,
        "texts": texts.iter().map(|(p, t)| json!({ "path": p.display().to_string(), "tokens": t.len() })).collect::<Vec<_>>(),
        "configs": configs,
    })
}

fn print_table(
    variant: &str,
    texts: &[(PathBuf, Vec<u32>)],
    window: usize,
    results: &[ConfigResult],
) {
    println!("variant {variant}, softmax window {window}");
    for (p, t) in texts {
        println!("  text {} ({} tokens)", p.display(), t.len());
    }
    println!("\nperplexity by position (tokens scored)");
    print!("{:<14}", "positions");
    for r in results {
        print!("{:>25}", label(r));
    }
    println!();
    let rows = results
        .iter()
        .find_map(|r| r.buckets.as_ref().ok())
        .map_or(0, Vec::len);
    for i in 0..rows {
        let mut line = String::new();
        for r in results {
            let cell = match &r.buckets {
                Ok(b) if b[i].tokens > 0 => format!("{:.2} ({})", b[i].perplexity(), b[i].tokens),
                Ok(_) => "-".into(),
                Err(_) => "skipped".into(),
            };
            line.push_str(&format!("{cell:>25}"));
        }
        if let Some(b) = results.iter().find_map(|r| r.buckets.as_ref().ok()) {
            println!("{:<14}{line}", format!("{}–{}", b[i].start, b[i].end));
        }
    }
    for r in results {
        if let Err(why) = &r.buckets {
            println!("  {}: {why}", r.name);
        }
    }
    if results.iter().all(|r| r.probes.is_empty()) {
        return;
    }
    println!("\nrecall probes (distance = filler tokens between fact and question; ✓ recalled, answer NLL)");
    print!("{:<10}{:>9}", "probe", "distance");
    for r in results {
        print!("{:>25}", label(r));
    }
    println!();
    let Some(first) = results.iter().find(|r| !r.probes.is_empty()) else {
        return;
    };
    for (pi, (pname, rs)) in first.probes.iter().enumerate() {
        for (di, p) in rs.iter().enumerate() {
            let mut line = format!("{pname:<10}{:>9}", p.distance);
            for r in results {
                let cell = r
                    .probes
                    .get(pi)
                    .and_then(|(_, rs)| rs.get(di))
                    .map(|x| format!("{} {:.2}", if x.recalled { "✓" } else { "✗" }, x.answer_nll))
                    .unwrap_or_else(|| "skipped".into());
                line.push_str(&format!("{cell:>25}"));
            }
            println!("{line}");
        }
    }
}

fn label(r: &ConfigResult) -> String {
    match (r.name, r.window) {
        ("tptt", Some(w)) => format!("tptt (mag {}, W {w})", r.mag_weight),
        ("no_memory", Some(w)) => format!("no memory (W {w})"),
        _ => "full attention".into(),
    }
}
