//! `tptt eval` end to end on a tiny fixture: the JSON report (three configurations, buckets
//! covering every scored token, probes at window + distance), and bad input answered with an
//! `error:` line and exit status 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn tptt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tptt"))
        .args(args)
        .output()
        .expect("run the tptt binary")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tptt-cli-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

fn long_text() -> String {
    let words = [
        "the", "memory", "of", "a", "model", "reads", "every", "token", "and", "keeps", "what",
        "matters", "for", "later",
    ];
    (0..900)
        .map(|i| words[(i * 7 + i / 5) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_json_report_covers_every_token_in_three_configurations() {
    let dir = scratch("json");
    let text = dir.join("text.txt");
    std::fs::write(&text, long_text()).expect("write text");
    let repo = fixtures().join("tptt-llama");
    let out = tptt(&[
        "eval",
        repo.to_str().expect("utf-8"),
        "--variant",
        "delta_product",
        "--text",
        text.to_str().expect("utf-8"),
        "--window",
        "32",
        "--buckets",
        "64,256",
        "--probe-distances",
        "8,40",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tptt eval failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let tokens = v["texts"][0]["tokens"].as_u64().expect("token count") as usize;
    assert!(tokens > 300, "{tokens} tokens");
    for (name, window) in [
        ("tptt", Some(32)),
        ("no_memory", Some(32)),
        ("full_attention", None),
    ] {
        let c = &v["configs"][name];
        assert_eq!(c["window"].as_u64().map(|w| w as usize), window, "{name}");
        let buckets = c["buckets"].as_array().expect("buckets");
        // Bounds 0, 64, 256 plus… nothing: positions past 256 fall outside the given bounds.
        assert_eq!(
            buckets
                .iter()
                .map(|b| b["start"].as_u64().expect("start"))
                .collect::<Vec<_>>(),
            vec![0, 64]
        );
        let counted: u64 = buckets
            .iter()
            .map(|b| b["tokens"].as_u64().expect("n"))
            .sum();
        assert_eq!(counted, 255, "{name}: positions 1..256 are scored");
        for b in buckets {
            let p = b["perplexity"].as_f64().expect("perplexity");
            assert!(p.is_finite() && p >= 1.0, "{name}: perplexity {p}");
        }
        let probes = c["probes"].as_array().expect("probes");
        assert_eq!(probes.len(), 4 * 2, "{name}: four probes at two distances");
        let distances: Vec<u64> = probes
            .iter()
            .map(|p| p["distance"].as_u64().expect("distance"))
            .collect();
        assert_eq!(&distances[..2], &[40, 72], "{name}: window + distance");
    }
    // --configs runs only those named.
    let only = tptt(&[
        "eval",
        repo.to_str().expect("utf-8"),
        "--variant",
        "delta_product",
        "--text",
        text.to_str().expect("utf-8"),
        "--window",
        "32",
        "--buckets",
        "64,256",
        "--no-probes",
        "--configs",
        "tptt",
        "--json",
    ]);
    assert!(
        only.status.success(),
        "{}",
        String::from_utf8_lossy(&only.stderr)
    );
    let o: serde_json::Value = serde_json::from_slice(&only.stdout).expect("JSON");
    let names: Vec<&String> = o["configs"].as_object().expect("configs").keys().collect();
    assert_eq!(names, ["tptt"]);
    assert_eq!(
        o["configs"]["tptt"]["buckets"],
        v["configs"]["tptt"]["buckets"]
    );
    // The variant's memory is on, the other two have it off.
    assert_eq!(v["configs"]["tptt"]["mag_weight"].as_f64(), Some(0.5));
    assert_eq!(v["configs"]["no_memory"]["mag_weight"].as_f64(), Some(0.0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = scratch("bad");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").expect("write");
    let binary = dir.join("binary.bin");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80]).expect("write");
    let text = dir.join("text.txt");
    std::fs::write(&text, long_text()).expect("write");
    let repo = fixtures().join("tptt-llama");
    let repo = repo.to_str().expect("utf-8");
    let (t, e, b) = (
        text.to_str().expect("utf-8"),
        empty.to_str().expect("utf-8"),
        binary.to_str().expect("utf-8"),
    );
    let cases: [(&[&str], &str); 8] = [
        (
            &["--text", t, "--probe-distances", "99999999999"],
            "--probe-distances",
        ),
        (&["--text", t, "--configs", "tptt,bogus"], "--configs"),
        (&["--text", e], "at least 2"),
        (&["--text", b], "not UTF-8"),
        (&["--text", "/nonexistent/text.txt"], "reading"),
        (&["--text", t, "--window", "0"], "--window"),
        (&["--text", t, "--buckets", "512,256"], "must increase"),
        (&["--text", t, "--max-tokens", "0"], "--max-tokens"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["eval", repo, "--variant", "delta_rule"];
        args.extend_from_slice(extra);
        let out = tptt(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // 2: refused by the argument parser (a usage error), 1: refused by the command.
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{extra:?}: status {:?}: {stderr}",
            out.status.code()
        );
        assert!(
            stderr.contains("error:") && stderr.contains(want),
            "{extra:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
