//! Configuration in two stages: raw serde mirrors of the JSON files, then a validated
//! [`ModelConfig`] that the hot paths never re-check.
//!
//! A TPTT variant's `config.json` is a `TpttConfig` with the base model's keys merged in
//! (SPEC §1.2). We read the base `config.json` first and overlay the TPTT keys, except the
//! generic keys that `TpttConfig.__init__` resets (`tie_word_embeddings`, special token ids,
//! `architectures`, `model_type`, ...): those always come from the base.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub(crate) mod openelm;

/// Keys of a TPTT `config.json` that never overlay the base config: `PretrainedConfig.__init__`
/// resets them inside `TpttConfig`, so their saved values are not the base model's.
const NON_OVERLAY_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "auto_map",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
];

/// Base architectures this engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3 (also SmolLM2): rotate-half RoPE, optional Llama-3 scaling, no biases.
    Llama,
    /// Mistral: Llama layout, optional sliding window.
    Mistral,
    /// Qwen2 / Qwen2.5: q/k/v biases.
    Qwen2,
    /// Gemma-3 text decoder: scaled embeddings, (1 + w) RMS norms, q/k norms, sandwich norms,
    /// interleaved sliding/global layers with two RoPE bases, GeGLU, final logit soft-capping.
    Gemma3,
    /// OLMo v1: non-parametric layer norms, `clip_qkv`.
    Olmo,
    /// OLMoE: OLMo-style attention with full-width q/k RMS norms and a top-k mixture of experts.
    Olmoe,
    /// Apple's OpenELM: layer-wise scaling (query / KV heads and FFN width per layer), a fused
    /// `qkv_proj`, per-head q/k RMS norms, a fused gate/up `proj_1`.
    OpenElm,
}

impl Architecture {
    fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            "gemma3_text" | "gemma3" => Ok(Self::Gemma3),
            "olmo" => Ok(Self::Olmo),
            "olmoe" => Ok(Self::Olmoe),
            "openelm" => Ok(Self::OpenElm),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The `model_type` string of the architecture.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3_text",
            Self::Olmo => "olmo",
            Self::Olmoe => "olmoe",
            Self::OpenElm => "openelm",
        }
    }
}

/// RoPE frequency scaling (`rope_scaling` in the base config).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama-3 frequency-dependent scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
    /// Linear position interpolation: positions divided by `factor`.
    Linear {
        /// `factor`.
        factor: f64,
    },
}

/// Which gate feeds alpha / beta (SPEC §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `sigmoid(pool(k_raw))`.
    K,
    /// `sigmoid(pool(v_raw))`.
    V,
    /// Product of the two.
    Kv,
    /// Constant: ones for alpha, 0.5 for beta.
    C,
}

impl Gate {
    /// Parse a gate name; the error is a message for the caller to place in its config error.
    fn parse(s: &str, which: &str) -> std::result::Result<Self, String> {
        match s {
            "k" => Ok(Self::K),
            "v" => Ok(Self::V),
            "kv" => Ok(Self::Kv),
            "c" => Ok(Self::C),
            other => Err(format!("{which} {other:?} is not a gate the reference can load (expected one of k, v, kv, c)")),
        }
    }
}

/// Virtual-token trick for order 2 (SPEC §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trick {
    /// Derivative: `[-0.5 x_t, 0.5 x_{t-1}]`.
    Dt,
    /// Rotation by `j·2π/n` of adjacent pairs.
    Rot,
    /// `0.5 (dt + rot)`.
    Rdt,
    /// Repeat.
    Cte,
}

impl Trick {
    /// Parse a trick name; the error is a message for the caller to place in its config error.
    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dt" => Ok(Self::Dt),
            "rot" => Ok(Self::Rot),
            "rdt" => Ok(Self::Rdt),
            "cte" => Ok(Self::Cte),
            other => Err(format!(
                "unknown trick {other:?} (expected dt, rot, rdt, cte)"
            )),
        }
    }
}

