//! The LiZA linear branch (SPEC §4): gates, q/k/v preparation, order-2 virtual tokens, chunked
//! delta-product scan, head merge and the parameter-free RMS norm. Everything here is f32 on
//! the CPU, on plain row-major slices; the caller applies `o_proj`.
//!
//! One call processes the `S` tokens of a forward call for one layer. What crosses calls lives in
//! a [`LinearCarry`]: the recurrent state (`[H, D, D]`), the last two raw k/v rows (so the causal
//! 3-mean pooling of the gates sees them) and, for order 2, the previous token's processed
//! `q, k, v, α, β` (the reference's one-token buffer). [`CarryMode`] says how much of it is used:
//! * [`CarryMode::Continue`] (ours): everything carries over, so splitting a sequence into calls
//!   equals one call under the same chunking (see the `engine` crate for the semantics).
//! * [`CarryMode::Reference`]: tptt 0.12.1's cached generation, which restarts the state at
//!   `1e-6` and the pooling at every call and only keeps the order-2 buffer (SPEC §7).
//!
//! [`scan`] dispatches to the fast path ([`fast`]); [`naive`] is the literal specification.
//! [`forward`] with [`ScanImpl::Naive`] follows SPEC §4 literally (every processed and virtual
//! row of the call materialised, then the naive scan); with [`ScanImpl::Fast`] the rows are made
//! per chunk inside the fast scan and the heads sharing a kv head share the key-side work.

pub mod fast;
pub mod naive;

use crate::config::{Gate, RecurrentConfig, Trick};

/// The initial value of every entry of a fresh recurrent state (SPEC §4.8).
pub const STATE_INIT: f32 = 1e-6;

/// Inputs of one scan, all `[H, S·n, D]` (token-major virtual rows), f32.
pub struct ScanInput<'a> {
    /// Query heads H.
    pub heads: usize,
    /// Head dim D.
    pub dim: usize,
    /// Tokens S of this call.
    pub tokens: usize,
    /// Recurrent order n (1 or 2).
    pub order: usize,
    /// Chunk size C (divides S).
    pub chunk: usize,
    /// `false`: inter-chunk GELU activation.
    pub linear: bool,
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Decays.
    pub alpha: &'a [f32],
    /// Write strengths.
    pub beta: &'a [f32],
}

/// Which scan implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScanImpl {
    /// [`fast::scan`].
    #[default]
    Fast,
    /// [`naive::scan`].
    Naive,
}

/// Run the scan. `state`: `[H, D, D]` in, final state out. Returns `[H, S, D]`.
pub fn scan(inp: &ScanInput<'_>, state: &mut [f32], which: ScanImpl) -> Vec<f32> {
    debug_assert!(inp.chunk >= 1 && inp.tokens.is_multiple_of(inp.chunk));
    match which {
        ScanImpl::Fast => fast::scan(inp, state),
        ScanImpl::Naive => naive::scan(inp, state),
    }
}

/// The reference's chunk-size rule (SPEC §4.6): the largest `c ≤ min(max, S)` dividing `S`.
pub fn chunk_size(tokens: usize, max_chunk: usize) -> usize {
    (1..=max_chunk.min(tokens).max(1))
        .rev()
        .find(|c| tokens.is_multiple_of(*c))
        .unwrap_or(1)
}

