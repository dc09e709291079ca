//! OpenELM's checkpoint layout (`transformer.layers.{i}.attn.qkv_proj`, `ffn.proj_1`, …) mapped
//! onto the decoder's names: the fused `qkv_proj` split by rows into the layer's q / k / v
//! projections (`[q heads…, k heads…, v heads…]`, as OpenELM and tptt's `split_qkv` read it),
//! the fused `proj_1` into the gate (first half of its rows) and up projections. Runs after
//! the adapter is merged (its LoRA targets the fused names), so every split is of the adapted
//! weight. Every OpenELM tensor a layer needs is looked for under its own name first, so a
//! missing or misshapen one is reported as the checkpoint names it.

use candle_core::Tensor;

use crate::config::{BaseConfig, QkNorm};
use crate::error::{Error, Result};
use crate::weights::{Weight, WeightMap};

/// `map` with OpenELM's names replaced by the decoder's (other tensors are kept).
pub(super) fn llama_names(mut map: WeightMap, b: &BaseConfig, location: &str) -> Result<WeightMap> {
    let mut take = |name: &str, dims: &[usize]| -> Result<Tensor> {
        let w = map.remove(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            location: location.into(),
        })?;
        if w.dims() != dims {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                got: w.dims().to_vec(),
                expected: dims.to_vec(),
            });
        }
        match w {
            Weight::Dense(t) => Ok(t),
            Weight::Quant(_) => Err(Error::config(format!(
                "{name}: an OpenELM base must be dense (safetensors); quantized OpenELM weights are not supported"
            ))),
        }
    };
    let (e, d) = (b.hidden_size, b.head_dim);
    let mut out = WeightMap::new();
    let mut put = |name: String, t: Tensor| {
        out.insert(name, Weight::Dense(t));
    };
    put(
        "model.embed_tokens.weight".into(),
        take("transformer.token_embeddings.weight", &[b.vocab_size, e])?,
    );
    put(
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
        let qkv = take(&format!("{src}.attn.qkv_proj.weight"), &[q + 2 * kv, e])?;
        put(
            format!("{dst}.self_attn.q_proj.weight"),
            qkv.narrow(0, 0, q)?.contiguous()?,
        );
        put(
            format!("{dst}.self_attn.k_proj.weight"),
            qkv.narrow(0, q, kv)?.contiguous()?,
        );
        put(
            format!("{dst}.self_attn.v_proj.weight"),
            qkv.narrow(0, q + kv, kv)?.contiguous()?,
        );
        put(
            format!("{dst}.self_attn.o_proj.weight"),
            take(&format!("{src}.attn.out_proj.weight"), &[e, q])?,
        );
        if b.qk_norm == QkNorm::PerHead {
            for n in ["q_norm", "k_norm"] {
                put(
                    format!("{dst}.self_attn.{n}.weight"),
                    take(&format!("{src}.attn.{n}.weight"), &[d])?,
                );
            }
        }
        put(
            format!("{dst}.input_layernorm.weight"),
            take(&format!("{src}.attn_norm.weight"), &[e])?,
        );
        put(
            format!("{dst}.post_attention_layernorm.weight"),
            take(&format!("{src}.ffn_norm.weight"), &[e])?,
        );
        let f = l.intermediate_size;
        let proj_1 = take(&format!("{src}.ffn.proj_1.weight"), &[2 * f, e])?;
        put(
            format!("{dst}.mlp.gate_proj.weight"),
            proj_1.narrow(0, 0, f)?.contiguous()?,
        );
        put(
            format!("{dst}.mlp.up_proj.weight"),
            proj_1.narrow(0, f, f)?.contiguous()?,
        );
        put(
            format!("{dst}.mlp.down_proj.weight"),
            take(&format!("{src}.ffn.proj_2.weight"), &[e, f])?,
        );
    }
    // An untied head keeps its name; anything else is left for the loader to ignore.
    out.extend(map);
    Ok(out)
}
