//! The TPTT model: a Llama / Mistral / Qwen2 / Gemma-3 / OLMo / OLMoE decoder whose attention
//! layers carry the LiZA linear branch (SPEC §2–§6), with immutable weights ([`Model`]) and a
//! separate per-conversation [`State`].
//!
//! Per layer: `x = Norm(h)`, `q, k, v = proj(x)` (LoRA merged at load), softmax branch on the
//! (q/k-normed, clipped) RoPE'd projections, linear branch on the raw ones,
//! `out = (1−m)·o_base + m·o_lin` (+ `sw ⊙ lw` with `cross_gate`; `o_lin` rescaled by
//! `rms(o_base)` with `base_scale_attn`), `h += out` (Gemma-3: `h += Norm(out)`),
//! `h += MLP(Norm(h))` (Gemma-3: `h += Norm(MLP(Norm(h)))`; OLMoE: a top-k mixture of experts).
//! Each layer keeps the base's own sliding window (Gemma-3 local layers, Mistral) on top of the
//! TPTT window; Gemma-3's local layers use their own RoPE base.
//!
//! Softmax window `W` (where we deliberately differ from the reference, which crashes on calls
//! longer than `W`, SPEC §5): in [`CarryMode::Continue`] each query attends to the keys of the
//! last `W` positions up to itself (a true sliding window with absolute RoPE positions) and the
//! KV cache keeps `W` positions; the linear branch always sees everything. In
//! [`CarryMode::Reference`] the reference's cached generation is reproduced: calls longer than
//! `W` are refused and before each later call the cache is cropped to its *first* `W − 1`
//! positions (transformers' `DynamicCache.crop`).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};

use crate::kernels::prefill::{AttendMany, KeySegment};

use crate::config::{
    Activation, BaseConfig, ModelConfig, NormKind, QkNorm, RopeScaling, TpttSettings,
};
use crate::error::{Error, Result};
use crate::linear::{self, CarryMode, LinearCarry, LinearShape, ScanImpl};
use crate::repo::VariantFiles;
use crate::rope::{self, Rope};
pub use crate::state::{LayerState, State};
use crate::weights::{self, AdapterReport, LoraSide, Weight, WeightMap};

mod step;
mod train;
pub use train::{LayerLora, LoraPair, SeqContext, TrainCarry};

/// Options for [`Model::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Reproduce the reference's `lm_head := embed_tokens` after loading (SPEC §1.5). Default true.
    pub retie_lm_head: bool,
    /// Device for the weights and the softmax branch.
    pub device: Device,
    /// Scan implementation of the linear branch.
    pub scan: ScanImpl,
    /// Run single-token decode steps through the fused CPU step (`model/step.rs`) instead of
    /// the tensor path. Default true; the tensor path is the reference it is tested against.
    pub fused_step: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            retie_lm_head: true,
            device: Device::Cpu,
            scan: ScanImpl::Fast,
            fused_step: true,
        }
    }
}

#[derive(Debug, Clone)]
enum Matrix {
    /// `[out, in]` f32.
    Dense(Tensor),
    /// Quantized, through candle's quantized matmul.
    Quant(QMatMul),
}

#[derive(Debug, Clone)]
struct Linear {
    w: Matrix,
    b: Option<Tensor>,
    /// LoRA kept unmerged (quantized bases).
    lora: Option<LoraSide>,
}

