//! The fast scan: the same mathematics as [`super::naive`], reorganised into blocked
//! matrix-matrix products, with nothing copying a `D×D` state per token.
//!
//! Per chunk (N = C·n virtual rows, rows of `K, V, α, β` are `D`-vectors):
//! * `G = kβ·Kᵀ` (strictly lower part, so `A = −G`) and `X = (I − A)⁻¹ [kβ | vβ] = [W | U]` by a
//!   blocked forward substitution: for a block of rows `J`, first `X_J −= G[J, <J]·X[<J]` (one
//!   matrix product), then `X_i −= Σ_{m ∈ J, m<i} G[i,m] X_m` inside the block.
//! * Every token starts from the chunk's `h0`, so its reads of the state are products with `h0`:
//!   `P_w = W·h0` (all rows at once) and `P_q = Q·h0` (the rows of each token's last virtual step).
//! * Order 1: `u' = u − P_w`, `o = P_q + q ⊙ u'`.
//! * Order 2 (token rows r0, r1): `S1 = h0·diag(α0) + w0⊗u0'` gives
//!   `S1ᵀx = α0 ⊙ (h0ᵀx) + u0'·(w0·x)`, so
//!   `u1' = u1 − α0 ⊙ P_w[r1] − u0'·(w0·w1)` and `o1 = α0 ⊙ P_q[r1] + u0'·(w0·q1) + q1 ⊙ u1'`.
//! * The chunk's final state is its last token's: `h0 ← (h0·diag(α0) + w0⊗u0')·diag(α1) + w1⊗u1'`
//!   (order 1: `h0 ← h0·diag(α) + w⊗u'`), then the GELU of the non-linear variants.
//!
//! Only that last step is sequential from chunk to chunk, and it needs nothing but the last
//! token's rows of `W`, `U` and `α`. So a call runs in three phases over windows of chunks:
//! 1. per (key group, chunk), in parallel: the rows, `G` and the solve for `W`, `U`;
//! 2. per key group: the chain of chunk-initial states `h0` (`2·n·D²` per chunk);
//! 3. per (key group, chunk), in parallel: `P_w`, `u'` and, per query head, `P_q` and the outputs.
//!
//! A *key group* is a set of query heads whose keys, values, gates and state are the same (the
//! heads sharing a kv head, when their carried states agree; see `super::forward`): `W`, `U`,
//! `u'` and the states only depend on those, so they are computed once per group and only the
//! query products are per head. With [`scan`] every head is its own group.
//!
//! The products use a register-blocked `6×16` micro-kernel (whole-row accumulation for products of
//! one or two rows, as in decoding); every phase is compiled twice (baseline, and AVX2 + FMA
//! picked at run time, so the binary still runs on older x86-64). Small scans stay on the calling
//! thread.

use rayon::prelude::*;

use super::{gelu_rows, ScanInput};
use crate::cpu::gemm::{gemm, NR};
use crate::cpu::has_avx2_fma;
use crate::cpu::math::{axpy, dot};

/// Where the scan reads the virtual rows of a chunk from (all rows `D` wide).
pub(crate) trait ChunkRows: Sync {
    /// Fill `k, v, alpha, beta` (`[N, D]` each, `N = C·n`) with the virtual rows of chunk `chunk`
    /// of key group `group`.
    fn kvab(
        &self,
        group: usize,
        chunk: usize,
        k: &mut [f32],
        v: &mut [f32],
        alpha: &mut [f32],
        beta: &mut [f32],
    );
    /// Fill `q` (`[C, D]`) with the query of the last virtual step of every token of chunk `chunk`
    /// for query head `head`.
    fn q_last(&self, head: usize, chunk: usize, q: &mut [f32]);
}

/// The geometry of one call.
pub(crate) struct Plan<'a> {
    /// Head dim D.
    pub dim: usize,
    /// Tokens S.
    pub tokens: usize,
    /// Order n.
    pub order: usize,
    /// Chunk C (divides S).
    pub chunk: usize,
    /// `false`: inter-chunk GELU.
    pub linear: bool,
    /// The query heads of every key group; the first one's state is the group's.
    pub groups: &'a [Vec<usize>],
}

