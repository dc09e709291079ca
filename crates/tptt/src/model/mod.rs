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
//!
//! The pieces: `layers` (projections, norms, MLP/MoE, a layer's q/k/v preparation), `load`
//! (building a model from weights), `forward` (the tensor path of [`Model::forward`]: a call
//! planned once, its attention path, a layer at a time), `kv` (the KV ring: slots, positions,
//! writes), `mix` (the Memory-as-Gate mix, resolved at load), `step` (the fused single-token
//! CPU step: the same computation on slices), `train` (the differentiable forward for
//! distillation).

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};

use crate::config::{ModelConfig, TpttSettings};
use crate::error::{Error, Result};
use crate::linear::{CarryMode, LinearCarry, LinearShape, ScanImpl};
use crate::rope::Rope;
pub use crate::state::{LayerState, State};
use crate::weights::AdapterReport;

mod embed;
mod forward;
mod kv;
mod layers;
mod load;
mod mix;
mod openelm;
mod packed;
pub use packed::Packed;
mod step;
mod train;
pub use train::{LayerLora, LoraPair, SeqContext, TrainCarry};

use layers::{Layer, Linear, Matrix, Mlp, Norm};
use mix::MagMix;

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
    /// Keep the f16 / bf16 matrices of a safetensors base in their stored precision on the CPU
    /// (half the memory and half the bytes a decode step reads; widened to f32 as they are
    /// multiplied, which is exact): what the app and the CLI's chat commands use. Default
    /// false (every weight f32: training, the reference comparisons). LoRA stays unmerged
    /// beside such matrices.
    pub half_weights: bool,
    /// Repack a GGUF base's Q4_K, Q4_1 and Q8_0 matrices 16 rows to a group on a CPU with
    /// AVX-512 VNNI (`kernels::q4k_x16`, `kernels::q32_x16`: decode takes 16 rows per
    /// instruction; Q4_K 148 bytes per 256 values instead of 144, the others as stored; results
    /// equal to f32 rounding). Default true; ignored elsewhere. A tied head is repacked once and
    /// the embedding reads its rows from the same bytes.
    pub repack: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            retie_lm_head: true,
            device: Device::Cpu,
            scan: ScanImpl::Fast,
            fused_step: true,
            half_weights: false,
            repack: true,
        }
    }
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
    embed: embed::Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    /// RoPE tables: `[global]` or `[global, local]`.
    ropes: Vec<Rope>,
    shape: LinearShape,
    scan: ScanImpl,
    fused_step: bool,
    adapter: AdapterReport,
    /// The MaG mix of [`ModelConfig::tptt`], resolved at load (and by `set_mag_weight`).
    mix: MagMix,
}

impl Model {
    /// The KV cache format `choice` gives for this model (its head size, its device); an
    /// explicit format it cannot use is refused with the reason.
    pub fn kv_format(&self, choice: crate::state::KvChoice) -> Result<crate::state::KvFormat> {
        choice
            .resolve(self.config().base.head_dim, &self.device)
            .map_err(Error::Input)
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
                Matrix::Packed(p) => p.rows * p.cols,
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
            Matrix::Dense(t) => self.embed.dense().is_some_and(|e| e.id() == t.id()),
            Matrix::Quant(_) | Matrix::Packed(_) => self.cfg.base.tie_word_embeddings,
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

    /// The linear branch's shape for one layer (its own head counts).
    fn linear_shape(&self, layer: &Layer) -> LinearShape {
        LinearShape {
            heads: layer.heads,
            kv_heads: layer.kv_heads,
            ..self.shape
        }
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
        self.mix = MagMix::of(&self.cfg.tptt);
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
            layers: self
                .layers
                .iter()
                .map(|l| LayerState {
                    k: None,
                    v: None,
                    linear: LinearCarry::grouped(l.kv_heads, b.head_dim),
                })
                .collect(),
            mode,
            window,
            kv_format: Default::default(),
        }
    }

    /// One full-sequence forward without cache, as the reference's `use_cache=False` forward.
    pub fn forward_full(&self, ids: &[u32]) -> Result<Tensor> {
        let mut st = self.new_state(CarryMode::Continue, self.config_window());
        self.forward(ids, &mut st, Logits::All)
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