/// Rows of input from which a quantized matrix is widened to f32 for the product (a prompt):
/// candle's quantized matmul takes the rows one by one, a dense product is blocked for the
/// cache, and the widening (one pass over the matrix) is small next to `rows` products with it.
const WIDEN_QUANT_ROWS: usize = 16;

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let mut y = match &self.w {
            Matrix::Dense(w) => x.matmul(&w.t()?)?,
            Matrix::Quant(QMatMul::QTensor(q))
                if rows >= WIDEN_QUANT_ROWS && x.device().is_cpu() && x.dtype() == DType::F32 =>
            {
                x.broadcast_matmul(&q.dequantize(x.device())?.t()?)?
            }
            Matrix::Quant(q) => q.forward(x)?,
        };
        if let Some(l) = &self.lora {
            // y += s · B(A x)
            y = (y + (x.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?;
        }
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn tensors(&self) -> Vec<Tensor> {
        let mut v = Vec::new();
        if let Matrix::Dense(w) = &self.w {
            v.push(w.clone());
        }
        v.extend(self.b.iter().cloned());
        if let Some(l) = &self.lora {
            v.extend([l.a.clone(), l.b.clone()]);
        }
        v
    }

    fn size_bytes(&self) -> usize {
        let q = match &self.w {
            Matrix::Quant(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            _ => 0,
        };
        q + self
            .tensors()
            .iter()
            .map(|t| t.elem_count() * 4)
            .sum::<usize>()
    }
}

/// A normalisation with its weight (if any).
#[derive(Debug, Clone)]
struct Norm {
    kind: NormKind,
    w: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            NormKind::LayerNoParam => {
                // F.layer_norm without affine parameters, eps 1e-5.
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                Ok(xc.broadcast_div(&(var + self.eps)?.sqrt()?)?)
            }
            NormKind::Rms | NormKind::RmsOnePlus => {
                // x * rsqrt(mean(x²) + eps), then weight (Llama) or (1 + weight) (Gemma).
                let var = x.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                match &self.w {
                    Some(w) => Ok(normed.broadcast_mul(w)?),
                    None => Ok(normed),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Debug, Clone)]
enum Mlp {
    /// `down(act(gate(x)) · up(x))`.
    Gated(Expert),
    /// OLMoE: softmax router, top-k experts weighted by their routing probability.
    Moe {
        router: Linear,
        experts: Vec<Expert>,
        top_k: usize,
        norm_topk: bool,
    },
}

#[derive(Debug, Clone)]
struct Layer {
    in_norm: Norm,
    /// Gemma-3: applied to the attention output before the residual add.
    post_attn_norm: Option<Norm>,
    pre_ff_norm: Norm,
    /// Gemma-3: applied to the MLP output before the residual add.
    post_ff_norm: Option<Norm>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    mlp: Mlp,
    /// The base's own window for this layer.
    window: Option<usize>,
    /// Index into `Model::ropes`.
    rope: usize,
}

impl Layer {
    /// The softmax branch's inputs from the raw projections `[S, ·]`: q/k norms, `clip_qkv`,
    /// RoPE. Returns `q: [H, S, D]`, `k: [Hkv, S, D]` (rotated) and `v: [S, Hkv·D]` (clipped).
    fn softmax_qkv(
        &self,
        b: &BaseConfig,
        q_raw: &Tensor,
        k_raw: &Tensor,
        v_raw: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, d) = (b.num_heads, b.num_kv_heads, b.head_dim);
        let s = q_raw.dim(0)?;
        let (mut qs, mut ks, mut vs) = (q_raw.clone(), k_raw.clone(), v_raw.clone());
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            match b.qk_norm {
                QkNorm::PerHead => {
                    qs = qn.forward(&qs.reshape((s, nh, d))?)?.reshape((s, nh * d))?;
                    ks = kn
                        .forward(&ks.reshape((s, nkv, d))?)?
                        .reshape((s, nkv * d))?;
                }
                _ => {
                    qs = qn.forward(&qs)?;
                    ks = kn.forward(&ks)?;
                }
            }
        }
        if let Some(c) = b.clip_qkv {
            qs = qs.clamp(-c, c)?;
            ks = ks.clamp(-c, c)?;
            vs = vs.clamp(-c, c)?;
        }
        let q = rope::apply(
            &qs.reshape((s, nh, d))?.transpose(0, 1)?.contiguous()?,
            cos,
            sin,
        )?;
        let k = rope::apply(
            &ks.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?,
            cos,
            sin,
        )?;
        Ok((q, k, vs))
    }
}

/// The Memory-as-Gate mix of the softmax output `attn` and the linear branch's `y` (both
/// `[S, H·D]`) through the shared `o_proj` (SPEC §6): `o((1−m)·attn + m·y)` when neither
/// `cross_gate` nor `base_scale_attn` is set (the mix is then linear in the branch outputs),
/// else `(1−m)·o(attn)` and `m·o(y)` (rescaled by `rms(o(attn))`), plus their product with the
/// cross gate.
fn mix(
    tptt: &TpttSettings,
    attn: &Tensor,
    y: &Tensor,
    o: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let m = tptt.mag_weight;
    if !tptt.cross_gate && !tptt.base_scale_attn {
        return o(&((attn * (1.0 - m) as f64)? + (y * m as f64)?)?);
    }
    let o_base = o(attn)?; // [S, E]
    let mut o_lin = o(y)?;
    if tptt.base_scale_attn {
        let rms = (o_base.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
        o_lin = o_lin.broadcast_mul(&rms)?;
    }
    let sw = (&o_base * (1.0 - m) as f64)?;
    let lw = (o_lin * m as f64)?;
    Ok(if tptt.cross_gate {
        ((&sw + &lw)? + (&sw * &lw)?)?
    } else {
        (sw + lw)?
    })
}

/// Which logits [`Model::forward`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[S, V]`.
    All,
    /// `[1, V]`, the last position only.
    Last,
    /// `[R, V]`: every `k`-th position counted back from the last one (rows `S−1`, `S−1−k`, …,
    /// in ascending order; [`Logits::rows`] lists them), so the last position is always there.
    /// A sample of a prompt's logits at `1/k` of the `lm_head` cost; `Every(1)` is `All`.
    Every(usize),
}

impl Logits {
    /// The positions (0-based, ascending) of a call of `s` tokens whose logits are returned.
    pub fn rows(self, s: usize) -> Vec<usize> {
        match self {
            Logits::All => (0..s).collect(),
            Logits::Last => s.checked_sub(1).into_iter().collect(),
            Logits::Every(k) => {
                let k = k.max(1);
                let mut rows: Vec<usize> = (0..s).rev().step_by(k).collect();
                rows.reverse();
                rows
            }
        }
    }
}

/// A loaded TPTT model (immutable).
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    /// RoPE tables: `[global]` or `[global, local]`.
    ropes: Vec<Rope>,
    shape: LinearShape,
    scan: ScanImpl,
    fused_step: bool,
    adapter: AdapterReport,
}

/// Where weights come from while building a model.
struct Source<'a> {
    map: WeightMap,
    loras: &'a std::collections::HashMap<String, LoraSide>,
    location: &'a str,
    device: Device,
}

