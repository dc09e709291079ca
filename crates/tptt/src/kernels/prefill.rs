//! Softmax attention of a block of query tokens (a prompt, or a block of one) over keys read in
//! place: the cached KV ring and the block's own new keys, with no concatenation and no
//! `[queries, keys]` score matrix.
//!
//! Flash-attention on the CPU: per task (KV head, block of [`Q_BLOCK`] query tokens), the
//! block's `G` query heads of that KV head form `Q_BLOCK·G` rows; keys go by in blocks of
//! [`K_BLOCK`]: scores `Q·Kᵀ` by the linear branch's register-blocked product, the mask, an
//! online softmax (running max and sum per row, earlier output rescaled when the max grows),
//! then `O += P·V` by the same product. Key blocks no query of the task can see (in the future
//! of all of them, or out of their window) are skipped, so a causal prompt does about half the
//! work. Tasks run in parallel on the rayon pool. A short prompt over a long cache (a message
//! sent after restoring a long chat) has fewer tasks than the pool has threads to keep busy: its
//! keys are then split into contiguous ranges, one task each, whose partial results (running max,
//! sum and unnormalized output per row) are merged at the end — flash-decoding's split-K.
//!
//! [`attend_many_naive`] is the literal definition (scores, mask, softmax, weighted sum), and the
//! tensor path's candle ops compute the same; tests compare all of them.

use rayon::prelude::*;

use super::KvSlice;
use crate::cpu::gemm::gemm;
use crate::cpu::has_avx2_fma;
use crate::cpu::math::exp;

/// Query tokens per task.
const Q_BLOCK: usize = 32;
/// Keys per block of the online softmax.
const K_BLOCK: usize = 64;
/// Tasks per pool thread below which the keys are split (module doc).
const TASKS_PER_THREAD: usize = 2;
/// Fewest key blocks a split range holds.
const MIN_SPLIT_BLOCKS: usize = 4;

/// Keys and values of one source, `[Hkv, capacity, D]` each; slots `0..pos.len()` are read,
/// slot `j` holding the key of position `pos[j]`.
pub struct KeySegment<'a> {
    /// Keys (RoPE'd), as stored.
    pub k: KvSlice<'a>,
    /// Values, likewise.
    pub v: KvSlice<'a>,
    /// Slots per KV head.
    pub capacity: usize,
    /// The position of the key in each slot read.
    pub pos: &'a [usize],
}

/// The attention of `S` query tokens, GQA (query head `h` reads KV head `h / (H / Hkv)`).
pub struct AttendMany<'a> {
    /// `[H, S, D]`, head-major, RoPE'd.
    pub q: &'a [f32],
    /// The position of each query token.
    pub q_pos: &'a [usize],
    /// Where the keys are (any order; visibility only depends on positions).
    pub segments: &'a [KeySegment<'a>],
    /// A query at `p` sees keys at `kp ≤ p` with `p − kp < window`.
    pub window: Option<usize>,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dim.
    pub dim: usize,
    /// Score scale.
    pub scale: f32,
}

#[inline(always)]
fn visible(qp: usize, kp: usize, window: Option<usize>) -> bool {
    kp <= qp && window.is_none_or(|w| qp - kp < w)
}

/// The literal definition, `[S, H·D]`: every visible key's score, softmax, weighted sum of
/// values (a query that sees nothing gets zeros).
pub fn attend_many_naive(a: &AttendMany<'_>) -> Vec<f32> {
    let (d, g, hd, s) = (a.dim, a.heads / a.kv_heads, a.heads * a.dim, a.q_pos.len());
    let values: Vec<(Vec<f32>, Vec<f32>)> = a
        .segments
        .iter()
        .map(|seg| (seg.k.to_f32_vec(), seg.v.to_f32_vec()))
        .collect();
    let mut out = vec![0f32; s * hd];
    for (t, &qp) in a.q_pos.iter().enumerate() {
        for h in 0..a.heads {
            let kvh = h / g;
            let q = &a.q[(h * s + t) * d..(h * s + t + 1) * d];
            let mut scored: Vec<(f32, &[f32])> = Vec::new();
            for (seg, (sk, sv)) in a.segments.iter().zip(&values) {
                for (j, &kp) in seg.pos.iter().enumerate() {
                    if visible(qp, kp, a.window) {
                        let o = (kvh * seg.capacity + j) * d;
                        let s =
                            q.iter().zip(&sk[o..o + d]).map(|(x, y)| x * y).sum::<f32>() * a.scale;
                        scored.push((s, &sv[o..o + d]));
                    }
                }
            }
            let max = scored.iter().map(|x| x.0).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scored.iter().map(|x| (x.0 - max).exp()).sum();
            let o = &mut out[t * hd + h * d..t * hd + (h + 1) * d];
            for (s, v) in &scored {
                let p = (s - max).exp() / sum;
                for (x, y) in o.iter_mut().zip(*v) {
                    *x += p * y;
                }
            }
        }
    }
    out
}

