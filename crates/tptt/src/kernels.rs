//! CPU kernels of the fused single-token decode step ([`crate::model`]'s `step` module): matrix ×
//! vector products over row-major f32 weights, and one query's attention over the KV ring.
//!
//! Decode at batch 1 is bound by memory bandwidth: every weight is read once per token and used
//! for one multiply-add. So the kernels stream each matrix once, row after row, split across the
//! rayon pool in a few large contiguous pieces (one parallel region per group of matrices that
//! read the same input), one row at a time with several independent accumulators, compiled twice: for AVX2 + FMA, picked at run time, and for the baseline target, so the binary
//! still runs on older x86-64 CPUs.
//!
//! Each kernel has a naive reference beside it (`*_naive`), and tests comparing them on odd
//! shapes; the whole step is compared with the tensor path by `tests/fused_step.rs`.

pub mod kv;
pub mod prefill;
pub mod q4_1;

pub use kv::KvSlice;

/// Rows per parallel task of a matrix × vector product: large enough that the task overhead
/// (a few µs) is small against streaming its rows, small enough to balance two or more threads.
const MIN_TASK_ELEMS: usize = 64 * 1024;

/// Bytes of one GGML Q8_0 block: an f16 scale `d` and 32 signed bytes `q`, value `d·q`.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// The rows of a matrix, row-major `[rows, x.len()]`.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// GGML Q8_0 blocks (`x.len()` a multiple of 32), as stored by candle / llama.cpp.
    Q8_0(&'a [u8]),
    /// GGML Q4_1 blocks (`x.len()` a multiple of 32), as stored ([`q4_1`]).
    Q4_1(&'a [u8]),
}

impl<'a> Rows<'a> {
    /// Split after `rows` rows of `cols` values.
    fn split_rows(self, rows: usize, cols: usize) -> (Self, Self) {
        match self {
            Rows::F32(w) => {
                let (a, b) = w.split_at(rows * cols);
                (Rows::F32(a), Rows::F32(b))
            }
            Rows::Q8_0(w) => {
                let (a, b) = w.split_at(rows * cols / Q8_0_BLOCK * Q8_0_BLOCK_BYTES);
                (Rows::Q8_0(a), Rows::Q8_0(b))
            }
            Rows::Q4_1(w) => {
                let (a, b) = w.split_at(rows * cols / Q8_0_BLOCK * q4_1::Q4_1_BLOCK_BYTES);
                (Rows::Q4_1(a), Rows::Q4_1(b))
            }
        }
    }

    /// Does it hold exactly `rows` rows of `cols` values?
    pub fn fits(&self, rows: usize, cols: usize) -> bool {
        match self {
            Rows::F32(w) => w.len() == rows * cols,
            Rows::Q8_0(w) => {
                cols.is_multiple_of(Q8_0_BLOCK)
                    && w.len() == rows * cols / Q8_0_BLOCK * Q8_0_BLOCK_BYTES
            }
            Rows::Q4_1(w) => {
                cols.is_multiple_of(Q8_0_BLOCK)
                    && w.len() == rows * cols / Q8_0_BLOCK * q4_1::Q4_1_BLOCK_BYTES
            }
        }
    }
}

/// One product `out = W·x` (+ `bias`) of a group: `w` is row-major `[out.len(), x.len()]`.
pub struct MatVec<'a> {
    /// Row-major weights.
    pub w: Rows<'a>,
    /// Optional bias, `[out.len()]`.
    pub bias: Option<&'a [f32]>,
    /// The result.
    pub out: &'a mut [f32],
}

/// `out[r] = Σ_c w[r, c]·x[c]`, the literal definition (the reference for [`matvec_group`]).
pub fn matvec_naive(w: &[f32], x: &[f32], out: &mut [f32]) {
    let n = x.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = w[r * n..(r + 1) * n]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum();
    }
}

/// `out[r] = Σ_b d_rb · Σ_i q_rbi · x[32b + i]`: Q8_0 rows dequantized value by value against
/// the f32 input (the exact product; [`matvec_group`] quantizes the input first, as llama.cpp).
pub fn matvec_q8_0_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    let blocks = x.len() / Q8_0_BLOCK;
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let blk =
                &w[(r * blocks + b) * Q8_0_BLOCK_BYTES..(r * blocks + b + 1) * Q8_0_BLOCK_BYTES];
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let dot: f32 = blk[2..]
                .iter()
                .zip(&x[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK])
                .map(|(&q, &x)| q as i8 as f32 * x)
                .sum();
            acc += d * dot;
        }
        *o = acc;
    }
}

