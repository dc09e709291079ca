//! Quantized bases from GGUF files (llama.cpp's format): Llama-architecture models such as
//! SmolLM2, with their Q4_0 / Q4_1 / Q8_0 / K-quant matrices kept quantized and multiplied by
//! candle's quantized kernels. TPTT LoRA adapters are then applied unmerged beside them
//! (`y = Wq·x + s·B(A x)`, see [`crate::weights::apply_adapter`]).
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` per head for its interleaved
//! RoPE. The linear branch is not invariant to that permutation (it multiplies q and u'
//! elementwise and pairs adjacent dims in the rot trick), so the rows are put back in the Hugging
//! Face order here, on the quantized bytes (quantization blocks run along rows).
//!
//! On the CPU, Q4_1 / Q5_0 / Q5_1 matrices are re-quantized to Q8_0 at load: candle has no SIMD
//! kernel for them (Q4_0, Q8_0 and the K-quants have one).
//!
//! Every file's header is checked by our own bounded reader ([`header`]) before candle parses
//! it: candle panics on some hostile values (`general.alignment` = 0) and trusts others.
//! Both ways in go through it: [`read_config`] (a repo opened with a GGUF base, `tptt inspect
//! --base FILE.gguf`) and [`load`].

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use serde_json::{json, Map};

use crate::config::BaseConfig;
use crate::error::{Error, Result};
use crate::weights::{Weight, WeightMap};

pub mod header;

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parse a GGUF file's header: checked by [`header::check_file`] first, then read by candle
/// (whose reading must then agree on where the data starts).
fn read_content(path: &Path) -> Result<(Content, std::fs::File)> {
    let checked = header::check_file(path)?;
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content =
        Content::read(&mut f).map_err(|e| err(path, format!("not a valid GGUF file: {e}")))?;
    if content.tensor_data_offset != checked.data_offset
        || content.tensor_infos.len() != checked.tensors.len()
    {
        return Err(err(
            path,
            format!(
                "the GGUF header reads differently here ({} tensors, data at byte {}) and in candle ({} tensors, data at byte {})",
                checked.tensors.len(),
                checked.data_offset,
                content.tensor_infos.len(),
                content.tensor_data_offset
            ),
        ));
    }
    Ok((content, f))
}

/// The Hugging Face style base config described by a GGUF file's metadata.
pub fn read_config(path: &Path) -> Result<BaseConfig> {
    let (content, _) = read_content(path)?;
    config_of(path, &content)
}

fn config_of(path: &Path, c: &Content) -> Result<BaseConfig> {
    let md = &c.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| err(path, "GGUF metadata lacks general.architecture"))?
        .clone();
    if arch != "llama" {
        return Err(Error::UnsupportedArchitecture(format!(
            "{arch} (GGUF bases: llama only)"
        )));
    }
    let u = |key: &str| -> Result<u64> {
        md.get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
            .ok_or_else(|| err(path, format!("GGUF metadata lacks {arch}.{key}")))
    };
    let f = |key: &str, default: f64| -> f64 {
        md.get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(default)
    };
    if md.contains_key(&format!("{arch}.rope.scaling.type"))
        || c.tensor_infos.contains_key("rope_freqs.weight")
    {
        return Err(err(
            path,
            "GGUF RoPE scaling (rope_freqs / rope.scaling) is not supported yet",
        ));
    }
    let embd = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| err(path, "GGUF lacks token_embd.weight"))?;
    let vocab = embd.shape.dims().first().copied().unwrap_or(0);
    let heads = u("attention.head_count")?;
    let mut cfg = Map::new();
    cfg.insert("model_type".into(), json!("llama"));
    cfg.insert("hidden_size".into(), json!(u("embedding_length")?));
    cfg.insert("intermediate_size".into(), json!(u("feed_forward_length")?));
    cfg.insert("num_hidden_layers".into(), json!(u("block_count")?));
    cfg.insert("num_attention_heads".into(), json!(heads));
    cfg.insert(
        "num_key_value_heads".into(),
        json!(u("attention.head_count_kv").unwrap_or(heads)),
    );
    if let Ok(kl) = u("attention.key_length") {
        cfg.insert("head_dim".into(), json!(kl));
    }
    cfg.insert(
        "rms_norm_eps".into(),
        json!(f("attention.layer_norm_rms_epsilon", 1e-5)),
    );
    cfg.insert("rope_theta".into(), json!(f("rope.freq_base", 10000.0)));
    cfg.insert(
        "max_position_embeddings".into(),
        json!(u("context_length").unwrap_or(2048)),
    );
    cfg.insert("vocab_size".into(), json!(vocab));
    cfg.insert(
        "tie_word_embeddings".into(),
        json!(!c.tensor_infos.contains_key("output.weight")),
    );
    for (k, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(v) = md.get(k).and_then(|v| v.to_u32().ok()) {
            cfg.insert(hf.into(), json!(v));
        }
    }
    BaseConfig::from_json(&cfg, Some(path))
}