/// See the module doc. Same contract as [`attend_many_naive`].
pub fn attend_many(a: &AttendMany<'_>) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    attend_many_split(a, split_parts(a, threads))
}

/// Into how many key ranges each (KV head, query block) task is split so that `threads` have
/// [`TASKS_PER_THREAD`] tasks each, ranges of at least [`MIN_SPLIT_BLOCKS`] key blocks.
fn split_parts(a: &AttendMany<'_>, threads: usize) -> usize {
    let tasks = a.kv_heads * a.q_pos.len().div_ceil(Q_BLOCK);
    let blocks: usize = a
        .segments
        .iter()
        .map(|x| x.pos.len().div_ceil(K_BLOCK))
        .sum();
    let want = (TASKS_PER_THREAD * threads).div_ceil(tasks.max(1));
    want.min(blocks / MIN_SPLIT_BLOCKS).max(1)
}

/// [`attend_many`] with each task's keys split into `parts` contiguous ranges.
fn attend_many_split(a: &AttendMany<'_>, parts: usize) -> Vec<f32> {
    let (d, g, hd, s) = (a.dim, a.heads / a.kv_heads, a.heads * a.dim, a.q_pos.len());
    // Every key block, in segment order: (segment, first slot).
    let blocks: Vec<(usize, usize)> = a
        .segments
        .iter()
        .enumerate()
        .flat_map(|(si, seg)| (0..seg.pos.len()).step_by(K_BLOCK).map(move |j0| (si, j0)))
        .collect();
    let parts = parts.clamp(1, blocks.len().max(1));
    let range =
        |part: usize| &blocks[part * blocks.len() / parts..(part + 1) * blocks.len() / parts];
    let tasks: Vec<(usize, usize, usize)> = (0..a.kv_heads)
        .flat_map(|kvh| {
            (0..s)
                .step_by(Q_BLOCK)
                .flat_map(move |t0| (0..parts).map(move |part| (kvh, t0, part)))
        })
        .collect();
    let work = |&(kvh, t0, part): &(usize, usize, usize)| {
        task_dispatch(a, kvh, t0, (t0 + Q_BLOCK).min(s), range(part))
    };
    let keys: usize = a.segments.iter().map(|x| x.pos.len()).sum();
    let partials: Vec<Partial> = if tasks.len() > 1 && s * keys * d * g >= 1 << 18 {
        tasks.par_iter().map(work).collect()
    } else {
        tasks.iter().map(work).collect()
    };
    let mut out = vec![0f32; s * hd];
    for (i, group) in partials.chunks_exact(parts).enumerate() {
        let (kvh, t0, _) = tasks[i * parts];
        let o = merge(group, d);
        // Block rows are (token, member of the group), the group's heads adjacent in `out`.
        for (i, rows) in o.chunks_exact(g * d).enumerate() {
            let at = (t0 + i) * hd + kvh * g * d;
            out[at..at + g * d].copy_from_slice(rows);
        }
    }
    out
}

/// One task's rows over its keys: the online softmax's running max `m` and sum `l` per row and
/// the output `o` not yet divided by `l` (`[rows, D]`).
struct Partial {
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// The attention output of rows whose keys were split over `parts` (one range each): each
/// part's sum and output rescaled to the common max, summed, divided by the total sum (a row
/// that sees nothing stays zero). One part is only divided by its sum.
fn merge(parts: &[Partial], d: usize) -> Vec<f32> {
    let Some((first, rest)) = parts.split_first() else {
        return Vec::new();
    };
    let mut o = first.o.clone();
    let mut l = first.l.clone();
    if !rest.is_empty() {
        for (row, orow) in o.chunks_exact_mut(d).enumerate() {
            let m = parts
                .iter()
                .map(|p| p.m[row])
                .fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let scale = |p: &Partial| match p.m[row] {
                x if x == f32::NEG_INFINITY => 0.0,
                x => exp(x - m),
            };
            let c0 = scale(first);
            orow.iter_mut().for_each(|x| *x *= c0);
            l[row] *= c0;
            for p in rest {
                let c = scale(p);
                if c == 0.0 {
                    continue;
                }
                l[row] += p.l[row] * c;
                for (x, y) in orow.iter_mut().zip(&p.o[row * d..(row + 1) * d]) {
                    *x += y * c;
                }
            }
        }
    }
    for (orow, &lr) in o.chunks_exact_mut(d).zip(&l) {
        if lr > 0.0 {
            let inv = 1.0 / lr;
            orow.iter_mut().for_each(|x| *x *= inv);
        }
    }
    o
}

fn task_dispatch(
    a: &AttendMany<'_>,
    kvh: usize,
    t0: usize,
    t1: usize,
    blocks: &[(usize, usize)],
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the features `task_avx2` is compiled for were detected just above.
        return unsafe { task_avx2(a, kvh, t0, t1, blocks) };
    }
    task::<false>(a, kvh, t0, t1, blocks)
}