/// The recurrence of the linear branch (SPEC table 1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecurrentConfig {
    /// 1 (delta rule) or 2 (delta product).
    pub order: usize,
    /// Decay gate.
    pub alpha_gate: Gate,
    /// Write strength gate.
    pub beta_gate: Gate,
    /// `false` adds the inter-chunk GELU activation.
    pub linear: bool,
    /// Virtual-token trick (order 2 only).
    pub trick: Trick,
}

/// The nine operator modes of tptt 0.12.1.
pub const OPERATOR_MODES: &[&str] = &[
    "delta_rule",
    "delta_rule_gelu",
    "delta_product",
    "delta_product_r",
    "delta_product_c",
    "gated_delta_rule",
    "gated_delta_product",
    "delta_rule_v",
    "delta_rule_kv",
];

impl RecurrentConfig {
    /// The recurrence of a named operator mode.
    pub fn from_operator_mode(mode: &str) -> Result<Self> {
        use Gate::*;
        let (order, alpha_gate, beta_gate, linear, trick) = match mode {
            "delta_rule" => (1, C, K, true, Trick::Dt),
            "gated_delta_rule" => (1, K, K, true, Trick::Dt),
            "delta_rule_v" => (1, C, V, true, Trick::Dt),
            "delta_rule_kv" => (1, C, Kv, true, Trick::Dt),
            "delta_rule_gelu" => (1, C, K, false, Trick::Dt),
            "delta_product" => (2, C, K, true, Trick::Dt),
            "gated_delta_product" => (2, K, K, true, Trick::Dt),
            "delta_product_r" => (2, C, K, true, Trick::Rot),
            "delta_product_c" => (2, C, K, true, Trick::Rdt),
            other => return Err(Error::UnknownOperatorMode(other.to_string())),
        };
        Ok(Self {
            order,
            alpha_gate,
            beta_gate,
            linear,
            trick,
        })
    }
}

/// LoRA settings from the serialized `peft.LoraConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `use_rslora`: scale by `alpha / sqrt(r)`.
    pub use_rslora: bool,
}

impl LoraSettings {
    /// The scale applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Validated TPTT-specific settings of a variant.
#[derive(Debug, Clone, PartialEq)]
pub struct TpttSettings {
    /// `operator_mode` as written (or a description when built from explicit keys).
    pub operator_mode: String,
    /// The recurrence.
    pub recurrent: RecurrentConfig,
    /// MaG weight of the linear branch.
    pub mag_weight: f32,
    /// `cross_gate`.
    pub cross_gate: bool,
    /// `base_scale_attn`.
    pub base_scale_attn: bool,
    /// `max_self_attn_length` (softmax window), if any.
    pub max_self_attn_length: Option<usize>,
    /// `max_chunk_size`.
    pub max_chunk_size: usize,
    /// `linear_precision` as written; the engine computes the linear branch in f32 always.
    pub linear_precision: String,
    /// LoRA settings, `None` when the adapter holds full projection weights.
    pub lora: Option<LoraSettings>,
    /// `base_model_name`.
    pub base_model_name: String,
    /// `base_model_subfolder`.
    pub base_model_subfolder: Option<String>,
}

/// MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU, tanh approximation).
    GeluTanh,
}

/// Layer norm flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `w · x / rms(x)` (Llama).
    Rms,
    /// `(1 + w) · x / rms(x)`, computed in f32 (Gemma).
    RmsOnePlus,
    /// Layer norm without weight or bias, eps 1e-5 (OLMo v1).
    LayerNoParam,
}

/// Normalisation of q and k inside the softmax branch (after projection, before RoPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None.
    None,
    /// Per head over `head_dim` (Gemma-3 `q_norm`/`k_norm`).
    PerHead,
    /// Over the whole projection width (OLMoE).
    Full,
}

/// Mixture-of-experts MLP settings (OLMoE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per layer.
    pub num_experts: usize,
    /// Experts used per token.
    pub top_k: usize,
    /// Renormalise the top-k routing weights.
    pub norm_topk_prob: bool,
}

