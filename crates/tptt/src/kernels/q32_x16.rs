//! Q4_1 and Q8_0 matrices (32-value blocks) repacked at load for CPUs with AVX-512 VNNI: 16 rows
//! interleaved, so that a decode multiplies 16 rows at once, each in a lane of one register,
//! instead of one row at a time with a horizontal sum per row. The stored layout keeps a row's
//! blocks together; the kernels over it ([`super::q4_1`], [`super::matvec_q8_0_rows`]) spend
//! most of their instructions per row and block on scalar scales and shuffles and run far under
//! the memory's speed (llama.cpp repacks these types too on such CPUs).
//!
//! A matrix of `rows` (a multiple of 16) rows of `cols` values (whole blocks of 32) becomes
//! `rows / 16` groups; a group holds its blocks in order, each block of its 16 rows as:
//! - **Q4_1** ([`Format::Q4_1`], 320 bytes): 4 slots of 64 bytes, slot `t`, lane `r` (bytes
//!   `4r..4r + 4`) holding values `8t..8t + 4` of row `r` in its low nibbles and `8t + 4..8t + 8`
//!   in its high ones; then `d`, then `m`, 16 f16 each. The weight is `d·u + m`.
//! - **Q8_0** ([`Format::Q8_0`], 544 bytes): 8 slots of 64 bytes, slot `t`, lane `r` holding
//!   values `4t..4t + 4` of row `r` as `q + 128` (unsigned, for `dpbusd`); then `d`, 16 f16. The
//!   weight is `d·q`.
//!
//! That is 20 and 34 bytes per row and block, as stored. Against the input quantized per 32
//! values (`x ≈ d_x·q_x`, [`QuantInput`]) a row is the stored type's product:
//! `Σ_b d·d_x·Σ u·q_x + m·s_x` (Q4_1, `s_x` the input's Q8_1 block sum) and
//! `Σ_b d·d_x·(Σ (q + 128)·q_x − 128·Σ q_x)` (Q8_0: the same integer as `Σ q·q_x`).
//! [`matvec_naive`] (dequantized, the exact product) and [`matvec_quantized_naive`] (the integer
//! formula, scalar: the portable path) are the references of the kernels.

use super::q4_1::Q4_1_BLOCK_BYTES;
use super::{f16_at, QuantInput, Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

/// Rows per group.
pub const ROWS: usize = 16;

/// The stored type a repacked matrix came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// GGML Q4_1: `d·u + m`, `u` 4-bit.
    Q4_1,
    /// GGML Q8_0: `d·q`, `q` a signed byte.
    Q8_0,
}

impl Format {
    /// Bytes of one stored block (one row, 32 values).
    pub const fn stored_block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => Q4_1_BLOCK_BYTES,
            Format::Q8_0 => Q8_0_BLOCK_BYTES,
        }
    }

    /// Bytes of one block of a group (16 rows, 32 values each).
    pub const fn group_block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => Q4_1_VALUES + 2 * 2 * ROWS,
            Format::Q8_0 => Q8_0_VALUES + 2 * ROWS,
        }
    }

    /// Bytes per row and block (the same as stored).
    pub const fn row_block_bytes(self) -> usize {
        self.group_block_bytes() / ROWS
    }

    /// Offset of the 16 `d` in a group's block.
    pub(super) const fn d_at(self) -> usize {
        match self {
            Format::Q4_1 => Q4_1_VALUES,
            Format::Q8_0 => Q8_0_VALUES,
        }
    }
}

/// Bytes of a Q4_1 group block's values: 4 slots of 64.
const Q4_1_VALUES: usize = 4 * 64;
/// Offset of a Q4_1 group block's 16 minima `m`.
pub(super) const Q4_1_M: usize = Q4_1_VALUES + 2 * ROWS;
/// Bytes of a Q8_0 group block's values: 8 slots of 64.
const Q8_0_VALUES: usize = 8 * 64;