/// `gelu_tanh(x)`, as `F.gelu(approximate="tanh")`.
fn gelu_tanh(x: f32) -> f32 {
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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `eˣ` without a library call, so that loops over rows vectorise (the fast path's SiLU and
/// gates): `x = n·ln2 + r` with `n = round(x·log₂e)`, `|r| ≤ ln2/2`, `eʳ` by Cephes' degree-6
/// `expf` polynomial (about 1 ulp), times `2ⁿ` built in the exponent bits. `x` is clamped to
/// `[-87.3, 88.3]` (so `2ⁿ` stays a normal float); outside it `eˣ` only feeds `1/(1 + eˣ)`-type
/// expressions that are then 0 or 1 to well within float tolerance.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split in two: n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    // `t`'s low mantissa bits hold the integer `n` (|n| < 2²²), so `2ⁿ`'s exponent comes from
    // its bits: no float-to-int conversion (a saturating cast does not vectorise).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// `x·sigmoid(x)` with [`exp_fast`].
#[inline(always)]
fn silu_fast(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `sigmoid(x)` with [`exp_fast`].
#[inline(always)]
fn sigmoid_fast(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `F.normalize(x, p=2, eps=1e-6)` in place.
fn l2norm(x: &mut [f32]) {
    let n = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
    x.iter_mut().for_each(|v| *v /= n);
}

/// The previous token's processed values, per query head (`[H·D]` each): the order-2 buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct PrevToken {
    /// Normalised query.
    pub q: Vec<f32>,
    /// Normalised key.
    pub k: Vec<f32>,
    /// Scaled value.
    pub v: Vec<f32>,
    /// Decay gate.
    pub alpha: Vec<f32>,
    /// Write gate.
    pub beta: Vec<f32>,
}

/// What the linear branch of one layer carries from call to call.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearCarry {
    /// The recurrent states, `[Hs, D, D]` (rows: key dim, columns: value dim), where `Hs` divides
    /// the query heads `H`: query head `h` reads state `h / (H / Hs)`. `Hs = H` is one state per
    /// query head; `Hs = Hkv` (what [`LinearCarry::grouped`] makes and the fast path keeps) is one
    /// per kv head, shared by the query heads of its group, whose states are equal: they see the
    /// same keys, values and gates, and the recursion never reads the query. [`forward`] accepts
    /// both; [`LinearCarry::head_states`] gives the per-head view.
    pub state: Vec<f32>,
    /// Up to two previous raw key rows `[Hkv·D]` (oldest first), for the gate pooling.
    pub pool_k: Vec<Vec<f32>>,
    /// Up to two previous raw value rows, likewise.
    pub pool_v: Vec<Vec<f32>>,
    /// Order 2: the previous token, processed.
    pub prev: Option<PrevToken>,
}

impl LinearCarry {
    /// A fresh carry with one state per query head: state `1e-6`, no history.
    pub fn new(heads: usize, dim: usize) -> Self {
        Self {
            state: vec![STATE_INIT; heads * dim * dim],
            pool_k: Vec::new(),
            pool_v: Vec::new(),
            prev: None,
        }
    }

    /// A fresh carry with one state per kv head (see [`LinearCarry::state`]).
    pub fn grouped(kv_heads: usize, dim: usize) -> Self {
        Self::new(kv_heads, dim)
    }

    /// How many states the carry stores (`Hs`).
    pub fn stored_states(&self, dim: usize) -> usize {
        self.state.len() / (dim * dim).max(1)
    }

    /// The state of every one of `heads` query heads, `[H, D, D]`.
    pub fn head_states(&self, heads: usize, dim: usize) -> Vec<f32> {
        let (hs, dd) = (self.stored_states(dim), dim * dim);
        if hs == heads || hs == 0 {
            return self.state.clone();
        }
        let g = heads / hs;
        (0..heads)
            .flat_map(|h| self.state[h / g * dd..(h / g + 1) * dd].iter().copied())
            .collect()
    }

    /// Store one state per query head (a no-op when it already does).
    fn expand_states(&mut self, heads: usize, dim: usize) {
        if self.stored_states(dim) != heads {
            self.state = self.head_states(heads, dim);
        }
    }
}

/// How much of the carry a call uses (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CarryMode {
    /// Carry state, pooling history and order-2 buffer.
    #[default]
    Continue,
    /// tptt 0.12.1's cached generation: restart state and pooling, keep the order-2 buffer.
    Reference,
}

/// Shapes and the recurrence for [`forward`].
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads Hkv.
    pub kv_heads: usize,
    /// Head dim D.
    pub dim: usize,
    /// The recurrence.
    pub rc: RecurrentConfig,
    /// `max_chunk_size` (the chunk is derived from it and S).
    pub max_chunk: usize,
}

