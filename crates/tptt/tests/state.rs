//! The per-conversation state: decoding with the KV ring buffer and carried linear state equals
//! one full forward under the same chunking, with and without a sliding window; clones and
//! snapshots of a state are independent of the original.

use std::path::{Path, PathBuf};

use candle_core::{IndexOp, Tensor};
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt::repo::TpttRepo;
use tptt::state::State;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn model(repo: &str, variant: &str) -> Model {
    let repo = TpttRepo::open(fixtures().join(repo)).expect("repo");
    let files = repo.variant(Some(variant), None).expect("variant");
    let mut m = Model::load(&files, &LoadOptions::default()).expect("load");
    m.set_max_chunk_size(1).expect("chunk 1");
    m
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37 + 11) % 290).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Full forward with window `w` (a per-query sliding mask) vs. the same tokens fed as a prompt
/// block then single steps (the ring buffer, written in place).
fn check_decode(repo: &str, variant: &str, window: Option<usize>, n: usize, prompt: usize) {
    let m = model(repo, variant);
    let toks = ids(n);
    let mut full_state = m.new_state(CarryMode::Continue, window);
    let full = m
        .forward(&toks, &mut full_state, Logits::All)
        .expect("full");
    let mut st = m.new_state(CarryMode::Continue, window);
    let first = m
        .forward(&toks[..prompt], &mut st, Logits::All)
        .expect("prompt");
    let mut worst = max_diff(&first, &full.narrow(0, 0, prompt).expect("rows"));
    for (t, &id) in toks.iter().enumerate().skip(prompt) {
        let l = m.forward(&[id], &mut st, Logits::Last).expect("step");
        worst = worst.max(max_diff(&l, &full.i(t..t + 1).expect("row")));
        if let Some(w) = window {
            assert!(st.kv_len() <= w, "kv_len {} > window {w}", st.kv_len());
        }
    }
    assert!(
        worst <= TOL,
        "{repo}/{variant} window {window:?}: max |Δ| {worst:e}"
    );
    assert_eq!(st.pos, n);
}

#[test]
fn decoding_equals_full_forward_with_and_without_window() {
    for (repo, variant) in [
        ("tptt-llama", "delta_product"),
        ("tptt-qwen2", "gated_delta_rule"),
        ("tptt-llama", "delta_rule_gelu"),
    ] {
        check_decode(repo, variant, None, 40, 5);
        check_decode(repo, variant, Some(16), 50, 3); // ring wraps several times
        check_decode(repo, variant, Some(16), 50, 30); // prompt longer than the window
    }
}

#[test]
fn clones_are_independent_of_the_original() {
    let m = model("tptt-llama", "delta_product");
    let toks = ids(30);
    let mut st = m.new_state(CarryMode::Continue, Some(8));
    m.forward(&toks[..20], &mut st, Logits::Last)
        .expect("prompt");
    let snapshot: State = st.try_clone().expect("copy");
    let a = m.forward(&toks[20..21], &mut st, Logits::Last).expect("a");
    for &t in &toks[21..] {
        m.forward(&[t], &mut st, Logits::Last)
            .expect("advance the original");
    }
    let mut again = snapshot.try_clone().expect("copy");
    let b = m
        .forward(&toks[20..21], &mut again, Logits::Last)
        .expect("b");
    assert_eq!(
        max_diff(&a, &b),
        0.0,
        "the clone was changed by the original's in-place KV writes"
    );
}

