//! `--window` on every subcommand that takes it (generate, chat, eval, bench, distill): 0 and
//! absurd values are refused by the argument parser with a message naming `--window` and the
//! bound, never a panic (`tptt generate … --window 0` divided by zero in the KV ring and exited
//! with status 101). A window inside the bound still runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/tptt-llama")
}

fn tptt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tptt"))
        .args(args)
        .output()
        .expect("run the tptt binary")
}

/// `args` followed by `--window <w>` for each bad `w`: a clean refusal naming the flag.
fn refused(args: &[&str]) {
    let too_big = (tptt::state::MAX_WINDOW + 1).to_string();
    for w in ["0", too_big.as_str(), "-3", "many"] {
        let flag = format!("--window={w}");
        let mut all = args.to_vec();
        all.push(&flag);
        let out = tptt(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let what = format!("{} --window {w}", args[0]);
        assert!(!stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: usage error expected:\n{stderr}"
        );
        assert!(
            stderr.contains("error:") && stderr.contains("--window"),
            "{what}: the message does not name --window:\n{stderr}"
        );
        if w == "0" || w == too_big {
            assert!(
                stderr.contains(&tptt::state::MAX_WINDOW.to_string()),
                "{what}: the message does not give the bound:\n{stderr}"
            );
        }
    }
}

#[test]
fn zero_and_absurd_windows_are_refused_by_every_subcommand() {
    let repo = repo();
    let repo = repo.to_str().expect("utf-8 path");
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let text = text.to_str().expect("utf-8 path");
    let common = ["--variant", "delta_rule"];
    refused(&[&["generate", repo][..], &common, &["--prompt", "hi"]].concat());
    refused(&[&["chat", repo][..], &common].concat());
    refused(&[&["eval", repo][..], &common, &["--text", text]].concat());
    refused(&["bench", repo, "--variant", "delta_rule", "--quick"]);
    refused(&["distill", repo, "--text", text, "--out", "/nonexistent/out"]);
}

#[test]
fn a_window_inside_the_bound_still_generates() {
    let repo = repo();
    let out = tptt(&[
        "generate",
        repo.to_str().expect("utf-8 path"),
        "--variant",
        "delta_rule",
        "--prompt",
        "hi",
        "--window",
        "2",
        "--max-new-tokens",
        "4",
        "--greedy",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
