//! Prompt products `X·Wᵀ` (many input rows) with a Q4_1 or Q8_0 matrix repacked 16 rows to a
//! group ([`super::q32_x16`]), in 8-bit integers as a decode step multiplies it, instead of
//! widening the matrix to f32 a few MB at a time for a dense product (which held an f32 piece of
//! the matrix and gemm's packing buffers, and rounded differently from decoding).
//!
//! The input rows are quantized per 32 values as the decode's input ([`QuantInput`]: signed
//! bytes, a scale per block, and the block sums the format needs). Then per group of 16 matrix
//! rows and [`INPUT_ROWS`] input rows, each block of the group is unpacked once and multiplied
//! with every one of those input rows by the decode kernel's `dpbusd` products. A prompt row is
//! the same row decoded ([`super::q32_x16::matvec_rows`]) bit for bit: the same integer products,
//! scaled and summed in the same order (test).
//!
//! Work is split across the rayon pool by input rows (every task reads the whole matrix, a few
//! times per prompt), and inside a task the groups are taken [`GROUP_BYTES`] at a time, so that
//! every input row of the task passes over them while they are in the L1 or L2 cache.
//! [`matmul_naive`] (the decode's integer formula, scalar, row by row) is the reference and the
//! portable path.

use rayon::prelude::*;

use super::q32_x16::{self, Format, ROWS};
use super::{QuantInput, Q8_0_BLOCK};

/// Input rows multiplied with one unpacked block of a group.
const INPUT_ROWS: usize = 4;

/// Bytes of the groups that the input rows of a task pass over before the next ones: in the
/// L1 cache for SmolLM2-sized rows, in L2 for long ones.
const GROUP_BYTES: usize = 32 << 10;

/// Input rows per task at least: fewer would re-read the matrix for little work.
const MIN_TASK_ROWS: usize = 16;

/// `X·Wᵀ`: `x` holds input rows of `cols` values; `packed` is `n` rows (a multiple of 16) of a
/// `format` matrix repacked by [`q32_x16::pack`]. Returns `[rows of x, n]`.
///
/// # Panics
/// When `cols` is not whole 32-value blocks or `x` whole rows, or `packed` is not `n` such rows.
pub fn matmul(format: Format, packed: &[u8], n: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let m = Product::new(format, packed, n, cols, x);
    let s = m.input_rows();
    let mut out = vec![0f32; s * n];
    if s == 0 || n == 0 {
        return out;
    }
    let threads = rayon::current_num_threads().max(1);
    // Two tasks per thread, so that a slower thread takes fewer.
    let task_rows = s
        .div_ceil(2 * threads)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(INPUT_ROWS);
    out.par_chunks_mut(task_rows * n)
        .enumerate()
        .for_each(|(t, o)| m.rows_into(t * task_rows, o));
    out
}

/// [`matmul`] row by row with the decode's integer formula, scalar
/// ([`q32_x16::matvec_quantized_naive`]): the reference of the kernel, and its portable path.
pub fn matmul_naive(format: Format, packed: &[u8], n: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let m = Product::new(format, packed, n, cols, x);
    let mut out = vec![0f32; m.input_rows() * n];
    m.naive_rows_into(0, &mut out);
    out
}

/// One product: the matrix and its input rows quantized as a decode quantizes one (each block
/// on its own, so a prompt's rows quantize as they would alone), with the block sums the format
/// needs.
struct Product<'a> {
    format: Format,
    packed: &'a [u8],
    n: usize,
    cols: usize,
    x: QuantInput,
}

impl<'a> Product<'a> {
    fn new(format: Format, packed: &'a [u8], n: usize, cols: usize, x: &[f32]) -> Self {
        assert!(
            cols > 0
                && cols.is_multiple_of(Q8_0_BLOCK)
                && x.len().is_multiple_of(cols)
                && n.is_multiple_of(ROWS)
                && packed.len() == n * (cols / Q8_0_BLOCK) * format.row_block_bytes(),
            "prompt_q32: [{}] input against [{n}, {cols}] {format:?} in {} bytes",
            x.len(),
            packed.len()
        );
        let x = QuantInput::with(
            x,
            format == Format::Q8_0,
            false,
            format == Format::Q4_1,
            false,
        );
        Self {
            format,
            packed,
            n,
            cols,
            x,
        }
    }

    fn input_rows(&self) -> usize {
        self.x.q.len() / self.cols
    }

    fn blocks(&self) -> usize {
        self.cols / Q8_0_BLOCK
    }

    /// Input row `i` as a decode's input.
    fn row_input(&self, i: usize) -> QuantInput {
        let (c, b) = (self.cols, self.blocks());
        let part = |v: &[f32]| v.get(i * b..(i + 1) * b).unwrap_or_default().to_vec();
        QuantInput {
            q: self.x.q[i * c..(i + 1) * c].to_vec(),
            d: part(&self.x.d),
            sums: self
                .x
                .sums
                .get(i * b..(i + 1) * b)
                .unwrap_or_default()
                .to_vec(),
            half_sums: Vec::new(),
            q8_1_sums: part(&self.x.q8_1_sums),
            k: Default::default(),
        }
    }

