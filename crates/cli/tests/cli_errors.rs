//! The `tptt` binary on broken input: a non-zero exit, one `error: …` on stderr that names the
//! problem, never a panic; and one successful `tptt logits` checked against the reference.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// A scratch folder, deleted on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tptt-cli-errors-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("fixture folder") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// `<scratch>/tptt-llama/<variants>` and `<scratch>/llama-base`; returns the repo folder.
fn llama_copy(scratch: &Scratch, variants: &[&str]) -> PathBuf {
    let repo = scratch.0.join("tptt-llama");
    for v in variants {
        copy_dir(&fixtures().join("tptt-llama").join(v), &repo.join(v));
    }
    copy_dir(
        &fixtures().join("llama-base"),
        &scratch.0.join("llama-base"),
    );
    repo
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(v.as_object_mut().expect("object"));
    std::fs::write(path, serde_json::to_string_pretty(&v).expect("serialize")).expect("write");
}

fn tptt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tptt"))
        .args(args)
        .output()
        .expect("run the tptt binary")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The run failed cleanly: non-zero status, `error:` on stderr naming every word, no panic.
fn check_fails(out: Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "the binary panicked:\n{stderr}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "exit status 101 is a panic:\n{stderr}"
    );
    assert!(
        stderr.contains("error:"),
        "no `error:` on stderr:\n{stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "stderr does not name {w:?}:\n{stderr}");
    }
}

#[test]
fn variant_that_does_not_exist() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule", "delta_product"]);
    let out = sc.0.join("out.safetensors");
    check_fails(
        tptt(&[
            "logits",
            s(&repo),
            "--variant",
            "delta_rule_turbo",
            "--ids",
            "1,2",
            "--out",
            s(&out),
        ]),
        &["delta_rule_turbo", "delta_product"],
    );
    check_fails(
        tptt(&["inspect", s(&repo), "--variant", "delta_rule_turbo"]),
        &["delta_rule_turbo"],
    );
}

#[test]
fn repo_that_does_not_exist() {
    let sc = Scratch::new();
    let missing = sc.0.join("no-such-repo");
    check_fails(
        tptt(&[
            "generate",
            s(&missing),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]),
        &["no-such-repo"],
    );
    check_fails(tptt(&["inspect", s(&missing)]), &["no-such-repo"]);
}

#[test]
fn token_id_outside_the_vocabulary() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule"]);
    let out = sc.0.join("out.safetensors");
    check_fails(
        tptt(&["logits", s(&repo), "--ids", "1,300,2", "--out", s(&out)]),
        &["token id 300", "vocabulary"],
    );
    assert!(!out.exists(), "no output file on failure");
}

#[test]
fn empty_id_list() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule"]);
    let out = sc.0.join("out.safetensors");
    check_fails(
        tptt(&["logits", s(&repo), "--ids", "", "--out", s(&out)]),
        &["no tokens"],
    );
}

#[test]
fn id_that_is_not_a_number() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule"]);
    let out = sc.0.join("out.safetensors");
    check_fails(
        tptt(&["logits", s(&repo), "--ids", "1,two,3", "--out", s(&out)]),
        &["two"],
    );
}

#[test]
fn truncated_adapter() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule"]);
    let adapter = repo.join("delta_rule/adapter_model.safetensors");
    let bytes = std::fs::read(&adapter).expect("read");
    std::fs::write(&adapter, &bytes[..bytes.len() / 2]).expect("write");
    let out = sc.0.join("out.safetensors");
    check_fails(
        tptt(&["logits", s(&repo), "--ids", "1,2", "--out", s(&out)]),
        &["adapter_model.safetensors", "truncated"],
    );
}

#[test]
fn bidirectional_config() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule"]);
    edit_json(&repo.join("delta_rule/config.json"), |m| {
        m.insert("bidirectional".into(), Value::Bool(true));
    });
    check_fails(
        tptt(&[
            "generate",
            s(&repo),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        ]),
        &["bidirectional", "config.json"],
    );
}

#[test]
fn inspect_reports_a_broken_variant() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule", "delta_product"]);
    edit_json(&repo.join("delta_product/config.json"), |m| {
        m.insert(
            "operator_mode".into(),
            Value::String("delta_rule_turbo".into()),
        );
    });
    let out = tptt(&["inspect", s(&repo)]);
    // The healthy variant is still described; the broken one makes the run fail.
    assert!(String::from_utf8_lossy(&out.stdout).contains("[delta_rule]"));
    check_fails(out, &["delta_product", "delta_rule_turbo"]);
}

#[test]
fn inject_with_unknown_operator_mode() {
    let sc = Scratch::new();
    let out = sc.0.join("injected");
    check_fails(
        tptt(&[
            "inject",
            s(&fixtures().join("llama-base")),
            "--out",
            s(&out),
            "--modes",
            "delta_rule_turbo",
        ]),
        &["unknown operator_mode", "delta_rule_turbo"],
    );
}

#[test]
fn bad_override_values() {
    let sc = Scratch::new();
    let repo = llama_copy(&sc, &["delta_rule"]);
    let out = sc.0.join("out.safetensors");
    check_fails(
        tptt(&[
            "logits",
            s(&repo),
            "--ids",
            "1,2",
            "--out",
            s(&out),
            "--max-chunk-size",
            "0",
        ]),
        &["max_chunk_size"],
    );
    check_fails(
        tptt(&[
            "logits",
            s(&repo),
            "--ids",
            "1,2",
            "--out",
            s(&out),
            "--mag-weight",
            "NaN",
        ]),
        &["mag-weight", "NaN"],
    );
}

#[test]
fn logits_match_the_reference() {
    let case = candle_core::safetensors::load(
        fixtures().join("cases/llama__delta_rule.safetensors"),
        &Device::Cpu,
    )
    .expect("case file");
    let ids: Vec<i64> = case["fwd.L7.ids"].to_vec1().expect("i64 ids");
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    let sc = Scratch::new();
    let out = sc.0.join("logits.safetensors");
    let run = tptt(&[
        "logits",
        s(&fixtures().join("tptt-llama")),
        "--variant",
        "delta_rule",
        "--ids",
        &ids.join(","),
        "--out",
        s(&out),
    ]);
    assert!(
        run.status.success(),
        "tptt logits failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let got = candle_core::safetensors::load(&out, &Device::Cpu).expect("output file");
    let got = &got["logits"];
    assert_eq!(got.dtype(), DType::F32);
    assert_eq!(got.dims(), &[ids.len(), 300]);
    let want = &case["fwd.L7.logits"];
    let max = (got - want)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert!(max <= 1e-4, "max |Δlogit| {max:e} > 1e-4");
}
