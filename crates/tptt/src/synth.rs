//! Llama-architecture bases with random weights, written as Hugging Face folders
//! (`config.json` + `model.safetensors`), and TPTT variants injected into them: for the tests
//! that need shapes no committed fixture has (heads of 32 values and more, which the 8-bit KV
//! cache needs) and for benchmarks of real model sizes. Never on the inference path.
//!
//! Weights are deterministic for a seed: uniform in `±1/√fan_in` (the scale of a trained
//! layer's rows, so activations stay of order one through the layers), norms at one, the
//! embedding tied to the head.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};

/// The sizes of a Llama base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaShape {
    /// Model width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Vocabulary.
    pub vocab: usize,
}

impl LlamaShape {
    /// A small base whose heads hold 32 values (one 8-bit KV block), 2 layers, GQA 4:2.
    pub const SMALL_D32: LlamaShape = LlamaShape {
        hidden: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        intermediate: 256,
        vocab: 320,
    };

    /// Llama-3.2-1B's sizes.
    pub const LLAMA_3_2_1B: LlamaShape = LlamaShape {
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        intermediate: 8192,
        vocab: 128256,
    };

    /// The base's `config.json`.
    pub fn config(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        })
    }

    /// Parameters (the tied head counted once).
    pub fn parameters(&self) -> usize {
        let (h, d) = (self.hidden, self.head_dim);
        let attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2;
        let mlp = 3 * h * self.intermediate;
        self.vocab * h + self.layers * (attn + mlp + 2 * h) + h
    }
}

/// `n` values uniform in `±scale` (xorshift from `seed`).
fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// One tensor of a synthetic base: its Hugging Face name, its shape and how its values are made.
struct Spec {
    name: String,
    rows: usize,
    /// `None`: a norm vector of `rows` ones.
    cols: Option<usize>,
    seed: u64,
}

impl Spec {
    fn values(&self) -> Vec<f32> {
        match self.cols {
            Some(cols) => uniform(self.rows * cols, 1.0 / (cols as f32).sqrt(), self.seed),
            None => vec![1.0; self.rows],
        }
    }
    fn tensor(&self) -> Result<Tensor> {
        Ok(match self.cols {
            Some(cols) => Tensor::from_vec(self.values(), (self.rows, cols), &Device::Cpu)?,
            None => Tensor::from_vec(self.values(), self.rows, &Device::Cpu)?,
        })
    }
}

/// The tensors of a base of `shape`, in a fixed order, each matrix with its own seed drawn from
/// `seed` (the same weights whatever format they are written in).
fn specs(shape: &LlamaShape, seed: u64) -> Vec<Spec> {
    let (h, d) = (shape.hidden, shape.head_dim);
    let mut out = Vec::new();
    let mut next = seed;
    let mut matrix = |name: String, rows: usize, cols: usize| {
        next = next.wrapping_add(0x9E37_79B9_7F4A_7C15);
        Spec {
            name,
            rows,
            cols: Some(cols),
            seed: next,
        }
    };
    let ones = |name: String| Spec {
        name,
        rows: h,
        cols: None,
        seed: 0,
    };
    out.push(matrix("model.embed_tokens.weight".into(), shape.vocab, h));
    for i in 0..shape.layers {
        let p = format!("model.layers.{i}");
        out.push(matrix(
            format!("{p}.self_attn.q_proj.weight"),
            shape.heads * d,
            h,
        ));
        out.push(matrix(
            format!("{p}.self_attn.k_proj.weight"),
            shape.kv_heads * d,
            h,
        ));
        out.push(matrix(
            format!("{p}.self_attn.v_proj.weight"),
            shape.kv_heads * d,
            h,
        ));
        out.push(matrix(
            format!("{p}.self_attn.o_proj.weight"),
            h,
            shape.heads * d,
        ));
        out.push(matrix(
            format!("{p}.mlp.gate_proj.weight"),
            shape.intermediate,
            h,
        ));
        out.push(matrix(
            format!("{p}.mlp.up_proj.weight"),
            shape.intermediate,
            h,
        ));
        out.push(matrix(
            format!("{p}.mlp.down_proj.weight"),
            h,
            shape.intermediate,
        ));
        out.push(ones(format!("{p}.input_layernorm.weight")));
        out.push(ones(format!("{p}.post_attention_layernorm.weight")));
    }
    out.push(ones("model.norm.weight".into()));
    out
}