/// The outputs of [`run`]: per window, per (group, chunk of the window), `[member, C, D]`.
pub(crate) struct Outputs {
    chunk: usize,
    dim: usize,
    chunks_per_window: usize,
    groups: usize,
    blocks: Vec<Vec<Vec<f32>>>,
    /// Head → (group, index in the group).
    member: Vec<(usize, usize)>,
}

impl Outputs {
    /// The output row of query head `head` at token `t`.
    pub fn row(&self, head: usize, t: usize) -> &[f32] {
        let (g, mi) = self.member[head];
        let (c, tok) = (t / self.chunk, t % self.chunk);
        let (win, cw) = (c / self.chunks_per_window, c % self.chunks_per_window);
        let blocks = &self.blocks[win];
        let wn = blocks.len() / self.groups.max(1); // chunks in this window
        let o = (mi * self.chunk + tok) * self.dim;
        &blocks[g * wn + cw][o..o + self.dim]
    }
}

/// See the module doc. Same contract as [`super::naive::scan`].
pub fn scan(inp: &ScanInput<'_>, state: &mut [f32]) -> Vec<f32> {
    let (h_n, d, s) = (inp.heads, inp.dim, inp.tokens);
    let groups: Vec<Vec<usize>> = (0..h_n).map(|h| vec![h]).collect();
    let plan = Plan {
        dim: d,
        tokens: s,
        order: inp.order,
        chunk: inp.chunk,
        linear: inp.linear,
        groups: &groups,
    };
    let y = run(&Expanded(inp), &plan, h_n, state);
    let mut out = vec![0f32; h_n * s * d];
    for h in 0..h_n {
        for t in 0..s {
            out[(h * s + t) * d..(h * s + t + 1) * d].copy_from_slice(y.row(h, t));
        }
    }
    out
}

/// [`ChunkRows`] over the expanded `[H, S·n, D]` arrays of a [`ScanInput`] (group = head).
struct Expanded<'a, 'b>(&'a ScanInput<'b>);

impl ChunkRows for Expanded<'_, '_> {
    fn kvab(
        &self,
        group: usize,
        chunk: usize,
        k: &mut [f32],
        v: &mut [f32],
        alpha: &mut [f32],
        beta: &mut [f32],
    ) {
        let inp = self.0;
        let (d, big_n) = (inp.dim, inp.chunk * inp.order);
        let o = (group * inp.tokens * inp.order + chunk * big_n) * d;
        let r = o..o + big_n * d;
        k.copy_from_slice(&inp.k[r.clone()]);
        v.copy_from_slice(&inp.v[r.clone()]);
        alpha.copy_from_slice(&inp.alpha[r.clone()]);
        beta.copy_from_slice(&inp.beta[r]);
    }

    fn q_last(&self, head: usize, chunk: usize, q: &mut [f32]) {
        let inp = self.0;
        let (d, n, c) = (inp.dim, inp.order, inp.chunk);
        for (tok, dst) in q.chunks_exact_mut(d).enumerate() {
            let row = head * inp.tokens * n + (chunk * c + tok) * n + n - 1;
            dst.copy_from_slice(&inp.q[row * d..(row + 1) * d]);
        }
    }
}

/// The most floats of chunk states a window holds (about 4 MiB; tiny in unit tests, so that
/// they cross windows).
#[cfg(not(test))]
const WINDOW_FLOATS: usize = 1 << 20;
#[cfg(test)]
const WINDOW_FLOATS: usize = 1 << 9;

