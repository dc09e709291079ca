//! The fused single-token decode step on the CPU: the same computation as the tensor path of
//! [`Model::forward`] for one token in [`CarryMode::Continue`], on plain f32 slices, with no
//! tensor op per elementwise step and no allocation beyond a few `[E]`-sized vectors per layer.
//!
//! Dense matrices, and quantized ones of the types our kernels multiply as stored (Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), go through [`kernels::matvec_group`] (one parallel
//! region for q/k/v, one for gate/up, one each for o, down and the head), attention reads the
//! KV ring in place ([`kernels::attend_one`]), the linear branch is the same
//! [`linear::forward`] as the tensor path. Other quantized types (Q2_K, Q3_K, …) go through
//! candle's quantized matmul, the tensor path's call; unmerged LoRA is added beside the product;
//! MoE blocks are delegated to the same candle calls as the tensor path. `tests/fused_step.rs` compares both paths on every fixture architecture.

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Layout, Storage, StorageRef, Tensor};

use super::kv::KvRing;
use super::layers::Mlp;
use super::{Layer, Linear, Matrix, Model, Norm};
use crate::config::{Activation, NormKind, QkNorm};
use crate::error::{Error, Result};
use crate::kernels::{self, AttendOne, KvSlice, MatVec, Rows};
use crate::linear::{self, CarryMode};
use crate::rope;
use crate::state::{LayerState, State};

/// A read lock on a CPU tensor's storage, giving its contiguous f32 data.
pub(super) struct Data<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Data<'a> {
    pub(super) fn of(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Self { storage, layout }
    }

    pub(super) fn slice(&self) -> Result<&[f32]> {
        let (a, b) = self
            .layout
            .contiguous_offsets()
            .ok_or_else(|| Error::State("fused step: a weight is not contiguous".into()))?;
        match &*self.storage {
            Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[a..b]),
            _ => Err(Error::State(
                "fused step: a tensor is not on the CPU".into(),
            )),
        }
    }

    /// A dense matrix's contiguous data as the kernels' rows: f32, or f16 / bf16 kept as stored.
    pub(super) fn rows(&self) -> Result<Rows<'_>> {
        let (a, b) = self
            .layout
            .contiguous_offsets()
            .ok_or_else(|| Error::State("fused step: a weight is not contiguous".into()))?;
        match &*self.storage {
            Storage::Cpu(candle_core::CpuStorage::F16(x)) => Ok(Rows::F16(&x[a..b])),
            Storage::Cpu(candle_core::CpuStorage::BF16(x)) => Ok(Rows::BF16(&x[a..b])),
            _ => Ok(Rows::F32(self.slice()?)),
        }
    }

    /// A KV buffer's contiguous data in its own format (f32, f16 or 8-bit blocks).
    pub(super) fn kv(&self) -> Result<KvSlice<'_>> {
        let (a, b) = self
            .layout
            .contiguous_offsets()
            .ok_or_else(|| Error::State("a KV buffer is not contiguous".into()))?;
        match &*self.storage {
            Storage::Cpu(candle_core::CpuStorage::F16(x)) => Ok(KvSlice::F16(&x[a..b])),
            Storage::Cpu(candle_core::CpuStorage::U8(x)) => Ok(KvSlice::Q8_0(&x[a..b])),
            Storage::Cpu(c) => Ok(KvSlice::F32(&c.as_slice::<f32>()?[a..b])),
            _ => Err(Error::State("a KV buffer is not on the CPU".into())),
        }
    }
}

/// Can [`forward_one`] run this model? (CPU, f32 dense tensors; quantized matrices are fine.)
pub(super) fn supported(model: &Model) -> bool {
    model.device.is_cpu() && model.embed.is_f32()
}

/// `[x]` as a `[1, n]` tensor, for the candle calls.
fn row(x: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(x.to_vec(), (1, x.len()), device)?)
}

