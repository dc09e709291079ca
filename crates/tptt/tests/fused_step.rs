//! The fused CPU decode step (`model/step.rs`) against the tensor path it replaces: every
//! fixture repo and variant (Llama, Qwen2, Gemma-3 with local layers, OLMo, OLMoE, every
//! operator mode, cross gate, base_scale_attn), two prompts (the fused side runs them through the
//! in-place prefill attention), then single-token steps, with a small window (ring wrap-around,
//! layer windows) and without one, the KV cache in f32 and in f16 (both sides then read the
//! same rounded keys and values). Logits and states must agree. The 8-bit cache (q8_0) needs
//! heads of a multiple of 32 values, which no committed fixture has: a synthetic Llama base
//! with heads of 32 (`tptt::synth`) compares it the same way, and against the f32 cache. Synthetic
//! GGUF bases of every quantized type the step multiplies itself (Q4_0 … Q6_K) decode one step
//! from the same state as the tensor path (candle's quantized matmul) does.

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
            // values then differ by one f16 step, and the logits after them by up to about one
            // f16 step too (seen: 3.7e-4 when only the softmax's summation order changed).
            let tol = match kv {
                KvFormat::F32 => 2e-5,
                KvFormat::F16 | KvFormat::Q8_0 => 2f32.powi(-11),
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

/// Logits of every token of `prompt`, then of `steps` single tokens, through `m` from a fresh
/// state in `kv` with `window`.
fn run(
    m: &Model,
    kv: KvFormat,
    window: Option<usize>,
    prompt: &[u32],
    steps: &[u32],
) -> Vec<Vec<f32>> {
    let mut st = m.new_state(CarryMode::Continue, window);
    st.set_kv_format(kv).expect("format");
    let flat = |t: candle_core::Tensor| {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32")
    };
    let mut out = vec![flat(
        m.forward(prompt, &mut st, Logits::All).expect("prompt"),
    )];
    for &id in steps {
        out.push(flat(m.forward(&[id], &mut st, Logits::Last).expect("step")));
    }
    assert_eq!(st.kv_format, kv);
    out
}

#[test]
fn an_8_bit_cache_follows_the_tensor_path_and_stays_near_f32() {
    let dir = std::env::temp_dir().join(format!("tptt-fused-q8-{}", std::process::id()));
    let shape = tptt::synth::LlamaShape::SMALL_D32;
    tptt::synth::write_repo(
        &dir,
        &shape,
        candle_core::DType::F32,
        11,
        "dp",
        "delta_product",
        0.5,
    )
    .expect("synthetic repo");
    let files = TpttRepo::open(&dir)
        .and_then(|r| r.variant(Some("dp"), None))
        .expect("variant");
    let fused = Model::load(&files, &LoadOptions::default()).expect("load");
    let mut tensor = fused.clone();
    tensor.set_fused_step(false);
    let vocab = shape.vocab as u32;
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % vocab).collect();
    let steps: Vec<u32> = (0..12).map(|i| (i * 53 + 7) % vocab).collect();
    let (mut worst_paths, mut worst_f32) = (0f32, 0f32);
    for window in [Some(16), None] {
        let q_fused = run(&fused, KvFormat::Q8_0, window, &prompt, &steps);
        let q_tensor = run(&tensor, KvFormat::Q8_0, window, &prompt, &steps);
        let exact = run(&fused, KvFormat::F32, window, &prompt, &steps);
        for (i, ((a, b), c)) in q_fused.iter().zip(&q_tensor).zip(&exact).enumerate() {
            let paths = max_diff(a, b);
            let quant = max_diff(a, c);
            // Both paths read the same 8-bit keys, but quantize keys that differ in their last
            // f32 bits: a value may land on the neighbouring step (1/127 of its block's
            // largest) on one side only.
            assert!(
                paths < 3e-4,
                "window {window:?} call {i}: fused vs tensor path, max rel diff {paths}"
            );
            // Against the exact cache: the quantization error (half a step per value).
            assert!(
                quant < 1e-2,
                "window {window:?} call {i}: 8-bit vs f32 cache, max rel diff {quant}"
            );
            worst_paths = worst_paths.max(paths);
            worst_f32 = worst_f32.max(quant);
        }
    }
    eprintln!("q8_0 cache: fused vs tensor path {worst_paths:.2e}, vs f32 cache {worst_f32:.2e}");
    // A model whose heads are not whole blocks refuses the 8-bit cache with the reason.
    let small = Model::load(
        &TpttRepo::open(fixtures().join("tptt-llama"))
            .and_then(|r| r.variant(Some("delta_product"), None))
            .expect("fixture"),
        &LoadOptions::default(),
    )
    .expect("load");
    let mut st = small.new_state(CarryMode::Continue, None);
    st.set_kv_format(KvFormat::Q8_0)
        .expect("nothing cached yet");
    let err = small
        .forward(&[1, 2, 3], &mut st, Logits::Last)
        .expect_err("heads of 16 cannot hold 8-bit blocks");
    assert!(err.to_string().contains("blocks of 32"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short message after a cached history, over an 8-bit cache: on CPUs with the integer decode
/// attention the prompt path reads it token by token (`Path::RingSteps`: each key written into
/// its slot, then attended as a decode step attends), so with the linear branch off its logits
/// are those of the same tokens sent one at a time, up to the batched projections' f32 rounding:
/// where it moves one value of a key to the neighbouring 8-bit step, that token and every later
/// one differ by ~1e-3 on this random base (a window one short moves them by 1e-1). (With the branch on they differ
/// by design: a message is one chunk of the recurrence, single tokens are chunks of one.) With a
/// window of 48, the 16-token message after 40 cached tokens wraps the ring mid-message: a key
/// written ahead of its turn would overwrite one that earlier tokens of the message still see.
/// Elsewhere the message goes through the flash kernel, which reads its own keys in f32: then
/// only the 8-bit rounding bound applies. With the branch on, the message over the 8-bit cache
/// stays within that bound of the same message over an f32 cache.
#[test]
fn a_short_message_over_an_8_bit_cache_reads_as_single_steps() {
    let dir = std::env::temp_dir().join(format!("tptt-fused-steps-{}", std::process::id()));
    let shape = tptt::synth::LlamaShape {
        hidden: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        intermediate: 256,
        vocab: 320,
    };
    tptt::synth::write_repo(
        &dir,
        &shape,
        candle_core::DType::F32,
        5,
        "on",
        "delta_product",
        0.5,
    )
    .expect("synthetic repo");
    tptt::synth::write_variant(&dir, "off", "base", &shape, "delta_product", 0.0)
        .expect("variant without memory");
    let load = |name: &str| {
        let files = TpttRepo::open(&dir)
            .and_then(|r| r.variant(Some(name), None))
            .expect("variant");
        Model::load(&files, &LoadOptions::default()).expect("load")
    };
    let (off, on) = (load("off"), load("on"));
    let vocab = shape.vocab as u32;
    let history: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % vocab).collect();
    let message: Vec<u32> = (0..16).map(|i| (i * 53 + 7) % vocab).collect();
    let integer = tptt::kernels::attend::integer_attention(shape.head_dim);
    let tol = if integer { 3e-3 } else { 1e-2 };
    let rows = |t: candle_core::Tensor| t.to_vec2::<f32>().expect("f32 rows");
    let after_history = |m: &Model, kv: KvFormat, window: Option<usize>| {
        let mut st = m.new_state(CarryMode::Continue, window);
        st.set_kv_format(kv).expect("format");
        m.forward(&history, &mut st, Logits::Last).expect("history");
        st
    };
    let (mut worst, mut worst_on) = (0f32, 0f32);
    for window in [Some(48), None] {
        let mut read = after_history(&off, KvFormat::Q8_0, window);
        let mut stepped = read.try_clone().expect("copy");
        let whole = rows(
            off.forward(&message, &mut read, Logits::All)
                .expect("message"),
        );
        for (i, &id) in message.iter().enumerate() {
            let one = rows(
                off.forward(&[id], &mut stepped, Logits::Last)
                    .expect("step"),
            );
            let d = max_diff(&whole[i], &one[0]);
            worst = worst.max(d);
            assert!(
                d < tol,
                "window {window:?} token {i}: message vs single steps, max rel diff {d} (integer attention: {integer})"
            );
        }
        assert_eq!(read.pos, stepped.pos);
        assert_eq!(
            read.key_pos, stepped.key_pos,
            "window {window:?}: ring positions"
        );

        let mut q8 = after_history(&on, KvFormat::Q8_0, window);
        let mut f32s = after_history(&on, KvFormat::F32, window);
        let a = rows(
            on.forward(&message, &mut q8, Logits::All)
                .expect("message, 8-bit"),
        );
        let b = rows(
            on.forward(&message, &mut f32s, Logits::All)
                .expect("message, f32"),
        );
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            let d = max_diff(a, b);
            worst_on = worst_on.max(d);
            assert!(
                d < 1e-2,
                "window {window:?} token {i}: 8-bit vs f32 cache, max rel diff {d}"
            );
        }
        assert_eq!(
            q8.key_pos, f32s.key_pos,
            "window {window:?}: ring positions"
        );
    }
    eprintln!(
        "a message over an 8-bit cache (integer attention: {integer}): vs single steps {worst:.2e}, vs an f32 cache {worst_on:.2e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF base of each quantized type whose matrices the fused step multiplies itself (rows of
/// whole 256-value super-blocks, so the K-quants too; the embedding quantized as well) decodes
/// as the tensor path does, which multiplies a single row with candle's quantized matmul. Both
/// read the same stored weights and quantize the input to 8 bits — per 32 values on both sides
/// for the 32-blocks, per 32 against candle's per 256 (Q8_K) for the K-quants — so one step
/// from the same state differs by that rounding only (and by an input value rounded the other
/// way where the two sides' f32 sums differ in the last bit, which this random base amplifies to
/// a few 1e-2 of its logits), well below the weights' own quantization (the same base in f32).
#[test]
fn quantized_gguf_bases_decode_as_the_tensor_path() {
    use candle_core::quantized::GgmlDType;
    let dir = std::env::temp_dir().join(format!("tptt-fused-gguf-{}", std::process::id()));
    let shape = gguf_shape();
    tptt::synth::write_variant(&dir, "dp", "base", &shape, "delta_product", 0.5).expect("variant");
    let load = |dtype: GgmlDType| {
        let gguf = dir.join(format!("base-{dtype:?}.gguf"));
        tptt::synth::write_llama_gguf(&gguf, &shape, dtype, 11).expect("gguf");
        let files = TpttRepo::open(&dir)
            .and_then(|r| r.variant(Some("dp"), Some(&gguf)))
            .expect("variant");
        Model::load(&files, &LoadOptions::default()).expect("load")
    };
    let flat = |t: candle_core::Tensor| {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32")
    };
    let vocab = shape.vocab as u32;
    let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 11) % vocab).collect();
    let steps: Vec<u32> = (0..8).map(|i| (i * 53 + 7) % vocab).collect();
    let exact = run(&load(GgmlDType::F32), KvFormat::F32, None, &prompt, &steps);
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let fused = load(dtype);
        let mut tensor = fused.clone();
        tensor.set_fused_step(false);
        // The weights' quantization: the tensor path against the f32 base.
        let weights = run(&tensor, KvFormat::F32, None, &prompt, &steps)
            .iter()
            .zip(&exact)
            .map(|(a, b)| max_diff(a, b))
            .fold(0f32, f32::max);
        // Each step from the tensor path's state.
        let mut st = tensor.new_state(CarryMode::Continue, None);
        tensor
            .forward(&prompt, &mut st, Logits::All)
            .expect("prompt");
        let mut paths = 0f32;
        for &id in &steps {
            let mut sf = st.try_clone().expect("copy");
            let a = flat(fused.forward(&[id], &mut sf, Logits::Last).expect("fused"));
            let b = flat(
                tensor
                    .forward(&[id], &mut st, Logits::Last)
                    .expect("tensor"),
            );
            paths = paths.max(max_diff(&a, &b));
        }
        eprintln!(
            "{dtype:?}: one step, fused vs tensor path {paths:.2e}; vs f32 weights {weights:.2e}"
        );
        assert!(
            paths < 8e-2 && paths < 0.5 * weights,
            "{dtype:?}: the paths differ by {paths}, the weights' quantization by {weights}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Q4_K, Q4_1 or Q8_0 base repacked 16 rows to a group (the default on a CPU with AVX-512
/// VNNI, a no-op elsewhere) gives the logits of the same base kept as stored, to f32 rounding:
/// a prompt long enough for the prompt paths, then single steps through the fused step and the
/// tensor path. Repacked, every product rounds its input to 8 bits as a decode step does, the
/// prompt's too (`kernels::prompt_k`, `kernels::prompt_q32`); stored, a Q4_1 or Q8_0 prompt is
/// the exact product of the widened matrix: there the two differ by that rounding (the
/// kernels' own tests hold the arithmetic: a repacked prompt row equals the row decoded, bit for
/// bit).
#[test]
fn a_repacked_base_equals_it_as_stored() {
    use candle_core::quantized::GgmlDType;
    let dir = std::env::temp_dir().join(format!("tptt-repack-{}", std::process::id()));
    let shape = gguf_shape();
    tptt::synth::write_variant(&dir, "dp", "base", &shape, "delta_product", 0.5).expect("variant");
    for dtype in [GgmlDType::Q4K, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let gguf = dir.join(format!("base-{dtype:?}.gguf"));
        tptt::synth::write_llama_gguf(&gguf, &shape, dtype, 5).expect("gguf");
        let files = TpttRepo::open(&dir)
            .and_then(|r| r.variant(Some("dp"), Some(&gguf)))
            .expect("variant");
        let load = |repack: bool| {
            let opts = LoadOptions {
                repack,
                ..LoadOptions::default()
            };
            Model::load(&files, &opts).expect("load")
        };
        let (packed, stored) = (load(true), load(false));
        // Repacked only where the kernels run: Q4_K takes 148 bytes per 256 values instead of
        // 144; Q4_1 and Q8_0 as many bytes as stored.
        assert_eq!(
            packed.weight_bytes() > stored.weight_bytes(),
            tptt::cpu::has_avx512_vnni() && dtype == GgmlDType::Q4K,
            "{dtype:?}"
        );
        let vocab = shape.vocab as u32;
        let prompt: Vec<u32> = (0..37).map(|i| (i * 37 + 11) % vocab).collect();
        let steps: Vec<u32> = (0..6).map(|i| (i * 53 + 7) % vocab).collect();
        for fused in [true, false] {
            let (mut a, mut b) = (packed.clone(), stored.clone());
            a.set_fused_step(fused);
            b.set_fused_step(fused);
            // The prompt in one call: the same to f32 rounding where both round the prompt's
            // products as a decode does (Q4_K; without VNNI nothing is repacked); else within
            // what rounding the prompt's inputs to 8 bits moves these random weights' logits.
            let got = run(&a, KvFormat::F32, None, &prompt, &steps);
            let want = run(&b, KvFormat::F32, None, &prompt, &steps);
            let tol = match tptt::cpu::has_avx512_vnni() && dtype != GgmlDType::Q4K {
                true => 5e-2,
                false => 1e-4,
            };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
                let d = max_diff(g, w);
                assert!(
                    d <= tol * scale,
                    "{dtype:?}, fused {fused}, call {i}: {d} (scale {scale})"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Llama shape of the synthetic GGUF bases: every matrix whole 256-blocks and 16-row groups.
fn gguf_shape() -> tptt::synth::LlamaShape {
    tptt::synth::LlamaShape {
        hidden: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        intermediate: 512,
        vocab: 320,
    }
}
