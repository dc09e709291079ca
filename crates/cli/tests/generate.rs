//! `tptt generate` end to end: greedy ids of one run equal those of a run split by
//! `--save-state` / `--load-state` (for several operator modes); broken or foreign snapshots
//! are refused with an `error:` line and a non-zero exit, never a panic; and, with
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
    let llama = fixtures().join("tptt-llama");
    let mut args = vec![
        "generate",
        llama.to_str().expect("utf-8 path"),
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
