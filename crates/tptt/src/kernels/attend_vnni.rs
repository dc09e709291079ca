//! A decode step's attention over an 8-bit KV cache with AVX-512 VNNI: the block kernel that
//! [`super::attend::attend_one`] picks for a Q8_0 cache when the CPU has AVX-512 (F, BW) and
//! VNNI and the head dim is a multiple of 64 up to 256. Both products are integer products, as
//! on an 8-bit cache the inputs are bytes already:
//!
//! - **Scores**: each query head is rounded to 8 bits per 32 values, as llama.cpp rounds it
//!   against a Q8_0 cache ([`quantized_query`]), and one `vpdpbusd` multiplies four values of 16
//!   keys (four keys' rows transposed by 32-bit words). `vpdpbusd` wants one unsigned operand:
//!   the key bytes are read as `k + 128` and the accumulator starts at `−128 · Σ q`, so the
//!   product is exact. Each block's product is scaled by the key's and the query's scales.
//! - **Values**: per 16 slots, head and 32-value block, the softmax weights times the values'
//!   scales are rounded to 8 bits against their largest (0..=255, the scale `largest / 255`),
//!   and one `vpdpbusd` multiplies four keys' values (interleaved byte by byte) for 16 columns.
//!
//! [`attend_one_int8_naive`] writes the same arithmetic out scalar: the kernel equals it to f32
//! rounding (which can move a weight across a rounding boundary: one step of its group), and it
//! stays within the weights' rounding of [`super::attend::attend_one_naive`] on the rounded
//! query (tests below; the perplexity of decoding with an 8-bit cache is checked in the engine's
//! `tests/kv_format.rs`).

