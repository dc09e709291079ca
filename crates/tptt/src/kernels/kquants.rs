//! GGML Q4_K and Q5_K matrices used as stored: matrix × vector against the input quantized per
//! 32-block ([`QuantInput`]), each kernel beside its naive reference (Q6_K: [`super::q6_k`]).
//!
//! A super-block holds 256 values in 8 sub-blocks of 32, each with a 6-bit scale `sc_j` and a
//! 6-bit minimum `m_j` (12 packed bytes, [`scales_mins`]) under the f16 super-scales `d` and
//! `dmin`; the weight is `d·sc_j·u − dmin·m_j`. The values come in 4 chunks of 64: chunk `c`
//! holds sub-block `2c` in the low nibbles of its 32 bytes and sub-block `2c + 1` in the high
//! ones. Q5_K adds a fifth bit: value `l` of sub-block `j` has it in bit `j` of byte `l` of
//! `qh` (32 bytes).
//! - Q4_K, 144 bytes: `d`, `dmin`, scales (12), nibbles (128).
//! - Q5_K, 176 bytes: `d`, `dmin`, scales (12), `qh` (32), nibbles (128).
//!
//! A sub-block is one input block (`d_x·q_x`), so its product is
//! `d·sc_j·d_x·Σ u·q_x − dmin·m_j·(d_x·Σ q_x)`: the minima with the input's block sums. (The
//! input's per-32 scales are finer than llama.cpp's per-256 Q8_K: results differ from candle's
//! by the input's rounding only.)

use super::{f16_at, matvec_dequantized, QuantInput, Q8_0_BLOCK, QK_K};

/// Bytes of one Q4_K super-block.
pub const Q4K_BLOCK_BYTES: usize = 144;
/// Bytes of one Q5_K super-block.
pub const Q5K_BLOCK_BYTES: usize = 176;

/// The eight 6-bit scales and minima of a Q4_K / Q5_K super-block from its 12 packed bytes `s`:
/// sub-block `j` < 4 in the low six bits of bytes `j` (scale) and `j + 4` (minimum); `j` ≥ 4 in
/// the low (scale) and high (minimum) nibble of byte `j + 4`, with their top two bits in the
/// top bits of bytes `j − 4` (scale) and `j` (minimum).
fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// The 32 unsigned values `u` of sub-block `j` of a super-block: its nibbles in `qs` (128
/// bytes), and with `qh` (Q5_K) its fifth bits.
fn sub_block(qs: &[u8], qh: Option<&[u8]>, j: usize) -> [u8; Q8_0_BLOCK] {
    let chunk = &qs[32 * (j / 2)..32 * (j / 2 + 1)];
    let mut u = [0u8; Q8_0_BLOCK];
    for (l, (u, &byte)) in u.iter_mut().zip(chunk).enumerate() {
        *u = if j.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        };
        if let Some(qh) = qh {
            *u |= ((qh[l] >> j) & 1) << 4;
        }
    }
    u
}

/// A super-block's parts.
struct Parts<'a> {
    d: f32,
    dmin: f32,
    sc: [u8; 8],
    m: [u8; 8],
    /// The fifth bits (Q5_K).
    qh: Option<&'a [u8]>,
    /// The nibbles.
    qs: &'a [u8],
}

/// A super-block's parts (`five`: Q5_K).
fn parts(blk: &[u8], five: bool) -> Parts<'_> {
    let (sc, m) = scales_mins(&blk[4..16]);
    let (qh, qs) = match five {
        true => (Some(&blk[16..48]), &blk[48..176]),
        false => (None, &blk[16..144]),
    };
    Parts {
        d: f16_at(blk, 0),
        dmin: f16_at(blk, 2),
        sc,
        m,
        qh,
        qs,
    }
}