/// Weights [`linears`] multiplies itself.
enum Own<'a> {
    Dense(Data<'a>),
    /// A quantized matrix's blocks as stored, of a type [`quant_rows`] takes.
    Quant(GgmlDType, std::borrow::Cow<'a, [u8]>),
    /// A repacked matrix ([`kernels::q4k_x16`], [`kernels::q32_x16`]), as the kernels see it.
    Packed(Rows<'a>),
}

/// The kernels' view of a quantized matrix of `dtype` (its rows of blocks as stored), if they
/// multiply that type.
fn quant_rows(dtype: GgmlDType, w: &[u8]) -> Option<Rows<'_>> {
    Some(match dtype {
        GgmlDType::Q8_0 => Rows::Q8_0(w),
        GgmlDType::Q4_0 => Rows::Q4_0(w),
        GgmlDType::Q4_1 => Rows::Q4_1(w),
        GgmlDType::Q5_0 => Rows::Q5_0(w),
        GgmlDType::Q5_1 => Rows::Q5_1(w),
        GgmlDType::Q4K => Rows::Q4K(w),
        GgmlDType::Q5K => Rows::Q5K(w),
        GgmlDType::Q6K => Rows::Q6K(w),
        _ => return None,
    })
}

/// Do the kernels multiply `q` (its type, on rows of whole blocks)?
pub(super) fn takes(q: &candle_core::quantized::QTensor) -> bool {
    quant_rows(q.dtype(), &[]).is_some()
        && q.shape()
            .dims()
            .last()
            .is_some_and(|c| c.is_multiple_of(q.dtype().block_size()))
}

/// `x · qᵀ` for `x` of rows of `cols` values, with the kernels, one row at a time (a short
/// prompt through a quantized matrix, [`super::layers`]).
pub(super) fn quant_matmul_rows(
    q: &candle_core::quantized::QTensor,
    x: &[f32],
    cols: usize,
) -> Result<Vec<f32>> {
    let n = q.shape().dims().first().copied().unwrap_or(0);
    let bytes = q.data()?;
    let w = quant_rows(q.dtype(), &bytes)
        .ok_or_else(|| Error::State(format!("no kernel for {:?} matrices", q.dtype())))?;
    matmul_rows(w, n, x, cols)
}

/// `x · qᵀ` for a prompt (many rows of `cols` values) with the 8-bit prompt kernels, when they
/// take `q`'s type (Q4_K, Q5_K, Q6_K: [`kernels::prompt_k`]); `None` otherwise.
pub(super) fn quant_prompt_product(
    q: &candle_core::quantized::QTensor,
    x: &[f32],
    cols: usize,
) -> Result<Option<Vec<f32>>> {
    use kernels::prompt_k::{matmul, KType};
    let t = match q.dtype() {
        GgmlDType::Q4K => KType::Q4K,
        GgmlDType::Q5K => KType::Q5K,
        GgmlDType::Q6K => KType::Q6K,
        _ => return Ok(None),
    };
    let n = q.shape().dims().first().copied().unwrap_or(0);
    if cols == 0
        || !cols.is_multiple_of(kernels::QK_K)
        || !x.len().is_multiple_of(cols)
        || q.shape().dims().last() != Some(&cols)
    {
        return Ok(None);
    }
    let bytes = q.data()?;
    if bytes.len() != n * cols / kernels::QK_K * t.block_bytes() {
        return Err(Error::State(format!(
            "a [{n}, {cols}] {t:?} matrix of {} bytes",
            bytes.len()
        )));
    }
    Ok(Some(matmul(t, &bytes, n, cols, x)))
}

/// `x · pᵀ` for a repacked matrix and `x` of rows of `p.cols` values, with its kernel,
/// one row at a time (a short prompt, [`super::layers`]).
pub(super) fn packed_matmul_rows(p: &super::packed::Packed, x: &[f32]) -> Result<Vec<f32>> {
    matmul_rows(p.kernel_rows(), p.rows, x, p.cols)
}

/// `x · wᵀ` for a dense matrix kept in half precision and `x` of rows of `cols` values, with
/// the kernels, one row at a time (a short prompt, [`super::layers`]).
pub(super) fn half_matmul_rows(w: &Tensor, x: &[f32], cols: usize) -> Result<Vec<f32>> {
    let n = w.dim(0)?;
    let data = Data::of(w);
    let rows = data.rows()?;
    matmul_rows(rows, n, x, cols)
}

/// `x · Wᵀ` one row of `x` at a time through [`kernels::matvec_group`].
fn matmul_rows(w: Rows<'_>, n: usize, x: &[f32], cols: usize) -> Result<Vec<f32>> {
    if cols == 0 || !x.len().is_multiple_of(cols) || !w.fits(n, cols) {
        return Err(Error::State(format!(
            "a [{n}, {cols}] matrix and {} input values",
            x.len()
        )));
    }
    let mut out = vec![0f32; x.len() / cols * n];
    for (xr, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(n.max(1))) {
        kernels::matvec_group(
            vec![MatVec {
                w,
                bias: None,
                out: o,
            }],
            xr,
        );
    }
    Ok(out)
}

/// Apply several linears to the same input: f32 matrices and the quantized types of
/// [`quant_rows`] through the kernels in one parallel region; other quantized types through
/// candle's quantized matmul.
fn linears(lins: &[&Linear], x: &[f32], device: &Device) -> Result<Vec<Vec<f32>>> {
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(lins.len());
    let mut own: Vec<(usize, Own<'_>, Option<Data<'_>>)> = Vec::new();
    for (i, l) in lins.iter().enumerate() {
        let bias = l.b.as_ref().map(Data::of);
        match &l.w {
            Matrix::Dense(w) => {
                outs.push(vec![0f32; w.dim(0)?]);
                own.push((i, Own::Dense(Data::of(w)), bias));
            }
            Matrix::Quant(QMatMul::QTensor(q))
                if device.is_cpu()
                    && quant_rows(q.dtype(), &[]).is_some()
                    && x.len().is_multiple_of(q.dtype().block_size()) =>
            {
                outs.push(vec![0f32; q.shape().dims().first().copied().unwrap_or(0)]);
                own.push((i, Own::Quant(q.dtype(), q.data()?), bias));
            }
            // (Repacked only on the CPU: `Packed::takes`.)
            Matrix::Packed(p) => {
                outs.push(vec![0f32; p.rows]);
                own.push((i, Own::Packed(p.kernel_rows()), bias));
            }
            Matrix::Quant(q) => {
                let mut y = candle_core::Module::forward(q, &row(x, device)?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if let Some(b) = bias {
                    y.iter_mut().zip(b.slice()?).for_each(|(y, b)| *y += b);
                }
                outs.push(y);
            }
        }
    }
    {
        let mut group = Vec::with_capacity(own.len());
        let mut rest: &mut [Vec<f32>] = &mut outs;
        let mut offset = 0;
        for (i, w, b) in &own {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
            let (cur, tail) = tail.split_at_mut(1);
            rest = tail;
            offset = i + 1;
            let w = match w {
                Own::Dense(d) => d.rows()?,
                Own::Quant(dtype, bytes) => quant_rows(*dtype, bytes).ok_or_else(|| {
                    Error::State(format!("fused step: no kernel for {dtype:?} matrices"))
                })?,
                Own::Packed(rows) => *rows,
            };
            if !w.fits(cur[0].len(), x.len()) {
                return Err(Error::State(
                    "fused step: weight shape does not match its input".into(),
                ));
            }
            group.push(MatVec {
                w,
                bias: b.as_ref().map(|b| b.slice()).transpose()?,
                out: &mut cur[0],
            });
        }
        if !group.is_empty() {
            kernels::matvec_group(group, x);
        }
    }
    // Unmerged LoRA (quantized bases): y += s · B(A x).
    for (l, y) in lins.iter().zip(outs.iter_mut()) {
        if let Some(lo) = &l.lora {
            let (a, b) = (Data::of(&lo.a), Data::of(&lo.b));
            let r = lo.a.dim(0)?;
            let mut ax = vec![0f32; r];
            kernels::matvec_naive(a.slice()?, x, &mut ax);
            let mut bax = vec![0f32; y.len()];
            kernels::matvec_naive(b.slice()?, &ax, &mut bax);
            let s = lo.scale as f32;
            y.iter_mut().zip(&bax).for_each(|(y, d)| *y += d * s);
        }
    }
    Ok(outs)
}

/// [`linears`] of exactly `N` linears, as an array.
fn linears_n<const N: usize>(
    lins: [&Linear; N],
    x: &[f32],
    device: &Device,
) -> Result<[Vec<f32>; N]> {
    linears(&lins, x, device)?
        .try_into()
        .map_err(|_| Error::State("fused step: a projection produced no output".into()))
}

/// One linear.
fn linear1(l: &Linear, x: &[f32], device: &Device) -> Result<Vec<f32>> {
    let [y] = linears_n([l], x, device)?;
    Ok(y)
}

/// One query `q` (`[H·D]`) over a layer's KV ring (its cached keys and values `(k, v)`, read in
/// place; the layer's linear carry may be borrowed elsewhere meanwhile), the slots `visible`
/// says: `[H·D]` (the decode step's attention, and a message read token by token).
pub(super) fn attend_ring(
    (k, v): (&Option<Tensor>, &Option<Tensor>),
    q: &[f32],
    visible: &[bool],
    heads: usize,
    kv_heads: usize,
    dim: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let (Some(kb), Some(vb)) = (k, v) else {
        return Err(Error::State("KV cache missing after allocation".into()));
    };
    let (kd, vd) = (Data::of(kb), Data::of(vb));
    Ok(kernels::attend_one(&AttendOne {
        q,
        k: kd.kv()?,
        v: vd.kv()?,
        visible,
        heads,
        kv_heads,
        dim,
        capacity: kb.dim(1)?,
        scale,
    }))
}

/// [`Norm::forward`] over consecutive groups of `group` values (per head or whole rows).
fn norm(n: &Norm, x: &mut [f32], group: usize) -> Result<()> {
    let w = n.w.as_ref().map(Data::of);
    let w = w.as_ref().map(|w| w.slice()).transpose()?;
    let eps = n.eps as f32;
    for v in x.chunks_exact_mut(group) {
        match n.kind {
            NormKind::LayerNoParam => {
                let mean = v.iter().sum::<f32>() / group as f32;
                v.iter_mut().for_each(|x| *x -= mean);
                let var = v.iter().map(|x| x * x).sum::<f32>() / group as f32;
                let den = (var + eps).sqrt();
                v.iter_mut().for_each(|x| *x /= den);
            }
            NormKind::Rms | NormKind::RmsOnePlus => {
                let var = v.iter().map(|x| x * x).sum::<f32>() / group as f32;
                let den = (var + eps).sqrt();
                match w {
                    Some(w) => v.iter_mut().zip(w).for_each(|(x, w)| *x = *x / den * w),
                    None => v.iter_mut().for_each(|x| *x /= den),
                }
            }
        }
    }
    Ok(())
}

fn normed(n: &Norm, x: &[f32]) -> Result<Vec<f32>> {
    let mut v = x.to_vec();
    norm(n, &mut v, x.len())?;
    Ok(v)
}

/// The MLP's activation of one value. SiLU through [`crate::cpu::math::exp`] (relative error
/// ~1e-7 against libm's), so that the loop over a layer's 1536+ values vectorises instead of
/// calling `expf` once per value on the step's critical path.
#[inline(always)]
fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + crate::cpu::math::exp(-x)),
        // candle's `gelu` (tanh approximation), as the tensor path.
        Activation::GeluTanh => {
            0.5 * x * (1.0 + (0.797_884_6_f32 * x * (1.0 + 0.044715 * x * x)).tanh())
        }
    }
}

