//! GGML Q4_0 matrices used as stored: matrix × vector against the input quantized per 32-block
//! ([`QuantInput`], Q8_0 as llama.cpp and candle do for this type), each kernel beside its
//! naive reference. A block is 18 bytes: an f16 scale `d` and 16 bytes of 4-bit values `u`,
//! value `j` (< 16) in the low nibble of byte `j` and value `j + 16` in its high nibble; the
//! weight is `d·(u − 8)`. So a block's product with an input block `d_x·q_x` is
//! `d·d_x·(Σ u·q_x − 8·Σ q_x)`, the offset taken off with the input's block sum.

use super::{f16_at, matvec_dequantized, QuantInput, Q8_0_BLOCK};

/// Bytes of one Q4_0 block.
pub const Q4_0_BLOCK_BYTES: usize = 18;

/// A row of whole Q4_0 blocks, dequantized: `d·(u − 8)` value by value.
pub fn dequantize_q4_0(row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / Q4_0_BLOCK_BYTES * Q8_0_BLOCK);
    for blk in row.chunks_exact(Q4_0_BLOCK_BYTES) {
        let d = f16_at(blk, 0);
        let nibbles = &blk[2..];
        out.extend(nibbles.iter().map(|b| d * (i32::from(b & 0x0F) - 8) as f32));
        out.extend(nibbles.iter().map(|b| d * (i32::from(b >> 4) - 8) as f32));
    }
    out
}

/// `out = W·x` over Q4_0 rows, dequantized value by value (the exact product of the stored
/// weights with the f32 input).
pub fn matvec_q4_0_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    matvec_dequantized(w, x, out, (Q8_0_BLOCK, Q4_0_BLOCK_BYTES), dequantize_q4_0);
}

/// Q4_0 rows against the quantized input, the literal definition (the reference of the
/// optimized kernel, and its portable path): `Σ_b d·d_x·(Σ u·q_x − 8·Σ q_x)`.
pub fn matvec_q4_0_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let blocks = xi.d.len();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let at = (r * blocks + b) * Q4_0_BLOCK_BYTES;
            let blk = &w[at..at + Q4_0_BLOCK_BYTES];
            let qx = &xi.q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK];
            let mut dot = 0i32;
            for j in 0..16 {
                dot += i32::from(blk[2 + j] & 0x0F) * i32::from(qx[j]);
                dot += i32::from(blk[2 + j] >> 4) * i32::from(qx[j + 16]);
            }
            acc += f16_at(blk, 0) * xi.d[b] * (dot - 8 * xi.sums[b]) as f32;
        }
        *o = acc;
    }
}

/// Serial Q4_0 `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q4_0_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_q4_0_rows(w, xi, out) };
            return;
        }
    }
    matvec_q4_0_quantized_naive(w, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QuantInput, Q4_0_BLOCK_BYTES, Q8_0_BLOCK};
    use crate::kernels::avx2::{f16_at, hsum};

    /// Q4_0 rows against the Q8-quantized input: per block the 16 bytes of nibbles spread to 32
    /// unsigned bytes `u` (low nibbles, then high), multiplied with the input's signed bytes and
    /// summed in pairs (`maddubs`: at most 2·15·127 = 3810, no saturation), then to 8 × i32; the
    /// offset `8·Σ q_x` taken off lane 0 (exact, in i32), and the lanes scaled by `d·d_x`. Two
    /// accumulators for two blocks in flight.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q4_0_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
        let blocks = xi.d.len();
        assert!(
            xi.q.len() == blocks * Q8_0_BLOCK
                && xi.sums.len() == blocks
                && w.len() >= out.len() * blocks * Q4_0_BLOCK_BYTES,
            "matvec_q4_0: sizes"
        );
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * blocks * Q4_0_BLOCK_BYTES);
            let block = |b: usize| -> __m256 {
                let p = row.add(b * Q4_0_BLOCK_BYTES);
                crate::kernels::prefetch_ahead(p);
                let packed = _mm_loadu_si128(p.add(2) as *const __m128i);
                let u = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(packed, 4), low),
                    _mm_and_si128(packed, low),
                );
                let qx = _mm256_loadu_si256(xi.q.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i);
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, qx), ones);
                // Σ (u − 8)·q_x = Σ u·q_x − 8·Σ q_x (|8·Σ q_x| ≤ 8·32·127: no overflow).
                let offset = _mm256_setr_epi32(8 * *xi.sums.get_unchecked(b), 0, 0, 0, 0, 0, 0, 0);
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, offset)),
                    _mm256_set1_ps(f16_at(p) * *xi.d.get_unchecked(b)),
                )
            };
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
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
    use super::*;
    use crate::kernels::tests::{check_type, Kind};
    use candle_core::quantized::GgmlDType;

    /// Dequantization equals candle's; the AVX2 and portable kernels equal the integer formula,
    /// which is candle's own Q4_0 × Q8_0 product and within the input's 8-bit rounding of the
    /// exact product; extreme rows (zeros, huge values) stay finite.
    #[test]
    fn q4_0_kernel_matches_its_references() {
        check_type(&Kind {
            dtype: GgmlDType::Q4_0,
            dequantize: dequantize_q4_0,
            naive: matvec_q4_0_naive,
            quantized_naive: matvec_q4_0_quantized_naive,
            rows: matvec_q4_0_rows,
            candle_same_input: true,
            q8k: false,
        });
    }
}
