//! The fast scan: the same mathematics as [`super::naive`], reorganised so that nothing copies a
//! `D×D` state per token.
//!
//! Per head and chunk (N = C·n rows):
//! * `W = (I − A)⁻¹ kβ` and `U = (I − A)⁻¹ vβ` by one forward substitution each
//!   (`W_i = kβ_i + Σ_{m<i} A[i,m] W_m`), instead of forming `T` (N²D, not N³).
//! * Every token starts from the chunk's `h0`, so its reads of the state are products with `h0`:
//!   `P_w = W·h0` (all rows) and `P_q = Q·h0` (rows of the last virtual step).
//! * Order 1: `u' = u − P_w`, `o = P_q + q ⊙ u'`.
//! * Order 2 (token rows r0, r1): `S1 = h0·diag(α0) + w0⊗u0'` gives
//!   `S1ᵀx = α0 ⊙ (h0ᵀx) + u0'·(w0·x)`, so
//!   `u1' = u1 − α0 ⊙ P_w[r1] − u0'·(w0·w1)` and `o1 = α0 ⊙ P_q[r1] + u0'·(w0·q1) + q1 ⊙ u1'`.
//! * The chunk's final state is the last token's: `h0 ← h0·diag(α…) + Σ w⊗u'` in one pass.
//!
//! Heads run in parallel (rayon); each head's loops are over contiguous `D`-vectors, compiled
//! twice (baseline and AVX2 + FMA, picked at run time).

use rayon::prelude::*;

use super::{gelu_rows, ScanInput};

/// Dot product with 8 independent accumulators, so that it vectorises (a single f32 sum is a
/// serial dependency chain the compiler may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// `y += a·x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `out[e] = Σ_d x[d]·m[d, e]` for a row-major `D×D` matrix `m`.
#[inline(always)]
fn vec_mat(x: &[f32], m: &[f32], d: usize, out: &mut [f32]) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for (&xd, row) in x.iter().zip(m.chunks_exact(d)) {
        axpy(out, xd, row);
    }
}

/// See the module doc. Same contract as [`super::naive::scan`].
pub fn scan(inp: &ScanInput<'_>, state: &mut [f32]) -> Vec<f32> {
    let (h_n, d, s) = (inp.heads, inp.dim, inp.tokens);
    let mut out = vec![0f32; h_n * s * d];
    let work = |(h, (h0, out_h)): (usize, (&mut [f32], &mut [f32]))| scan_head_dispatch(inp, h, h0, out_h);
    if h_n > 1 && s * d * d > 4096 {
        state
            .par_chunks_mut(d * d)
            .zip(out.par_chunks_mut(s * d))
            .enumerate()
            .for_each(work);
    } else {
        state.chunks_mut(d * d).zip(out.chunks_mut(s * d)).enumerate().for_each(work);
    }
    out
}

