//! Quantized (GGUF) bases: a tiny fixture base written as a llama.cpp-style GGUF (q/k rows
//! permuted for interleaved RoPE, llama.cpp tensor names) loads with its TPTT adapter kept
//! unmerged beside the matrices. With f32 matrices the logits equal the reference's (1e-4); with
//! Q8_0 they stay close; the real SmolLM2 Q4_1 GGUF (when `TPTT_SMOLLM2_DIR` is set) loads and
//! generates.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use tptt::model::{LoadOptions, Model};
use tptt::repo::TpttRepo;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn write_gguf(out: &Path, dtype: GgmlDType) {
    let base = candle_core::safetensors::load(
        fixtures().join("llama-base/model.safetensors"),
        &Device::Cpu,
    )
    .expect("base");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-base/config.json")).expect("config"),
    )
    .expect("json");
    let n = |k: &str| cfg[k].as_u64().expect("number") as u32;
    let (heads, kv) = (
        n("num_attention_heads") as usize,
        n("num_key_value_heads") as usize,
    );
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &base {
        let gname = tptt::synth::gguf_name(name).expect("a Llama tensor");
        let t = if gname.ends_with("attn_q.weight") {
            tptt::synth::permute_heads(t.clone(), heads).expect("permute")
        } else if gname.ends_with("attn_k.weight") {
            tptt::synth::permute_heads(t.clone(), kv).expect("permute")
        } else {
            t.clone()
        };
        let q = if t.rank() == 1 {
            QTensor::quantize(&t, GgmlDType::F32)
        } else {
            QTensor::quantize(&t, dtype)
        }
        .expect("quantize");
        tensors.push((gname, q));
    }
    let rope = cfg["rope_scaling"].clone();
    assert!(
        rope.is_object(),
        "the fixture has llama3 scaling; this test writes a GGUF without it"
    );
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(n("hidden_size"))),
        (
            "llama.feed_forward_length",
            Value::U32(n("intermediate_size")),
        ),
        ("llama.block_count", Value::U32(n("num_hidden_layers"))),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg["rms_norm_eps"].as_f64().expect("eps") as f32),
        ),
        (
            "llama.rope.freq_base",
            Value::F32(cfg["rope_theta"].as_f64().expect("theta") as f32),
        ),
        (
            "llama.context_length",
            Value::U32(n("max_position_embeddings")),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).expect("create gguf");
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
}