impl Source<'_> {
    fn weight(&mut self, name: &str, dims: &[usize]) -> Result<Weight> {
        let w = self.map.remove(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            location: self.location.into(),
        })?;
        if w.dims() != dims {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                got: w.dims().to_vec(),
                expected: dims.to_vec(),
            });
        }
        Ok(w)
    }

    /// A dense tensor (quantized ones are dequantized: norms, embeddings).
    fn tensor(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        Ok(match self.weight(name, dims)? {
            Weight::Dense(t) => t,
            Weight::Quant(q) => q.dequantize(&self.device)?,
        })
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let w = match self.weight(&name, &[out, inp])? {
            Weight::Dense(t) => Matrix::Dense(t),
            Weight::Quant(q) => Matrix::Quant(QMatMul::from_arc(q)?),
        };
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            w,
            b,
            lora: self.loras.get(&name).cloned(),
        })
    }
}

fn take_norm(src: &mut Source<'_>, name: &str, b: &BaseConfig, dim: usize) -> Result<Norm> {
    let (w, eps) = match b.norm {
        NormKind::LayerNoParam => (None, 1e-5),
        NormKind::Rms => (Some(src.tensor(name, &[dim])?), b.rms_norm_eps),
        // Gemma stores w and multiplies by (1 + w): fold the 1 in once at load.
        NormKind::RmsOnePlus => (Some((src.tensor(name, &[dim])? + 1.0)?), b.rms_norm_eps),
    };
    Ok(Norm {
        kind: b.norm,
        w,
        eps,
    })
}

fn take_expert(src: &mut Source<'_>, p: &str, b: &BaseConfig) -> Result<Expert> {
    let (e, i) = (b.hidden_size, b.intermediate_size);
    Ok(Expert {
        gate: src.linear(&format!("{p}.gate_proj"), i, e, b.mlp_bias)?,
        up: src.linear(&format!("{p}.up_proj"), i, e, b.mlp_bias)?,
        down: src.linear(&format!("{p}.down_proj"), e, i, b.mlp_bias)?,
    })
}

impl Expert {
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let g = match act {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match self {
            Mlp::Gated(e) => e.forward(x, act),
            Mlp::Moe {
                router,
                experts,
                top_k,
                norm_topk,
            } => {
                let (s, e_dim) = x.dims2()?;
                let probs =
                    candle_nn::ops::softmax_last_dim(&router.forward(x)?)?.to_vec2::<f32>()?;
                // Route each token; then run each expert once on the tokens that chose it.
                let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> =
                    vec![(Vec::new(), Vec::new()); experts.len()];
                for (t, p) in probs.iter().enumerate() {
                    let mut idx: Vec<usize> = (0..p.len()).collect();
                    // torch.topk order: by value, descending (ties: lower index first).
                    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                    let top = &idx[..*top_k];
                    let sum: f32 = top.iter().map(|&i| p[i]).sum();
                    for &i in top {
                        let w = if *norm_topk { p[i] / sum } else { p[i] };
                        per_expert[i].0.push(t as u32);
                        per_expert[i].1.push(w);
                    }
                }
                let mut out = Tensor::zeros((s, e_dim), DType::F32, x.device())?;
                for (expert, (tokens, weights)) in experts.iter().zip(per_expert) {
                    if tokens.is_empty() {
                        continue;
                    }
                    let n = tokens.len();
                    let idx = Tensor::from_vec(tokens, n, x.device())?;
                    let y = expert.forward(&x.index_select(&idx, 0)?, act)?;
                    let y = y.broadcast_mul(&Tensor::from_vec(weights, (n, 1), x.device())?)?;
                    out = out.index_add(&idx, &y, 0)?;
                }
                Ok(out)
            }
        }
    }
}

impl Model {
    /// Load a variant: base weights, adapter, re-tie.
    pub fn load(files: &VariantFiles, opts: &LoadOptions) -> Result<Self> {
        let (config, mut map) = match &files.base_gguf {
            Some(g) => {
                let (base, map) = crate::gguf::load(g, &opts.device)?;
                (
                    ModelConfig {
                        base,
                        tptt: files.config.tptt.clone(),
                    },
                    map,
                )
            }
            None => (
                files.config.clone(),
                weights::dense(weights::load_model_dir(&files.base_dir, &opts.device)?),
            ),
        };
        let adapter = match (&files.adapter, &files.config.tptt.lora) {
            (Some(path), lora) => weights::apply_adapter(
                &mut map,
                path,
                lora.as_ref(),
                &files.target_modules(),
                &opts.device,
            )?,
            (None, Some(_)) => {
                return Err(Error::NotFound(format!(
                    "{} has a lora_config but no adapter_model.safetensors",
                    files.dir.display()
                )))
            }
            (None, None) => AdapterReport::default(),
        };
        Self::from_weights(
            config,
            map,
            &files.base_dir.display().to_string(),
            adapter,
            opts,
        )
    }

    /// Load a plain Hugging Face model folder (no TPTT repo) with the given TPTT settings: an
    /// untrained injection, or `mag_weight = 0` for the base transformer alone.
    pub fn load_plain(
        base_dir: &std::path::Path,
        tptt: TpttSettings,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let cfg_path = base_dir.join("config.json");
        let base = crate::config::BaseConfig::from_json(
            &crate::config::read_json_object(&cfg_path)?,
            Some(&cfg_path),
        )?;
        let map = weights::dense(weights::load_model_dir(base_dir, &opts.device)?);
        Self::from_weights(
            ModelConfig { base, tptt },
            map,
            &base_dir.display().to_string(),
            AdapterReport::default(),
            opts,
        )
    }