/// Run [`scan_head`] compiled for AVX2 + FMA when the CPU has them (checked at run time, so the
/// binary still runs on older x86-64 CPUs), else for the baseline target.
fn scan_head_dispatch(inp: &ScanInput<'_>, h: usize, h0: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features `scan_head_avx2` is compiled for were detected just above.
            unsafe { scan_head_avx2(inp, h, h0, out) };
            return;
        }
    }
    scan_head(inp, h, h0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_head_avx2(inp: &ScanInput<'_>, h: usize, h0: &mut [f32], out: &mut [f32]) {
    scan_head(inp, h, h0, out);
}

#[inline(always)]
fn scan_head(inp: &ScanInput<'_>, h: usize, h0: &mut [f32], out: &mut [f32]) {
    let (d, s, n, c) = (inp.dim, inp.tokens, inp.order, inp.chunk);
    let rows = s * n;
    let big_n = c * n;
    let base = h * rows * d;
    let (q_all, k_all, v_all) = (&inp.q[base..base + rows * d], &inp.k[base..base + rows * d], &inp.v[base..base + rows * d]);
    let (a_all, b_all) = (&inp.alpha[base..base + rows * d], &inp.beta[base..base + rows * d]);

    let mut kb = vec![0f32; big_n * d];
    let mut w = vec![0f32; big_n * d];
    let mut u = vec![0f32; big_n * d];
    let mut a_mat = vec![0f32; big_n * big_n];
    let mut pw = vec![0f32; big_n * d];
    let mut pq = vec![0f32; d];
    let mut up0 = vec![0f32; d];
    let mut up1 = vec![0f32; d];
    for chunk in 0..s / c {
        let r0 = chunk * big_n;
        let rng = r0 * d..(r0 + big_n) * d;
        let (q, k, v, alpha, beta) = (&q_all[rng.clone()], &k_all[rng.clone()], &v_all[rng.clone()], &a_all[rng.clone()], &b_all[rng]);
        // kβ into kb, vβ into u (solved in place below)
        for i in 0..big_n * d {
            kb[i] = k[i] * beta[i];
            u[i] = v[i] * beta[i];
        }
        w.copy_from_slice(&kb);
        // A[i,m] = −(kβ_i · k_m), m < i
        for i in 1..big_n {
            let kbi = &kb[i * d..(i + 1) * d];
            for m in 0..i {
                a_mat[i * big_n + m] = -dot(kbi, &k[m * d..(m + 1) * d]);
            }
        }
        // Forward substitution: X_i += Σ_{m<i} A[i,m] X_m, for X = W and U.
        for i in 1..big_n {
            let (done_w, rest_w) = w.split_at_mut(i * d);
            let (done_u, rest_u) = u.split_at_mut(i * d);
            let (wi, ui) = (&mut rest_w[..d], &mut rest_u[..d]);
            for m in 0..i {
                let aim = a_mat[i * big_n + m];
                axpy(wi, aim, &done_w[m * d..(m + 1) * d]);
                axpy(ui, aim, &done_u[m * d..(m + 1) * d]);
            }
        }
        // P_w = W·h0
        for i in 0..big_n {
            vec_mat(&w[i * d..(i + 1) * d], h0, d, &mut pw[i * d..(i + 1) * d]);
        }
        for tok in 0..c {
            let o = &mut out[(chunk * c + tok) * d..(chunk * c + tok + 1) * d];
            if n == 1 {
                let i = tok;
                let qi = &q[i * d..(i + 1) * d];
                vec_mat(qi, h0, d, &mut pq);
                for e in 0..d {
                    up0[e] = u[i * d + e] - pw[i * d + e];
                    o[e] = pq[e] + qi[e] * up0[e];
                }
            } else {
                let (i0, i1) = (tok * 2, tok * 2 + 1);
                for e in 0..d {
                    up0[e] = u[i0 * d + e] - pw[i0 * d + e];
                }
                let w0 = &w[i0 * d..(i0 + 1) * d];
                let w1 = &w[i1 * d..(i1 + 1) * d];
                let q1 = &q[i1 * d..(i1 + 1) * d];
                let a0 = &alpha[i0 * d..(i0 + 1) * d];
                let w0w1 = dot(w0, w1);
                let w0q1 = dot(w0, q1);
                vec_mat(q1, h0, d, &mut pq);
                for e in 0..d {
                    up1[e] = u[i1 * d + e] - (a0[e] * pw[i1 * d + e] + up0[e] * w0w1);
                    o[e] = a0[e] * pq[e] + up0[e] * w0q1 + q1[e] * up1[e];
                }
            }
        }
        // The chunk's final state is the last token's.
        let last = c - 1;
        if n == 1 {
            let i = last;
            let (wi, ai) = (&w[i * d..(i + 1) * d], &alpha[i * d..(i + 1) * d]);
            for e in 0..d {
                up0[e] = u[i * d + e] - pw[i * d + e];
            }
            for dd in 0..d {
                let row = &mut h0[dd * d..(dd + 1) * d];
                for e in 0..d {
                    row[e] = row[e] * ai[e] + wi[dd] * up0[e];
                }
            }
        } else {
            let (i0, i1) = (last * 2, last * 2 + 1);
            let (w0, w1) = (&w[i0 * d..(i0 + 1) * d], &w[i1 * d..(i1 + 1) * d]);
            let (a0, a1) = (&alpha[i0 * d..(i0 + 1) * d], &alpha[i1 * d..(i1 + 1) * d]);
            let w0w1 = dot(w0, w1);
            for e in 0..d {
                up0[e] = u[i0 * d + e] - pw[i0 * d + e];
                up1[e] = u[i1 * d + e] - (a0[e] * pw[i1 * d + e] + up0[e] * w0w1);
            }
            for dd in 0..d {
                let row = &mut h0[dd * d..(dd + 1) * d];
                for e in 0..d {
                    row[e] = (row[e] * a0[e] + w0[dd] * up0[e]) * a1[e] + w1[dd] * up1[e];
                }
            }
        }
        if !inp.linear {
            gelu_rows(h0, d);
        }
    }
}