/// Row `t` (`f` wide) of the gate pooling's input: `x`'s row for `t ≥ 0`, else the history (up
/// to two earlier rows, oldest first), else replicate padding (SPEC §4.2).
fn pool_row<'x>(x: &'x [f32], f: usize, history: &'x [Vec<f32>], t: isize) -> &'x [f32] {
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
fn pool3(x: &[f32], f: usize, history: &[Vec<f32>]) -> Vec<f32> {
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

/// Per-token processed values `[H, S, D]` for one of q/k/v/α/β.
struct Processed {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    alpha: Vec<f32>,
    beta: Vec<f32>,
}

/// `(cos θ_1, sin θ_1)` of the order-2 rotation, `θ_1 = 1·(2π/2)` in float32: `(-1, -8.742278e-08)`.
fn rot1() -> (f32, f32) {
    let angle = std::f32::consts::PI;
    (angle.cos(), angle.sin())
}

/// `dst = rot(src)`: adjacent pairs rotated by `θ_1`, an odd last element kept.
fn rotate(src: &[f32], dst: &mut [f32]) {
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
fn virtual_second(trick: Trick, cur: &[f32], before: &[f32], v1: &mut [f32]) {
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
fn virtual_pair(trick: Trick, cur: &[f32], before: &[f32], v0: &mut [f32], v1: &mut [f32]) {
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
fn expand(
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

/// One layer's linear branch for the `S` tokens of a call.
///
/// `q_raw`: `[S, H·D]`, `k_raw`, `v_raw`: `[S, Hkv·D]` (the LoRA'd, biased projections, no RoPE).
/// Returns `[S, H·D]` after the parameter-free RMS norm, ready for `o_proj`.
pub fn forward(
    shape: &LinearShape,
    q_raw: &[f32],
    k_raw: &[f32],
    v_raw: &[f32],
    carry: &mut LinearCarry,
    mode: CarryMode,
    which: ScanImpl,
) -> Vec<f32> {
    if mode == CarryMode::Reference {
        carry.state.iter_mut().for_each(|x| *x = STATE_INIT);
        carry.pool_k.clear();
        carry.pool_v.clear();
    }
    match which {
        ScanImpl::Fast => forward_fused(shape, q_raw, k_raw, v_raw, carry),
        ScanImpl::Naive => forward_expanded(shape, q_raw, k_raw, v_raw, carry),
    }
}

/// The literal order of SPEC §4: all processed values, all virtual rows, then [`naive::scan`].
fn forward_expanded(
    shape: &LinearShape,
    q_raw: &[f32],
    k_raw: &[f32],
    v_raw: &[f32],
    carry: &mut LinearCarry,
) -> Vec<f32> {
    let (h_n, hkv, d, rc) = (shape.heads, shape.kv_heads, shape.dim, shape.rc);
    let g = h_n / hkv;
    let fkv = hkv * d;
    let s = k_raw.len() / fkv;

    // §4.2 gates, per kv channel.
    let f_gate: Vec<f32> = pool3(k_raw, fkv, &carry.pool_k)
        .into_iter()
        .map(sigmoid)
        .collect();
    let w_gate: Vec<f32> = pool3(v_raw, fkv, &carry.pool_v)
        .into_iter()
        .map(sigmoid)
        .collect();

    // §4.3 per head [H, S, D], kv heads repeated (head h reads kv head h / G).
    let scaling = (d as f32).powf(-0.5);
    let mut p = Processed {
        q: vec![0f32; h_n * s * d],
        k: vec![0f32; h_n * s * d],
        v: vec![0f32; h_n * s * d],
        alpha: vec![0f32; h_n * s * d],
        beta: vec![0f32; h_n * s * d],
    };
    for t in 0..s {
        for h in 0..h_n {
            let kvh = h / g;
            let dst = (h * s + t) * d;
            let qs = &q_raw[t * h_n * d + h * d..t * h_n * d + (h + 1) * d];
            let ks = &k_raw[t * fkv + kvh * d..t * fkv + (kvh + 1) * d];
            let vs = &v_raw[t * fkv + kvh * d..t * fkv + (kvh + 1) * d];
            let fg = &f_gate[t * fkv + kvh * d..t * fkv + (kvh + 1) * d];
            let wg = &w_gate[t * fkv + kvh * d..t * fkv + (kvh + 1) * d];
            for e in 0..d {
                p.q[dst + e] = silu(qs[e]);
                p.k[dst + e] = silu(ks[e]);
                p.v[dst + e] = vs[e] * scaling;
                let gate = |which: Gate, beta: bool| match which {
                    Gate::K => fg[e],
                    Gate::V => wg[e],
                    Gate::Kv => fg[e] * wg[e],
                    Gate::C => {
                        if beta {
                            0.5
                        } else {
                            1.0
                        }
                    }
                };
                p.alpha[dst + e] = gate(rc.alpha_gate, false);
                p.beta[dst + e] = gate(rc.beta_gate, true);
            }
            l2norm(&mut p.q[dst..dst + d]);
            l2norm(&mut p.k[dst..dst + d]);
        }
    }

    // §4.4/4.5 virtual tokens; the buffer (if any) is the row before token 0.
    let n = rc.order;
    let prev = carry.prev.take();
    let trick_for = |gate: Gate| {
        if gate == Gate::C {
            Trick::Cte
        } else {
            rc.trick
        }
    };
    let q = expand(
        &p.q,
        prev.as_ref().map(|b| b.q.as_slice()),
        h_n,
        s,
        d,
        n,
        rc.trick,
    );
    let k = expand(
        &p.k,
        prev.as_ref().map(|b| b.k.as_slice()),
        h_n,
        s,
        d,
        n,
        rc.trick,
    );
    let v = expand(
        &p.v,
        prev.as_ref().map(|b| b.v.as_slice()),
        h_n,
        s,
        d,
        n,
        rc.trick,
    );
    let alpha = expand(
        &p.alpha,
        prev.as_ref().map(|b| b.alpha.as_slice()),
        h_n,
        s,
        d,
        n,
        trick_for(rc.alpha_gate),
    );
    let beta = expand(
        &p.beta,
        prev.as_ref().map(|b| b.beta.as_slice()),
        h_n,
        s,
        d,
        n,
        trick_for(rc.beta_gate),
    );

    // Update the carry's histories before the scan consumes the state.
    if n > 1 {
        let last = |x: &[f32]| -> Vec<f32> {
            (0..h_n)
                .flat_map(|h| x[(h * s + s - 1) * d..(h * s + s) * d].iter().copied())
                .collect()
        };
        carry.prev = Some(PrevToken {
            q: last(&p.q),
            k: last(&p.k),
            v: last(&p.v),
            alpha: last(&p.alpha),
            beta: last(&p.beta),
        });
    }
    let push_rows = |hist: &mut Vec<Vec<f32>>, x: &[f32]| {
        let start = s.saturating_sub(2);
        for t in start..s {
            hist.push(x[t * fkv..(t + 1) * fkv].to_vec());
        }
        let extra = hist.len().saturating_sub(2);
        hist.drain(..extra);
    };
    push_rows(&mut carry.pool_k, k_raw);
    push_rows(&mut carry.pool_v, v_raw);

    // §4.6–4.8
    carry.expand_states(h_n, d);
    let chunk = chunk_size(s, shape.max_chunk);
    let inp = ScanInput {
        heads: h_n,
        dim: d,
        tokens: s,
        order: n,
        chunk,
        linear: rc.linear,
        q: &q,
        k: &k,
        v: &v,
        alpha: &alpha,
        beta: &beta,
    };
    let y = scan(&inp, &mut carry.state, ScanImpl::Naive); // [H, S, D]

    // §4.9 merge heads and RMS-normalise each token over H·D (no weight).
    let hd = h_n * d;
    let mut out = vec![0f32; s * hd];
    for t in 0..s {
        let row = &mut out[t * hd..(t + 1) * hd];
        for h in 0..h_n {
            row[h * d..(h + 1) * d].copy_from_slice(&y[(h * s + t) * d..(h * s + t + 1) * d]);
        }
        let ms = row.iter().map(|x| x * x).sum::<f32>() / hd as f32;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        row.iter_mut().for_each(|x| *x *= inv);
    }
    out
}

/// The processed values of one token for one kv head (SPEC §4.2–4.3), `D` each.
struct KvRow {
    k: Vec<f32>,
    v: Vec<f32>,
    alpha: Vec<f32>,
    beta: Vec<f32>,
    /// Scratch: the `k` and `v` gates.
    fg: Vec<f32>,
    wg: Vec<f32>,
}

impl KvRow {
    fn new(d: usize) -> Self {
        let z = || vec![0f32; d];
        Self {
            k: z(),
            v: z(),
            alpha: z(),
            beta: z(),
            fg: z(),
            wg: z(),
        }
    }
}

/// The rows of [`fast::run`] computed on the fly from the raw projections: gates, pooling, SiLU,
/// L2 norms and virtual tokens per chunk, so no `[H, S·n, D]` array is ever built, and the
/// key-side rows of a kv head only once for all the query heads of its group.
struct Fused<'a> {
    d: usize,
    h_n: usize,
    fkv: usize,
    chunk: usize,
    rc: RecurrentConfig,
    scaling: f32,
    q_raw: &'a [f32],
    k_raw: &'a [f32],
    v_raw: &'a [f32],
    pool_k: &'a [Vec<f32>],
    pool_v: &'a [Vec<f32>],
    prev: Option<&'a PrevToken>,
    /// Per key group: its kv head and the query head whose carried values it uses.
    groups: Vec<(usize, usize)>,
}

impl<'a> Fused<'a> {
    /// Token `t`'s processed query for head `h` (`t = -1`: the carried one, or zeros).
    #[inline(always)]
    fn proc_q(&self, t: isize, h: usize, out: &mut [f32]) {
        let d = self.d;
        if t < 0 {
            match self.prev {
                Some(p) => out.copy_from_slice(&p.q[h * d..(h + 1) * d]),
                None => out.fill(0.0),
            }
            return;
        }
        let o = t as usize * self.h_n * d + h * d;
        for (x, &r) in out.iter_mut().zip(&self.q_raw[o..o + d]) {
            *x = silu_fast(r);
        }
        l2norm(out);
    }

    /// Token `t`'s processed key-side values of kv head `kvh` (`t = -1`: the carried ones of head
    /// `rep`, or zeros).
    #[inline(always)]
    fn proc_kv(&self, t: isize, kvh: usize, rep: usize, out: &mut KvRow) {
        let d = self.d;
        if t < 0 {
            match self.prev {
                Some(p) => {
                    let r = rep * d..(rep + 1) * d;
                    out.k.copy_from_slice(&p.k[r.clone()]);
                    out.v.copy_from_slice(&p.v[r.clone()]);
                    out.alpha.copy_from_slice(&p.alpha[r.clone()]);
                    out.beta.copy_from_slice(&p.beta[r]);
                }
                None => {
                    for x in [&mut out.k, &mut out.v, &mut out.alpha, &mut out.beta] {
                        x.fill(0.0);
                    }
                }
            }
            return;
        }
        let (f, lo) = (self.fkv, kvh * d);
        let o = t as usize * f + lo;
        for (x, &r) in out.k.iter_mut().zip(&self.k_raw[o..o + d]) {
            *x = silu_fast(r);
        }
        l2norm(&mut out.k);
        for (x, &r) in out.v.iter_mut().zip(&self.v_raw[o..o + d]) {
            *x = r * self.scaling;
        }
        // §4.2: sigmoid of the causal 3-mean, only for the gates in use.
        let uses = |g: Gate| {
            [self.rc.alpha_gate, self.rc.beta_gate]
                .iter()
                .any(|&x| x == g || x == Gate::Kv)
        };
        let third = 1.0f32 / 3.0;
        let window = |x: &'a [f32], hist: &'a [Vec<f32>]| {
            [t - 2, t - 1, t].map(|r| &pool_row(x, f, hist, r)[lo..lo + d])
        };
        let pooled = |w: [&[f32]; 3], out: &mut [f32]| {
            for (((o, &a), &b), &c) in out.iter_mut().zip(w[0]).zip(w[1]).zip(w[2]) {
                *o = sigmoid_fast(a * third + b * third + c * third);
            }
        };
        if uses(Gate::K) {
            pooled(window(self.k_raw, self.pool_k), &mut out.fg);
        }
        if uses(Gate::V) {
            pooled(window(self.v_raw, self.pool_v), &mut out.wg);
        }
        for e in 0..d {
            let (fg, wg) = (out.fg[e], out.wg[e]);
            let gate = |which: Gate, beta: bool| match which {
                Gate::K => fg,
                Gate::V => wg,
                Gate::Kv => fg * wg,
                Gate::C => {
                    if beta {
                        0.5
                    } else {
                        1.0
                    }
                }
            };
            out.alpha[e] = gate(self.rc.alpha_gate, false);
            out.beta[e] = gate(self.rc.beta_gate, true);
        }
    }
}

impl fast::ChunkRows for Fused<'_> {
    #[inline(always)]
    fn kvab(
        &self,
        group: usize,
        chunk: usize,
        k: &mut [f32],
        v: &mut [f32],
        alpha: &mut [f32],
        beta: &mut [f32],
    ) {
        let (d, c) = (self.d, self.chunk);
        let (kvh, rep) = self.groups[group];
        let t0 = (chunk * c) as isize;
        if self.rc.order == 1 {
            let mut cur = KvRow::new(d);
            for tok in 0..c {
                self.proc_kv(t0 + tok as isize, kvh, rep, &mut cur);
                let r = tok * d..(tok + 1) * d;
                k[r.clone()].copy_from_slice(&cur.k);
                v[r.clone()].copy_from_slice(&cur.v);
                alpha[r.clone()].copy_from_slice(&cur.alpha);
                beta[r].copy_from_slice(&cur.beta);
            }
            return;
        }
        let trick_for = |gate: Gate| {
            if gate == Gate::C {
                Trick::Cte
            } else {
                self.rc.trick
            }
        };
        let (mut cur, mut before) = (KvRow::new(d), KvRow::new(d));
        self.proc_kv(t0 - 1, kvh, rep, &mut before);
        for tok in 0..c {
            self.proc_kv(t0 + tok as isize, kvh, rep, &mut cur);
            let pair = |x: &mut [f32], cur: &[f32], before: &[f32], trick: Trick| {
                let (v0, v1) = x[2 * tok * d..(2 * tok + 2) * d].split_at_mut(d);
                virtual_pair(trick, cur, before, v0, v1);
            };
            pair(k, &cur.k, &before.k, self.rc.trick);
            pair(v, &cur.v, &before.v, self.rc.trick);
            pair(
                alpha,
                &cur.alpha,
                &before.alpha,
                trick_for(self.rc.alpha_gate),
            );
            pair(beta, &cur.beta, &before.beta, trick_for(self.rc.beta_gate));
            std::mem::swap(&mut cur, &mut before);
        }
    }

    #[inline(always)]
    fn q_last(&self, head: usize, chunk: usize, q: &mut [f32]) {
        let (d, c) = (self.d, self.chunk);
        let t0 = (chunk * c) as isize;
        if self.rc.order == 1 {
            for (tok, row) in q.chunks_exact_mut(d).enumerate() {
                self.proc_q(t0 + tok as isize, head, row);
            }
            return;
        }
        let (mut cur, mut before) = (vec![0f32; d], vec![0f32; d]);
        self.proc_q(t0 - 1, head, &mut before);
        for (tok, row) in q.chunks_exact_mut(d).enumerate() {
            self.proc_q(t0 + tok as isize, head, &mut cur);
            virtual_second(self.rc.trick, &cur, &before, row);
            std::mem::swap(&mut cur, &mut before);
        }
    }
}

/// [`forward`] on the fast path: [`fast::run`] (one token: [`fast::step`]) over [`Fused`] rows.
///
/// The heads sharing a kv head see the same keys, values and gates, and the state recursion
/// never reads the query, so their states stay equal and `W`, `U` and the states are computed once
/// per kv head, and stored once (the carry leaves with one state per kv head). That holds when
/// their carried states and order-2 buffers agree (always, for carries made by this function);
/// otherwise every head is its own group (and keeps its own state).
fn forward_fused(
    shape: &LinearShape,
    q_raw: &[f32],
    k_raw: &[f32],
    v_raw: &[f32],
    carry: &mut LinearCarry,
) -> Vec<f32> {
    let (h_n, hkv, d, rc) = (shape.heads, shape.kv_heads, shape.dim, shape.rc);
    let g = h_n / hkv;
    let fkv = hkv * d;
    let s = k_raw.len() / fkv;
    let n = rc.order;
    let prev = carry.prev.take();

    // Bitwise equality of rows `a` and `b` (`w` wide) of `x`, in blocks that vectorise.
    let same = |x: &[f32], a: usize, b: usize, w: usize| {
        let (ra, rb) = (&x[a * w..(a + 1) * w], &x[b * w..(b + 1) * w]);
        ra.chunks(64).zip(rb.chunks(64)).all(|(p, q)| {
            p.iter()
                .zip(q)
                .fold(0u32, |acc, (u, v)| acc | (u.to_bits() ^ v.to_bits()))
                == 0
        })
    };
    let dd = d * d;
    let prev_shared = (0..h_n).all(|h| {
        prev.as_ref().is_none_or(|p| {
            [&p.k, &p.v, &p.alpha, &p.beta]
                .iter()
                .all(|x| same(x, h, h / g * g, d))
        })
    });
    let stored = carry.stored_states(d);
    let shared = prev_shared
        && (stored == hkv
            || (stored == h_n && (0..h_n).all(|h| same(&carry.state, h, h / g * g, dd))));
    // From here on the carry's states are indexed by key group.
    if shared {
        if stored != hkv {
            carry.state = (0..hkv)
                .flat_map(|kvh| {
                    carry.state[kvh * g * dd..(kvh * g + 1) * dd]
                        .iter()
                        .copied()
                })
                .collect();
        }
    } else {
        carry.expand_states(h_n, d);
    }
    let (members, groups): (Vec<Vec<usize>>, Vec<(usize, usize)>) = if shared {
        (0..hkv)
            .map(|kvh| ((kvh * g..(kvh + 1) * g).collect(), (kvh, kvh * g)))
            .unzip()
    } else {
        (0..h_n).map(|h| (vec![h], (h / g, h))).unzip()
    };

    let chunk = chunk_size(s, shape.max_chunk);
    let rows = Fused {
        d,
        h_n,
        fkv,
        chunk,
        rc,
        scaling: (d as f32).powf(-0.5),
        q_raw,
        k_raw,
        v_raw,
        pool_k: &carry.pool_k,
        pool_v: &carry.pool_v,
        prev: prev.as_ref(),
        groups,
    };
    let plan = fast::Plan {
        dim: d,
        tokens: s,
        order: n,
        chunk,
        linear: rc.linear,
        groups: &members,
    };
    let y = if s == 1 {
        fast::step(&rows, &plan, h_n, &mut carry.state)
    } else {
        fast::run(&rows, &plan, h_n, &mut carry.state)
    };

    // The next call's order-2 buffer: the last token, processed, per head.
    let next_prev = (n > 1).then(|| {
        let t = s as isize - 1;
        let mut p = PrevToken {
            q: vec![0f32; h_n * d],
            k: vec![0f32; h_n * d],
            v: vec![0f32; h_n * d],
            alpha: vec![0f32; h_n * d],
            beta: vec![0f32; h_n * d],
        };
        let mut kv = KvRow::new(d);
        for h in 0..h_n {
            let r = h * d..(h + 1) * d;
            rows.proc_q(t, h, &mut p.q[r.clone()]);
            // A real token's key-side rows only depend on its kv head: made once per group.
            if h % g == 0 {
                rows.proc_kv(t, h / g, h, &mut kv);
            }
            p.k[r.clone()].copy_from_slice(&kv.k);
            p.v[r.clone()].copy_from_slice(&kv.v);
            p.alpha[r.clone()].copy_from_slice(&kv.alpha);
            p.beta[r].copy_from_slice(&kv.beta);
        }
        p
    });
    carry.prev = next_prev;
    let push_rows = |hist: &mut Vec<Vec<f32>>, x: &[f32]| {
        for t in s.saturating_sub(2)..s {
            hist.push(x[t * fkv..(t + 1) * fkv].to_vec());
        }
        let extra = hist.len().saturating_sub(2);
        hist.drain(..extra);
    };
    push_rows(&mut carry.pool_k, k_raw);
    push_rows(&mut carry.pool_v, v_raw);

    // §4.9 merge heads and RMS-normalise each token over H·D (no weight).
    let hd = h_n * d;
    let mut out = vec![0f32; s * hd];
    let merge = |(t, row): (usize, &mut [f32])| {
        for h in 0..h_n {
            row[h * d..(h + 1) * d].copy_from_slice(y.row(h, t));
        }
        let ms = row.iter().map(|x| x * x).sum::<f32>() / hd as f32;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        row.iter_mut().for_each(|x| *x *= inv);
    };
    if s >= 64 {
        use rayon::prelude::*;
        out.par_chunks_mut(hd).enumerate().for_each(merge);
    } else {
        out.chunks_mut(hd).enumerate().for_each(merge);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::rand_vec;

    fn normalized_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut v = rand_vec(n * d, seed);
        v.chunks_mut(d).for_each(l2norm);
        v
    }

    /// Tolerance between the two scan orders of operation, relative to the output scale.
    const SCAN_TOL: f32 = 2e-5;

    fn check_scan(heads: usize, d: usize, s: usize, n: usize, chunk: usize, linear: bool) {
        let rows = heads * s * n;
        let q = normalized_rows(rows, d, 1);
        let k = normalized_rows(rows, d, 2);
        let v = rand_vec(rows * d, 3)
            .iter()
            .map(|x| x * 0.3)
            .collect::<Vec<_>>();
        // gates in (0, 1) and, as under dt, some negative ones
        let alpha = rand_vec(rows * d, 4)
            .iter()
            .map(|x| 0.6 + 0.4 * x)
            .collect::<Vec<_>>();
        let beta = rand_vec(rows * d, 5)
            .iter()
            .map(|x| 0.5 * x)
            .collect::<Vec<_>>();
        let inp = ScanInput {
            heads,
            dim: d,
            tokens: s,
            order: n,
            chunk,
            linear,
            q: &q,
            k: &k,
            v: &v,
            alpha: &alpha,
            beta: &beta,
        };
        let init = rand_vec(heads * d * d, 6)
            .iter()
            .map(|x| 0.1 * x)
            .collect::<Vec<_>>();
        let (mut s_naive, mut s_fast) = (init.clone(), init);
        let o_naive = scan(&inp, &mut s_naive, ScanImpl::Naive);
        let o_fast = scan(&inp, &mut s_fast, ScanImpl::Fast);
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let scale = o_naive
            .iter()
            .map(|x| x.abs())
            .fold(0f32, f32::max)
            .max(1.0);
        assert!(
            max_diff(&o_naive, &o_fast) <= SCAN_TOL * scale,
            "output H{heads} D{d} S{s} n{n} C{chunk}: {}",
            max_diff(&o_naive, &o_fast)
        );
        assert!(
            max_diff(&s_naive, &s_fast) <= SCAN_TOL * scale,
            "state H{heads} D{d} S{s} n{n} C{chunk}: {}",
            max_diff(&s_naive, &s_fast)
        );
    }

    #[test]
    fn fast_scan_matches_naive_on_odd_shapes() {
        for &(s, c) in &[(1, 1), (7, 7), (63, 21), (67, 1), (100, 50), (130, 26)] {
            for n in [1, 2] {
                for linear in [true, false] {
                    check_scan(3, 60, s, n, c, linear);
                }
            }
        }
        check_scan(2, 16, 64, 2, 64, true);
        check_scan(1, 5, 9, 2, 3, true);
    }

    #[test]
    fn chunk_size_rule_matches_the_reference_table() {
        let table = [
            (1, 1),
            (7, 7),
            (20, 20),
            (31, 31),
            (64, 64),
            (67, 1),
            (100, 50),
            (128, 64),
            (130, 26),
            (512, 64),
            (1000, 50),
            (4099, 1),
        ];
        for (s, c) in table {
            assert_eq!(chunk_size(s, 64), c, "S = {s}");
        }
        assert_eq!(chunk_size(130, 7), 5);
        assert_eq!(chunk_size(5, 1), 1);
    }

    #[test]
    fn spec_worked_example_of_dt_virtual_tokens() {
        // One head, D = 2: x_0 = (1, 2), x_1 = (3, 4).
        let x = [1.0, 2.0, 3.0, 4.0];
        let out = expand(&x, None, 1, 2, 2, 2, Trick::Dt);
        assert_eq!(out, vec![-0.5, -1.0, 0.0, 0.0, -1.5, -2.0, 0.5, 1.0]);
    }

    #[test]
    fn rotation_uses_float32_sin_pi() {
        let out = expand(&[1.0, 2.0], None, 1, 1, 2, 2, Trick::Rot);
        assert_eq!(out[..2], [1.0, 2.0]);
        let s = -8.742278e-08f32;
        assert_eq!(out[2], -1.0 - 2.0 * s);
        assert_eq!(out[3], 1.0 * s + -2.0);
    }

    #[test]
    fn pooling_replicates_then_uses_history() {
        let x = [3.0, 6.0, 9.0];
        let fresh = pool3(&x, 1, &[]);
        assert!(
            (fresh[0] - 3.0).abs() < 1e-6
                && (fresh[1] - 4.0).abs() < 1e-6
                && (fresh[2] - 6.0).abs() < 1e-6
        );
        let hist = pool3(&[9.0], 1, &[vec![3.0], vec![6.0]]);
        assert!((hist[0] - 6.0).abs() < 1e-6);
    }

    fn layer_inputs(s: usize, h: usize, hkv: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            rand_vec(s * h * d, 11),
            rand_vec(s * hkv * d, 12),
            rand_vec(s * hkv * d, 13),
        )
    }

    #[test]
    fn split_calls_with_carried_state_equal_one_call_at_chunk_one() {
        for mode in crate::config::OPERATOR_MODES {
            let rc = RecurrentConfig::from_operator_mode(mode).expect("known mode");
            let shape = LinearShape {
                heads: 4,
                kv_heads: 2,
                dim: 8,
                rc,
                max_chunk: 1,
            };
            let s = 9;
            let (q, k, v) = layer_inputs(s, 4, 2, 8);
            let mut one = LinearCarry::new(4, 8);
            let full = forward(
                &shape,
                &q,
                &k,
                &v,
                &mut one,
                CarryMode::Continue,
                ScanImpl::Fast,
            );
            let mut split = LinearCarry::new(4, 8);
            let mut parts = Vec::new();
            for (a, b) in [(0, 4), (4, 5), (5, 9)] {
                parts.extend(forward(
                    &shape,
                    &q[a * 32..b * 32],
                    &k[a * 16..b * 16],
                    &v[a * 16..b * 16],
                    &mut split,
                    CarryMode::Continue,
                    ScanImpl::Fast,
                ));
            }
            let diff = full
                .iter()
                .zip(&parts)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{mode}: {diff}");
            assert!(
                one.state
                    .iter()
                    .zip(&split.state)
                    .all(|(x, y)| (x - y).abs() < 1e-5),
                "{mode}: state"
            );
        }
    }

    /// The largest difference between two carries of `h` heads of size `d`, states compared per
    /// query head (either may store one state per kv head).
    fn carry_diff(a: &LinearCarry, b: &LinearCarry, h: usize, d: usize) -> f32 {
        let md = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max)
        };
        let (sa, sb) = (a.head_states(h, d), b.head_states(h, d));
        assert_eq!((sa.len(), sb.len()), (h * d * d, h * d * d));
        let mut m = md(&sa, &sb);
        assert_eq!(a.pool_k, b.pool_k);
        assert_eq!(a.pool_v, b.pool_v);
        match (&a.prev, &b.prev) {
            (Some(p), Some(q)) => {
                for (x, y) in [
                    (&p.q, &q.q),
                    (&p.k, &q.k),
                    (&p.v, &q.v),
                    (&p.alpha, &q.alpha),
                    (&p.beta, &q.beta),
                ] {
                    m = m.max(md(x, y));
                }
            }
            (None, None) => {}
            _ => panic!("order-2 buffer present on one path only"),
        }
        m
    }

    /// The fused fast forward (rows built per chunk, kv-head groups shared) against the literal
    /// one (expanded arrays, naive scan), over every operator mode, across calls that carry
    /// state, pooling history and the order-2 buffer, in both carry modes, with GQA groups.
    #[test]
    fn fused_forward_matches_expanded_forward() {
        let (h, hkv, d) = (6, 2, 10);
        for mode in crate::config::OPERATOR_MODES {
            let rc = RecurrentConfig::from_operator_mode(mode).expect("known mode");
            for max_chunk in [1, 4, 64] {
                let shape = LinearShape {
                    heads: h,
                    kv_heads: hkv,
                    dim: d,
                    rc,
                    max_chunk,
                };
                for cm in [CarryMode::Continue, CarryMode::Reference] {
                    // The fast path starts with one state per kv head, the literal one per query head.
                    let (mut fast, mut naive) =
                        (LinearCarry::grouped(hkv, d), LinearCarry::new(h, d));
                    for (call, s) in [12usize, 1, 1, 7, 1, 30, 1].into_iter().enumerate() {
                        let seed = 100 + call as u64;
                        let (q, k, v) = (
                            rand_vec(s * h * d, seed),
                            rand_vec(s * hkv * d, seed + 10),
                            rand_vec(s * hkv * d, seed + 20),
                        );
                        let of = forward(&shape, &q, &k, &v, &mut fast, cm, ScanImpl::Fast);
                        let on = forward(&shape, &q, &k, &v, &mut naive, cm, ScanImpl::Naive);
                        let diff = of
                            .iter()
                            .zip(&on)
                            .map(|(x, y)| (x - y).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            diff < 1e-4,
                            "{mode} C≤{max_chunk} {cm:?} call {call}: output {diff}"
                        );
                        let cd = carry_diff(&fast, &naive, h, d);
                        assert!(
                            cd < 1e-5,
                            "{mode} C≤{max_chunk} {cm:?} call {call}: carry {cd}"
                        );
                        assert_eq!(fast.stored_states(d), hkv, "{mode}: one state per kv head");
                    }
                }
            }
        }
    }

    /// Heads of a kv group whose carried states differ are scanned one by one.
    #[test]
    fn fused_forward_handles_unequal_group_states() {
        let (h, hkv, d, s) = (4, 2, 8, 9);
        for mode in ["delta_rule", "delta_product_c"] {
            let rc = RecurrentConfig::from_operator_mode(mode).expect("known mode");
            let shape = LinearShape {
                heads: h,
                kv_heads: hkv,
                dim: d,
                rc,
                max_chunk: 3,
            };
            let (q, k, v) = layer_inputs(s, h, hkv, d);
            let mut start = LinearCarry::new(h, d);
            forward(
                &shape,
                &q,
                &k,
                &v,
                &mut start,
                CarryMode::Continue,
                ScanImpl::Naive,
            );
            start.state[d * d..2 * d * d]
                .iter_mut()
                .zip(rand_vec(d * d, 7))
                .for_each(|(x, r)| *x += 0.1 * r);
            if let Some(p) = start.prev.as_mut() {
                p.k[3 * d] += 0.25;
            }
            let (mut fast, mut naive) = (start.clone(), start);
            let of = forward(
                &shape,
                &q,
                &k,
                &v,
                &mut fast,
                CarryMode::Continue,
                ScanImpl::Fast,
            );
            let on = forward(
                &shape,
                &q,
                &k,
                &v,
                &mut naive,
                CarryMode::Continue,
                ScanImpl::Naive,
            );
            let diff = of
                .iter()
                .zip(&on)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{mode}: output {diff}");
            assert!(carry_diff(&fast, &naive, h, d) < 1e-5, "{mode}: carry");
            // Then one token (the decode step), still with per-head states.
            let (q1, k1, v1) = (&q[..h * d], &k[..hkv * d], &v[..hkv * d]);
            let of = forward(
                &shape,
                q1,
                k1,
                v1,
                &mut fast,
                CarryMode::Continue,
                ScanImpl::Fast,
            );
            let on = forward(
                &shape,
                q1,
                k1,
                v1,
                &mut naive,
                CarryMode::Continue,
                ScanImpl::Naive,
            );
            let diff = of
                .iter()
                .zip(&on)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{mode}: one-token output {diff}");
            assert_eq!(
                fast.stored_states(d),
                h,
                "{mode}: unequal states stay per head"
            );
            assert!(
                carry_diff(&fast, &naive, h, d) < 1e-5,
                "{mode}: one-token carry"
            );
        }
    }

    #[test]
    fn exp_fast_is_within_a_few_ulp_and_its_sigmoids_saturate() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.0044; // [-88, 88]
            if x.abs() < 87.0 {
                let (a, b) = (exp_fast(x), x.exp());
                assert!(
                    (a - b).abs() <= 4.0 * f32::EPSILON * b,
                    "exp({x}): {a} vs {b}"
                );
            }
        }
        for x in [
            -1e30f32, -200.0, -90.0, -20.0, -1.0, 0.0, 0.5, 20.0, 90.0, 200.0, 1e30,
        ] {
            assert!((sigmoid_fast(x) - sigmoid(x)).abs() < 1e-6, "sigmoid({x})");
            assert!(
                (silu_fast(x) - silu(x)).abs() <= 1e-6 * x.abs().max(1.0),
                "silu({x})"
            );
        }
    }

    /// The baseline (non-AVX2) variants of the fast scan agree too. Other tests running at the
    /// same time may take the baseline path while the flag is set; they check the same contract.
    #[test]
    fn baseline_variants_match_naive() {
        use std::sync::atomic::Ordering;
        fast::FORCE_BASELINE.store(true, Ordering::Relaxed);
        for &(s, c) in &[(1, 1), (63, 21), (100, 50)] {
            for n in [1, 2] {
                check_scan(3, 60, s, n, c, n == 1);
            }
        }
        check_scan(1, 5, 9, 2, 3, true);
        fast::FORCE_BASELINE.store(false, Ordering::Relaxed);
    }
}
