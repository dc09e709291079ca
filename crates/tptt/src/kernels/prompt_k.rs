//! Prompt products `X·Wᵀ` (many input rows) with a GGML K-quant matrix (Q4_K, Q5_K, Q6_K: the
//! types of Q4_K_M / Q5_K_M files) used as stored, in 8-bit integers as llama.cpp does, instead
//! of widening the matrix to f32 for a dense product.
//!
//! Every type is read as 256-value super-blocks of unsigned values `u` with an integer scale
//! `sc_g` per group of `G` values (32 for Q4_K / Q5_K, 16 for Q6_K), a super-scale `d` and an
//! offset `o_g` per group: the weight is `d·sc_g·u − o_g` ([`KType::unpack`]: Q4_K / Q5_K's
//! `o_g = dmin·m_g`, Q6_K's `o_g = 32·d·sc_g`). The input rows are quantized per 256 values as
//! llama.cpp's Q8_K ([`PromptInput`]: signed bytes, a scale `d_x` per 256, and `d_x·Σ q` per
//! 16 and per 32). A pair of rows is then
//! `Σ_s d·d_x·Σ_g sc_g·Σ u·q_x − Σ_g o_g·(d_x·Σ_g q_x)`, summed in integers per super-block.
//!
//! The matrix is split across the rayon pool in tasks of [`TASK_ROWS`] rows. A task unpacks its
//! rows once and then passes every input row over them:
//! - with AVX-512 VNNI, rows interleaved ([`Interleaved`]): one `dpbusd` multiplies four values
//!   of 16 rows by four input bytes, 16 results in the lanes of one register; the input rows
//!   regrouped eight at a time ([`GroupedInput`]), tasks of [`PANELS_PER_TASK`] such panels,
//!   and the rows passed over [`CHUNK_SUPERS`] super-blocks at a time (`matmul_interleaved`);
//! - with AVX2, row by row ([`Panel`]), four input rows at a time (`maddubs` and `madd`);
//! - else the integer formula, scalar ([`matmul_quantized_naive`], also the reference).
//!
//! [`matmul_naive`] (the dequantized matrix against the f32 input) is the exact product. For
//! Q4_K the input's rounding is the decode kernel's ([`super::kquants`]), so a prompt row equals
//! that row decoded to f32 rounding, and candle's own product likewise.

use rayon::prelude::*;

use super::kquants::{
    dequantize_q4k, dequantize_q5k, quantize_q8_k, scales_mins, sub_block, Q4K_BLOCK_BYTES,
    Q5K_BLOCK_BYTES,
};
use super::q4k_x16;
use super::q6_k::{block_values, dequantize_q6k, scale, Q6K_BLOCK_BYTES};
use super::{f16_at, Q8_0_BLOCK, QK_K};

/// Matrix rows per parallel task: one interleaved panel (16 lanes of 32-bit results), and
/// small enough (16 × `cols` bytes) to stay in the L2 cache while every input row passes.
const TASK_ROWS: usize = 16;

/// Input rows taken together against one unpacked matrix row (AVX2, portable).
const GROUP: usize = 4;

/// Input rows taken together against an [`Interleaved`] panel.
const WIDE_GROUP: usize = 8;

/// Super-blocks of an [`Interleaved`] panel every group of input rows passes over before the
/// next ones: 16 KB of the panel, which stays in the L1 cache while all the prompt's rows go by
/// (a whole panel of a long row does not: 128 KB at 8192 values).
const CHUNK_SUPERS: usize = 4;

/// Panels of [`TASK_ROWS`] matrix rows per task of the AVX-512 kernel: each span of the input
/// is read from L2 once for all of them.
const PANELS_PER_TASK: usize = 4;

/// A K-quant type the prompt kernels take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KType {
    Q4K,
    Q5K,
    Q6K,
}

impl KType {
    /// Bytes of one super-block.
    pub fn block_bytes(self) -> usize {
        match self {
            KType::Q4K => Q4K_BLOCK_BYTES,
            KType::Q5K => Q5K_BLOCK_BYTES,
            KType::Q6K => Q6K_BLOCK_BYTES,
        }
    }

    /// Values per scale group.
    fn group(self) -> usize {
        match self {
            KType::Q4K | KType::Q5K => 32,
            KType::Q6K => 16,
        }
    }

