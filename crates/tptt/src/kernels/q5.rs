//! GGML Q5_0 and Q5_1 matrices used as stored (no re-quantization at load): matrix × vector
//! against the input quantized per 32-block ([`QuantInput`]), each kernel beside its naive
//! reference.
//!
//! A block holds 32 five-bit values `u`: the low four bits as in Q4_0 / Q4_1 (value `j` < 16 in
//! the low nibble of byte `j` of `qs`, value `j + 16` in its high nibble), the fifth bit of
//! value `i` in bit `i` of the little-endian u32 `qh`.
//! - Q5_0, 22 bytes: f16 `d`, `qh`, 16 bytes `qs`; the weight is `d·(u − 16)`, so a block's
//!   product with an input block `d_x·q_x` is `d·d_x·(Σ u·q_x − 16·Σ q_x)`.
//! - Q5_1, 24 bytes: f16 `d`, f16 `m`, `qh`, `qs`; the weight is `d·u + m`, the product
//!   `d·d_x·Σ u·q_x + m·s_x` with `s_x = d_x·Σ q_x` rounded as candle's Q8_1 (as for Q4_1).

use super::{f16_at, matvec_dequantized, QuantInput, Q8_0_BLOCK};

/// Bytes of one Q5_0 block.
pub const Q5_0_BLOCK_BYTES: usize = 22;
/// Bytes of one Q5_1 block.
pub const Q5_1_BLOCK_BYTES: usize = 24;

/// The 32 unsigned five-bit values of a block from its `qh` (4 bytes) and `qs` (16 bytes).
fn values(qh: &[u8], qs: &[u8]) -> [u8; Q8_0_BLOCK] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut u = [0u8; Q8_0_BLOCK];
    for j in 0..16 {
        let bit = |i: usize| (((high >> i) & 1) as u8) << 4;
        u[j] = (qs[j] & 0x0F) | bit(j);
        u[j + 16] = (qs[j] >> 4) | bit(j + 16);
    }
    u
}

/// A row of whole Q5_0 blocks, dequantized: `d·(u − 16)` value by value.
pub fn dequantize_q5_0(row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / Q5_0_BLOCK_BYTES * Q8_0_BLOCK);
    for blk in row.chunks_exact(Q5_0_BLOCK_BYTES) {
        let d = f16_at(blk, 0);
        let u = values(&blk[2..6], &blk[6..]);
        out.extend(u.iter().map(|&u| d * (i32::from(u) - 16) as f32));
    }
    out
}

/// A row of whole Q5_1 blocks, dequantized: `d·u + m` value by value.
pub fn dequantize_q5_1(row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / Q5_1_BLOCK_BYTES * Q8_0_BLOCK);
    for blk in row.chunks_exact(Q5_1_BLOCK_BYTES) {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        let u = values(&blk[4..8], &blk[8..]);
        out.extend(u.iter().map(|&u| d * f32::from(u) + m));
    }
    out
}

/// `out = W·x` over Q5_0 rows, dequantized value by value (the exact product).
pub fn matvec_q5_0_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    matvec_dequantized(w, x, out, (Q8_0_BLOCK, Q5_0_BLOCK_BYTES), dequantize_q5_0);
}

/// `out = W·x` over Q5_1 rows, dequantized value by value (the exact product).
pub fn matvec_q5_1_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    matvec_dequantized(w, x, out, (Q8_0_BLOCK, Q5_1_BLOCK_BYTES), dequantize_q5_1);
}

/// `Σ u·q_x` of one block's values with one input block.
fn dot(u: &[u8; Q8_0_BLOCK], qx: &[i8]) -> i32 {
    u.iter()
        .zip(qx)
        .map(|(&u, &q)| i32::from(u) * i32::from(q))
        .sum()
}

/// Q5_0 rows against the quantized input, the literal definition (the reference of the
/// optimized kernel, and its portable path): `Σ_b d·d_x·(Σ u·q_x − 16·Σ q_x)`.
pub fn matvec_q5_0_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let blocks = xi.d.len();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let at = (r * blocks + b) * Q5_0_BLOCK_BYTES;
            let blk = &w[at..at + Q5_0_BLOCK_BYTES];
            let u = values(&blk[2..6], &blk[6..]);
            let dot = dot(&u, &xi.q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK]);
            acc += f16_at(blk, 0) * xi.d[b] * (dot - 16 * xi.sums[b]) as f32;
        }
        *o = acc;
    }
}

/// Q5_1 rows against the quantized input, the literal definition (the reference of the
/// optimized kernel, and its portable path): `Σ_b d·d_x·Σ u·q_x + m·s_x`.
pub fn matvec_q5_1_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let blocks = xi.d.len();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let at = (r * blocks + b) * Q5_1_BLOCK_BYTES;
            let blk = &w[at..at + Q5_1_BLOCK_BYTES];
            let u = values(&blk[4..8], &blk[8..]);
            let dot = dot(&u, &xi.q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK]);
            acc += f16_at(blk, 0) * xi.d[b] * dot as f32 + f16_at(blk, 2) * xi.q8_1_sums[b];
        }
        *o = acc;
    }
}