/// The sizes of one decoder layer that OpenELM varies from layer to layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerDims {
    /// Query heads.
    pub num_heads: usize,
    /// KV heads (dividing `num_heads`).
    pub num_kv_heads: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
}

/// Validated base-model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseConfig {
    /// Architecture family.
    pub arch: Architecture,
    /// `hidden_size` (E).
    pub hidden_size: usize,
    /// `intermediate_size` (OpenELM: the widest layer's; see [`BaseConfig::layer`]).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads` (H; OpenELM: the most of any layer, see [`BaseConfig::layer`]).
    pub num_heads: usize,
    /// `num_key_value_heads` (Hkv; OpenELM: the most of any layer).
    pub num_kv_heads: usize,
    /// Per-layer sizes when they differ from layer to layer (OpenELM); `None`: every layer has
    /// `num_heads`, `num_kv_heads` and `intermediate_size`.
    pub layer_dims: Option<Vec<LayerDims>>,
    /// `head_dim` (D).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// `rope_scaling`.
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings` (informational: our RoPE has no table limit).
    pub max_position_embeddings: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// The base's own `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2, or Llama `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// The base's own sliding window per layer (Mistral / Qwen2 `use_sliding_window`: all
    /// layers; Gemma-3: the local layers).
    pub layer_windows: Vec<Option<usize>>,
    /// RoPE base of the windowed layers when it differs (Gemma-3 `rope_local_base_freq`; these
    /// layers use unscaled RoPE).
    pub local_rope_theta: Option<f64>,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Norm flavour of the decoder.
    pub norm: NormKind,
    /// Gemma-3's extra norms after attention and after the MLP.
    pub sandwich_norms: bool,
    /// q/k norms of the softmax branch.
    pub qk_norm: QkNorm,
    /// Softmax scale (`head_dim^-1/2`, Gemma-3 `query_pre_attn_scalar^-1/2`).
    pub attn_scale: f64,
    /// Embeddings multiplied by this (Gemma-3: `sqrt(hidden_size)`).
    pub embed_scale: Option<f64>,
    /// `logits = c · tanh(logits / c)` (Gemma-3 `final_logit_softcapping`).
    pub final_logit_softcap: Option<f64>,
    /// Clamp of q, k, v in the softmax branch (OLMo / OLMoE `clip_qkv`).
    pub clip_qkv: Option<f64>,
    /// Mixture of experts (OLMoE).
    pub moe: Option<MoeConfig>,
    /// `bos_token_id` of the base.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`(s) of the base.
    pub eos_token_ids: Vec<u32>,
}

impl BaseConfig {
    /// The sizes of decoder layer `i` (the uniform ones for every base but OpenELM).
    pub fn layer(&self, i: usize) -> LayerDims {
        match self.layer_dims.as_ref().and_then(|d| d.get(i)) {
            Some(d) => *d,
            None => LayerDims {
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
                intermediate_size: self.intermediate_size,
            },
        }
    }

    /// KV heads summed over the layers (the KV cache holds this many `head_dim` rows per
    /// position, for keys and for values).
    pub fn total_kv_heads(&self) -> usize {
        match &self.layer_dims {
            Some(d) => d.iter().map(|l| l.num_kv_heads).sum(),
            None => self.num_kv_heads.saturating_mul(self.num_layers),
        }
    }
}

/// A variant's full configuration: base hyper-parameters plus TPTT settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The base model.
    pub base: BaseConfig,
    /// The TPTT additions.
    pub tptt: TpttSettings,
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Read a JSON file that must hold an object.
pub fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    match read_json(path)? {
        Value::Object(map) => Ok(map),
        _ => Err(Error::Json {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        }),
    }
}