    /// Super-block `blk`: its values in order into `u` (at most 63), per group its scale into
    /// `sc` (|sc| ≤ 128) and offset `o_g` into `offsets`; returns `d`.
    fn unpack(self, blk: &[u8], u: &mut [u8; QK_K], sc: &mut [i32], offsets: &mut [f32]) -> f32 {
        match self {
            KType::Q4K | KType::Q5K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (s, m) = scales_mins(&blk[4..16]);
                for j in 0..8 {
                    sc[j] = i32::from(s[j]);
                    offsets[j] = dmin * f32::from(m[j]);
                }
                if self == KType::Q4K {
                    // Chunk c of 64 values: group 2c in the low nibbles of its 32 bytes, 2c + 1
                    // in the high ones.
                    for (qs, u) in blk[16..144].chunks_exact(32).zip(u.chunks_exact_mut(64)) {
                        let (lo, hi) = u.split_at_mut(32);
                        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                            *l = b & 0x0F;
                            *h = b >> 4;
                        }
                    }
                } else {
                    for (j, u) in u.chunks_exact_mut(Q8_0_BLOCK).enumerate() {
                        u.copy_from_slice(&sub_block(&blk[48..176], Some(&blk[16..48]), j));
                    }
                }
                d
            }
            KType::Q6K => {
                let d = f16_at(blk, 208);
                for (j, u) in u.chunks_exact_mut(Q8_0_BLOCK).enumerate() {
                    u.copy_from_slice(&block_values(blk, j));
                }
                for g in 0..16 {
                    sc[g] = scale(blk, g);
                    offsets[g] = 32.0 * d * sc[g] as f32;
                }
                d
            }
        }
    }

    /// A row of whole super-blocks, dequantized.
    fn dequantize(self, row: &[u8]) -> Vec<f32> {
        match self {
            KType::Q4K => dequantize_q4k(row),
            KType::Q5K => dequantize_q5k(row),
            KType::Q6K => dequantize_q6k(row),
        }
    }
}

/// Input rows quantized for a prompt product.
pub struct PromptInput {
    /// Values per row (whole 256-blocks).
    cols: usize,
    /// Signed bytes, `[rows, cols]`.
    q: Vec<i8>,
    /// One scale per 256 values, `[rows, cols / 256]`.
    d: Vec<f32>,
    /// `d_x·Σ q` per 16 values, `[rows, cols / 16]`.
    sums16: Vec<f32>,
    /// `d_x·Σ q` per 32 values, `[rows, cols / 32]`.
    sums32: Vec<f32>,
}

impl PromptInput {
    /// `x` (rows of `cols` values, `cols` whole 256-blocks) quantized row by row as Q8_K.
    pub fn new(x: &[f32], cols: usize) -> Self {
        assert!(
            cols > 0 && cols.is_multiple_of(QK_K) && x.len().is_multiple_of(cols),
            "prompt input: {} values in rows of {cols}",
            x.len()
        );
        let rows: Vec<_> = x
            .par_chunks(cols)
            .map(|row| {
                let k = quantize_q8_k(row);
                let sums16: Vec<f32> = k
                    .bsums
                    .iter()
                    .enumerate()
                    .map(|(b, &s)| k.d[b / 16] * f32::from(s))
                    .collect();
                let sums32: Vec<f32> = k
                    .bsums
                    .chunks_exact(2)
                    .enumerate()
                    .map(|(b, s)| k.d[b / 8] * f32::from(s[0] + s[1]))
                    .collect();
                (k.q, k.d, sums16, sums32)
            })
            .collect();
        let mut out = PromptInput {
            cols,
            q: Vec::with_capacity(x.len()),
            d: Vec::with_capacity(x.len() / QK_K),
            sums16: Vec::with_capacity(x.len() / 16),
            sums32: Vec::with_capacity(x.len() / Q8_0_BLOCK),
        };
        for (q, d, sums16, sums32) in rows {
            out.q.extend(q);
            out.d.extend(d);
            out.sums16.extend(sums16);
            out.sums32.extend(sums32);
        }
        out
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.q.len() / self.cols
    }

    /// `d_x·Σ q` per group of `group` values (16 or 32).
    fn sums(&self, group: usize) -> &[f32] {
        if group == 16 {
            &self.sums16
        } else {
            &self.sums32
        }
    }
}

/// Rows unpacked for a prompt product, each in its own run of memory (AVX2, portable).
struct Panel {
    /// Values per group.
    group: usize,
    /// One unsigned value per weight, `[rows, cols]`, in the matrix's order.
    u: Vec<u8>,
    /// The scale of each group, `[rows, cols / group]`.
    sc: Vec<i16>,
    /// `d` per super-block, `[rows, cols / 256]`.
    d: Vec<f32>,
    /// The offset `o_g` of each group, `[rows, cols / group]`.
    offsets: Vec<f32>,
}

impl Panel {
    /// Unpack `w`, whole rows of `cols / 256` super-blocks of type `t`.
    fn new(t: KType, w: &[u8]) -> Self {
        let blocks = w.len() / t.block_bytes();
        let groups = QK_K / t.group();
        let mut p = Panel {
            group: t.group(),
            u: vec![0; blocks * QK_K],
            sc: Vec::with_capacity(blocks * groups),
            d: Vec::with_capacity(blocks),
            offsets: Vec::with_capacity(blocks * groups),
        };
        let (mut sc, mut offsets) = ([0i32; 16], [0f32; 16]);
        for (blk, u) in w
            .chunks_exact(t.block_bytes())
            .zip(p.u.chunks_exact_mut(QK_K))
        {
            let u: &mut [u8; QK_K] = u.try_into().expect("a super-block of values");
            p.d.push(t.unpack(blk, u, &mut sc, &mut offsets));
            // |sc| ≤ 128: an i16.
            p.sc.extend(sc[..groups].iter().map(|&s| s as i16));
            p.offsets.extend_from_slice(&offsets[..groups]);
        }
        p
    }
}