/// Serial Q5_0 `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q5_0_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_q5_rows::<false>(w, xi, out) };
            return;
        }
    }
    matvec_q5_0_quantized_naive(w, xi, out);
}

/// Serial Q5_1 `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q5_1_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: as above.
            unsafe { avx2::matvec_q5_rows::<true>(w, xi, out) };
            return;
        }
    }
    matvec_q5_1_quantized_naive(w, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QuantInput, Q5_0_BLOCK_BYTES, Q5_1_BLOCK_BYTES, Q8_0_BLOCK};
    use crate::kernels::avx2::{f16_at, hsum};

    /// The fifth bits of a block as 32 bytes: byte `i` is 16 where bit `i` of `qh` is set, else
    /// 0. Each byte takes the byte `i / 8` of `qh` (a shuffle within the 128-bit lane: the low
    /// lane holds values 0–15, bytes 0–1 of `qh`; the high lane values 16–31, bytes 2–3), keeps
    /// the bit `i % 8` and compares it with itself.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn fifth_bits(qh: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
                2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            ),
        );
        // Byte k of each 8: bit k.
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Q5_0 (`MIN = false`) or Q5_1 (`MIN = true`) rows against the Q8-quantized input: per
    /// block the nibbles spread to 32 bytes (low, then high) and the fifth bits added
    /// ([`fifth_bits`]), `u` ≤ 31; multiplied with the input's signed bytes and summed in pairs
    /// (`maddubs`: at most 2·31·127 = 7874, no saturation), then to 8 × i32 scaled by `d·d_x`.
    /// Q5_0's offset `16·Σ q_x` is taken off lane 0 in i32; Q5_1's minimum `m·s_x` is summed
    /// beside.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q5_rows<const MIN: bool>(
        w: &[u8],
        xi: &QuantInput,
        out: &mut [f32],
    ) {
        let blocks = xi.d.len();
        // Where qh and qs start in a block, and its size.
        let (head, size) = match MIN {
            true => (4, Q5_1_BLOCK_BYTES),
            false => (2, Q5_0_BLOCK_BYTES),
        };
        let sums_ok = match MIN {
            true => xi.q8_1_sums.len() == blocks,
            false => xi.sums.len() == blocks,
        };
        assert!(
            xi.q.len() == blocks * Q8_0_BLOCK && sums_ok && w.len() >= out.len() * blocks * size,
            "matvec_q5: sizes"
        );
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * blocks * size);
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0f32;
            for b in 0..blocks {
                let p = row.add(b * size);
                crate::kernels::prefetch_ahead(p);
                let qh = u32::from_le_bytes(*(p.add(head) as *const [u8; 4]));
                let packed = _mm_loadu_si128(p.add(head + 4) as *const __m128i);
                let nib = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(packed, 4), low),
                    _mm_and_si128(packed, low),
                );
                let u = _mm256_or_si256(nib, fifth_bits(qh));
                let qx = _mm256_loadu_si256(xi.q.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i);
                let mut dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, qx), ones);
                if MIN {
                    mins += f16_at(p.add(2)) * *xi.q8_1_sums.get_unchecked(b);
                } else {
                    // Σ (u − 16)·q_x = Σ u·q_x − 16·Σ q_x (|16·Σ q_x| ≤ 16·32·127).
                    let offset =
                        _mm256_setr_epi32(16 * *xi.sums.get_unchecked(b), 0, 0, 0, 0, 0, 0, 0);
                    dot = _mm256_sub_epi32(dot, offset);
                }
                acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(dot),
                    _mm256_set1_ps(f16_at(p) * *xi.d.get_unchecked(b)),
                    acc,
                );
            }
            *o = hsum(acc) + mins;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{check_type, Kind};
    use candle_core::quantized::GgmlDType;

    /// Dequantization equals candle's; the AVX2 and portable kernels equal the integer formula
    /// (candle's own Q5_0 × Q8_0 product), within the input's 8-bit rounding of the exact
    /// product; extreme rows stay finite.
    #[test]
    fn q5_0_kernel_matches_its_references() {
        check_type(&Kind {
            dtype: GgmlDType::Q5_0,
            dequantize: dequantize_q5_0,
            naive: matvec_q5_0_naive,
            quantized_naive: matvec_q5_0_quantized_naive,
            rows: matvec_q5_0_rows,
            candle_same_input: true,
            q8k: false,
        });
    }

    /// The same for Q5_1 (candle's Q5_1 × Q8_1 product, the same rounded block sums).
    #[test]
    fn q5_1_kernel_matches_its_references() {
        check_type(&Kind {
            dtype: GgmlDType::Q5_1,
            dequantize: dequantize_q5_1,
            naive: matvec_q5_1_naive,
            quantized_naive: matvec_q5_1_quantized_naive,
            rows: matvec_q5_1_rows,
            candle_same_input: true,
            q8k: false,
        });
    }
}