    /// Load a GGUF base (quantized) with the given TPTT settings and no adapter.
    pub fn load_gguf_plain(
        path: &std::path::Path,
        tptt: TpttSettings,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (base, map) = crate::gguf::load(path, &opts.device)?;
        Self::from_weights(
            ModelConfig { base, tptt },
            map,
            &path.display().to_string(),
            AdapterReport::default(),
            opts,
        )
    }

    /// Build from already loaded (and adapted) tensors with HF names.
    pub fn from_weights(
        cfg: ModelConfig,
        map: WeightMap,
        location: &str,
        adapter: AdapterReport,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let b = &cfg.base;
        let mut src = Source {
            map,
            loras: &adapter.unmerged,
            location,
            device: opts.device.clone(),
        };
        let (e, hd, kvd) = (
            b.hidden_size,
            b.num_heads * b.head_dim,
            b.num_kv_heads * b.head_dim,
        );
        let embed_w = src.weight("model.embed_tokens.weight", &[b.vocab_size, e])?;
        // Lookups need dense rows; a tied lm_head keeps the (possibly quantized) matrix.
        let embed = match &embed_w {
            Weight::Dense(t) => t.clone(),
            Weight::Quant(q) => q.dequantize(&opts.device)?,
        };
        let mut layers = Vec::new(); // not with_capacity: num_layers is untrusted until the weights confirm it
        for i in 0..b.num_layers {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = match b.qk_norm {
                QkNorm::None => (None, None),
                QkNorm::PerHead => (
                    Some(take_norm(
                        &mut src,
                        &format!("{p}.self_attn.q_norm.weight"),
                        b,
                        b.head_dim,
                    )?),
                    Some(take_norm(
                        &mut src,
                        &format!("{p}.self_attn.k_norm.weight"),
                        b,
                        b.head_dim,
                    )?),
                ),
                QkNorm::Full => (
                    Some(take_norm(
                        &mut src,
                        &format!("{p}.self_attn.q_norm.weight"),
                        b,
                        hd,
                    )?),
                    Some(take_norm(
                        &mut src,
                        &format!("{p}.self_attn.k_norm.weight"),
                        b,
                        kvd,
                    )?),
                ),
            };
            let mlp = match b.moe {
                None => Mlp::Gated(take_expert(&mut src, &format!("{p}.mlp"), b)?),
                Some(moe) => Mlp::Moe {
                    router: src.linear(&format!("{p}.mlp.gate"), moe.num_experts, e, false)?,
                    experts: (0..moe.num_experts)
                        .map(|x| take_expert(&mut src, &format!("{p}.mlp.experts.{x}"), b))
                        .collect::<Result<_>>()?,
                    top_k: moe.top_k,
                    norm_topk: moe.norm_topk_prob,
                },
            };
            let (post_attn_norm, pre_ff_norm, post_ff_norm) = if b.sandwich_norms {
                (
                    Some(take_norm(
                        &mut src,
                        &format!("{p}.post_attention_layernorm.weight"),
                        b,
                        e,
                    )?),
                    take_norm(
                        &mut src,
                        &format!("{p}.pre_feedforward_layernorm.weight"),
                        b,
                        e,
                    )?,
                    Some(take_norm(
                        &mut src,
                        &format!("{p}.post_feedforward_layernorm.weight"),
                        b,
                        e,
                    )?),
                )
            } else {
                (
                    None,
                    take_norm(
                        &mut src,
                        &format!("{p}.post_attention_layernorm.weight"),
                        b,
                        e,
                    )?,
                    None,
                )
            };
            let window = b.layer_windows.get(i).copied().flatten();
            layers.push(Layer {
                in_norm: take_norm(&mut src, &format!("{p}.input_layernorm.weight"), b, e)?,
                post_attn_norm,
                pre_ff_norm,
                post_ff_norm,
                q: src.linear(&format!("{p}.self_attn.q_proj"), hd, e, b.qkv_bias)?,
                k: src.linear(&format!("{p}.self_attn.k_proj"), kvd, e, b.qkv_bias)?,
                v: src.linear(&format!("{p}.self_attn.v_proj"), kvd, e, b.qkv_bias)?,
                o: src.linear(&format!("{p}.self_attn.o_proj"), e, hd, b.o_bias)?,
                q_norm,
                k_norm,
                mlp,
                window,
                rope: usize::from(window.is_some() && b.local_rope_theta.is_some()),
            });
        }
        let norm = take_norm(&mut src, "model.norm.weight", b, e)?;
        let lm_head = if opts.retie_lm_head || b.tie_word_embeddings {
            let w = match embed_w {
                Weight::Dense(t) => Matrix::Dense(t),
                Weight::Quant(q) => Matrix::Quant(QMatMul::from_arc(q)?),
            };
            Linear {
                w,
                b: None,
                lora: None,
            }
        } else {
            src.linear("lm_head", b.vocab_size, e, false)?
        };
        let mut ropes = vec![Rope::new(b.head_dim, b.rope_theta, &b.rope_scaling)];
        if let Some(theta) = b.local_rope_theta {
            ropes.push(Rope::new(b.head_dim, theta, &RopeScaling::None));
        }
        let shape = LinearShape {
            heads: b.num_heads,
            kv_heads: b.num_kv_heads,
            dim: b.head_dim,
            rc: cfg.tptt.recurrent,
            max_chunk: cfg.tptt.max_chunk_size,
        };
        Ok(Self {
            device: opts.device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            shape,
            scan: opts.scan,
            fused_step: opts.fused_step,
            adapter,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// What the adapter did at load.
    pub fn adapter_report(&self) -> &AdapterReport {
        &self.adapter
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of parameters (the embedding counted once when tied; quantized matrices by shape).
    pub fn num_params(&self) -> usize {
        let lin = |l: &Linear| -> usize {
            let w = match &l.w {
                Matrix::Dense(t) => t.elem_count(),
                Matrix::Quant(QMatMul::QTensor(q)) => q.shape().elem_count(),
                Matrix::Quant(QMatMul::Tensor(t)) | Matrix::Quant(QMatMul::TensorF16(t)) => {
                    t.elem_count()
                }
            };
            w + l.b.as_ref().map_or(0, |b| b.elem_count())
        };
        let norm = |n: Option<&Norm>| n.and_then(|n| n.w.as_ref()).map_or(0, |w| w.elem_count());
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mlp = match &l.mlp {
                    Mlp::Gated(e) => lin(&e.gate) + lin(&e.up) + lin(&e.down),
                    Mlp::Moe {
                        router, experts, ..
                    } => {
                        lin(router)
                            + experts
                                .iter()
                                .map(|e| lin(&e.gate) + lin(&e.up) + lin(&e.down))
                                .sum::<usize>()
                    }
                };
                [
                    Some(&l.in_norm),
                    l.post_attn_norm.as_ref(),
                    Some(&l.pre_ff_norm),
                    l.post_ff_norm.as_ref(),
                    l.q_norm.as_ref(),
                    l.k_norm.as_ref(),
                ]
                .into_iter()
                .map(norm)
                .sum::<usize>()
                    + lin(&l.q)
                    + lin(&l.k)
                    + lin(&l.v)
                    + lin(&l.o)
                    + mlp
            })
            .sum();
        let tied = match &self.lm_head.w {
            Matrix::Dense(t) => t.id() == self.embed.id(),
            Matrix::Quant(_) => self.cfg.base.tie_word_embeddings,
        };
        self.embed.elem_count()
            + layers
            + norm(Some(&self.norm))
            + if tied { 0 } else { lin(&self.lm_head) }
    }

    /// Bytes of weights read to decode one token: every matrix once (the embedding lookup
    /// reads one row and is not counted; MoE counts all experts).
    pub fn weight_bytes(&self) -> usize {
        let norms = |l: &Layer| {
            [
                Some(&l.in_norm),
                l.post_attn_norm.as_ref(),
                Some(&l.pre_ff_norm),
                l.post_ff_norm.as_ref(),
                l.q_norm.as_ref(),
                l.k_norm.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(|n| n.w.as_ref().map_or(0, |w| w.elem_count() * 4))
            .sum::<usize>()
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mlp = match &l.mlp {
                    Mlp::Gated(e) => e.gate.size_bytes() + e.up.size_bytes() + e.down.size_bytes(),
                    Mlp::Moe {
                        router, experts, ..
                    } => {
                        router.size_bytes()
                            + experts
                                .iter()
                                .map(|e| {
                                    e.gate.size_bytes() + e.up.size_bytes() + e.down.size_bytes()
                                })
                                .sum::<usize>()
                    }
                };
                norms(l)
                    + l.q.size_bytes()
                    + l.k.size_bytes()
                    + l.v.size_bytes()
                    + l.o.size_bytes()
                    + mlp
            })
            .sum();
        layers + self.lm_head.size_bytes() + self.norm.w.as_ref().map_or(0, |w| w.elem_count() * 4)
    }

    /// Override `max_chunk_size` (e.g. 1 for a pure per-token recurrence).
    pub fn set_max_chunk_size(&mut self, c: usize) -> Result<()> {
        if c == 0 {
            return Err(Error::config("max_chunk_size must be >= 1"));
        }
        self.shape.max_chunk = c;
        self.cfg.tptt.max_chunk_size = c;
        Ok(())
    }

    /// Use the fused CPU decode step for single-token calls (see [`LoadOptions::fused_step`]).
    pub fn set_fused_step(&mut self, on: bool) {
        self.fused_step = on;
    }

    /// Override the MaG weight (0 switches the linear branch off).
    pub fn set_mag_weight(&mut self, m: f32) {
        self.cfg.tptt.mag_weight = m;
    }

    /// The TPTT softmax window of the config (`max_self_attn_length`). Layers with a window of
    /// their own (Gemma-3 local layers, Mistral) also keep it.
    pub fn config_window(&self) -> Option<usize> {
        self.cfg.tptt.max_self_attn_length
    }

    /// A fresh state. `window` is the softmax window `W` (`None`: unbounded); it must lie in
    /// `1..=`[`crate::state::MAX_WINDOW`] ([`crate::state::validate_window`], where it enters):
    /// [`Model::forward`] refuses a state whose window does not.
    pub fn new_state(&self, mode: CarryMode, window: Option<usize>) -> State {
        let b = &self.cfg.base;
        State {
            pos: 0,
            key_pos: Vec::new(),
            layers: (0..b.num_layers)
                .map(|_| LayerState {
                    k: None,
                    v: None,
                    linear: LinearCarry::grouped(b.num_kv_heads, b.head_dim),
                })
                .collect(),
            mode,
            window,
        }
    }

    /// One full-sequence forward without cache, as the reference's `use_cache=False` forward.
    pub fn forward_full(&self, ids: &[u32]) -> Result<Tensor> {
        let mut st = self.new_state(CarryMode::Continue, self.config_window());
        self.forward(ids, &mut st, Logits::All)
    }

    /// Run `ids` from `state`, updating it. Returns logits `[S, V]` or `[1, V]` (f32).
    pub fn forward(&self, ids: &[u32], state: &mut State, which: Logits) -> Result<Tensor> {
        let b = &self.cfg.base;
        if ids.is_empty() {
            return Err(Error::Input("no tokens to run".into()));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= b.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                b.vocab_size
            )));
        }
        if state.layers.len() != b.num_layers {
            return Err(Error::State(format!(
                "state has {} layers, model has {}",
                state.layers.len(),
                b.num_layers
            )));
        }
        // The window enters through validated flags, configs and snapshots; a state built by
        // hand with a window of 0 would divide by zero below (slot = position mod W).
        if let Some(w) = state.window {
            crate::state::validate_window("the state's softmax window", w).map_err(Error::State)?;
        }
        let s = ids.len();
        if s == 1 && state.mode == CarryMode::Continue && self.fused_step && step::supported(self) {
            // The step's many short parallel regions run on a team of spinning threads that
            // lives for this step (see `team`), not on rayon's sleeping pool.
            return crate::team::with_team(rayon::current_num_threads(), || {
                step::forward_one(self, ids[0], state)
            });
        }
        if state.mode == CarryMode::Reference {
            if let Some(w) = state.window {
                if s > w {
                    return Err(Error::Input(format!(
                        "reference-compatible mode: a call of {s} tokens exceeds max_self_attn_length {w} (tptt 0.12.1 crashes here)"
                    )));
                }
                if !state.key_pos.is_empty() && state.key_pos.len() > w - 1 {
                    // transformers' DynamicCache.crop(W − 1): keep the FIRST W − 1 positions.
                    state.key_pos.truncate(w - 1);
                    for l in state.layers.iter_mut() {
                        l.k = l.k.as_ref().map(|k| k.narrow(1, 0, w - 1)).transpose()?;
                        l.v = l.v.as_ref().map(|v| v.narrow(1, 0, w - 1)).transpose()?;
                    }
                }
            }
        }
        let positions: Vec<usize> = (state.pos..state.pos + s).collect();
        let cos_sin: Vec<(Tensor, Tensor)> = self
            .ropes
            .iter()
            .map(|r| r.cos_sin(&positions, &self.device))
            .collect::<Result<_>>()?;
        // Softmax keys: a ring of W slots in Continue mode (slot = position mod W), written in
        // place for single-token steps; an ordered list in Reference mode.
        let ring = state.mode == CarryMode::Continue;
        let in_place = ring && s == 1;
        let slot_of = |p: usize| state.window.map_or(p, |w| p % w);
        // Positions of the keys attended to, in the order of the key tensor.
        let att_pos: Vec<usize> = if in_place {
            let mut sp = state.key_pos.clone();
            let slot = slot_of(state.pos);
            if slot < sp.len() {
                sp[slot] = state.pos;
            } else {
                sp.push(state.pos);
            }
            sp
        } else {
            state
                .key_pos
                .iter()
                .copied()
                .chain(positions.iter().copied())
                .collect()
        };
        let t_len = att_pos.len();
        // One mask per distinct effective window: the TPTT window (Continue mode) combined with
        // the layer's own.
        let tptt_window = match state.mode {
            CarryMode::Continue => state.window,
            CarryMode::Reference => None,
        };
        let effective = |layer: &Layer| match (tptt_window, layer.window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Prompts on the CPU in ring mode: attention read in place from the ring and the new
        // keys (`kernels::prefill`, no mask needed); the candle ops are its reference.
        let in_place_prompt = !in_place
            && ring
            && self.fused_step
            && self.device.is_cpu()
            && self.embed.dtype() == DType::F32;
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for layer in self.layers.iter().filter(|_| !in_place_prompt) {
            let w = effective(layer);
            if masks.iter().any(|(x, _)| *x == w) {
                continue;
            }
            let mut mask = vec![0f32; s * t_len];
            for (i, &qp) in positions.iter().enumerate() {
                for (j, &kp) in att_pos.iter().enumerate() {
                    let visible = kp <= qp && w.is_none_or(|w| qp - kp < w);
                    if !visible {
                        mask[i * t_len + j] = f32::NEG_INFINITY;
                    }
                }
            }
            masks.push((w, Tensor::from_vec(mask, (s, t_len), &self.device)?));
        }

        let ids_t = Tensor::from_vec(ids.to_vec(), s, &self.device)?;
        let mut h = self.embed.index_select(&ids_t, 0)?; // [S, E]
        if let Some(scale) = b.embed_scale {
            // transformers casts sqrt(E) to the weight dtype (f32 here) before multiplying.
            h = (h * (scale as f32) as f64)?;
        }
        let (nh, nkv, d) = (b.num_heads, b.num_kv_heads, b.head_dim);
        let g = nh / nkv;
        let scale = b.attn_scale;
        let tptt = &self.cfg.tptt;
        let linear_on = tptt.mag_weight != 0.0;
        let filled_before = state.key_pos.len();
        for (layer, ls) in self.layers.iter().zip(state.layers.iter_mut()) {
            let x = layer.in_norm.forward(&h)?;
            let q_raw = layer.q.forward(&x)?; // [S, H·D]
            let k_raw = layer.k.forward(&x)?; // [S, Hkv·D]
            let v_raw = layer.v.forward(&x)?;
            let (cos, sin) = &cos_sin[layer.rope];
            let mask = || -> Result<&Tensor> {
                Ok(&masks
                    .iter()
                    .find(|(w, _)| *w == effective(layer))
                    .ok_or_else(|| Error::State("mask missing".into()))?
                    .1)
            };

            // Softmax branch: q/k norms, clip, RoPE, GQA, window mask. The linear branch reads the
            // raw projections (tptt calls q_proj/k_proj/v_proj itself).
            let (q, k, vs) = layer.softmax_qkv(b, &q_raw, &k_raw, &v_raw, cos, sin)?;
            let v = vs.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?;
            let attn = if in_place_prompt {
                let (qc, kc, vc) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
                let (qd, kd, vd) = (
                    step::Data::of(&qc),
                    step::Data::of(&kc),
                    step::Data::of(&vc),
                );
                let cache = match (&ls.k, &ls.v) {
                    (Some(kb), Some(vb)) if filled_before > 0 => {
                        Some((step::Data::of(kb), step::Data::of(vb), kb.dim(1)?))
                    }
                    _ => None,
                };
                let mut segments = Vec::with_capacity(2);
                if let Some((kb, vb, capacity)) = &cache {
                    segments.push(KeySegment {
                        k: kb.slice()?,
                        v: vb.slice()?,
                        capacity: *capacity,
                        pos: &state.key_pos[..filled_before],
                    });
                }
                segments.push(KeySegment {
                    k: kd.slice()?,
                    v: vd.slice()?,
                    capacity: s,
                    pos: &positions,
                });
                let out = crate::kernels::prefill::attend_many(&AttendMany {
                    q: qd.slice()?,
                    q_pos: &positions,
                    segments: &segments,
                    window: effective(layer),
                    heads: nh,
                    kv_heads: nkv,
                    dim: d,
                    scale: scale as f32,
                });
                Some(Tensor::from_vec(out, (s, nh * d), &self.device)?)
            } else {
                None
            };
            let (k_att, v_att) = if in_place_prompt {
                (None, None)
            } else if in_place {
                let slot = slot_of(state.pos);
                ls.ensure_capacity(slot + 1, state.window, nkv, d, &self.device)?;
                if let (Some(kb), Some(vb)) = (&ls.k, &ls.v) {
                    kb.slice_set(&k, 1, slot)?;
                    vb.slice_set(&v, 1, slot)?;
                }
                (ls.k_view(t_len)?, ls.v_view(t_len)?)
            } else {
                match (ls.k_view(filled_before)?, ls.v_view(filled_before)?) {
                    (Some(kc), Some(vc)) => (
                        Some(Tensor::cat(&[&kc, &k], 1)?),
                        Some(Tensor::cat(&[&vc, &v], 1)?),
                    ),
                    _ => (Some(k.clone()), Some(v.clone())),
                }
            };
            let (attn, kv_att) = match (attn, k_att, v_att) {
                (Some(attn), _, _) => (attn, None),
                (None, Some(k_att), Some(v_att)) => {
                    let qg = q.reshape((nkv, g * s, d))?; // heads h = kvh·G + g
                    let scores = (qg.matmul(&k_att.t()?)? * scale)?; // [Hkv, G·S, T]
                    let scores = scores.reshape((nkv, g, s, t_len))?.broadcast_add(mask()?)?;
                    let probs =
                        candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, g * s, t_len))?;
                    let attn = probs
                        .matmul(&v_att)?
                        .reshape((nh, s, d))?
                        .transpose(0, 1)?
                        .reshape((s, nh * d))?; // [S, H·D]
                    (attn, Some((k_att, v_att)))
                }
                _ => return Err(Error::State("KV cache missing after write".into())),
            };