/// The AVX2 + FMA instantiation of its portable twin.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(
    a: &AttendMany<'_>,
    kvh: usize,
    t0: usize,
    t1: usize,
    blocks: &[(usize, usize)],
) -> Partial {
    task::<true>(a, kvh, t0, t1, blocks)
}

/// Query tokens `t0..t1` of KV head `kvh`'s group over the key blocks `blocks` ((segment, first
/// slot) each): `[t1 − t0, G, D]` rows, not yet divided by their sums.
#[inline(always)]
fn task<const F: bool>(
    a: &AttendMany<'_>,
    kvh: usize,
    t0: usize,
    t1: usize,
    blocks: &[(usize, usize)],
) -> Partial {
    let (d, g, s) = (a.dim, a.heads / a.kv_heads, a.q_pos.len());
    let r = (t1 - t0) * g;
    // Q rows (token i, member gi) → row i·G + gi.
    let mut qm = vec![0f32; r * d];
    for i in 0..t1 - t0 {
        for gi in 0..g {
            let src = ((kvh * g + gi) * s + t0 + i) * d;
            qm[(i * g + gi) * d..(i * g + gi + 1) * d].copy_from_slice(&a.q[src..src + d]);
        }
    }
    let qpos = &a.q_pos[t0..t1];
    let (qmin, qmax) = (
        qpos.iter().copied().min().unwrap_or(0),
        qpos.iter().copied().max().unwrap_or(0),
    );
    let mut o = vec![0f32; r * d];
    let mut m = vec![f32::NEG_INFINITY; r];
    let mut l = vec![0f32; r];
    let mut kt = vec![0f32; d * K_BLOCK];
    let mut sc = vec![0f32; r * K_BLOCK];
    // A compact cache's block, converted to f32 (module doc of `kernels::kv`).
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for &(si, j0) in blocks {
        let seg = &a.segments[si];
        let n = seg.pos.len();
        {
            let j1 = (j0 + K_BLOCK).min(n);
            let bk = j1 - j0;
            let kpos = &seg.pos[j0..j1];
            let (kmin, kmax) = kpos
                .iter()
                .fold((usize::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)));
            // Nothing here is visible to any query of the task: all in their future, or all
            // out of their window.
            if kmin > qmax || a.window.is_some_and(|w| kmax + w <= qmin) {
                continue;
            }
            let base = (kvh * seg.capacity + j0) * d;
            let keys = seg.k.f32_range(base, base + bk * d, &mut ks);
            let values = seg.v.f32_range(base, base + bk * d, &mut vs);
            // Kᵀ `[D, bk]`.
            for (j, kr) in keys.chunks_exact(d).enumerate() {
                for (e, &x) in kr.iter().enumerate() {
                    kt[e * bk + j] = x;
                }
            }
            let sc = &mut sc[..r * bk];
            gemm::<F>(r, bk, d, &qm, d, &kt, bk, sc, bk, a.scale, false);
            for (row, srow) in sc.chunks_exact_mut(bk).enumerate() {
                let qp = qpos[row / g];
                let all_seen = kmax <= qp && a.window.is_none_or(|w| qp - kmin < w);
                if !all_seen {
                    for (x, &kp) in srow.iter_mut().zip(kpos) {
                        if !visible(qp, kp, a.window) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let bmax = crate::cpu::math::max(srow);
                if bmax == f32::NEG_INFINITY {
                    srow.fill(0.0);
                    continue;
                }
                let mnew = m[row].max(bmax);
                let corr = exp(m[row] - mnew);
                // Exponentials first, then their sum: each loop vectorises.
                for x in srow.iter_mut() {
                    *x = exp(*x - mnew);
                }
                l[row] = l[row] * corr + crate::cpu::math::sum(srow);
                m[row] = mnew;
                if corr != 1.0 {
                    o[row * d..(row + 1) * d]
                        .iter_mut()
                        .for_each(|x| *x *= corr);
                }
            }
            gemm::<F>(r, d, bk, sc, bk, values, d, &mut o, d, 1.0, true);
        }
    }
    Partial { o, m, l }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::rand_vec;

    /// A ring of cached keys (positions wrapped into slots) and a block of new ones, with and
    /// without a window, odd head dims and block-crossing lengths, GQA and not.
    #[test]
    fn attend_many_matches_naive() {
        for &(h, hkv, d, cached, cap, s, window) in &[
            (6, 2, 16, 0, 0, 1, None),
            (6, 2, 16, 0, 0, 70, None),
            (6, 3, 20, 50, 64, 37, Some(64)),
            (4, 4, 8, 100, 100, 130, Some(90)),
            (9, 3, 64, 200, 256, 65, None),
            (2, 1, 12, 10, 16, 3, Some(5)),
            // A short message over a long ring: split over the threads' tasks.
            (9, 3, 64, 3000, 2048, 16, Some(2048)),
        ] {
            let q = rand_vec(s * h * d, 1);
            let (ck, cv) = (rand_vec(hkv * cap * d, 2), rand_vec(hkv * cap * d, 3));
            let (nk, nv) = (rand_vec(hkv * s * d, 4), rand_vec(hkv * s * d, 5));
            // Cached positions 0..cached in ring order (the oldest may have wrapped).
            let wrap = window.unwrap_or(usize::MAX).min(cap.max(1));
            let mut cpos = vec![0usize; cached.min(wrap)];
            let first = cached.saturating_sub(cpos.len());
            for p in first..cached {
                cpos[p % wrap] = p;
            }
            let q_pos: Vec<usize> = (cached..cached + s).collect();
            let segments = [
                KeySegment {
                    k: KvSlice::F32(&ck),
                    v: KvSlice::F32(&cv),
                    capacity: cap,
                    pos: &cpos,
                },
                KeySegment {
                    k: KvSlice::F32(&nk),
                    v: KvSlice::F32(&nv),
                    capacity: s,
                    pos: &q_pos,
                },
            ];
            let a = AttendMany {
                q: &q,
                q_pos: &q_pos,
                segments: &segments,
                window,
                heads: h,
                kv_heads: hkv,
                dim: d,
                scale: 0.3,
            };
            let want = attend_many_naive(&a);
            let got = attend_many(&a);
            let max_diff = |other: &[f32]| {
                want.iter()
                    .zip(other)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            // The keys split over several tasks (as for a short prompt over a long cache).
            for parts in [2, 3, 7] {
                let diff = max_diff(&attend_many_split(&a, parts));
                assert!(
                    diff < 2e-5,
                    "{h}/{hkv}/{d} cached {cached} S {s} window {window:?}, keys in {parts}: {diff}"
                );
            }
            let diff = max_diff(&got);
            assert!(
                diff < 2e-5,
                "{h}/{hkv}/{d} cached {cached} S {s} window {window:?}: {diff}"
            );
            if s == 16 {
                assert!(
                    split_parts(&a, 2) > 1,
                    "a short prompt over a long ring is split"
                );
            }
            crate::cpu::force_portable(true);
            let base = attend_many(&a);
            crate::cpu::force_portable(false);
            let diff = max_diff(&base);
            assert!(diff < 2e-5, "baseline {h}/{hkv}/{d}: {diff}");

            // The cache in f16 (the new keys stay f32, as a prompt's are): the kernel reads
            // what the naive definition reads, split or not, and moves by about the rounding.
            let half = |x: &[f32]| -> Vec<half::f16> {
                x.iter().map(|&y| half::f16::from_f32(y)).collect()
            };
            let (ck16, cv16) = (half(&ck), half(&cv));
            let segments16 = [
                KeySegment {
                    k: KvSlice::F16(&ck16),
                    v: KvSlice::F16(&cv16),
                    capacity: cap,
                    pos: &cpos,
                },
                KeySegment {
                    k: KvSlice::F32(&nk),
                    v: KvSlice::F32(&nv),
                    capacity: s,
                    pos: &q_pos,
                },
            ];
            let a16 = AttendMany {
                segments: &segments16,
                ..a
            };
            let want16 = attend_many_naive(&a16);
            let close16 = |got: &[f32], tol: f32, what: &str| {
                let diff = want16
                    .iter()
                    .zip(got)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < tol,
                    "f16 {what} {h}/{hkv}/{d} cached {cached} S {s}: {diff}"
                );
            };
            close16(&attend_many(&a16), 2e-5, "kernel");
            close16(&attend_many_split(&a16, 3), 2e-5, "split");
            close16(&want, 5e-3, "vs f32");
        }
    }
}
