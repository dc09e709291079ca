//! [`Model::forward`] on tensors: one call of `S` tokens through every layer, continuing a
//! [`State`].
//!
//! A call is planned once ([`Call::plan`]): the positions and RoPE tables, and the **attention
//! path** ([`Path`]) every layer then takes:
//! - [`Path::RingOne`]: one token in `Continue` mode (when the fused step does not take it): its
//!   key is written into its ring slot first, then attended over the ring with candle ops;
//! - [`Path::RingSteps`]: a short prompt (at most [`STEP_PROMPT_MAX`] tokens: a chat message)
//!   in `Continue` mode on the CPU in f32 over an 8-bit cache that the integer decode
//!   attention reads ([`kernels::attend::integer_attention`]): token by token as the decode
//!   step does, each key written into its slot, then attended over the ring by
//!   [`kernels::attend_one`]; the projections, the linear branch and the MLP stay batched;
//! - [`Path::RingKernel`]: a prompt in `Continue` mode on the CPU in f32: the prefill kernel
//!   (`kernels::prefill`) reads the ring and the new keys in place, with no mask; the new keys
//!   are written into the ring after the layer;
//! - [`Path::Concat`]: the cache followed by the new keys, with a mask per effective window
//!   (candle ops): prompts elsewhere, and `Reference` mode (whose cache is a list in position
//!   order, replaced by the concatenation). It is the reference the kernel is tested against.
//!
//! Each layer ([`Model::layer`]) runs the softmax branch on the path, the linear branch
//! (`linear::forward`) on the raw projections, the [`MagMix`](super::mix::MagMix), the MLP, and
//! its ring writes ([`KvRing`]); the state's positions are updated once after the last layer.

use candle_core::{DType, Tensor};

use super::kv::{sees, KvRing};
use super::layers::Layer;
use super::{step, Logits, Model};
use crate::error::{Error, Result};
use crate::kernels::prefill::{AttendMany, KeySegment};
use crate::linear::{self, CarryMode};
use crate::state::{KvFormat, LayerState, State};

/// The longest prompt that takes [`Path::RingSteps`] (a chat message). Longer reads (the app's
/// 512-token prompt blocks) keep the flash kernel, measured and tested at that size.
pub(crate) const STEP_PROMPT_MAX: usize = 64;

/// How a call's softmax branch reads and writes its keys (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// One token in `Continue` mode, written into `slot` then attended over the ring.
    RingOne { slot: usize },
    /// A short prompt over an 8-bit cache, token by token: each key written, then attended.
    RingSteps,
    /// A prompt in `Continue` mode read by the prefill kernel; written after.
    RingKernel,
    /// The cache and the new keys concatenated, masked.
    Concat,
}

/// What every layer of one call shares.
struct Call {
    /// Tokens in the call.
    s: usize,
    /// Their absolute positions.
    positions: Vec<usize>,
    /// `(cos, sin)` per RoPE table of the model.
    cos_sin: Vec<(Tensor, Tensor)>,
    path: Path,
    /// Positions of the keys attended to, in the order of the key tensor (not for
    /// [`Path::RingKernel`], which reads the ring's own order).
    att_pos: Vec<usize>,
    /// Valid cache slots before the call.
    filled_before: usize,
    /// The TPTT window masks apply (`Continue` mode); each layer combines it with its own.
    tptt_window: Option<usize>,
    /// One mask `[S, T]` per distinct effective window (not for [`Path::RingKernel`]).
    masks: Vec<(Option<usize>, Tensor)>,
    ring: KvRing,
}

impl Call {
    fn plan(model: &Model, state: &State, s: usize) -> Result<Self> {
        let b = &model.cfg.base;
        let ring = KvRing::of(state, b.head_dim);
        let positions: Vec<usize> = (state.pos..state.pos + s).collect();
        let cos_sin = model
            .ropes
            .iter()
            .map(|r| r.cos_sin(&positions, &model.device))
            .collect::<Result<_>>()?;
        let continue_mode = state.mode == CarryMode::Continue;
        let path = if continue_mode && s == 1 {
            Path::RingOne {
                slot: ring.slot(state.pos),
            }
        } else if continue_mode && model.fused_step && model.device.is_cpu() && model.embed.is_f32()
        {
            // The flash kernel widens an 8-bit cache to f32 and multiplies in floats; the
            // integer decode kernel, one token at a time, reads it faster (SmolLM2, 8k cached:
            // a 16-token message 358 → 173 ms, 64 tokens 1185 → 460 ms).
            if s <= STEP_PROMPT_MAX
                && !state.key_pos.is_empty()
                && state.kv_format == KvFormat::Q8_0
                && crate::kernels::attend::integer_attention(b.head_dim)
            {
                Path::RingSteps
            } else {
                Path::RingKernel
            }
        } else {
            Path::Concat
        };
        let att_pos: Vec<usize> = match path {
            Path::RingOne { .. } => ring.after_one(&state.key_pos, state.pos)?.1,
            Path::RingSteps | Path::RingKernel | Path::Concat => state
                .key_pos
                .iter()
                .copied()
                .chain(positions.iter().copied())
                .collect(),
        };
        let tptt_window = if continue_mode { state.window } else { None };
        let mut call = Self {
            s,
            positions,
            cos_sin,
            path,
            att_pos,
            filled_before: state.key_pos.len(),
            tptt_window,
            masks: Vec::new(),
            ring,
        };
        if !matches!(path, Path::RingKernel | Path::RingSteps) {
            for layer in &model.layers {
                let w = call.window(layer);
                if !call.masks.iter().any(|(x, _)| *x == w) {
                    let mask = call.mask(w, &model.device)?;
                    call.masks.push((w, mask));
                }
            }
        }
        Ok(call)
    }

