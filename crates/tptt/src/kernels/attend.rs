//! One query token's softmax attention over the KV ring (a decode step's attention): the
//! literal definition ([`attend_one_naive`]), the parallel flash-decoding split
//! ([`attend_one`]), a portable block kernel and one with explicit AVX2 that reads f16 and 8-bit
//! caches as stored.

use super::{dot, KvSlice};

/// One query token's softmax attention over a KV buffer, GQA: query head `h` reads KV head
/// `h / (heads / kv_heads)`.
pub struct AttendOne<'a> {
    /// `[H, D]`, RoPE'd.
    pub q: &'a [f32],
    /// `[Hkv, capacity, D]`, as stored; slots `0..visible.len()` are read.
    pub k: KvSlice<'a>,
    /// Like `k`.
    pub v: KvSlice<'a>,
    /// Which slots the query may see.
    pub visible: &'a [bool],
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dim.
    pub dim: usize,
    /// Slots per KV head in `k`/`v`.
    pub capacity: usize,
    /// Score scale.
    pub scale: f32,
}

/// The literal definition: scores, softmax over the visible slots, weighted sum. `[H, D]`.
pub fn attend_one_naive(a: &AttendOne<'_>) -> Vec<f32> {
    let (d, g) = (a.dim, a.heads / a.kv_heads);
    let (ks, vs) = (a.k.to_f32_vec(), a.v.to_f32_vec());
    let mut out = vec![0f32; a.heads * d];
    for h in 0..a.heads {
        let kvh = h / g;
        let scores = scores_naive(a, &a.q[h * d..(h + 1) * d], kvh, &ks);
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        for (j, p) in e.iter().enumerate() {
            let v = &vs[(kvh * a.capacity + j) * d..(kvh * a.capacity + j + 1) * d];
            for (o, x) in out[h * d..(h + 1) * d].iter_mut().zip(v) {
                *o += p / sum * x;
            }
        }
    }
    out
}

