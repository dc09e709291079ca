//! The branch's inputs made ready (SPEC §4.2–§4.5), shared by both paths: the gates' causal
//! 3-mean pooling, the activations (exact, and the libm-free forms of the fast path), the
//! L2 norm, and order 2's virtual rows (the tricks' rotations and differences).

use crate::config::{Gate, RecurrentConfig, Trick};

/// `gelu_tanh(x)`, as `F.gelu(approximate="tanh")`.
pub(super) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// Inter-chunk activation of `delta_rule_gelu` on a `D×D` state, per row `d`:
/// `h = (h/2)·gelu_tanh(2h/(‖h[d,:]‖ + 1e-6))`.
pub(crate) fn gelu_rows(h0: &mut [f32], d: usize) {
    for row in h0.chunks_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt() + 1e-6;
        for x in row.iter_mut() {
            *x = (*x / 2.0) * gelu_tanh(2.0 * *x / norm);
        }
    }
}

pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `x·sigmoid(x)` with [`crate::cpu::math::exp`].
#[inline(always)]
pub(super) fn silu_fast(x: f32) -> f32 {
    x / (1.0 + crate::cpu::math::exp(-x))
}

/// `sigmoid(x)` with [`crate::cpu::math::exp`].
#[inline(always)]
pub(super) fn sigmoid_fast(x: f32) -> f32 {
    1.0 / (1.0 + crate::cpu::math::exp(-x))
}

/// `F.normalize(x, p=2, eps=1e-6)` in place.
pub(super) fn l2norm(x: &mut [f32]) {
    let n = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
    x.iter_mut().for_each(|v| *v /= n);
}

/// Row `t` (`f` wide) of the gate pooling's input: `x`'s row for `t ≥ 0`, else the history (up
/// to two earlier rows, oldest first), else replicate padding (SPEC §4.2).
pub(super) fn pool_row<'x>(x: &'x [f32], f: usize, history: &'x [Vec<f32>], t: isize) -> &'x [f32] {
    if t >= 0 {
        &x[t as usize * f..(t as usize + 1) * f]
    } else {
        let h = history.len() as isize + t; // t = -1 → last history row
        if h >= 0 {
            &history[h as usize]
        } else if let Some(first) = history.first() {
            first // fewer than two history rows: replicate the oldest
        } else {
            &x[..f] // replicate padding: X[-1] = X[-2] = X[0]
        }
    }
}

/// The causal 3-mean of the gate pooling over rows `[S, F]` (SPEC §4.2), with `history` (up to two
/// earlier rows, oldest first) before the call, or replicate padding when there is none.
pub(super) fn pool3(x: &[f32], f: usize, history: &[Vec<f32>]) -> Vec<f32> {
    let s = x.len() / f;
    let third = 1.0f32 / 3.0;
    let mut out = vec![0f32; s * f];
    for t in 0..s as isize {
        let (a, b, c) = (
            pool_row(x, f, history, t - 2),
            pool_row(x, f, history, t - 1),
            pool_row(x, f, history, t),
        );
        let o = &mut out[t as usize * f..(t as usize + 1) * f];
        for i in 0..f {
            o[i] = a[i] * third + b[i] * third + c[i] * third;
        }
    }
    out
}

/// §4.2: the value of gate `which` for one channel, from its `k` and `v` gates (`fg`, `wg`);
/// the constant gate is 1 for α and 0.5 for β.
#[inline(always)]
pub(super) fn gate_value(which: Gate, is_beta: bool, fg: f32, wg: f32) -> f32 {
    match which {
        Gate::K => fg,
        Gate::V => wg,
        Gate::Kv => fg * wg,
        Gate::C => {
            if is_beta {
                0.5
            } else {
                1.0
            }
        }
    }
}

/// §4.5: the virtual-token trick of a gate's rows (a constant gate's are constant: `Cte`).
pub(super) fn trick_for(rc: &RecurrentConfig, gate: Gate) -> Trick {
    if gate == Gate::C {
        Trick::Cte
    } else {
        rc.trick
    }
}

