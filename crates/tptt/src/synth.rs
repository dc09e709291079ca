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
    let (h, d) = (shape.hidden, shape.head_dim);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut next = seed;
    let mut matrix = |name: String, rows: usize, cols: usize| -> Result<(String, Tensor)> {
        next = next.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let values = uniform(rows * cols, 1.0 / (cols as f32).sqrt(), next);
        Ok((
            name,
            Tensor::from_vec(values, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?,
        ))
    };
    let ones = |name: String| -> Result<(String, Tensor)> {
        Ok((name, Tensor::ones(h, dtype, &Device::Cpu)?))
    };
    tensors.push(matrix("model.embed_tokens.weight".into(), shape.vocab, h)?);
    for i in 0..shape.layers {
        let p = format!("model.layers.{i}");
        tensors.push(matrix(
            format!("{p}.self_attn.q_proj.weight"),
            shape.heads * d,
            h,
        )?);
        tensors.push(matrix(
            format!("{p}.self_attn.k_proj.weight"),
            shape.kv_heads * d,
            h,
        )?);
        tensors.push(matrix(
            format!("{p}.self_attn.v_proj.weight"),
            shape.kv_heads * d,
            h,
        )?);
        tensors.push(matrix(
            format!("{p}.self_attn.o_proj.weight"),
            h,
            shape.heads * d,
        )?);
        tensors.push(matrix(
            format!("{p}.mlp.gate_proj.weight"),
            shape.intermediate,
            h,
        )?);
        tensors.push(matrix(
            format!("{p}.mlp.up_proj.weight"),
            shape.intermediate,
            h,
        )?);
        tensors.push(matrix(
            format!("{p}.mlp.down_proj.weight"),
            h,
            shape.intermediate,
        )?);
        tensors.push(ones(format!("{p}.input_layernorm.weight"))?);
        tensors.push(ones(format!("{p}.post_attention_layernorm.weight"))?);
    }
    tensors.push(ones("model.norm.weight".into())?);
    let mut config = shape.config();
    config["torch_dtype"] = json!(match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    });
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Input(format!("config.json: {e}")))?;
    std::fs::write(dir.join("config.json"), text).map_err(io)?;
    candle_core::safetensors::save(
        &tensors
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
        dir.join("model.safetensors"),
    )?;
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
}