/// Repack `w`, `rows` stored `format` rows of `cols` values (`rows` a multiple of 16, `cols` of
/// 32).
pub fn pack(format: Format, w: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let blocks = check_shape(format, w.len(), rows, cols);
    let gb = format.group_block_bytes();
    let len = rows / ROWS * blocks * gb;
    let mut out = Vec::with_capacity(len);
    crate::alloc::advise_huge_pages(&mut out);
    out.resize(len, 0u8);
    let stored_group = ROWS * blocks * format.stored_block_bytes();
    for (group, stored) in out
        .chunks_exact_mut(blocks * gb)
        .zip(w.chunks_exact(stored_group))
    {
        pack_group(format, stored, blocks, group);
    }
    out
}

/// [`pack`] in place: `buf` holds the stored rows and is left holding the same bytes as `pack`
/// returns (a group takes as many bytes repacked as stored), with one group's worth of scratch:
/// a matrix is never in memory twice while it loads (the largest, a vocabulary, was).
pub fn pack_in_place(format: Format, buf: &mut [u8], rows: usize, cols: usize) {
    let blocks = check_shape(format, buf.len(), rows, cols);
    let stored_group = ROWS * blocks * format.stored_block_bytes();
    debug_assert_eq!(stored_group, blocks * format.group_block_bytes());
    let mut scratch = vec![0u8; stored_group];
    for group in buf.chunks_exact_mut(stored_group) {
        scratch.copy_from_slice(group);
        pack_group(format, &scratch, blocks, group);
    }
}

/// The blocks per row of a `[rows, cols]` `format` matrix of `len` stored bytes.
///
/// # Panics
/// When the shape is not whole groups of whole blocks in `len` bytes.
fn check_shape(format: Format, len: usize, rows: usize, cols: usize) -> usize {
    let blocks = cols / Q8_0_BLOCK;
    assert!(
        rows.is_multiple_of(ROWS)
            && cols.is_multiple_of(Q8_0_BLOCK)
            && len == rows * blocks * format.stored_block_bytes(),
        "pack: {len} bytes for [{rows}, {cols}] {format:?}"
    );
    blocks
}

/// One group: `stored`, 16 rows of `blocks` stored blocks, repacked into `group`.
fn pack_group(format: Format, stored: &[u8], blocks: usize, group: &mut [u8]) {
    let (sb, gb) = (format.stored_block_bytes(), format.group_block_bytes());
    for (b, gblk) in group.chunks_exact_mut(gb).enumerate() {
        for r in 0..ROWS {
            let at = (r * blocks + b) * sb;
            let blk = &stored[at..at + sb];
            let d = format.d_at();
            gblk[d + 2 * r..d + 2 * r + 2].copy_from_slice(&blk[0..2]);
            match format {
                Format::Q4_1 => {
                    gblk[Q4_1_M + 2 * r..Q4_1_M + 2 * r + 2].copy_from_slice(&blk[2..4]);
                    // Stored: value `j` (< 16) in the low nibble of byte `4 + j`, `j + 16`
                    // in its high one.
                    let u: [u8; Q8_0_BLOCK] = std::array::from_fn(|j| match j < 16 {
                        true => blk[4 + j] & 0x0F,
                        false => blk[4 + j - 16] >> 4,
                    });
                    for t in 0..4 {
                        for i in 0..4 {
                            gblk[64 * t + 4 * r + i] = u[8 * t + i] | (u[8 * t + 4 + i] << 4);
                        }
                    }
                }
                Format::Q8_0 => {
                    for t in 0..8 {
                        for i in 0..4 {
                            gblk[64 * t + 4 * r + i] = blk[2 + 4 * t + i] ^ 0x80;
                        }
                    }
                }
            }
        }
    }
}

