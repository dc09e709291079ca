//! `tptt generate` end to end: greedy ids of one run equal those of a run split by
//! `--save-state` / `--load-state` (for several operator modes); broken or foreign snapshots
//! are refused with an `error:` line and a non-zero exit, never a panic; OpenELM's layers of
//! different widths through state files and `inject`; and, with
//! `TPTT_SMOLLM2_DIR`, an injected SmolLM2 with TPTT switched off answers a chat question.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// A scratch folder, deleted on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tptt-cli-generate-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tptt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tptt"))
        .args(args)
        .output()
        .expect("run the tptt binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run `tptt generate` on a tiny llama variant, greedy, `--print-ids`; returns the ids.
fn generate_ids(variant: &str, extra: &[&str]) -> Vec<u32> {
    generate_ids_in(&fixtures().join("tptt-llama"), variant, extra)
}

/// [`generate_ids`] on a variant of any repo.
fn generate_ids_in(repo: &Path, variant: &str, extra: &[&str]) -> Vec<u32> {
    let mut args = vec![
        "generate",
        repo.to_str().expect("utf-8 path"),
        "--variant",
        variant,
        "--greedy",
        "--ignore-eos",
        "--print-ids",
    ];
    args.extend_from_slice(extra);
    let out = tptt(&args);
    assert!(
        out.status.success(),
        "{variant} {extra:?} failed:\n{}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    line.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .unwrap_or_else(|_| panic!("{variant}: not an id list: {stdout:?}"))
        })
        .collect()
}

#[test]
fn split_run_through_a_state_file_equals_one_run() {
    let scratch = Scratch::new();
    for variant in [
        "delta_rule",
        "delta_product",
        "gated_delta_product",
        "delta_product_r",
        "delta_rule_gelu",
        "delta_rule_win16",
    ] {
        let whole = generate_ids(
            variant,
            &["--prompt", "hello world", "--max-new-tokens", "16"],
        );
        assert_eq!(
            whole.len(),
            16,
            "{variant}: --ignore-eos gives exactly 16 ids"
        );
        let state = scratch.path(&format!("{variant}.tptt-state"));
        let state = state.to_str().expect("utf-8 path");
        let first = generate_ids(
            variant,
            &[
                "--prompt",
                "hello world",
                "--max-new-tokens",
                "8",
                "--save-state",
                state,
            ],
        );
        let second = generate_ids(variant, &["--load-state", state, "--max-new-tokens", "8"]);
        assert_eq!(
            [first, second].concat(),
            whole,
            "{variant}: 8 + 8 through {state} differs from 16 in one run"
        );
    }
}

/// OpenELM (layers of different head counts): a split run through a state file equals one
/// run, in both KV formats; `inject` on its plain base gives a repo that `inspect` describes
/// layer by layer and that generates.
#[test]
fn openelm_split_run_and_injection() {
    let scratch = Scratch::new();
    let repo = fixtures().join("tptt-openelm");
    for (variant, kv) in [
        ("delta_rule", "f32"),
        ("delta_product", "f16"),
        ("gated_delta_product", "f32"),
    ] {
        let run = |extra: &[&str]| {
            let mut args = vec!["--kv", kv];
            args.extend_from_slice(extra);
            generate_ids_in(&repo, variant, &args)
        };
        let whole = run(&["--prompt", "hello world", "--max-new-tokens", "12"]);
        assert_eq!(whole.len(), 12, "{variant}");
        let state = scratch.path(&format!("openelm-{variant}.tptt-state"));
        let state = state.to_str().expect("utf-8 path");
        let first = run(&[
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "5",
            "--save-state",
            state,
        ]);
        let second = run(&["--load-state", state, "--max-new-tokens", "7"]);
        assert_eq!(
            [first, second].concat(),
            whole,
            "openelm {variant} ({kv}): 5 + 7 through a state file differs from 12 in one run"
        );
    }

    let base = fixtures().join("openelm-base");
    let out_dir = scratch.path("openelm-injected");
    let (base, out_dir) = (
        base.to_str().expect("utf-8 path"),
        out_dir.to_str().expect("utf-8 path"),
    );
    let out = tptt(&[
        "inject",
        base,
        "--out",
        out_dir,
        "--modes",
        "delta_product",
        "--mag-weight",
        "0.25",
    ]);
    assert!(out.status.success(), "inject: {}", text(&out.stderr));
    let out = tptt(&["inspect", out_dir]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "inspect: {}", text(&out.stderr));
    assert!(
        stdout.contains("architecture: openelm (3 layers"),
        "{stdout}"
    );
    assert!(
        stdout.contains("per layer: heads/kv 2/1 4/2 4/2 · ffn 32 144 256"),
        "{stdout}"
    );
    let ids = generate_ids_in(
        Path::new(out_dir),
        "delta_product_mag0.25",
        &["--prompt", "hello", "--max-new-tokens", "6"],
    );
    assert_eq!(ids.len(), 6);
}