    /// Input rows `first..` (as many as `out` holds rows of `n`) against the whole matrix.
    fn rows_into(&self, first: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::has_avx512_vnni() && crate::cpu::has_avx2_fma_f16c() {
                // SAFETY: the features were detected just above; `Product::new` checked the
                // shapes.
                unsafe { avx512::rows_into(self, first, out) };
                return;
            }
        }
        self.naive_rows_into(first, out);
    }

    /// [`Product::rows_into`] with the scalar formula.
    fn naive_rows_into(&self, first: usize, out: &mut [f32]) {
        for (k, o) in out.chunks_exact_mut(self.n).enumerate() {
            q32_x16::matvec_quantized_naive(
                self.format,
                self.packed,
                &self.row_input(first + k),
                o,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Format, Product, GROUP_BYTES, INPUT_ROWS, ROWS};
    use crate::kernels::Q8_0_BLOCK;

    /// One input row's quantized blocks: values, scales, and the sums the format needs.
    #[derive(Clone, Copy)]
    struct Row<'r> {
        q: &'r [i8],
        d: &'r [f32],
        s: &'r [f32],
        sums: &'r [i32],
    }

    /// [`Product::rows_into`] with AVX-512 VNNI.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn rows_into(m: &Product<'_>, first: usize, out: &mut [f32]) {
        let (n, blocks) = (m.n, m.blocks());
        let group_bytes = blocks * m.format.group_block_bytes();
        let groups = n / ROWS;
        let per_pass = (GROUP_BYTES / group_bytes.max(1)).clamp(1, groups.max(1));
        let rows = out.len() / n;
        let row = |i: usize| Row {
            q: &m.x.q[i * m.cols..(i + 1) * m.cols],
            d: &m.x.d[i * blocks..(i + 1) * blocks],
            s: m.x
                .q8_1_sums
                .get(i * blocks..(i + 1) * blocks)
                .unwrap_or_default(),
            sums: m
                .x
                .sums
                .get(i * blocks..(i + 1) * blocks)
                .unwrap_or_default(),
        };
        for g0 in (0..groups).step_by(per_pass) {
            for i0 in (0..rows).step_by(INPUT_ROWS) {
                let r = INPUT_ROWS.min(rows - i0);
                let xs: [Row<'_>; INPUT_ROWS] =
                    std::array::from_fn(|k| row(first + i0 + k.min(r - 1)));
                for g in g0..(g0 + per_pass).min(groups) {
                    let group = m.packed.as_ptr().add(g * group_bytes);
                    let dst = out.as_mut_ptr().add(i0 * n + g * ROWS);
                    match r {
                        1 => group_into::<1>(m.format, group, blocks, &xs, dst, n),
                        2 => group_into::<2>(m.format, group, blocks, &xs, dst, n),
                        3 => group_into::<3>(m.format, group, blocks, &xs, dst, n),
                        _ => group_into::<INPUT_ROWS>(m.format, group, blocks, &xs, dst, n),
                    }
                }
            }
        }
    }

    /// The 16 outputs of a group for the first `R` rows of `xs`, row `k`'s at `dst + k·n`.
    ///
    /// # Safety
    /// As [`group_q4_1`]; `dst + k·n .. + 16` lies in the output for every `k < R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn group_into<const R: usize>(
        format: Format,
        group: *const u8,
        blocks: usize,
        xs: &[Row<'_>; INPUT_ROWS],
        dst: *mut f32,
        n: usize,
    ) {
        let res: [__m512; R] = match format {
            Format::Q4_1 => group_q4_1::<R>(group, blocks, xs),
            Format::Q8_0 => group_q8_0::<R>(group, blocks, xs),
        };
        for (k, v) in res.iter().enumerate() {
            _mm512_storeu_ps(dst.add(k * n), *v);
        }
    }

    /// Four input bytes in every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32((p as *const i32).read_unaligned())
    }

    /// The 16 rows of a Q4_1 group against the first `R` of `xs`: per block the four slots'
    /// low and high nibbles once, then for each input row the decode kernel's products and sums
    /// (`q32_x16::matvec_q4_1`), in its order.
    ///
    /// # Safety
    /// As [`rows_into`]; `group` holds `blocks` Q4_1 group blocks, each row of `xs` `blocks`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn group_q4_1<const R: usize>(
        group: *const u8,
        blocks: usize,
        xs: &[Row<'_>; INPUT_ROWS],
    ) -> [__m512; R] {
        let gb = Format::Q4_1.group_block_bytes();
        let (d_at, m_at) = (Format::Q4_1.d_at(), super::super::q32_x16::Q4_1_M);
        let low = _mm512_set1_epi8(0x0F);
        let mut f = [_mm512_setzero_ps(); R];
        let mut fm = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let p = group.add(b * gb);
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for t in 0..4 {
                let v = _mm512_loadu_si512(p.add(64 * t) as *const __m512i);
                lo[t] = _mm512_and_si512(v, low);
                hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(d_at) as *const __m256i));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(m_at) as *const __m256i));
            for k in 0..R {
                let x = xs[k].q.as_ptr().add(b * Q8_0_BLOCK);
                let (mut a, mut c) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for t in 0..4 {
                    a = _mm512_dpbusd_epi32(a, lo[t], bcast4(x.add(8 * t)));
                    c = _mm512_dpbusd_epi32(c, hi[t], bcast4(x.add(8 * t + 4)));
                }
                let dx = _mm512_set1_ps(*xs[k].d.get_unchecked(b));
                f[k] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(a, c)),
                    _mm512_mul_ps(d, dx),
                    f[k],
                );
                fm[k] = _mm512_fmadd_ps(m, _mm512_set1_ps(*xs[k].s.get_unchecked(b)), fm[k]);
            }
        }
        std::array::from_fn(|k| _mm512_add_ps(f[k], fm[k]))
    }

    /// The 16 rows of a Q8_0 group against the first `R` of `xs`, as
    /// `q32_x16::matvec_q8_0` multiplies one.
    ///
    /// # Safety
    /// As [`group_q4_1`], for Q8_0.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn group_q8_0<const R: usize>(
        group: *const u8,
        blocks: usize,
        xs: &[Row<'_>; INPUT_ROWS],
    ) -> [__m512; R] {
        let gb = Format::Q8_0.group_block_bytes();
        let d_at = Format::Q8_0.d_at();
        let mut f = [_mm512_setzero_ps(); R];
        for b in 0..blocks {
            let p = group.add(b * gb);
            let v: [__m512i; 8] =
                std::array::from_fn(|t| _mm512_loadu_si512(p.add(64 * t) as *const __m512i));
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(d_at) as *const __m256i));
            for k in 0..R {
                let x = xs[k].q.as_ptr().add(b * Q8_0_BLOCK);
                let (mut a, mut c) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for t in (0..8).step_by(2) {
                    a = _mm512_dpbusd_epi32(a, v[t], bcast4(x.add(4 * t)));
                    c = _mm512_dpbusd_epi32(c, v[t + 1], bcast4(x.add(4 * t + 4)));
                }
                let dot = _mm512_sub_epi32(
                    _mm512_add_epi32(a, c),
                    _mm512_set1_epi32(128 * *xs[k].sums.get_unchecked(b)),
                );
                let dx = _mm512_set1_ps(*xs[k].d.get_unchecked(b));
                f[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, dx), f[k]);
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{quantized_bytes, rand_scaled as rand};
    use candle_core::quantized::GgmlDType;

    /// Every prompt row equals that row decoded, bit for bit, and the scalar formula to f32
    /// rounding; passes of one to four input rows (the last one short), one group or several,
    /// short and long rows, with rows of large, zero and constant weights.
    #[test]
    fn prompt_rows_equal_decoded_rows() {
        for (format, dtype) in [
            (Format::Q4_1, GgmlDType::Q4_1),
            (Format::Q8_0, GgmlDType::Q8_0),
        ] {
            for (n, cols, s) in [(16, 32, 1), (48, 96, 7), (32, 576, 37), (16, 1536, 6)] {
                let mut w = rand(n * cols, cols as u64 + 3, 1.0);
                w[..cols].iter_mut().for_each(|v| *v *= 1e4);
                w[cols..2 * cols].fill(0.0);
                w[2 * cols..3 * cols].fill(-3.5);
                let bytes = quantized_bytes(&w, (n, cols), dtype);
                let packed = q32_x16::pack(format, &bytes, n, cols);
                let mut x = rand(s * cols, 7 + s as u64, 2.0);
                x[..cols].iter_mut().step_by(5).for_each(|v| *v = 0.0);
                let got = matmul(format, &packed, n, cols, &x);
                let naive = matmul_naive(format, &packed, n, cols, &x);
                for (i, (g, r)) in got.chunks_exact(n).zip(naive.chunks_exact(n)).enumerate() {
                    let xi = QuantInput::new(&x[i * cols..(i + 1) * cols]);
                    let mut decoded = vec![0f32; n];
                    q32_x16::matvec_rows(format, &packed, &xi, &mut decoded);
                    assert_eq!(g, &decoded[..], "{format:?} [{n}, {cols}] row {i} of {s}");
                    // f32 rounding of two summation orders over large cancelling block terms
                    // (the row of weights × 10⁴): a wrong block or scale is off by far more.
                    let top = r.iter().fold(1f32, |m, v| m.max(v.abs()));
                    for (a, b) in g.iter().zip(r) {
                        assert!(
                            (a - b).abs() <= 1e-4 * top,
                            "{format:?} [{n}, {cols}] row {i}: {a} vs {b}, top {top}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_prompt_gives_no_rows() {
        let bytes = quantized_bytes(&rand(16 * 32, 1, 1.0), (16, 32), GgmlDType::Q4_1);
        let packed = q32_x16::pack(Format::Q4_1, &bytes, 16, 32);
        assert!(matmul(Format::Q4_1, &packed, 16, 32, &[]).is_empty());
    }
}