impl Panel {
    /// Unpack `rows` rows of `cols` values of a repacked Q4_K matrix (whole groups).
    fn from_packed(w: &[u8], rows: usize, cols: usize) -> Self {
        let supers = cols / QK_K;
        let mut p = Panel {
            group: Q8_0_BLOCK,
            u: Vec::with_capacity(rows * cols),
            sc: Vec::with_capacity(rows * supers * 8),
            d: Vec::with_capacity(rows * supers),
            offsets: Vec::with_capacity(rows * supers * 8),
        };
        for r in 0..rows {
            let group = &w[r / q4k_x16::ROWS * supers * q4k_x16::SB_BYTES..];
            for s in 0..supers {
                let b = q4k_x16::row_block(group, r % q4k_x16::ROWS, s);
                p.u.extend_from_slice(&b.u);
                p.sc.extend(b.sc.map(i16::from));
                p.d.push(b.d);
                p.offsets.extend(b.m.map(|m| b.dmin * f32::from(m)));
            }
        }
        p
    }
}

/// [`TASK_ROWS`] rows unpacked with the rows interleaved, for the AVX-512 VNNI kernel: every 64
/// bytes hold four consecutive values of each of the 16 rows (row `r` in bytes `4r..4r + 4`),
/// so that one `dpbusd` against four input bytes broadcast takes 16 rows at once, each in its own
/// lane; the scales, `d` and offsets likewise 16 to a register. Missing rows (a last task of
/// fewer) are zeros.
struct Interleaved {
    /// Values per group.
    group: usize,
    /// `[cols / 4][16][4]` unsigned values.
    u: Vec<u8>,
    /// `[cols / group][16]` scales.
    sc: Vec<i32>,
    /// `[cols / 256][16]` super-scales `d`.
    d: Vec<f32>,
    /// `[cols / group][16]` offsets `o_g`.
    offsets: Vec<f32>,
}

impl Interleaved {
    /// Unpack `w`, at most 16 whole rows of `cols / 256` super-blocks of type `t`.
    fn new(t: KType, w: &[u8], cols: usize) -> Self {
        const R: usize = TASK_ROWS;
        let (supers, groups) = (cols / QK_K, QK_K / t.group());
        let mut p = Interleaved {
            group: t.group(),
            u: vec![0; R * cols],
            sc: vec![0; R * supers * groups],
            d: vec![0.0; R * supers],
            offsets: vec![0.0; R * supers * groups],
        };
        let (mut u, mut sc, mut offsets) = ([0u8; QK_K], [0i32; 16], [0f32; 16]);
        for (r, row) in w.chunks_exact(supers * t.block_bytes()).take(R).enumerate() {
            for (s, blk) in row.chunks_exact(t.block_bytes()).enumerate() {
                p.d[s * R + r] = t.unpack(blk, &mut u, &mut sc, &mut offsets);
                for g in 0..groups {
                    p.sc[(s * groups + g) * R + r] = sc[g];
                    p.offsets[(s * groups + g) * R + r] = offsets[g];
                }
                for (k4, four) in u.chunks_exact(4).enumerate() {
                    let at = ((s * QK_K / 4 + k4) * R + r) * 4;
                    p.u[at..at + 4].copy_from_slice(four);
                }
            }
        }
        p
    }
}

/// A matrix as the prompt kernels read it.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// GGML blocks of a type, as stored.
    Blocks(KType, &'a [u8]),
    /// Q4_K repacked 16 rows to a group ([`super::q4k_x16`]).
    Packed(&'a [u8]),
}

impl Source<'_> {
    /// Bytes of `rows` rows of `cols` values.
    fn bytes(&self, rows: usize, cols: usize) -> usize {
        rows * cols / QK_K
            * match self {
                Source::Blocks(t, _) => t.block_bytes(),
                Source::Packed(_) => q4k_x16::ROW_SB_BYTES,
            }
    }

    /// Rows `r0..r0 + rows` (a task), unpacked row by row.
    fn panel(&self, r0: usize, rows: usize, cols: usize) -> Panel {
        let (at, len) = (self.bytes(r0, cols), self.bytes(rows, cols));
        match *self {
            Source::Blocks(t, w) => Panel::new(t, &w[at..at + len]),
            Source::Packed(w) => Panel::from_packed(&w[at..at + len], rows, cols),
        }
    }

    /// Rows `r0..r0 + rows` (a task of at most 16), interleaved.
    fn interleaved(&self, r0: usize, rows: usize, cols: usize) -> Interleaved {
        let (at, len) = (self.bytes(r0, cols), self.bytes(rows, cols));
        match *self {
            Source::Blocks(t, w) => Interleaved::new(t, &w[at..at + len], cols),
            Source::Packed(w) => Interleaved::from_packed(&w[at..at + len], cols),
        }
    }
}