/// One query head's scaled scores against the slots of KV head `kvh` (`ks`: the whole key
/// buffer as f32), −∞ where a slot is hidden: the definition, shared by the references.
pub(super) fn scores_naive(a: &AttendOne<'_>, q: &[f32], kvh: usize, ks: &[f32]) -> Vec<f32> {
    let d = a.dim;
    (0..a.visible.len())
        .map(|j| {
            let k = &ks[(kvh * a.capacity + j) * d..(kvh * a.capacity + j + 1) * d];
            if a.visible[j] {
                q.iter().zip(k).map(|(x, y)| x * y).sum::<f32>() * a.scale
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}

/// Partial softmax of one block of slots for one query head: running max, sum of exponentials
/// and the unnormalised weighted sum of values (flash-decoding).
pub(super) struct Partial {
    pub(super) max: f32,
    pub(super) sum: f32,
    pub(super) acc: Vec<f32>,
}

/// Query-key products (`t·D·G` per KV head) from which a decode step's attention is split across
/// the threads: below it, one thread does it all faster than a parallel region costs.
const ATTEND_PARALLEL_MIN: usize = 16 * 1024;

/// Query heads the block kernels take in one pass over a block's keys and values.
pub(super) const HEADS_PER_PASS: usize = 4;

/// Largest block (keys as stored) when the group's heads take one pass: each row is read once,
/// so the block need not stay in a cache, and fewer, longer blocks read faster (each block
/// starts its key and value streams cold): measured on this 2-core Xeon with huge pages,
/// SmolLM2's 8-bit cache at 8192 slots 18.6 → 20.7 GB/s from 64 KiB blocks to two blocks per
/// head, at 32768 slots 16.9 → 22.0 GB/s from 64 KiB to 2 MiB; f32 and f16 caches likewise.
const ONE_PASS_MAX_BLOCK: usize = 4 << 20;
/// Largest block when the heads take several passes ([`HEADS_PER_PASS`] at a time): the later
/// passes read the block again, from the L2 cache while it fits.
const PASSES_MAX_BLOCK: usize = 64 << 10;

/// Slots per block of a decode step's attention over `t` slots of `row_bytes` each, `kv_heads`
/// KV heads of `g` query heads each, on `threads` threads: blocks up to the largest size
/// ([`ONE_PASS_MAX_BLOCK`], [`PASSES_MAX_BLOCK`]), as many per head as makes every thread's
/// share of the `kv_heads ×` blocks equal (a multiple of `threads` in all), in whole groups of
/// 16 slots, so that a group (the VNNI kernel's unit of weight rounding) is the same slots
/// whatever the number of blocks.
fn block_slots(t: usize, row_bytes: usize, kv_heads: usize, g: usize, threads: usize) -> usize {
    let max_bytes = if g <= HEADS_PER_PASS {
        ONE_PASS_MAX_BLOCK
    } else {
        PASSES_MAX_BLOCK
    };
    let max_block = (max_bytes / row_bytes.max(1)).max(16);
    let threads = threads.max(1);
    let kv_heads = kv_heads.max(1);
    // Blocks per head in steps that keep `kv_heads · blocks` a multiple of the threads.
    let step = threads / gcd(threads, kv_heads);
    let blocks_per_head = t
        .div_ceil(max_block)
        .next_multiple_of(step)
        .clamp(1, t.max(1));
    // At least one group: a step over no slots (`step_by(0)` would panic) gets one empty block.
    t.div_ceil(blocks_per_head).next_multiple_of(16).max(16)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// [`attend_one_naive`], split over (KV head, block of slots) in parallel; each task handles the
/// `G` query heads of its KV head so every cached key and value is read once. Blocks are merged
/// with the usual rescaling by `exp(max_block − max)`. Returns `[H, D]`.
///
/// The best block kernel for the CPU and the cache: with an 8-bit cache on AVX-512 VNNI the
/// query and the softmax weights are rounded to 8 bits as well ([`super::attend_vnni`]).
pub fn attend_one(a: &AttendOne<'_>) -> Vec<f32> {
    attend_one_with(a, &attend_block_dispatch)
}

/// A block kernel: the partial softmax of each query head of KV head `kvh` over slots
/// `start..end`.
pub(super) type BlockKernel = dyn Fn(&AttendOne<'_>, usize, usize, usize) -> Vec<Partial> + Sync;

/// [`attend_one`] with the given block kernel (the tests pick each kernel explicitly: a test
/// forcing the portable paths may run concurrently).
pub(super) fn attend_one_with(a: &AttendOne<'_>, kernel: &BlockKernel) -> Vec<f32> {
    let (d, g, t) = (a.dim, a.heads / a.kv_heads, a.visible.len());
    let threads = crate::team::threads();
    let row_bytes = match a.k {
        KvSlice::F32(_) => 4 * d,
        KvSlice::F16(_) => 2 * d,
        KvSlice::Q8_0(_) => super::kv::q8_0_bytes(d),
    };
    let block = block_slots(t, row_bytes, a.kv_heads, g, threads);
    let tasks: Vec<(usize, usize)> = (0..a.kv_heads)
        .flat_map(|kvh| (0..t).step_by(block).map(move |s| (kvh, s)))
        .collect();
    let work = |&(kvh, start): &(usize, usize)| kernel(a, kvh, start, (start + block).min(t));
    let partials: Vec<Vec<Partial>> =
        if tasks.len() > 1 && threads > 1 && t * d * g >= ATTEND_PARALLEL_MIN {
            let slots: Vec<std::sync::Mutex<Vec<Partial>>> = tasks
                .iter()
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect();
            crate::team::for_each(tasks.len(), &|i| {
                let p = work(&tasks[i]);
                *slots[i]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
            });
            slots
                .into_iter()
                .map(|m| {
                    m.into_inner()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                })
                .collect()
        } else {
            tasks.iter().map(work).collect()
        };
    let mut out = vec![0f32; a.heads * d];
    for kvh in 0..a.kv_heads {
        let mine: Vec<&Vec<Partial>> = tasks
            .iter()
            .zip(&partials)
            .filter(|((k, _), _)| *k == kvh)
            .map(|(_, p)| p)
            .collect();
        for gi in 0..g {
            let h = kvh * g + gi;
            let max = mine
                .iter()
                .map(|p| p[gi].max)
                .fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                continue; // nothing visible: zeros (cannot happen for a causal query, which sees itself)
            }
            let o = &mut out[h * d..(h + 1) * d];
            let mut sum = 0f32;
            for p in &mine {
                let p = &p[gi];
                if p.max == f32::NEG_INFINITY {
                    continue;
                }
                let c = (p.max - max).exp();
                sum += p.sum * c;
                for (x, y) in o.iter_mut().zip(&p.acc) {
                    *x += c * y;
                }
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    }
    out
}

/// [`avx2::attend_block`] when the CPU has AVX2 + FMA + F16C and `D` is a multiple of 8, else the
/// portable [`attend_block`].
/// Does this CPU read an 8-bit cache of head dim `dim` with the integer kernel
/// ([`super::attend_vnni`]: AVX-512 VNNI, `dim` a multiple of 64 up to 256)?
pub fn integer_attention(dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        dim.is_multiple_of(64)
            && dim <= 256
            && crate::cpu::has_avx512_vnni()
            && crate::cpu::has_avx2_fma_f16c()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dim;
        false
    }
}

fn attend_block_dispatch(a: &AttendOne<'_>, kvh: usize, start: usize, end: usize) -> Vec<Partial> {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!((a.k, a.v), (KvSlice::Q8_0(_), KvSlice::Q8_0(_))) && integer_attention(a.dim) {
            // SAFETY: the features were detected just above; the cache is 8-bit and `D` a
            // multiple of 64 up to 256, as the kernel requires.
            return unsafe { super::attend_vnni::attend_block(a, kvh, start, end) };
        }
        if a.dim.is_multiple_of(8) && crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the features the function is compiled for were detected just above, and
            // `D` is a multiple of 8 as it requires.
            return unsafe { avx2::attend_block(a, kvh, start, end) };
        }
    }
    attend_block(a, kvh, start, end)
}

/// The `G` query heads of KV head `kvh` against slots `start..end`, one head at a time (the
/// block is sized to stay in L2, so the second and later heads read it from cache): scores
/// `K·q` with a wide dot product, the block's max, exponentials (a branch-free loop the compiler
/// vectorises) and `Vᵀ·e` with a 64-wide accumulator held in registers.
#[inline(always)]
fn attend_block(a: &AttendOne<'_>, kvh: usize, start: usize, end: usize) -> Vec<Partial> {
    let (d, g) = (a.dim, a.heads / a.kv_heads);
    let len = end - start;
    let base = kvh * a.capacity;
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    let keys = a.k.f32_range((base + start) * d, (base + end) * d, &mut ks);
    let values = a.v.f32_range((base + start) * d, (base + end) * d, &mut vs);
    let vis = &a.visible[start..end];
    // Hidden slots get −∞ (their exponential is exactly 0).
    let mut e = vec![f32::NEG_INFINITY; len];
    let mut parts = Vec::with_capacity(g);
    for gi in 0..g {
        let h = kvh * g + gi;
        let q = &a.q[h * d..(h + 1) * d];
        for ((x, k), &seen) in e.iter_mut().zip(keys.chunks_exact(d)).zip(vis) {
            *x = if seen {
                dot_wide(q, k) * a.scale
            } else {
                f32::NEG_INFINITY
            };
        }
        let max = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut acc = vec![0f32; d];
        let mut sum = 0f32;
        if max != f32::NEG_INFINITY {
            for x in e.iter_mut() {
                *x = crate::cpu::math::exp(*x - max);
            }
            sum = e.iter().sum();
            // acc = Σ_j e_j · V_j, 64 columns at a time.
            let mut c0 = 0;
            while c0 + 64 <= d {
                let mut r = [0f32; 64];
                for (&w, v) in e.iter().zip(values.chunks_exact(d)) {
                    let v = &v[c0..c0 + 64];
                    for i in 0..64 {
                        r[i] += w * v[i];
                    }
                }
                acc[c0..c0 + 64].copy_from_slice(&r);
                c0 += 64;
            }
            if c0 < d {
                for (&w, v) in e.iter().zip(values.chunks_exact(d)) {
                    for (o, x) in acc[c0..].iter_mut().zip(&v[c0..]) {
                        *o += w * x;
                    }
                }
            }
        }
        parts.push(Partial { max, sum, acc });
    }
    parts
}

/// Dot product with 32 independent accumulators (four 8-lane chains with AVX2).
#[inline(always)]
fn dot_wide(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = [0f32; 8];
    for i in 0..8 {
        s[i] = (acc[i] + acc[i + 8]) + (acc[i + 16] + acc[i + 24]);
    }
    (s[0] + s[4]) + (s[1] + s[5]) + (s[2] + s[6]) + (s[3] + s[7]) + dot(ra, rb)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::avx2::{hsum, hsum8};
    use std::arch::x86_64::*;

    use super::HEADS_PER_PASS;

    /// [`super::attend_block`] with explicit AVX2, the group's query heads (up to
    /// [`HEADS_PER_PASS`] at a time) in one pass over the keys and one over the values, so each
    /// cached row is loaded once for all of them (the block comes from memory once, with no
    /// second pass from cache): per key, one FMA chain per head and a horizontal sum;
    /// eight-lane exponentials; `Vᵀ·e` 16 columns (one cache line of a row) at a time for every
    /// head of the pass in registers.
    ///
    /// An f16 cache is read as stored: eight halves widened by F16C right where they are used;
    /// an 8-bit one likewise, eight signed bytes widened and scaled by their block's scale.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and `a.dim` must be a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_block(
        a: &super::AttendOne<'_>,
        kvh: usize,
        start: usize,
        end: usize,
    ) -> Vec<super::Partial> {
        let d = a.dim;
        let (from, to) = ((kvh * a.capacity + start) * d, (kvh * a.capacity + end) * d);
        match (a.k, a.v) {
            (super::KvSlice::F16(k), super::KvSlice::F16(v)) => {
                block_of(a, kvh, start, end, &k[from..to], &v[from..to])
            }
            (super::KvSlice::Q8_0(k), super::KvSlice::Q8_0(v)) => {
                let (from, to) = (
                    crate::kernels::kv::q8_0_bytes(from),
                    crate::kernels::kv::q8_0_bytes(to),
                );
                block_of(a, kvh, start, end, &k[from..to], &v[from..to])
            }
            _ => {
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                let keys = a.k.f32_range(from, to, &mut ks);
                let values = a.v.f32_range(from, to, &mut vs);
                block_of(a, kvh, start, end, keys, values)
            }
        }
    }

    /// The element of a KV buffer's rows, read eight values at a time as f32 lanes.
    trait Lanes: Copy {
        /// Elements of a row of `d` values.
        fn width(d: usize) -> usize;
        /// Values `c..c + 8` of the row at `row` as f32 (`c` a multiple of 8).
        ///
        /// # Safety
        /// The row must be readable through value `c + 8`; the CPU must have AVX2 and F16C.
        unsafe fn load8(row: *const Self, c: usize) -> __m256;

        /// The `N` queries' dot products with the row of `d` values, as eight-lane partial
        /// sums (the caller sums the lanes).
        ///
        /// # Safety
        /// As [`Lanes::load8`] for the whole row; each query holds `d` values.
        #[inline(always)]
        unsafe fn dots<const N: usize>(
            row: *const Self,
            qs: &[*const f32; N],
            d: usize,
        ) -> [__m256; N] {
            let mut s = [_mm256_setzero_ps(); N];
            let mut c = 0;
            while c < d {
                let k8 = Self::load8(row, c);
                for i in 0..N {
                    s[i] = _mm256_fmadd_ps(k8, _mm256_loadu_ps(qs[i].add(c)), s[i]);
                }
                c += 8;
            }
            s
        }

        /// Values `c0..c0 + 32` of the row (`c0` a multiple of 32) as four f32 vectors, and the
        /// factor they are still to be multiplied by (an 8-bit block's scale; 1 otherwise).
        ///
        /// # Safety
        /// As [`Lanes::load8`] for columns `c0..c0 + 32`.
        #[inline(always)]
        unsafe fn load32(row: *const Self, c0: usize) -> ([__m256; 4], f32) {
            (std::array::from_fn(|k| Self::load8(row, c0 + 8 * k)), 1.0)
        }

        /// `r[k] += w · row[c0 + 8k .. c0 + 8k + 8]` for the 64 columns from `c0` (a multiple
        /// of 64).
        ///
        /// # Safety
        /// As [`Lanes::load8`] for columns `c0..c0 + 64`.
        #[inline(always)]
        unsafe fn axpy64(row: *const Self, c0: usize, w: f32, r: &mut [__m256; 8]) {
            let w = _mm256_set1_ps(w);
            for (k, rk) in r.iter_mut().enumerate() {
                *rk = _mm256_fmadd_ps(Self::load8(row, c0 + 8 * k), w, *rk);
            }
        }
    }

    impl Lanes for f32 {
        #[inline(always)]
        fn width(d: usize) -> usize {
            d
        }
        #[inline(always)]
        unsafe fn load8(row: *const f32, c: usize) -> __m256 {
            _mm256_loadu_ps(row.add(c))
        }
    }

    impl Lanes for half::f16 {
        #[inline(always)]
        fn width(d: usize) -> usize {
            d
        }
        #[inline(always)]
        unsafe fn load8(row: *const half::f16, c: usize) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(row.add(c) as *const __m128i))
        }
    }

    /// The bytes of 8-bit rows (`kernels/kv.rs`: per 32 values an f16 scale and 32 signed bytes).
    impl Lanes for u8 {
        #[inline(always)]
        fn width(d: usize) -> usize {
            crate::kernels::kv::q8_0_bytes(d)
        }
        #[inline(always)]
        unsafe fn load8(row: *const u8, c: usize) -> __m256 {
            use crate::kernels::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
            let blk = row.add(c / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
            let scale =
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    u16::from_le_bytes([*blk, *blk.add(1)]) as i32,
                )));
            let q = _mm_loadl_epi64(blk.add(2 + c % Q8_0_BLOCK) as *const __m128i);
            _mm256_mul_ps(
                _mm256_set1_ps(scale),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
            )
        }

        /// Per block: the 32 bytes widened unscaled into the queries' products, the block's
        /// sums scaled once (one multiply per block instead of one per eight values).
        #[inline(always)]
        unsafe fn dots<const N: usize>(
            row: *const u8,
            qs: &[*const f32; N],
            d: usize,
        ) -> [__m256; N] {
            use crate::kernels::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
            let mut s = [_mm256_setzero_ps(); N];
            for b in 0..d / Q8_0_BLOCK {
                let blk = row.add(b * Q8_0_BLOCK_BYTES);
                let mut t = [_mm256_setzero_ps(); N];
                for half in 0..2 {
                    let x = _mm_loadu_si128(blk.add(2 + 16 * half) as *const __m128i);
                    for (j, x) in [x, _mm_srli_si128::<8>(x)].into_iter().enumerate() {
                        let k8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
                        let c = b * Q8_0_BLOCK + 16 * half + 8 * j;
                        for i in 0..N {
                            t[i] = _mm256_fmadd_ps(k8, _mm256_loadu_ps(qs[i].add(c)), t[i]);
                        }
                    }
                }
                let scale = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    u16::from_le_bytes([*blk, *blk.add(1)]) as i32,
                ))));
                for i in 0..N {
                    s[i] = _mm256_fmadd_ps(t[i], scale, s[i]);
                }
            }
            s
        }

        /// The block's 32 bytes widened, and its scale.
        #[inline(always)]
        unsafe fn load32(row: *const u8, c0: usize) -> ([__m256; 4], f32) {
            use crate::kernels::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
            let blk = row.add(c0 / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
            let scale =
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    u16::from_le_bytes([*blk, *blk.add(1)]) as i32,
                )));
            let (x0, x1) = (
                _mm_loadu_si128(blk.add(2) as *const __m128i),
                _mm_loadu_si128(blk.add(18) as *const __m128i),
            );
            let w = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
            (
                [
                    w(x0),
                    w(_mm_srli_si128::<8>(x0)),
                    w(x1),
                    w(_mm_srli_si128::<8>(x1)),
                ],
                scale,
            )
        }

        /// The two blocks of the 64 columns, each with its weight `w·scale`.
        #[inline(always)]
        unsafe fn axpy64(row: *const u8, c0: usize, w: f32, r: &mut [__m256; 8]) {
            use crate::kernels::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
            for b in 0..2 {
                let blk = row.add((c0 / Q8_0_BLOCK + b) * Q8_0_BLOCK_BYTES);
                let scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                    *blk,
                    *blk.add(1),
                ])
                    as i32)));
                let ws = _mm256_set1_ps(w * scale);
                for half in 0..2 {
                    let x = _mm_loadu_si128(blk.add(2 + 16 * half) as *const __m128i);
                    for (j, x) in [x, _mm_srli_si128::<8>(x)].into_iter().enumerate() {
                        let k = 4 * b + 2 * half + j;
                        r[k] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)), ws, r[k]);
                    }
                }
            }
        }
    }

    /// [`attend_block`] on the block's keys and values (`end − start` rows of `D` values each,
    /// stored as `E`).
    ///
    /// # Safety
    /// As [`attend_block`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_of<E: Lanes>(
        a: &super::AttendOne<'_>,
        kvh: usize,
        start: usize,
        end: usize,
        keys: &[E],
        values: &[E],
    ) -> Vec<super::Partial> {
        let (d, g) = (a.dim, a.heads / a.kv_heads);
        assert!(d % 8 == 0, "attend_block: D must be a multiple of 8");
        let len = end - start;
        let width = E::width(d);
        assert!(
            keys.len() >= len * width && values.len() >= len * width,
            "attend_block: short block"
        );
        let padded = len.div_ceil(8) * 8;
        let vis = &a.visible[start..end];
        let mut parts = Vec::with_capacity(g);
        // Scores of the pass's heads, `[head, padded]`; padding lanes stay −∞ (exp → 0).
        let mut e = vec![f32::NEG_INFINITY; HEADS_PER_PASS * padded];
        for h0 in (0..g).step_by(HEADS_PER_PASS) {
            let nh = HEADS_PER_PASS.min(g - h0);
            let args = Pass {
                a,
                keys,
                values,
                vis,
                first: kvh * g + h0,
                e: &mut e[..],
            };
            match nh {
                1 => heads_pass::<1, E>(args, &mut parts),
                2 => heads_pass::<2, E>(args, &mut parts),
                3 => heads_pass::<3, E>(args, &mut parts),
                _ => heads_pass::<HEADS_PER_PASS, E>(args, &mut parts),
            }
        }
        parts
    }

    /// What one pass of [`attend_block`] reads: the block's keys, values and visibility, the
    /// first query head of the pass, and the score scratch (`[HEADS_PER_PASS, padded len]`).
    struct Pass<'p, 'a, E> {
        a: &'p super::AttendOne<'a>,
        keys: &'p [E],
        values: &'p [E],
        vis: &'p [bool],
        first: usize,
        e: &'p mut [f32],
    }

    /// One pass of [`attend_block`] for the `N` query heads from `first`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C ([`crate::cpu::has_avx2_fma_f16c`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn heads_pass<const N: usize, E: Lanes>(
        p: Pass<'_, '_, E>,
        parts: &mut Vec<super::Partial>,
    ) {
        let Pass {
            a,
            keys,
            values,
            vis,
            first,
            e,
        } = p;
        let d = a.dim;
        let len = vis.len();
        let padded = len.div_ceil(8) * 8;
        e.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        let qs: [*const f32; N] = std::array::from_fn(|i| a.q.as_ptr().add((first + i) * d));
        let mut max = [f32::NEG_INFINITY; N];
        // Eight keys at a time: their partial sums reduced together ([`hsum8`]), the scores of
        // hidden slots −∞; the last keys one by one.
        let (scale, ninf) = (_mm256_set1_ps(a.scale), _mm256_set1_ps(f32::NEG_INFINITY));
        let mut max8 = [ninf; N];
        let whole = len - len % 8;
        for j0 in (0..whole).step_by(8) {
            let seen = &vis[j0..j0 + 8];
            if !seen.iter().any(|&v| v) {
                continue;
            }
            let mut part = [[_mm256_setzero_ps(); 8]; N];
            for (k, &v) in seen.iter().enumerate() {
                if v {
                    let s = E::dots::<N>(keys.as_ptr().add((j0 + k) * E::width(d)), &qs, d);
                    for i in 0..N {
                        part[i][k] = s[i];
                    }
                }
            }
            let mask = _mm256_castsi256_ps(_mm256_set_epi32(
                -i32::from(seen[7]),
                -i32::from(seen[6]),
                -i32::from(seen[5]),
                -i32::from(seen[4]),
                -i32::from(seen[3]),
                -i32::from(seen[2]),
                -i32::from(seen[1]),
                -i32::from(seen[0]),
            ));
            for i in 0..N {
                let sc = _mm256_blendv_ps(ninf, _mm256_mul_ps(hsum8(&part[i]), scale), mask);
                _mm256_storeu_ps(e.as_mut_ptr().add(i * padded + j0), sc);
                max8[i] = _mm256_max_ps(max8[i], sc);
            }
        }
        for i in 0..N {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), max8[i]);
            max[i] = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
        for j in (whole..len).filter(|&j| vis[j]) {
            let s = E::dots::<N>(keys.as_ptr().add(j * E::width(d)), &qs, d);
            for i in 0..N {
                let sc = hsum(s[i]) * a.scale;
                *e.get_unchecked_mut(i * padded + j) = sc;
                max[i] = max[i].max(sc);
            }
        }
        let mut sums = [0f32; N];
        for i in 0..N {
            let row = e.as_mut_ptr().add(i * padded);
            if max[i] == f32::NEG_INFINITY {
                // Nothing visible for this head: zero weights, and a partial that merges to nothing.
                std::slice::from_raw_parts_mut(row, padded).fill(0.0);
                continue;
            }
            let m8 = _mm256_set1_ps(max[i]);
            let mut s8 = _mm256_setzero_ps();
            for j in (0..padded).step_by(8) {
                let x =
                    crate::cpu::math::avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(row.add(j)), m8));
                _mm256_storeu_ps(row.add(j), x);
                s8 = _mm256_add_ps(s8, x);
            }
            sums[i] = hsum(s8);
        }
        // acc[i] = Σ_j e[i, j] · V_j, per head, 64 columns at a time in eight accumulators (the
        // block's values come from memory for the first head, from cache for the others).
        let mut acc = vec![0f32; N * d];
        // 32 columns at a time: each key's values widened once, then added into every head's
        // four accumulators with the head's weight (times the block's scale).
        let mut c0 = 0;
        while c0 + 32 <= d {
            let mut r = [[_mm256_setzero_ps(); 4]; N];
            for j in 0..len {
                let (v, f) = E::load32(values.as_ptr().add(j * E::width(d)), c0);
                for (i, ri) in r.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(*e.get_unchecked(i * padded + j) * f);
                    for (rk, vk) in ri.iter_mut().zip(v) {
                        *rk = _mm256_fmadd_ps(vk, w, *rk);
                    }
                }
            }
            for (i, ri) in r.iter().enumerate() {
                for (k, rk) in ri.iter().enumerate() {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(i * d + c0 + 8 * k), *rk);
                }
            }
            c0 += 32;
        }
        for i in 0..N {
            let w_row = &e[i * padded..i * padded + len];
            let out = acc.as_mut_ptr().add(i * d);
            let mut c0 = c0;
            while c0 + 64 <= d {
                let mut r = [_mm256_setzero_ps(); 8];
                for (j, &w) in w_row.iter().enumerate() {
                    E::axpy64(values.as_ptr().add(j * E::width(d)), c0, w, &mut r);
                }
                for (k, rk) in r.iter().enumerate() {
                    _mm256_storeu_ps(out.add(c0 + 8 * k), *rk);
                }
                c0 += 64;
            }
            while c0 < d {
                let mut r = _mm256_setzero_ps();
                for (j, &w) in w_row.iter().enumerate() {
                    r = _mm256_fmadd_ps(
                        E::load8(values.as_ptr().add(j * E::width(d)), c0),
                        _mm256_set1_ps(w),
                        r,
                    );
                }
                _mm256_storeu_ps(out.add(c0), r);
                c0 += 8;
            }
        }
        for i in 0..N {
            parts.push(super::Partial {
                max: max[i],
                sum: sums[i],
                acc: acc[i * d..(i + 1) * d].to_vec(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{kv, Q8_0_BLOCK};
    use super::*;
    use crate::testutil::{assert_close, rand_vec};

    /// The answer of each float block kernel this CPU can run, picked explicitly (not through
    /// the dispatch, which a concurrent test forcing the portable paths may change).
    fn each_kernel(a: &AttendOne<'_>) -> Vec<Vec<f32>> {
        let mut out = vec![attend_one_with(a, &attend_block)];
        #[cfg(target_arch = "x86_64")]
        if a.dim.is_multiple_of(8) && crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the features were detected just above and D is a multiple of 8.
            let avx = attend_one_with(a, &|a, kvh, s, e| unsafe {
                avx2::attend_block(a, kvh, s, e)
            });
            out.push(avx);
        }
        out
    }

    /// Blocks are whole groups of 16 slots, stay within the largest block (or are a single
    /// group) and give every thread one at least; with more heads than one pass takes they stay
    /// small enough to be read again from the L2 cache. Where the slots split into equal whole
    /// groups, every thread gets as many blocks.
    #[test]
    fn blocks_balance_the_threads_within_their_size() {
        for t in [0, 1, 15, 16, 100, 1000, 8192, 32768, 100_000] {
            for row in [68, 256, 512] {
                for kv_heads in [1, 2, 3, 8] {
                    for g in [1, 3, 4, 5, 7] {
                        for threads in [1, 2, 3, 16] {
                            let b = block_slots(t, row, kv_heads, g, threads);
                            let blocks = t.div_ceil(b);
                            let case = format!("t {t} row {row} heads {kv_heads} g {g} threads {threads}: block {b}");
                            assert!(b.is_multiple_of(16) && b >= 16, "{case}");
                            let max = if g <= HEADS_PER_PASS {
                                ONE_PASS_MAX_BLOCK
                            } else {
                                PASSES_MAX_BLOCK
                            };
                            assert!(b == 16 || b * row <= max + 16 * row, "{case}");
                            if t >= 16 * threads {
                                // Enough slots: a block for every thread.
                                assert!(kv_heads * blocks >= threads, "{case}");
                            }
                        }
                    }
                }
            }
        }
        // SmolLM2 at 8192 and 32768 slots, 8-bit, 2 threads: an even number of blocks per
        // head (3 heads); a 1B-class model (8 heads) at 8192: one per head.
        assert_eq!(block_slots(8192, 68, 3, 3, 2), 4096);
        assert_eq!(32768usize.div_ceil(block_slots(32768, 68, 3, 3, 2)) % 2, 0);
        assert_eq!(block_slots(8192, 68, 8, 4, 2), 8192);
    }

    #[test]
    fn attend_one_matches_naive() {
        for &(heads, kv_heads, dim, cap, t) in &[
            (1, 1, 4, 4, 1),
            (4, 2, 8, 16, 5),
            (9, 3, 64, 1100, 1030),
            (6, 6, 5, 40, 37),
            (8, 1, 16, 3000, 3000),
            (4, 2, 32, 70, 65),
            (2, 1, 128, 300, 257),
        ] {
            let q = rand_vec(heads * dim, 1);
            let k = rand_vec(kv_heads * cap * dim, 2);
            let v = rand_vec(kv_heads * cap * dim, 3);
            // Some hidden slots (a layer window), never all.
            let visible: Vec<bool> = (0..t).map(|j| j == t - 1 || j % 7 != 3).collect();
            let a = AttendOne {
                q: &q,
                k: KvSlice::F32(&k),
                v: KvSlice::F32(&v),
                visible: &visible,
                heads,
                kv_heads,
                dim,
                capacity: cap,
                scale: 0.125,
            };
            let exact = attend_one(&a);
            assert_close(&exact, &attend_one_naive(&a), 1e-5);
            // An f16 cache: the kernel reads exactly what the naive definition reads, and the
            // answer moves by about the rounding of the values (2⁻¹¹ relative).
            let half = |x: &[f32]| -> Vec<half::f16> {
                x.iter().map(|&y| half::f16::from_f32(y)).collect()
            };
            let (k16, v16) = (half(&k), half(&v));
            let a16 = AttendOne {
                k: KvSlice::F16(&k16),
                v: KvSlice::F16(&v16),
                ..a
            };
            let compact = attend_one(&a16);
            assert_close(&compact, &exact, 2e-3);
            for out in each_kernel(&a16) {
                assert_close(&out, &attend_one_naive(&a16), 1e-5);
            }
            // An 8-bit cache (heads of a multiple of 32): read in place by the AVX2 kernel, in
            // dequantized blocks by the portable one, the same values as the naive definition;
            // the answer moves by about the quantization (1/254 of a block's largest value), also
            // where the query is rounded to 8 bits as well (the VNNI kernel, tested in
            // `attend_vnni.rs`).
            if dim % Q8_0_BLOCK == 0 {
                let (mut k8, mut v8) = (Vec::new(), Vec::new());
                kv::quantize_q8_0(&k, &mut k8);
                kv::quantize_q8_0(&v, &mut v8);
                let a8 = AttendOne {
                    k: KvSlice::Q8_0(&k8),
                    v: KvSlice::Q8_0(&v8),
                    ..a
                };
                assert_close(&attend_one(&a8), &exact, 2e-2);
                for out in each_kernel(&a8) {
                    assert_close(&out, &attend_one_naive(&a8), 1e-5);
                }
            }
        }
    }
}