use super::attend::{AttendOne, Partial};
use super::{kv, KvSlice, Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

/// Slots whose value weights share one 8-bit scale (the slots `16m..16m + 16` of the ring).
pub const WEIGHT_GROUP: usize = 16;

/// A slot whose score is this far or more below the largest gets weight 0: its weight,
/// `e^−64 ≈ 1.6·10⁻²⁸` of the largest (which is 1, so the sum is at least 1), is far below f32
/// rounding even summed over a million slots. It keeps every weight and every weight times a
/// value scale a normal f32: products with subnormals take microcode assists on x86 (measured
/// here: scores spread over about a hundred, many weights near `e^−87`, made the kernel three
/// times slower).
pub const WEIGHT_FLOOR: f32 = -64.0;

/// The query rows `[H, D]` rounded to 8 bits per 32 values (the scale of a block its largest
/// magnitude / 127, as [`super::quantize_q8_0`]), back as f32: what the VNNI kernel multiplies the
/// keys with. `D` must be a multiple of 32.
pub fn quantized_query(q: &[f32]) -> Vec<f32> {
    let (qi, d) = super::quantize_q8_0(q);
    qi.iter()
        .enumerate()
        .map(|(i, &v)| f32::from(v) * d[i / Q8_0_BLOCK])
        .collect()
}

/// The VNNI kernel's arithmetic, scalar (`[H, D]`): scores of the [`quantized_query`] against the
/// stored keys, `e = exp(s − max)` over the visible slots (0 from [`WEIGHT_FLOOR`] down), and
/// per value block `b` of slot `j` the weight `u = e · scale_v[j, b]` rounded against the largest
/// of its [`WEIGHT_GROUP`] slots,
/// `ŭ = round(u · 255 / top) · top / 255`; the answer `Σ_j ŭ_j · v_j / Σ_j e_j`, `v_j` the stored
/// bytes. Needs an 8-bit cache and `D` a multiple of 32 (else the literal definition).
pub fn attend_one_int8_naive(a: &AttendOne<'_>) -> Vec<f32> {
    let (KvSlice::Q8_0(_), KvSlice::Q8_0(vb)) = (a.k, a.v) else {
        return super::attend::attend_one_naive(a);
    };
    if !a.dim.is_multiple_of(Q8_0_BLOCK) {
        return super::attend::attend_one_naive(a);
    }
    let (d, g, t) = (a.dim, a.heads / a.kv_heads, a.visible.len());
    let row = kv::q8_0_bytes(d);
    let q = quantized_query(a.q);
    let ks = a.k.to_f32_vec();
    let mut out = vec![0f32; a.heads * d];
    for h in 0..a.heads {
        let kvh = h / g;
        let s = super::attend::scores_naive(a, &q[h * d..(h + 1) * d], kvh, &ks);
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            continue;
        }
        let e: Vec<f32> = s
            .iter()
            .map(|&x| match x - max >= WEIGHT_FLOOR {
                true => crate::cpu::math::exp(x - max),
                false => 0.0,
            })
            .collect();
        let sum: f32 = e.iter().sum();
        let o = &mut out[h * d..(h + 1) * d];
        for b in 0..d / Q8_0_BLOCK {
            for j0 in (0..t).step_by(WEIGHT_GROUP) {
                let slots = j0..(j0 + WEIGHT_GROUP).min(t);
                let at = |j: usize| (kvh * a.capacity + j) * row + b * Q8_0_BLOCK_BYTES;
                let u: Vec<f32> = slots
                    .clone()
                    .map(|j| {
                        let sv = half::f16::from_le_bytes([vb[at(j)], vb[at(j) + 1]]).to_f32();
                        e[j] * sv
                    })
                    .collect();
                let top = u.iter().copied().fold(0f32, f32::max);
                if top <= 0.0 {
                    continue;
                }
                for (j, &uj) in slots.zip(&u) {
                    let w = (uj * (255.0 / top)).round_ties_even() * (top / 255.0);
                    let v = &vb[at(j) + 2..at(j) + 2 + Q8_0_BLOCK];
                    for (x, &y) in o[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK].iter_mut().zip(v) {
                        *x += w * f32::from(y as i8);
                    }
                }
            }
        }
        o.iter_mut().for_each(|x| *x /= sum);
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx512::attend_block;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{
        kv, AttendOne, KvSlice, Partial, Q8_0_BLOCK, Q8_0_BLOCK_BYTES, WEIGHT_FLOOR, WEIGHT_GROUP,
    };
    use std::arch::x86_64::*;

    /// Keys whose scores are computed together (one 16-lane vector of scores), and whose value
    /// weights share a scale.
    const KEYS: usize = WEIGHT_GROUP;
    /// Rows ahead that the key and value loops ask the cache for.
    const PREFETCH_ROWS: usize = 48;
    use super::super::attend::HEADS_PER_PASS;

    /// The `G` query heads of KV head `kvh` against slots `start..end` of an 8-bit cache
    /// (module documentation). Returns one partial softmax per head.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI, AVX2, FMA and F16C
    /// ([`crate::cpu::has_avx512_vnni`], [`crate::cpu::has_avx2_fma_f16c`]); `a.k` and `a.v`
    /// must be Q8_0 and `a.dim` a multiple of 64 up to 256.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(in crate::kernels) unsafe fn attend_block(
        a: &AttendOne<'_>,
        kvh: usize,
        start: usize,
        end: usize,
    ) -> Vec<Partial> {
        let (d, g) = (a.dim, a.heads / a.kv_heads);
        assert!(
            d % 64 == 0 && d <= 256,
            "attend_vnni: D must be a multiple of 64 up to 256"
        );
        let (KvSlice::Q8_0(k), KvSlice::Q8_0(v)) = (a.k, a.v) else {
            panic!("attend_vnni: the cache must be 8-bit")
        };
        let row = kv::q8_0_bytes(d);
        let (from, to) = (
            kv::q8_0_bytes((kvh * a.capacity + start) * d),
            kv::q8_0_bytes((kvh * a.capacity + end) * d),
        );
        let (keys, values) = (&k[from..to], &v[from..to]);
        let len = end - start;
        assert!(
            keys.len() == len * row && values.len() == len * row,
            "attend_vnni: short block"
        );
        let vis = &a.visible[start..end];
        let padded = len.div_ceil(KEYS) * KEYS;
        let (mut e, max) = scores(a, kvh, keys, vis, padded);
        let mut parts = Vec::with_capacity(g);
        let mut sums = vec![0f32; g];
        for h in 0..g {
            let r = &mut e[h * padded..(h + 1) * padded];
            if max[h] == f32::NEG_INFINITY {
                // Nothing visible for this head: zero weights, a partial that merges to nothing.
                r.fill(0.0);
                continue;
            }
            let m16 = _mm512_set1_ps(max[h]);
            let floor = _mm512_set1_ps(WEIGHT_FLOOR);
            let mut s16 = _mm512_setzero_ps();
            for c in r.chunks_exact_mut(KEYS) {
                let d = _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), m16);
                let kept = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(d, floor);
                let x = _mm512_maskz_mov_ps(kept, crate::cpu::math::avx512::exp16(d));
                _mm512_storeu_ps(c.as_mut_ptr(), x);
                s16 = _mm512_add_ps(s16, x);
            }
            sums[h] = _mm512_reduce_add_ps(s16);
        }
        let mut acc = vec![0f32; g * d];
        for h0 in (0..g).step_by(HEADS_PER_PASS) {
            let p = ValuePass {
                values,
                row,
                len,
                d,
                e: &e[h0 * padded..],
                padded,
                acc: &mut acc[h0 * d..],
            };
            match HEADS_PER_PASS.min(g - h0) {
                1 => weighted_values::<1>(p),
                2 => weighted_values::<2>(p),
                3 => weighted_values::<3>(p),
                _ => weighted_values::<HEADS_PER_PASS>(p),
            }
        }
        for h in 0..g {
            parts.push(Partial {
                max: max[h],
                sum: sums[h],
                acc: acc[h * d..(h + 1) * d].to_vec(),
            });
        }
        parts
    }

    /// The scaled scores `[G, padded]` of the group's heads against the block's keys (hidden
    /// slots and the padding −∞), and each head's largest score.
    ///
    /// # Safety
    /// As [`attend_block`]; `keys` holds `vis.len()` rows of `a.dim` values, `a.dim ≤ 256`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn scores(
        a: &AttendOne<'_>,
        kvh: usize,
        keys: &[u8],
        vis: &[bool],
        padded: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (d, g) = (a.dim, a.heads / a.kv_heads);
        let mut e = vec![f32::NEG_INFINITY; g * padded];
        let mut max = vec![f32::NEG_INFINITY; g];
        for h0 in (0..g).step_by(HEADS_PER_PASS) {
            let p = ScorePass {
                q: &a.q[(kvh * g + h0) * d..],
                scale: a.scale,
                keys,
                vis,
                e: &mut e[h0 * padded..],
                padded,
                max: &mut max[h0..],
            };
            macro_rules! by_cols {
                ($n:literal) => {
                    match d / 64 {
                        1 => score_pass::<$n, 1>(p),
                        2 => score_pass::<$n, 2>(p),
                        3 => score_pass::<$n, 3>(p),
                        _ => score_pass::<$n, 4>(p),
                    }
                };
            }
            match HEADS_PER_PASS.min(g - h0) {
                1 => by_cols!(1),
                2 => by_cols!(2),
                3 => by_cols!(3),
                _ => by_cols!(4),
            }
        }
        (e, max)
    }

    /// What one pass over the keys reads and writes: the first query head of the pass, the
    /// score scale, the block's keys and visibility, the pass's score rows (`[N, padded]`) and
    /// largest scores.
    struct ScorePass<'p> {
        q: &'p [f32],
        scale: f32,
        keys: &'p [u8],
        vis: &'p [bool],
        e: &'p mut [f32],
        padded: usize,
        max: &'p mut [f32],
    }

    /// The scores of `N` query heads of `64·C` values against the block's keys, 16 keys at a
    /// time in four groups of four.
    ///
    /// Four keys' 64 bytes are transposed by 32-bit words inside each 128-bit segment (two
    /// levels of unpacks): vector `m` holds, in segment `s`, the four keys' words `4s + m`. The
    /// query vector it is multiplied with holds word `4s + m` of the query across segment `s`,
    /// so lane `k` of segment `s` accumulates key `k`'s product over words `4s..4s + 4`.
    /// Segments 0–1 are the first 32-value block, 2–3 the second; summing segments in pairs and
    /// gathering the four groups' sums (128-bit shuffles) gives, per block, one vector whose
    /// lane `k` is key `k`.
    ///
    /// # Safety
    /// As [`attend_block`]; `C ≤ 4`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn score_pass<const N: usize, const C: usize>(p: ScorePass<'_>) {
        let ScorePass {
            q,
            scale,
            keys,
            vis,
            e,
            padded,
            max,
        } = p;
        let (d, row) = (64 * C, kv::q8_0_bytes(64 * C));
        let len = vis.len();
        // Each head rounded to 8 bits per block. Per 64 values: for each `m` the query words
        // `4s + m` spread over segment `s`, and per segment `−128 · Σ q` of its 16 values (which
        // undoes reading the keys as unsigned); per block the query's scale times the score
        // scale.
        let mut qm = [[[_mm512_setzero_si512(); 4]; C]; N];
        let mut corr = [[_mm512_setzero_si512(); C]; N];
        let mut qs = [[0f32; 8]; N];
        for i in 0..N {
            let (qi, qd) = super::super::quantize_q8_0(&q[i * d..(i + 1) * d]);
            for c in 0..C {
                let bytes = &qi[64 * c..64 * (c + 1)];
                let words = _mm512_loadu_si512(bytes.as_ptr() as *const _);
                for (m, v) in qm[i][c].iter_mut().enumerate() {
                    let idx: [i32; 16] = std::array::from_fn(|l| (4 * (l / 4) + m) as i32);
                    *v = _mm512_permutexvar_epi32(
                        _mm512_loadu_si512(idx.as_ptr() as *const _),
                        words,
                    );
                }
                let lanes: [i32; 16] = std::array::from_fn(|l| {
                    -128 * bytes[16 * (l / 4)..16 * (l / 4) + 16]
                        .iter()
                        .map(|&x| i32::from(x))
                        .sum::<i32>()
                });
                corr[i][c] = _mm512_loadu_si512(lanes.as_ptr() as *const _);
            }
            for (b, &s) in qd.iter().enumerate() {
                qs[i][b] = s * scale;
            }
        }
        let rows_at = row_offsets(row);
        let flip = _mm512_set1_epi8(-128);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut max16 = [ninf; N];
        // Over a long history every slot is visible: one scan instead of a mask per group.
        let all_seen = vis.iter().all(|&v| v);
        for j0 in (0..len).step_by(KEYS) {
            let n = KEYS.min(len - j0);
            let seen = if all_seen && n == KEYS {
                u16::MAX
            } else {
                visible_mask(&vis[j0..j0 + n])
            };
            if seen == 0 {
                continue;
            }
            let base = keys.as_ptr().add(j0 * row);
            for kk in 0..n {
                _mm_prefetch::<_MM_HINT_T0>(
                    base.wrapping_add((kk + PREFETCH_ROWS) * row) as *const i8
                );
            }
            let mut s = [_mm512_setzero_ps(); N];
            for c in 0..C {
                // Per group of four keys, per head.
                let mut acc = [[_mm512_setzero_si512(); N]; 4];
                for acc_g in acc.iter_mut() {
                    for (i, a) in acc_g.iter_mut().enumerate() {
                        *a = corr[i][c];
                    }
                }
                for (gq, acc_g) in acc.iter_mut().enumerate() {
                    // Keys past the block's end read as zeros (their scores are masked).
                    let r =
                        four_rows(base, row, 4 * gq, n, 2 * c).map(|x| _mm512_xor_si512(x, flip));
                    let (a0, a1) = (
                        _mm512_unpacklo_epi32(r[0], r[1]),
                        _mm512_unpackhi_epi32(r[0], r[1]),
                    );
                    let (a2, a3) = (
                        _mm512_unpacklo_epi32(r[2], r[3]),
                        _mm512_unpackhi_epi32(r[2], r[3]),
                    );
                    let m = [
                        _mm512_unpacklo_epi64(a0, a2),
                        _mm512_unpackhi_epi64(a0, a2),
                        _mm512_unpacklo_epi64(a1, a3),
                        _mm512_unpackhi_epi64(a1, a3),
                    ];
                    for i in 0..N {
                        for (mm, qv) in m.iter().zip(&qm[i][c]) {
                            acc_g[i] = _mm512_dpbusd_epi32(acc_g[i], *mm, *qv);
                        }
                    }
                }
                // The keys' scales of the two blocks (keys past the end: 0).
                let ks: [__m512; 2] = std::array::from_fn(|h| scales(base, rows_at, n, 2 * c + h));
                for i in 0..N {
                    let (lo, hi) = blocks_of(&[acc[0][i], acc[1][i], acc[2][i], acc[3][i]]);
                    s[i] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(lo),
                        _mm512_mul_ps(ks[0], _mm512_set1_ps(qs[i][2 * c])),
                        s[i],
                    );
                    s[i] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(hi),
                        _mm512_mul_ps(ks[1], _mm512_set1_ps(qs[i][2 * c + 1])),
                        s[i],
                    );
                }
            }
            for i in 0..N {
                let si = _mm512_mask_blend_ps(seen, ninf, s[i]);
                _mm512_storeu_ps(e.as_mut_ptr().add(i * padded + j0), si);
                max16[i] = _mm512_max_ps(max16[i], si);
            }
        }
        for i in 0..N {
            max[i] = _mm512_reduce_max_ps(max16[i]);
        }
    }

    /// The byte offsets of the [`KEYS`] rows of a group from its first (`k · row` in lane `k`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `16 · row` must fit an `i32`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn row_offsets(row: usize) -> __m512i {
        _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(row as i32),
        )
    }

    /// The f16 scales of block `block` of the first `n` rows (at most [`KEYS`]) from `base`, one
    /// per lane (rows from `n` on: 0), by one gather: each lane reads the scale's 32-bit word
    /// (the scale and the block's first two values) and keeps its low half.
    ///
    /// # Safety
    /// As [`attend_block`]; rows `0..n` from `base` hold block `block`, `rows_at` is
    /// [`row_offsets`] of their size.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn scales(base: *const u8, rows_at: __m512i, n: usize, block: usize) -> __m512 {
        let mask: __mmask16 = if n >= KEYS { 0xffff } else { (1u16 << n) - 1 };
        let words = _mm512_mask_i32gather_epi32::<1>(
            _mm512_setzero_si512(),
            mask,
            rows_at,
            base.add(block * Q8_0_BLOCK_BYTES) as *const _,
        );
        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words))
    }

    /// Rows `first..first + 4` of the rows of `row` bytes from `base`, each as the 64 values of
    /// its blocks `block` and `block + 1` (scales skipped); rows from `n` on as zeros.
    ///
    /// # Safety
    /// As [`attend_block`]; rows `first..n.min(first + 4)` hold blocks `block..block + 2`.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    #[inline]
    unsafe fn four_rows(
        base: *const u8,
        row: usize,
        first: usize,
        n: usize,
        block: usize,
    ) -> [__m512i; 4] {
        std::array::from_fn(|t| {
            if first + t >= n {
                return _mm512_setzero_si512();
            }
            let at = base.add((first + t) * row + block * Q8_0_BLOCK_BYTES + 2);
            let lo = _mm256_loadu_si256(at as *const _);
            let hi = _mm256_loadu_si256(at.add(Q8_0_BLOCK_BYTES) as *const _);
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        })
    }

    /// Bit `k` set where `vis[k]` (at most 16 slots).
    ///
    /// # Safety
    /// The CPU must have SSE2 (every x86-64 CPU).
    #[inline]
    unsafe fn visible_mask(vis: &[bool]) -> u16 {
        let mut b = [0u8; KEYS];
        for (x, &v) in b.iter_mut().zip(vis) {
            *x = u8::from(v);
        }
        let v = _mm_loadu_si128(b.as_ptr() as *const _);
        _mm_movemask_epi8(_mm_cmpgt_epi8(v, _mm_setzero_si128())) as u16
    }

    /// The four groups' products (lane `k` of segment `s`: key `4g + k`, segment `s` of its 64
    /// values) as two vectors whose lane `j` is key `j`'s product with the first, and with the
    /// second, 32-value block: segments summed in pairs, then gathered by 128-bit shuffles.
    ///
    /// # Safety
    /// As [`attend_block`].
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn blocks_of(g: &[__m512i; 4]) -> (__m512i, __m512i) {
        // [x: s0+s1, x: s2+s3, y: s0+s1, y: s2+s3].
        let pair = |x: __m512i, y: __m512i| {
            _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0x88>(x, y),
                _mm512_shuffle_i32x4::<0xdd>(x, y),
            )
        };
        let (r0, r1) = (pair(g[0], g[1]), pair(g[2], g[3]));
        (
            _mm512_shuffle_i32x4::<0x88>(r0, r1),
            _mm512_shuffle_i32x4::<0xdd>(r0, r1),
        )
    }

    /// What one pass over the values reads and writes: the block's rows, the weights of the
    /// pass's heads (`[N, padded]` from the first) and their accumulators (`[N, D]`).
    struct ValuePass<'p> {
        values: &'p [u8],
        row: usize,
        len: usize,
        d: usize,
        e: &'p [f32],
        padded: usize,
        acc: &'p mut [f32],
    }

    /// `acc[i] = Σ_j e[i, j] · V_j` for `N` heads in integers, 64 columns at a time.
    ///
    /// Per 16 keys, head and 32-value block, the weights `e · scale` are rounded to 8 bits
    /// against their largest (unsigned: 0..=255, the scale `largest / 255`). Four keys' rows are
    /// interleaved byte by byte (two levels of unpacks): lane `k` of segment `s` of vector `m`
    /// holds the four keys' values of column `16s + 4m + k`, so one `vpdpbusd` with the four
    /// weights multiplies four keys for 16 columns. Every 16 keys the integer sums are scaled
    /// into the f32 accumulators.
    ///
    /// # Safety
    /// As [`attend_block`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn weighted_values<const N: usize>(p: ValuePass<'_>) {
        let ValuePass {
            values,
            row,
            len,
            d,
            e,
            padded,
            acc,
        } = p;
        let rows_at = row_offsets(row);
        for c0 in (0..d).step_by(64) {
            let b0 = c0 / Q8_0_BLOCK;
            // Per head, per `m`: columns 16s + 4m + k in lane (s, k).
            let mut out = [[_mm512_setzero_ps(); 4]; N];
            for j0 in (0..len).step_by(KEYS) {
                let n = KEYS.min(len - j0);
                let base = values.as_ptr().add(j0 * row);
                for kk in 0..n {
                    _mm_prefetch::<_MM_HINT_T0>(
                        base.wrapping_add((kk + PREFETCH_ROWS) * row) as *const i8
                    );
                }
                // The values' scales of the two blocks (keys past the end: 0).
                let vs: [__m512; 2] = std::array::from_fn(|h| scales(base, rows_at, n, b0 + h));
                // Per head and block the 16 weights as bytes, and their scale.
                let mut w = [[[0u32; 4]; 2]; N];
                let mut alpha = [_mm512_setzero_ps(); N];
                let mut any = false;
                for i in 0..N {
                    let ei = _mm512_loadu_ps(e.as_ptr().add(i * padded + j0));
                    let mut sc = [0f32; 2];
                    for (h, vh) in vs.iter().enumerate() {
                        let u = _mm512_mul_ps(ei, *vh);
                        let top = _mm512_reduce_max_ps(u);
                        if top > 0.0 {
                            sc[h] = top / 255.0;
                            let q =
                                _mm512_cvtps_epi32(_mm512_mul_ps(u, _mm512_set1_ps(255.0 / top)));
                            _mm_storeu_si128(
                                w[i][h].as_mut_ptr() as *mut _,
                                _mm512_cvtusepi32_epi8(q),
                            );
                            any = true;
                        }
                    }
                    alpha[i] =
                        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(sc[0]), _mm512_set1_ps(sc[1]));
                }
                if !any {
                    continue;
                }
                let mut sums = [[_mm512_setzero_si512(); 4]; N];
                #[allow(clippy::needless_range_loop)] // `gq` picks the group's keys and weights
                for gq in 0..4 {
                    // Keys past the block's end read as zeros (their weights are 0 as well).
                    let r = four_rows(base, row, 4 * gq, n, b0);
                    let (t0, t1) = (
                        _mm512_unpacklo_epi8(r[0], r[1]),
                        _mm512_unpackhi_epi8(r[0], r[1]),
                    );
                    let (t2, t3) = (
                        _mm512_unpacklo_epi8(r[2], r[3]),
                        _mm512_unpackhi_epi8(r[2], r[3]),
                    );
                    let x = [
                        _mm512_unpacklo_epi16(t0, t2),
                        _mm512_unpackhi_epi16(t0, t2),
                        _mm512_unpacklo_epi16(t1, t3),
                        _mm512_unpackhi_epi16(t1, t3),
                    ];
                    for i in 0..N {
                        // Segments 0–1 are the first block's columns, 2–3 the second's.
                        let wv = _mm512_mask_set1_epi32(
                            _mm512_set1_epi32(w[i][0][gq] as i32),
                            0xff00,
                            w[i][1][gq] as i32,
                        );
                        for (s, xm) in sums[i].iter_mut().zip(x) {
                            *s = _mm512_dpbusd_epi32(*s, wv, xm);
                        }
                    }
                }
                for i in 0..N {
                    for (o, s) in out[i].iter_mut().zip(sums[i]) {
                        *o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), alpha[i], *o);
                    }
                }
            }
            for (i, oi) in out.iter().enumerate() {
                let dst = &mut acc[i * d + c0..i * d + c0 + 64];
                for (m, om) in oi.iter().enumerate() {
                    let mut lanes = [0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), *om);
                    for (l, &x) in lanes.iter().enumerate() {
                        dst[16 * (l / 4) + 4 * m + l % 4] = x;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::attend::{attend_one_naive, attend_one_with};
    use super::*;
    use crate::testutil::rand_vec;

    /// On a CPU with AVX-512 VNNI the kernel equals [`attend_one_int8_naive`] (f32 rounding
    /// apart), on odd lengths, hidden slots, a whole hidden group of 16, group sizes 1 to 10,
    /// head dims 64 to 192, flat and peaked softmax; and it stays within the weights' rounding
    /// of the definition on the rounded query.
    #[test]
    fn vnni_kernel_equals_its_scalar_arithmetic() {
        if !(crate::cpu::has_avx512_vnni() && crate::cpu::has_avx2_fma_f16c()) {
            eprintln!("no AVX-512 VNNI here: the kernel is not used on this CPU");
            return;
        }
        for &(heads, kv_heads, dim, cap, t) in &[
            (1, 1, 64, 4, 1),
            (9, 3, 64, 1100, 1030),
            (1, 1, 128, 20, 17),
            (8, 1, 64, 300, 257),
            (8, 1, 128, 300, 257),
            (7, 1, 64, 40, 33),
            (10, 2, 192, 70, 65),
            (4, 4, 64, 17, 16),
        ] {
            let q: Vec<f32> = rand_vec(heads * dim, 1)
                .iter()
                .enumerate()
                // One large dimension per head, as RoPE'd queries often have.
                .map(|(i, &x)| if i % dim == 5 { 8.0 * x } else { x })
                .collect();
            let (kf, vf) = (
                rand_vec(kv_heads * cap * dim, 2),
                rand_vec(kv_heads * cap * dim, 3),
            );
            let (mut k8, mut v8) = (Vec::new(), Vec::new());
            kv::quantize_q8_0(&kf, &mut k8);
            kv::quantize_q8_0(&vf, &mut v8);
            // Hidden slots, among them a whole group of 16 keys.
            let visible: Vec<bool> = (0..t)
                .map(|j| j == t - 1 || (j % 7 != 3 && !(16..32).contains(&j)))
                .collect();
            // A flat softmax (scores within about ±1), a peaked one (±20), and one whose
            // scores spread past WEIGHT_FLOOR (±250: most weights 0).
            for scale in [0.125, 2.5, 30.0] {
                let a = AttendOne {
                    q: &q,
                    k: KvSlice::Q8_0(&k8),
                    v: KvSlice::Q8_0(&v8),
                    visible: &visible,
                    heads,
                    kv_heads,
                    dim,
                    capacity: cap,
                    scale,
                };
                // SAFETY: the features were detected above; the cache is 8-bit and D a
                // multiple of 64 up to 256.
                let got =
                    attend_one_with(&a, &|a, kvh, s, e| unsafe { attend_block(a, kvh, s, e) });
                let want = attend_one_int8_naive(&a);
                // The definition on the rounded query: the kernel differs from it by the
                // weights' rounding, at most a percent of the largest output.
                let rounded = quantized_query(&q);
                let only_q = attend_one_naive(&AttendOne { q: &rounded, ..a });
                let top = only_q.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (i, ((x, y), z)) in got.iter().zip(&want).zip(&only_q).enumerate() {
                    let case = format!("{heads}/{kv_heads}/{dim} t {t} scale {scale}, index {i}");
                    // With a peaked softmax the scores are large, and their f32 rounding can
                    // move a weight across a rounding boundary: one step is 1/255 of its
                    // group's largest weight.
                    let tol = if scale < 1.0 {
                        1e-5 * (1.0 + y.abs())
                    } else {
                        3e-3 * top
                    };
                    assert!((x - y).abs() <= tol, "{case}: {x} vs {y}");
                    assert!((x - z).abs() <= 1e-2 * top, "{case}: {x} vs {z}");
                }
            }
        }
    }

    /// The scalar arithmetic moves the exact answer by about the 8-bit roundings (with a flat
    /// softmax: a sharp one amplifies the query's rounding), and rounding the weights matters:
    /// it is not the definition on the rounded query alone.
    #[test]
    fn int8_arithmetic_is_near_the_definition() {
        let (heads, kv_heads, dim, cap, t) = (4, 2, 64, 200, 200);
        let q = rand_vec(heads * dim, 7);
        let (mut k8, mut v8) = (Vec::new(), Vec::new());
        kv::quantize_q8_0(&rand_vec(kv_heads * cap * dim, 8), &mut k8);
        kv::quantize_q8_0(&rand_vec(kv_heads * cap * dim, 9), &mut v8);
        let visible = vec![true; t];
        let a = AttendOne {
            q: &q,
            k: KvSlice::Q8_0(&k8),
            v: KvSlice::Q8_0(&v8),
            visible: &visible,
            heads,
            kv_heads,
            dim,
            capacity: cap,
            scale: 0.5,
        };
        let int8 = attend_one_int8_naive(&a);
        let exact = attend_one_naive(&a);
        let rounded_q = quantized_query(&q);
        let only_q = attend_one_naive(&AttendOne { q: &rounded_q, ..a });
        let top = exact.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff =
            |x: &[f32], y: &[f32]| x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff(&int8, &exact) <= 2e-2 * top);
        assert!(diff(&int8, &only_q) > 0.0);
    }
}