/// Run the scan. `state` is `[groups, D, D]`, one state per key group of the plan, read as the
/// initial states and overwritten with the final ones.
pub(crate) fn run<R: ChunkRows>(
    rows: &R,
    plan: &Plan<'_>,
    heads: usize,
    state: &mut [f32],
) -> Outputs {
    let (d, s, n, c) = (plan.dim, plan.tokens, plan.order, plan.chunk);
    let n_groups = plan.groups.len();
    let n_chunks = s / c;
    // Bound the stored chunk states (`D²` per chunk and group).
    let per_window = (WINDOW_FLOATS / (d * d * n_groups).max(1)).clamp(1, n_chunks.max(1));
    // Small calls (decoding) stay on the calling thread.
    let par = s * n * d * d * n_groups >= 1 << 17;
    let mut member = vec![(0usize, 0usize); heads];
    for (g, hs) in plan.groups.iter().enumerate() {
        for (mi, &h) in hs.iter().enumerate() {
            member[h] = (g, mi);
        }
    }
    let mut h: Vec<Vec<f32>> = state
        .chunks_exact(d * d)
        .take(n_groups)
        .map(<[f32]>::to_vec)
        .collect();
    let mut blocks = Vec::new();
    for w0 in (0..n_chunks).step_by(per_window) {
        let wn = per_window.min(n_chunks - w0);
        // Phase 1: W, U per (group, chunk).
        let solved = map_tasks(n_groups * wn, par, |i| {
            solve_dispatch(rows, plan, i / wn, w0 + i % wn)
        });
        // Phase 2: the chunk-initial states, per group.
        let h0s: Vec<Vec<f32>> = {
            let work = |(g, hg): (usize, &mut Vec<f32>)| {
                chain_dispatch(plan, &solved[g * wn..(g + 1) * wn], hg)
            };
            if par {
                h.par_iter_mut().enumerate().map(work).collect()
            } else {
                h.iter_mut().enumerate().map(work).collect()
            }
        };
        // Phase 3: outputs per (group, chunk).
        blocks.push(map_tasks(n_groups * wn, par, |i| {
            let (g, cw) = (i / wn, i % wn);
            outputs_dispatch(
                rows,
                plan,
                g,
                w0 + cw,
                &solved[i],
                &h0s[g][cw * d * d..(cw + 1) * d * d],
            )
        }));
    }
    for (dst, hg) in state.chunks_exact_mut(d * d).zip(&h) {
        dst.copy_from_slice(hg);
    }
    Outputs {
        chunk: c,
        dim: d,
        chunks_per_window: per_window,
        groups: n_groups,
        blocks,
        member,
    }
}

/// [`run`] for a call of one token (decoding): one chunk of one token per group, so no phases
/// and no copies of the state. Per group, the rows `w_0 … w_{n−1}` and every member's query are
/// multiplied by the state in one pass over it, then the state is updated in place (module doc:
/// the order-2 identities, with `h0` the carried state). Same contract as [`run`].
pub(crate) fn step<R: ChunkRows>(
    rows: &R,
    plan: &Plan<'_>,
    heads: usize,
    state: &mut [f32],
) -> Outputs {
    debug_assert!(plan.tokens == 1 && plan.chunk == 1);
    let d = plan.dim;
    let mut member = vec![(0usize, 0usize); heads];
    for (g, hs) in plan.groups.iter().enumerate() {
        for (mi, &h) in hs.iter().enumerate() {
            member[h] = (g, mi);
        }
    }
    let n = plan.groups.len();
    // Several groups: spread over the step's threads (on the decode step's team, a parallel
    // region costs a few µs; a group's work is ~3 µs of arithmetic plus its state from memory).
    let block: Vec<Vec<f32>> = if n > 1 && crate::team::threads() > 1 {
        let slots: Vec<std::sync::Mutex<(&mut [f32], Vec<f32>)>> = state
            .chunks_exact_mut(d * d)
            .take(n)
            .map(|h| std::sync::Mutex::new((h, Vec::new())))
            .collect();
        crate::team::for_each(n, &|g| {
            let mut slot = slots[g]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (h, out) = &mut *slot;
            *out = step_dispatch(rows, plan, g, h);
        });
        slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .1
            })
            .collect()
    } else {
        state
            .chunks_exact_mut(d * d)
            .take(n)
            .enumerate()
            .map(|(g, h)| step_dispatch(rows, plan, g, h))
            .collect()
    };
    Outputs {
        chunk: 1,
        dim: d,
        chunks_per_window: 1,
        groups: plan.groups.len(),
        blocks: vec![block],
        member,
    }
}

