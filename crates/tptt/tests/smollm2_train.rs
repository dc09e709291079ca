//! The training path at a real model's size: SmolLM2-135M-Instruct with the shipped demo's
//! LoRA (`assets/demo-memory/`), on real text (Debian's GPL-3). The differentiable forward
//! (`Distiller::student_logits`, and an episode read in two segments with its carry) gives the
//! inference path's logits for the same variant, with the linear branch's chunks of 64 tokens
//! (128 virtual rows) that training uses — the size where the f32 error of the in-chunk
//! inverse would show.
//!
//! Needs `TPTT_SMOLLM2_DIR` (CI sets it); without it the test says so and passes.

use std::path::PathBuf;

use candle_core::Tensor;
use tptt::config::TpttSettings;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt::repo::TpttRepo;
use tptt::train::distill::{DistillConfig, Distiller};

const VARIANT: &str = "delta_product_c_mag0.125_w512";

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_training_path_gives_the_demo_variants_logits() {
    let Some(dir) = std::env::var_os("TPTT_SMOLLM2_DIR").map(PathBuf::from) else {
        eprintln!("TPTT_SMOLLM2_DIR is not set: skipping the real-model training test");
        return;
    };
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3 text");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tok");
    let ids: Vec<u32> = tokenizer
        .encode(text.as_str(), false)
        .expect("encode")
        .get_ids()
        .to_vec();
    let (window, seg) = (64, 128);
    let toks = &ids[..2 * seg];
    // The student: the base with the demo's settings and its LoRA.
    let settings = TpttSettings::injected("delta_product_c", 0.125, "smollm2").expect("settings");
    let student = Model::load_plain(&dir, settings, &LoadOptions::default()).expect("base");
    let cfg = DistillConfig {
        window,
        seq_len: seg,
        episode_len: 2 * seg,
        rank: 8,
        alpha: 16.0,
        lr: 1e-3,
        warmup: 1,
        clip: 1.0,
        seed: 1,
    };
    let mut d = Distiller::new(student, cfg, ids.clone()).expect("distiller");
    let assets = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo-memory");
    d.init_from_adapter(&assets.join(VARIANT).join("adapter_model.safetensors"))
        .expect("demo adapter");
    // Inference: the demo variant on this base.
    let files = TpttRepo::open(&assets)
        .and_then(|r| r.variant(Some(VARIANT), Some(&dir)))
        .expect("demo variant");
    let m = Model::load(&files, &LoadOptions::default()).expect("load demo");
    let mut one = m.new_state(CarryMode::Continue, Some(window));
    let want = m.forward(toks, &mut one, Logits::All).expect("one read");
    let got = d.student_logits(toks).expect("student");
    let diff = max_diff(&want, &got);
    eprintln!("one read of {}: max |Δlogit| {diff}", toks.len());
    assert!(
        diff < 1e-3,
        "training vs inference, one read: max |Δlogit| {diff}"
    );
    let mut st = m.new_state(CarryMode::Continue, Some(window));
    let parts: Vec<Tensor> = toks
        .chunks(seg)
        .map(|s| m.forward(s, &mut st, Logits::All).expect("segment"))
        .collect();
    let want = Tensor::cat(&parts, 0).expect("cat");
    let got = d.episode_logits(toks, seg).expect("episode");
    let diff = max_diff(&want, &got);
    eprintln!("two segments of {seg}: max |Δlogit| {diff}");
    assert!(
        diff < 1e-3,
        "training vs inference, segments: max |Δlogit| {diff}"
    );
}