/// §4.9: one token's merged heads (`H·D` values) RMS-normalised in place (no weight).
pub(super) fn rms_normalise(row: &mut [f32]) {
    let ms = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    let inv = 1.0 / (ms + 1e-6).sqrt();
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Per-token processed values `[H, S, D]` for one of q/k/v/α/β.
pub(super) struct Processed {
    pub(super) q: Vec<f32>,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) alpha: Vec<f32>,
    pub(super) beta: Vec<f32>,
}

/// `(cos θ_1, sin θ_1)` of the order-2 rotation, `θ_1 = 1·(2π/2)` in float32: `(-1, -8.742278e-08)`.
pub(super) fn rot1() -> (f32, f32) {
    let angle = std::f32::consts::PI;
    (angle.cos(), angle.sin())
}

/// `dst = rot(src)`: adjacent pairs rotated by `θ_1`, an odd last element kept.
pub(super) fn rotate(src: &[f32], dst: &mut [f32]) {
    let (cos1, sin1) = rot1();
    let d = src.len();
    for p in 0..d / 2 {
        let (x0, x1) = (src[2 * p], src[2 * p + 1]);
        dst[2 * p] = x0 * cos1 - x1 * sin1;
        dst[2 * p + 1] = x0 * sin1 + x1 * cos1;
    }
    if d % 2 == 1 {
        dst[d - 1] = src[d - 1];
    }
}

/// The second virtual row of a token (SPEC §4.5) from its row `cur` and the one `before` it.
pub(super) fn virtual_second(trick: Trick, cur: &[f32], before: &[f32], v1: &mut [f32]) {
    match trick {
        Trick::Dt => {
            for (o, &b) in v1.iter_mut().zip(before) {
                *o = b * 0.5;
            }
        }
        Trick::Rot => rotate(cur, v1),
        Trick::Rdt => {
            rotate(cur, v1);
            for (o, &b) in v1.iter_mut().zip(before) {
                *o = 0.5 * (b * 0.5 + *o);
            }
        }
        Trick::Cte => v1.copy_from_slice(cur),
    }
}

/// Both virtual rows of a token (order 2, SPEC §4.5).
pub(super) fn virtual_pair(
    trick: Trick,
    cur: &[f32],
    before: &[f32],
    v0: &mut [f32],
    v1: &mut [f32],
) {
    match trick {
        Trick::Dt => {
            for (o, &c) in v0.iter_mut().zip(cur) {
                *o = c * -0.5;
            }
        }
        // θ_0 = 0: cos 1, sin 0 → the identity (x·1 − y·0).
        Trick::Rot | Trick::Cte => v0.copy_from_slice(cur),
        Trick::Rdt => {
            for (o, &c) in v0.iter_mut().zip(cur) {
                *o = 0.5 * (c * -0.5 + c);
            }
        }
    }
    virtual_second(trick, cur, before, v1);
}

/// Expand `[H, S, D]` into `[H, S·n, D]` virtual rows with a trick (SPEC §4.5). `prev` is the
/// row before the first token per head (`[H·D]`), zeros when there is none.
pub(super) fn expand(
    x: &[f32],
    prev: Option<&[f32]>,
    heads: usize,
    s: usize,
    d: usize,
    n: usize,
    trick: Trick,
) -> Vec<f32> {
    if n == 1 {
        return x.to_vec();
    }
    debug_assert_eq!(n, 2);
    let mut out = vec![0f32; heads * s * n * d];
    let zeros = vec![0f32; d];
    for h in 0..heads {
        for t in 0..s {
            let cur = &x[(h * s + t) * d..(h * s + t + 1) * d];
            let before: &[f32] = if t > 0 {
                &x[(h * s + t - 1) * d..(h * s + t) * d]
            } else {
                prev.map(|p| &p[h * d..(h + 1) * d]).unwrap_or(&zeros)
            };
            let o = (h * s + t) * n * d;
            let (v0, v1) = out[o..o + 2 * d].split_at_mut(d);
            virtual_pair(trick, cur, before, v0, v1);
        }
    }
    out
}