/// Assert a clean failure: non-zero exit, an `error:` line containing `needle`, no panic.
fn assert_refused(out: &Output, needle: &str, what: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{what}: succeeded\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}: panicked\n{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{what}: no `error:` line\n{stderr}"));
    assert!(
        stderr.contains(needle),
        "{what}: {needle:?} not in the error\n{line}\n{stderr}"
    );
}

/// `--kv`: a format the model's heads cannot hold (8-bit blocks of 32 on heads of 16) is
/// refused with the reason before anything is generated; an unknown name lists the choices;
/// `auto` picks what the model can use.
#[test]
fn kv_formats_the_model_cannot_use_are_refused() {
    let llama = fixtures().join("tptt-llama");
    let llama = llama.to_str().expect("utf-8 path");
    let run = |kv: &str| {
        tptt(&[
            "generate",
            llama,
            "--variant",
            "delta_rule",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "3",
            "--kv",
            kv,
        ])
    };
    assert_refused(&run("q8_0"), "blocks of 32", "q8_0 on heads of 16");
    assert_refused(&run("q4"), "auto, q8_0, f16, f32", "unknown format");
    for kv in ["auto", "f16", "f32"] {
        let out = run(kv);
        assert!(out.status.success(), "--kv {kv}: {}", text(&out.stderr));
    }
}

#[test]
fn bad_state_files_are_refused_cleanly() {
    let scratch = Scratch::new();
    let llama = fixtures().join("tptt-llama");
    let llama = llama.to_str().expect("utf-8 path");
    let load = |variant: &str, file: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            llama,
            "--variant",
            variant,
            "--greedy",
            "--load-state",
            file.to_str().expect("utf-8 path"),
            "--max-new-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        tptt(&args)
    };

    let missing = scratch.path("missing.tptt-state");
    assert_refused(
        &load("delta_rule", &missing, &[]),
        "missing.tptt-state",
        "missing file",
    );
    let weights = fixtures().join("llama-base/model.safetensors");
    assert_refused(
        &load("delta_rule", &weights, &[]),
        "not a TPTT Chat state snapshot",
        "weights file as a state",
    );
    let json = fixtures().join("llama-base/config.json");
    assert_refused(
        &load("delta_rule", &json, &[]),
        "not a valid snapshot file",
        "JSON file as a state",
    );

    // A good snapshot, then restored where it does not belong or damaged.
    let good = scratch.path("good.tptt-state");
    generate_ids(
        "delta_rule",
        &[
            "--prompt",
            "hello world",
            "--max-new-tokens",
            "4",
            "--save-state",
            good.to_str().expect("utf-8 path"),
        ],
    );
    assert_refused(
        &load("delta_product", &good, &[]),
        "variant",
        "another variant",
    );
    assert_refused(
        &load("delta_rule", &good, &["--mag-weight", "0.25"]),
        "configuration",
        "another mag_weight",
    );
    let bytes = std::fs::read(&good).expect("snapshot");
    let mut flipped = bytes.clone();
    let at = bytes.len() - 40;
    flipped[at] ^= 0xff;
    let bad = scratch.path("flipped.tptt-state");
    std::fs::write(&bad, &flipped).expect("write");
    assert_refused(&load("delta_rule", &bad, &[]), "corrupt", "flipped byte");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).expect("write");
    assert_refused(
        &load("delta_rule", &bad, &[]),
        "not a valid snapshot file",
        "truncated",
    );
    // The intact snapshot still loads.
    let out = load("delta_rule", &good, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn injected_smollm2_with_tptt_off_answers_paris() {
    let Some(dir) = std::env::var_os("TPTT_SMOLLM2_DIR").map(PathBuf::from) else {
        eprintln!("TPTT_SMOLLM2_DIR is not set: skipping the real-model test (run scripts/smollm2/fetch.sh)");
        return;
    };
    let scratch = Scratch::new();
    let repo = scratch.path("smollm2-tptt");
    let (dir, repo) = (
        dir.to_str().expect("utf-8 path"),
        repo.to_str().expect("utf-8 path"),
    );
    let out = tptt(&[
        "inject",
        dir,
        "--out",
        repo,
        "--modes",
        "delta_rule",
        "--mag-weight",
        "0",
    ]);
    assert!(
        out.status.success(),
        "inject failed:\n{}",
        text(&out.stderr)
    );
    let out = tptt(&[
        "generate",
        repo,
        "--chat",
        "--greedy",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "generate failed:\n{stderr}");
    assert!(
        stdout.contains("Paris"),
        "answer without Paris: {stdout:?}\n{stderr}"
    );
}