/// Deserialize a serde mirror from a JSON object. serde names a missing field but not the field
/// whose value has the wrong type, so on such an error the key is found by elimination (the
/// objects are small and this runs once, on the error path).
fn from_object<T: DeserializeOwned>(map: &Map<String, Value>) -> std::result::Result<T, String> {
    let err = match serde_json::from_value::<T>(Value::Object(map.clone())) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    if let Some(rest) = err.strip_prefix("missing field ") {
        return Err(format!("missing required key {rest}"));
    }
    for key in map.keys() {
        let mut without = map.clone();
        without.remove(key);
        let culprit = match serde_json::from_value::<T>(Value::Object(without)) {
            Ok(_) => true,
            Err(e) => e.to_string() == format!("missing field `{key}`"),
        };
        if culprit {
            return Err(format!("key `{key}`: {err}"));
        }
    }
    Err(err)
}

/// Serde mirror of the keys we read from a (merged) base config.
#[derive(Debug, Deserialize)]
struct RawBaseConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    final_logit_softcapping: Option<f64>,
    clip_qkv: Option<f64>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_rope_scaling(v: &Option<Value>) -> Result<RopeScaling> {
    let Some(Value::Object(m)) = v else {
        return match v {
            None | Some(Value::Null) => Ok(RopeScaling::None),
            Some(_) => Err(Error::config("rope_scaling must be an object or null")),
        };
    };
    let kind = m
        .get("rope_type")
        .or_else(|| m.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        m.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::config(format!("rope_scaling ({kind}) needs a number {key:?}")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        other => Err(Error::config(format!(
            "rope_scaling type {other:?} is not supported (supported: default, llama3, linear)"
        ))),
    }
}

impl BaseConfig {
    /// Validate a (merged) base config object.
    pub fn from_json(map: &Map<String, Value>, path: Option<&Path>) -> Result<Self> {
        let with_path = |e: Error| match e {
            Error::Config { message, .. } => Error::Config {
                path: path.map(Path::to_path_buf),
                message,
            },
            e => e,
        };
        let declared = map.get("model_type").and_then(Value::as_str).or_else(|| {
            map.get("architectures")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
        });
        if matches!(declared, Some("openelm" | "OpenELMForCausalLM")) {
            return openelm::base_config(map).map_err(with_path);
        }
        let raw: RawBaseConfig = from_object(map).map_err(|m| with_path(Error::config(m)))?;
        let model_type = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .ok_or_else(|| with_path(Error::config("no model_type in the base config")))?;
        let arch = match model_type.as_str() {
            "LlamaForCausalLM" => Architecture::Llama,
            "Gemma3ForCausalLM" => Architecture::Gemma3,
            "OlmoForCausalLM" => Architecture::Olmo,
            "OlmoeForCausalLM" => Architecture::Olmoe,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            t => Architecture::from_model_type(t)?,
        };
        let act_name = match arch {
            Architecture::Gemma3 => raw
                .hidden_activation
                .clone()
                .or(raw.hidden_act.clone())
                .unwrap_or_else(|| "gelu_pytorch_tanh".into()),
            _ => raw.hidden_act.clone().unwrap_or_else(|| "silu".into()),
        };
        let hidden_act = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            other => {
                return Err(with_path(Error::config(format!(
                    "hidden_act {other:?} is not supported (silu, gelu_pytorch_tanh)"
                ))))
            }
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0
            || num_kv_heads == 0
            || !raw.num_attention_heads.is_multiple_of(num_kv_heads)
        {
            return Err(with_path(Error::config(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                raw.num_attention_heads, num_kv_heads
            ))));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0
            || raw.hidden_size == 0
            || raw.vocab_size == 0
            || raw.num_hidden_layers == 0
        {
            return Err(with_path(Error::config(
                "hidden_size, head_dim, vocab_size and num_hidden_layers must be positive",
            )));
        }
        if raw.num_attention_heads.checked_mul(head_dim).is_none() {
            return Err(with_path(Error::config(format!(
                "num_attention_heads {} × head_dim {head_dim} does not fit in memory sizes",
                raw.num_attention_heads
            ))));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(with_path(Error::config(format!(
                "head_dim {head_dim} must be even for RoPE"
            ))));
        }
        if raw.sliding_window == Some(0) {
            return Err(with_path(Error::config(
                "sliding_window must be >= 1 (or null for no window), got 0",
            )));
        }
        let n_layers = raw.num_hidden_layers;
        let layer_windows: Vec<Option<usize>> = match arch {
            Architecture::Mistral => vec![raw.sliding_window; n_layers.min(1 << 16)],
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => {
                // transformers' Qwen2: layers from max_window_layers on use the window.
                let from = raw.max_window_layers.unwrap_or(0);
                (0..n_layers.min(1 << 16))
                    .map(|i| if i >= from { raw.sliding_window } else { None })
                    .collect()
            }
            Architecture::Gemma3 => {
                let w = Some(raw.sliding_window.unwrap_or(4096));
                match &raw.layer_types {
                    Some(types) => {
                        if types.len() != n_layers {
                            return Err(with_path(Error::config(format!(
                                "layer_types has {} entries for {n_layers} layers",
                                types.len()
                            ))));
                        }
                        types
                            .iter()
                            .map(|t| match t.as_str() {
                                "sliding_attention" => Ok(w),
                                "full_attention" => Ok(None),
                                other => Err(with_path(Error::config(format!(
                                    "unknown layer type {other:?}"
                                )))),
                            })
                            .collect::<Result<_>>()?
                    }
                    None => {
                        let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
                        (0..n_layers.min(1 << 16))
                            .map(|i| if (i + 1) % pattern != 0 { w } else { None })
                            .collect()
                    }
                }
            }
            _ => vec![None; n_layers.min(1 << 16)],
        };
        let moe = match arch {
            Architecture::Olmoe => {
                let num_experts = raw.num_experts.unwrap_or(64);
                let top_k = raw.num_experts_per_tok.unwrap_or(8);
                if num_experts == 0 || top_k == 0 || top_k > num_experts {
                    return Err(with_path(Error::config(format!(
                        "num_experts_per_tok {top_k} must be between 1 and num_experts {num_experts}"
                    ))));
                }
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
                })
            }
            _ => None,
        };
        let gemma = arch == Architecture::Gemma3;
        Ok(Self {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            layer_dims: None,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling: parse_rope_scaling(&raw.rope_scaling).map_err(with_path)?,
            max_position_embeddings: raw.max_position_embeddings,
            vocab_size: raw.vocab_size,
            // transformers' Llama/Mistral/Qwen2/OLMo configs default to untied, Gemma-3 to tied.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: arch == Architecture::Qwen2 || raw.attention_bias,
            o_bias: arch != Architecture::Qwen2 && raw.attention_bias,
            mlp_bias: arch == Architecture::Llama && raw.mlp_bias,
            layer_windows,
            local_rope_theta: if gemma {
                Some(raw.rope_local_base_freq.unwrap_or(10000.0))
            } else {
                None
            },
            hidden_act,
            norm: match arch {
                Architecture::Gemma3 => NormKind::RmsOnePlus,
                Architecture::Olmo => NormKind::LayerNoParam,
                _ => NormKind::Rms,
            },
            sandwich_norms: gemma,
            qk_norm: match arch {
                Architecture::Gemma3 => QkNorm::PerHead,
                Architecture::Olmoe => QkNorm::Full,
                _ => QkNorm::None,
            },
            attn_scale: match (gemma, raw.query_pre_attn_scalar) {
                (true, Some(s)) if s > 0.0 => s.powf(-0.5),
                (true, None) => 256f64.powf(-0.5),
                (true, Some(s)) => {
                    return Err(with_path(Error::config(format!(
                        "query_pre_attn_scalar must be > 0, got {s}"
                    ))))
                }
                _ => (head_dim as f64).powf(-0.5),
            },
            embed_scale: if gemma {
                Some((raw.hidden_size as f64).sqrt())
            } else {
                None
            },
            final_logit_softcap: if gemma {
                raw.final_logit_softcapping.filter(|c| *c > 0.0)
            } else {
                None
            },
            clip_qkv: if matches!(arch, Architecture::Olmo | Architecture::Olmoe) {
                raw.clip_qkv
            } else {
                None
            },
            moe,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        })
    }
}