/// A row of whole super-blocks, dequantized: `d·sc_j·u − dmin·m_j` value by value.
fn dequantize(row: &[u8], five: bool) -> Vec<f32> {
    let size = if five {
        Q5K_BLOCK_BYTES
    } else {
        Q4K_BLOCK_BYTES
    };
    let mut out = Vec::with_capacity(row.len() / size * QK_K);
    for blk in row.chunks_exact(size) {
        let Parts {
            d,
            dmin,
            sc,
            m,
            qh,
            qs,
        } = parts(blk, five);
        for j in 0..8 {
            let (scale, min) = (d * f32::from(sc[j]), dmin * f32::from(m[j]));
            let u = sub_block(qs, qh, j);
            out.extend(u.iter().map(|&u| scale * f32::from(u) - min));
        }
    }
    out
}

/// A row of whole Q4_K super-blocks, dequantized.
pub fn dequantize_q4k(row: &[u8]) -> Vec<f32> {
    dequantize(row, false)
}

/// A row of whole Q5_K super-blocks, dequantized.
pub fn dequantize_q5k(row: &[u8]) -> Vec<f32> {
    dequantize(row, true)
}

/// `out = W·x` over Q4_K rows, dequantized value by value (the exact product).
pub fn matvec_q4k_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    matvec_dequantized(w, x, out, (QK_K, Q4K_BLOCK_BYTES), dequantize_q4k);
}

/// `out = W·x` over Q5_K rows, dequantized value by value (the exact product).
pub fn matvec_q5k_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    matvec_dequantized(w, x, out, (QK_K, Q5K_BLOCK_BYTES), dequantize_q5k);
}

/// Q4_K / Q5_K rows against the quantized input, the literal definition:
/// `Σ_b d·sc_j·d_x·Σ u·q_x − dmin·m_j·(d_x·Σ q_x)` over the sub-blocks.
fn quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32], five: bool) {
    let size = if five {
        Q5K_BLOCK_BYTES
    } else {
        Q4K_BLOCK_BYTES
    };
    let supers = xi.d.len() / 8;
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for s in 0..supers {
            let at = (r * supers + s) * size;
            let Parts {
                d,
                dmin,
                sc,
                m,
                qh,
                qs,
            } = parts(&w[at..at + size], five);
            for j in 0..8 {
                let b = 8 * s + j;
                let u = sub_block(qs, qh, j);
                let qx = &xi.q[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK];
                let dot: i32 = u
                    .iter()
                    .zip(qx)
                    .map(|(&u, &q)| i32::from(u) * i32::from(q))
                    .sum();
                acc += d * f32::from(sc[j]) * xi.d[b] * dot as f32
                    - dmin * f32::from(m[j]) * (xi.d[b] * xi.sums[b] as f32);
            }
        }
        *o = acc;
    }
}

/// Q4_K rows against the quantized input, the literal definition (the reference of the
/// optimized kernel, and its portable path).
pub fn matvec_q4k_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    quantized_naive(w, xi, out, false);
}

/// Q5_K rows against the quantized input, the literal definition (the reference of the
/// optimized kernel, and its portable path).
pub fn matvec_q5k_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    quantized_naive(w, xi, out, true);
}

/// Serial Q4_K `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q4k_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_k_rows::<false>(w, xi, out) };
            return;
        }
    }
    matvec_q4k_quantized_naive(w, xi, out);
}