/// The same variant loaded from safetensors (LoRA merged) and from a GGUF base (LoRA unmerged),
/// compared on a 40-token sequence. The GGUF has no Llama-3 RoPE scaling, so the safetensors side
/// runs with it removed too, through a copy of the base config.
fn compare(dtype: GgmlDType) -> f32 {
    let tmp = std::env::temp_dir().join(format!("tptt-gguf-{}-{dtype:?}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    // A copy of the base without rope_scaling.
    let base = tmp.join("llama-base");
    std::fs::create_dir_all(&base).expect("base dir");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-base/config.json")).expect("cfg"),
    )
    .expect("json");
    cfg["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(base.join("config.json"), cfg.to_string()).expect("write cfg");
    std::fs::copy(
        fixtures().join("llama-base/model.safetensors"),
        base.join("model.safetensors"),
    )
    .expect("copy weights");
    let gguf = tmp.join("llama-base.gguf");
    write_gguf(&gguf, dtype);

    // And a copy of the variant without it (its config.json carries the base keys too).
    let variant = tmp.join("repo/delta_product");
    std::fs::create_dir_all(&variant).expect("variant dir");
    let src = fixtures().join("tptt-llama/delta_product");
    let mut vcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("cfg"))
            .expect("json");
    vcfg["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(variant.join("config.json"), vcfg.to_string()).expect("write cfg");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        variant.join("adapter_model.safetensors"),
    )
    .expect("copy adapter");
    let repo = TpttRepo::open(tmp.join("repo")).expect("repo");
    let dense = Model::load(
        &repo
            .variant(Some("delta_product"), Some(&base))
            .expect("variant"),
        &LoadOptions::default(),
    )
    .expect("dense");
    let files = repo
        .variant(Some("delta_product"), Some(&gguf))
        .expect("gguf variant");
    assert!(files.base_gguf.is_some());
    let quant = Model::load(&files, &LoadOptions::default()).expect("gguf model");
    if dtype != GgmlDType::F32 {
        assert_eq!(
            quant.adapter_report().unmerged.len(),
            8,
            "LoRA kept beside every quantized q/k/v/o"
        );
    }
    let ids: Vec<u32> = (0..40).map(|i| 3 + (i * 53 + 7) % 290).collect();
    let a: Vec<f32> = dense
        .forward_full(&ids)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
        .expect("dense fwd");
    let b: Vec<f32> = quant
        .forward_full(&ids)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
        .expect("gguf fwd");
    let _ = std::fs::remove_dir_all(&tmp);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn f32_gguf_base_with_unmerged_lora_equals_merged_safetensors() {
    let d = compare(GgmlDType::F32);
    assert!(d <= 1e-4, "max |Δlogit| {d:e}");
}

#[test]
fn q8_0_gguf_base_with_unmerged_lora_stays_close() {
    let d = compare(GgmlDType::Q8_0);
    eprintln!("Q8_0 vs f32: max |Δlogit| {d:e}");
    // Q8_0 weights plus candle's Q8 activation rounding, through a random 2-layer model whose
    // logits have std ≈ 2.4: measured 0.78. The exact unmerged-LoRA algebra is checked by the
    // unit test `model::tests::unmerged_lora_equals_merged`.
    assert!(d > 0.0 && d < 1.5, "max |Δlogit| {d:e}");
}

/// Matrices repacked as they are read (`gguf::load_with`, repack on: every matrix the decode
/// kernels take repacked, q and k unpermuted on their stored bytes first) hold the same values
/// as the same GGUF read as stored, for each 32-value type (the fixture's rows are too short
/// for Q4_K's super-blocks, which `kernels::q4k_x16`'s own test repacks in place).
#[test]
fn matrices_repacked_as_read_equal_the_stored_ones() {
    use tptt::weights::Weight;
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let tmp = std::env::temp_dir().join(format!(
            "tptt-gguf-repack-{}-{dtype:?}.gguf",
            std::process::id()
        ));
        write_gguf(&tmp, dtype);
        let cpu = Device::Cpu;
        let (_, stored) = tptt::gguf::load_with(&tmp, &cpu, false, false).expect("as stored");
        let (_, packed) = tptt::gguf::load_with(&tmp, &cpu, false, true).expect("repacked");
        let _ = std::fs::remove_file(&tmp);
        assert_eq!(stored.len(), packed.len());
        let values = |t: candle_core::Tensor| -> Vec<f32> {
            t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
        };
        let mut repacked = Vec::new();
        for (name, w) in &packed {
            let Weight::Packed(p) = w else { continue };
            let Some(Weight::Quant(q)) = stored.get(name) else {
                panic!("{name}: not quantized when read as stored");
            };
            assert_eq!(
                values(p.dequantize(&cpu).expect("packed")),
                values(q.dequantize(&cpu).expect("stored")),
                "{dtype:?} {name}"
            );
            repacked.push(name.clone());
        }
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"] {
            assert!(
                repacked.iter().any(|n| n.contains(proj)),
                "{dtype:?}: no {proj} repacked as read ({repacked:?})"
            );
        }
    }
}

#[test]
fn real_smollm2_q4_1_gguf_loads_and_generates() {
    let Some(dir) = std::env::var_os("TPTT_SMOLLM2_DIR").map(PathBuf::from) else {
        eprintln!("TPTT_SMOLLM2_DIR is not set: skipping the real GGUF test");
        return;
    };
    let gguf = dir.join("../.cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let settings =
        tptt::config::TpttSettings::injected("delta_rule", 0.125, "smollm2").expect("settings");
    let model =
        Model::load_gguf_plain(&gguf, settings, &LoadOptions::default()).expect("load gguf");
    assert_eq!(model.config().base.num_layers, 30);
    let reference = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/smollm2/reference.safetensors"),
        &Device::Cpu,
    )
    .expect("ref");
    let ids: Vec<u32> = reference["ids"]
        .to_vec1::<i64>()
        .expect("ids")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let logits = model.forward_full(&ids).expect("forward");
    let last: Vec<f32> = logits
        .get(ids.len() - 1)
        .and_then(|t| t.to_vec1())
        .expect("row");
    assert!(last.iter().all(|x| x.is_finite()));
    // Quantized weights (Q4_1, multiplied as stored) still rank the f32 model's answer highly.
    let want = reference["greedy_ids"].to_vec1::<i64>().expect("greedy")[0] as usize;
    let rank = last.iter().filter(|&&x| x > last[want]).count();
    assert!(rank < 5, "the f32 model's first answer token ranks {rank}");
}