fn step_dispatch<R: ChunkRows>(rows: &R, plan: &Plan<'_>, g: usize, h: &mut [f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `solve_dispatch`.
        return unsafe { step_avx2(rows, plan, g, h) };
    }
    step_group::<false, R>(rows, plan, g, h)
}

/// The AVX2 + FMA instantiation of its portable twin.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn step_avx2<R: ChunkRows>(rows: &R, plan: &Plan<'_>, g: usize, h: &mut [f32]) -> Vec<f32> {
    step_group::<true, R>(rows, plan, g, h)
}

/// [`step`] for group `g` with state `h`: the outputs `[member, 1, D]`.
#[inline(always)]
fn step_group<const F: bool, R: ChunkRows>(
    rows: &R,
    plan: &Plan<'_>,
    g: usize,
    h: &mut [f32],
) -> Vec<f32> {
    let (d, n) = (plan.dim, plan.order);
    let members = &plan.groups[g];
    let r = n + members.len();
    // One scratch allocation: A = [w_0 … w_{n−1}; q of every member] (`r` rows), then `u`
    // (`n` rows, `v` until solved), `k`, `α`, `β` (`n` rows each), P (`r` rows) and the two
    // corrected rows `u'_0`, `u'_1`.
    let mut buf = vec![0f32; (2 * r + 4 * n + 2) * d];
    let (a, rest) = buf.split_at_mut(r * d);
    let (uu, rest) = rest.split_at_mut(n * d);
    let (kk, rest) = rest.split_at_mut(n * d);
    let (alpha, rest) = rest.split_at_mut(n * d);
    let (beta, rest) = rest.split_at_mut(n * d);
    let (p, ups) = rest.split_at_mut(r * d);
    let (up0, up1) = ups.split_at_mut(d);
    let (ww, qq) = a.split_at_mut(n * d);
    rows.kvab(g, 0, kk, uu, alpha, beta);
    // The chunk's solve at N = n (module doc): `[w | u] = (I − A)⁻¹ [kβ | vβ]`, i.e. row 0 is
    // `[kβ_0 | vβ_0]` and row 1 subtracts `(kβ_1·k_0)` times row 0.
    for i in 0..n {
        let r = i * d..(i + 1) * d;
        for (((w, u), &k), &b) in ww[r.clone()]
            .iter_mut()
            .zip(&mut uu[r.clone()])
            .zip(&kk[r.clone()])
            .zip(&beta[r])
        {
            *w = k * b;
            *u *= b;
        }
    }
    if n == 2 {
        let g10 = dot::<F>(&ww[d..], &kk[..d]);
        let (w0, w1) = ww.split_at_mut(d);
        let (u0, u1) = uu.split_at_mut(d);
        axpy::<F>(w1, -g10, w0);
        axpy::<F>(u1, -g10, u0);
    }
    for (mi, &head) in members.iter().enumerate() {
        rows.q_last(head, 0, &mut qq[mi * d..(mi + 1) * d]);
    }
    // P = A·h: P_w and P_q in one pass over the state.
    gemm::<F>(r, d, d, a, d, h, d, p, d, 1.0, false);
    let (a, p, alpha) = (&*a, &*p, &*alpha);
    let w = |i: usize| &a[i * d..(i + 1) * d];
    let u = |i: usize| &uu[i * d..(i + 1) * d];
    let al = |i: usize| &alpha[i * d..(i + 1) * d];
    let mut out = vec![0f32; members.len() * d];
    let (pw0, pq_all) = p.split_at(n * d);
    let q_all = &a[n * d..];
    for ((o, &u0), &pw) in up0.iter_mut().zip(u(0)).zip(&pw0[..d]) {
        *o = u0 - pw;
    }
    let up0 = &*up0;
    let (w0, a0) = (w(0), al(0));
    if n == 1 {
        for ((o, q), pq) in out
            .chunks_exact_mut(d)
            .zip(q_all.chunks_exact(d))
            .zip(pq_all.chunks_exact(d))
        {
            for (((o, &q), &pq), &u0) in o.iter_mut().zip(q).zip(pq).zip(up0) {
                *o = pq + q * u0;
            }
        }
        for (row, &w0d) in h.chunks_exact_mut(d).zip(w0) {
            for ((x, &a0), &u0) in row.iter_mut().zip(a0).zip(up0) {
                *x = *x * a0 + w0d * u0;
            }
        }
    } else {
        let (w1, a1) = (w(1), al(1));
        let w0w1 = dot::<F>(w0, w1);
        for ((((o, &u1), &pw1), &a0), &u0) in
            up1.iter_mut().zip(u(1)).zip(&pw0[d..]).zip(a0).zip(up0)
        {
            *o = u1 - (a0 * pw1 + u0 * w0w1);
        }
        let up1 = &*up1;
        for ((o, q), pq) in out
            .chunks_exact_mut(d)
            .zip(q_all.chunks_exact(d))
            .zip(pq_all.chunks_exact(d))
        {
            let w0q = dot::<F>(w0, q);
            for (((((o, &q), &pq), &a0), &u0), &u1) in
                o.iter_mut().zip(q).zip(pq).zip(a0).zip(up0).zip(up1)
            {
                *o = a0 * pq + u0 * w0q + q * u1;
            }
        }
        for ((row, &w0d), &w1d) in h.chunks_exact_mut(d).zip(w0).zip(w1) {
            for ((((x, &a0), &a1), &u0), &u1) in row.iter_mut().zip(a0).zip(a1).zip(up0).zip(up1) {
                *x = (*x * a0 + w0d * u0) * a1 + w1d * u1;
            }
        }
    }
    if !plan.linear {
        gelu_rows(h, d);
    }
    out
}