/// `X·Wᵀ` for a matrix `w` of type `t`, `n` rows of `cols` values (whole super-blocks), and
/// `x` rows of `cols` values: `[rows, n]`, with the best kernel for this CPU.
pub fn matmul(t: KType, w: &[u8], n: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    matmul_with(Source::Blocks(t, w), n, &PromptInput::new(x, cols), best())
}

/// `X·Wᵀ` for a repacked Q4_K matrix ([`super::q4k_x16`]) of `n` rows (a multiple of 16) of
/// `cols` values: `[rows, n]`, with the best kernel for this CPU.
pub fn matmul_packed(w: &[u8], n: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    matmul_with(Source::Packed(w), n, &PromptInput::new(x, cols), best())
}

impl Interleaved {
    /// One group of 16 rows of `cols` values of a repacked Q4_K matrix: slot `t` of a
    /// super-block holds this layout's positions `2t` (low nibbles) and `2t + 1` (high ones).
    fn from_packed(w: &[u8], cols: usize) -> Self {
        const R: usize = TASK_ROWS;
        let supers = cols / QK_K;
        let mut p = Interleaved {
            group: Q8_0_BLOCK,
            u: vec![0; R * cols],
            sc: vec![0; R * supers * 8],
            d: vec![0.0; R * supers],
            offsets: vec![0.0; R * supers * 8],
        };
        for (s, sb) in w.chunks_exact(q4k_x16::SB_BYTES).take(supers).enumerate() {
            let u = &mut p.u[s * QK_K * R..(s + 1) * QK_K * R];
            for (slot, out) in sb[..2048].chunks_exact(64).zip(u.chunks_exact_mut(128)) {
                let (lo, hi) = out.split_at_mut(64);
                for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(slot) {
                    *l = b & 0x0F;
                    *h = b >> 4;
                }
            }
            for r in 0..R {
                let (d, dmin) = (
                    f16_at(sb, q4k_x16::D + 2 * r),
                    f16_at(sb, q4k_x16::DMIN + 2 * r),
                );
                p.d[s * R + r] = d;
                for j in 0..8 {
                    p.sc[(s * 8 + j) * R + r] = i32::from(sb[q4k_x16::SCALES + 16 * j + r]);
                    p.offsets[(s * 8 + j) * R + r] =
                        dmin * f32::from(sb[q4k_x16::MINS + 16 * j + r]);
                }
            }
        }
        p
    }
}

/// `X·Wᵀ` with the integer formula, scalar (the reference of the optimized kernels, and their
/// portable path).
pub fn matmul_quantized_naive(t: KType, w: &[u8], n: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    matmul_with(
        Source::Blocks(t, w),
        n,
        &PromptInput::new(x, cols),
        Kernel::Portable,
    )
}

/// `X·Wᵀ` with the matrix dequantized value by value (the exact product).
pub fn matmul_naive(t: KType, w: &[u8], n: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let row_bytes = cols / QK_K * t.block_bytes();
    let wf: Vec<Vec<f32>> = (0..n)
        .map(|r| t.dequantize(&w[r * row_bytes..(r + 1) * row_bytes]))
        .collect();
    x.chunks_exact(cols)
        .flat_map(|xr| {
            wf.iter()
                .map(|wr| wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn best() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512_vnni() {
            return Kernel::Avx512;
        }
        if crate::cpu::has_avx2_fma() {
            return Kernel::Avx2;
        }
    }
    Kernel::Portable
}

fn matmul_with(src: Source<'_>, n: usize, x: &PromptInput, kernel: Kernel) -> Vec<f32> {
    let (rows, cols) = (x.rows(), x.cols);
    let len = match src {
        Source::Blocks(_, w) | Source::Packed(w) => w.len(),
    };
    assert!(
        len >= src.bytes(n, cols)
            && (matches!(src, Source::Blocks(..)) || n.is_multiple_of(q4k_x16::ROWS)),
        "prompt product: {n} rows of {cols}"
    );
    if rows == 0 || n == 0 {
        return Vec::new();
    }
    #[cfg(target_arch = "x86_64")]
    if let Kernel::Avx512 = kernel {
        return matmul_interleaved(src, n, x);
    }
    // Each task computes its matrix rows against every input row, `[rows, task_rows]`; the
    // blocks are then laid side by side.
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(TASK_ROWS))
        .into_par_iter()
        .map(|task| {
            let r0 = task * TASK_ROWS;
            let task_rows = TASK_ROWS.min(n - r0);
            let mut block = vec![0f32; rows * task_rows];
            let panel = src.panel(r0, task_rows, cols);
            for i in (0..rows).step_by(GROUP) {
                let group: [usize; GROUP] = std::array::from_fn(|g| (i + g).min(rows - 1));
                for r in 0..task_rows {
                    let v = match kernel {
                        // SAFETY: `best` chose this kernel for a CPU with AVX2 and FMA; the
                        // panel's and the input's sizes are checked inside.
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => unsafe { avx2::dots(&panel, r, x, group) },
                        _ => dots_portable(&panel, r, x, group),
                    };
                    for (g, v) in v.into_iter().enumerate().take(rows - i) {
                        block[(i + g) * task_rows + r] = v;
                    }
                }
            }
            block
        })
        .collect();
    side_by_side(&blocks, rows, n, TASK_ROWS)
}

/// The tasks' blocks (`[rows, task_rows]` each, tasks of `task` matrix rows but the last) laid
/// side by side: `[rows, n]`.
fn side_by_side(blocks: &[Vec<f32>], rows: usize, n: usize, task: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
        for (o, b) in o.chunks_mut(task).zip(blocks) {
            o.copy_from_slice(&b[i * o.len()..(i + 1) * o.len()]);
        }
    });
    out
}