    /// The window of `layer` in this call: the TPTT window combined with the layer's own.
    fn window(&self, layer: &Layer) -> Option<usize> {
        match (self.tptt_window, layer.window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The additive mask `[S, T]`: query `i` sees key `j` when it is not later and within `w`.
    fn mask(&self, w: Option<usize>, device: &candle_core::Device) -> Result<Tensor> {
        let t_len = self.att_pos.len();
        let mut mask = vec![0f32; self.s * t_len];
        for (i, &qp) in self.positions.iter().enumerate() {
            for (j, &kp) in self.att_pos.iter().enumerate() {
                if !sees(kp, qp, w) {
                    mask[i * t_len + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Tensor::from_vec(mask, (self.s, t_len), device)?)
    }

    fn mask_of(&self, layer: &Layer) -> Result<&Tensor> {
        let w = self.window(layer);
        self.masks
            .iter()
            .find(|(x, _)| *x == w)
            .map(|(_, m)| m)
            .ok_or_else(|| Error::State("mask missing".into()))
    }
}

impl Model {
    /// Run `ids` continuing `state` (updated in place). Returns logits as [`Logits`] says.
    pub fn forward(&self, ids: &[u32], state: &mut State, which: Logits) -> Result<Tensor> {
        self.check_call(ids, state)?;
        let s = ids.len();
        if s == 1 && state.mode == CarryMode::Continue && self.fused_step && step::supported(self) {
            // The step's many short parallel regions run on a team of spinning threads that
            // lives for this step (see `team`), not on rayon's sleeping pool.
            return crate::team::with_team(rayon::current_num_threads(), || {
                step::forward_one(self, ids[0], state)
            });
        }
        if state.mode == CarryMode::Reference {
            reference_crop(state, s)?;
        }
        let call = Call::plan(self, state, s)?;
        if state.mode == CarryMode::Continue {
            // The buffers for every slot the call writes, for all layers at once (one
            // allocation, before the call's activations).
            let filled = state.window.map_or(state.pos + s, |w| w.min(state.pos + s));
            state.reserve_kv(
                filled,
                |i| self.layers[i].kv_heads,
                self.cfg.base.head_dim,
                &self.device,
            )?;
        }
        let b = &self.cfg.base;
        let mut h = self.embed.rows(ids, &self.device)?; // [S, E]
        if let Some(scale) = b.embed_scale {
            // transformers casts sqrt(E) to the weight dtype (f32 here) before multiplying.
            h = (h * (scale as f32) as f64)?;
        }
        {
            let State {
                key_pos,
                layers,
                mode,
                ..
            } = &mut *state;
            for (layer, ls) in self.layers.iter().zip(layers.iter_mut()) {
                h = self.layer(layer, ls, h, &call, key_pos, *mode)?;
            }
        }
        match call.path {
            Path::RingOne { .. } => state.key_pos = call.att_pos,
            Path::RingKernel | Path::RingSteps => {
                call.ring.after_many(&mut state.key_pos, state.pos, s)?
            }
            Path::Concat if state.mode == CarryMode::Continue => {
                call.ring.after_many(&mut state.key_pos, state.pos, s)?
            }
            Path::Concat => state.key_pos = call.att_pos,
        }
        state.pos += s;
        self.head(h, which, s)
    }

    /// Refuses what the call cannot run: no tokens, ids past the vocabulary, a state of another
    /// model or with a window outside `1..=MAX_WINDOW`.
    fn check_call(&self, ids: &[u32], state: &State) -> Result<()> {
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
        // hand with a window of 0 would divide by zero (slot = position mod W).
        if let Some(w) = state.window {
            crate::state::validate_window("the state's softmax window", w).map_err(Error::State)?;
        }
        Ok(())
    }

    /// One decoder layer on `h` (`[S, E]`): attention on the call's path, the linear branch,
    /// the mix, the MLP; the layer's keys written as the path says.
    fn layer(
        &self,
        layer: &Layer,
        ls: &mut LayerState,
        h: Tensor,
        call: &Call,
        key_pos: &[usize],
        mode: CarryMode,
    ) -> Result<Tensor> {
        let b = &self.cfg.base;
        let (nkv, d) = (layer.kv_heads, b.head_dim);
        let s = call.s;
        let x = layer.in_norm.forward(&h)?;
        let q_raw = layer.q.forward(&x)?; // [S, H·D]
        let k_raw = layer.k.forward(&x)?; // [S, Hkv·D]
        let v_raw = layer.v.forward(&x)?;
        let (cos, sin) = &call.cos_sin[layer.rope];
        // Softmax branch: q/k norms, clip, RoPE, GQA, window. The linear branch reads the raw
        // projections (tptt calls q_proj/k_proj/v_proj itself).
        let (q, k, vs) = layer.softmax_qkv(b, &q_raw, &k_raw, &v_raw, cos, sin)?;
        let v = vs.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?;
        let attn = match call.path {
            Path::RingKernel => self.attend_kernel(layer, ls, &q, &k, &v, call, key_pos)?,
            Path::RingSteps => self.attend_steps(layer, ls, &q, &k, &v, call, key_pos)?,
            Path::RingOne { slot } => {
                call.ring.write_one(ls, &k, &v, slot, &self.device)?;
                let t_len = call.att_pos.len();
                match (ls.k_view(t_len)?, ls.v_view(t_len)?) {
                    (Some(ka), Some(va)) => {
                        self.attend_masked(layer, &q, &ka, &va, call.mask_of(layer)?)?
                    }
                    _ => return Err(Error::State("KV cache missing after write".into())),
                }
            }
            Path::Concat => {
                let (ka, va) = match (
                    ls.k_view(call.filled_before)?,
                    ls.v_view(call.filled_before)?,
                ) {
                    (Some(kc), Some(vc)) => {
                        (Tensor::cat(&[&kc, &k], 1)?, Tensor::cat(&[&vc, &v], 1)?)
                    }
                    _ => (k.clone(), v.clone()),
                };
                let attn = self.attend_masked(layer, &q, &ka, &va, call.mask_of(layer)?)?;
                if mode == CarryMode::Reference {
                    // The cache is the ordered list of every key attended to.
                    ls.k = Some(ka);
                    ls.v = Some(va);
                }
                attn
            }
        };
        let out = if self.mix.branch_on() {
            let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
            let y = linear::forward(
                &self.linear_shape(layer),
                &flat(&q_raw)?,
                &flat(&k_raw)?,
                &flat(&v_raw)?,
                &mut ls.linear,
                mode,
                self.scan,
            );
            let y = Tensor::from_vec(y, (s, layer.heads * d), &self.device)?;
            self.mix.tensors(&attn, &y, |z| layer.o.forward(z))?
        } else {
            layer.o.forward(&attn)?
        };
        let out = match &layer.post_attn_norm {
            Some(n) => n.forward(&out)?,
            None => out,
        };
        let h = (h + out)?;
        let x = layer.pre_ff_norm.forward(&h)?;
        let mlp = layer.mlp.forward(&x, b.hidden_act)?;
        let mlp = match &layer.post_ff_norm {
            Some(n) => n.forward(&mlp)?,
            None => mlp,
        };
        let h = (h + mlp)?;
        if mode == CarryMode::Continue
            && !matches!(call.path, Path::RingOne { .. } | Path::RingSteps)
        {
            call.ring
                .write_many(ls, &k, &v, call.positions[0], &self.device)?;
        }
        Ok(h)
    }

    /// Softmax attention of `q` (`[H, S, D]`) over `k`, `v` (`[Hkv, T, D]`) with `mask`
    /// (`[S, T]`, additive): `[S, H·D]`. Query heads `kvh·G + g` share kv head `kvh`.
    fn attend_masked(
        &self,
        layer: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let b = &self.cfg.base;
        let (nh, nkv, d) = (layer.heads, layer.kv_heads, b.head_dim);
        let (g, s, t_len) = (nh / nkv, q.dim(1)?, k.dim(1)?);
        let qg = q.reshape((nkv, g * s, d))?;
        let scores = (qg.matmul(&k.t()?)? * b.attn_scale)?; // [Hkv, G·S, T]
        let scores = scores.reshape((nkv, g, s, t_len))?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((nkv, g * s, t_len))?;
        Ok(probs
            .matmul(v)?
            .reshape((nh, s, d))?
            .transpose(0, 1)?
            .reshape((s, nh * d))?)
    }

    /// [`Path::RingKernel`]: the prefill kernel over the ring's valid slots (`key_pos`) and the
    /// call's new keys, in place: `[S, H·D]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_kernel(
        &self,
        layer: &Layer,
        ls: &LayerState,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &Call,
        key_pos: &[usize],
    ) -> Result<Tensor> {
        let b = &self.cfg.base;
        let (nh, nkv, d) = (layer.heads, layer.kv_heads, b.head_dim);
        let (qc, kc, vc) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (qd, kd, vd) = (
            step::Data::of(&qc),
            step::Data::of(&kc),
            step::Data::of(&vc),
        );
        let cache = match (&ls.k, &ls.v) {
            (Some(kb), Some(vb)) if call.filled_before > 0 => {
                Some((step::Data::of(kb), step::Data::of(vb), kb.dim(1)?))
            }
            _ => None,
        };
        let mut segments = Vec::with_capacity(2);
        if let Some((kb, vb, capacity)) = &cache {
            segments.push(KeySegment {
                k: kb.kv()?,
                v: vb.kv()?,
                capacity: *capacity,
                pos: &key_pos[..call.filled_before],
            });
        }
        segments.push(KeySegment {
            k: kd.slice()?.into(),
            v: vd.slice()?.into(),
            capacity: call.s,
            pos: &call.positions,
        });
        let out = crate::kernels::prefill::attend_many(&AttendMany {
            q: qd.slice()?,
            q_pos: &call.positions,
            segments: &segments,
            window: call.window(layer),
            heads: nh,
            kv_heads: nkv,
            dim: d,
            scale: b.attn_scale as f32,
        });
        Ok(Tensor::from_vec(out, (call.s, nh * d), &self.device)?)
    }

    /// [`Path::RingSteps`]: for each token in turn, its key and value written into its ring
    /// slot, then its query attended over the ring as the decode step does (8-bit query
    /// rounding included): `[S, H·D]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_steps(
        &self,
        layer: &Layer,
        ls: &mut LayerState,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        call: &Call,
        key_pos: &[usize],
    ) -> Result<Tensor> {
        let b = &self.cfg.base;
        let (nh, nkv, d, s) = (layer.heads, layer.kv_heads, b.head_dim, call.s);
        let qs = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?; // [H, S, D]
        let window = call.window(layer);
        let mut out = vec![0f32; s * nh * d];
        let mut slots = key_pos.to_vec();
        let mut qt = vec![0f32; nh * d];
        let mut visible = Vec::new();
        // The attention's parallel regions run on a team for the layer, as in the decode step.
        crate::team::with_team(rayon::current_num_threads(), || -> Result<()> {
            for (t, &p) in call.positions.iter().enumerate() {
                let slot = call.ring.advance_one(&mut slots, p)?;
                let one = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(1, t, 1)?.contiguous()?) };
                call.ring
                    .write_one(ls, &one(k)?, &one(v)?, slot, &self.device)?;
                visible.clear();
                visible.extend(slots.iter().map(|&kp| sees(kp, p, window)));
                for (h, row) in qt.chunks_exact_mut(d).enumerate() {
                    row.copy_from_slice(&qs[(h * s + t) * d..(h * s + t + 1) * d]);
                }
                let o = step::attend_ring(
                    (&ls.k, &ls.v),
                    &qt,
                    &visible,
                    nh,
                    nkv,
                    d,
                    b.attn_scale as f32,
                )?;
                out[t * nh * d..(t + 1) * nh * d].copy_from_slice(&o);
            }
            Ok(())
        })?;
        Ok(Tensor::from_vec(out, (s, nh * d), &self.device)?)
    }

    /// The final norm, `lm_head` and soft-cap on the rows [`Logits`] asks for: `[R, V]` f32.
    fn head(&self, h: Tensor, which: Logits, s: usize) -> Result<Tensor> {
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
        let logits = match self.cfg.base.final_logit_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// `Reference` mode before a call of `s` tokens (the reference's cached generation): a call
/// longer than the window is refused (tptt 0.12.1 crashes there), and a cache past `W − 1`
/// positions is cropped to its FIRST `W − 1` (transformers' `DynamicCache.crop(W − 1)`).
fn reference_crop(state: &mut State, s: usize) -> Result<()> {
    let Some(w) = state.window else {
        return Ok(());
    };
    if s > w {
        return Err(Error::Input(format!(
            "reference-compatible mode: a call of {s} tokens exceeds max_self_attn_length {w} (tptt 0.12.1 crashes here)"
        )));
    }
    if !state.key_pos.is_empty() && state.key_pos.len() > w - 1 {
        state.key_pos.truncate(w - 1);
        for l in state.layers.iter_mut() {
            l.k = l.k.as_ref().map(|k| k.narrow(1, 0, w - 1)).transpose()?;
            l.v = l.v.as_ref().map(|v| v.narrow(1, 0, w - 1)).transpose()?;
        }
    }
    Ok(())
}