/// Block `b` of row `r` (< 16) of a group of `blocks` blocks: its scale, its minimum (0 for
/// Q8_0) and its 32 integer values (`u` for Q4_1, `q` for Q8_0).
fn row_block(format: Format, group: &[u8], r: usize, b: usize) -> (f32, f32, [i32; Q8_0_BLOCK]) {
    let gb = format.group_block_bytes();
    let gblk = &group[b * gb..(b + 1) * gb];
    let d = f16_at(gblk, format.d_at() + 2 * r);
    match format {
        Format::Q4_1 => {
            let q = std::array::from_fn(|j| {
                let (t, i) = (j / 8, j % 8);
                let byte = gblk[64 * t + 4 * r + i % 4];
                i32::from(if i < 4 { byte & 0x0F } else { byte >> 4 })
            });
            (d, f16_at(gblk, Q4_1_M + 2 * r), q)
        }
        Format::Q8_0 => {
            let q = std::array::from_fn(|j| {
                let (t, i) = (j / 4, j % 4);
                i32::from((gblk[64 * t + 4 * r + i] ^ 0x80) as i8)
            });
            (d, 0.0, q)
        }
    }
}

/// The group of row `r` in a packed matrix of `blocks` blocks per row.
fn group_of(format: Format, packed: &[u8], blocks: usize, r: usize) -> &[u8] {
    let len = blocks * format.group_block_bytes();
    &packed[r / ROWS * len..(r / ROWS + 1) * len]
}

/// Row `r` of a packed matrix of `cols` values, dequantized (`d·u + m`, `d·q`).
pub fn dequantize_row(format: Format, packed: &[u8], cols: usize, r: usize) -> Vec<f32> {
    dequantize_rows(format, packed, cols, r, 1)
}

/// Rows `start..start + len` of a packed matrix of `cols` values, dequantized, row-major (a
/// prompt's product widens the matrix a few rows at a time).
pub fn dequantize_rows(
    format: Format,
    packed: &[u8],
    cols: usize,
    start: usize,
    len: usize,
) -> Vec<f32> {
    let blocks = cols / Q8_0_BLOCK;
    let gb = format.group_block_bytes();
    let mut out = vec![0f32; len * cols];
    for (r, o) in (start..start + len).zip(out.chunks_exact_mut(cols.max(1))) {
        let group = group_of(format, packed, blocks, r);
        let lane = r % ROWS;
        for (gblk, o) in group.chunks_exact(gb).zip(o.chunks_exact_mut(Q8_0_BLOCK)) {
            let d = f16_at(gblk, format.d_at() + 2 * lane);
            match format {
                Format::Q4_1 => {
                    let m = f16_at(gblk, Q4_1_M + 2 * lane);
                    for (t, o) in o.chunks_exact_mut(8).enumerate() {
                        let w = &gblk[64 * t + 4 * lane..64 * t + 4 * lane + 4];
                        for i in 0..4 {
                            o[i] = d * f32::from(w[i] & 0x0F) + m;
                            o[i + 4] = d * f32::from(w[i] >> 4) + m;
                        }
                    }
                }
                Format::Q8_0 => {
                    for (t, o) in o.chunks_exact_mut(4).enumerate() {
                        let w = &gblk[64 * t + 4 * lane..64 * t + 4 * lane + 4];
                        for i in 0..4 {
                            o[i] = d * f32::from((w[i] ^ 0x80) as i8);
                        }
                    }
                }
            }
        }
    }
    out
}

/// `out = W·x` over packed rows, dequantized value by value (the exact product).
pub fn matvec_naive(format: Format, packed: &[u8], x: &[f32], out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = dequantize_row(format, packed, x.len(), r)
            .iter()
            .zip(x)
            .map(|(w, x)| w * x)
            .sum();
    }
}