#[test]
fn state_round_trips_through_tensors() {
    let qwen = model("tptt-qwen2", "delta_product_c");
    for format in [tptt::state::KvFormat::F32, tptt::state::KvFormat::F16] {
        round_trip_through_tensors(&qwen, format);
    }
    // 8-bit blocks need heads of a multiple of 32 values: a synthetic Llama base has them.
    let dir = std::env::temp_dir().join(format!("tptt-state-q8-{}", std::process::id()));
    round_trip_through_tensors(&synthetic_d32(&dir, 3), tptt::state::KvFormat::Q8_0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A synthetic Llama repo with heads of 32 values (`tptt::synth`), its weights from `seed`,
/// written under `dir` and loaded.
fn synthetic_d32(dir: &Path, seed: u64) -> Model {
    let shape = tptt::synth::LlamaShape::SMALL_D32;
    let f32 = candle_core::DType::F32;
    tptt::synth::write_repo(dir, &shape, f32, seed, "dp", "delta_product", 0.5)
        .expect("synthetic repo");
    let files = TpttRepo::open(dir)
        .and_then(|r| r.variant(Some("dp"), None))
        .expect("variant");
    Model::load(&files, &LoadOptions::default()).expect("load")
}

/// Through [`State::to_tensors`] / [`State::from_tensors`] in the KV format `format`: the
/// tensors hold the cache as stored, the restored state keeps the format and continues with
/// the same bits.
fn round_trip_through_tensors(m: &Model, format: tptt::state::KvFormat) {
    let toks = ids(40);
    let mut st = m.new_state(CarryMode::Continue, Some(12));
    st.set_kv_format(format).expect("format");
    m.forward(&toks[..25], &mut st, Logits::Last)
        .expect("prompt");
    let tensors = st.to_tensors().expect("to tensors");
    let b = &m.config().base;
    let mut back = State::from_tensors(
        &tensors,
        b.num_layers,
        b.num_heads,
        b.head_dim,
        st.pos,
        st.mode,
        st.window,
        m.device(),
    )
    .expect("from tensors");
    assert_eq!(tensors["layers.0.k"].dtype(), format.dtype());
    assert_eq!(back.kv_format, format);
    for &t in &toks[25..] {
        let x = m.forward(&[t], &mut st, Logits::Last).expect("orig");
        let y = m.forward(&[t], &mut back, Logits::Last).expect("restored");
        assert_eq!(max_diff(&x, &y), 0.0);
    }
    assert!(State::from_tensors(
        &tensors,
        b.num_layers + 1,
        b.num_heads,
        b.head_dim,
        25,
        st.mode,
        st.window,
        m.device()
    )
    .is_err());
}

/// An 8-bit KV tensor whose rows are not whole 34-byte blocks, whose blocks hold another head
/// size, or whose scales are not finite, is refused with the reason, never read.
#[test]
fn hostile_8_bit_kv_tensors_are_refused() {
    use candle_core::DType;
    let dir = std::env::temp_dir().join(format!("tptt-state-q8-bad-{}", std::process::id()));
    let m = synthetic_d32(&dir, 5);
    let mut st = m.new_state(CarryMode::Continue, Some(16));
    st.set_kv_format(tptt::state::KvFormat::Q8_0).expect("q8_0");
    m.forward(&ids(10), &mut st, Logits::Last).expect("prompt");
    let tensors = st.to_tensors().expect("to tensors");
    let b = &m.config().base;
    let restore = |t: &std::collections::HashMap<String, Tensor>| {
        State::from_tensors(
            t,
            b.num_layers,
            b.num_heads,
            b.head_dim,
            st.pos,
            st.mode,
            st.window,
            m.device(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    restore(&tensors).expect("the state's own tensors restore");
    let keys = &tensors["layers.0.k"];
    let (h, n, width) = keys.dims3().expect("3-d");
    assert_eq!(width, 34, "one block per head of 32");
    let with = |k: Tensor| {
        let mut t = tensors.clone();
        t.insert("layers.0.k".into(), k);
        restore(&t).expect_err("refused")
    };
    let device = candle_core::Device::Cpu;
    let cut = with(Tensor::zeros((h, n, 33), DType::U8, &device).expect("zeros"));
    assert!(cut.contains("whole blocks"), "{cut}");
    let wide = with(Tensor::zeros((h, n, 68), DType::U8, &device).expect("zeros"));
    assert!(wide.contains("do not match"), "{wide}");
    let mut bytes: Vec<u8> = keys.flatten_all().and_then(|t| t.to_vec1()).expect("bytes");
    bytes[34..36].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let nan = with(Tensor::from_vec(bytes, (h, n, width), &device).expect("tensor"));
    assert!(nan.contains("finite"), "{nan}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Converting a filled cache (every layer into one new allocation) keeps each layer's values
/// as that format stores them: f32 → 8-bit equals quantizing each layer's rows, and back to f32
/// holds the same values; a conversion the heads cannot
/// take (8-bit blocks of 32 values on heads of 16) is refused and leaves the cache as it was.
#[test]
fn converting_a_cache_keeps_every_layer_and_a_refusal_keeps_it_whole() {
    use tptt::state::KvFormat;
    let dir = std::env::temp_dir().join(format!("tptt-state-convert-{}", std::process::id()));
    let m = synthetic_d32(&dir, 7);
    let toks = ids(30);
    let mut st = m.new_state(CarryMode::Continue, Some(16));
    m.forward(&toks[..20], &mut st, Logits::Last)
        .expect("prompt");
    let n = st.kv_len();
    let f32_values: Vec<Vec<f32>> = st
        .layers
        .iter()
        .flat_map(|l| [l.k_view(n), l.v_view(n)])
        .map(filled_values)
        .collect();
    let mut q8 = st.try_clone().expect("copy");
    q8.set_kv_format(KvFormat::Q8_0).expect("8-bit");
    assert_eq!(q8.kv_format, KvFormat::Q8_0);
    for (i, (l, want_f32)) in q8
        .layers
        .iter()
        .flat_map(|l| [l.k_view(n), l.v_view(n)])
        .zip(&f32_values)
        .enumerate()
    {
        let got = filled_values(l);
        let mut bytes = Vec::new();
        tptt::kernels::kv::quantize_q8_0(want_f32, &mut bytes);
        let mut want = vec![0f32; want_f32.len()];
        tptt::kernels::kv::dequantize_q8_0(&bytes, &mut want);
        assert_eq!(
            got,
            want,
            "buffer {i} (layer {}, {})",
            i / 2,
            ["k", "v"][i % 2]
        );
    }
    // Back to f32 is exact: the same values, and both go on decoding.
    let mut back = q8.try_clone().expect("copy");
    back.set_kv_format(KvFormat::F32).expect("f32");
    for (a, b) in q8.layers.iter().zip(&back.layers) {
        for (x, y) in [(a.k_view(n), b.k_view(n)), (a.v_view(n), b.v_view(n))] {
            let (x, y) = (
                x.expect("8-bit").expect("filled"),
                y.expect("f32").expect("filled"),
            );
            assert_eq!(y.dtype(), candle_core::DType::F32);
            assert_eq!(max_diff(&x, &y), 0.0);
        }
    }
    for &t in &toks[20..] {
        m.forward(&[t], &mut q8, Logits::Last).expect("8-bit");
        m.forward(&[t], &mut back, Logits::Last).expect("f32");
    }
    let _ = std::fs::remove_dir_all(&dir);

    // The tiny fixture's heads of 16 values cannot be 8-bit blocks.
    let small = model("tptt-llama", "delta_product");
    let mut st = small.new_state(CarryMode::Continue, Some(8));
    small
        .forward(&ids(10), &mut st, Logits::Last)
        .expect("prompt");
    let before = filled_values(st.layers[1].k_view(st.kv_len()));
    let err = st.set_kv_format(KvFormat::Q8_0).expect_err("refused");
    assert!(err.to_string().contains("KV cache"), "{err}");
    assert_eq!(st.kv_format, KvFormat::F32);
    assert_eq!(before, filled_values(st.layers[1].k_view(st.kv_len())));
}

/// The values of a filled cache's f32 view.
fn filled_values(view: tptt::error::Result<Option<Tensor>>) -> Vec<f32> {
    view.expect("view")
        .expect("filled")
        .flatten_all()
        .and_then(|x| x.to_vec1())
        .expect("values")
}
