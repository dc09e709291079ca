//! Building a [`Model`] from weights: a variant (base safetensors or GGUF, the adapter applied
//! or kept unmerged on quantized matrices, the reference's re-tie), a plain base, or a map of
//! already adapted tensors; every tensor's shape checked against the config.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};

use super::embed::Embedding;
use super::layers::{Expert, Layer, Linear, Matrix, Mlp, Norm};
use super::mix::MagMix;
use super::openelm;
use super::packed::Packed;
use super::{LoadOptions, Model};
use crate::config::{
    Architecture, BaseConfig, ModelConfig, NormKind, QkNorm, RopeScaling, TpttSettings,
};
use crate::error::{Error, Result};
use crate::linear::LinearShape;
use crate::repo::VariantFiles;
use crate::rope::Rope;
use crate::weights::{self, AdapterReport, LoraSide, Weight, WeightMap};

/// Where weights come from while building a model.
struct Source<'a> {
    map: WeightMap,
    loras: &'a std::collections::HashMap<String, LoraSide>,
    location: &'a str,
    device: Device,
    /// Repack Q4_K, Q4_1 and Q8_0 matrices 16 rows to a group ([`LoadOptions::repack`], on a
    /// CPU with AVX-512 VNNI).
    repack: bool,
}

/// Take weight `name` out of `map`, checked to have shape `dims` (errors name the tensor and
/// where it was looked for).
pub(super) fn take_weight(
    map: &mut WeightMap,
    name: &str,
    dims: &[usize],
    location: &str,
) -> Result<Weight> {
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
    Ok(w)
}

impl Source<'_> {
    fn weight(&mut self, name: &str, dims: &[usize]) -> Result<Weight> {
        take_weight(&mut self.map, name, dims, self.location)
    }

    /// A dense tensor (quantized ones are dequantized: norms, embeddings).
    fn tensor(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        Ok(match self.weight(name, dims)? {
            Weight::Dense(t) => t,
            Weight::Quant(q) => q.dequantize(&self.device)?,
            Weight::Packed(p) => p.dequantize(&self.device)?,
        })
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let w = match self.weight(&name, &[out, inp])? {
            Weight::Dense(t) => Matrix::Dense(t),
            Weight::Quant(q) if self.repack && Packed::takes(&q) => {
                Matrix::Packed(std::sync::Arc::new(Packed::new(&q)?))
            }
            Weight::Quant(q) => Matrix::Quant(QMatMul::from_arc(q)?),
            Weight::Packed(p) => Matrix::Packed(p),
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

fn take_expert(src: &mut Source<'_>, p: &str, b: &BaseConfig, i: usize) -> Result<Expert> {
    let e = b.hidden_size;
    Ok(Expert {
        gate: src.linear(&format!("{p}.gate_proj"), i, e, b.mlp_bias)?,
        up: src.linear(&format!("{p}.up_proj"), i, e, b.mlp_bias)?,
        down: src.linear(&format!("{p}.down_proj"), e, i, b.mlp_bias)?,
    })
}

impl Model {
    /// Load a variant: base weights, adapter, re-tie.
    pub fn load(files: &VariantFiles, opts: &LoadOptions) -> Result<Self> {
        let (config, mut map) = match &files.base_gguf {
            Some(g) => {
                let (base, map) =
                    crate::gguf::load_with(g, &opts.device, opts.half_weights, repacks(opts))?;
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
                weights::dense(weights::load_model_dir_as(
                    &files.base_dir,
                    &opts.device,
                    opts.half_weights && opts.device.is_cpu(),
                )?),
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
        let map = weights::dense(weights::load_model_dir_as(
            base_dir,
            &opts.device,
            opts.half_weights && opts.device.is_cpu(),
        )?);
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
        let (base, map) =
            crate::gguf::load_with(path, &opts.device, opts.half_weights, repacks(opts))?;
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
        let (map, loras) = if b.arch == Architecture::OpenElm && openelm::has_openelm_names(&map) {
            openelm::llama_names(map, &adapter.unmerged, b, location, &opts.device)?
        } else {
            (map, adapter.unmerged.clone())
        };
        let mut src = Source {
            map,
            loras: &loras,
            location,
            device: opts.device.clone(),
            repack: repacks(opts),
        };
        let e = b.hidden_size;
        let embed_w = src.weight("model.embed_tokens.weight", &[b.vocab_size, e])?;
        // A quantized vocabulary stays quantized on the CPU (rows dequantized as looked up);
        // a tied lm_head shares the same matrix. A tied head that the decode kernels take
        // repacked (Q4_K, Q4_1, Q8_0) is repacked once here and the lookups read the same
        // bytes; the file's copy is dropped at once, so the load never holds the vocabulary
        // twice for long.
        let tied = opts.retie_lm_head || b.tie_word_embeddings;
        let (embed, tied_head) = match embed_w {
            Weight::Quant(q) if tied && src.repack && Packed::takes(&q) => {
                let p = std::sync::Arc::new(Packed::new(&q)?);
                (Embedding::Packed(p.clone()), Some(Matrix::Packed(p)))
            }
            // Repacked as it was read (`gguf::load_as`): the lookups read the same bytes.
            Weight::Packed(p) => (
                Embedding::Packed(p.clone()),
                tied.then_some(Matrix::Packed(p)),
            ),
            Weight::Dense(t) => (
                Embedding::Dense(t.clone()),
                tied.then_some(Matrix::Dense(t)),
            ),
            Weight::Quant(q) => {
                let embed = match opts.device.is_cpu() {
                    true => Embedding::Quant(q.clone()),
                    false => Embedding::Dense(q.dequantize(&opts.device)?),
                };
                let head = match tied {
                    true => Some(Matrix::Quant(QMatMul::from_arc(q)?)),
                    false => None,
                };
                (embed, head)
            }
        };
        let mut layers = Vec::new(); // not with_capacity: num_layers is untrusted until the weights confirm it
        for i in 0..b.num_layers {
            let p = format!("model.layers.{i}");
            let dims = b.layer(i);
            let (hd, kvd) = (dims.num_heads * b.head_dim, dims.num_kv_heads * b.head_dim);
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
                None => Mlp::Gated(take_expert(
                    &mut src,
                    &format!("{p}.mlp"),
                    b,
                    dims.intermediate_size,
                )?),
                Some(moe) => Mlp::Moe {
                    router: src.linear(&format!("{p}.mlp.gate"), moe.num_experts, e, false)?,
                    experts: (0..moe.num_experts)
                        .map(|x| {
                            take_expert(
                                &mut src,
                                &format!("{p}.mlp.experts.{x}"),
                                b,
                                dims.intermediate_size,
                            )
                        })
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
                heads: dims.num_heads,
                kv_heads: dims.num_kv_heads,
            });
        }
        let norm = take_norm(&mut src, "model.norm.weight", b, e)?;
        let lm_head = match tied_head {
            Some(w) => Linear {
                w,
                b: None,
                lora: None,
            },
            None => src.linear("lm_head", b.vocab_size, e, false)?,
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
            mix: MagMix::of(&cfg.tptt),
            cfg,
        })
    }
}

/// Whether the matrices the CPU's decode kernels take repacked are repacked: asked for, on the
/// CPU, which has AVX-512 VNNI (the repacked kernels' instructions).
fn repacks(opts: &LoadOptions) -> bool {
    opts.repack && opts.device.is_cpu() && crate::cpu::has_avx512_vnni()
}
