//! The baselines measured beside the engine: the reference tptt 0.12.1 (a Python script), llama.cpp's
//! `llama-bench` on the GGUF, and the quantized path of our own engine.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Outcome of a baseline: its JSON, or why it is missing.
pub(super) enum Baseline {
    Measured(Value),
    Missing(String),
}

impl Baseline {
    pub(super) fn num(&self, key: &str) -> Option<f64> {
        match self {
            Baseline::Measured(v) => v.get(key).and_then(Value::as_f64),
            Baseline::Missing(_) => None,
        }
    }
    pub(super) fn to_json(&self) -> Value {
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

pub(super) fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

pub(super) fn find_script() -> Option<PathBuf> {
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
pub(super) fn reference(subject: &Subject, threads: usize, quick: bool) -> Baseline {
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

pub(super) fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

pub(super) fn find_gguf(subject: &Subject) -> Option<PathBuf> {
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
pub(super) fn llamacpp(subject: &Subject, threads: usize) -> Baseline {
    let Some(gguf) = find_gguf(subject) else {
        return Baseline::Missing(
            "no GGUF found next to the model or in ../.cache (set TPTT_BENCH_GGUF)".into(),
        );
    };
    llamacpp_on(&gguf, threads)
}

/// llama-bench pp512 and tg128 on `gguf`, each in its own run (see [`llama_bench_one`]).
pub(super) fn llamacpp_on(gguf: &Path, threads: usize) -> Baseline {
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
    static PP_CRASHES: AtomicBool = AtomicBool::new(false);
    static TG_CRASHES: AtomicBool = AtomicBool::new(false);
    let pp = match llama_bench_one(&bin, gguf, threads, (512, 0), &PP_CRASHES) {
        Ok(r) => r,
        Err(why) => return Baseline::Missing(why),
    };
    let tg = match llama_bench_one(&bin, gguf, threads, (0, 128), &TG_CRASHES) {
        Ok(r) => r,
        Err(why) => return Baseline::Missing(why),
    };
    Baseline::Measured(json!({
        "gguf": gguf.display().to_string(),
        "threads": threads,
        "pp512_tok_s": pp.tok_s,
        "tg128_tok_s": tg.tok_s,
        "pp512_repack": pp.repack,
        "tg128_repack": tg.repack,
        "repack_crashed": pp.crashed.or(tg.crashed),
    }))
}

/// One llama-bench test's rate, and how it was run.
struct LlamaRate {
    tok_s: Option<f64>,
    /// Whether llama.cpp's weight repacking (its default) was on.
    repack: bool,
    /// How the run with repacking ended, when it died.
    crashed: Option<String>,
}

/// llama-bench with `-p P -n N` (`test`) on `gguf`.
///
/// llama.cpp 0c1e570 with its default weight repacking dies of SIGSEGV on some CPUs (seen on
/// 2026-12-04 on an Intel Xeon with AVX-512 and AMX: every prompt length; decode alone fine).
/// A test killed by a signal runs again with `--repack 0` (its plain kernels) and the JSON says
/// so; `crashes` remembers it, so later rounds of the same run go straight to the plain kernels.
/// Prompt and decode are separate runs, so that one test's crash costs the other nothing.
fn llama_bench_one(
    bin: &Path,
    gguf: &Path,
    threads: usize,
    test: (usize, usize),
    crashes: &AtomicBool,
) -> std::result::Result<LlamaRate, String> {
    let run = |repack: bool| {
        progress(format!(
            "[llama.cpp] {} -m {} -p {} -n {}{}",
            bin.display(),
            gguf.display(),
            test.0,
            test.1,
            if repack { "" } else { " --repack 0" }
        ));
        Command::new(bin)
            .arg("-m")
            .arg(gguf)
            .args([
                "-p",
                &test.0.to_string(),
                "-n",
                &test.1.to_string(),
                "-t",
                &threads.to_string(),
                "--repack",
                if repack { "1" } else { "0" },
                "-o",
                "json",
            ])
            .output()
            .map_err(|e| format!("cannot run {} ({e})", bin.display()))
    };
    let mut repack = !crashes.load(Ordering::Relaxed);
    let mut crashed = (!repack).then(|| "in an earlier round".to_string());
    let out = loop {
        let out = run(repack)?;
        if repack && out.status.code().is_none() {
            crashes.store(true, Ordering::Relaxed);
            crashed = Some(out.status.to_string());
            repack = false;
            continue;
        }
        break out;
    };
    if !out.status.success() {
        return Err(format!(
            "llama-bench failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 3)
        ));
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("llama-bench printed no JSON array ({e})"))?;
    let tok_s = rows
        .iter()
        .find(|r| {
            r.get("n_prompt").and_then(Value::as_u64) == Some(test.0 as u64)
                && r.get("n_gen").and_then(Value::as_u64) == Some(test.1 as u64)
        })
        .and_then(|r| r.get("avg_ts").and_then(Value::as_f64));
    Ok(LlamaRate {
        tok_s,
        repack,
        crashed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `llama-bench`: a shell script running `body`.
    fn fake_bench(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    /// A test killed by a signal with repacking on runs again with `--repack 0`, says so, and
    /// later rounds go straight to the plain kernels; a run that fails without a signal is an
    /// error naming its exit, not retried.
    #[test]
    fn a_crash_with_repacking_runs_again_without_it() {
        let dir = std::env::temp_dir().join(format!("tptt-fake-llama-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let gguf = dir.join("m.gguf");
        let crashy = fake_bench(
            &dir,
            "crashy",
            r#"case "$*" in *"--repack 1"*) kill -SEGV $$ ;; esac
echo '[{"n_prompt": 512, "n_gen": 0, "avg_ts": 123.5}]'"#,
        );
        let flag = AtomicBool::new(false);
        let first = llama_bench_one(&crashy, &gguf, 2, (512, 0), &flag).expect("first");
        assert_eq!(first.tok_s, Some(123.5));
        assert!(!first.repack && flag.load(Ordering::Relaxed));
        assert!(first
            .crashed
            .as_deref()
            .is_some_and(|c| c.contains("SIGSEGV") || c.contains("11")));
        let later = llama_bench_one(&crashy, &gguf, 2, (512, 0), &flag).expect("later");
        assert_eq!((later.tok_s, later.repack), (Some(123.5), false));
        assert_eq!(later.crashed.as_deref(), Some("in an earlier round"));

        // Fine with repacking: it stays on; a test missing from the output is no rate.
        let fine = fake_bench(
            &dir,
            "fine",
            r#"echo '[{"n_prompt": 0, "n_gen": 128, "avg_ts": 9.0}]'"#,
        );
        let flag = AtomicBool::new(false);
        let tg = llama_bench_one(&fine, &gguf, 2, (0, 128), &flag).expect("tg");
        assert_eq!((tg.tok_s, tg.repack, tg.crashed), (Some(9.0), true, None));
        let pp = llama_bench_one(&fine, &gguf, 2, (512, 0), &flag).expect("pp");
        assert_eq!(pp.tok_s, None);

        let failing = fake_bench(&dir, "failing", "echo 'no such model' >&2; exit 3");
        let flag = AtomicBool::new(false);
        let err = llama_bench_one(&failing, &gguf, 2, (512, 0), &flag)
            .err()
            .expect("an exit code is an error");
        assert!(
            err.contains("exit status: 3") && err.contains("no such model"),
            "{err}"
        );
        assert!(!flag.load(Ordering::Relaxed));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