/// Run every product of `group` against the same input `x`, in parallel over row blocks of all
/// of them together (one parallel region for e.g. the q, k and v projections).
///
/// # Panics
/// When a matrix does not hold `out.len()` rows of `x.len()` values ([`Rows::fits`]).
pub fn matvec_group(group: Vec<MatVec<'_>>, x: &[f32]) {
    let n = x.len();
    let total: usize = group.iter().map(|m| m.out.len() * n).sum();
    let threads = crate::team::threads();
    // About 4 tasks per thread for balance, but never tiny ones.
    let task_elems = (total / (threads * 4)).max(MIN_TASK_ELEMS);
    let rows_per_task = (task_elems / n.max(1)).max(4);
    let mut tasks: Vec<MatVec<'_>> = Vec::new();
    for m in group {
        assert!(
            m.w.fits(m.out.len(), n),
            "matvec: weights do not match [{}, {n}]",
            m.out.len()
        );
        let mut w = m.w;
        let mut bias = m.bias;
        let mut out = m.out;
        while !out.is_empty() {
            let rows = rows_per_task.min(out.len());
            let (o, rest) = out.split_at_mut(rows);
            let (wc, wrest) = w.split_rows(rows, n);
            let (bc, brest) = match bias {
                Some(b) => {
                    let (a, r) = b.split_at(rows);
                    (Some(a), Some(r))
                }
                None => (None, None),
            };
            tasks.push(MatVec {
                w: wc,
                bias: bc,
                out: o,
            });
            out = rest;
            w = wrest;
            bias = brest;
        }
    }
    // Quantized matrices read the input quantized once (as candle's and llama.cpp's kernels
    // do); Q4_1's also need each input block's sum.
    let xq = if tasks.iter().any(|t| !matches!(t.w, Rows::F32(_))) {
        Some(quantize_q8_0(x))
    } else {
        None
    };
    let xs = match &xq {
        Some((q, d)) if tasks.iter().any(|t| matches!(t.w, Rows::Q4_1(_))) => {
            q4_1::block_sums(q, d)
        }
        _ => Vec::new(),
    };
    let run = |t: MatVec<'_>| {
        match (t.w, &xq) {
            (Rows::F32(w), _) => matvec_rows(w, x, t.out),
            (Rows::Q8_0(w), Some((q, d))) => matvec_q8_0_rows(w, q, d, t.out),
            (Rows::Q8_0(w), None) => matvec_q8_0_naive(w, x, t.out),
            (Rows::Q4_1(w), Some((q, d))) => q4_1::matvec_q4_1_rows(w, q, d, &xs, t.out),
            (Rows::Q4_1(w), None) => q4_1::matvec_q4_1_naive(w, x, t.out),
        }
        if let Some(b) = t.bias {
            t.out.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    };
    if tasks.len() > 1 && threads > 1 {
        let n = tasks.len();
        let slots: Vec<std::sync::Mutex<Option<MatVec<'_>>>> = tasks
            .into_iter()
            .map(|t| std::sync::Mutex::new(Some(t)))
            .collect();
        crate::team::for_each(n, &|i| {
            // A poisoned lock only follows a panicking task, which the caller re-raises anyway.
            if let Some(t) = slots[i]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                run(t);
            }
        });
    } else {
        tasks.into_iter().for_each(run);
    }
}

/// Serial `out = W·x` over the rows of `w`, with the best kernel for this CPU.
fn matvec_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU has the features the function is compiled for (checked above), and
            // `w` holds `out.len()` rows of `x.len()` values (checked inside).
            unsafe { avx2::matvec_rows(w, x, out) };
            return;
        }
    }
    matvec_rows_generic(w, x, out);
}

/// The input quantized as llama.cpp and candle do for Q8_0 products: per block of 32,
/// `d = max|x| / 127` (kept as f16), `q = round(x / d)`. Returns the bytes and the scales.
pub fn quantize_q8_0(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut ds = Vec::with_capacity(x.len() / Q8_0_BLOCK);
    for blk in x.chunks_exact(Q8_0_BLOCK) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        q.extend(blk.iter().map(|v| (v * id).round() as i8));
        ds.push(half::f16::from_f32(d).to_f32());
    }
    (q, ds)
}