/// Serde mirror of the TPTT keys.
#[derive(Debug, Deserialize)]
struct RawTptt {
    base_model_name: Option<String>,
    base_model_subfolder: Option<String>,
    #[serde(default = "default_task")]
    model_task: String,
    operator_mode: Option<String>,
    // Constructor keyword defaults used when `operator_mode` is null.
    #[serde(default = "default_order")]
    order: usize,
    #[serde(default = "default_alpha_gate")]
    alpha_gate: String,
    #[serde(default = "default_beta_gate")]
    beta_gate: String,
    #[serde(default = "default_true")]
    linear: bool,
    #[serde(default = "default_trick")]
    trick: String,
    #[serde(default = "default_mag")]
    mag_weight: f64,
    #[serde(default)]
    cross_gate: bool,
    #[serde(default)]
    base_scale_attn: bool,
    max_self_attn_length: Option<i64>,
    #[serde(default = "default_chunk")]
    max_chunk_size: i64,
    #[serde(default = "default_precision")]
    linear_precision: String,
    #[serde(default)]
    bidirectional: bool,
    lora_config: Option<Map<String, Value>>,
}

fn default_task() -> String {
    "causal_lm".into()
}
fn default_order() -> usize {
    1
}
fn default_alpha_gate() -> String {
    "1".into()
}
fn default_beta_gate() -> String {
    "k".into()
}
fn default_true() -> bool {
    true
}
fn default_trick() -> String {
    "derivative".into()
}
fn default_mag() -> f64 {
    0.5
}
fn default_chunk() -> i64 {
    64
}
fn default_precision() -> String {
    "float32".into()
}

