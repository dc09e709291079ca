//! The compact KV caches on the real SmolLM2-135M-Instruct (`TPTT_SMOLLM2_DIR`): perplexity of a
//! long real text (Debian's GPL-3) with the keys and values stored in f16, and in 8-bit blocks
//! (q8_0, the app's default), stays within 0.5 % of the f32 cache's, with the ring wrapped
//! several times (window 512 over 2560 tokens), for the base attention alone (TPTT off) and with
//! the TPTT branch of the offline demo's settings (delta_product, mag 0.125). And greedy
//! generation through a `Session` with a compact cache reads and answers without error, its
//! state half (f16) or 34/128 (q8_0) of the f32 KV bytes.
//!
//! Decoding one token at a time reads the cache through the decode kernels, which differ from
//! the prompt's (on AVX-512 VNNI CPUs an 8-bit cache is read with integer products: the query
//! and the softmax weights rounded to 8 bits); the perplexity of that path with an 8-bit cache
//! stays within 0.5 % of the f32 cache's as well.
//!
//! Without `TPTT_SMOLLM2_DIR` the tests say so and pass (the model cannot be committed).

use std::path::PathBuf;
use std::sync::Arc;

use tokenizers::Tokenizer;
use tptt::config::TpttSettings;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt_engine::eval::score_text;
use tptt_engine::{
    CancelToken, GenerateOptions, KvFormat, SamplingParams, Session, SessionOptions,
};

const TEXT: &str = "/usr/share/common-licenses/GPL-3";
const TOKENS: usize = 2560;
const WINDOW: usize = 512;

fn model_dir() -> Option<PathBuf> {
    match std::env::var_os("TPTT_SMOLLM2_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None => {
            eprintln!("TPTT_SMOLLM2_DIR is not set: skipping the real-model test (run scripts/smollm2/fetch.sh)");
            None
        }
    }
}

fn load(dir: &std::path::Path, mode: &str, mag: f32) -> Model {
    let settings = TpttSettings::injected(mode, mag, &dir.display().to_string()).expect("settings");
    Model::load_plain(dir, settings, &LoadOptions::default()).expect("load SmolLM2")
}

fn perplexity(model: &Model, ids: &[u32], kv: KvFormat) -> f64 {
    let nll = score_text(model, ids, Some(WINDOW), kv, None, &mut |_| {})
        .expect("scored")
        .expect("not cancelled");
    (nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64).exp()
}

#[test]
fn compact_caches_change_perplexity_by_under_half_a_percent() {
    let Some(dir) = model_dir() else { return };
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let text = std::fs::read_to_string(TEXT).expect("Debian's GPL-3 text (base-files)");
    let ids: Vec<u32> = tok.encode(text, false).expect("tokenize").get_ids()[..TOKENS].to_vec();
    for (mode, mag) in [("delta_rule", 0.0), ("delta_product", 0.125)] {
        let model = load(&dir, mode, mag);
        let exact = perplexity(&model, &ids, KvFormat::F32);
        for kv in [KvFormat::F16, KvFormat::Q8_0] {
            let compact = perplexity(&model, &ids, kv);
            let change = compact / exact - 1.0;
            eprintln!(
                "{mode} mag {mag}: perplexity f32 KV {exact:.4}, {} KV {compact:.4} ({:+.4} %)",
                kv.as_str(),
                100.0 * change
            );
            assert!(
                change.abs() <= 0.005,
                "{mode} mag {mag}: {} KV moved perplexity by {:.3} % ({exact} → {compact})",
                kv.as_str(),
                100.0 * change
            );
        }
    }
}

/// Perplexity of `ids` fed one token at a time (the fused decode step and its attention
/// kernels), the ring wrapped past the window.
fn perplexity_by_steps(model: &Model, ids: &[u32], kv: KvFormat) -> f64 {
    let mut state = model.new_state(CarryMode::Continue, Some(WINDOW));
    state.kv_format = kv;
    let mut nll = 0f64;
    for (i, pair) in ids.windows(2).enumerate() {
        let row = model
            .forward(&pair[..1], &mut state, Logits::Last)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .unwrap_or_else(|e| panic!("step {i}: {e}"));
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max)
            + row
                .iter()
                .map(|&x| f64::from(x - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - f64::from(row[pair[1] as usize]);
    }
    (nll / (ids.len() - 1) as f64).exp()
}

/// The base attention alone (TPTT off): with the demo's untrained branch on, one-token steps
/// (the recurrent form, chunks of one) put the perplexity of this text in the thousands, where
/// any rounding moves it by percents (measured 2026-12-04: f32 → 8-bit cache +1.9 % with the
/// integer kernel, +3.3 % with the float one), so that regime says nothing about the cache.
#[test]
fn decoding_with_an_8bit_cache_changes_perplexity_by_under_half_a_percent() {
    let Some(dir) = model_dir() else { return };
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let text = std::fs::read_to_string(TEXT).expect("Debian's GPL-3 text (base-files)");
    // Twice the window: the second half reads a full, wrapped ring at every step.
    let ids: Vec<u32> = tok.encode(text, false).expect("tokenize").get_ids()[..2 * WINDOW].to_vec();
    let model = load(&dir, "delta_rule", 0.0);
    let exact = perplexity_by_steps(&model, &ids, KvFormat::F32);
    let eight = perplexity_by_steps(&model, &ids, KvFormat::Q8_0);
    let change = eight / exact - 1.0;
    eprintln!(
        "decode steps, TPTT off: perplexity f32 KV {exact:.4}, q8_0 KV {eight:.4} ({:+.4} %)",
        100.0 * change
    );
    assert!(
        change.abs() <= 0.005,
        "decoding with an 8-bit cache moved perplexity by {:.3} % ({exact} → {eight})",
        100.0 * change
    );
}

#[test]
fn sessions_with_compact_caches_answer_and_hold_fewer_kv_bytes() {
    let Some(dir) = model_dir() else { return };
    let model = Arc::new(load(&dir, "delta_product", 0.125));
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let prompt = tok
        .encode("The capital of France is", true)
        .expect("tokenize")
        .get_ids()
        .to_vec();
    let opts = GenerateOptions {
        params: SamplingParams {
            max_new_tokens: 8,
            ..SamplingParams::greedy()
        },
        eos_ids: Vec::new(),
        ignore_eos: true,
        stop_strings: Vec::new(),
        skip_special_tokens: true,
    };
    let mut answers = Vec::new();
    let mut sizes = Vec::new();
    for kv in [KvFormat::F32, KvFormat::F16, KvFormat::Q8_0] {
        let mut s = Session::new(
            model.clone(),
            SessionOptions {
                window: Some(WINDOW),
                kv_format: kv,
                ..Default::default()
            },
        );
        let out = s
            .generate(&prompt, &opts, &tok, &CancelToken::new(), &mut |_| {})
            .expect("generate");
        assert_eq!(out.ids.len(), 8);
        assert_eq!(s.state.kv_format, kv);
        let kv_bytes: usize = s
            .state
            .layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .map(|t| {
                t.as_ref()
                    .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
            })
            .sum();
        sizes.push(kv_bytes);
        answers.push(out.text);
    }
    assert_eq!(sizes[1] * 2, sizes[0], "f16 holds half the bytes");
    assert_eq!(
        sizes[2] * 128,
        sizes[0] * 34,
        "q8_0 holds 34 bytes per 32 values"
    );
    eprintln!(
        "greedy answers: f32 KV {:?}, f16 KV {:?}, q8_0 KV {:?}",
        answers[0], answers[1], answers[2]
    );
}