/// Q8_0 rows against a Q8_0-quantized input, the literal definition (the reference for the
/// SIMD kernel): `Σ_b d_wb · d_xb · Σ_i q_wbi · q_xbi`.
pub fn matvec_q8_0_quantized_naive(w: &[u8], xq: &[i8], xd: &[f32], out: &mut [f32]) {
    let blocks = xd.len();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for (b, &dx) in xd.iter().enumerate() {
            let blk =
                &w[(r * blocks + b) * Q8_0_BLOCK_BYTES..(r * blocks + b + 1) * Q8_0_BLOCK_BYTES];
            let dw = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let dot: i32 = blk[2..]
                .iter()
                .zip(&xq[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK])
                .map(|(&qw, &qx)| qw as i8 as i32 * qx as i32)
                .sum();
            acc += dot as f32 * (dw * dx);
        }
        *o = acc;
    }
}

/// Serial Q8_0 `out = W·x` on the quantized input, with the best kernel for this CPU.
fn matvec_q8_0_rows(w: &[u8], xq: &[i8], xd: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_q8_0_rows(w, xq, xd, out) };
            return;
        }
    }
    matvec_q8_0_quantized_naive(w, xq, xd, out);
}

/// Portable kernel: one row at a time, eight accumulators (vectorised by the compiler).
fn matvec_rows_generic(w: &[f32], x: &[f32], out: &mut [f32]) {
    let n = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(n.max(1))) {
        *o = dot(row, x);
    }
}

