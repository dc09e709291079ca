//! The fused CPU decode step (`model/step.rs`) against the tensor path it replaces: every
//! fixture repo and variant (Llama, Qwen2, Gemma-3 with local layers, OLMo, OLMoE, every
//! operator mode, cross gate, base_scale_attn), two prompts (the fused side runs them through the
//! in-place prefill attention), then single-token steps, with a small window (ring wrap-around,
//! layer windows) and without one, the KV cache in f32 and in f16 (both sides then read the
//! same rounded keys and values). Logits and states must agree.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt::repo::TpttRepo;
use tptt::state::KvFormat;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn variants() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for index in ["index.json", "index_arch.json"] {
        let text = std::fs::read_to_string(fixtures().join("cases").join(index))
            .expect("fixture index is committed");
        let cases: Vec<Value> = serde_json::from_str(&text).expect("index is valid JSON");
        for c in cases {
            if c["status"].as_str().is_some_and(|s| s != "tptt") {
                continue;
            }
            if let (Some(r), Some(v)) = (c["repo"].as_str(), c["variant"].as_str()) {
                out.insert((r.to_string(), v.to_string()));
            }
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

#[test]
fn fused_step_matches_the_tensor_path_on_every_fixture() {
    let all = variants();
    assert!(
        all.len() >= 30,
        "expected the whole fixture set, found {}",
        all.len()
    );
    let mut worst = 0f32;
    for (repo, variant) in &all {
        let files = TpttRepo::open(fixtures().join(repo))
            .expect("open repo")
            .variant(Some(variant), None)
            .expect("variant");
        let fused = Model::load(&files, &LoadOptions::default()).expect("load");
        let mut tensor = fused.clone();
        tensor.set_fused_step(false);
        let vocab = fused.config().base.vocab_size as u32;
        for (window, kv) in [
            (Some(5), KvFormat::F32),
            (None, KvFormat::F32),
            (Some(5), KvFormat::F16),
        ] {
            let mut sf = fused.new_state(CarryMode::Continue, window);
            let mut st = tensor.new_state(CarryMode::Continue, window);
            sf.kv_format = kv;
            st.kv_format = kv;
            // In f16 the two sides' keys, which differ in the last f32 bits (their summation
            // orders differ), can round to neighbouring halves (2⁻¹¹ apart): a few cached
            // values then differ by one f16 step, and the logits after them by up to ~1e-4.
            let tol = match kv {
                KvFormat::F32 => 2e-5,
                KvFormat::F16 => 3e-4,
            };
            let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 11) % vocab).collect();
            // Prompts go through the in-place prefill attention (`kernels::prefill`) on the
            // fused side: the first one, and a second one on top of a (wrapped) ring.
            let all = |m: &Model, st: &mut tptt::state::State, ids: &[u32]| {
                m.forward(ids, st, Logits::All)
                    .expect("prompt")
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("f32")
            };
            let d = max_diff(
                &all(&fused, &mut sf, &prompt),
                &all(&tensor, &mut st, &prompt),
            );
            assert!(
                d < tol,
                "{repo}/{variant} window {window:?} {kv:?}: prompt logits, max rel diff {d}"
            );
            worst = worst.max(d);
            let more: Vec<u32> = prompt.iter().rev().map(|&i| (i * 7 + 3) % vocab).collect();
            let d = max_diff(&all(&fused, &mut sf, &more), &all(&tensor, &mut st, &more));
            assert!(
                d < tol,
                "{repo}/{variant} window {window:?} {kv:?}: second prompt logits, max rel diff {d}"
            );
            worst = worst.max(d);
            for step in 0..12u32 {
                let id = (step * 53 + 7) % vocab;
                let a = fused
                    .forward(&[id], &mut sf, Logits::Last)
                    .expect("fused")
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("f32");
                let b = tensor
                    .forward(&[id], &mut st, Logits::Last)
                    .expect("tensor")
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("f32");
                let d = max_diff(&a, &b);
                worst = worst.max(d);
                assert!(
                    d < tol,
                    "{repo}/{variant} window {window:?} {kv:?} step {step}: max rel diff {d}"
                );
            }
            assert_eq!(sf.pos, st.pos);
            assert_eq!(sf.key_pos, st.key_pos, "{repo}/{variant}: ring positions");
            for (lf, lt) in sf.layers.iter().zip(&st.layers) {
                let (h, d) = (fused.config().base.num_heads, fused.config().base.head_dim);
                assert!(
                    max_diff(&lf.linear.head_states(h, d), &lt.linear.head_states(h, d)) < 1e-5,
                    "{repo}/{variant}: recurrent state"
                );
            }
        }
    }
    eprintln!(
        "fused step vs tensor path: {} variants, worst relative diff {worst:.2e}",
        all.len()
    );
}
