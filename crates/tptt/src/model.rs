//! The TPTT model: a Llama / Mistral / Qwen2 decoder whose attention layers carry the LiZA linear
//! branch (SPEC §2–§6), with immutable weights ([`Model`]) and a separate per-conversation
//! [`State`].
//!
//! Per layer: `x = RMSNorm(h)`, `q, k, v = proj(x)` (LoRA merged at load), softmax branch on the
//! RoPE'd projections, linear branch on the raw ones, `out = (1−m)·o_base + m·o_lin`
//! (+ `sw ⊙ lw` with `cross_gate`; `o_lin` rescaled by `rms(o_base)` with `base_scale_attn`),
//! `h += out`, `h += MLP(RMSNorm(h))`.
//!
//! Softmax window `W` (where we deliberately differ from the reference, which crashes on calls
//! longer than `W`, SPEC §5): in [`CarryMode::Continue`] each query attends to the keys of the
//! last `W` positions up to itself (a true sliding window with absolute RoPE positions) and the
//! KV cache keeps `W` positions; the linear branch always sees everything. In
//! [`CarryMode::Reference`] the reference's cached generation is reproduced: calls longer than
//! `W` are refused and before each later call the cache is cropped to its *first* `W − 1`
//! positions (transformers' `DynamicCache.crop`).

use candle_core::{DType, Device, Tensor, D};

use crate::config::{ModelConfig, TpttSettings};
use crate::error::{Error, Result};
use crate::linear::{self, CarryMode, LinearCarry, LinearShape, ScanImpl};
pub use crate::state::{LayerState, State};
use crate::repo::VariantFiles;
use crate::rope::{self, Rope};
use crate::weights::{self, AdapterReport, TensorMap};

/// Options for [`Model::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Reproduce the reference's `lm_head := embed_tokens` after loading (SPEC §1.5). Default true.
    pub retie_lm_head: bool,
    /// Device for the weights and the softmax branch.
    pub device: Device,
    /// Scan implementation of the linear branch.
    pub scan: ScanImpl,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { retie_lm_head: true, device: Device::Cpu, scan: ScanImpl::Fast }
    }
}