            let out = if linear_on {
                let (qv, kv, vv) = (
                    q_raw.flatten_all()?.to_vec1::<f32>()?,
                    k_raw.flatten_all()?.to_vec1::<f32>()?,
                    v_raw.flatten_all()?.to_vec1::<f32>()?,
                );
                let y = linear::forward(
                    &self.shape,
                    &qv,
                    &kv,
                    &vv,
                    &mut ls.linear,
                    state.mode,
                    self.scan,
                );
                let y = Tensor::from_vec(y, (s, nh * d), &self.device)?;
                mix(tptt, &attn, &y, |z| layer.o.forward(z))?
            } else {
                layer.o.forward(&attn)?
            };
            let out = match &layer.post_attn_norm {
                Some(n) => n.forward(&out)?,
                None => out,
            };
            h = (h + out)?;
            let x = layer.pre_ff_norm.forward(&h)?;
            let mlp = layer.mlp.forward(&x, b.hidden_act)?;
            let mlp = match &layer.post_ff_norm {
                Some(n) => n.forward(&mlp)?,
                None => mlp,
            };
            h = (h + mlp)?;

            if !in_place {
                if ring {
                    // Write the last min(S, W) new keys into their slots: runs of consecutive
                    // slots, split where the ring wraps.
                    let keep = state.window.map_or(s, |w| w.min(s));
                    let mut t = s - keep;
                    while t < s {
                        let slot = slot_of(state.pos + t);
                        let run = state.window.map_or(s - t, |w| (w - slot).min(s - t));
                        ls.ensure_capacity(slot + run, state.window, nkv, d, &self.device)?;
                        if let (Some(kb), Some(vb)) = (&ls.k, &ls.v) {
                            kb.slice_set(&k.narrow(1, t, run)?.contiguous()?, 1, slot)?;
                            vb.slice_set(&v.narrow(1, t, run)?.contiguous()?, 1, slot)?;
                        }
                        t += run;
                    }
                } else if let Some((k_att, v_att)) = kv_att {
                    ls.k = Some(k_att);
                    ls.v = Some(v_att);
                }
            }
        }
        if in_place {
            state.key_pos = att_pos;
        } else if ring {
            // Positions are contiguous from 0, so the valid slots are always 0..min(pos, W).
            let keep = state.window.map_or(s, |w| w.min(s));
            let filled = state.window.map_or(state.pos + s, |w| w.min(state.pos + s));
            state.key_pos.resize(filled, usize::MAX);
            for t in s - keep..s {
                let p = state.pos + t;
                state.key_pos[slot_of(p)] = p;
            }
            if state.key_pos.contains(&usize::MAX) {
                return Err(Error::State(
                    "KV ring has unfilled slots (positions not contiguous)".into(),
                ));
            }
        } else {
            state.key_pos = att_pos;
        }
        state.pos += s;

        let h = match which {
            Logits::All | Logits::Every(0 | 1) => h,
            Logits::Last => h.narrow(0, s - 1, 1)?,
            Logits::Every(_) => {
                let rows: Vec<u32> = which.rows(s).into_iter().map(|r| r as u32).collect();
                let n = rows.len();
                h.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?
            }
        };
        let h = self.norm.forward(&h)?;
        let logits = self.lm_head.forward(&h)?;
        let logits = match b.final_logit_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }
}

