//! The model's layers as differentiable candle operations, for [`crate::train`]: the same
//! computation as the tensor path of [`Model::forward`] on a whole sequence from a fresh state
//! (softmax attention with the sliding-window mask, the LiZA branch through
//! [`crate::train::linear`]), with LoRA deltas `s·B(A x)` added to q/k/v/o from tensors the
//! caller owns (candle `Var`s while training). Gradients flow to the layer input and the LoRA
//! tensors; the base weights are constants.

use candle_core::{Tensor, D};

use super::layers::Mlp;
use super::{Layer, Linear, Matrix, Model};
use crate::config::Activation;
use crate::error::{Error, Result};
use crate::train::frozen::frozen_matmul;

/// LoRA tensors of one projection: `a: [r, in]`, `b: [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `lora_A`.
    pub a: Tensor,
    /// `lora_B`.
    pub b: Tensor,
}

/// LoRA of one layer's attention projections.
#[derive(Debug, Clone)]
pub struct LayerLora {
    /// `q_proj`.
    pub q: LoraPair,
    /// `k_proj`.
    pub k: LoraPair,
    /// `v_proj`.
    pub v: LoraPair,
    /// `o_proj`.
    pub o: LoraPair,
}

/// What a segment continues from in [`Model::train_layer_carried`].
#[derive(Debug, Clone, Copy)]
pub struct TrainCarry<'a> {
    /// Rows of the layer input that belong to tokens before the segment.
    pub prefix: usize,
    /// The linear branch's state after them, `[Hkv, D, D]`.
    pub state: &'a Tensor,
}

/// What every layer of one sequence shares: RoPE angles and the attention masks.
#[derive(Debug)]
pub struct SeqContext {
    cos_sin: Vec<(Tensor, Tensor)>,
    /// One additive mask `[S, S]` per distinct effective window.
    masks: Vec<(Option<usize>, Tensor)>,
    window: Option<usize>,
    len: usize,
}

impl Linear {
    /// [`Linear::forward`] with the gradient flowing to `x` only ([`frozen_matmul`]).
    fn train_forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.w, &self.lora) {
            (Matrix::Dense(w), None) => {
                let y = frozen_matmul(x, w)?;
                Ok(match &self.b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            _ => self.forward(x),
        }
    }
}

impl Mlp {
    /// The gated MLP with frozen matrices ([`Linear::train_forward`]).
    fn train_forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match self {
            Mlp::Gated(e) => {
                let g = e.gate.train_forward(x)?;
                let g = match act {
                    Activation::Silu => candle_nn::ops::silu(&g)?,
                    Activation::GeluTanh => g.gelu()?,
                };
                e.down.train_forward(&(g * e.up.train_forward(x)?)?)
            }
            Mlp::Moe { .. } => self.forward(x, act),
        }
    }
}

