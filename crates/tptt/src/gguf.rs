//! Quantized bases from GGUF files (llama.cpp's format): Llama-architecture models such as
//! SmolLM2, and OpenELM (per-layer head counts and FFN widths from the metadata's arrays), with
//! their quantized matrices kept as stored: a decode step multiplies Q8_0, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q4_K, Q5_K and Q6_K with our kernels (`kernels.rs` and `kernels/`), other types and the
//! tensor path's single rows with candle's quantized kernels. TPTT LoRA adapters are then applied unmerged beside them
//! (`y = Wq·x + s·B(A x)`, see [`crate::weights::apply_adapter`]).
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` per head for its interleaved
//! RoPE. The linear branch is not invariant to that permutation (it multiplies q and u'
//! elementwise and pairs adjacent dims in the rot trick), so the rows are put back in the Hugging
//! Face order here, on the quantized bytes (quantization blocks run along rows).
//!
//! Nothing is re-quantized at load. Candle's CPU kernels for Q4_1, Q5_0 and Q5_1 have no SIMD
//! path (Q4_0, Q8_0 and the K-quants have one): the fused decode step multiplies them with ours
//! (`kernels/q4_1.rs`, `kernels/q5.rs`), a prompt of two rows or more widens them to f32
//! (`model/layers.rs`).
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
mod read;

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
    if arch == "openelm" {
        return openelm_config(path, c);
    }
    if arch != "llama" {
        return Err(Error::UnsupportedArchitecture(format!(
            "{arch} (GGUF bases: llama, openelm)"
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
    let layers = u("block_count")?;
    // Every layer has its own tensors: more layers than tensors is a corrupt count (and a
    // loop bound of billions for whatever walks the layers).
    if layers as usize > c.tensor_infos.len() {
        return Err(err(
            path,
            format!(
                "GGUF {arch}.block_count is {layers}, but the file holds {} tensors",
                c.tensor_infos.len()
            ),
        ));
    }
    cfg.insert("num_hidden_layers".into(), json!(layers));
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

/// An OpenELM GGUF's config (llama.cpp's converter writes the per-layer head counts and FFN
/// widths as arrays; its RoPE is the rotate-half kind, so nothing is permuted).
fn openelm_config(path: &Path, c: &Content) -> Result<BaseConfig> {
    let md = &c.metadata;
    let key = |k: &str| format!("openelm.{k}");
    let num = |v: &candle_core::quantized::gguf_file::Value| -> Option<usize> {
        v.to_u32()
            .ok()
            .map(|x| x as usize)
            .or_else(|| v.to_i32().ok().and_then(|x| usize::try_from(x).ok()))
            .or_else(|| v.to_u64().ok().and_then(|x| usize::try_from(x).ok()))
    };
    let list = |k: &str| -> Result<Vec<usize>> {
        let v = md
            .get(&key(k))
            .ok_or_else(|| err(path, format!("GGUF metadata lacks {}", key(k))))?;
        let items = v
            .to_vec()
            .map_err(|_| err(path, format!("{} is not an array", key(k))))?;
        items
            .iter()
            .map(|x| num(x).ok_or_else(|| err(path, format!("{} holds {x:?}", key(k)))))
            .collect()
    };
    let one = |k: &str| -> Result<usize> {
        md.get(&key(k))
            .and_then(num)
            .ok_or_else(|| err(path, format!("GGUF metadata lacks {}", key(k))))
    };
    let float = |k: &str, default: f64| {
        md.get(&key(k))
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
            .unwrap_or(default)
    };
    let embd = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| err(path, "GGUF lacks token_embd.weight"))?;
    let token = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let shared = crate::config::openelm::Shared {
        model_dim: one("embedding_length")?,
        head_dim: one("attention.key_length")?,
        vocab_size: embd.shape.dims().first().copied().unwrap_or(0),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta: float("rope.freq_base", 10000.0),
        max_context_length: one("context_length").unwrap_or(2048),
        tied: !c.tensor_infos.contains_key("output.weight"),
        qk_norm: c.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        hidden_act: crate::config::Activation::Silu,
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    let layers = one("block_count")?;
    let cfg = crate::config::openelm::from_lists(
        &list("attention.head_count")?,
        &list("attention.head_count_kv")?,
        &list("feed_forward_length")?,
        shared,
    )
    .map_err(|e| err(path, e.to_string()))?;
    if cfg.num_layers != layers {
        return Err(err(
            path,
            format!(
                "openelm.block_count is {layers} but the per-layer lists have {} entries",
                cfg.num_layers
            ),
        ));
    }
    Ok(cfg)
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
    let dtype = q.dtype();
    let out = unpermute_bytes(path, name, &q.data()?, (rows, cols, dtype), heads, 0)?;
    let storage = QStorage::from_data(Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// [`unpermute_rows`] on the stored bytes of a `[rows, cols]` `dtype` matrix, into a vector
/// with room for `capacity` bytes (for a repack in place after it).
fn unpermute_bytes(
    path: &Path,
    name: &str,
    data: &[u8],
    (rows, cols, dtype): (usize, usize, GgmlDType),
    heads: usize,
    capacity: usize,
) -> Result<Vec<u8>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(err(
            path,
            format!("{name}: {rows} rows do not split into {heads} heads of even size"),
        ));
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
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
    let mut out = Vec::with_capacity(capacity.max(data.len()));
    out.resize(data.len(), 0u8);
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
    Ok(out)
}

/// A matrix that the CPU's decode kernels take repacked ([`crate::model::Packed`]), read and
/// repacked in one allocation (reserved at its repacked size, read into, repacked in place);
/// `None` for any other tensor. The largest matrix (a vocabulary of 128k rows: 147 MB for the
/// 1B-class Q4_K model) was in memory twice while it was repacked, which set the load's peak.
fn read_packed<R: std::io::Read + std::io::Seek>(
    path: &Path,
    file: &mut R,
    (info, data_offset): (&candle_core::quantized::gguf_file::TensorInfo, u64),
    gname: &str,
    cfg: &BaseConfig,
) -> Result<Option<Weight>> {
    let (dtype, &[rows, cols]) = (info.ggml_dtype, info.shape.dims()) else {
        return Ok(None);
    };
    let Some(cap) = crate::model::Packed::packed_len(dtype, rows, cols) else {
        return Ok(None);
    };
    let bytes = read::stored_bytes(file, info, data_offset, cap)
        .map_err(|e| err(path, format!("{gname}: {e}")))?;
    let heads = if gname.ends_with("attn_q.weight") {
        Some(cfg.num_heads)
    } else if gname.ends_with("attn_k.weight") {
        Some(cfg.num_kv_heads)
    } else {
        None
    };
    let bytes = match heads {
        Some(h) => unpermute_bytes(path, gname, &bytes, (rows, cols, dtype), h, cap)?,
        None => bytes,
    };
    let packed = crate::model::Packed::from_stored(dtype, rows, cols, bytes)
        .map_err(|e| err(path, format!("{gname}: {e}")))?;
    Ok(Some(Weight::Packed(Arc::new(packed))))
}

/// Load a GGUF base: its config and its weights under Hugging Face names (matrices quantized,
/// norms dequantized to f32). An OpenELM GGUF's tensors get the names of OpenELM's own
/// checkpoints instead (its fused `qkv_proj` as stored; the FFN gate and up that llama.cpp's
/// converter split are put back into one `proj_1`), so that its TPTT adapter, which targets
/// `qkv_proj` / `out_proj`, applies as to a safetensors base.
pub fn load(path: &Path, device: &Device) -> Result<(BaseConfig, WeightMap)> {
    load_as(path, device, false)
}

/// [`load`], keeping F16 / BF16 matrices in their stored precision on the CPU when `keep_half`
/// (`LoadOptions::half_weights`) instead of widening them to f32.
pub fn load_as(path: &Path, device: &Device, keep_half: bool) -> Result<(BaseConfig, WeightMap)> {
    load_with(path, device, keep_half, false)
}

/// [`load_as`], with the matrices that the CPU's decode kernels take repacked as they are read
/// when `repack` (`Weight::Packed`; the model's loader asks for it on the CPU with AVX-512 VNNI).
pub fn load_with(
    path: &Path,
    device: &Device,
    keep_half: bool,
    repack: bool,
) -> Result<(BaseConfig, WeightMap)> {
    let keep_half = keep_half && device.is_cpu();
    let repack = repack && device.is_cpu();
    let (content, mut file) = read_content(path)?;
    let cfg = config_of(path, &content)?;
    let openelm = cfg.arch == crate::config::Architecture::OpenElm;
    let mut map = WeightMap::new();
    let mut ffn_halves: std::collections::BTreeMap<(usize, bool), QTensor> = Default::default();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gname in names {
        let (name, half) = if openelm {
            openelm_name(gname)
        } else {
            (hf_name(gname), None)
        };
        let name = name.ok_or_else(|| {
            err(
                path,
                format!("unexpected tensor {gname:?} in a {} GGUF", cfg.arch.name()),
            )
        })?;
        let info = (&content.tensor_infos[gname], content.tensor_data_offset);
        if repack && !openelm && half.is_none() {
            if let Some(w) = read_packed(path, &mut file, info, gname, &cfg)? {
                map.insert(name, w);
                continue;
            }
        }
        let q = read::tensor(
            &mut file,
            &content.tensor_infos[gname],
            content.tensor_data_offset,
            device,
        )
        .map_err(|e| err(path, format!("{gname}: {e}")))?;
        let q = if openelm {
            q
        } else if gname.ends_with("attn_q.weight") {
            unpermute_rows(path, gname, q, cfg.num_heads, device)?
        } else if gname.ends_with("attn_k.weight") {
            unpermute_rows(path, gname, q, cfg.num_kv_heads, device)?
        } else {
            q
        };
        match half {
            Some(key) => {
                ffn_halves.insert(key, q);
            }
            None => {
                map.insert(name, weight(q, device, keep_half)?);
            }
        }
    }
    // OpenELM: gate (first) and up rows back into one proj_1 per layer (the layers that have
    // halves: a header's layer count is not a loop bound, it may claim billions).
    let split: std::collections::BTreeSet<usize> = ffn_halves.keys().map(|&(l, _)| l).collect();
    for layer in split {
        let (Some(gate), Some(up)) = (
            ffn_halves.remove(&(layer, false)),
            ffn_halves.remove(&(layer, true)),
        ) else {
            continue;
        };
        let name = format!("transformer.layers.{layer}.ffn.proj_1.weight");
        map.insert(
            name,
            weight(concat_rows(path, gate, up, device)?, device, keep_half)?,
        );
    }
    if let Some(((layer, up), _)) = ffn_halves.into_iter().next() {
        return Err(err(
            path,
            format!(
                "blk.{layer}.ffn_{} has no {} beside it",
                if up { "up" } else { "gate" },
                if up { "ffn_gate" } else { "ffn_up" }
            ),
        ));
    }
    Ok((cfg, map))
}

/// A GGUF tensor as a weight: vectors and float matrices dense f32 (F16 / BF16 matrices as
/// stored with `keep_half`), quantized matrices kept as stored (see the module doc).
fn weight(q: QTensor, device: &Device, keep_half: bool) -> Result<Weight> {
    Ok(match q.dtype() {
        _ if q.rank() == 1 => Weight::Dense(q.dequantize(device)?),
        GgmlDType::F16 | GgmlDType::BF16 if keep_half => {
            let dtype = match q.dtype() {
                GgmlDType::F16 => candle_core::DType::F16,
                _ => candle_core::DType::BF16,
            };
            Weight::Dense(candle_core::Tensor::from_raw_buffer(
                &q.data()?,
                dtype,
                q.shape().dims(),
                device,
            )?)
        }
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Weight::Dense(q.dequantize(device)?),
        // Every quantized type as stored (Q5_0 / Q5_1 too: the decode step has kernels for
        // them, prompts widen them; see the module doc).
        _ => Weight::Quant(Arc::new(q)),
    })
}

/// Bytes of one row of a 2-D quantized tensor, and its (rows, cols).
fn row_layout(q: &QTensor) -> Result<(usize, usize, usize)> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    if !cols.is_multiple_of(dtype.block_size()) {
        return Err(Error::config(format!(
            "a {dtype:?} matrix of {cols} columns is not made of whole blocks"
        )));
    }
    Ok((rows, cols, cols / dtype.block_size() * dtype.type_size()))
}

/// Rows `start..start + len` of a 2-D tensor as stored (quantization blocks run along rows, so
/// rows are independent byte ranges).
pub(crate) fn split_rows(
    q: &QTensor,
    start: usize,
    len: usize,
    device: &Device,
) -> Result<QTensor> {
    let (rows, cols, row_bytes) = row_layout(q)?;
    let data = q.data()?;
    if start + len > rows || data.len() != rows * row_bytes {
        return Err(Error::config(format!(
            "rows {start}..{} of a {rows}-row {:?} matrix",
            start + len,
            q.dtype()
        )));
    }
    let bytes = data[start * row_bytes..(start + len) * row_bytes].to_vec();
    let storage = QStorage::from_data(Cow::Owned(bytes), device, q.dtype())?;
    Ok(QTensor::new(storage, (len, cols))?)
}

/// `a`'s rows then `b`'s: as stored when both have the same type and width, else both widened
/// to f32 (llama.cpp may quantize two halves of one matrix differently).
fn concat_rows(path: &Path, a: QTensor, b: QTensor, device: &Device) -> Result<QTensor> {
    let ((ra, ca), (rb, cb)) = (a.shape().dims2()?, b.shape().dims2()?);
    if ca != cb {
        return Err(err(
            path,
            format!("FFN gate [{ra}, {ca}] and up [{rb}, {cb}] differ in width"),
        ));
    }
    if a.dtype() == b.dtype() {
        let mut bytes = a.data()?.into_owned();
        bytes.extend_from_slice(&b.data()?);
        let storage = QStorage::from_data(Cow::Owned(bytes), device, a.dtype())?;
        return Ok(QTensor::new(storage, (ra + rb, ca))?);
    }
    let both = candle_core::Tensor::cat(&[&a.dequantize(device)?, &b.dequantize(device)?], 0)?;
    Ok(QTensor::quantize(&both, GgmlDType::F32)?)
}

/// An OpenELM GGUF tensor's name in OpenELM's checkpoints; for the FFN halves llama.cpp split
/// off `proj_1`, the layer and whether it is the up half instead.
fn openelm_name(g: &str) -> (Option<String>, Option<(usize, bool)>) {
    let fixed = match g {
        "token_embd.weight" => Some("transformer.token_embeddings.weight"),
        "output_norm.weight" => Some("transformer.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return (Some(f.to_string()), None);
    }
    let Some((layer, part)) = g.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
        return (None, None);
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return (None, None);
    };
    let name = |rest: &str| Some(format!("transformer.layers.{layer}.{rest}"));
    match part {
        "attn_norm.weight" => (name("attn_norm.weight"), None),
        "attn_qkv.weight" => (name("attn.qkv_proj.weight"), None),
        "attn_q_norm.weight" => (name("attn.q_norm.weight"), None),
        "attn_k_norm.weight" => (name("attn.k_norm.weight"), None),
        "attn_output.weight" => (name("attn.out_proj.weight"), None),
        "ffn_norm.weight" => (name("ffn_norm.weight"), None),
        "ffn_gate.weight" => (name("ffn.proj_1.weight"), Some((layer, false))),
        "ffn_up.weight" => (name("ffn.proj_1.weight"), Some((layer, true))),
        "ffn_down.weight" => (name("ffn.proj_2.weight"), None),
        _ => (None, None),
    }
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