#[derive(Debug, Clone)]
struct Linear {
    w: Tensor, // [out, in]
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    in_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Which logits [`Model::forward`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[S, V]`.
    All,
    /// `[1, V]`, the last position only.
    Last,
}

/// A loaded TPTT model (immutable).
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    shape: LinearShape,
    scan: ScanImpl,
    adapter: AdapterReport,
}

fn take(map: &mut TensorMap, name: &str, dims: &[usize], location: &str) -> Result<Tensor> {
    let t = map.remove(name).ok_or_else(|| Error::MissingTensor { name: name.into(), location: location.into() })?;
    if t.dims() != dims {
        return Err(Error::ShapeMismatch { name: name.into(), got: t.dims().to_vec(), expected: dims.to_vec() });
    }
    Ok(t)
}

fn take_linear(map: &mut TensorMap, prefix: &str, out: usize, inp: usize, bias: bool, location: &str) -> Result<Linear> {
    let w = take(map, &format!("{prefix}.weight"), &[out, inp], location)?;
    let b = if bias { Some(take(map, &format!("{prefix}.bias"), &[out], location)?) } else { None };
    Ok(Linear { w, b })
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    // transformers: x * rsqrt(mean(x²) + eps), then weight * x.
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(w)?)
}

impl Model {
    /// Load a variant: base weights, adapter, re-tie.
    pub fn load(files: &VariantFiles, opts: &LoadOptions) -> Result<Self> {
        let mut map = weights::load_model_dir(&files.base_dir, &opts.device)?;
        let adapter = match (&files.adapter, &files.config.tptt.lora) {
            (Some(path), lora) => weights::apply_adapter(&mut map, path, lora.as_ref(), &files.target_modules(), &opts.device)?,
            (None, Some(_)) => {
                return Err(Error::NotFound(format!(
                    "{} has a lora_config but no adapter_model.safetensors",
                    files.dir.display()
                )))
            }
            (None, None) => AdapterReport::default(),
        };
        Self::from_tensors(files.config.clone(), map, &files.base_dir.display().to_string(), adapter, opts)
    }

    /// Load a plain Hugging Face model folder (no TPTT repo) with the given TPTT settings: an
    /// untrained injection, or `mag_weight = 0` for the base transformer alone.
    pub fn load_plain(base_dir: &std::path::Path, tptt: TpttSettings, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = base_dir.join("config.json");
        let base = crate::config::BaseConfig::from_json(&crate::config::read_json_object(&cfg_path)?, Some(&cfg_path))?;
        let map = weights::load_model_dir(base_dir, &opts.device)?;
        Self::from_tensors(ModelConfig { base, tptt }, map, &base_dir.display().to_string(), AdapterReport::default(), opts)
    }

    /// Build from already loaded (and adapted) tensors with HF names.
    pub fn from_tensors(cfg: ModelConfig, mut map: TensorMap, location: &str, adapter: AdapterReport, opts: &LoadOptions) -> Result<Self> {
        let b = &cfg.base;
        let (e, hd, kvd) = (b.hidden_size, b.num_heads * b.head_dim, b.num_kv_heads * b.head_dim);
        let embed = take(&mut map, "model.embed_tokens.weight", &[b.vocab_size, e], location)?;
        let mut layers = Vec::new(); // not with_capacity: num_layers is untrusted until the weights confirm it
        for i in 0..b.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                in_norm: take(&mut map, &format!("{p}.input_layernorm.weight"), &[e], location)?,
                post_norm: take(&mut map, &format!("{p}.post_attention_layernorm.weight"), &[e], location)?,
                q: take_linear(&mut map, &format!("{p}.self_attn.q_proj"), hd, e, b.qkv_bias, location)?,
                k: take_linear(&mut map, &format!("{p}.self_attn.k_proj"), kvd, e, b.qkv_bias, location)?,
                v: take_linear(&mut map, &format!("{p}.self_attn.v_proj"), kvd, e, b.qkv_bias, location)?,
                o: take_linear(&mut map, &format!("{p}.self_attn.o_proj"), e, hd, b.o_bias, location)?,
                gate: take_linear(&mut map, &format!("{p}.mlp.gate_proj"), b.intermediate_size, e, b.mlp_bias, location)?,
                up: take_linear(&mut map, &format!("{p}.mlp.up_proj"), b.intermediate_size, e, b.mlp_bias, location)?,
                down: take_linear(&mut map, &format!("{p}.mlp.down_proj"), e, b.intermediate_size, b.mlp_bias, location)?,
            });
        }
        let norm = take(&mut map, "model.norm.weight", &[e], location)?;
        let lm_head = if opts.retie_lm_head || b.tie_word_embeddings {
            embed.clone()
        } else {
            take(&mut map, "lm_head.weight", &[b.vocab_size, e], location)?
        };
        let rope = Rope::new(b);
        let shape = LinearShape {
            heads: b.num_heads,
            kv_heads: b.num_kv_heads,
            dim: b.head_dim,
            rc: cfg.tptt.recurrent,
            max_chunk: cfg.tptt.max_chunk_size,
        };
        Ok(Self { device: opts.device.clone(), embed, layers, norm, lm_head, rope, shape, scan: opts.scan, adapter, cfg })
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

    /// Number of parameters (embedding counted once when tied).
    pub fn num_params(&self) -> usize {
        let lin = |l: &Linear| l.w.elem_count() + l.b.as_ref().map_or(0, |b| b.elem_count());
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.in_norm.elem_count() + l.post_norm.elem_count() + [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|x| lin(x)).sum::<usize>())
            .sum();
        let head = if self.lm_head.id() == self.embed.id() { 0 } else { self.lm_head.elem_count() };
        self.embed.elem_count() + layers + self.norm.elem_count() + head
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

    /// Override the MaG weight (0 switches the linear branch off).
    pub fn set_mag_weight(&mut self, m: f32) {
        self.cfg.tptt.mag_weight = m;
    }

    /// The softmax window the config implies: `max_self_attn_length` and the base's own sliding
    /// window, whichever is smaller.
    pub fn config_window(&self) -> Option<usize> {
        match (self.cfg.tptt.max_self_attn_length, self.cfg.base.sliding_window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A fresh state.
    pub fn new_state(&self, mode: CarryMode, window: Option<usize>) -> State {
        let b = &self.cfg.base;
        State {
            pos: 0,
            key_pos: Vec::new(),
            layers: (0..b.num_layers)
                .map(|_| LayerState { k: None, v: None, linear: LinearCarry::new(b.num_heads, b.head_dim) })
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
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary (size {})", b.vocab_size)));
        }
        if state.layers.len() != b.num_layers {
            return Err(Error::State(format!("state has {} layers, model has {}", state.layers.len(), b.num_layers)));
        }
        let s = ids.len();
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
        let (cos, sin) = self.rope.cos_sin(&positions, &self.device)?;
        // Softmax keys: a ring of W slots in Continue mode (slot = position mod W), written in
        // place for single-token steps; an ordered list in Reference mode.
        let ring = state.mode == CarryMode::Continue;
        let in_place = ring && s == 1;
        let window = match state.mode {
            CarryMode::Continue => state.window,
            CarryMode::Reference => self.cfg.base.sliding_window,
        };
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
            state.key_pos.iter().copied().chain(positions.iter().copied()).collect()
        };
        let t_len = att_pos.len();
        let mut mask = vec![0f32; s * t_len];
        for (i, &qp) in positions.iter().enumerate() {
            for (j, &kp) in att_pos.iter().enumerate() {
                let visible = kp <= qp && window.is_none_or(|w| qp - kp < w);
                if !visible {
                    mask[i * t_len + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (s, t_len), &self.device)?;

        let ids_t = Tensor::from_vec(ids.to_vec(), s, &self.device)?;
        let mut h = self.embed.index_select(&ids_t, 0)?; // [S, E]
        let (nh, nkv, d) = (b.num_heads, b.num_kv_heads, b.head_dim);
        let g = nh / nkv;
        let scale = (d as f64).powf(-0.5);
        let tptt = &self.cfg.tptt;
        let m = tptt.mag_weight;
        let linear_on = m != 0.0;
        // Without cross gate / base scaling the mix is linear in the branch outputs, so the
        // shared o_proj runs once: o((1−m)·a + m·y) = (1−m)·o(a) + m·o(y) (bias included).
        let fuse_o = !tptt.cross_gate && !tptt.base_scale_attn;
        let filled_before = state.key_pos.len();
        for (layer, ls) in self.layers.iter().zip(state.layers.iter_mut()) {
            let x = rms_norm(&h, &layer.in_norm, b.rms_norm_eps)?;
            let q_raw = layer.q.forward(&x)?; // [S, H·D]
            let k_raw = layer.k.forward(&x)?; // [S, Hkv·D]
            let v_raw = layer.v.forward(&x)?;

            // Softmax branch: RoPE, GQA, window mask, scale D^-1/2.
            let q = rope::apply(&q_raw.reshape((s, nh, d))?.transpose(0, 1)?.contiguous()?, &cos, &sin)?; // [H, S, D]
            let k = rope::apply(&k_raw.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?, &cos, &sin)?; // [Hkv, S, D]
            let v = v_raw.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?;
            let (k_att, v_att) = if in_place {
                let slot = slot_of(state.pos);
                ls.ensure_capacity(slot + 1, state.window, nkv, d, &self.device)?;
                if let (Some(kb), Some(vb)) = (&ls.k, &ls.v) {
                    kb.slice_set(&k, 1, slot)?;
                    vb.slice_set(&v, 1, slot)?;
                }
                (ls.k_view(t_len)?, ls.v_view(t_len)?)
            } else {
                match (ls.k_view(filled_before)?, ls.v_view(filled_before)?) {
                    (Some(kc), Some(vc)) => (Some(Tensor::cat(&[&kc, &k], 1)?), Some(Tensor::cat(&[&vc, &v], 1)?)),
                    _ => (Some(k.clone()), Some(v.clone())),
                }
            };
            let (k_att, v_att) = match (k_att, v_att) {
                (Some(k), Some(v)) => (k, v),
                _ => return Err(Error::State("KV cache missing after write".into())),
            };
            let qg = q.reshape((nkv, g * s, d))?; // heads h = kvh·G + g
            let scores = (qg.matmul(&k_att.t()?)? * scale)?; // [Hkv, G·S, T]
            let scores = scores.reshape((nkv, g, s, t_len))?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, g * s, t_len))?;
            let attn = probs.matmul(&v_att)?.reshape((nh, s, d))?.transpose(0, 1)?.reshape((s, nh * d))?; // [S, H·D]

            let out = if linear_on {
                let (qv, kv, vv) = (
                    q_raw.flatten_all()?.to_vec1::<f32>()?,
                    k_raw.flatten_all()?.to_vec1::<f32>()?,
                    v_raw.flatten_all()?.to_vec1::<f32>()?,
                );
                let y = linear::forward(&self.shape, &qv, &kv, &vv, &mut ls.linear, state.mode, self.scan);
                let y = Tensor::from_vec(y, (s, nh * d), &self.device)?;
                if fuse_o {
                    layer.o.forward(&((attn * (1.0 - m) as f64)? + (y * m as f64)?)?)?
                } else {
                    let o_base = layer.o.forward(&attn)?; // [S, E]
                    let mut o_lin = layer.o.forward(&y)?;
                    if tptt.base_scale_attn {
                        let rms = (o_base.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
                        o_lin = o_lin.broadcast_mul(&rms)?;
                    }
                    let sw = (&o_base * (1.0 - m) as f64)?;
                    let lw = (o_lin * m as f64)?;
                    if tptt.cross_gate {
                        ((&sw + &lw)? + (&sw * &lw)?)?
                    } else {
                        (sw + lw)?
                    }
                }
            } else {
                layer.o.forward(&attn)?
            };
            h = (h + out)?;
            let x = rms_norm(&h, &layer.post_norm, b.rms_norm_eps)?;
            let mlp = layer.down.forward(&(candle_nn::ops::silu(&layer.gate.forward(&x)?)? * layer.up.forward(&x)?)?)?;
            h = (h + mlp)?;

            if !in_place {
                if ring {
                    // Write the last min(S, W) new keys into their slots.
                    let keep = state.window.map_or(s, |w| w.min(s));
                    for t in s - keep..s {
                        let slot = slot_of(state.pos + t);
                        ls.ensure_capacity(slot + 1, state.window, nkv, d, &self.device)?;
                        if let (Some(kb), Some(vb)) = (&ls.k, &ls.v) {
                            kb.slice_set(&k.narrow(1, t, 1)?.contiguous()?, 1, slot)?;
                            vb.slice_set(&v.narrow(1, t, 1)?.contiguous()?, 1, slot)?;
                        }
                    }
                } else {
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
                return Err(Error::State("KV ring has unfilled slots (positions not contiguous)".into()));
            }
        } else {
            state.key_pos = att_pos;
        }
        state.pos += s;

        let h = match which {
            Logits::All => h,
            Logits::Last => h.narrow(0, s - 1, 1)?,
        };
        let h = rms_norm(&h, &self.norm, b.rms_norm_eps)?;
        Ok(h.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
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