/// OpenELM from GGUFs written by llama.cpp's own converter (`convert_hf_to_gguf.py` of the
/// llama.cpp tree vendored in llama-cpp-python 0.3.36, from `openelm-base/`: per-layer head
/// counts and FFN widths as metadata arrays, `attn_qkv` fused, `proj_1` split into `ffn_gate` /
/// `ffn_up`). Loaded as the base of `tptt-openelm/delta_product`: f32 gives the safetensors
/// logits (the adapter merged either way); Q8_0 keeps the LoRA unmerged beside the quantized
/// `qkv_proj` / `out_proj` (split with the projection's rows) and stays close.
#[test]
fn openelm_gguf_bases_from_llama_cpp() {
    let repo = TpttRepo::open(fixtures().join("tptt-openelm")).expect("repo");
    let dense = Model::load(
        &repo.variant(Some("delta_product"), None).expect("variant"),
        &LoadOptions::default(),
    )
    .expect("dense");
    let ids: Vec<u32> = (0..40).map(|i| 3 + (i * 53 + 7) % 290).collect();
    let logits = |m: &Model| -> Vec<f32> {
        m.forward_full(&ids)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("forward")
    };
    let want = logits(&dense);
    let max_diff = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    for (file, unmerged, bound) in [
        ("openelm-base-f32.gguf", 0, 1e-4f32),
        // Q8_0 weights (blk.1.ffn_down stays F16: 144 columns are not whole blocks) plus
        // candle's Q8 activation rounding; logits std ≈ 2.
        ("openelm-base-q8_0.gguf", 6, 1.0),
    ] {
        let gguf = fixtures().join(file);
        let files = repo
            .variant(Some("delta_product"), Some(&gguf))
            .expect("gguf variant");
        assert!(files.base_gguf.is_some());
        assert_eq!(files.config.base.arch.name(), "openelm");
        let model = Model::load(&files, &LoadOptions::default()).expect(file);
        assert_eq!(
            model.adapter_report().unmerged.len(),
            unmerged,
            "{file}: LoRA beside each quantized qkv_proj and out_proj"
        );
        let d = max_diff(&logits(&model));
        eprintln!("{file}: max |Δlogit| {d:e}");
        assert!(d <= bound && d.is_finite(), "{file}: max |Δlogit| {d:e}");
        if unmerged > 0 {
            assert!(d > 0.0, "{file}: a quantized base cannot match exactly");
        }
    }
}

/// A GGUF file's metadata.
type Metadata = std::collections::HashMap<String, Value>;

/// One hostile edit: its name, the change, and the words its error must hold (none: it loads).
type Edit<'a> = (&'a str, Box<dyn Fn(&mut Metadata)>, &'a str);

/// The OpenELM GGUF fixture rewritten with `edit` applied to its metadata.
fn edited_openelm_gguf(out: &Path, edit: impl FnOnce(&mut Metadata)) {
    let src = fixtures().join("openelm-base-q8_0.gguf");
    let mut f = std::fs::File::open(&src).expect("fixture");
    let content = gguf_file::Content::read(&mut f).expect("gguf");
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        tensors.push((
            name.clone(),
            content.tensor(&mut f, name, &Device::Cpu).expect("tensor"),
        ));
    }
    let mut md = content.metadata.clone();
    edit(&mut md);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(out).expect("create");
    gguf_file::write(&mut out, &md_refs, &t_refs).expect("write gguf");
}

/// Hostile OpenELM GGUF metadata: per-layer arrays of the wrong length, KV heads that do not
/// divide, a scalar where an array belongs, head counts the fused `attn_qkv` rows do not match.
/// Each is a clear error naming the key (or the tensor), never a panic; the unedited rewrite
/// loads.
#[test]
fn hostile_openelm_gguf_metadata_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("tptt-gguf-openelm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let ints = |xs: &[i32]| Value::Array(xs.iter().map(|&x| Value::I32(x)).collect());
    let settings =
        tptt::config::TpttSettings::injected("delta_rule", 0.5, "openelm").expect("tptt");
    let load =
        |path: &Path| Model::load_gguf_plain(path, settings.clone(), &LoadOptions::default());
    let cases: Vec<Edit<'_>> = vec![
        ("same", Box::new(|_| {}), ""),
        (
            "short-heads",
            Box::new(move |m| {
                m.insert("openelm.attention.head_count".into(), ints(&[2, 4]));
            }),
            "attention.head_count_kv has 3 entries for 2 layers",
        ),
        (
            "kv-not-dividing",
            Box::new(move |m| {
                m.insert("openelm.attention.head_count_kv".into(), ints(&[1, 3, 2]));
            }),
            "layer 1: 4 query heads, 3 KV heads",
        ),
        (
            "scalar-ffn",
            Box::new(|m| {
                m.insert("openelm.feed_forward_length".into(), Value::U32(144));
            }),
            "openelm.feed_forward_length is not an array",
        ),
        (
            "fewer-kv-heads",
            Box::new(move |m| {
                m.insert("openelm.attention.head_count_kv".into(), ints(&[1, 1, 1]));
            }),
            "transformer.layers.1.attn.qkv_proj.weight",
        ),
        (
            "layer-count",
            Box::new(|m| {
                m.insert("openelm.block_count".into(), Value::U32(4));
            }),
            "openelm.block_count is 4",
        ),
    ];
    for (name, edit, words) in cases {
        let path = dir.join(format!("{name}.gguf"));
        edited_openelm_gguf(&path, edit);
        match load(&path) {
            Ok(_) if words.is_empty() => {}
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!words.is_empty(), "{name}: {msg}");
                assert!(
                    msg.contains(words),
                    "{name}: {msg:?} does not say {words:?}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
