//! Apple's OpenELM `config.json` (the `apple/OpenELM-*` remote code's `OpenELMConfig`): its own
//! key names (`model_dim`, `num_transformer_layers`, …) and layer-wise scaling — the query heads
//! of each layer from `qkv_multipliers`, its KV heads from `num_gqa_groups`, its FFN width from
//! `ffn_multipliers` — computed as that code's `__post_init__` computes them (`np.linspace`
//! rounded to two decimals, `make_divisible`), so that a config whose stored per-layer lists
//! were edited or truncated is refused instead of misread.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    from_object, token_ids, Activation, Architecture, BaseConfig, LayerDims, NormKind, QkNorm,
    RopeScaling,
};
use crate::error::{Error, Result};

/// The most layers a config may declare (the per-layer lists are built eagerly).
const MAX_LAYERS: usize = 1 << 12;

#[derive(Debug, Deserialize)]
struct RawOpenElm {
    num_transformer_layers: usize,
    model_dim: usize,
    head_dim: usize,
    vocab_size: usize,
    #[serde(default = "one")]
    num_gqa_groups: usize,
    #[serde(default = "default_qkv")]
    qkv_multipliers: Value,
    #[serde(default = "default_ffn")]
    ffn_multipliers: Value,
    #[serde(default = "default_divisor")]
    ffn_dim_divisor: usize,
    #[serde(default = "yes")]
    ffn_with_glu: bool,
    #[serde(default = "default_act")]
    activation_fn_name: String,
    #[serde(default = "default_norm")]
    normalization_layer_name: String,
    #[serde(default)]
    normalize_qk_projections: bool,
    #[serde(default)]
    share_input_output_layers: bool,
    #[serde(default = "default_rope")]
    rope_freq_constant: f64,
    #[serde(default = "default_ctx")]
    max_context_length: usize,
    tie_word_embeddings: Option<bool>,
    num_query_heads: Option<Value>,
    num_kv_heads: Option<Value>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_qkv() -> Value {
    Value::from(1.0)
}
fn default_ffn() -> Value {
    Value::from(4.0)
}
fn default_divisor() -> usize {
    256
}
fn default_act() -> String {
    "swish".into()
}
fn default_norm() -> String {
    "rms_norm".into()
}
fn default_rope() -> f64 {
    10000.0
}
fn default_ctx() -> usize {
    2048
}

/// `make_divisible` of the OpenELM config: `v` rounded to a multiple of `divisor` (at least
/// `divisor`), rounded up when rounding down would lose more than 10 %.
pub(crate) fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    // Python: int(v + d / 2) // d * d, with int() truncating toward zero.
    let down = (((v + d / 2.0).trunc() as usize) / divisor) * divisor;
    let mut new_v = down.max(divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// `round(v, 2)` for every value of `np.linspace(a, b, n)` (numpy: `i * step + a`, the last one
/// exactly `b`). Python's `round` to two decimals is the correctly rounded decimal of the binary
/// value, as Rust's `{:.2}` formatting is.
fn linspace_rounded(a: f64, b: f64, n: usize) -> Vec<f64> {
    let round2 = |v: f64| format!("{v:.2}").parse::<f64>().unwrap_or(v);
    if n == 1 {
        return vec![round2(a)];
    }
    let step = (b - a) / (n - 1) as f64;
    (0..n)
        .map(|i| round2(if i == n - 1 { b } else { i as f64 * step + a }))
        .collect()
}

/// A multiplier key: one number for every layer, two numbers spaced over the layers, or (FFN
/// only) one number per layer.
fn multipliers(v: &Value, key: &str, layers: usize, per_layer_ok: bool) -> Result<Vec<f64>> {
    let bad = |why: String| Error::config(format!("{key}: {why}"));
    let num = |x: &Value| {
        x.as_f64()
            .filter(|m| m.is_finite() && *m > 0.0 && *m <= 1e6)
            .ok_or_else(|| bad(format!("{x} is not a positive number")))
    };
    match v {
        Value::Number(_) => Ok(vec![num(v)?; layers]),
        Value::Array(a) if a.len() == 2 => Ok(linspace_rounded(num(&a[0])?, num(&a[1])?, layers)),
        Value::Array(a) if per_layer_ok && a.len() == layers => a.iter().map(num).collect(),
        Value::Array(a) => Err(bad(format!(
            "{} entries for {layers} layers (expected one number, two{})",
            a.len(),
            if per_layer_ok {
                ", or one per layer"
            } else {
                ""
            }
        ))),
        other => Err(bad(format!("expected a number or a list, got {other}"))),
    }
}

/// A stored per-layer list (`num_query_heads`, `num_kv_heads`), checked against the values the
/// multipliers give (OpenELM recomputes them; a list that disagrees means an edited config).
fn check_stored(v: &Option<Value>, key: &str, computed: &[usize]) -> Result<()> {
    let Some(v) = v else { return Ok(()) };
    let stored: Vec<usize> = match v {
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::config(format!("{key}: expected a list of integers")))?,
        Value::Null => return Ok(()),
        // OpenELMConfig's constructor accepts one number, which its post-init replaces.
        Value::Number(_) => return Ok(()),
        other => {
            return Err(Error::config(format!(
                "{key}: expected a list of integers, got {other}"
            )))
        }
    };
    if stored.len() != computed.len() {
        return Err(Error::config(format!(
            "{key} has {} entries for {} layers (num_transformer_layers)",
            stored.len(),
            computed.len()
        )));
    }
    if stored != computed {
        return Err(Error::config(format!(
            "{key} {stored:?} disagrees with qkv_multipliers and num_gqa_groups, which give {computed:?}"
        )));
    }
    Ok(())
}

/// Validate an OpenELM config (base or merged) into a [`BaseConfig`].
pub(super) fn base_config(map: &Map<String, Value>) -> Result<BaseConfig> {
    let raw: RawOpenElm = from_object(map).map_err(Error::config)?;
    let layers = raw.num_transformer_layers;
    if layers == 0 || layers > MAX_LAYERS {
        return Err(Error::config(format!(
            "num_transformer_layers must be between 1 and {MAX_LAYERS}, got {layers}"
        )));
    }
    if raw.model_dim == 0 || raw.model_dim > 1 << 20 || raw.vocab_size == 0 {
        return Err(Error::config(format!(
            "model_dim must be between 1 and {} and vocab_size positive, got {} and {}",
            1 << 20,
            raw.model_dim,
            raw.vocab_size
        )));
    }
    if raw.head_dim == 0 || !raw.head_dim.is_multiple_of(2) || raw.head_dim > 1 << 16 {
        return Err(Error::config(format!(
            "head_dim {} must be even, positive and at most {}",
            raw.head_dim,
            1 << 16
        )));
    }
    if raw.num_gqa_groups == 0 || raw.num_gqa_groups > 1024 {
        return Err(Error::config(format!(
            "num_gqa_groups must be between 1 and 1024, got {}",
            raw.num_gqa_groups
        )));
    }
    if raw.ffn_dim_divisor == 0 || raw.ffn_dim_divisor > 1 << 20 {
        return Err(Error::config(format!(
            "ffn_dim_divisor must be between 1 and {}, got {}",
            1 << 20,
            raw.ffn_dim_divisor
        )));
    }
    if !raw.ffn_with_glu {
        return Err(Error::config(
            "ffn_with_glu false is not supported (every released OpenELM uses the gated FFN)",
        ));
    }
    let hidden_act = match raw.activation_fn_name.as_str() {
        "swish" | "silu" => Activation::Silu,
        "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
        other => {
            return Err(Error::config(format!(
                "activation_fn_name {other:?} is not supported (swish, silu, gelu_pytorch_tanh)"
            )))
        }
    };
    if raw.normalization_layer_name != "rms_norm" {
        return Err(Error::config(format!(
            "normalization_layer_name {:?} is not supported (rms_norm)",
            raw.normalization_layer_name
        )));
    }
    if !(raw.rope_freq_constant.is_finite() && raw.rope_freq_constant > 1.0) {
        return Err(Error::config(format!(
            "rope_freq_constant must be a number > 1, got {}",
            raw.rope_freq_constant
        )));
    }

    // Layer-wise scaling, as OpenELMConfig.__post_init__ computes it.
    let qkv = multipliers(&raw.qkv_multipliers, "qkv_multipliers", layers, false)?;
    let ffn = multipliers(&raw.ffn_multipliers, "ffn_multipliers", layers, true)?;
    let unit = raw.head_dim * raw.num_gqa_groups;
    let heads: Vec<usize> = qkv
        .iter()
        .map(|m| make_divisible(raw.model_dim as f64 * m, unit) / raw.head_dim)
        .collect();
    let kv_heads: Vec<usize> = heads.iter().map(|h| h / raw.num_gqa_groups).collect();
    check_stored(&raw.num_query_heads, "num_query_heads", &heads)?;
    check_stored(&raw.num_kv_heads, "num_kv_heads", &kv_heads)?;
    let widths: Vec<usize> = ffn
        .iter()
        .map(|m| make_divisible(raw.model_dim as f64 * m, raw.ffn_dim_divisor))
        .collect();
    let too_big = |n: usize| n > 1 << 24;
    if let Some(i) = (0..layers).find(|&i| too_big(heads[i] * raw.head_dim) || too_big(widths[i])) {
        return Err(Error::config(format!(
            "layer {i}: {} query heads × {} and an FFN of {} are beyond any real model",
            heads[i], raw.head_dim, widths[i]
        )));
    }
    let dims: Vec<LayerDims> = (0..layers)
        .map(|i| LayerDims {
            num_heads: heads[i],
            num_kv_heads: kv_heads[i],
            intermediate_size: widths[i],
        })
        .collect();
    Ok(assemble(
        dims,
        Shared {
            model_dim: raw.model_dim,
            head_dim: raw.head_dim,
            vocab_size: raw.vocab_size,
            // OpenELMRMSNorm's default; the config has no key for it.
            rms_norm_eps: 1e-6,
            rope_theta: raw.rope_freq_constant,
            max_context_length: raw.max_context_length,
            // Shared layers have no head at all; an unshared head is still tied to the
            // embeddings by transformers when the remote code runs under it, unless the config
            // says otherwise (OpenELMConfig leaves PretrainedConfig's `tie_word_embeddings` at
            // true).
            tied: raw.share_input_output_layers || raw.tie_word_embeddings.unwrap_or(true),
            qk_norm: raw.normalize_qk_projections,
            hidden_act,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        },
    ))
}

/// What every layer of an OpenELM shares.
pub(crate) struct Shared {
    pub(crate) model_dim: usize,
    pub(crate) head_dim: usize,
    pub(crate) vocab_size: usize,
    pub(crate) rms_norm_eps: f64,
    pub(crate) rope_theta: f64,
    pub(crate) max_context_length: usize,
    pub(crate) tied: bool,
    pub(crate) qk_norm: bool,
    pub(crate) hidden_act: Activation,
    pub(crate) bos_token_id: Option<u32>,
    pub(crate) eos_token_ids: Vec<u32>,
}

/// An OpenELM config from explicit per-layer lists (a GGUF's `openelm.attention.head_count`,
/// `…head_count_kv` and `openelm.feed_forward_length` arrays), each named in its error.
pub(crate) fn from_lists(
    heads: &[usize],
    kv_heads: &[usize],
    widths: &[usize],
    shared: Shared,
) -> Result<BaseConfig> {
    let layers = heads.len();
    if layers == 0 || layers > MAX_LAYERS {
        return Err(Error::config(format!(
            "attention.head_count has {layers} layers (1 to {MAX_LAYERS})"
        )));
    }
    for (key, list) in [
        ("attention.head_count_kv", kv_heads),
        ("feed_forward_length", widths),
    ] {
        if list.len() != layers {
            return Err(Error::config(format!(
                "{key} has {} entries for {layers} layers (attention.head_count)",
                list.len()
            )));
        }
    }
    if shared.head_dim == 0 || !shared.head_dim.is_multiple_of(2) || shared.head_dim > 1 << 16 {
        return Err(Error::config(format!(
            "attention.key_length {} must be even, positive and at most {}",
            shared.head_dim,
            1 << 16
        )));
    }
    if shared.model_dim == 0 || shared.model_dim > 1 << 20 || shared.vocab_size == 0 {
        return Err(Error::config(format!(
            "embedding_length {} and the vocabulary ({}) must be positive (at most {} wide)",
            shared.model_dim,
            shared.vocab_size,
            1 << 20
        )));
    }
    for i in 0..layers {
        let (h, k, w) = (heads[i], kv_heads[i], widths[i]);
        if h == 0 || k == 0 || !h.is_multiple_of(k) || h > 1 << 16 || w == 0 || w > 1 << 24 {
            return Err(Error::config(format!(
                "layer {i}: {h} query heads, {k} KV heads (which must divide them) and an FFN of {w}"
            )));
        }
    }
    let dims = (0..layers)
        .map(|i| LayerDims {
            num_heads: heads[i],
            num_kv_heads: kv_heads[i],
            intermediate_size: widths[i],
        })
        .collect();
    Ok(assemble(dims, shared))
}

/// The [`BaseConfig`] of an OpenELM with these layers.
fn assemble(dims: Vec<LayerDims>, s: Shared) -> BaseConfig {
    let max = |f: fn(&LayerDims) -> usize| dims.iter().map(f).max().unwrap_or(0);
    let layers = dims.len();
    BaseConfig {
        arch: Architecture::OpenElm,
        hidden_size: s.model_dim,
        intermediate_size: max(|d| d.intermediate_size),
        num_layers: layers,
        num_heads: max(|d| d.num_heads),
        num_kv_heads: max(|d| d.num_kv_heads),
        layer_dims: Some(dims),
        head_dim: s.head_dim,
        rms_norm_eps: s.rms_norm_eps,
        rope_theta: s.rope_theta,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: s.max_context_length,
        vocab_size: s.vocab_size,
        tie_word_embeddings: s.tied,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        layer_windows: vec![None; layers],
        local_rope_theta: None,
        hidden_act: s.hidden_act,
        norm: NormKind::Rms,
        sandwich_norms: false,
        qk_norm: if s.qk_norm {
            QkNorm::PerHead
        } else {
            QkNorm::None
        },
        attn_scale: (s.head_dim as f64).powf(-0.5),
        embed_scale: None,
        final_logit_softcap: None,
        clip_qkv: None,
        moe: None,
        bos_token_id: s.bos_token_id,
        eos_token_ids: s.eos_token_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(extra: Value) -> Result<BaseConfig> {
        let mut m = json!({
            "model_type": "openelm", "num_transformer_layers": 3, "model_dim": 64,
            "head_dim": 16, "vocab_size": 300, "num_gqa_groups": 2,
            "qkv_multipliers": [0.5, 1.0], "ffn_multipliers": [0.5, 4.0], "ffn_dim_divisor": 16,
            "normalize_qk_projections": true, "share_input_output_layers": true,
        });
        if let (Some(m), Value::Object(e)) = (m.as_object_mut(), extra) {
            m.extend(e);
        }
        base_config(m.as_object().expect("object"))
    }

    #[test]
    fn layer_wise_scaling_as_the_reference_computes_it() {
        let c = cfg(json!({})).expect("valid");
        let d = c.layer_dims.clone().expect("per layer");
        let heads: Vec<_> = d.iter().map(|l| (l.num_heads, l.num_kv_heads)).collect();
        assert_eq!(heads, [(2, 1), (4, 2), (4, 2)]);
        let widths: Vec<_> = d.iter().map(|l| l.intermediate_size).collect();
        assert_eq!(widths, [32, 144, 256]);
        assert_eq!(
            (c.num_heads, c.num_kv_heads, c.intermediate_size),
            (4, 2, 256)
        );
        assert_eq!(c.total_kv_heads(), 5);
        assert_eq!(c.layer(0).num_heads, 2);
        // OpenELM-1_1B's sizes (28 layers, model_dim 2048, head_dim 64, 4 groups): 16 → 32
        // query heads, 4 → 8 KV heads, FFN 1024 → 8192.
        let big = base_config(
            json!({"model_type": "openelm", "num_transformer_layers": 28, "model_dim": 2048,
                   "head_dim": 64, "vocab_size": 32000, "num_gqa_groups": 4,
                   "qkv_multipliers": [0.5, 1.0], "ffn_multipliers": [0.5, 4.0],
                   "ffn_dim_divisor": 256})
            .as_object()
            .expect("object"),
        )
        .expect("1.1B");
        let d = big.layer_dims.expect("per layer");
        assert_eq!(d[0].num_heads, 16);
        assert_eq!(d[27].num_heads, 32);
        assert_eq!((d[0].num_kv_heads, d[27].num_kv_heads), (4, 8));
        assert_eq!(d[0].intermediate_size, 1024);
        assert_eq!(d[27].intermediate_size, 8192);
    }

    /// GGUF metadata lists (llama.cpp's arrays) of the wrong length or that do not divide.
    #[test]
    fn lists_from_a_gguf_are_checked() {
        let shared = || Shared {
            model_dim: 64,
            head_dim: 16,
            vocab_size: 300,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_context_length: 128,
            tied: true,
            qk_norm: true,
            hidden_act: Activation::Silu,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        };
        let ok = from_lists(&[2, 4, 4], &[1, 2, 2], &[32, 144, 256], shared()).expect("valid");
        assert_eq!(
            ok,
            cfg(json!({}))
                .map(|mut c| {
                    c.max_position_embeddings = 128;
                    c.eos_token_ids = vec![2];
                    c.bos_token_id = Some(1);
                    c
                })
                .expect("same as the config.json")
        );
        let err = |h: &[usize], k: &[usize], f: &[usize]| {
            from_lists(h, k, f, shared())
                .expect_err("refused")
                .to_string()
        };
        assert!(err(&[2, 4], &[1, 2, 2], &[32, 144])
            .contains("head_count_kv has 3 entries for 2 layers"));
        assert!(
            err(&[2, 4, 4], &[1, 2, 2], &[32, 144]).contains("feed_forward_length has 2 entries")
        );
        assert!(err(&[2, 4, 4], &[1, 3, 2], &[32, 144, 256])
            .contains("layer 1: 4 query heads, 3 KV heads"));
        assert!(err(&[2, 0, 4], &[1, 1, 2], &[32, 144, 256]).contains("layer 1"));
        assert!(err(&[], &[], &[]).contains("head_count"));
    }

    #[test]
    fn make_divisible_rounds_like_the_reference() {
        assert_eq!(make_divisible(32.0, 32), 32);
        assert_eq!(make_divisible(48.0, 32), 64);
        assert_eq!(make_divisible(72.0, 32), 96); // 64 < 0.9 · 72: one more
        assert_eq!(make_divisible(3.0, 16), 16); // at least the divisor
        assert_eq!(make_divisible(144.0, 16), 144);
    }

    #[test]
    fn hostile_configs_name_the_field() {
        let err = |v: Value| cfg(v).expect_err("refused").to_string();
        assert!(err(json!({"num_query_heads": [2, 4]}))
            .contains("num_query_heads has 2 entries for 3 layers"));
        assert!(err(json!({"num_kv_heads": [1, 2, 4]})).contains("num_kv_heads"));
        assert!(err(json!({"ffn_multipliers": [1.0, 2.0, 3.0, 4.0]}))
            .contains("ffn_multipliers: 4 entries for 3 layers"));
        assert!(err(json!({"qkv_multipliers": [0.5, 0.75, 1.0]})).contains("qkv_multipliers"));
        assert!(err(json!({"qkv_multipliers": -1.0})).contains("qkv_multipliers"));
        assert!(err(json!({"head_dim": 15})).contains("head_dim"));
        assert!(err(json!({"num_gqa_groups": 0})).contains("num_gqa_groups"));
        assert!(err(json!({"num_transformer_layers": 0})).contains("num_transformer_layers"));
        assert!(err(json!({"num_transformer_layers": 1_000_000_000_000u64}))
            .contains("num_transformer_layers"));
        assert!(err(json!({"ffn_dim_divisor": 0})).contains("ffn_dim_divisor"));
        assert!(err(json!({"ffn_with_glu": false})).contains("ffn_with_glu"));
        assert!(err(json!({"normalization_layer_name": "layer_norm"}))
            .contains("normalization_layer_name"));
        assert!(err(json!({"model_dim": "wide"})).contains("model_dim"));
        assert!(err(json!({"qkv_multipliers": [1e300, 1e300]})).contains("qkv_multipliers"));
        // Stored lists equal to the computed ones are fine.
        cfg(
            json!({"num_query_heads": [2, 4, 4], "num_kv_heads": [1, 2, 2],
                   "ffn_multipliers": [0.5, 2.25, 4.0]}),
        )
        .expect("consistent lists");
    }
}
