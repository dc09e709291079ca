//! [`ScanImpl::Naive`](super::ScanImpl::Naive): the literal order of SPEC §4 — every processed
//! and virtual row of the call materialised, then [`naive::scan`](super::naive::scan).

use super::prepare::*;
use super::{chunk_size, scan, LinearCarry, LinearShape, PrevToken, ScanImpl, ScanInput};

/// The literal order of SPEC §4: all processed values, all virtual rows, then [`super::naive::scan`].
pub(super) fn forward_expanded(
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
                p.alpha[dst + e] = gate_value(rc.alpha_gate, false, fg[e], wg[e]);
                p.beta[dst + e] = gate_value(rc.beta_gate, true, fg[e], wg[e]);
            }
            l2norm(&mut p.q[dst..dst + d]);
            l2norm(&mut p.k[dst..dst + d]);
        }
    }

    // §4.4/4.5 virtual tokens; the buffer (if any) is the row before token 0.
    let n = rc.order;
    let prev = carry.prev.take();
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
        trick_for(&rc, rc.alpha_gate),
    );
    let beta = expand(
        &p.beta,
        prev.as_ref().map(|b| b.beta.as_slice()),
        h_n,
        s,
        d,
        n,
        trick_for(&rc, rc.beta_gate),
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
    carry.push_pool_rows(k_raw, v_raw, fkv);

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
        rms_normalise(row);
    }
    out
}