/// Put llama.cpp's permuted q/k rows back in Hugging Face order:
/// HF row `(h, t, j)` = GGUF row `(h, j, t)` with `t ∈ {0, 1}`, `j < D/2`.
fn unpermute_rows(
    path: &Path,
    name: &str,
    q: QTensor,
    heads: usize,
    device: &Device,
) -> Result<QTensor> {
    let (rows, cols) = q
        .shape()
        .dims2()
        .map_err(|e| err(path, format!("{name}: {e}")))?;
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(err(
            path,
            format!("{name}: {rows} rows do not split into {heads} heads of even size"),
        ));
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    if data.len() != rows * row_bytes {
        return Err(err(
            path,
            format!(
                "{name}: {} bytes for {rows} rows of {row_bytes}",
                data.len()
            ),
        ));
    }
    let hd = rows / heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..hd / 2 {
                let dst = h * hd + t * (hd / 2) + j;
                let src = h * hd + 2 * j + t;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Load a GGUF base: its config and its weights under Hugging Face names (matrices quantized,
/// norms dequantized to f32).
pub fn load(path: &Path, device: &Device) -> Result<(BaseConfig, WeightMap)> {
    let (content, mut file) = read_content(path)?;
    let cfg = config_of(path, &content)?;
    let mut map = WeightMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gname in names {
        let hf = hf_name(gname)
            .ok_or_else(|| err(path, format!("unexpected tensor {gname:?} in a llama GGUF")))?;
        let q = content
            .tensor(&mut file, gname, device)
            .map_err(|e| err(path, format!("{gname}: {e}")))?;
        let q = if gname.ends_with("attn_q.weight") {
            unpermute_rows(path, gname, q, cfg.num_heads, device)?
        } else if gname.ends_with("attn_k.weight") {
            unpermute_rows(path, gname, q, cfg.num_kv_heads, device)?
        } else {
            q
        };
        let w = match q.dtype() {
            _ if q.rank() == 1 => Weight::Dense(q.dequantize(device)?),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Weight::Dense(q.dequantize(device)?)
            }
            // candle's CPU kernels for these have no SIMD path (~10x slower than Q8_0):
            // re-quantize to Q8_0 at load (8.5 bits per weight; the extra rounding is far below
            // the 4/5-bit grid's own).
            GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 if device.is_cpu() => {
                Weight::Quant(Arc::new(QTensor::quantize(
                    &q.dequantize(device)?,
                    GgmlDType::Q8_0,
                )?))
            }
            _ => Weight::Quant(Arc::new(q)),
        };
        map.insert(hf, w);
    }
    Ok((cfg, map))
}

/// llama.cpp tensor name → Hugging Face name.
fn hf_name(g: &str) -> Option<String> {
    let fixed = match g {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}
