//! A safetensors base stored in f16 / bf16, kept in that precision on the CPU
//! (`LoadOptions::half_weights`): the same model as the one widened to f32 at load — prompt
//! logits (matrices widened piece by piece), short prompts and decode steps (the half kernels)
//! — with the adapter's LoRA kept unmerged beside the half matrices, in half the bytes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt::repo::TpttRepo;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// The tiny Llama base with its matrices stored as `dtype`, in a temporary folder.
fn half_base(dtype: DType) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tptt-half-{dtype:?}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let src = fixtures().join("llama-base");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("config");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
        .expect("base weights");
    let half: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).expect("to half")))
        .collect();
    candle_core::safetensors::save(&half, dir.join("model.safetensors")).expect("save");
    dir
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn last_logits(m: &Model, ids: &[u32], state: &mut tptt::model::State) -> Vec<f32> {
    m.forward(ids, state, Logits::Last)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward")
}

#[test]
fn half_weights_are_the_same_model_in_half_the_bytes() {
    for dtype in [DType::F16, DType::BF16] {
        let base = half_base(dtype);
        let repo = TpttRepo::open(fixtures().join("tptt-llama")).expect("repo");
        let files = repo
            .variant(Some("delta_product"), Some(&base))
            .expect("variant");
        let wide = Model::load(&files, &LoadOptions::default()).expect("f32 load");
        let kept = Model::load(
            &files,
            &LoadOptions {
                half_weights: true,
                ..Default::default()
            },
        )
        .expect("half load");
        assert!(
            !kept.adapter_report().unmerged.is_empty(),
            "{dtype:?}: LoRA kept beside the half matrices"
        );
        assert!(wide.adapter_report().unmerged.is_empty());
        let (wb, kb) = (wide.weight_bytes(), kept.weight_bytes());
        assert!(
            (kb as f64) < 0.6 * wb as f64,
            "{dtype:?}: {kb} bytes kept vs {wb} widened"
        );
        // A prompt (widened pieces), then a short one and decode steps (the half kernels).
        let ids: Vec<u32> = (0..40).map(|i| 3 + (i * 53 + 7) % 290).collect();
        let a = wide
            .forward_full(&ids)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .expect("wide");
        let b = kept
            .forward_full(&ids)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .expect("kept");
        let d = max_diff(&a, &b);
        assert!(d < 1e-4, "{dtype:?}: prompt logits differ by {d}");
        let mut sa = wide.new_state(CarryMode::Continue, None);
        let mut sb = kept.new_state(CarryMode::Continue, None);
        let d = max_diff(
            &last_logits(&wide, &ids[..5], &mut sa),
            &last_logits(&kept, &ids[..5], &mut sb),
        );
        assert!(d < 1e-4, "{dtype:?}: short prompt differs by {d}");
        for &id in &ids[5..12] {
            let d = max_diff(
                &last_logits(&wide, &[id], &mut sa),
                &last_logits(&kept, &[id], &mut sb),
            );
            assert!(d < 1e-4, "{dtype:?}: decode step differs by {d}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}

/// An F16 / BF16 GGUF base (the same weights as a synthetic safetensors base) keeps its matrices
/// as stored with `half_weights`: the same logits as widening them at load, in fewer bytes.
#[test]
fn half_gguf_matrices_are_kept_as_stored() {
    use candle_core::quantized::GgmlDType;
    use tptt::synth::{write_llama_gguf, LlamaShape};
    let dir = std::env::temp_dir().join(format!("tptt-half-gguf-{}", std::process::id()));
    let shape = LlamaShape::SMALL_D32;
    let settings =
        tptt::config::TpttSettings::injected("delta_product", 0.5, "base").expect("settings");
    for dtype in [GgmlDType::F16, GgmlDType::BF16] {
        let path = dir.join(format!("base-{dtype:?}.gguf"));
        write_llama_gguf(&path, &shape, dtype, 5).expect("gguf");
        let load = |half: bool| {
            Model::load_gguf_plain(
                &path,
                settings.clone(),
                &LoadOptions {
                    half_weights: half,
                    ..Default::default()
                },
            )
            .expect("load")
        };
        let (wide, kept) = (load(false), load(true));
        assert!(
            (kept.weight_bytes() as f64) < 0.6 * wide.weight_bytes() as f64,
            "{dtype:?}: {} vs {}",
            kept.weight_bytes(),
            wide.weight_bytes()
        );
        let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 320).collect();
        let (mut sa, mut sb) = (
            wide.new_state(CarryMode::Continue, None),
            kept.new_state(CarryMode::Continue, None),
        );
        let d = max_diff(
            &last_logits(&wide, &ids[..20], &mut sa),
            &last_logits(&kept, &ids[..20], &mut sb),
        );
        assert!(d < 1e-4, "{dtype:?}: prompt differs by {d}");
        for &id in &ids[20..] {
            let d = max_diff(
                &last_logits(&wide, &[id], &mut sa),
                &last_logits(&kept, &[id], &mut sb),
            );
            assert!(d < 1e-4, "{dtype:?}: decode step differs by {d}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