fn mlp(layer: &Layer, x: &[f32], act: Activation, model: &Model) -> Result<Vec<f32>> {
    match &layer.mlp {
        Mlp::Gated(e) => {
            let [mut g, up] = linears_n([&e.gate, &e.up], x, &model.device)?;
            match act {
                // (One loop per activation, so each vectorises on its own.)
                Activation::Silu => g
                    .iter_mut()
                    .zip(&up)
                    .for_each(|(g, u)| *g = activate(Activation::Silu, *g) * u),
                _ => g
                    .iter_mut()
                    .zip(&up)
                    .for_each(|(g, u)| *g = activate(act, *g) * u),
            }
            linear1(&e.down, &g, &model.device)
        }
        Mlp::Moe { .. } => Ok(layer
            .mlp
            .forward(&row(x, &model.device)?, act)?
            .flatten_all()?
            .to_vec1::<f32>()?),
    }
}

/// A decode step runs a layer's softmax attention and its linear branch side by side, one
/// thread each, while the keys times the query heads stay within this many times the rows of
/// the linear branch's states (`t·H ≤ this·Hkv·D`); over a longer history the attention
/// alone outweighs the branch and is split over the threads first, as before. Measured on
/// SmolLM2 (9 heads, 3 KV heads of 64, 8-bit KV, two threads): side by side +15 % at 128 keys,
/// even at ~1600, −37 % at 16k; this bound is ~1365 keys there.
const SIDE_BY_SIDE_KEYS: usize = 64;

