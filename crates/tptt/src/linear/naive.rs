//! The naive reference of the chunked delta-product scan: literal loops in f32 that mirror
//! SPEC §4.7–4.8 line by line (explicit `A`, forward-substitution `T = (I − A)⁻¹`, `W = T·kβ`,
//! `U = T·vβ`, then every token of a chunk walking its own copy of the chunk's initial state).
//! It is the specification the fast path in [`super::fast`] is tested against; always compiled.

use super::{gelu_rows, ScanInput};

/// Run the scan for every head. `state` is `[H, D, D]` (rows: key dim, columns: value dim), read
/// as the initial state and overwritten with the final one. Returns `[H, S, D]`, the output of
/// the last virtual step of every token.
pub fn scan(inp: &ScanInput<'_>, state: &mut [f32]) -> Vec<f32> {
    let (h_n, d, s, n, c) = (inp.heads, inp.dim, inp.tokens, inp.order, inp.chunk);
    let rows = s * n;
    let big_n = c * n; // rows per chunk
    let mut out = vec![0f32; h_n * s * d];
    for h in 0..h_n {
        let at = |x: &[f32], r: usize, e: usize| x[(h * rows + r) * d + e];
        let h0 = &mut state[h * d * d..(h + 1) * d * d];
        for chunk in 0..s / c {
            let r0 = chunk * big_n;
            // kβ, vβ  [N, D]
            let mut kb = vec![0f32; big_n * d];
            let mut vb = vec![0f32; big_n * d];
            for i in 0..big_n {
                for e in 0..d {
                    kb[i * d + e] = at(inp.k, r0 + i, e) * at(inp.beta, r0 + i, e);
                    vb[i * d + e] = at(inp.v, r0 + i, e) * at(inp.beta, r0 + i, e);
                }
            }
            // A[i,m] = −(kβ_i · k_m) for m < i
            let mut t = vec![0f32; big_n * big_n];
            for i in 0..big_n {
                for m in 0..i {
                    let mut dot = 0f32;
                    for e in 0..d {
                        dot += kb[i * d + e] * at(inp.k, r0 + m, e);
                    }
                    t[i * big_n + m] = -dot;
                }
            }
            // T[i, :i] = A[i, :i] + Σ_m A[i, m]·T[m, :i]  (row i still holds A's row i)
            for i in 1..big_n {
                let row_i: Vec<f32> = t[i * big_n..(i + 1) * big_n].to_vec();
                for j in 0..i {
                    let mut acc = 0f32;
                    for m in 0..big_n {
                        acc += row_i[m] * t[m * big_n + j];
                    }
                    t[i * big_n + j] = row_i[j] + acc;
                }
            }
            for i in 0..big_n {
                t[i * big_n + i] += 1.0;
            }
            // W = T·kβ, U = T·vβ
            let mut w = vec![0f32; big_n * d];
            let mut u = vec![0f32; big_n * d];
            for i in 0..big_n {
                for m in 0..big_n {
                    let tim = t[i * big_n + m];
                    for e in 0..d {
                        w[i * d + e] += tim * kb[m * d + e];
                        u[i * d + e] += tim * vb[m * d + e];
                    }
                }
            }
            // Per-token states, each starting from the chunk's h0.
            let mut last_state = h0.to_vec();
            for tok in 0..c {
                let mut sc = h0.to_vec();
                for j in 0..n {
                    let i = tok * n + j;
                    let q = |e: usize| at(inp.q, r0 + i, e);
                    let a = |e: usize| at(inp.alpha, r0 + i, e);
                    // u' = u − Scᵀ w
                    let mut up = vec![0f32; d];
                    for e in 0..d {
                        let mut acc = 0f32;
                        for dd in 0..d {
                            acc += w[i * d + dd] * sc[dd * d + e];
                        }
                        up[e] = u[i * d + e] - acc;
                    }
                    // o = Scᵀ q + q ⊙ u'
                    if j == n - 1 {
                        for e in 0..d {
                            let mut acc = 0f32;
                            for dd in 0..d {
                                acc += q(dd) * sc[dd * d + e];
                            }
                            out[(h * s + chunk * c + tok) * d + e] = acc + q(e) * up[e];
                        }
                    }
                    // Sc = Sc·diag(α) + w ⊗ u'
                    for dd in 0..d {
                        for e in 0..d {
                            sc[dd * d + e] = sc[dd * d + e] * a(e) + w[i * d + dd] * up[e];
                        }
                    }
                }
                if tok == c - 1 {
                    last_state = sc;
                }
            }
            h0.copy_from_slice(&last_state);
            if !inp.linear {
                gelu_rows(h0, d);
            }
        }
    }
    out
}