/// Packed rows against the input quantized per 32 values, the integer formula, scalar (the
/// reference of the optimized kernels, and their portable path). Q4_1 reads the input's Q8_1
/// block sums (`xi.q8_1_sums`), as the stored type's kernels do.
pub fn matvec_quantized_naive(format: Format, packed: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let blocks = xi.d.len();
    for (r, o) in out.iter_mut().enumerate() {
        let group = group_of(format, packed, blocks, r);
        let mut acc = 0f32;
        for b in 0..blocks {
            let (d, m, q) = row_block(format, group, r % ROWS, b);
            let dot: i32 = q
                .iter()
                .zip(&xi.q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK])
                .map(|(&w, &x)| w * i32::from(x))
                .sum();
            acc += d * xi.d[b] * dot as f32;
            if format == Format::Q4_1 {
                acc += m * xi.q8_1_sums[b];
            }
        }
        *o = acc;
    }
}

/// Serial `out = W·x` over whole packed groups on the quantized input (Q4_1: with its Q8_1
/// block sums; Q8_0: with its block sums `Σ q_x`), with the best kernel for this CPU.
pub(super) fn matvec_rows(format: Format, packed: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512_vnni() && out.len().is_multiple_of(ROWS) {
            // SAFETY: the CPU has the features the functions are compiled for (checked above);
            // the sizes are checked inside.
            match format {
                Format::Q4_1 => unsafe {
                    avx512::matvec_q4_1(packed, &xi.q, &xi.d, &xi.q8_1_sums, out)
                },
                Format::Q8_0 => unsafe { avx512::matvec_q8_0(packed, &xi.q, &xi.d, &xi.sums, out) },
            }
            return;
        }
    }
    matvec_quantized_naive(format, packed, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Format, Q4_1_M, ROWS};
    use crate::kernels::Q8_0_BLOCK;

    /// Four input bytes from `p`, broadcast to every lane.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32((p as *const i32).read_unaligned())
    }

    /// Whole Q4_1 groups against the Q8 input, a row per lane. Per slot (64 bytes: 8 values of
    /// 16 rows) the low and high nibbles, each `dpbusd` with four input bytes broadcast, in two
    /// chains (at most 4·4·15·127 per lane); per block one conversion, times `d·d_x`, and the
    /// minima times the input's block sum in a second accumulator.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q4_1(
        packed: &[u8],
        xq: &[i8],
        xd: &[f32],
        xs: &[f32],
        out: &mut [f32],
    ) {
        let blocks = xd.len();
        let gb = Format::Q4_1.group_block_bytes();
        let d_at = Format::Q4_1.d_at();
        assert!(
            out.len().is_multiple_of(ROWS)
                && xq.len() == blocks * Q8_0_BLOCK
                && xs.len() == blocks
                && packed.len() >= out.len() / ROWS * blocks * gb,
            "q4_1 x16 matvec: sizes"
        );
        let low = _mm512_set1_epi8(0x0F);
        for (g, o) in out.chunks_exact_mut(ROWS).enumerate() {
            let group = packed.as_ptr().add(g * blocks * gb);
            let (mut f, mut fm) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for b in 0..blocks {
                let p = group.add(b * gb);
                let x = xq.as_ptr().add(b * Q8_0_BLOCK);
                let (mut a, mut c) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for t in 0..4 {
                    crate::kernels::prefetch_ahead(p.add(64 * t));
                    let v = _mm512_loadu_si512(p.add(64 * t) as *const __m512i);
                    let lo = _mm512_and_si512(v, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    a = _mm512_dpbusd_epi32(a, lo, bcast4(x.add(8 * t)));
                    c = _mm512_dpbusd_epi32(c, hi, bcast4(x.add(8 * t + 4)));
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(d_at) as *const __m256i));
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(Q4_1_M) as *const __m256i));
                let dx = _mm512_set1_ps(*xd.get_unchecked(b));
                f = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(a, c)),
                    _mm512_mul_ps(d, dx),
                    f,
                );
                fm = _mm512_fmadd_ps(m, _mm512_set1_ps(*xs.get_unchecked(b)), fm);
            }
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_add_ps(f, fm));
        }
    }

    /// Whole Q8_0 groups against the Q8 input, a row per lane: the weights stored as `q + 128`
    /// (unsigned, for `dpbusd`), eight slots of four values in two chains (at most 4·4·255·127
    /// per lane and chain), less `128·Σ q_x` per block: exactly `Σ q·q_x`; one conversion per
    /// block, times `d·d_x`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q8_0(
        packed: &[u8],
        xq: &[i8],
        xd: &[f32],
        xsum: &[i32],
        out: &mut [f32],
    ) {
        let blocks = xd.len();
        let gb = Format::Q8_0.group_block_bytes();
        let d_at = Format::Q8_0.d_at();
        assert!(
            out.len().is_multiple_of(ROWS)
                && xq.len() == blocks * Q8_0_BLOCK
                && xsum.len() == blocks
                && packed.len() >= out.len() / ROWS * blocks * gb,
            "q8_0 x16 matvec: sizes"
        );
        for (g, o) in out.chunks_exact_mut(ROWS).enumerate() {
            let group = packed.as_ptr().add(g * blocks * gb);
            let mut f = _mm512_setzero_ps();
            for b in 0..blocks {
                let p = group.add(b * gb);
                let x = xq.as_ptr().add(b * Q8_0_BLOCK);
                let (mut a, mut c) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for t in (0..8).step_by(2) {
                    crate::kernels::prefetch_ahead(p.add(64 * t));
                    crate::kernels::prefetch_ahead(p.add(64 * t + 64));
                    let v0 = _mm512_loadu_si512(p.add(64 * t) as *const __m512i);
                    let v1 = _mm512_loadu_si512(p.add(64 * t + 64) as *const __m512i);
                    a = _mm512_dpbusd_epi32(a, v0, bcast4(x.add(4 * t)));
                    c = _mm512_dpbusd_epi32(c, v1, bcast4(x.add(4 * t + 4)));
                }
                let dot = _mm512_sub_epi32(
                    _mm512_add_epi32(a, c),
                    _mm512_set1_epi32(128 * *xsum.get_unchecked(b)),
                );
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(d_at) as *const __m256i));
                let dx = _mm512_set1_ps(*xd.get_unchecked(b));
                f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, dx), f);
            }
            _mm512_storeu_ps(o.as_mut_ptr(), f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec_q8_0_naive;
    use crate::kernels::q4_1::{matvec_q4_1_naive, matvec_q4_1_quantized_naive};
    use crate::testutil::{quantized_bytes, rand_scaled as rand};
    use candle_core::quantized::GgmlDType;

    /// Stored `format` rows against the quantized input, the stored type's integer formula.
    fn stored_quantized(format: Format, w: &[u8], xi: &QuantInput, out: &mut [f32]) {
        match format {
            Format::Q4_1 => matvec_q4_1_quantized_naive(w, &xi.q, &xi.d, &xi.q8_1_sums, out),
            Format::Q8_0 => {
                let blocks = xi.d.len();
                for (r, o) in out.iter_mut().enumerate() {
                    *o = (0..blocks)
                        .map(|b| {
                            let blk = &w[(r * blocks + b) * Q8_0_BLOCK_BYTES..];
                            let dot: i32 = blk[2..2 + Q8_0_BLOCK]
                                .iter()
                                .zip(&xi.q[b * Q8_0_BLOCK..])
                                .map(|(&q, &x)| i32::from(q as i8) * i32::from(x))
                                .sum();
                            f16_at(blk, 0) * xi.d[b] * dot as f32
                        })
                        .sum();
                }
            }
        }
    }

    /// The input's rounding: quantizing `x` per 32 values moves each value by at most half a
    /// step (`max/127` of its block), so the product with `w` moves by at most
    /// `Σ_blocks Σ |w|·max/254` (with a margin for the f32 sums).
    fn q8_rounding_bound(w: &[f32], x: &[f32]) -> f32 {
        w.chunks_exact(Q8_0_BLOCK)
            .zip(x.chunks_exact(Q8_0_BLOCK))
            .map(|(wb, xb)| {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                wb.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
            })
            .sum::<f32>()
            * 1.01
    }

    /// Packing keeps every value (each row dequantizes as stored, checked against the stored
    /// type's own exact product); the kernel (when the CPU has AVX-512 VNNI) and the portable
    /// path equal the stored type's integer formula on the same input to f32 rounding, and the
    /// exact product within the input's rounding; extreme, zero and odd-sized matrices too.
    #[test]
    fn packed_32_blocks_match_as_stored() {
        for (format, dtype) in [
            (Format::Q4_1, GgmlDType::Q4_1),
            (Format::Q8_0, GgmlDType::Q8_0),
        ] {
            for (rows, cols) in [(16, 32), (48, 96), (32, 576)] {
                let mut w = rand(rows * cols, cols as u64 + 1, 1.0);
                w[..cols].iter_mut().for_each(|v| *v *= 1e4);
                w[cols..2 * cols].fill(0.0);
                w[2 * cols..3 * cols].fill(-3.5);
                let bytes = quantized_bytes(&w, (rows, cols), dtype);
                let packed = pack(format, &bytes, rows, cols);
                assert_eq!(packed.len(), bytes.len(), "{format:?}: same size as stored");
                let mut in_place = bytes.clone();
                pack_in_place(format, &mut in_place, rows, cols);
                assert!(in_place == packed, "{format:?} [{rows}, {cols}]: in place");
                let x = rand(cols, 3, 2.0);
                // Every row as stored: the stored type's exact product on a one-hot input
                // picks out each value.
                let mut stored_exact = vec![0f32; rows];
                let mut packed_exact = vec![0f32; rows];
                for c in [0, cols / 2, cols - 1] {
                    let mut e = vec![0f32; cols];
                    e[c] = 1.0;
                    match format {
                        Format::Q4_1 => matvec_q4_1_naive(&bytes, &e, &mut stored_exact),
                        Format::Q8_0 => matvec_q8_0_naive(&bytes, &e, &mut stored_exact),
                    }
                    matvec_naive(format, &packed, &e, &mut packed_exact);
                    assert_eq!(packed_exact, stored_exact, "{format:?} column {c}");
                }
                let all = dequantize_rows(format, &packed, cols, 0, rows);
                assert_eq!(all.len(), rows * cols);
                assert_eq!(
                    &all[3 * cols..(rows - 1) * cols],
                    dequantize_rows(format, &packed, cols, 3, rows - 4).as_slice()
                );
                let xi = QuantInput::new(&x);
                let mut want = vec![0f32; rows];
                stored_quantized(format, &bytes, &xi, &mut want);
                let mut exact = vec![0f32; rows];
                matvec_naive(format, &packed, &x, &mut exact);
                let mut portable = vec![0f32; rows];
                matvec_quantized_naive(format, &packed, &xi, &mut portable);
                let mut best = vec![0f32; rows];
                matvec_rows(format, &packed, &xi, &mut best);
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                for r in 0..rows {
                    let row = dequantize_row(format, &packed, cols, r);
                    let rounding = q8_rounding_bound(&row, &x);
                    for (what, got) in [("portable", portable[r]), ("best", best[r])] {
                        assert!(got.is_finite(), "{format:?} {what} row {r}");
                        assert!(
                            (got - want[r]).abs() <= 1e-5 * scale,
                            "{format:?} {what} row {r}: {got} vs stored {}",
                            want[r]
                        );
                        assert!(
                            (got - exact[r]).abs() <= rounding + 1e-5 * scale,
                            "{format:?} {what} row {r}: {got} vs exact {} (rounding {rounding})",
                            exact[r]
                        );
                    }
                }
            }
        }
    }
}
