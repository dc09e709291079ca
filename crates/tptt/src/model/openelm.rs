//! OpenELM's checkpoint layout (`transformer.layers.{i}.attn.qkv_proj`, `ffn.proj_1`, …) mapped
//! onto the decoder's names: the fused `qkv_proj` split by rows into the layer's q / k / v
//! projections (`[q heads…, k heads…, v heads…]`, as OpenELM and tptt's `split_qkv` read it),
//! the fused `proj_1` into the gate (first half of its rows) and up projections. Runs after
//! the adapter is applied (its LoRA targets the fused names), so every split is of the adapted
//! weight: merged into a dense one, or — beside a quantized one (a GGUF base) — the LoRA's `B`
//! split by the same rows (`A` is shared: each row of `B·A` belongs to one projection). Every
//! OpenELM tensor a layer needs is looked for under its own name first, so a missing or
//! misshapen one is reported as the checkpoint names it.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Device;

use super::load::take_weight;
use crate::config::{BaseConfig, QkNorm};
use crate::error::{Error, Result};
use crate::weights::{LoraSide, Weight, WeightMap};

/// `map` with OpenELM's names replaced by the decoder's (other tensors are kept), and the
/// unmerged LoRAs (`unmerged`, by base weight name) renamed and split the same way.
pub(super) fn llama_names(
    mut map: WeightMap,
    unmerged: &HashMap<String, LoraSide>,
    b: &BaseConfig,
    location: &str,
    device: &Device,
) -> Result<(WeightMap, HashMap<String, LoraSide>)> {
    let mut take = |name: &str, dims: &[usize]| take_weight(&mut map, name, dims, location);
    let rows = |w: &Weight, start: usize, len: usize| -> Result<Weight> {
        Ok(match w {
            Weight::Dense(t) => Weight::Dense(t.narrow(0, start, len)?.contiguous()?),
            Weight::Quant(q) => {
                Weight::Quant(Arc::new(crate::gguf::split_rows(q, start, len, device)?))
            }
            // (An OpenELM GGUF is never repacked as it is read: its fused rows are split here.)
            Weight::Packed(_) => {
                return Err(crate::error::Error::State(
                    "an OpenELM matrix was repacked before its rows were split".into(),
                ))
            }
        })
    };
    let lora_rows = |l: &LoraSide, start: usize, len: usize| -> Result<LoraSide> {
        Ok(LoraSide {
            a: l.a.clone(),
            b: l.b.narrow(0, start, len)?.contiguous()?,
            scale: l.scale,
        })
    };
    let (e, d) = (b.hidden_size, b.head_dim);
    let mut out = WeightMap::new();
    let mut loras = HashMap::new();
    out.insert(
        "model.embed_tokens.weight".into(),
        take("transformer.token_embeddings.weight", &[b.vocab_size, e])?,
    );
    out.insert(
        "model.norm.weight".into(),
        take("transformer.norm.weight", &[e])?,
    );
    for i in 0..b.num_layers {
        let l = b.layer(i);
        let (src, dst) = (
            format!("transformer.layers.{i}"),
            format!("model.layers.{i}"),
        );
        let (q, kv) = (l.num_heads * d, l.num_kv_heads * d);
        let qkv_name = format!("{src}.attn.qkv_proj.weight");
        let qkv = take(&qkv_name, &[q + 2 * kv, e])?;
        for (part, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
            let name = format!("{dst}.self_attn.{part}_proj.weight");
            if let Some(side) = unmerged.get(&qkv_name) {
                loras.insert(name.clone(), lora_rows(side, start, len)?);
            }
            out.insert(name, rows(&qkv, start, len)?);
        }
        let out_name = format!("{src}.attn.out_proj.weight");
        let o = take(&out_name, &[e, q])?;
        let o_name = format!("{dst}.self_attn.o_proj.weight");
        if let Some(side) = unmerged.get(&out_name) {
            loras.insert(o_name.clone(), side.clone());
        }
        out.insert(o_name, o);
        if b.qk_norm == QkNorm::PerHead {
            for n in ["q_norm", "k_norm"] {
                out.insert(
                    format!("{dst}.self_attn.{n}.weight"),
                    take(&format!("{src}.attn.{n}.weight"), &[d])?,
                );
            }
        }
        out.insert(
            format!("{dst}.input_layernorm.weight"),
            take(&format!("{src}.attn_norm.weight"), &[e])?,
        );
        out.insert(
            format!("{dst}.post_attention_layernorm.weight"),
            take(&format!("{src}.ffn_norm.weight"), &[e])?,
        );
        let f = l.intermediate_size;
        let proj_1 = take(&format!("{src}.ffn.proj_1.weight"), &[2 * f, e])?;
        out.insert(format!("{dst}.mlp.gate_proj.weight"), rows(&proj_1, 0, f)?);
        out.insert(format!("{dst}.mlp.up_proj.weight"), rows(&proj_1, f, f)?);
        out.insert(
            format!("{dst}.mlp.down_proj.weight"),
            take(&format!("{src}.ffn.proj_2.weight"), &[e, f])?,
        );
    }
    // An unmerged LoRA on anything else would be lost by the renaming: refuse it.
    if let Some(name) = unmerged
        .keys()
        .find(|n| !n.ends_with(".attn.qkv_proj.weight") && !n.ends_with(".attn.out_proj.weight"))
    {
        return Err(Error::config(format!(
            "{name}: an OpenELM adapter may target qkv_proj and out_proj only"
        )));
    }
    // An untied head keeps its name; anything else is left for the loader to ignore.
    out.extend(map);
    Ok((out, loras))
}

/// Whether `map` holds OpenELM's own names (a dense checkpoint, or a GGUF read by
/// [`crate::gguf::load`]) rather than the decoder's.
pub(super) fn has_openelm_names(map: &WeightMap) -> bool {
    map.contains_key("transformer.token_embeddings.weight")
        || !map.contains_key("model.embed_tokens.weight")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Tensor;

    /// A quantized fused projection split by rows equals the split of its dequantized matrix
    /// (the blocks of a row are its own bytes); rows past the end are refused.
    #[test]
    fn quantized_rows_split_like_dense_ones() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 64), &dev).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8");
        let whole = q.dequantize(&dev).expect("deq");
        for (start, len) in [(0, 32), (32, 32), (64, 32), (10, 7)] {
            let part = crate::gguf::split_rows(&q, start, len, &dev)
                .and_then(|p| Ok(p.dequantize(&dev)?))
                .expect("split");
            let want = whole.narrow(0, start, len).expect("narrow");
            let d = (part - want)
                .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(d, 0.0, "rows {start}..{}", start + len);
        }
        assert!(crate::gguf::split_rows(&q, 90, 7, &dev).is_err());
    }
}
