//! The LiZA linear branch (SPEC §4) as candle tensor operations, so that candle's autograd can
//! differentiate through it: the training path of [`super`]. Inference keeps
//! [`crate::linear::forward`] (slices, fast scan); the test below holds this function to the
//! naive reference of that module on every operator mode and odd shapes.
//!
//! [`forward`] reads a whole training sequence from a fresh carry (state `1e-6`, replicate
//! padding for the gate pooling, zeros before the first token for the order-2 virtual rows), as
//! the reference's `use_cache=False` forward does. [`forward_carried`] continues a sequence
//! read before (truncated back-propagation through time): it starts from a given state, and the
//! raw rows of up to [`HISTORY`] tokens before the segment stand in for the padding, so the gates
//! and virtual rows of the segment's first tokens are those of one uninterrupted read. Per chunk
//! of `C` tokens (`N = C·n` virtual rows):
//!
//! * `kβ = k⊙β`, `vβ = v⊙β`, `A = −tril(kβ·kᵀ, −1)`, `T = (I − A)⁻¹`, `W = T·kβ`, `U = T·vβ` —
//!   for all chunks at once. `A` is strictly lower triangular, so `(I − A)⁻¹ = Σ_{j<N} Aʲ`
//!   `= Π_i (I + A^(2^i))`: ⌈log₂ N⌉ batched products instead of a row-by-row substitution;
//! * then, chunk after chunk, the reference's per-token walk from the chunk's state `h0` in
//!   closed form. Order 1: `u' = u − w·h0`, `o = q·h0 + q⊙u'`, next state `h0⊙α + wᵀu'` of the
//!   chunk's last token. Order 2 (rows `a`, `b` of a token):
//!   `u'ₐ = uₐ − wₐ·h0`, `S₁ = h0⊙αₐ + wₐᵀu'ₐ`, `u'_b = u_b − w_b·S₁`,
//!   `o = q_b·S₁ + q_b⊙u'_b` with `w_b·S₁ = (w_b·h0)⊙αₐ + (w_b·wₐ)·u'ₐ` (and likewise for
//!   `q_b`), so no per-token `D×D` state is ever built.
//!
//! The key side runs once per kv head (the query heads of a group share it, as in the fast path).

use candle_core::{DType, Device, Tensor, D};

use crate::config::{Gate, Trick};
use crate::error::{Error, Result};
use crate::linear::{chunk_size, LinearShape, STATE_INIT};

/// The causal 3-mean over rows of `x: [S, F]` with replicate padding (SPEC §4.2).
fn pool3(x: &Tensor) -> Result<Tensor> {
    let s = x.dim(0)?;
    let first = x.narrow(0, 0, 1)?;
    let padded = Tensor::cat(&[&first, &first, x], 0)?; // [S+2, F]
    let third = 1.0 / 3.0;
    Ok(((padded.narrow(0, 0, s)? * third)?
        + (padded.narrow(0, 1, s)? * third)?
        + (padded.narrow(0, 2, s)? * third)?)?)
}

/// `F.normalize(x, p=2, eps=1e-6)` over the last dim.
fn l2norm(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-6)?;
    Ok(x.broadcast_div(&n)?)
}

/// `[S, Hx·D]` → `[Hx, S, D]`.
fn heads(x: &Tensor, h: usize, d: usize) -> Result<Tensor> {
    let s = x.dim(0)?;
    Ok(x.reshape((s, h, d))?.transpose(0, 1)?.contiguous()?)
}