/// [`matmul_with`] on AVX-512 VNNI: tasks of [`PANELS_PER_TASK`] interleaved panels; every
/// group of [`WIDE_GROUP`] input rows, laid out as [`GroupedInput`], passes over
/// [`CHUNK_SUPERS`] super-blocks of one panel (in L1) at a time, and each such span of the input
/// (in L2) over all the task's panels before the next span.
#[cfg(target_arch = "x86_64")]
fn matmul_interleaved(src: Source<'_>, n: usize, x: &PromptInput) -> Vec<f32> {
    let (rows, cols) = (x.rows(), x.cols);
    let grouped = GroupedInput::new(x);
    let task = TASK_ROWS * PANELS_PER_TASK;
    let supers = cols / QK_K;
    let mut out: Vec<f32> = Vec::with_capacity(rows * n);
    let dst = Columns(out.as_mut_ptr());
    (0..n.div_ceil(task)).into_par_iter().for_each(|t| {
        let r0 = t * task;
        let task_rows = task.min(n - r0);
        let panels: Vec<(usize, Interleaved)> = (r0..r0 + task_rows)
            .step_by(TASK_ROWS)
            .map(|p0| {
                let len = TASK_ROWS.min(r0 + task_rows - p0);
                (len, src.interleaved(p0, len, cols))
            })
            .collect();
        // Per panel, per group of input rows: eight rows of 16 sums.
        let mut acc = vec![vec![[[0f32; TASK_ROWS]; WIDE_GROUP]; grouped.groups]; panels.len()];
        for s0 in (0..supers).step_by(CHUNK_SUPERS) {
            let span = s0..(s0 + CHUNK_SUPERS).min(supers);
            for ((_, panel), acc) in panels.iter().zip(acc.iter_mut()) {
                for (gi, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: `best` chose this kernel for a CPU with AVX-512 F, BW and VNNI,
                    // AVX2 and FMA; the panel's and the input's sizes and the span are checked
                    // inside.
                    unsafe { avx512::dots16(panel, x, &grouped, gi, span.clone(), acc) };
                }
            }
        }
        for i in 0..rows {
            let mut col = r0;
            for ((len, _), acc) in panels.iter().zip(&acc) {
                let v = &acc[i / WIDE_GROUP][i % WIDE_GROUP][..*len];
                // SAFETY: row `i < rows`, columns `col..col + len` inside this task's
                // `r0..r0 + task_rows ⊆ 0..n`: within the capacity, and written by this task
                // alone.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst.at(i * n + col), *len) };
                col += len;
            }
        }
    });
    // SAFETY: the tasks' columns `r0..r0 + task_rows` tile `0..n`, and each task wrote them in
    // every row: all `rows · n` values are initialised.
    unsafe { out.set_len(rows * n) };
    out
}

/// The output of [`matmul_interleaved`], written by its tasks, each to its own columns.
#[cfg(target_arch = "x86_64")]
struct Columns(*mut f32);

// SAFETY: the tasks write disjoint elements through it (their own columns), and nothing reads
// them until all have finished.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Columns {}