impl Model {
    /// Checks that the model can be trained with external LoRA tensors: dense f32 projections
    /// with no LoRA of their own, no mixture of experts (routing is not differentiable here).
    pub fn check_trainable(&self) -> Result<()> {
        if self.cfg.base.moe.is_some() {
            return Err(Error::config(
                "training a mixture-of-experts base (OLMoE) is not supported: its routing is not differentiable here",
            ));
        }
        if self.cfg.base.layer_dims.is_some() {
            // The trained LoRA is written for q_proj/k_proj/v_proj/o_proj; OpenELM's adapter
            // targets its fused qkv_proj / out_proj (and its layers differ in width).
            return Err(Error::config(
                "training an OpenELM base is not supported yet: its adapter would target the fused qkv_proj, which tptt distill does not write",
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (name, p) in [("q", &l.q), ("k", &l.k), ("v", &l.v), ("o", &l.o)] {
                if !matches!(p.w, Matrix::Dense(_)) || p.lora.is_some() {
                    return Err(Error::config(format!(
                        "layer {i} {name}_proj is quantized or carries a LoRA of its own: train from a plain f32/f16/bf16 base"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// RoPE angles and masks for a sequence of `len` tokens from position 0, with the TPTT
    /// softmax `window` (`None`: full attention) combined with each layer's own.
    pub fn seq_context(&self, len: usize, window: Option<usize>) -> Result<SeqContext> {
        self.seq_context_at(0, len, window)
    }

    /// [`Model::seq_context`] for `len` tokens from position `start` of a longer text (a
    /// segment read with its carry, [`Model::train_layer_carried`]).
    pub fn seq_context_at(
        &self,
        start: usize,
        len: usize,
        window: Option<usize>,
    ) -> Result<SeqContext> {
        if len == 0 || window == Some(0) {
            return Err(Error::Input(
                "a training sequence needs at least one token and a window of at least 1".into(),
            ));
        }
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::Input(format!("positions {start} + {len} overflow")))?;
        let positions: Vec<usize> = (start..end).collect();
        let cos_sin = self
            .ropes
            .iter()
            .map(|r| r.cos_sin(&positions, &self.device))
            .collect::<Result<_>>()?;
        // The CPU's window softmax needs no mask tensor (`crate::train::softmax`).
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for layer in self.layers.iter().filter(|_| !self.device.is_cpu()) {
            let w = effective(window, layer);
            if masks.iter().any(|(x, _)| *x == w) {
                continue;
            }
            let mut mask = vec![0f32; len * len];
            for q in 0..len {
                for k in 0..len {
                    if k > q || w.is_some_and(|w| q - k >= w) {
                        mask[q * len + k] = f32::NEG_INFINITY;
                    }
                }
            }
            masks.push((w, Tensor::from_vec(mask, (len, len), &self.device)?));
        }
        Ok(SeqContext {
            cos_sin,
            masks,
            window,
            len,
        })
    }

    /// `[S, E]` embeddings of `ids` (scaled as the base does).
    pub fn train_embed(&self, ids: &[u32]) -> Result<Tensor> {
        let b = &self.cfg.base;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= b.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                b.vocab_size
            )));
        }
        let t = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
        let h = self.embed.to_dense(&self.device)?.index_select(&t, 0)?;
        Ok(match b.embed_scale {
            Some(scale) => (h * (scale as f32) as f64)?,
            None => h,
        })
    }

    /// Final norm, `lm_head` and soft-cap: `[S, E]` → `[S, V]`.
    pub fn train_head(&self, h: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.train_forward(&self.norm.forward(h)?)?;
        Ok(match self.cfg.base.final_logit_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// Layer `i` on `h: [S, E]` (the whole sequence, fresh state), with `lora` added to its
    /// projections scaled by `scale`. Differentiable in `h` and the LoRA tensors.
    pub fn train_layer(
        &self,
        i: usize,
        h: &Tensor,
        lora: Option<(&LayerLora, f64)>,
        ctx: &SeqContext,
    ) -> Result<Tensor> {
        Ok(self.train_layer_carried(i, h, lora, ctx, None)?.0)
    }

    /// Layer `i` continuing a text read before (truncated back-propagation through time).
    /// `h: [P + S, E]` is the layer's input for the `P = carry.prefix` tokens before the
    /// segment (saved when they were read: their keys and values fill the softmax window of
    /// the segment's first tokens) followed by the segment's `S` tokens; `carry.state` is the
    /// linear branch's state after the prefix's last token. `carry = None`: a fresh read
    /// (`P = 0`, state `1e-6`). Returns the segment's output `[S, E]` and the linear state
    /// after its last token (`None` when the branch is off). Differentiable in `h`, the LoRA
    /// tensors and the state.
    pub fn train_layer_carried(
        &self,
        i: usize,
        h: &Tensor,
        lora: Option<(&LayerLora, f64)>,
        ctx: &SeqContext,
        carry: Option<TrainCarry<'_>>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layer = self
            .layers
            .get(i)
            .ok_or_else(|| Error::Input(format!("layer {i} of {}", self.layers.len())))?;
        let b = &self.cfg.base;
        let s = h.dim(0)?;
        if s != ctx.len {
            return Err(Error::Input(format!(
                "sequence of {s} tokens, context made for {}",
                ctx.len
            )));
        }
        let prefix = carry.as_ref().map_or(0, |c| c.prefix);
        if prefix >= s {
            return Err(Error::Input(format!(
                "a prefix of {prefix} tokens leaves no segment in {s} rows"
            )));
        }
        let (nh, nkv, d) = (layer.heads, layer.kv_heads, b.head_dim);
        let g = nh / nkv;
        let proj =
            |lin: &Linear, x: &Tensor, pick: fn(&LayerLora) -> &LoraPair| -> Result<Tensor> {
                let y = lin.train_forward(x)?;
                match lora {
                    Some((l, scale)) => {
                        let p = pick(l);
                        Ok((y + (x.matmul(&p.a.t()?)?.matmul(&p.b.t()?)? * scale)?)?)
                    }
                    None => Ok(y),
                }
            };
        let x = layer.in_norm.forward(h)?;
        let q_raw = proj(&layer.q, &x, |l| &l.q)?;
        let k_raw = proj(&layer.k, &x, |l| &l.k)?;
        let v_raw = proj(&layer.v, &x, |l| &l.v)?;
        let (cos, sin) = &ctx.cos_sin[layer.rope];
        let (q, k, vs) = layer.softmax_qkv(b, &q_raw, &k_raw, &v_raw, cos, sin)?;
        let v = vs.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?;
        let w = effective(ctx.window, layer);
        let qg = q.reshape((nkv, g * s, d))?; // heads h = kvh·G + g
        let scores = (qg.matmul(&k.t()?)? * b.attn_scale)?; // [Hkv, G·S, S]
        let scores = scores.reshape((nh, s, s))?;
        let probs = if self.device.is_cpu() {
            crate::train::softmax::window_softmax(&scores, w)?
        } else {
            // GPUs: the mask and candle's generic softmax (the fused one has no backward).
            let mask = &ctx
                .masks
                .iter()
                .find(|(x, _)| *x == w)
                .ok_or_else(|| Error::State("mask missing".into()))?
                .1;
            candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?
        };
        let probs = probs.reshape((nkv, g * s, s))?;
        let attn = probs
            .matmul(&v)?
            .reshape((nh, s, d))?
            .transpose(0, 1)?
            .reshape((s, nh * d))?;
        // From here on, the segment's rows only: the prefix's outputs were computed when it
        // was read.
        let seg = s - prefix;
        let tail = |x: &Tensor| -> Result<Tensor> {
            Ok(if prefix == 0 {
                x.clone()
            } else {
                x.narrow(0, prefix, seg)?
            })
        };
        let attn = tail(&attn)?;
        let o = |z: &Tensor| proj(&layer.o, z, |l| &l.o);
        let (out, state) = if self.mix.branch_on() {
            let hist = prefix.min(crate::train::linear::HISTORY);
            let rows = |x: &Tensor| x.narrow(0, prefix - hist, seg + hist);
            let (y, state) = crate::train::linear::forward_carried(
                &self.linear_shape(layer),
                &rows(&q_raw)?,
                &rows(&k_raw)?,
                &rows(&v_raw)?,
                hist,
                carry.map(|c| c.state),
            )?;
            (self.mix.tensors(&attn, &y, o)?, Some(state))
        } else {
            (o(&attn)?, None)
        };
        let out = match &layer.post_attn_norm {
            Some(n) => n.forward(&out)?,
            None => out,
        };
        let h = (tail(h)? + out)?;
        let x = layer.pre_ff_norm.forward(&h)?;
        let mlp = layer.mlp.train_forward(&x, b.hidden_act)?;
        let mlp = match &layer.post_ff_norm {
            Some(n) => n.forward(&mlp)?,
            None => mlp,
        };
        Ok(((h + mlp)?, state))
    }
}

/// The TPTT window combined with a layer's own.
fn effective(window: Option<usize>, layer: &Layer) -> Option<usize> {
    match (window, layer.window) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