/// Serial Q5_K `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q5k_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: as above.
            unsafe { avx2::matvec_k_rows::<true>(w, xi, out) };
            return;
        }
    }
    matvec_q5k_quantized_naive(w, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{scales_mins, QuantInput, Q4K_BLOCK_BYTES, Q5K_BLOCK_BYTES, Q8_0_BLOCK};
    use crate::kernels::avx2::{f16_at, hsum};

    /// Q4_K (`FIVE = false`) or Q5_K (`FIVE = true`) rows against the Q8-quantized input. Per
    /// super-block: the scales and minima unpacked (scalar); the minima's part
    /// `dmin·Σ_j m_j·(d_x·Σ q_x)` as one 8-lane product (lane = sub-block); per chunk of 64
    /// values one 32-byte load split into its two sub-blocks' nibbles (plus, for Q5_K, the fifth
    /// bits of `qh` selected by a mask compare), `u` ≤ 31; `maddubs` with the input's signed
    /// bytes (pair sums at most 2·31·127 = 7874, no saturation), `madd` with the sub-block's
    /// scale (≤ 63: lanes at most 2·63·7874 < 2³¹), then `d·d_x` as f32.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_k_rows<const FIVE: bool>(
        w: &[u8],
        xi: &QuantInput,
        out: &mut [f32],
    ) {
        let blocks = xi.d.len();
        let supers = blocks / 8;
        let (size, qs_at) = match FIVE {
            true => (Q5K_BLOCK_BYTES, 48),
            false => (Q4K_BLOCK_BYTES, 16),
        };
        assert!(
            blocks.is_multiple_of(8)
                && xi.q.len() == blocks * Q8_0_BLOCK
                && xi.sums.len() == blocks
                && w.len() >= out.len() * supers * size,
            "matvec_k: sizes"
        );
        let low = _mm256_set1_epi8(0x0F);
        let sixteen = _mm256_set1_epi8(0x10);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * supers * size);
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut mins = _mm256_setzero_ps();
            for s in 0..supers {
                let p = row.add(s * size);
                let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                let (sc, m) = scales_mins(std::slice::from_raw_parts(p.add(4), 12));
                let xb = 8 * s;
                // d_x·Σ q_x of the eight input blocks, and dmin·m_j.
                let xs = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_loadu_si256(
                        xi.sums.as_ptr().add(xb) as *const __m256i
                    )),
                    _mm256_loadu_ps(xi.d.as_ptr().add(xb)),
                );
                let mv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    m.as_ptr() as *const __m128i
                )));
                mins = _mm256_fmadd_ps(_mm256_mul_ps(mv, _mm256_set1_ps(dmin)), xs, mins);
                let qh = match FIVE {
                    true => _mm256_loadu_si256(p.add(16) as *const __m256i),
                    false => _mm256_setzero_si256(),
                };
                for c in 0..4 {
                    let packed = _mm256_loadu_si256(p.add(qs_at + 32 * c) as *const __m256i);
                    let halves = [
                        _mm256_and_si256(packed, low),
                        _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                    ];
                    for (h, nib) in halves.into_iter().enumerate() {
                        let j = 2 * c + h;
                        let u = if FIVE {
                            let bit = _mm256_set1_epi8((1u8 << j) as i8);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                            _mm256_or_si256(nib, _mm256_and_si256(set, sixteen))
                        } else {
                            nib
                        };
                        let qx = _mm256_loadu_si256(
                            xi.q.as_ptr().add((xb + j) * Q8_0_BLOCK) as *const __m256i
                        );
                        let dot = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(u, qx),
                            _mm256_set1_epi16(i16::from(sc[j])),
                        );
                        acc[h] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot),
                            _mm256_set1_ps(d * *xi.d.get_unchecked(xb + j)),
                            acc[h],
                        );
                    }
                }
            }
            *o = hsum(_mm256_sub_ps(_mm256_add_ps(acc[0], acc[1]), mins));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{check_type, Kind};
    use candle_core::quantized::GgmlDType;

    /// Dequantization equals candle's; the AVX2 and portable kernels equal the integer formula,
    /// within the input's 8-bit rounding of the exact product and of candle's Q4_K × Q8_K
    /// product; extreme rows stay finite.
    #[test]
    fn q4k_kernel_matches_its_references() {
        check_type(&Kind {
            dtype: GgmlDType::Q4K,
            dequantize: dequantize_q4k,
            naive: matvec_q4k_naive,
            quantized_naive: matvec_q4k_quantized_naive,
            rows: matvec_q4k_rows,
            candle_same_input: false,
        });
    }

    /// The same for Q5_K.
    #[test]
    fn q5k_kernel_matches_its_references() {
        check_type(&Kind {
            dtype: GgmlDType::Q5K,
            dequantize: dequantize_q5k,
            naive: matvec_q5k_naive,
            quantized_naive: matvec_q5k_quantized_naive,
            rows: matvec_q5k_rows,
            candle_same_input: false,
        });
    }
}