/// One token through the model, CPU, `CarryMode::Continue`. Same contract as
/// [`Model::forward`] with one id (already validated by it). Returns logits `[1, V]`.
pub(super) fn forward_one(model: &Model, id: u32, state: &mut State) -> Result<Tensor> {
    debug_assert_eq!(state.mode, CarryMode::Continue);
    let b = &model.cfg.base;
    let d = b.head_dim;
    let e = b.hidden_size;
    let qp = state.pos;
    let ring = KvRing::of(state, d);
    // The token's slot, and the positions the slots hold once it is written.
    let (slot, key_pos) = ring.after_one(&state.key_pos, qp)?;
    // Every layer's buffer grown at once, into one allocation (`State::reserve_kv`).
    state.reserve_kv(slot + 1, |i| model.layers[i].kv_heads, d, &model.device)?;
    let t_len = key_pos.len();
    let ropes: Vec<(Vec<f32>, Vec<f32>)> = model.ropes.iter().map(|r| r.cos_sin_one(qp)).collect();

    let mut h = model.embed.row(id as usize)?;
    if let Some(scale) = b.embed_scale {
        let s = scale as f32;
        h.iter_mut().for_each(|x| *x *= s);
    }
    let linear_on = model.mix.branch_on();
    let mut visible = vec![false; t_len];
    // The window `visible` was computed for (layers mostly share one: computed once a step).
    let mut visible_for: Option<Option<usize>> = None;
    for (layer, ls) in model.layers.iter().zip(state.layers.iter_mut()) {
        let (nh, nkv) = (layer.heads, layer.kv_heads);
        let x = normed(&layer.in_norm, &h)?;
        let [q_raw, k_raw, v_raw] = linears_n([&layer.q, &layer.k, &layer.v], &x, &model.device)?;

        // Softmax branch.
        let (mut qs, mut ks, mut vs) = (q_raw.clone(), k_raw.clone(), v_raw.clone());
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (gq, gk) = match b.qk_norm {
                QkNorm::PerHead => (d, d),
                _ => (qs.len(), ks.len()),
            };
            norm(qn, &mut qs, gq)?;
            norm(kn, &mut ks, gk)?;
        }
        if let Some(c) = b.clip_qkv {
            let c = c as f32;
            for x in qs.iter_mut().chain(ks.iter_mut()).chain(vs.iter_mut()) {
                *x = x.clamp(-c, c);
            }
        }
        let (cos, sin) = &ropes[layer.rope];
        rope::apply_one(&mut qs, cos, sin);
        rope::apply_one(&mut ks, cos, sin);
        ring.write_one(
            ls,
            &Tensor::from_vec(ks, (nkv, 1, d), &model.device)?,
            &Tensor::from_vec(vs, (nkv, 1, d), &model.device)?,
            slot,
            &model.device,
        )?;
        let window = match (state.window, layer.window) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        };
        if visible_for != Some(window) {
            for (v, &kp) in visible.iter_mut().zip(&key_pos) {
                *v = super::kv::sees(kp, qp, window);
            }
            visible_for = Some(window);
        }
        let LayerState {
            k,
            v,
            linear: carry,
        } = ls;
        let attend = || attend_ring((k, v), &qs, &visible, nh, nkv, d, b.attn_scale as f32);
        let shape = model.linear_shape(layer);
        let branch = |carry: &mut linear::LinearCarry| {
            let (q, k, v) = (&q_raw, &k_raw, &v_raw);
            linear::forward(&shape, q, k, v, carry, CarryMode::Continue, model.scan)
        };
        let side_by_side =
            linear_on && crate::team::threads() > 1 && t_len * nh <= SIDE_BY_SIDE_KEYS * nkv * d;
        let (attn, y) = if side_by_side {
            // The attention and the linear branch side by side, one thread each (their own
            // parallel regions then run inline): over a short history each is mostly fixed
            // costs, which splitting either over the threads does not shorten.
            match crate::team::join(|| branch(carry), attend) {
                Some((y, attn)) => (attn?, Some(y)),
                None => return Err(Error::State("a side of the decode step did not run".into())),
            }
        } else {
            (attend()?, linear_on.then(|| branch(carry)))
        };

        let o = |x: &[f32]| linear1(&layer.o, x, &model.device);
        let mut out = match y {
            Some(y) => model.mix.row(&attn, &y, o)?,
            None => o(&attn)?,
        };
        if let Some(n) = &layer.post_attn_norm {
            norm(n, &mut out, e)?;
        }
        h.iter_mut().zip(&out).for_each(|(h, o)| *h += o);
        let x = normed(&layer.pre_ff_norm, &h)?;
        let mut y = mlp(layer, &x, b.hidden_act, model)?;
        if let Some(n) = &layer.post_ff_norm {
            norm(n, &mut y, e)?;
        }
        h.iter_mut().zip(&y).for_each(|(h, y)| *h += y);
    }
    state.key_pos = key_pos;
    state.pos += 1;

    let x = normed(&model.norm, &h)?;
    let mut logits = linear1(&model.lm_head, &x, &model.device)?;
    if let Some(c) = b.final_logit_softcap {
        let inv = (1.0 / c) as f32;
        let c = c as f32;
        logits.iter_mut().for_each(|x| *x = (*x * inv).tanh() * c);
    }
    let n = logits.len();
    Ok(Tensor::from_vec(logits, (1, n), &model.device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::LoraSide;
    use candle_core::quantized::QTensor;
    use std::sync::Arc;

    /// The slice path of [`linears`] (dense kernel, quantized call, unmerged LoRA, bias) equals
    /// `Linear::forward` of the tensor path.
    #[test]
    fn linears_match_linear_forward() {
        let dev = Device::Cpu;
        let t = |dims: (usize, usize)| Tensor::randn(0f32, 1.0, dims, &dev).expect("randn");
        let w = t((24, 16));
        let lora = LoraSide {
            a: t((4, 16)),
            b: t((24, 4)),
            scale: 0.7,
        };
        let bias = Tensor::randn(0f32, 1.0, 24, &dev).expect("bias");
        let dense = Linear {
            w: Matrix::Dense(w.clone()),
            b: Some(bias.clone()),
            lora: None,
        };
        let quant = Linear {
            w: Matrix::Quant(QMatMul::Tensor(w)),
            b: Some(bias),
            lora: Some(lora),
        };
        let x = Tensor::randn(0f32, 1.0, (1, 16), &dev).expect("x");
        let xs = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
        let got = linears(&[&dense, &quant], &xs, &dev).expect("linears");
        for (l, g) in [&dense, &quant].iter().zip(&got) {
            let want = l
                .forward(&x)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .expect("forward");
            let d = want
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "{d}");
        }
        // A Q8_0 matrix through the kernel: within the activation quantization candle's own
        // quantized matmul applies (the kernel keeps the input in f32) of its result.
        let w8 = Tensor::randn(0f32, 1.0, (40, 64), &dev).expect("w8");
        let q8 = Linear {
            w: Matrix::Quant(
                QMatMul::from_arc(Arc::new(
                    QTensor::quantize(&w8, GgmlDType::Q8_0).expect("quantize"),
                ))
                .expect("qmatmul"),
            ),
            b: None,
            lora: None,
        };
        let x8 = Tensor::randn(0f32, 1.0, (1, 64), &dev).expect("x8");
        let got8 = linears(
            &[&q8],
            &x8.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("x8"),
            &dev,
        )
        .expect("q8")[0]
            .clone();
        let want8 = q8
            .forward(&x8)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .expect("q8 forward");
        let exact = x8
            .matmul(&w8.t().expect("t"))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("exact");
        let scale = exact.iter().map(|v| v.abs()).fold(0f32, f32::max);
        for ((g, w), e) in got8.iter().zip(&want8).zip(&exact) {
            assert!((g - w).abs() < 0.02 * scale, "{g} vs candle {w}");
            assert!((g - e).abs() < 0.02 * scale, "{g} vs f32 {e}");
        }
        // A Q4_1 matrix through its kernel equals candle's Q4_1 product (same Q8_1 input).
        let q41 = Linear {
            w: Matrix::Quant(
                QMatMul::from_arc(Arc::new(
                    QTensor::quantize(&w8, GgmlDType::Q4_1).expect("quantize"),
                ))
                .expect("qmatmul"),
            ),
            b: None,
            lora: None,
        };
        let got41 = linears(
            &[&q41],
            &x8.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("x8"),
            &dev,
        )
        .expect("q4_1")[0]
            .clone();
        let want41 = q41
            .forward(&x8)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .expect("q4_1 forward");
        for (g, w) in got41.iter().zip(&want41) {
            assert!((g - w).abs() < 1e-4 * scale, "{g} vs candle {w}");
        }
        // The other types our kernels take as stored, and Q2_K (candle's call): within the
        // input's 8-bit rounding of candle's product (Q8_0 / Q8_1 per 32 values, Q8_K per 256).
        let wk = Tensor::randn(0f32, 1.0, (40, 256), &dev).expect("wk");
        let xk = Tensor::randn(0f32, 1.0, (1, 256), &dev).expect("xk");
        let xks = xk
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("xk");
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q2K,
        ] {
            let q = QTensor::quantize(&wk, dtype).expect("quantize");
            assert_eq!(
                quant_rows(dtype, &[]).is_some(),
                dtype != GgmlDType::Q2K,
                "{dtype:?}"
            );
            let lin = Linear {
                w: Matrix::Quant(QMatMul::from_arc(Arc::new(q)).expect("qmatmul")),
                b: None,
                lora: None,
            };
            let got = linears(&[&lin], &xks, &dev).expect("linears")[0].clone();
            // candle's own product (the tensor path takes the kernels too now).
            let want = match &lin.w {
                Matrix::Quant(qm) => candle_core::Module::forward(qm, &xk),
                Matrix::Dense(_) | Matrix::Packed(_) => unreachable!("a quantized matrix"),
            }
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("forward");
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 0.02 * scale, "{dtype:?}: {g} vs candle {w}");
            }
        }
        // The unmerged LoRA changes the result (so the comparison above is not vacuous).
        let d = got[0]
            .iter()
            .zip(&got[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d > 1e-2, "{d}");
    }
}