fn map_tasks<T: Send>(n: usize, par: bool, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if par && n > 1 {
        (0..n).into_par_iter().map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}

/// Phase 1 of one (group, chunk): `[W | U]` (`[N, 2D]`) and `α` (`[N, D]`).
struct Solved {
    wu: Vec<f32>,
    alpha: Vec<f32>,
}

fn solve_dispatch<R: ChunkRows>(rows: &R, plan: &Plan<'_>, g: usize, c: usize) -> Solved {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features `solve_avx2` is compiled for were detected just above.
        return unsafe { solve_avx2(rows, plan, g, c) };
    }
    solve::<false, R>(rows, plan, g, c)
}

/// The AVX2 + FMA instantiation of its portable twin.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn solve_avx2<R: ChunkRows>(rows: &R, plan: &Plan<'_>, g: usize, c: usize) -> Solved {
    solve::<true, R>(rows, plan, g, c)
}

fn chain_dispatch(plan: &Plan<'_>, solved: &[Solved], h: &mut [f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `solve_dispatch`.
        return unsafe { chain_avx2(plan, solved, h) };
    }
    chain::<false>(plan, solved, h)
}

/// The AVX2 + FMA instantiation of its portable twin.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chain_avx2(plan: &Plan<'_>, solved: &[Solved], h: &mut [f32]) -> Vec<f32> {
    chain::<true>(plan, solved, h)
}

fn outputs_dispatch<R: ChunkRows>(
    rows: &R,
    plan: &Plan<'_>,
    g: usize,
    c: usize,
    sol: &Solved,
    h0: &[f32],
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as in `solve_dispatch`.
        return unsafe { outputs_avx2(rows, plan, g, c, sol, h0) };
    }
    outputs::<false, R>(rows, plan, g, c, sol, h0)
}

/// The AVX2 + FMA instantiation of its portable twin.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn outputs_avx2<R: ChunkRows>(
    rows: &R,
    plan: &Plan<'_>,
    g: usize,
    c: usize,
    sol: &Solved,
    h0: &[f32],
) -> Vec<f32> {
    outputs::<true, R>(rows, plan, g, c, sol, h0)
}

/// Rows per block of the forward substitution (a multiple of the micro-kernel's 6 rows).
const SOLVE_BLOCK: usize = 24;

