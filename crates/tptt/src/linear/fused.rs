//! [`ScanImpl::Fast`](super::ScanImpl::Fast): the processed and virtual rows made per chunk
//! inside the fast scan ([`super::fast`]), the heads sharing a kv head sharing the key-side
//! work.

use super::prepare::*;
use super::{chunk_size, fast, LinearCarry, LinearShape, PrevToken};
use crate::config::{Gate, RecurrentConfig, Trick};

/// The processed values of one token for one kv head (SPEC §4.2–4.3), `D` each: views into
/// one scratch buffer of [`KvRow::LEN`] rows (a decode step makes a few of these per kv head
/// and layer; one allocation each instead of six).
pub(super) struct KvRow<'a> {
    k: &'a mut [f32],
    v: &'a mut [f32],
    alpha: &'a mut [f32],
    beta: &'a mut [f32],
    /// Scratch: the `k` and `v` gates.
    fg: &'a mut [f32],
    wg: &'a mut [f32],
}

impl<'a> KvRow<'a> {
    /// Rows of `D` a [`KvRow`] takes.
    const LEN: usize = 6;

    /// The row over the first `LEN·d` values of `buf`.
    fn of(buf: &'a mut [f32], d: usize) -> Self {
        let (k, rest) = buf.split_at_mut(d);
        let (v, rest) = rest.split_at_mut(d);
        let (alpha, rest) = rest.split_at_mut(d);
        let (beta, rest) = rest.split_at_mut(d);
        let (fg, rest) = rest.split_at_mut(d);
        let (wg, _) = rest.split_at_mut(d);
        Self {
            k,
            v,
            alpha,
            beta,
            fg,
            wg,
        }
    }
}

/// The rows of [`fast::run`] computed on the fly from the raw projections: gates, pooling, SiLU,
/// L2 norms and virtual tokens per chunk, so no `[H, S·n, D]` array is ever built, and the
/// key-side rows of a kv head only once for all the query heads of its group.
pub(super) struct Fused<'a> {
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
    /// The carried previous token (order 2), held here for the call: its buffers take the
    /// next one afterwards.
    prev: Option<PrevToken>,
    /// Per key group: its kv head and the query head whose carried values it uses.
    groups: Vec<(usize, usize)>,
}

