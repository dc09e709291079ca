//! GGML Q6_K matrices used as stored: matrix × vector against the input quantized per 32-block
//! ([`QuantInput`]), each kernel beside its naive reference.
//!
//! A super-block (210 bytes) holds 256 six-bit values `u` (0..=63): `ql` (128 bytes of low
//! nibbles), `qh` (64 bytes of high bit pairs), 16 signed 8-bit scales, one per 16 values, and
//! the f16 super-scale `d`; the weight is `d·sc_g·(u − 32)`. Each half `h` of 128 values uses
//! `ql[64h..64h + 64]` and `qh[32h..32h + 32]`: for `l` < 32, value `l` is the low nibble of
//! `ql[l]` with bits 0–1 of `qh[l]` on top, value `l + 32` the low nibble of `ql[l + 32]` with
//! bits 2–3, value `l + 64` the high nibble of `ql[l]` with bits 4–5, value `l + 96` the high
//! nibble of `ql[l + 32]` with bits 6–7. Value `v` of the super-block has scale `v / 16`.
//!
//! Each 32 values are one input block (`d_x·q_x`) and two scale groups, so its product is
//! `d·d_x·Σ_g sc_g·(Σ_16 u·q_x − 32·Σ_16 q_x)`: the offset with the input's sums per 16.

use super::{f16_at, matvec_dequantized, QuantInput, Q8_0_BLOCK, QK_K};

/// Bytes of one Q6_K super-block.
pub const Q6K_BLOCK_BYTES: usize = 210;

/// The 32 unsigned values of block `j` (< 8) of a super-block `blk`.
pub(super) fn block_values(blk: &[u8], j: usize) -> [u8; Q8_0_BLOCK] {
    let (h, k) = (j / 4, j % 4);
    let ql = &blk[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
    let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
    let mut u = [0u8; Q8_0_BLOCK];
    for (l, u) in u.iter_mut().enumerate() {
        let low = if k < 2 { ql[l] & 0x0F } else { ql[l] >> 4 };
        *u = low | (((qh[l] >> (2 * k)) & 3) << 4);
    }
    u
}

/// Scale `g` (< 16) of a super-block.
pub(super) fn scale(blk: &[u8], g: usize) -> i32 {
    i32::from(blk[192 + g] as i8)
}

/// A row of whole Q6_K super-blocks, dequantized: `d·sc_g·(u − 32)` value by value.
pub fn dequantize_q6k(row: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len() / Q6K_BLOCK_BYTES * QK_K);
    for blk in row.chunks_exact(Q6K_BLOCK_BYTES) {
        let d = f16_at(blk, 208);
        for j in 0..8 {
            let u = block_values(blk, j);
            for (i, &u) in u.iter().enumerate() {
                let sc = scale(blk, 2 * j + i / 16);
                out.push(d * sc as f32 * (i32::from(u) - 32) as f32);
            }
        }
    }
    out
}

/// `out = W·x` over Q6_K rows, dequantized value by value (the exact product).
pub fn matvec_q6k_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    matvec_dequantized(w, x, out, (QK_K, Q6K_BLOCK_BYTES), dequantize_q6k);
}

/// Q6_K rows against the quantized input, the literal definition (the reference of the
/// optimized kernel, and its portable path):
/// `Σ_b d·d_x·Σ_g sc_g·(Σ_16 u·q_x − 32·Σ_16 q_x)`.
pub fn matvec_q6k_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let supers = xi.d.len() / 8;
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for s in 0..supers {
            let at = (r * supers + s) * Q6K_BLOCK_BYTES;
            let blk = &w[at..at + Q6K_BLOCK_BYTES];
            for j in 0..8 {
                let b = 8 * s + j;
                let u = block_values(blk, j);
                let mut dot = 0i32;
                for g in 0..2 {
                    let uq: i32 = (0..16)
                        .map(|i| i32::from(u[16 * g + i]) * i32::from(xi.q[32 * b + 16 * g + i]))
                        .sum();
                    dot += scale(blk, 2 * j + g) * (uq - 32 * i32::from(xi.half_sums[2 * b + g]));
                }
                acc += f16_at(blk, 208) * xi.d[b] * dot as f32;
            }
        }
        *o = acc;
    }
}