impl TpttSettings {
    /// Settings for an untrained injection into a plain base model (no LoRA): a demo model, or
    /// `mag_weight = 0` to run the base transformer alone.
    pub fn injected(operator_mode: &str, mag_weight: f32, base_model_name: &str) -> Result<Self> {
        Ok(Self {
            operator_mode: operator_mode.to_string(),
            recurrent: crate::config::RecurrentConfig::from_operator_mode(operator_mode)?,
            mag_weight,
            cross_gate: false,
            base_scale_attn: false,
            max_self_attn_length: None,
            max_chunk_size: 64,
            linear_precision: "float32".into(),
            lora: None,
            base_model_name: base_model_name.to_string(),
            base_model_subfolder: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt's rows through a quantized matrix take the widened (dequantized f32) product:
    /// equal to the product with the dequantized matrix, and within the activation
    /// quantization of candle's row-by-row quantized matmul (the reference path, still used
    /// below [`WIDEN_QUANT_ROWS`] rows).
    #[test]
    fn widened_quantized_product_matches_row_by_row() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev).expect("w");
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize"));
        let lin = Linear {
            w: Matrix::Quant(QMatMul::from_arc(q.clone()).expect("qmatmul")),
            b: None,
            lora: None,
        };
        for rows in [1, WIDEN_QUANT_ROWS - 1, WIDEN_QUANT_ROWS, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 64), &dev).expect("x");
            let got = lin.forward(&x).expect("forward");
            let by_rows = QMatMul::from_arc(q.clone())
                .and_then(|m| m.forward(&x))
                .expect("rows");
            let widened = x
                .matmul(&q.dequantize(&dev).and_then(|t| t.t()).expect("deq"))
                .expect("matmul");
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
                    .expect("diff")
            };
            let scale = widened
                .abs()
                .and_then(|t| t.max_all()?.to_scalar::<f32>())
                .expect("max");
            assert!(
                diff(&by_rows, &widened) < 2e-2 * scale,
                "rows {rows}: quantized activations drift"
            );
            if rows >= WIDEN_QUANT_ROWS {
                assert!(
                    diff(&got, &widened) < 1e-5 * scale,
                    "rows {rows}: widened product"
                );
            } else {
                assert!(
                    diff(&got, &by_rows) < 1e-5 * scale,
                    "rows {rows}: row-by-row product"
                );
            }
        }
    }

    #[test]
    fn unmerged_lora_equals_merged() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 16), &dev).expect("w");
        let a = Tensor::randn(0f32, 1.0, (4, 16), &dev).expect("a");
        let b = Tensor::randn(0f32, 1.0, (24, 4), &dev).expect("b");
        let x = Tensor::randn(0f32, 1.0, (5, 16), &dev).expect("x");
        let scale = 0.7;
        let merged = Linear {
            w: Matrix::Dense((&w + (b.matmul(&a).expect("ba") * scale).expect("s")).expect("add")),
            b: None,
            lora: None,
        };
        let side = Linear {
            w: Matrix::Quant(QMatMul::Tensor(w)),
            b: None,
            lora: Some(LoraSide { a, b, scale }),
        };
        let d = (merged.forward(&x).expect("m") - side.forward(&x).expect("s"))
            .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert!(d < 1e-4, "{d}");
    }
}