#[cfg(target_arch = "x86_64")]
impl Columns {
    /// Element `i` of the output.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// A prompt's quantized rows regrouped for the AVX-512 kernel: groups of [`WIDE_GROUP`] rows,
/// each group's four bytes at a time side by side (`[groups, cols / 4, WIDE_GROUP, 4]`), so
/// that one step of the kernel reads one run of 32 bytes. A last group of fewer rows repeats
/// its last row.
#[cfg(target_arch = "x86_64")]
struct GroupedInput {
    groups: usize,
    q: Vec<i8>,
}

#[cfg(target_arch = "x86_64")]
impl GroupedInput {
    fn new(x: &PromptInput) -> Self {
        const G: usize = WIDE_GROUP;
        let (rows, cols) = (x.rows(), x.cols);
        let groups = rows.div_ceil(G);
        let mut q = vec![0i8; groups * G * cols];
        q.par_chunks_mut(G * cols)
            .enumerate()
            .for_each(|(gi, out)| {
                for g in 0..G {
                    let r = (gi * G + g).min(rows - 1);
                    let src = &x.q[r * cols..(r + 1) * cols];
                    for (k4, four) in src.chunks_exact(4).enumerate() {
                        out[(k4 * G + g) * 4..(k4 * G + g) * 4 + 4].copy_from_slice(four);
                    }
                }
            });
        GroupedInput { groups, q }
    }

