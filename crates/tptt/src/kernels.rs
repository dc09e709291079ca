//! CPU kernels of the fused single-token decode step ([`crate::model`]'s `step` module): matrix ×
//! vector products over row-major weights (f32, or GGML blocks used as stored: Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q4_K, Q5_K, Q6_K); one query's attention over the KV ring is in `attend.rs`.
//!
//! Decode at batch 1 is bound by memory bandwidth: every weight is read once per token and used
//! for one multiply-add. So the kernels stream each matrix once, row after row, split across the
//! rayon pool in a few large contiguous pieces (one parallel region per group of matrices that
//! read the same input), one row at a time with several independent accumulators, compiled twice: for AVX2 + FMA, picked at run time, and for the baseline target, so the binary
//! still runs on older x86-64 CPUs.
//!
//! Quantized matrices read the input quantized once per call, per 32 values as llama.cpp's Q8_0
//! ([`QuantInput`]: signed bytes, a scale per block, and the block sums that the types with an
//! offset or a minimum need). The K-quants' sub-blocks of 32 (Q4_K, Q5_K) and Q6_K's scale
//! groups of 16 lie inside those blocks, so every type is an integer product per input block
//! (finer than llama.cpp's per-256 Q8_K for the K-quants). One file per family: `q4_0.rs`,
//! `q4_1.rs`, `q5.rs` (Q5_0, Q5_1), `kquants.rs` (Q4_K, Q5_K), `q6_k.rs`.
//!
//! Each kernel has a naive reference beside it (`*_naive`: the dequantized weights against the
//! f32 input; `*_quantized_naive`: the integer formula, scalar, which is also the portable
//! path), and tests comparing them on odd shapes; the whole step is compared with the tensor
//! path by `tests/fused_step.rs`.

pub mod attend;
pub mod attend_vnni;
pub mod float16;
pub mod gated;
pub mod kquants;
pub mod kv;
pub mod prefill;
pub mod prompt_k;
pub mod prompt_q32;
pub mod q32_x16;
pub mod q4_0;
pub mod q4_1;
pub mod q4k_x16;
pub mod q5;
pub mod q6_k;

