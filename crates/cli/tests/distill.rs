//! `tptt distill` on bad input: an `error:` line and exit status 1 within seconds, never a
//! panic, and no variant folder left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/llama-base")
}

#[test]
fn hostile_settings_and_texts_are_refused() {
    let dir = std::env::temp_dir().join(format!("tptt-cli-distill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    let short = dir.join("short.txt");
    std::fs::write(&short, "a few words only").expect("write");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "   \n").expect("write");
    let long = dir.join("long.txt");
    std::fs::write(&long, "the memory reads every token. ".repeat(200)).expect("write");
    let out = dir.join("repo");
    let (s, e, l) = (
        short.to_str().expect("utf-8"),
        empty.to_str().expect("utf-8"),
        long.to_str().expect("utf-8"),
    );
    let cases: [(&[&str], &str); 12] = [
        (&["--text", l, "--steps", "0"], "--steps"),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "18446744073709551615",
                "--window",
                "8",
            ],
            "lower --seq-len",
        ),
        (
            &["--text", l, "--seq-len", "64", "--window", "64"],
            "shorter",
        ),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "64",
                "--window",
                "8",
                "--lora-rank",
                "100000",
            ],
            "rank",
        ),
        (&["--text", s, "--seq-len", "64", "--window", "8"], "tokens"),
        (&["--text", e], "empty"),
        (&["--text", l, "--mag-weight", "0"], "--mag-weight"),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "64",
                "--window",
                "8",
                "--episode-len",
                "0",
            ],
            "multiple",
        ),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "64",
                "--window",
                "8",
                "--episode-len",
                "100",
            ],
            "multiple",
        ),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "64",
                "--window",
                "8",
                "--episode-len",
                "18446744073709551552",
            ],
            "--episode-len",
        ),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "64",
                "--window",
                "8",
                "--episode-len",
                "64000",
            ],
            "--episode-len",
        ),
        (
            &[
                "--text",
                l,
                "--seq-len",
                "64",
                "--window",
                "8",
                "--init",
                "/nonexistent/v",
            ],
            "adapter",
        ),
    ];
    let base = base();
    for (extra, want) in cases {
        let mut args = vec![
            "distill",
            base.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_tptt"))
            .args(&args)
            .output()
            .expect("run tptt");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("error:") && stderr.contains(want),
            "{extra:?}: {stderr}"
        );
    }
    let variants: Vec<_> = std::fs::read_dir(&out)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name() != ".distill")
                .collect()
        })
        .unwrap_or_default();
    assert!(variants.is_empty(), "no variant folder may be written");
    let _ = std::fs::remove_dir_all(&dir);
}