/// Write a base of `shape` with random weights (stored as `dtype`: f32, f16 or bf16) into
/// `dir` (created): `config.json` and `model.safetensors`.
pub fn write_llama(dir: &Path, shape: &LlamaShape, dtype: DType, seed: u64) -> Result<()> {
    let io = |e: std::io::Error| Error::Input(format!("{}: {e}", dir.display()));
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Input(format!(
            "a synthetic base is stored as f32, f16 or bf16, not {dtype:?}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let tensors = specs(shape, seed)
        .into_iter()
        .map(|s| Ok((s.name.clone(), s.tensor()?.to_dtype(dtype)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let mut config = shape.config();
    config["torch_dtype"] = json!(match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    });
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Input(format!("config.json: {e}")))?;
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// llama.cpp's name for a Hugging Face Llama tensor (`model.layers.3.mlp.up_proj.weight` →
/// `blk.3.ffn_up.weight`), `None` for a name a Llama does not have.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        _ => {}
    }
    let (i, part) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let g = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}"))
}

/// llama.cpp's converter's row order for q/k (interleaved RoPE pairs): within each head, HF
/// row `t·(d/2) + j` (half `t`, pair `j`) goes to row `2j + t`.
pub fn permute_heads(w: Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// Write the base of `shape` and `seed` (the same weights as [`write_llama`]) as a GGUF file the
/// way llama.cpp's converter lays out a Llama (its tensor names, q/k rows permuted, the head tied
/// to `token_embd`), every matrix quantized to `dtype` (its rows must be whole blocks), norms in
/// f32, with a SentencePiece-style vocabulary of placeholder tokens (`<0x00>`…`<0xFF>` byte
/// tokens, then `t{i}`) so that llama.cpp's tools load it. Matrices are made and quantized in
/// parallel.
pub fn write_llama_gguf(
    path: &Path,
    shape: &LlamaShape,
    dtype: candle_core::quantized::GgmlDType,
    seed: u64,
) -> Result<()> {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use rayon::prelude::*;
    if shape.vocab < 259 {
        return Err(Error::Input(format!(
            "a GGUF vocabulary needs 256 byte tokens and the specials, not {}",
            shape.vocab
        )));
    }
    let tensors: Vec<(String, QTensor)> = specs(shape, seed)
        .par_iter()
        .map(|s| {
            let name = gguf_name(&s.name)
                .ok_or_else(|| Error::Input(format!("no GGUF name for {}", s.name)))?;
            let mut t = s.tensor()?;
            if name.ends_with("attn_q.weight") {
                t = permute_heads(t, shape.heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = permute_heads(t, shape.kv_heads)?;
            }
            let q = match s.cols {
                Some(_) => QTensor::quantize(&t, dtype)?,
                None => QTensor::quantize(&t, GgmlDType::F32)?,
            };
            Ok((name, q))
        })
        .collect::<Result<_>>()?;
    let mut tokens = vec![
        Value::String("<unk>".into()),
        Value::String("<s>".into()),
        Value::String("</s>".into()),
    ];
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    for b in 0..256 {
        tokens.push(Value::String(format!("<0x{b:02X}>")));
        types.push(Value::I32(6));
    }
    while tokens.len() < shape.vocab {
        tokens.push(Value::String(format!("t{}", tokens.len())));
        types.push(Value::I32(1));
    }
    let scores = vec![Value::F32(0.0); shape.vocab];
    let u = |v: usize| Value::U32(v as u32);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tptt synthetic llama".into())),
        ("llama.context_length", u(131072)),
        ("llama.embedding_length", u(shape.hidden)),
        ("llama.block_count", u(shape.layers)),
        ("llama.feed_forward_length", u(shape.intermediate)),
        ("llama.rope.dimension_count", u(shape.head_dim)),
        ("llama.attention.head_count", u(shape.heads)),
        ("llama.attention.head_count_kv", u(shape.kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(500000.0)),
        ("llama.vocab_size", u(shape.vocab)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.ggml.unknown_token_id", u(0)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Input(format!("{}: {e}", parent.display())))?;
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?,
    );
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    use std::io::Write;
    f.flush()
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    Ok(())
}

/// Write a TPTT repo into `dir`: a base of `shape` (random weights from `seed`, stored as
/// `dtype`) in `dir/base`, and its variant `name` (`operator_mode`, `mag_weight`, no adapter).
pub fn write_repo(
    dir: &Path,
    shape: &LlamaShape,
    dtype: DType,
    seed: u64,
    name: &str,
    operator_mode: &str,
    mag_weight: f64,
) -> Result<()> {
    write_llama(&dir.join("base"), shape, dtype, seed)?;
    write_variant(dir, name, "base", shape, operator_mode, mag_weight)
}

/// Write a TPTT variant `name` of the base folder `base` (a sibling in `repo`) with the
/// given operator mode and Memory-as-Gate weight, no adapter: `repo/name/config.json`.
pub fn write_variant(
    repo: &Path,
    name: &str,
    base: &str,
    shape: &LlamaShape,
    operator_mode: &str,
    mag_weight: f64,
) -> Result<()> {
    let dir = repo.join(name);
    let io = |e: std::io::Error| Error::Input(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let mut config = shape.config();
    config["architectures"] = json!(["TpttModel"]);
    config["model_type"] = json!("tptt");
    config["base_model_name"] = json!(base);
    config["operator_mode"] = json!(operator_mode);
    config["mag_weight"] = json!(mag_weight);
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Input(format!("config.json: {e}")))?;
    std::fs::write(dir.join("config.json"), text).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_base_loads_with_its_shape() {
        let dir = std::env::temp_dir().join(format!("tptt-synth-{}", std::process::id()));
        let shape = LlamaShape::SMALL_D32;
        write_repo(&dir, &shape, DType::F16, 7, "dp", "delta_product", 0.5).expect("write");
        let files = crate::repo::TpttRepo::open(&dir)
            .and_then(|r| r.variant(Some("dp"), None))
            .expect("variant found");
        let model = crate::model::Model::load(&files, &Default::default()).expect("load");
        let b = &model.config().base;
        assert_eq!(
            (
                b.hidden_size,
                b.num_layers,
                b.num_heads,
                b.num_kv_heads,
                b.head_dim
            ),
            (128, 2, 4, 2, 32)
        );
        assert_eq!(model.config().tptt.mag_weight, 0.5);
        let mut state = model.new_state(crate::linear::CarryMode::Continue, None);
        let logits = model
            .forward(&[1, 5, 9], &mut state, crate::model::Logits::Last)
            .expect("forward")
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32");
        assert_eq!(logits.len(), shape.vocab);
        assert!(logits.iter().all(|x| x.is_finite()));
        assert!(shape.parameters() > 0);
        assert_eq!(
            LlamaShape::LLAMA_3_2_1B.parameters(),
            1_235_814_400,
            "Llama-3.2-1B's 1.24 B parameters"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The GGUF of a base (f32 matrices: no rounding) is the same model as its safetensors:
    /// names, the q/k row permutation and the tied head as llama.cpp lays them out; Q8_0 stays
    /// within its rounding. A vocabulary too small for the byte tokens is refused.
    #[test]
    fn the_gguf_of_a_base_is_the_same_model() {
        use candle_core::quantized::GgmlDType;
        let dir = std::env::temp_dir().join(format!("tptt-synth-gguf-{}", std::process::id()));
        let shape = LlamaShape::SMALL_D32;
        write_llama(&dir.join("base"), &shape, DType::F32, 11).expect("safetensors");
        let settings =
            crate::config::TpttSettings::injected("delta_product", 0.5, "base").expect("settings");
        let opts = crate::model::LoadOptions::default();
        let logits = |m: &crate::model::Model| -> Vec<f32> {
            let mut state = m.new_state(crate::linear::CarryMode::Continue, None);
            m.forward(&[1, 5, 9, 300, 7], &mut state, crate::model::Logits::Last)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .expect("forward")
        };
        let want = logits(
            &crate::model::Model::load_plain(&dir.join("base"), settings.clone(), &opts)
                .expect("load safetensors"),
        );
        for (dtype, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::Q8_0, 5e-2)] {
            let path = dir.join(format!("base-{dtype:?}.gguf"));
            write_llama_gguf(&path, &shape, dtype, 11).expect("gguf");
            let got = logits(
                &crate::model::Model::load_gguf_plain(&path, settings.clone(), &opts)
                    .expect("load gguf"),
            );
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < tol, "{dtype:?}: logits differ by {diff}");
        }
        let tiny = LlamaShape {
            vocab: 100,
            ..shape
        };
        assert!(write_llama_gguf(&dir.join("tiny.gguf"), &tiny, GgmlDType::F32, 1).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