pub use attend::{attend_one, attend_one_naive, AttendOne};
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
    /// f16 values (a safetensors base kept in half precision, [`float16`]).
    F16(&'a [half::f16]),
    /// bf16 values ([`float16`]).
    BF16(&'a [half::bf16]),
    /// GGML Q8_0 blocks (`x.len()` a multiple of 32), as stored by candle / llama.cpp.
    Q8_0(&'a [u8]),
    /// GGML Q4_0 blocks (`x.len()` a multiple of 32), as stored ([`q4_0`]).
    Q4_0(&'a [u8]),
    /// GGML Q4_1 blocks (`x.len()` a multiple of 32), as stored ([`q4_1`]).
    Q4_1(&'a [u8]),
    /// GGML Q5_0 blocks (`x.len()` a multiple of 32), as stored ([`q5`]).
    Q5_0(&'a [u8]),
    /// GGML Q5_1 blocks (`x.len()` a multiple of 32), as stored ([`q5`]).
    Q5_1(&'a [u8]),
    /// GGML Q4_K blocks (`x.len()` a multiple of 256), as stored ([`kquants`]).
    Q4K(&'a [u8]),
    /// GGML Q5_K blocks (`x.len()` a multiple of 256), as stored ([`kquants`]).
    Q5K(&'a [u8]),
    /// GGML Q6_K blocks (`x.len()` a multiple of 256), as stored ([`q6_k`]).
    Q6K(&'a [u8]),
    /// Q4_K repacked 16 rows to a group ([`q4k_x16`]; rows a multiple of 16, `x.len()` of 256).
    Q4KX16(&'a [u8]),
    /// Q4_1 or Q8_0 repacked 16 rows to a group ([`q32_x16`]; rows a multiple of 16, `x.len()`
    /// of 32).
    X16(q32_x16::Format, &'a [u8]),
}

/// Values per K-quant super-block (Q4_K, Q5_K, Q6_K).
pub const QK_K: usize = 256;

impl<'a> Rows<'a> {
    /// A quantized matrix's bytes and its block: (values, bytes) per block. `None` for the
    /// float types.
    fn quantized(&self) -> Option<(&'a [u8], usize, usize)> {
        Some(match *self {
            Rows::F32(_) | Rows::F16(_) | Rows::BF16(_) => return None,
            Rows::Q8_0(w) => (w, Q8_0_BLOCK, Q8_0_BLOCK_BYTES),
            Rows::Q4_0(w) => (w, Q8_0_BLOCK, q4_0::Q4_0_BLOCK_BYTES),
            Rows::Q4_1(w) => (w, Q8_0_BLOCK, q4_1::Q4_1_BLOCK_BYTES),
            Rows::Q5_0(w) => (w, Q8_0_BLOCK, q5::Q5_0_BLOCK_BYTES),
            Rows::Q5_1(w) => (w, Q8_0_BLOCK, q5::Q5_1_BLOCK_BYTES),
            Rows::Q4K(w) => (w, QK_K, kquants::Q4K_BLOCK_BYTES),
            Rows::Q5K(w) => (w, QK_K, kquants::Q5K_BLOCK_BYTES),
            Rows::Q6K(w) => (w, QK_K, q6_k::Q6K_BLOCK_BYTES),
            Rows::Q4KX16(w) => (w, QK_K, q4k_x16::ROW_SB_BYTES),
            Rows::X16(f, w) => (w, Q8_0_BLOCK, f.row_block_bytes()),
        })
    }

    /// The same kind of matrix over other bytes (the float types stay as they are).
    fn with_bytes(self, w: &'a [u8]) -> Self {
        match self {
            Rows::F32(_) | Rows::F16(_) | Rows::BF16(_) => self,
            Rows::Q8_0(_) => Rows::Q8_0(w),
            Rows::Q4_0(_) => Rows::Q4_0(w),
            Rows::Q4_1(_) => Rows::Q4_1(w),
            Rows::Q5_0(_) => Rows::Q5_0(w),
            Rows::Q5_1(_) => Rows::Q5_1(w),
            Rows::Q4K(_) => Rows::Q4K(w),
            Rows::Q5K(_) => Rows::Q5K(w),
            Rows::Q6K(_) => Rows::Q6K(w),
            Rows::Q4KX16(_) => Rows::Q4KX16(w),
            Rows::X16(f, _) => Rows::X16(f, w),
        }
    }

    /// Split after `rows` rows of `cols` values (the matrix [`fits`](Self::fits), so a row is
    /// whole blocks).
    fn split_rows(self, rows: usize, cols: usize) -> (Self, Self) {
        match (self, self.quantized()) {
            (Rows::F32(w), _) => {
                let (a, b) = w.split_at(rows * cols);
                (Rows::F32(a), Rows::F32(b))
            }
            (Rows::F16(w), _) => {
                let (a, b) = w.split_at(rows * cols);
                (Rows::F16(a), Rows::F16(b))
            }
            (Rows::BF16(w), _) => {
                let (a, b) = w.split_at(rows * cols);
                (Rows::BF16(a), Rows::BF16(b))
            }
            (_, Some((w, vals, bytes))) => {
                let (a, b) = w.split_at(rows * cols / vals * bytes);
                (self.with_bytes(a), self.with_bytes(b))
            }
            (_, None) => (self, self),
        }
    }

    /// Does it hold exactly `rows` rows of `cols` values? (Quantized rows must be whole blocks:
    /// `cols` a multiple of 32, of 256 for the K-quants.)
    pub fn fits(&self, rows: usize, cols: usize) -> bool {
        match (self, self.quantized()) {
            (Rows::F32(w), _) => w.len() == rows * cols,
            (Rows::F16(w), _) => w.len() == rows * cols,
            (Rows::BF16(w), _) => w.len() == rows * cols,
            (Rows::Q4KX16(w), _) => {
                rows.is_multiple_of(q4k_x16::ROWS)
                    && cols.is_multiple_of(QK_K)
                    && w.len() == rows * cols / QK_K * q4k_x16::ROW_SB_BYTES
            }
            (Rows::X16(f, w), _) => {
                rows.is_multiple_of(q32_x16::ROWS)
                    && cols.is_multiple_of(Q8_0_BLOCK)
                    && w.len() == rows * cols / Q8_0_BLOCK * f.row_block_bytes()
            }
            (_, Some((w, vals, bytes))) => {
                cols.is_multiple_of(vals) && w.len() == rows * cols / vals * bytes
            }
            (_, None) => false,
        }
    }
}

/// The input of the quantized products, computed once per call: `x` quantized per 32-block as
/// llama.cpp's Q8_0 ([`quantize_q8_0`]), and the block sums the weight types with an offset or
/// a minimum need (each empty when no matrix of the call needs it).
pub struct QuantInput {
    /// Signed bytes `q`, `[x.len()]`: `x ≈ d·q`.
    pub q: Vec<i8>,
    /// The scale `d` of each 32-block.
    pub d: Vec<f32>,
    /// `Σ q` per 32-block (Q4_0 / Q5_0 offsets, Q4_K / Q5_K minima); at most 32·127.
    pub sums: Vec<i32>,
    /// `Σ q` per 16 values (Q6_K's offset per scale group); at most 16·127, so i16.
    pub half_sums: Vec<i16>,
    /// `d·Σ q` per 32-block rounded as candle's Q8_1 stores it (Q4_1 / Q5_1 minima,
    /// [`q4_1::block_sums`]).
    pub q8_1_sums: Vec<f32>,
    /// `x` quantized per 256 values as llama.cpp's Q8_K (Q4_K's input, [`kquants::Q8K`]);
    /// empty when no matrix needs it or `x` is not whole 256-blocks.
    pub k: kquants::Q8K,
}

impl QuantInput {
    /// `x` quantized, with every sum (tests and benches; [`matvec_group`] computes only the sums
    /// its matrices need).
    pub fn new(x: &[f32]) -> Self {
        Self::with(x, true, true, true, true)
    }

    fn with(x: &[f32], sums: bool, half_sums: bool, q8_1_sums: bool, q8k: bool) -> Self {
        let (q, d) = quantize_q8_0(x);
        let total = |c: &[i8]| c.iter().map(|&v| i32::from(v)).sum::<i32>();
        Self {
            sums: match sums {
                true => q.chunks_exact(Q8_0_BLOCK).map(total).collect(),
                false => Vec::new(),
            },
            // |Σ| ≤ 16·127 = 2032: fits an i16.
            half_sums: match half_sums {
                true => q.chunks_exact(16).map(|c| total(c) as i16).collect(),
                false => Vec::new(),
            },
            q8_1_sums: match q8_1_sums {
                true => q4_1::block_sums(&q, &d),
                false => Vec::new(),
            },
            k: match q8k && x.len().is_multiple_of(QK_K) {
                true => kquants::quantize_q8_k(x),
                false => kquants::Q8K::default(),
            },
            q,
            d,
        }
    }
}

/// The f16 at `b[at..at + 2]` (little-endian) as f32: the scales of the GGML blocks.
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `out = W·x` with each row of `w` (whole blocks of `vals` values in `bytes` bytes) dequantized
/// by `dequantize` and multiplied with the f32 input: the exact product, the quantized types'
/// `*_naive` references.
fn matvec_dequantized(
    w: &[u8],
    x: &[f32],
    out: &mut [f32],
    (vals, bytes): (usize, usize),
    dequantize: fn(&[u8]) -> Vec<f32>,
) {
    let row_bytes = x.len() / vals * bytes;
    for (r, o) in out.iter_mut().enumerate() {
        let row = dequantize(&w[r * row_bytes..(r + 1) * row_bytes]);
        *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
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
    // Two tasks per thread, never tiny ones: each task starts a new stream of weights, whose
    // first reads wait for the prefetchers to catch up. (SmolLM2 Q4_1 decode, two threads,
    // interleaved runs: four tasks per thread 272 tok/s, two 283, one 286; two keep some
    // balance when a thread is held up.)
    let task_elems = (total / (threads * 2)).max(MIN_TASK_ELEMS);
    // (A multiple of 16: the repacked groups, [`q4k_x16`], [`q32_x16`].)
    let rows_per_task = (task_elems / n.max(1))
        .max(4)
        .next_multiple_of(q4k_x16::ROWS);
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
    // do), with the block sums only the types that need them.
    let needs = |f: fn(&Rows<'_>) -> bool| tasks.iter().any(|t| f(&t.w));
    let xi = needs(|w| w.quantized().is_some()).then(|| {
        QuantInput::with(
            x,
            needs(|w| {
                matches!(
                    w,
                    Rows::Q4_0(_)
                        | Rows::Q5_0(_)
                        | Rows::Q5K(_)
                        | Rows::X16(q32_x16::Format::Q8_0, _)
                )
            }),
            needs(|w| matches!(w, Rows::Q6K(_))),
            needs(|w| {
                matches!(
                    w,
                    Rows::Q4_1(_) | Rows::Q5_1(_) | Rows::X16(q32_x16::Format::Q4_1, _)
                )
            }),
            needs(|w| matches!(w, Rows::Q4K(_) | Rows::Q4KX16(_))),
        )
    });
    let run = |t: MatVec<'_>| {
        match (t.w, &xi) {
            (Rows::F32(w), _) => matvec_rows(w, x, t.out),
            (Rows::F16(w), _) => float16::matvec_f16_rows(w, x, t.out),
            (Rows::BF16(w), _) => float16::matvec_bf16_rows(w, x, t.out),
            (Rows::Q8_0(w), Some(xi)) => matvec_q8_0_rows(w, &xi.q, &xi.d, t.out),
            (Rows::Q4_0(w), Some(xi)) => q4_0::matvec_q4_0_rows(w, xi, t.out),
            (Rows::Q4_1(w), Some(xi)) => {
                q4_1::matvec_q4_1_rows(w, &xi.q, &xi.d, &xi.q8_1_sums, t.out)
            }
            (Rows::Q5_0(w), Some(xi)) => q5::matvec_q5_0_rows(w, xi, t.out),
            (Rows::Q5_1(w), Some(xi)) => q5::matvec_q5_1_rows(w, xi, t.out),
            (Rows::Q4K(w), Some(xi)) => kquants::matvec_q4k_rows(w, xi, t.out),
            (Rows::Q5K(w), Some(xi)) => kquants::matvec_q5k_rows(w, xi, t.out),
            (Rows::Q6K(w), Some(xi)) => q6_k::matvec_q6k_rows(w, xi, t.out),
            (Rows::Q4KX16(w), Some(xi)) => q4k_x16::matvec_rows(w, xi, t.out),
            (Rows::X16(f, w), Some(xi)) => q32_x16::matvec_rows(f, w, xi, t.out),
            // (Not reached: a quantized matrix makes `xi`; the exact products keep it total.)
            (Rows::Q8_0(w), None) => matvec_q8_0_naive(w, x, t.out),
            (Rows::Q4_0(w), None) => q4_0::matvec_q4_0_naive(w, x, t.out),
            (Rows::Q4_1(w), None) => q4_1::matvec_q4_1_naive(w, x, t.out),
            (Rows::Q5_0(w), None) => q5::matvec_q5_0_naive(w, x, t.out),
            (Rows::Q5_1(w), None) => q5::matvec_q5_1_naive(w, x, t.out),
            (Rows::Q4K(w), None) => kquants::matvec_q4k_naive(w, x, t.out),
            (Rows::Q5K(w), None) => kquants::matvec_q5k_naive(w, x, t.out),
            (Rows::Q6K(w), None) => q6_k::matvec_q6k_naive(w, x, t.out),
            (Rows::Q4KX16(w), None) => q4k_x16::matvec_naive(w, x, t.out),
            (Rows::X16(f, w), None) => q32_x16::matvec_naive(f, w, x, t.out),
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

/// How far ahead of its loads, in bytes, a decode kernel asks for the weights it streams
/// ([`prefetch_ahead`]).
pub const PREFETCH_AHEAD: usize = 4096;

/// Ask for the cache line [`PREFETCH_AHEAD`] bytes past `p` into L2 (`prefetcht1`), for the
/// matrix × vector kernels that stream weights from memory row after row (every decode kernel
/// of a matrix type). The hardware prefetchers alone keep too few lines in flight for one core:
/// on an Intel Xeon (2 cores, 2 threads), alternating runs, the 1B-class Q4_K decode went
/// 22–23 → 30–31 tok/s repacked and 11.4 → 23 as stored (AVX2), the f16 one 8.6–9.4 →
/// 11.2–12.2, SmolLM2's f32 one 33–37 → 41–44, its Q4_1 one 169–174 → 190–204 repacked and
/// 90–93 → 122 as stored. 3–8 KB ahead are all within the runs' spread, 2 and 12 KB less; into
/// L1 less, non-temporal far less. (On the AMD EPYC of earlier runs a prefetch in the repacked
/// Q4_K kernel measured equal or slower.) A hint only: any address, even past the end of the
/// matrix, is fine.
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults and reads nothing architecturally, whatever
    // the address (SSE, part of x86_64's baseline).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
            p.wrapping_add(PREFETCH_AHEAD) as *const i8,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch_ahead`] for every 64-byte line of the `len` bytes from `p` (a block of a stored
/// type larger than a line).
#[inline(always)]
pub(crate) fn prefetch_ahead_span(p: *const u8, len: usize) {
    for off in (0..len).step_by(64) {
        prefetch_ahead(p.wrapping_add(off));
    }
}

/// The input quantized as llama.cpp and candle do for Q8_0 products: per block of 32,
/// `d = max|x| / 127` (kept as f16), `q = round(x / d)`. Returns the bytes and the scales.
pub fn quantize_q8_0(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len() - x.len() % Q8_0_BLOCK];
    let mut ds = Vec::with_capacity(x.len() / Q8_0_BLOCK);
    for (blk, q) in x
        .chunks_exact(Q8_0_BLOCK)
        .zip(q.chunks_exact_mut(Q8_0_BLOCK))
    {
        let amax = abs_max(blk);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        scale_round(blk, id, q);
        ds.push(half::f16::from_f32(d).to_f32());
    }
    (q, ds)
}

/// The largest `|v|` of `x` (NaN ignored; 0 for an empty slice), with the best kernel for this
/// CPU.
pub(crate) fn abs_max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2::abs_max(x) };
        }
    }
    abs_max_naive(x)
}

/// [`abs_max`], scalar (its reference and portable path).
pub(crate) fn abs_max_naive(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// `q[i] = round(s·x[i])` (halves away from zero) saturated to `i8`, NaN to 0, exactly as
/// `(s * x).round() as i8`, with the best kernel for this CPU.
pub(crate) fn scale_round(x: &[f32], s: f32, q: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma() {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { avx2::scale_round(x, s, q) };
            return;
        }
    }
    scale_round_naive(x, s, q);
}

/// [`scale_round`], scalar (its reference and portable path).
pub(crate) fn scale_round_naive(x: &[f32], s: f32, q: &mut [i8]) {
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (s * v).round() as i8;
    }
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
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The largest `|v|` of `x`, NaN ignored.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn abs_max(x: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            // `max(|v|, m)` returns `m` where `|v|` is NaN: NaN is ignored, as by `f32::max`.
            m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr())), m);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .iter()
            .chain(tail.iter())
            .fold(0f32, |m, v| m.max(v.abs()))
    }

    /// `q[i] = round(s·x[i])` as `(s * x).round() as i8`: the product truncated, plus one
    /// away from zero where the dropped fraction (exact in f32) is at least a half; saturated
    /// to −128..=127, NaN to 0.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale_round(x: &[f32], s: f32, q: &mut [i8]) {
        let n = x.len().min(q.len());
        let (sv, half, sign, one) = (
            _mm256_set1_ps(s),
            _mm256_set1_ps(0.5),
            _mm256_set1_ps(-0.0),
            _mm256_set1_ps(1.0),
        );
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sv);
            let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
            let up = _mm256_and_ps(
                _mm256_cmp_ps(frac, half, _CMP_GE_OQ),
                _mm256_or_ps(one, _mm256_and_ps(v, sign)),
            );
            let r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, up), lo), hi);
            // NaN (unordered with itself) to 0.
            let r = _mm256_and_ps(r, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
            let i32s = _mm256_cvttps_epi32(r);
            let w = _mm_packs_epi32(
                _mm256_castsi256_si128(i32s),
                _mm256_extracti128_si256(i32s, 1),
            );
            let b = _mm_packs_epi16(w, w);
            _mm_storel_epi64(q.as_mut_ptr().add(i) as *mut __m128i, b);
            i += 8;
        }
        super::scale_round_naive(&x[i..n], s, &mut q[i..n]);
    }

    /// Sum of the eight lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Lane `k` the sum of the eight lanes of `v[k]` (a transposing tree of `hadd`s).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn hsum8(v: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        // [v0..v3 low halves | v0..v3 high halves], likewise v4..v7.
        let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// The f16 at `p` (little-endian, unaligned) as f32: a GGML block's scale.
    ///
    /// # Safety
    /// The CPU must have F16C, and `p..p + 2` must be readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([*p, *p.add(1)]) as i32,
        )))
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
                // 128 bytes: two lines.
                crate::kernels::prefetch_ahead(p.add(c) as *const u8);
                crate::kernels::prefetch_ahead(p.add(c + 16) as *const u8);
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
        // Two rows at a time (two weight streams, the input block loaded once for both), as the
        // Q4_1 kernel: SmolLM2's Q8_0 head in its decode, 90–92 → 95–96 tok/s on an Intel Xeon
        // (alternating runs). An odd last row goes through the one-row loop below; the two agree
        // to f32 rounding (the pairs fuse each block's multiply-add).
        let pairs = out.len() / 2;
        for pr in 0..pairs {
            let rows = [2 * pr, 2 * pr + 1];
            let base = rows.map(|r| w.as_ptr().add(r * blocks * Q8_0_BLOCK_BYTES));
            let mut acc = [_mm256_setzero_ps(); 2];
            for b in 0..blocks {
                let qx = _mm256_loadu_si256(xq.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i);
                let xdb = *xd.get_unchecked(b);
                for j in 0..2 {
                    let p = base[j].add(b * Q8_0_BLOCK_BYTES);
                    crate::kernels::prefetch_ahead(p);
                    let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([
                        *p,
                        *p.add(1),
                    ])
                        as i32)));
                    let qw = _mm256_loadu_si256(p.add(2) as *const __m256i);
                    let prod = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)),
                        ones,
                    );
                    acc[j] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(dw * xdb), acc[j]);
                }
            }
            for j in 0..2 {
                out[rows[j]] = hsum(acc[j]);
            }
        }
        for (r, o) in out.iter_mut().enumerate().skip(2 * pairs) {
            let row = w.as_ptr().add(r * blocks * Q8_0_BLOCK_BYTES);
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let block = |b: usize| -> __m256 {
                let p = row.add(b * Q8_0_BLOCK_BYTES);
                crate::kernels::prefetch_ahead(p);
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
}

#[cfg(test)]
mod tests {
    /// The SIMD rounding equals `(s * x).round() as i8` on every hostile value (halves of both
    /// signs, values past ±127 and ±128, infinities, NaN, signed zeros, subnormals) and
    /// the SIMD magnitude equals the scalar fold, NaN ignored, at every length.
    #[test]
    fn rounding_and_magnitude_match_the_scalar_forms() {
        let mut x: Vec<f32> = Vec::new();
        for n in -130..=130 {
            let n = n as f32;
            x.extend([
                n,
                n + 0.5,
                n - 0.5,
                n + 0.49999997,
                n - 0.49999997,
                n + 0.25,
            ]);
        }
        x.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
            0.0,
            1e-40,
            -1e-40,
            f32::MAX,
            f32::MIN,
            0.49999997,
            -0.49999997,
            8388607.5,
            -8388607.5,
        ]);
        for s in [1.0f32, -1.0, 0.5, 3.0, 0.0, -127.0 / 3.7] {
            for len in [x.len(), 7, 8, 9, 0] {
                let xs = &x[..len.min(x.len())];
                let mut a = vec![0i8; xs.len()];
                let mut b = vec![0i8; xs.len()];
                scale_round(xs, s, &mut a);
                scale_round_naive(xs, s, &mut b);
                assert_eq!(a, b, "scale {s}, {len} values");
            }
        }
        for len in 0..40 {
            let xs: Vec<f32> = x.iter().rev().take(len).copied().collect();
            assert_eq!(
                abs_max(&xs).to_bits(),
                abs_max_naive(&xs).to_bits(),
                "{len}"
            );
        }
        assert_eq!(abs_max(&[f32::NAN, -3.0, 2.0, f32::NAN]), 3.0);
    }

    use super::*;
    use crate::testutil::assert_close;

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
            assert_close(&got, &want, 1e-5);
            assert_close(&got2, &want2, 1e-5);
            let mut generic = vec![0f32; rows];
            matvec_rows_generic(&w, &x, &mut generic);
            want.iter_mut().zip(&bias).for_each(|(o, b)| *o -= b);
            assert_close(&generic, &want, 1e-5);
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

    /// One quantized type's functions, for [`check_type`].
    pub(super) struct Kind {
        pub dtype: candle_core::quantized::GgmlDType,
        pub dequantize: fn(&[u8]) -> Vec<f32>,
        pub naive: fn(&[u8], &[f32], &mut [f32]),
        pub quantized_naive: fn(&[u8], &QuantInput, &mut [f32]),
        pub rows: fn(&[u8], &QuantInput, &mut [f32]),
        /// Does candle's product quantize the input as ours (Q8_0 / Q8_1 per 32 values, or
        /// Q8_K per 256 when `q8k`), not per 256 (Q8_K)?
        pub candle_same_input: bool,
        /// Is the kernel's input Q8_K (per 256 values), not Q8_0?
        pub q8k: bool,
    }

    /// A quantized matrix of candle's type `dtype`.
    fn rows_of(dtype: candle_core::quantized::GgmlDType, w: &[u8]) -> Rows<'_> {
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q8_0 => Rows::Q8_0(w),
            G::Q4_0 => Rows::Q4_0(w),
            G::Q4_1 => Rows::Q4_1(w),
            G::Q5_0 => Rows::Q5_0(w),
            G::Q5_1 => Rows::Q5_1(w),
            G::Q4K => Rows::Q4K(w),
            G::Q5K => Rows::Q5K(w),
            G::Q6K => Rows::Q6K(w),
            other => panic!("no kernel for {other:?}"),
        }
    }

    /// `rows × cols` weights: random, or extreme rows (zeros, huge, tiny, constant, one
    /// outlier, then random).
    fn weights(rows: usize, cols: usize, extreme: bool) -> Vec<f32> {
        let mut w = rand_vec(rows * cols, (rows * cols) as u64);
        if extreme {
            for (r, row) in w.chunks_exact_mut(cols).enumerate() {
                match r {
                    0 => row.fill(0.0),
                    1 => row.iter_mut().for_each(|v| *v *= 1e4),
                    2 => row.iter_mut().for_each(|v| *v *= 1e-6),
                    3 => row.fill(0.5),
                    4 => row[37] = 100.0,
                    _ => {}
                }
            }
        }
        w
    }

    /// A type's kernels against candle's blocks (`7 × 512`, rows of whole super-blocks):
    /// (1) its dequantization is candle's, bit for bit; (2) the AVX2 kernel and the portable
    /// one equal the integer formula (`*_quantized_naive`) to f32 rounding; (3) the formula is
    /// the exact product of the stored weights with the f32 input up to the input's 8-bit
    /// rounding (at most 0.6·d_x per value, with `d_x` its block's scale) and (4) candle's own
    /// product up to both inputs' roundings (or to f32 rounding when candle quantizes the input
    /// as we do); on random and extreme weights, with an input holding a zero block and a large
    /// one, every result finite.
    pub(super) fn check_type(k: &Kind) {
        use candle_core::quantized::{QMatMul, QTensor};
        use candle_core::{Device, Module, Tensor};
        let (rows, cols) = (7, 512);
        let dev = Device::Cpu;
        let mut x = rand_vec(cols, 5);
        x[96..128].fill(0.0);
        x[160..192].iter_mut().for_each(|v| *v *= 100.0);
        let mut quantization_seen = 0f32;
        for extreme in [false, true] {
            let case = if extreme { "extreme" } else { "random" };
            let w = weights(rows, cols, extreme);
            let q = QTensor::quantize(
                &Tensor::from_vec(w, (rows, cols), &dev).expect("w"),
                k.dtype,
            )
            .expect("quantize");
            let bytes = q.data().expect("bytes").into_owned();
            assert!(rows_of(k.dtype, &bytes).fits(rows, cols), "{case}: fits");
            assert!(
                !rows_of(k.dtype, &bytes).fits(rows + 1, cols),
                "{case}: one row more"
            );
            // (1)
            let deq = (k.dequantize)(&bytes);
            let want = q
                .dequantize(&dev)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("candle dequantize");
            assert_eq!(deq.len(), want.len());
            for (i, (a, b)) in deq.iter().zip(&want).enumerate() {
                assert!(a == b, "{case}: value {i}: {a} vs candle {b}");
            }
            // (2)
            let xi = QuantInput::new(&x);
            let mut reference = vec![0f32; rows];
            (k.quantized_naive)(&bytes, &xi, &mut reference);
            for portable in [false, true] {
                crate::cpu::force_portable(portable);
                let mut got = vec![0f32; rows];
                (k.rows)(&bytes, &xi, &mut got);
                crate::cpu::force_portable(false);
                for (r, (g, e)) in got.iter().zip(&reference).enumerate() {
                    assert!(
                        g.is_finite() && (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{case} row {r} (portable {portable}): {g} vs {e}"
                    );
                }
            }
            // (3) Per row: Σ_b (0.6·d_x·Σ|w| + 1e-3·max|w|·Σ|x|) over the input blocks (the
            // second term: Q8_1's block sums in f16), plus f32 rounding of Σ|w·x|.
            let mut exact = vec![0f32; rows];
            (k.naive)(&bytes, &x, &mut exact);
            let bound = |r: usize, per: usize, scale: &dyn Fn(usize) -> f32| -> f32 {
                let row = &deq[r * cols..(r + 1) * cols];
                let mut b = 1e-5 * row.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum::<f32>();
                for (c, (ws, xs)) in row.chunks(per).zip(x.chunks(per)).enumerate() {
                    let wsum: f32 = ws.iter().map(|v| v.abs()).sum();
                    let wmax = ws.iter().fold(0f32, |m, v| m.max(v.abs()));
                    b += scale(c) * wsum + 1e-3 * wmax * xs.iter().map(|v| v.abs()).sum::<f32>();
                }
                b
            };
            // Half a step of the 256-block's scale max|x|/127 (Q8_K).
            let amax256 = |c: usize| {
                x[c * 32 / QK_K * QK_K..][..QK_K]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()))
            };
            for r in 0..rows {
                let (e, q) = (exact[r], reference[r]);
                let b = if k.q8k {
                    bound(r, Q8_0_BLOCK, &|c| 0.51 * amax256(c) / 127.0)
                } else {
                    bound(r, Q8_0_BLOCK, &|c| 0.6 * xi.d[c])
                };
                assert!(
                    q.is_finite() && (e - q).abs() <= b,
                    "{case} row {r}: {q} vs exact {e} (bound {b})"
                );
                quantization_seen = quantization_seen.max((e - q).abs());
            }
            // (4)
            let candle = QMatMul::from_qtensor(q)
                .and_then(|m| m.forward(&Tensor::from_slice(&x, (1, cols), &dev)?))
                .and_then(|y| y.flatten_all()?.to_vec1::<f32>())
                .expect("candle");
            for r in 0..rows {
                let (c, q) = (candle[r], reference[r]);
                let b = if k.candle_same_input {
                    1e-4 * (1.0 + c.abs())
                } else {
                    // Candle's Q8_K: per 256 values, error at most half a step of max|x|/127.
                    bound(r, Q8_0_BLOCK, &|c| {
                        0.6 * xi.d[c] + 0.51 * amax256(c) / 127.0
                    })
                };
                assert!(
                    c.is_finite() && (c - q).abs() <= b,
                    "{case} row {r}: {q} vs candle {c} (bound {b})"
                );
            }
        }
        // The input's rounding is real: the comparisons (3) are not vacuous.
        assert!(quantization_seen > 0.0);
    }

    /// A group mixing f32 and every quantized type, with biases and rows split into several
    /// tasks, equals each product run on its own.
    #[test]
    fn matvec_group_mixes_every_type() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let cols = 512;
        let x = rand_vec(cols, 17);
        let types = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        // Odd row counts, one large enough for several tasks (128 rows of 512 each).
        let counts = [301, 9, 13, 5, 17, 130, 3, 11];
        let bytes: Vec<Vec<u8>> = types
            .iter()
            .zip(counts)
            .enumerate()
            .map(|(i, (dtype, rows))| {
                let w =
                    Tensor::from_vec(rand_vec(rows * cols, i as u64), (rows, cols), &Device::Cpu)
                        .expect("w");
                QTensor::quantize(&w, *dtype)
                    .and_then(|q| Ok(q.data()?.into_owned()))
                    .expect("quantize")
            })
            .collect();
        let dense = rand_vec(7 * cols, 99);
        let biases: Vec<Vec<f32>> = counts.iter().map(|&n| rand_vec(n, n as u64)).collect();
        let mut outs: Vec<Vec<f32>> = counts.iter().map(|&n| vec![0f32; n]).collect();
        let mut dense_out = vec![0f32; 7];
        let mut group = vec![MatVec {
            w: Rows::F32(&dense),
            bias: None,
            out: &mut dense_out,
        }];
        for (((b, &dtype), bias), out) in bytes.iter().zip(&types).zip(&biases).zip(&mut outs) {
            group.push(MatVec {
                w: rows_of(dtype, b),
                bias: Some(bias),
                out,
            });
        }
        matvec_group(group, &x);
        let mut want = vec![0f32; 7];
        matvec_naive(&dense, &x, &mut want);
        assert_close(&dense_out, &want, 1e-5);
        let xi = QuantInput::new(&x);
        for (i, ((b, bias), got)) in bytes.iter().zip(&biases).zip(&outs).enumerate() {
            let mut want = vec![0f32; got.len()];
            match i {
                0 => matvec_q8_0_rows(b, &xi.q, &xi.d, &mut want),
                1 => q4_0::matvec_q4_0_rows(b, &xi, &mut want),
                2 => q4_1::matvec_q4_1_rows(b, &xi.q, &xi.d, &xi.q8_1_sums, &mut want),
                3 => q5::matvec_q5_0_rows(b, &xi, &mut want),
                4 => q5::matvec_q5_1_rows(b, &xi, &mut want),
                5 => kquants::matvec_q4k_rows(b, &xi, &mut want),
                6 => kquants::matvec_q5k_rows(b, &xi, &mut want),
                _ => q6_k::matvec_q6k_rows(b, &xi, &mut want),
            }
            want.iter_mut().zip(bias).for_each(|(w, b)| *w += b);
            assert_close(got, &want, 1e-5);
        }
        // K-quant rows are whole super-blocks: 288 columns (9 blocks of 32) do not fit.
        assert!(!Rows::Q4K(&bytes[5][..130 * 144]).fits(130 * 8 / 9, 288));
        assert!(Rows::Q4_0(&bytes[1][..9 * 9 * 18]).fits(9, 288));
    }
}