/// Adjacent pairs rotated by `θ₁ = π` (in float32, as the reference), an odd last element kept.
fn rotate(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = dims[dims.len() - 1];
    let angle = std::f32::consts::PI;
    let (c, s) = (angle.cos() as f64, angle.sin() as f64);
    let pairs = x.narrow(D::Minus1, 0, d / 2 * 2)?;
    let mut shape = dims.clone();
    let last = shape.len() - 1;
    shape[last] = d / 2;
    shape.push(2);
    let p = pairs.reshape(shape)?;
    let x0 = p.narrow(D::Minus1, 0, 1)?;
    let x1 = p.narrow(D::Minus1, 1, 1)?;
    let r0 = ((&x0 * c)? - (&x1 * s)?)?;
    let r1 = ((&x0 * s)? + (&x1 * c)?)?;
    let mut dims_pairs = dims.clone();
    dims_pairs[last] = d / 2 * 2;
    let rot = Tensor::cat(&[&r0, &r1], D::Minus1)?.reshape(dims_pairs)?;
    if d % 2 == 1 {
        Ok(Tensor::cat(
            &[&rot, &x.narrow(D::Minus1, d - 1, 1)?],
            D::Minus1,
        )?)
    } else {
        Ok(rot)
    }
}

/// Order-2 virtual rows of `x: [Hx, S, D]` (SPEC §4.5): `[Hx, S·2, D]`, token-major.
fn expand2(x: &Tensor, trick: Trick) -> Result<Tensor> {
    let (h, s, d) = x.dims3()?;
    let zeros = Tensor::zeros((h, 1, d), x.dtype(), x.device())?;
    let before = Tensor::cat(&[&zeros, &x.narrow(1, 0, s - 1)?], 1)?;
    let (v0, v1) = match trick {
        Trick::Dt => ((x * -0.5)?, (before * 0.5)?),
        Trick::Rot => (x.clone(), rotate(x)?),
        Trick::Rdt => (
            (((x * -0.5)? + x)? * 0.5)?,
            (((before * 0.5)? + rotate(x)?)? * 0.5)?,
        ),
        Trick::Cte => (x.clone(), x.clone()),
    };
    Ok(Tensor::stack(&[&v0, &v1], 2)?.reshape((h, s * 2, d))?)
}

/// `(h/2)·gelu_tanh(2h/(‖h[d,:]‖ + 1e-6))` on states `[Hx, D, D]` (rows: key dim).
fn gelu_rows(h: &Tensor) -> Result<Tensor> {
    let norm = (h.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-6)?;
    let arg = (h * 2.0)?.broadcast_div(&norm)?;
    Ok(((h * 0.5)? * arg.gelu()?)?)
}

/// `(I − A)⁻¹` for strictly lower triangular `A: [.., N, N]`, as `Π (I + A^(2^i))`.
fn unit_lower_inverse(a: &Tensor, n: usize, device: &Device) -> Result<Tensor> {
    let eye = Tensor::eye(n, DType::F32, device)?;
    let mut t = a.broadcast_add(&eye)?; // I + A
    let mut p = a.clone(); // A^(2^i)
    let mut covered = 2; // terms I..A^(covered−1) in t
    while covered < n {
        p = p.matmul(&p)?;
        t = t.matmul(&p.broadcast_add(&eye)?)?;
        covered *= 2;
    }
    Ok(t)
}

/// Row-wise dot product of `[.., R, D]` tensors: `[.., R, 1]`.
fn rowdot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.broadcast_mul(b)?.sum_keepdim(D::Minus1)?)
}

/// Tokens before a segment whose raw rows [`forward_carried`] needs to continue exactly: two
/// for the causal 3-mean of the gates, one more for the order-2 row of the token before.
pub const HISTORY: usize = 3;

/// The branch on the raw projections of a whole sequence: `q_raw: [S, H·D]`,
/// `k_raw, v_raw: [S, Hkv·D]` → `[S, H·D]`, RMS-normalised per token (ready for `o_proj`).
/// Differentiable in all three inputs.
pub fn forward(
    shape: &LinearShape,
    q_raw: &Tensor,
    k_raw: &Tensor,
    v_raw: &Tensor,
) -> Result<Tensor> {
    Ok(forward_carried(shape, q_raw, k_raw, v_raw, 0, None)?.0)
}

