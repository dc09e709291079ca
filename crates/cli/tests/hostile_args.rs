//! The `tptt` binary on hostile arguments: zero, huge, negative and non-numeric values, empty
//! strings, missing files, a folder where a file is expected and the reverse. Whatever it does
//! with them, it never exits with Rust's panic status 101 and never prints a panic: a refused
//! input is one `error: …` line (status 1, or 2 for clap's argument errors), and a panic that
//! slips through anyway is caught by the last-resort net (`internal error: …; … please report
//! it`, status 70).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// sysexits.h EX_SOFTWARE: the net's status (crates/cli/src/main.rs `EXIT_INTERNAL`).
const EXIT_INTERNAL: i32 = 70;

/// A scratch folder, deleted on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tptt-hostile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/tptt-llama")
}

fn tptt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tptt"));
    cmd.args(args)
        .stdin(Stdio::null())
        // The user's own RUST_BACKTRACE asks for Rust's report; the tests check the plain one.
        .env_remove("RUST_BACKTRACE")
        .env("RAYON_NUM_THREADS", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the tptt binary")
}

/// No panic status, no panic text; a failure says so in an `error:` line.
fn check_no_panic(args: &[&str], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert_ne!(code, Some(101), "{args:?} exited with a panic:\n{stderr}");
    assert!(code.is_some(), "{args:?} was killed by a signal:\n{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{args:?} printed a panic:\n{stderr}"
    );
    if !out.status.success() {
        assert!(
            stderr.contains("error:"),
            "{args:?} failed (status {code:?}) without an error line:\n{stderr}"
        );
    }
}

/// [`check_no_panic`], and not even through the net: the net is for bugs nobody knows of yet, a
/// known hostile input must get a real error.
fn check_clean_error(args: &[&str], out: &Output) {
    check_no_panic(args, out);
    assert_ne!(
        out.status.code(),
        Some(EXIT_INTERNAL),
        "{args:?} reached the panic net:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_net_turns_a_panic_into_one_line_and_status_70() {
    let out = tptt(&["inspect", "anything"], &[("TPTT_TEST_PANIC", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_INTERNAL), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert!(
        lines[0].starts_with("internal error: TPTT_TEST_PANIC is set"),
        "{stderr}"
    );
    assert!(lines[0].contains("please report it"), "{stderr}");
    assert!(
        lines[0].contains("main.rs"),
        "the line says where: {stderr}"
    );
    check_no_panic(&["TPTT_TEST_PANIC"], &out);
}

#[test]
fn hostile_generate_arguments_never_panic() {
    let scratch = Scratch::new("generate");
    let dir = scratch.path().display().to_string();
    let file = repo().join("delta_rule/config.json").display().to_string();
    let missing = scratch
        .path()
        .join("missing.safetensors")
        .display()
        .to_string();
    let repo = repo().display().to_string();
    let base = ["generate", repo.as_str(), "--variant", "delta_rule"];
    let cases: &[&[&str]] = &[
        &["--prompt", "hi", "--max-new-tokens", "0"],
        &["--prompt", "hi", "--max-new-tokens", "-1"],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "99999999999999999999999",
        ],
        &["--prompt", "hi", "--max-new-tokens", "two"],
        &["--prompt", "", "--max-new-tokens", "2"],
        &[
            "--prompt",
            "",
            "--chat",
            "--system",
            "",
            "--max-new-tokens",
            "2",
        ],
        &["--prompt", "hi", "--max-new-tokens", "2", "--stop", ""],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--temperature",
            "-1",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--temperature",
            "NaN",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--temperature",
            "inf",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--temperature",
            "1e38",
        ],
        &["--prompt", "hi", "--max-new-tokens", "2", "--top-p", "2"],
        &["--prompt", "hi", "--max-new-tokens", "2", "--top-p", "0"],
        &["--prompt", "hi", "--max-new-tokens", "2", "--min-p", "-1"],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--top-k",
            "18446744073709551615",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--repeat-penalty",
            "0",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--repeat-penalty",
            "-3",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--repeat-last-n",
            "18446744073709551615",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--seed",
            "18446744073709551615",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--mag-weight",
            "1e38",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--mag-weight",
            "NaN",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--max-chunk-size",
            "0",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--max-chunk-size",
            "18446744073709551615",
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--load-state",
            missing.as_str(),
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--load-state",
            dir.as_str(),
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--load-state",
            file.as_str(),
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--save-state",
            dir.as_str(),
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--base",
            missing.as_str(),
        ],
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--base",
            file.as_str(),
        ],
        // `--window 0` is refused by the argument parser (it divided by zero in the KV ring).
        &["--prompt", "hi", "--max-new-tokens", "2", "--window", "0"],
    ];
    for case in cases {
        let args: Vec<&str> = base.iter().chain(case.iter()).copied().collect();
        let out = tptt(&args, &[]);
        check_clean_error(&args, &out);
    }
}

#[test]
fn hostile_paths_and_commands_never_panic() {
    let scratch = Scratch::new("paths");
    let dir = scratch.path().display().to_string();
    let out_file = scratch.path().join("out.safetensors").display().to_string();
    let file = repo().join("delta_rule/config.json").display().to_string();
    let repo = repo().display().to_string();
    let cases: &[&[&str]] = &[
        &["generate", file.as_str(), "--prompt", "hi"],
        &["generate", dir.as_str(), "--prompt", "hi"],
        &["generate", "", "--prompt", "hi"],
        &[
            "generate",
            repo.as_str(),
            "--variant",
            "../../..",
            "--prompt",
            "hi",
        ],
        &["generate", repo.as_str(), "--variant", "", "--prompt", "hi"],
        &["inspect", file.as_str()],
        &["inspect", ""],
        &[
            "logits",
            repo.as_str(),
            "--variant",
            "delta_rule",
            "--ids",
            "4294967296",
            "--out",
            out_file.as_str(),
        ],
        &[
            "logits",
            repo.as_str(),
            "--variant",
            "delta_rule",
            "--ids",
            "-1",
            "--out",
            out_file.as_str(),
        ],
        &[
            "logits",
            repo.as_str(),
            "--variant",
            "delta_rule",
            "--ids",
            "1,2",
            "--out",
            dir.as_str(),
        ],
        &[
            "chat",
            repo.as_str(),
            "--variant",
            "delta_rule",
            "--max-new-tokens",
            "2",
        ],
        &["inject", file.as_str(), "--out", dir.as_str()],
        &[
            "inject",
            dir.as_str(),
            "--out",
            dir.as_str(),
            "--mag-weight",
            "NaN",
        ],
        &["no-such-command"],
    ];
    for args in cases {
        let out = tptt(args, &[]);
        check_clean_error(args, &out);
    }
}