/// Dot product with eight independent accumulators.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sum of the eight lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `out = W·x`, one row at a time with four 8-lane FMA accumulators (independent chains
    /// hide the FMA latency). Measured here: a single sequential stream per row reads at close to
    /// the streaming bandwidth, where interleaving four rows to share the loads of `x` did not.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matvec_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
        let n = x.len();
        assert!(w.len() >= out.len() * n, "matvec: weights too short");
        let xp = x.as_ptr();
        for (r, o) in out.iter_mut().enumerate() {
            let p = w.as_ptr().add(r * n);
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 32 <= n {
                for (j, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(p.add(c + 8 * j)),
                        _mm256_loadu_ps(xp.add(c + 8 * j)),
                        *acc,
                    );
                }
                c += 32;
            }
            while c + 8 <= n {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(c)), _mm256_loadu_ps(xp.add(c)), a[0]);
                c += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while c < n {
                s += *p.add(c) * *xp.add(c);
                c += 1;
            }
            *o = s;
        }
    }

    /// Q8_0 rows against the input quantized to Q8_0 blocks (`xq`: 32 signed bytes per block,
    /// `xd`: their scales): per block a 32-wide signed byte dot product (`maddubs` on |w| and
    /// sign-adjusted x, then pairs summed to 8 × i32), scaled by `d_w·d_x`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matvec_q8_0_rows(w: &[u8], xq: &[i8], xd: &[f32], out: &mut [f32]) {
        use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
        let blocks = xd.len();
        assert!(
            xq.len() == blocks * Q8_0_BLOCK && w.len() >= out.len() * blocks * Q8_0_BLOCK_BYTES,
            "matvec_q8_0: sizes"
        );
        let ones = _mm256_set1_epi16(1);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * blocks * Q8_0_BLOCK_BYTES);
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let block = |b: usize| -> __m256 {
                let p = row.add(b * Q8_0_BLOCK_BYTES);
                let dw =
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        u16::from_le_bytes([*p, *p.add(1)]) as i32,
                    )));
                let qw = _mm256_loadu_si256(p.add(2) as *const __m256i);
                let qx = _mm256_loadu_si256(xq.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i);
                let prod = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)),
                    ones,
                );
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(prod),
                    _mm256_set1_ps(dw * *xd.get_unchecked(b)),
                )
            };
            let mut b = 0;
            while b + 2 <= blocks {
                acc0 = _mm256_add_ps(acc0, block(b));
                acc1 = _mm256_add_ps(acc1, block(b + 1));
                b += 2;
            }
            if b < blocks {
                acc0 = _mm256_add_ps(acc0, block(b));
            }
            *o = hsum(_mm256_add_ps(acc0, acc1));
        }
    }

    /// Heads handled together in one pass over a block's keys and values.
    const HEADS_PER_PASS: usize = 4;

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
                let (from, to) = (super::kv::q8_0_bytes(from), super::kv::q8_0_bytes(to));
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
            super::kv::q8_0_bytes(d)
        }
        #[inline(always)]
        unsafe fn load8(row: *const u8, c: usize) -> __m256 {
            use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
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
            use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
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

        /// The two blocks of the 64 columns, each with its weight `w·scale`.
        #[inline(always)]
        unsafe fn axpy64(row: *const u8, c0: usize, w: f32, r: &mut [__m256; 8]) {
            use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
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
        for (j, _) in vis.iter().enumerate().filter(|(_, &seen)| seen) {
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
        for i in 0..N {
            let w_row = &e[i * padded..i * padded + len];
            let out = acc.as_mut_ptr().add(i * d);
            let mut c0 = 0;
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
        let q = &a.q[h * d..(h + 1) * d];
        let scores: Vec<f32> = (0..a.visible.len())
            .map(|j| {
                let k = &ks[(kvh * a.capacity + j) * d..(kvh * a.capacity + j + 1) * d];
                if a.visible[j] {
                    q.iter().zip(k).map(|(x, y)| x * y).sum::<f32>() * a.scale
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
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

/// Partial softmax of one block of slots for one query head: running max, sum of exponentials
/// and the unnormalised weighted sum of values (flash-decoding).
struct Partial {
    max: f32,
    sum: f32,
    acc: Vec<f32>,
}

/// [`attend_one_naive`], split over (KV head, block of slots) in parallel; each task handles the
/// `G` query heads of its KV head so every cached key and value is read once. Blocks are merged
/// with the usual rescaling by `exp(max_block − max)`. Returns `[H, D]`.
pub fn attend_one(a: &AttendOne<'_>) -> Vec<f32> {
    let (d, g, t) = (a.dim, a.heads / a.kv_heads, a.visible.len());
    let threads = crate::team::threads();
    // Blocks of at most ~64 KiB of keys (they stay in L2 while the G heads read them), and
    // enough of them for every thread.
    let max_block = (64 * 1024 / (4 * d.max(1))).max(16);
    let blocks_per_head = t
        .div_ceil(max_block)
        .max((threads * 2).div_ceil(a.kv_heads))
        .clamp(1, t.max(1));
    let block = t.div_ceil(blocks_per_head).max(1);
    let tasks: Vec<(usize, usize)> = (0..a.kv_heads)
        .flat_map(|kvh| (0..t).step_by(block).map(move |s| (kvh, s)))
        .collect();
    let work = |&(kvh, start): &(usize, usize)| {
        attend_block_dispatch(a, kvh, start, (start + block).min(t))
    };
    let partials: Vec<Vec<Partial>> = if tasks.len() > 1 && threads > 1 && t * d * g >= 256 * 1024 {
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
fn attend_block_dispatch(a: &AttendOne<'_>, kvh: usize, start: usize, end: usize) -> Vec<Partial> {
    #[cfg(target_arch = "x86_64")]
    {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "index {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn matvec_matches_naive_on_odd_shapes() {
        for &(rows, cols) in &[
            (1, 1),
            (3, 7),
            (4, 8),
            (5, 16),
            (9, 17),
            (37, 64),
            (130, 576),
            (1000, 33),
            (4099, 129),
        ] {
            let w = rand_vec(rows * cols, rows as u64 * 31 + cols as u64);
            let x = rand_vec(cols, 7);
            let bias = rand_vec(rows, 9);
            let mut want = vec![0f32; rows];
            matvec_naive(&w, &x, &mut want);
            want.iter_mut().zip(&bias).for_each(|(o, b)| *o += b);
            let mut got = vec![0f32; rows];
            let mut got2 = vec![0f32; rows / 2 + 1];
            let w2 = rand_vec(got2.len() * cols, 3);
            let mut want2 = vec![0f32; got2.len()];
            matvec_naive(&w2, &x, &mut want2);
            matvec_group(
                vec![
                    MatVec {
                        w: Rows::F32(&w),
                        bias: Some(&bias),
                        out: &mut got,
                    },
                    MatVec {
                        w: Rows::F32(&w2),
                        bias: None,
                        out: &mut got2,
                    },
                ],
                &x,
            );
            close(&got, &want, 1e-5);
            close(&got2, &want2, 1e-5);
            let mut generic = vec![0f32; rows];
            matvec_rows_generic(&w, &x, &mut generic);
            want.iter_mut().zip(&bias).for_each(|(o, b)| *o -= b);
            close(&generic, &want, 1e-5);
        }
    }

    /// Q8_0 blocks of random scales and bytes, `rows × cols`.
    fn q8_0_rows(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let vals = rand_vec(rows * cols / Q8_0_BLOCK * 33, seed);
        let mut out = Vec::new();
        for blk in vals.chunks_exact(33) {
            out.extend_from_slice(&half::f16::from_f32(blk[0] * 0.05).to_le_bytes());
            out.extend(blk[1..].iter().map(|v| ((v * 127.0) as i8) as u8));
        }
        out
    }

    #[test]
    fn q8_0_matvec_matches_naive_and_dequantized() {
        for &(rows, cols) in &[(1, 32), (3, 64), (7, 576), (130, 1536), (1001, 96)] {
            let w = q8_0_rows(rows, cols, rows as u64 + cols as u64);
            let x = rand_vec(cols, 5);
            let mut want = vec![0f32; rows];
            matvec_q8_0_naive(&w, &x, &mut want);
            // The naive kernel against an explicit dequantization.
            let deq: Vec<f32> = w
                .chunks_exact(Q8_0_BLOCK_BYTES)
                .flat_map(|b| {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    b[2..]
                        .iter()
                        .map(move |&q| d * (q as i8) as f32)
                        .collect::<Vec<_>>()
                })
                .collect();
            let mut dense = vec![0f32; rows];
            matvec_naive(&deq, &x, &mut dense);
            // Sums of many terms of mixed signs: compare within f32 rounding of Σ|terms|.
            let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let abs_w: Vec<f32> = deq.iter().map(|v| v.abs()).collect();
            let mut mag = vec![0f32; rows];
            matvec_naive(&abs_w, &abs_x, &mut mag);
            let within = |a: &[f32], b: &[f32]| {
                for (i, ((p, q), m)) in a.iter().zip(b).zip(&mag).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + m),
                        "row {i}: {p} vs {q} (Σ|terms| {m})"
                    );
                }
            };
            within(&want, &dense);
            // The kernel path (input quantized) against its literal definition, exactly up to
            // summation order, and against the exact product within the input's quantization.
            let (xq, xd) = quantize_q8_0(&x);
            let mut want_q = vec![0f32; rows];
            matvec_q8_0_quantized_naive(&w, &xq, &xd, &mut want_q);
            let bias = rand_vec(rows, 3);
            let mut got = vec![0f32; rows];
            matvec_group(
                vec![MatVec {
                    w: Rows::Q8_0(&w),
                    bias: Some(&bias),
                    out: &mut got,
                }],
                &x,
            );
            got.iter_mut().zip(&bias).for_each(|(o, b)| *o -= b);
            within(&got, &want_q);
            for (i, ((g, e), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                assert!(
                    (g - e).abs() <= 0.01 * m,
                    "row {i}: {g} vs exact {e} (Σ|terms| {m})"
                );
            }
        }
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
            close(&exact, &attend_one_naive(&a), 1e-5);
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
            close(&compact, &attend_one_naive(&a16), 1e-5);
            close(&compact, &exact, 2e-3);
            crate::cpu::force_portable(true);
            close(&attend_one(&a16), &compact, 1e-5);
            crate::cpu::force_portable(false);
            // An 8-bit cache (heads of a multiple of 32): read in place by the AVX2 kernel, in
            // dequantized blocks by the portable one, the same values as the naive definition;
            // the answer moves by about the quantization (1/254 of a block's largest value).
            if dim % Q8_0_BLOCK == 0 {
                let (mut k8, mut v8) = (Vec::new(), Vec::new());
                kv::quantize_q8_0(&k, &mut k8);
                kv::quantize_q8_0(&v, &mut v8);
                let a8 = AttendOne {
                    k: KvSlice::Q8_0(&k8),
                    v: KvSlice::Q8_0(&v8),
                    ..a
                };
                let eight = attend_one(&a8);
                close(&eight, &attend_one_naive(&a8), 1e-5);
                close(&eight, &exact, 2e-2);
                crate::cpu::force_portable(true);
                close(&attend_one(&a8), &eight, 1e-5);
                crate::cpu::force_portable(false);
            }
        }
    }
}