/// [`forward`] continuing a read: the first `history` rows of the inputs (at most
/// [`HISTORY`]; fewer only at the start of a text) are the tokens just before the segment,
/// read already — they feed the gate pooling and the order-2 rows of the segment's first
/// tokens but produce no output — and `h0: [Hkv, D, D]` is the state after them (`None`: the
/// fresh `1e-6` state). Returns the segment's output `[S − history, H·D]` and the state after
/// its last token, which the next segment starts from. Differentiable in the inputs and `h0`.
pub fn forward_carried(
    shape: &LinearShape,
    q_raw: &Tensor,
    k_raw: &Tensor,
    v_raw: &Tensor,
    history: usize,
    h0: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (h_n, hkv, d, rc) = (shape.heads, shape.kv_heads, shape.dim, shape.rc);
    let g = h_n / hkv;
    let rows = q_raw.dim(0)?;
    if history > HISTORY || history >= rows {
        return Err(Error::Input(format!(
            "{rows} rows with {history} of history: the linear branch needs at most {HISTORY} rows of history and at least one new token"
        )));
    }
    let s = rows - history;
    let device = q_raw.device().clone();
    // §4.2 gates per kv channel, §4.3 per head.
    let f_gate = candle_nn::ops::sigmoid(&pool3(k_raw)?)?;
    let w_gate = candle_nn::ops::sigmoid(&pool3(v_raw)?)?;
    let q = l2norm(&heads(&q_raw.silu()?, h_n, d)?)?; // [H, S, D]
    let k = l2norm(&heads(&k_raw.silu()?, hkv, d)?)?; // [Hkv, S, D]
    let v = (heads(v_raw, hkv, d)? * (d as f64).powf(-0.5))?;
    let (fg, wg) = (heads(&f_gate, hkv, d)?, heads(&w_gate, hkv, d)?);
    let gate = |which: Gate, beta: bool| -> Result<Tensor> {
        Ok(match which {
            Gate::K => fg.clone(),
            Gate::V => wg.clone(),
            Gate::Kv => (&fg * &wg)?,
            Gate::C => Tensor::full(if beta { 0.5f32 } else { 1.0 }, (hkv, rows, d), &device)?,
        })
    };
    let (alpha, beta) = (gate(rc.alpha_gate, false)?, gate(rc.beta_gate, true)?);
    // §4.4/4.5 virtual rows.
    let n = rc.order;
    let trick_for = |gt: Gate| if gt == Gate::C { Trick::Cte } else { rc.trick };
    let (q, k, v, alpha, beta) = if n == 2 {
        (
            expand2(&q, rc.trick)?,
            expand2(&k, rc.trick)?,
            expand2(&v, rc.trick)?,
            expand2(&alpha, trick_for(rc.alpha_gate))?,
            expand2(&beta, trick_for(rc.beta_gate))?,
        )
    } else if n == 1 {
        (q, k, v, alpha, beta)
    } else {
        return Err(Error::config(format!("recurrent order {n} is not 1 or 2")));
    };
    // The history's rows have done their part (pooling, the order-2 row before the segment).
    let (q, k, v, alpha, beta) = if history > 0 {
        let seg = |x: &Tensor| x.narrow(1, history * n, s * n);
        (seg(&q)?, seg(&k)?, seg(&v)?, seg(&alpha)?, seg(&beta)?)
    } else {
        (q, k, v, alpha, beta)
    };
    // §4.6–4.8 chunks: [Hx, M, N, D].
    let c = chunk_size(s, shape.max_chunk);
    let (m, big_n) = (s / c, c * n);
    let by_chunk = |x: &Tensor, hx: usize| x.reshape((hx, m, big_n, d));
    let (q, k, v) = (by_chunk(&q, h_n)?, by_chunk(&k, hkv)?, by_chunk(&v, hkv)?);
    let (alpha, beta) = (by_chunk(&alpha, hkv)?, by_chunk(&beta, hkv)?);
    let kb = (&k * &beta)?;
    let vb = (&v * &beta)?;
    let strict = Tensor::tril2(big_n, DType::F32, &device)?.sub(&Tensor::eye(
        big_n,
        DType::F32,
        &device,
    )?)?; // 1 below the diagonal
    let a = kb
        .matmul(&k.transpose(2, 3)?.contiguous()?)?
        .broadcast_mul(&strict)?
        .neg()?;
    let t = unit_lower_inverse(&a, big_n, &device)?;
    let w = t.matmul(&kb)?; // [Hkv, M, N, D]
    let u = t.matmul(&vb)?;
    // Queries grouped by kv head: [Hkv, G, M, N, D] (head h = kvh·G + g).
    let qg = q.reshape((hkv, g, m, big_n, d))?;
    let mut h0 = match h0 {
        Some(h) if h.dims() == [hkv, d, d] => h.clone(),
        Some(h) => {
            return Err(Error::Input(format!(
                "a carried state of shape {:?}, expected {:?}",
                h.dims(),
                [hkv, d, d]
            )))
        }
        None => Tensor::full(STATE_INIT, (hkv, d, d), &device)?,
    };
    let mut outs = Vec::with_capacity(m);
    for chunk in 0..m {
        let at = |x: &Tensor| x.narrow(1, chunk, 1)?.squeeze(1); // [Hkv, N, D]
        let (wc, uc, ac) = (at(&w)?, at(&u)?, at(&alpha)?);
        let qc = qg.narrow(2, chunk, 1)?.squeeze(2)?; // [Hkv, G, N, D]
        let (out, next) = if n == 1 {
            let up = (&uc - wc.matmul(&h0)?)?; // u' [Hkv, C, D]
            let qh = qc
                .reshape((hkv, g * c, d))?
                .matmul(&h0)?
                .reshape((hkv, g, c, d))?;
            let out = (qh + qc.broadcast_mul(&up.unsqueeze(1)?)?)?;
            let last = |x: &Tensor| x.narrow(1, c - 1, 1); // [Hkv, 1, D]
            let next = (h0.broadcast_mul(&last(&ac)?)?
                + last(&wc)?.transpose(1, 2)?.matmul(&last(&up)?)?)?;
            (out, next)
        } else {
            // Rows a (even) and b (odd) of each token: [Hkv, C, 2, D].
            let pair = |x: &Tensor| -> Result<(Tensor, Tensor)> {
                let p = x.reshape((hkv, c, 2, d))?;
                Ok((
                    p.narrow(2, 0, 1)?.squeeze(2)?,
                    p.narrow(2, 1, 1)?.squeeze(2)?,
                ))
            };
            let (wa, wb) = pair(&wc)?;
            let (ua, ub) = pair(&uc)?;
            let (aa, ab) = pair(&ac)?;
            let qb = qc
                .reshape((hkv, g, c, 2, d))?
                .narrow(3, 1, 1)?
                .squeeze(3)?
                .contiguous()?; // [Hkv, G, C, D]
            let upa = (&ua - wa.matmul(&h0)?)?;
            // w_b·S₁ = (w_b·h0)⊙αₐ + (w_b·wₐ)·u'ₐ
            let wb_s1 = ((wb.matmul(&h0)? * &aa)? + rowdot(&wb, &wa)?.broadcast_mul(&upa)?)?;
            let upb = (&ub - wb_s1)?;
            let qh = qb
                .reshape((hkv, g * c, d))?
                .matmul(&h0)?
                .reshape((hkv, g, c, d))?;
            let q_s1 = (qh.broadcast_mul(&aa.unsqueeze(1)?)?
                + rowdot(&qb, &wa.unsqueeze(1)?)?.broadcast_mul(&upa.unsqueeze(1)?)?)?;
            let out = (q_s1 + qb.broadcast_mul(&upb.unsqueeze(1)?)?)?;
            let last = |x: &Tensor| x.narrow(1, c - 1, 1); // [Hkv, 1, D]
            let s1 = (h0.broadcast_mul(&last(&aa)?)?
                + last(&wa)?.transpose(1, 2)?.matmul(&last(&upa)?)?)?;
            let next = (s1.broadcast_mul(&last(&ab)?)?
                + last(&wb)?.transpose(1, 2)?.matmul(&last(&upb)?)?)?;
            (out, next)
        };
        outs.push(out); // [Hkv, G, C, D]
        h0 = if rc.linear { next } else { gelu_rows(&next)? };
    }
    // §4.9 [Hkv, G, S, D] → [S, H·D], RMS over H·D per token (eps 1e-6, no weight).
    let y = Tensor::cat(&outs, 2)?
        .reshape((h_n, s, d))?
        .transpose(0, 1)?
        .reshape((s, h_n * d))?;
    let ms = y.sqr()?.mean_keepdim(D::Minus1)?;
    Ok((y.broadcast_div(&(ms + 1e-6)?.sqrt()?)?, h0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RecurrentConfig, OPERATOR_MODES};
    use crate::linear::{self, CarryMode, LinearCarry, ScanImpl};
    use crate::testutil::rand_vec;

    /// f32 reassociation (the inverse by products, closed-form walks) on unit-scale inputs.
    const TOL: f32 = 2e-4;

    fn check(mode: &str, s: usize, max_chunk: usize, heads: (usize, usize), d: usize, seed: u64) {
        let shape = LinearShape {
            heads: heads.0,
            kv_heads: heads.1,
            dim: d,
            rc: RecurrentConfig::from_operator_mode(mode).expect("mode"),
            max_chunk,
        };
        let q = rand_vec(s * heads.0 * d, seed);
        let k = rand_vec(s * heads.1 * d, seed + 1);
        let v = rand_vec(s * heads.1 * d, seed + 2);
        let mut carry = LinearCarry::new(heads.0, d);
        let want = linear::forward(
            &shape,
            &q,
            &k,
            &v,
            &mut carry,
            CarryMode::Continue,
            ScanImpl::Naive,
        );
        let dev = Device::Cpu;
        let t = |x: Vec<f32>, w: usize| Tensor::from_vec(x, (s, w), &dev).expect("tensor");
        let got = forward(
            &shape,
            &t(q, heads.0 * d),
            &t(k, heads.1 * d),
            &t(v, heads.1 * d),
        )
        .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward");
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < TOL,
            "{mode} S={s} chunk≤{max_chunk} heads={heads:?} D={d}: max |Δ| {diff}"
        );
    }

    #[test]
    fn equals_the_naive_scan_on_every_mode_and_odd_shapes() {
        for (i, mode) in OPERATOR_MODES.iter().enumerate() {
            let seed = 100 + i as u64 * 7;
            check(mode, 63, 64, (6, 2), 8, seed);
            check(mode, 67, 16, (4, 4), 7, seed + 3); // prime length: chunk 1
            check(mode, 100, 16, (3, 1), 10, seed + 5); // chunk 10
            check(mode, 40, 64, (2, 1), 16, seed + 9); // one chunk of 40
        }
    }

    /// A read in two calls of the naive scan (what inference does) against [`forward`] on the
    /// first part and [`forward_carried`] on the second, from the first's state with up to
    /// [`HISTORY`] rows before it.
    fn check_carried(mode: &str, s1: usize, s2: usize, max_chunk: usize, seed: u64) {
        let (h, hkv, d) = (4, 2, 6);
        let shape = LinearShape {
            heads: h,
            kv_heads: hkv,
            dim: d,
            rc: RecurrentConfig::from_operator_mode(mode).expect("mode"),
            max_chunk,
        };
        let s = s1 + s2;
        let q = rand_vec(s * h * d, seed);
        let k = rand_vec(s * hkv * d, seed + 1);
        let v = rand_vec(s * hkv * d, seed + 2);
        let rows = |x: &[f32], w: usize, a: usize, b: usize| x[a * w..b * w].to_vec();
        let mut carry = LinearCarry::grouped(hkv, d);
        let mut naive = |a: usize, b: usize| {
            linear::forward(
                &shape,
                &rows(&q, h * d, a, b),
                &rows(&k, hkv * d, a, b),
                &rows(&v, hkv * d, a, b),
                &mut carry,
                CarryMode::Continue,
                ScanImpl::Naive,
            )
        };
        let _ = naive(0, s1);
        let want = naive(s1, s);
        let dev = Device::Cpu;
        let t = |x: &[f32], w: usize, a: usize, b: usize| {
            Tensor::from_vec(rows(x, w, a, b), (b - a, w), &dev).expect("tensor")
        };
        let (_, state) = forward_carried(
            &shape,
            &t(&q, h * d, 0, s1),
            &t(&k, hkv * d, 0, s1),
            &t(&v, hkv * d, 0, s1),
            0,
            None,
        )
        .expect("first part");
        let hist = HISTORY.min(s1);
        let a = s1 - hist;
        let (y, _) = forward_carried(
            &shape,
            &t(&q, h * d, a, s),
            &t(&k, hkv * d, a, s),
            &t(&v, hkv * d, a, s),
            hist,
            Some(&state),
        )
        .expect("second part");
        let got = y
            .flatten_all()
            .and_then(|y| y.to_vec1::<f32>())
            .expect("vec");
        assert_eq!(got.len(), want.len());
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < TOL,
            "{mode} {s1}+{s2} chunk≤{max_chunk}: max |Δ| {diff}"
        );
    }

    #[test]
    fn a_carried_read_continues_like_the_naive_scan() {
        for (i, mode) in OPERATOR_MODES.iter().enumerate() {
            let seed = 300 + i as u64 * 11;
            check_carried(mode, 32, 48, 16, seed);
            check_carried(mode, 40, 27, 16, seed + 1); // second part: prime, chunk 1
            check_carried(mode, 2, 20, 8, seed + 2); // fewer rows before than HISTORY
        }
        let shape = LinearShape {
            heads: 2,
            kv_heads: 1,
            dim: 4,
            rc: RecurrentConfig::from_operator_mode("delta_rule").expect("mode"),
            max_chunk: 8,
        };
        let x = Tensor::zeros((5, 8), DType::F32, &Device::Cpu).expect("zeros");
        let kv = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).expect("zeros");
        let bad_state = Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu).expect("zeros");
        assert!(
            forward_carried(&shape, &x, &kv, &kv, 4, None).is_err(),
            "too much history"
        );
        assert!(forward_carried(&shape, &x, &kv, &kv, 3, Some(&bad_state)).is_err());
    }

    #[test]
    fn gradients_flow_to_every_input() {
        let shape = LinearShape {
            heads: 4,
            kv_heads: 2,
            dim: 6,
            rc: RecurrentConfig::from_operator_mode("gated_delta_product").expect("mode"),
            max_chunk: 8,
        };
        let s = 24;
        let dev = Device::Cpu;
        let var = |n: usize, seed: u64| {
            candle_core::Var::from_vec(rand_vec(s * n, seed), (s, n), &dev).expect("var")
        };
        let (q, k, v) = (var(24, 1), var(12, 2), var(12, 3));
        let y = forward(&shape, q.as_tensor(), k.as_tensor(), v.as_tensor()).expect("forward");
        let target = Tensor::from_vec(rand_vec(s * 24, 9), (s, 24), &dev).expect("target");
        let loss = (y * &target).expect("mul").sum_all().expect("sum");
        let grads = loss.backward().expect("backward");
        // Check one coordinate of each input against a central difference.
        for (x, idx) in [(&q, 5usize), (&k, 17), (&v, 30)] {
            let g = grads
                .get(x.as_tensor())
                .expect("gradient")
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("vec")[idx];
            let eps = 1e-2f32;
            let at = |delta: f32| -> f32 {
                let mut vals = x
                    .as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("vec");
                vals[idx] += delta;
                let moved = Tensor::from_vec(vals, x.as_tensor().dims(), &dev).expect("moved");
                let (qq, kk, vv) = match idx {
                    5 => (moved, k.as_tensor().clone(), v.as_tensor().clone()),
                    17 => (q.as_tensor().clone(), moved, v.as_tensor().clone()),
                    _ => (q.as_tensor().clone(), k.as_tensor().clone(), moved),
                };
                forward(&shape, &qq, &kk, &vv)
                    .and_then(|y| Ok((y * &target)?.sum_all()?.to_scalar::<f32>()?))
                    .expect("loss")
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (numeric - g).abs() < 2e-2 * (1.0 + g.abs()),
                "index {idx}: autograd {g}, finite difference {numeric}"
            );
        }
    }
}