impl<'a> Fused<'a> {
    /// Token `t`'s processed query for head `h` (`t = -1`: the carried one, or zeros).
    #[inline(always)]
    fn proc_q(&self, t: isize, h: usize, out: &mut [f32]) {
        let d = self.d;
        if t < 0 {
            match &self.prev {
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
    fn proc_kv(&self, t: isize, kvh: usize, rep: usize, out: &mut KvRow<'_>) {
        let d = self.d;
        if t < 0 {
            match &self.prev {
                Some(p) => {
                    let r = rep * d..(rep + 1) * d;
                    out.k.copy_from_slice(&p.k[r.clone()]);
                    out.v.copy_from_slice(&p.v[r.clone()]);
                    out.alpha.copy_from_slice(&p.alpha[r.clone()]);
                    out.beta.copy_from_slice(&p.beta[r]);
                }
                None => {
                    for x in [&mut *out.k, &mut *out.v, &mut *out.alpha, &mut *out.beta] {
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
        l2norm(out.k);
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
            pooled(window(self.k_raw, self.pool_k), out.fg);
        }
        if uses(Gate::V) {
            pooled(window(self.v_raw, self.pool_v), out.wg);
        }
        for e in 0..d {
            let (fg, wg) = (out.fg[e], out.wg[e]);
            out.alpha[e] = gate_value(self.rc.alpha_gate, false, fg, wg);
            out.beta[e] = gate_value(self.rc.beta_gate, true, fg, wg);
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
            let mut buf = vec![0f32; KvRow::LEN * d];
            let mut cur = KvRow::of(&mut buf, d);
            for tok in 0..c {
                self.proc_kv(t0 + tok as isize, kvh, rep, &mut cur);
                let r = tok * d..(tok + 1) * d;
                k[r.clone()].copy_from_slice(cur.k);
                v[r.clone()].copy_from_slice(cur.v);
                alpha[r.clone()].copy_from_slice(cur.alpha);
                beta[r].copy_from_slice(cur.beta);
            }
            return;
        }
        let mut buf = vec![0f32; 2 * KvRow::LEN * d];
        let (a, b) = buf.split_at_mut(KvRow::LEN * d);
        let (mut cur, mut before) = (KvRow::of(a, d), KvRow::of(b, d));
        self.proc_kv(t0 - 1, kvh, rep, &mut before);
        for tok in 0..c {
            self.proc_kv(t0 + tok as isize, kvh, rep, &mut cur);
            let pair = |x: &mut [f32], cur: &[f32], before: &[f32], trick: Trick| {
                let (v0, v1) = x[2 * tok * d..(2 * tok + 2) * d].split_at_mut(d);
                virtual_pair(trick, cur, before, v0, v1);
            };
            pair(k, cur.k, before.k, self.rc.trick);
            pair(v, cur.v, before.v, self.rc.trick);
            pair(
                alpha,
                cur.alpha,
                before.alpha,
                trick_for(&self.rc, self.rc.alpha_gate),
            );
            pair(
                beta,
                cur.beta,
                before.beta,
                trick_for(&self.rc, self.rc.beta_gate),
            );
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
        let mut buf = vec![0f32; 2 * d];
        let (mut cur, mut before) = buf.split_at_mut(d);
        self.proc_q(t0 - 1, head, before);
        for (tok, row) in q.chunks_exact_mut(d).enumerate() {
            self.proc_q(t0 + tok as isize, head, cur);
            virtual_second(self.rc.trick, cur, before, row);
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
pub(super) fn forward_fused(
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
        prev,
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

    // The next call's order-2 buffer: the last token, processed, per head (written over the
    // buffers of the one this call read, once the rows no longer read it).
    let mut rows = rows;
    let prev = rows.prev.take();
    let next_prev = (n > 1).then(|| {
        let t = s as isize - 1;
        let mut p = prev
            .filter(|p| {
                [&p.q, &p.k, &p.v, &p.alpha, &p.beta]
                    .iter()
                    .all(|x| x.len() == h_n * d)
            })
            .unwrap_or_else(|| PrevToken {
                q: vec![0f32; h_n * d],
                k: vec![0f32; h_n * d],
                v: vec![0f32; h_n * d],
                alpha: vec![0f32; h_n * d],
                beta: vec![0f32; h_n * d],
            });
        let mut kv_buf = vec![0f32; KvRow::LEN * d];
        let mut kv = KvRow::of(&mut kv_buf, d);
        for h in 0..h_n {
            let r = h * d..(h + 1) * d;
            rows.proc_q(t, h, &mut p.q[r.clone()]);
            // A real token's key-side rows only depend on its kv head: made once per group.
            if h % g == 0 {
                rows.proc_kv(t, h / g, h, &mut kv);
            }
            p.k[r.clone()].copy_from_slice(kv.k);
            p.v[r.clone()].copy_from_slice(kv.v);
            p.alpha[r.clone()].copy_from_slice(kv.alpha);
            p.beta[r].copy_from_slice(kv.beta);
        }
        p
    });
    carry.prev = next_prev;
    carry.push_pool_rows(k_raw, v_raw, fkv);

    // §4.9 merge heads and RMS-normalise each token over H·D (no weight).
    let hd = h_n * d;
    let mut out = vec![0f32; s * hd];
    let merge = |(t, row): (usize, &mut [f32])| {
        for h in 0..h_n {
            row[h * d..(h + 1) * d].copy_from_slice(y.row(h, t));
        }
        rms_normalise(row);
    };
    if s >= 64 {
        use rayon::prelude::*;
        out.par_chunks_mut(hd).enumerate().for_each(merge);
    } else {
        out.chunks_mut(hd).enumerate().for_each(merge);
    }
    out
}