/// Phase 1 (module doc): build the rows of chunk `c` of group `g` and solve for `W`, `U`.
#[inline(always)]
fn solve<const F: bool, R: ChunkRows>(rows: &R, plan: &Plan<'_>, g: usize, c: usize) -> Solved {
    let (d, big_n) = (plan.dim, plan.chunk * plan.order);
    let d2 = 2 * d;
    let mut k = vec![0f32; big_n * d];
    let mut v = vec![0f32; big_n * d];
    let mut alpha = vec![0f32; big_n * d];
    let mut beta = vec![0f32; big_n * d];
    rows.kvab(g, c, &mut k, &mut v, &mut alpha, &mut beta);
    // X = [kβ | vβ], solved in place into [W | U].
    let mut x = vec![0f32; big_n * d2];
    for i in 0..big_n {
        let r = i * d..(i + 1) * d;
        let (kb, vb) = x[i * d2..(i + 1) * d2].split_at_mut(d);
        for (((kb, vb), (&ke, &ve)), &be) in kb
            .iter_mut()
            .zip(vb.iter_mut())
            .zip(k[r.clone()].iter().zip(&v[r.clone()]))
            .zip(&beta[r])
        {
            *kb = ke * be;
            *vb = ve * be;
        }
    }
    // Kᵀ (`[D, N]`), the right operand of G = kβ·Kᵀ.
    let mut kt = vec![0f32; d * big_n];
    for (m, km) in k.chunks_exact(d).enumerate() {
        for (e, &x) in km.iter().enumerate() {
            kt[e * big_n + m] = x;
        }
    }
    drop((k, v, beta));
    let mut gm = vec![0f32; big_n * big_n];
    for j0 in (0..big_n).step_by(SOLVE_BLOCK) {
        let j1 = (j0 + SOLVE_BLOCK).min(big_n);
        // G[J, m] for m < j1 (rounded up to whole micro-kernel columns): kβ rows of J are still
        // untouched here, the solve below only rewrites rows < j1 from this block on.
        let cols = j1.div_ceil(NR).saturating_mul(NR).min(big_n);
        gemm::<F>(
            j1 - j0,
            cols,
            d,
            &x[j0 * d2..],
            d2,
            &kt,
            big_n,
            &mut gm[j0 * big_n..],
            big_n,
            1.0,
            false,
        );
        let (done, rest) = x.split_at_mut(j0 * d2);
        // X_J −= G[J, <J]·X[<J]
        if j0 > 0 {
            gemm::<F>(
                j1 - j0,
                d2,
                j0,
                &gm[j0 * big_n..],
                big_n,
                done,
                d2,
                rest,
                d2,
                -1.0,
                true,
            );
        }
        // Inside the block: X_i −= G[i, m]·X_m for j0 ≤ m < i, in row order.
        for i in j0 + 1..j1 {
            let (before, xi) = rest.split_at_mut((i - j0) * d2);
            let xi = &mut xi[..d2];
            for m in j0..i {
                axpy::<F>(
                    xi,
                    -gm[i * big_n + m],
                    &before[(m - j0) * d2..(m - j0 + 1) * d2],
                );
            }
        }
    }
    Solved { wu: x, alpha }
}

/// Phase 2 (module doc): walk `h` over the chunks of `solved`, returning every chunk's initial
/// state (`[chunks, D, D]`); `h` ends as the state after the last one.
#[inline(always)]
fn chain<const F: bool>(plan: &Plan<'_>, solved: &[Solved], h: &mut [f32]) -> Vec<f32> {
    let (d, n, big_n) = (plan.dim, plan.order, plan.chunk * plan.order);
    let d2 = 2 * d;
    let mut h0s = Vec::with_capacity(solved.len() * d * d);
    let mut pw = vec![0f32; n * d];
    let mut up0 = vec![0f32; d];
    let mut up1 = vec![0f32; d];
    for sol in solved {
        h0s.extend_from_slice(h);
        // P_w of the last token's rows.
        let last = big_n - n;
        gemm::<F>(
            n,
            d,
            d,
            &sol.wu[last * d2..],
            d2,
            h,
            d,
            &mut pw,
            d,
            1.0,
            false,
        );
        let w = |i: usize| &sol.wu[(last + i) * d2..(last + i) * d2 + d];
        let u = |i: usize| &sol.wu[(last + i) * d2 + d..(last + i + 1) * d2];
        let a = |i: usize| &sol.alpha[(last + i) * d..(last + i + 1) * d];
        if n == 1 {
            let (w0, u0, a0) = (w(0), u(0), a(0));
            for e in 0..d {
                up0[e] = u0[e] - pw[e];
            }
            for (dd, row) in h.chunks_exact_mut(d).enumerate() {
                for e in 0..d {
                    row[e] = row[e] * a0[e] + w0[dd] * up0[e];
                }
            }
        } else {
            let (w0, w1, u0, u1, a0, a1) = (w(0), w(1), u(0), u(1), a(0), a(1));
            let w0w1 = dot::<F>(w0, w1);
            for e in 0..d {
                up0[e] = u0[e] - pw[e];
                up1[e] = u1[e] - (a0[e] * pw[d + e] + up0[e] * w0w1);
            }
            for (dd, row) in h.chunks_exact_mut(d).enumerate() {
                for e in 0..d {
                    row[e] = (row[e] * a0[e] + w0[dd] * up0[e]) * a1[e] + w1[dd] * up1[e];
                }
            }
        }
        if !plan.linear {
            gelu_rows(h, d);
        }
    }
    h0s
}