impl TpttSettings {
    /// Validate the TPTT keys of a variant's `config.json`.
    pub fn from_json(map: &Map<String, Value>, path: Option<&Path>) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: path.map(Path::to_path_buf),
            message,
        };
        let raw: RawTptt = from_object(map).map_err(err)?;
        let base_model_name = raw
            .base_model_name
            .ok_or_else(|| err("missing required key base_model_name".into()))?;
        if raw.model_task != "causal_lm" {
            return Err(err(format!(
                "model_task {:?} is not supported (causal_lm only)",
                raw.model_task
            )));
        }
        if raw.bidirectional {
            return Err(err(
                "bidirectional: true is not supported: the linear branch would see future tokens, which a causal LM must not".into(),
            ));
        }
        let (operator_mode, recurrent) = match raw.operator_mode {
            Some(mode) => {
                let rc = RecurrentConfig::from_operator_mode(&mode)?;
                (mode, rc)
            }
            None => {
                let alpha_gate = Gate::parse(&raw.alpha_gate, "alpha_gate").map_err(|e| {
                    err(format!(
                        "operator_mode is null and {e}; tptt 0.12.1 cannot load this config either"
                    ))
                })?;
                let beta_gate = Gate::parse(&raw.beta_gate, "beta_gate").map_err(err)?;
                if raw.order != 1 && raw.order != 2 {
                    return Err(err(format!(
                        "order {} is not supported (1 or 2)",
                        raw.order
                    )));
                }
                let trick = if raw.order == 1 {
                    Trick::Dt
                } else {
                    Trick::parse(&raw.trick).map_err(err)?
                };
                let rc = RecurrentConfig {
                    order: raw.order,
                    alpha_gate,
                    beta_gate,
                    linear: raw.linear,
                    trick,
                };
                (
                    format!(
                        "custom(order={}, alpha={}, beta={})",
                        raw.order, raw.alpha_gate, raw.beta_gate
                    ),
                    rc,
                )
            }
        };
        if !raw.mag_weight.is_finite() {
            return Err(err(format!(
                "mag_weight must be finite, got {}",
                raw.mag_weight
            )));
        }
        if raw.max_chunk_size < 1 {
            return Err(err(format!(
                "max_chunk_size must be >= 1, got {}",
                raw.max_chunk_size
            )));
        }
        let max_self_attn_length = match raw.max_self_attn_length {
            None => None,
            Some(w) => match usize::try_from(w) {
                Ok(w) => {
                    Some(crate::state::validate_window("max_self_attn_length", w).map_err(err)?)
                }
                Err(_) => {
                    return Err(err(format!(
                        "max_self_attn_length must be between 1 and {} positions, got {w}",
                        crate::state::MAX_WINDOW
                    )))
                }
            },
        };
        match raw.linear_precision.as_str() {
            "float32" | "bfloat16" | "float16" | "float64" => {}
            other => {
                return Err(err(format!(
                    "linear_precision {other:?} is not a torch float dtype"
                )))
            }
        }
        let lora = match raw.lora_config {
            None => None,
            Some(l) => {
                let r = l
                    .get("r")
                    .and_then(Value::as_u64)
                    .filter(|r| *r > 0)
                    .ok_or_else(|| err("lora_config.r must be a positive integer".into()))?
                    as usize;
                let alpha = l.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
                let use_rslora = l
                    .get("use_rslora")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if l.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
                    return Err(err(
                        "DoRA adapters (use_dora: true) are not supported".into()
                    ));
                }
                Some(LoraSettings {
                    r,
                    alpha,
                    use_rslora,
                })
            }
        };
        Ok(Self {
            operator_mode,
            recurrent,
            mag_weight: raw.mag_weight as f32,
            cross_gate: raw.cross_gate,
            base_scale_attn: raw.base_scale_attn,
            max_self_attn_length,
            max_chunk_size: raw.max_chunk_size as usize,
            linear_precision: raw.linear_precision,
            lora,
            base_model_name,
            base_model_subfolder: raw.base_model_subfolder.filter(|s| !s.is_empty()),
        })
    }
}