    /// The input rows of group `gi` (`gi·G + g`, the last one repeated past the end).
    fn rows_of(&self, gi: usize, rows: usize) -> [usize; WIDE_GROUP] {
        std::array::from_fn(|g| (gi * WIDE_GROUP + g).min(rows - 1))
    }
}

/// Row `r` of the panel against four input rows: the integer formula, scalar.
fn dots_portable(p: &Panel, r: usize, x: &PromptInput, group: [usize; GROUP]) -> [f32; GROUP] {
    let (cols, gsize) = (x.cols, p.group);
    let (supers, groups) = (cols / QK_K, cols / gsize);
    let per = QK_K / gsize;
    let sums = x.sums(gsize);
    group.map(|i| {
        let mut acc = 0f32;
        for s in 0..supers {
            let mut sumi = 0i32;
            for g in s * per..(s + 1) * per {
                let u = &p.u[r * cols + g * gsize..][..gsize];
                let q = &x.q[i * cols + g * gsize..][..gsize];
                let dot: i32 = u
                    .iter()
                    .zip(q)
                    .map(|(&u, &q)| i32::from(u) * i32::from(q))
                    .sum();
                sumi += i32::from(p.sc[r * groups + g]) * dot;
            }
            acc += p.d[r * supers + s] * x.d[i * supers + s] * sumi as f32;
            for g in s * per..(s + 1) * per {
                acc -= p.offsets[r * groups + g] * sums[i * groups + g];
            }
        }
        acc
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Panel, PromptInput, GROUP};
    use crate::kernels::avx2::hsum;
    use crate::kernels::{Q8_0_BLOCK, QK_K};

    /// Row `r` of the panel against four input rows. Per 32 values: one load of the unpacked
    /// weights (`u` ≤ 63) and the scales of its one or two groups in 16-bit lanes, then per
    /// input row `maddubs` with the input's signed bytes (pair sums at most 2·63·128 = 16128,
    /// no saturation) and `madd` with the scales (|sc| ≤ 128: lanes at most 2·128·16128 per 32
    /// values, 8 of them: < 2²⁶), summed in integers; per super-block one conversion and
    /// `d·d_x`, and the offsets' part as 8-lane products of `o_g` and `d_x·Σ q_x`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        p: &Panel,
        r: usize,
        x: &PromptInput,
        group: [usize; GROUP],
    ) -> [f32; GROUP] {
        let (cols, gsize) = (x.cols, p.group);
        let (supers, groups) = (cols / QK_K, cols / gsize);
        let sums = x.sums(gsize);
        assert!(
            (gsize == 16 || gsize == 32)
                && p.u.len() >= (r + 1) * cols
                && p.sc.len() >= (r + 1) * groups
                && p.offsets.len() >= (r + 1) * groups
                && p.d.len() >= (r + 1) * supers
                && group.iter().all(|&i| x.q.len() >= (i + 1) * cols),
            "prompt product: sizes"
        );
        let u = p.u.as_ptr().add(r * cols);
        let sc = p.sc.as_ptr().add(r * groups);
        let offsets = p.offsets.as_ptr().add(r * groups);
        let dw = p.d.as_ptr().add(r * supers);
        let xq = group.map(|i| x.q.as_ptr().add(i * cols));
        let xd = group.map(|i| x.d.as_ptr().add(i * supers));
        let xs = group.map(|i| sums.as_ptr().add(i * groups));
        let per = QK_K / gsize;
        let mut f = [_mm256_setzero_ps(); GROUP];
        for s in 0..supers {
            let mut acc = [_mm256_setzero_si256(); GROUP];
            for j in 0..8 {
                let at = s * QK_K + j * Q8_0_BLOCK;
                let wv = _mm256_loadu_si256(u.add(at) as *const __m256i);
                let scv = if gsize == 32 {
                    _mm256_set1_epi16(*sc.add(s * 8 + j))
                } else {
                    _mm256_set_m128i(
                        _mm_set1_epi16(*sc.add(s * 16 + 2 * j + 1)),
                        _mm_set1_epi16(*sc.add(s * 16 + 2 * j)),
                    )
                };
                for g in 0..GROUP {
                    let xv = _mm256_loadu_si256(xq[g].add(at) as *const __m256i);
                    acc[g] = _mm256_add_epi32(
                        acc[g],
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), scv),
                    );
                }
            }
            let d = *dw.add(s);
            for g in 0..GROUP {
                f[g] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(acc[g]),
                    _mm256_set1_ps(d * *xd[g].add(s)),
                    f[g],
                );
                for o in (0..per).step_by(8) {
                    f[g] = _mm256_fnmadd_ps(
                        _mm256_loadu_ps(offsets.add(s * per + o)),
                        _mm256_loadu_ps(xs[g].add(s * per + o)),
                        f[g],
                    );
                }
            }
        }
        f.map(|v| hsum(v))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{GroupedInput, Interleaved, PromptInput, TASK_ROWS, WIDE_GROUP};
    use crate::kernels::QK_K;

    /// The 16 rows of an interleaved panel against eight input rows over the super-blocks
    /// `span`, added to `acc` (row `g` of the group in `acc[g]`, each matrix row a lane). Per
    /// four values: one load of the 16 rows' bytes (`u` ≤ 63) and per input row `dpbusd` with
    /// its four signed bytes broadcast (at most 4·63·128 per lane and step, at most 8 steps per
    /// group: < 2¹⁸); per group the sum times the 16 scales (`mullo`, |sc| ≤ 128: < 2²⁵, 16
    /// groups < 2²⁹) and the offsets' part `o_g·(d_x·Σ q_x)` in f32; per super-block one
    /// conversion and `d·d_x`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(super) unsafe fn dots16(
        p: &Interleaved,
        x: &PromptInput,
        grouped: &GroupedInput,
        gi: usize,
        span: std::ops::Range<usize>,
        acc: &mut [[f32; TASK_ROWS]; WIDE_GROUP],
    ) {
        const R: usize = TASK_ROWS;
        let (cols, gsize) = (x.cols, p.group);
        let (supers, groups) = (cols / QK_K, cols / gsize);
        let sums = x.sums(gsize);
        let group = grouped.rows_of(gi, x.rows());
        assert!(
            span.start <= span.end
                && span.end <= supers
                && (gsize == 16 || gsize == 32)
                && p.u.len() == R * cols
                && p.sc.len() == R * groups
                && p.offsets.len() == R * groups
                && p.d.len() == R * supers
                && gi < grouped.groups
                && grouped.q.len() == grouped.groups * WIDE_GROUP * cols,
            "prompt product: sizes"
        );
        // Value `k` (a multiple of 4) of row `g` of the group: bytes `8k + 4g` of its run.
        let xq = grouped.q.as_ptr().add(gi * WIDE_GROUP * cols);
        let xd = group.map(|i| x.d.as_ptr().add(i * supers));
        let xs = group.map(|i| sums.as_ptr().add(i * groups));
        let u = p.u.as_ptr();
        let per = QK_K / gsize;
        let mut f = acc.map(|a| _mm512_loadu_ps(a.as_ptr()));
        for s in span {
            let mut sup = [_mm512_setzero_si512(); WIDE_GROUP];
            for b in s * per..(s + 1) * per {
                let mut sub = [_mm512_setzero_si512(); WIDE_GROUP];
                for step in 0..gsize / 4 {
                    let k = b * gsize + 4 * step;
                    let wv = _mm512_loadu_si512(u.add(k * R) as *const __m512i);
                    for (g, sub) in sub.iter_mut().enumerate() {
                        let xv = _mm512_set1_epi32(
                            (xq.add(WIDE_GROUP * k + 4 * g) as *const i32).read_unaligned(),
                        );
                        *sub = _mm512_dpbusd_epi32(*sub, wv, xv);
                    }
                }
                let sc = _mm512_loadu_si512(p.sc.as_ptr().add(b * R) as *const __m512i);
                let offsets = _mm512_loadu_ps(p.offsets.as_ptr().add(b * R));
                for g in 0..WIDE_GROUP {
                    sup[g] = _mm512_add_epi32(sup[g], _mm512_mullo_epi32(sub[g], sc));
                    f[g] = _mm512_fnmadd_ps(offsets, _mm512_set1_ps(*xs[g].add(b)), f[g]);
                }
            }
            let d = _mm512_loadu_ps(p.d.as_ptr().add(s * R));
            for g in 0..WIDE_GROUP {
                f[g] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sup[g]),
                    _mm512_mul_ps(d, _mm512_set1_ps(*xd[g].add(s))),
                    f[g],
                );
            }
        }
        for (a, v) in acc.iter_mut().zip(f) {
            _mm512_storeu_ps(a.as_mut_ptr(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{kquants, QuantInput};
    use crate::testutil::{q8k_rounding_bound, quantized_bytes, rand_scaled as rand};
    use candle_core::quantized::GgmlDType;

    fn quantize(t: KType, w: &[f32], n: usize, cols: usize) -> Vec<u8> {
        let dtype = match t {
            KType::Q4K => GgmlDType::Q4K,
            KType::Q5K => GgmlDType::Q5K,
            KType::Q6K => GgmlDType::Q6K,
        };
        quantized_bytes(w, (n, cols), dtype)
    }

    /// Every kernel this CPU can run.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::has_avx2_fma() {
                v.push(Kernel::Avx2);
            }
            if crate::cpu::has_avx512_vnni() {
                v.push(Kernel::Avx512);
            }
        }
        v
    }

    /// For each type, on odd shapes (input rows not a multiple of four, matrix rows not a
    /// multiple of a task; an extreme row, a zero row, a zero input row): every kernel equals the
    /// scalar integer formula to f32 rounding and is deterministic, and all are within the
    /// input's 8-bit rounding of the exact product; for Q4_K each prompt row also equals that
    /// row through the decode kernel's integer formula (the same input rounding).
    #[test]
    fn prompt_kernels_match_their_references() {
        for t in [KType::Q4K, KType::Q5K, KType::Q6K] {
            for (rows, n, cols) in [
                (1, 3, 256),
                (5, 17, 512),
                (9, 33, 768),
                (16, 16, 256),
                (7, 32, 512),
                // Spans of CHUNK_SUPERS super-blocks and a shorter last one; tasks of
                // PANELS_PER_TASK panels and a last one of fewer, the last panel partial.
                (11, 80, 1536),
                (3, 70, 2304),
            ] {
                let mut w = rand(n * cols, rows as u64, 1.0);
                w[..cols].iter_mut().for_each(|v| *v *= 1e4);
                if n > 2 {
                    w[cols..2 * cols].fill(0.0);
                }
                let wq = quantize(t, &w, n, cols);
                let mut x = rand(rows * cols, 7 + rows as u64, 3.0);
                if rows > 2 {
                    x[cols..2 * cols].fill(0.0);
                }
                let int = matmul_quantized_naive(t, &wq, n, cols, &x);
                let exact = matmul_naive(t, &wq, n, cols, &x);
                let input = PromptInput::new(&x, cols);
                let mut runs: Vec<(String, Vec<f32>)> = available()
                    .into_iter()
                    .map(|k| {
                        let src = Source::Blocks(t, &wq);
                        let got = matmul_with(src, n, &input, k);
                        assert_eq!(got, matmul_with(src, n, &input, k), "{t:?} {k:?}");
                        (format!("{k:?}"), got)
                    })
                    .collect();
                runs.push(("best".into(), matmul(t, &wq, n, cols, &x)));
                // A repacked Q4_K matrix gives the same panels, so the same results.
                if t == KType::Q4K && n.is_multiple_of(q4k_x16::ROWS) {
                    let packed = q4k_x16::pack(&wq, n, cols);
                    for k in available() {
                        let got = matmul_with(Source::Packed(&packed), n, &input, k);
                        assert_eq!(got, matmul_with(Source::Blocks(t, &wq), n, &input, k));
                    }
                    // (Checked against the references below, not against "best": tests that
                    // force the portable paths may run meanwhile and change its kernel.)
                    runs.push(("packed".into(), matmul_packed(&packed, n, cols, &x)));
                }
                for i in 0..rows {
                    let xr = &x[i * cols..(i + 1) * cols];
                    let norm: f32 = xr.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let mut decoded = vec![0f32; n];
                    if t == KType::Q4K {
                        kquants::matvec_q4k_quantized_naive(
                            &wq,
                            &QuantInput::new(xr),
                            &mut decoded,
                        );
                    }
                    let rounding: Vec<f32> = (0..n)
                        .map(|r| {
                            let at = r * wq.len() / n;
                            let wd = t.dequantize(&wq[at..at + wq.len() / n]);
                            q8k_rounding_bound(&wd, xr)
                        })
                        .collect();
                    for r in 0..n {
                        let wr = &w[r * cols..(r + 1) * cols];
                        let wnorm: f32 = wr.iter().map(|v| v * v).sum::<f32>().sqrt();
                        let at = i * n + r;
                        let tight = 1e-5 * (wnorm * norm).max(1.0);
                        for (k, got) in &runs {
                            let g = got[at];
                            let what = format!("{t:?} {k} ({rows},{n},{cols}) [{i},{r}]");
                            assert!(g.is_finite(), "{what}");
                            assert!((g - int[at]).abs() <= tight, "{what}: {g} vs {}", int[at]);
                            assert!(
                                (g - exact[at]).abs() <= rounding[r] + tight,
                                "{what}: {g} vs exact {} (input rounding up to {})",
                                exact[at],
                                rounding[r]
                            );
                            if t == KType::Q4K {
                                assert!((g - decoded[r]).abs() <= tight, "{what}: vs decode");
                            }
                        }
                    }
                }
            }
        }
    }
}