/// Phase 3 (module doc): the outputs of chunk `c` for every head of group `g`, `[member, C, D]`.
#[inline(always)]
fn outputs<const F: bool, R: ChunkRows>(
    rows: &R,
    plan: &Plan<'_>,
    g: usize,
    c: usize,
    sol: &Solved,
    h0: &[f32],
) -> Vec<f32> {
    let (d, n, cc) = (plan.dim, plan.order, plan.chunk);
    let (big_n, d2) = (cc * n, 2 * d);
    // P_w = W·h0, then u' in place of P_w.
    let mut up = vec![0f32; big_n * d];
    gemm::<F>(big_n, d, d, &sol.wu, d2, h0, d, &mut up, d, 1.0, false);
    for tok in 0..cc {
        let i0 = tok * n;
        for e in 0..d {
            up[i0 * d + e] = sol.wu[i0 * d2 + d + e] - up[i0 * d + e];
        }
        if n == 2 {
            let i1 = i0 + 1;
            let wr = |i: usize| &sol.wu[i * d2..i * d2 + d];
            let w0w1 = dot::<F>(wr(i0), wr(i1));
            let (first, second) = up.split_at_mut(i1 * d);
            let (up0, up1) = (&first[i0 * d..], &mut second[..d]);
            let a0 = &sol.alpha[i0 * d..(i0 + 1) * d];
            let u1 = &sol.wu[i1 * d2 + d..(i1 + 1) * d2];
            for e in 0..d {
                up1[e] = u1[e] - (a0[e] * up1[e] + up0[e] * w0w1);
            }
        }
    }
    let members = plan.groups[g].len();
    let mut out = vec![0f32; members * cc * d];
    let mut q = vec![0f32; cc * d];
    let mut pq = vec![0f32; cc * d];
    for (mi, &head) in plan.groups[g].iter().enumerate() {
        rows.q_last(head, c, &mut q);
        gemm::<F>(cc, d, d, &q, d, h0, d, &mut pq, d, 1.0, false);
        for tok in 0..cc {
            let o = &mut out[(mi * cc + tok) * d..(mi * cc + tok + 1) * d];
            let (qt, pqt) = (&q[tok * d..(tok + 1) * d], &pq[tok * d..(tok + 1) * d]);
            if n == 1 {
                let u = &up[tok * d..(tok + 1) * d];
                for e in 0..d {
                    o[e] = pqt[e] + qt[e] * u[e];
                }
            } else {
                let (i0, i1) = (tok * 2, tok * 2 + 1);
                let w0q1 = dot::<F>(&sol.wu[i0 * d2..i0 * d2 + d], qt);
                let (up0, up1) = (&up[i0 * d..(i0 + 1) * d], &up[i1 * d..(i1 + 1) * d]);
                let a0 = &sol.alpha[i0 * d..(i0 + 1) * d];
                for e in 0..d {
                    o[e] = a0[e] * pqt[e] + up0[e] * w0q1 + qt[e] * up1[e];
                }
            }
        }
    }
    out
}