/// Serial Q6_K `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q6k_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_q6k_rows(w, xi, out) };
            return;
        }
    }
    matvec_q6k_quantized_naive(w, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{QuantInput, Q6K_BLOCK_BYTES, Q8_0_BLOCK};
    use crate::kernels::avx2::{f16_at, hsum};

    /// Q6_K rows against the Q8-quantized input. Per half super-block: `ql` (two 32-byte loads)
    /// and `qh` (one) give the four blocks' unsigned values (a nibble, and a bit pair masked and
    /// shifted within its byte), `u` ≤ 63; `maddubs` with the input's signed bytes (pair sums at
    /// most 2·63·127 = 16002 < 32767, no saturation), `madd` with the two scales of the block
    /// (the low 128 bits hold its first 16 values; |sc| ≤ 128: lanes at most 2·128·16002 <
    /// 2³¹), then `d·d_x` as f32. The offsets `32·Σ_g sc_g·Σ_16 q_x` of the super-block's eight
    /// blocks in one `madd` of the 16 scales with the input's sums per 16 (at most 2·128·2032),
    /// lane = block, scaled by `32·d·d_x`, subtracted at the end.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q6k_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
        let blocks = xi.d.len();
        let supers = blocks / 8;
        assert!(
            blocks.is_multiple_of(8)
                && xi.q.len() == blocks * Q8_0_BLOCK
                && xi.half_sums.len() == 2 * blocks
                && w.len() >= out.len() * supers * Q6K_BLOCK_BYTES,
            "matvec_q6k: sizes"
        );
        let low = _mm256_set1_epi8(0x0F);
        let m = |v: u8| _mm256_set1_epi8(v as i8);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * supers * Q6K_BLOCK_BYTES);
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut offsets = _mm256_setzero_ps();
            for s in 0..supers {
                let p = row.add(s * Q6K_BLOCK_BYTES);
                crate::kernels::prefetch_ahead_span(p, Q6K_BLOCK_BYTES);
                let d = f16_at(p.add(208));
                let xb = 8 * s;
                let sc = p.add(192) as *const i8;
                let off = _mm256_madd_epi16(
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(sc as *const __m128i)),
                    _mm256_loadu_si256(xi.half_sums.as_ptr().add(2 * xb) as *const __m256i),
                );
                offsets = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(off),
                    _mm256_mul_ps(
                        _mm256_loadu_ps(xi.d.as_ptr().add(xb)),
                        _mm256_set1_ps(32.0 * d),
                    ),
                    offsets,
                );
                for h in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                    // Per byte: the shifted pair stays inside its byte (masked before the shift).
                    let values = [
                        _mm256_or_si256(
                            _mm256_and_si256(ql0, low),
                            _mm256_slli_epi16(_mm256_and_si256(qh, m(0x03)), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(ql1, low),
                            _mm256_slli_epi16(_mm256_and_si256(qh, m(0x0C)), 2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                            _mm256_and_si256(qh, m(0x30)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                            _mm256_srli_epi16(_mm256_and_si256(qh, m(0xC0)), 2),
                        ),
                    ];
                    for (k, u) in values.into_iter().enumerate() {
                        let j = 4 * h + k;
                        let scales = _mm256_set_m128i(
                            _mm_set1_epi16(i16::from(*sc.add(2 * j + 1))),
                            _mm_set1_epi16(i16::from(*sc.add(2 * j))),
                        );
                        let qx = _mm256_loadu_si256(
                            xi.q.as_ptr().add((xb + j) * Q8_0_BLOCK) as *const __m256i
                        );
                        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, qx), scales);
                        acc[k % 2] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot),
                            _mm256_set1_ps(d * *xi.d.get_unchecked(xb + j)),
                            acc[k % 2],
                        );
                    }
                }
            }
            *o = hsum(_mm256_sub_ps(_mm256_add_ps(acc[0], acc[1]), offsets));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{check_type, Kind};
    use candle_core::quantized::GgmlDType;

    /// Dequantization equals candle's; the AVX2 and portable kernels equal the integer formula,
    /// within the input's 8-bit rounding of the exact product and of candle's Q6_K × Q8_K
    /// product; extreme rows stay finite.
    #[test]
    fn q6k_kernel_matches_its_references() {
        check_type(&Kind {
            dtype: GgmlDType::Q6K,
            dequantize: dequantize_q6k,
            naive: matvec_q6k_naive,
            quantized_naive: matvec_q6k_quantized_naive,
            rows: matvec_q6k_rows,
            candle_same_input: false,
            q8k: false,
        });
    }
}