/// Overlay a TPTT config onto a base config (SPEC §1.2) and validate both.
pub fn merge_configs(
    base: &Map<String, Value>,
    base_path: &Path,
    tptt: &Map<String, Value>,
    tptt_path: &Path,
) -> Result<ModelConfig> {
    let mut merged = base.clone();
    for (k, v) in tptt {
        if !NON_OVERLAY_KEYS.contains(&k.as_str()) {
            merged.insert(k.clone(), v.clone());
        }
    }
    // model_type / architectures always from the base.
    let base_cfg = match BaseConfig::from_json(&merged, Some(base_path)) {
        Ok(c) => c,
        // The base alone is fine: the culprit is a key the TPTT config overlays, so name that file.
        Err(Error::Config { message, .. })
            if BaseConfig::from_json(base, Some(base_path)).is_ok() =>
        {
            return Err(Error::Config {
                path: Some(tptt_path.to_path_buf()),
                message: format!(
                    "{message} (a base-model key in the TPTT config, merged over {})",
                    base_path.display()
                ),
            })
        }
        Err(e) => return Err(e),
    };
    let tptt_cfg = TpttSettings::from_json(tptt, Some(tptt_path))?;
    Ok(ModelConfig {
        base: base_cfg,
        tptt: tptt_cfg,
    })
}

/// Does this JSON object look like a TPTT config?
pub fn is_tptt_config(map: &Map<String, Value>) -> bool {
    map.get("model_type").and_then(Value::as_str) == Some("tptt")
        || map.contains_key("base_model_name")
}

/// A path inside a config error, for callers that want to attach one.
pub fn with_path(e: Error, path: PathBuf) -> Error {
    match e {
        Error::Config { message, .. } => Error::Config {
            path: Some(path),
            message,
        },
        e => e,
    }
}
