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
//! Q5_K: a sub-block is one input block (`d_x·q_x`, per 32 values), so its product is
//! `d·sc_j·d_x·Σ u·q_x − dmin·m_j·(d_x·Σ q_x)`: the minima with the input's block sums. (The
//! input's per-32 scales are finer than llama.cpp's per-256 Q8_K: results differ from candle's
//! by the input's rounding only.)
//!
//! Q4_K, the most common 4-bit type (Q4_K_M files), takes the input as llama.cpp does, quantized
//! per 256 values ([`Q8K`]: one scale per super-block and the sums of every 16 values): a
//! super-block's product is then `d·d_x·Σ_j sc_j·Σ u·q_x − dmin·d_x·Σ_j m_j·Σ q_x`, summed
//! in integers and scaled once per 256 values (the per-32 form needs a float scale per 32),
//! and equal to candle's own Q4_K product up to f32 rounding.

use super::{f16_at, matvec_dequantized, QuantInput, Q8_0_BLOCK, QK_K};

/// The input quantized per 256 values as llama.cpp's Q8_K: `x ≈ d·q` per 256-block, with the
/// sum of every 16 `q` (the minima's part).
#[derive(Debug, Clone, Default)]
pub struct Q8K {
    /// Signed bytes, `[x.len()]`.
    pub q: Vec<i8>,
    /// One scale per 256 values.
    pub d: Vec<f32>,
    /// `Σ q` per 16 values (at most 16·128: an i16).
    pub bsums: Vec<i16>,
}

/// `x` (whole 256-blocks) quantized as llama.cpp's and candle's Q8_K: per block, the value of
/// largest magnitude `max` maps to −127 (`q = round(−127/max · x)`, `d = −max/127`), a zero
/// block to zeros.
pub fn quantize_q8_k(x: &[f32]) -> Q8K {
    let mut out = Q8K {
        q: Vec::with_capacity(x.len()),
        d: Vec::with_capacity(x.len() / QK_K),
        bsums: Vec::with_capacity(x.len() / 16),
    };
    for blk in x.chunks_exact(QK_K) {
        // The first value of the largest magnitude (NaN ignored).
        let amax = super::abs_max(blk);
        let max = blk.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
        let start = out.q.len();
        out.q.resize(start + QK_K, 0);
        if amax == 0.0 {
            out.d.push(0.0);
        } else {
            let iscale = -127.0 / max;
            out.d.push(1.0 / iscale);
            super::scale_round(blk, iscale, &mut out.q[start..]);
        }
        out.bsums.extend(
            out.q[start..]
                .chunks_exact(16)
                .map(|c| c.iter().map(|&v| i16::from(v)).sum::<i16>()),
        );
    }
    out
}

/// Bytes of one Q4_K super-block.
pub const Q4K_BLOCK_BYTES: usize = 144;
/// Bytes of one Q5_K super-block.
pub const Q5K_BLOCK_BYTES: usize = 176;

/// The eight 6-bit scales and minima of a Q4_K / Q5_K super-block from its 12 packed bytes `s`:
/// sub-block `j` < 4 in the low six bits of bytes `j` (scale) and `j + 4` (minimum); `j` ≥ 4 in
/// the low (scale) and high (minimum) nibble of byte `j + 4`, with their top two bits in the
/// top bits of bytes `j − 4` (scale) and `j` (minimum).
pub(super) fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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
pub(super) fn sub_block(qs: &[u8], qh: Option<&[u8]>, j: usize) -> [u8; Q8_0_BLOCK] {
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

/// Q4_K rows against the input quantized per 256 values ([`QuantInput::k`]), the literal
/// definition (the reference of the optimized kernel, and its portable path):
/// `Σ_s d·d_x·Σ_j sc_j·Σ u·q_x − dmin·d_x·Σ_j m_j·Σ q_x`.
pub fn matvec_q4k_quantized_naive(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let k = &xi.k;
    let supers = k.d.len();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for s in 0..supers {
            let at = (r * supers + s) * Q4K_BLOCK_BYTES;
            let Parts {
                d, dmin, sc, m, qs, ..
            } = parts(&w[at..at + Q4K_BLOCK_BYTES], false);
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let u = sub_block(qs, None, j);
                let qx = &k.q[s * QK_K + j * Q8_0_BLOCK..][..Q8_0_BLOCK];
                let dot: i32 = u
                    .iter()
                    .zip(qx)
                    .map(|(&u, &q)| i32::from(u) * i32::from(q))
                    .sum();
                sumi += i32::from(sc[j]) * dot;
                summ += i32::from(m[j])
                    * (i32::from(k.bsums[s * 16 + 2 * j]) + i32::from(k.bsums[s * 16 + 2 * j + 1]));
            }
            acc += d * k.d[s] * sumi as f32 - dmin * k.d[s] * summ as f32;
        }
        *o = acc;
    }
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
            unsafe { avx2::matvec_q4k_q8k_rows(w, &xi.k, out) };
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
            unsafe { avx2::matvec_q5k_rows(w, xi, out) };
            return;
        }
    }
    matvec_q5k_quantized_naive(w, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{scales_mins, QuantInput, Q4K_BLOCK_BYTES, Q5K_BLOCK_BYTES, Q8K, Q8_0_BLOCK};
    use crate::kernels::avx2::{f16_at, hsum};
    use crate::kernels::QK_K;

    /// Q4_K rows against the input quantized per 256 values (Q8_K). Per super-block: the
    /// scales and minima unpacked four bytes at a time and widened to 16-bit lanes; the minima's
    /// part `Σ_j m_j·Σ q_x` as one `madd` with the input's 16-value sums added in pairs; per chunk of 64 values one 32-byte load split into its two
    /// sub-blocks' nibbles (`u` ≤ 15), `maddubs` with the input's signed bytes (pair sums at
    /// most 2·15·128 = 3840, no saturation), `madd` with the sub-block's scale (≤ 63: at most
    /// 2·63·3840 per lane and sub-block, 8 sub-blocks: < 2²²), summed in integers; then one
    /// conversion and `d·d_x` per super-block.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q4k_q8k_rows(w: &[u8], k: &Q8K, out: &mut [f32]) {
        let supers = k.d.len();
        assert!(
            k.q.len() == supers * QK_K
                && k.bsums.len() == supers * 16
                && w.len() >= out.len() * supers * Q4K_BLOCK_BYTES,
            "matvec_q4k: sizes"
        );
        let low = _mm256_set1_epi8(0x0F);
        // Shuffles broadcasting 16-bit lane j of a register to all of its lanes.
        let lane: [__m256i; 8] =
            std::array::from_fn(|j| _mm256_set1_epi16((((2 * j + 1) << 8) | (2 * j)) as i16));
        let (k1, k2, k3) = (0x3f3f_3f3f_u32, 0x0f0f_0f0f_u32, 0x0303_0303_u32);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * supers * Q4K_BLOCK_BYTES);
            let mut acc = _mm256_setzero_ps();
            let mut mins = _mm_setzero_ps();
            for s in 0..supers {
                let p = row.add(s * Q4K_BLOCK_BYTES);
                crate::kernels::prefetch_ahead_span(p, Q4K_BLOCK_BYTES);
                let dx = *k.d.get_unchecked(s);
                let (d, dmin) = (f16_at(p) * dx, f16_at(p.add(2)) * dx);
                // The 6-bit scales and minima ([`scales_mins`]) four bytes at a time, widened
                // to 16 bits: lanes 0–7 the scales, 8–15 the minima.
                let u = |at: usize| u32::from_le_bytes(*(p.add(4 + at) as *const [u8; 4]));
                let (u0, u1, u2) = (u(0), u(4), u(8));
                let sm = _mm256_cvtepu8_epi16(_mm_set_epi32(
                    (((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4)) as i32,
                    (u1 & k1) as i32,
                    ((u2 & k2) | (((u0 >> 6) & k3) << 4)) as i32,
                    (u0 & k1) as i32,
                ));
                // Minima: Σ_j m_j·(the input's two 16-value sums of sub-block j), at most
                // 2·63·4096 per lane.
                let bs = _mm256_loadu_si256(k.bsums.as_ptr().add(s * 16) as *const __m256i);
                let pair =
                    _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
                let m = _mm_madd_epi16(_mm256_extracti128_si256(sm, 1), pair);
                mins = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(m), mins);
                let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm));
                let q = k.q.as_ptr().add(s * QK_K);
                let mut sumi = [_mm256_setzero_si256(); 2];
                for c in 0..4 {
                    let packed = _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(packed, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                    let q0 = _mm256_loadu_si256(q.add(64 * c) as *const __m256i);
                    let q1 = _mm256_loadu_si256(q.add(64 * c + 32) as *const __m256i);
                    let p0 = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(lo, q0),
                        _mm256_shuffle_epi8(scales, lane[2 * c]),
                    );
                    let p1 = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi, q1),
                        _mm256_shuffle_epi8(scales, lane[2 * c + 1]),
                    );
                    sumi[c & 1] = _mm256_add_epi32(sumi[c & 1], _mm256_add_epi32(p0, p1));
                }
                acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_add_epi32(sumi[0], sumi[1])),
                    _mm256_set1_ps(d),
                    acc,
                );
            }
            let m = _mm_add_ps(mins, _mm_movehl_ps(mins, mins));
            let m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
            *o = hsum(acc) - _mm_cvtss_f32(m);
        }
    }

    /// Q5_K rows against the input quantized per 32 values. Per super-block: the scales and
    /// minima unpacked (scalar); the minima's part `dmin·Σ_j m_j·(d_x·Σ q_x)` as one 8-lane
    /// product (lane = sub-block); per chunk of 64 values one 32-byte load split into its two
    /// sub-blocks' nibbles, with the fifth bits of `qh` selected by a mask compare, `u` ≤ 31; `maddubs` with the input's signed
    /// bytes (pair sums at most 2·31·127 = 7874, no saturation), `madd` with the sub-block's
    /// scale (≤ 63: lanes at most 2·63·7874 < 2³¹), then `d·d_x` as f32.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q5k_rows(w: &[u8], xi: &QuantInput, out: &mut [f32]) {
        let blocks = xi.d.len();
        let supers = blocks / 8;
        let (size, qs_at) = (Q5K_BLOCK_BYTES, 48);
        assert!(
            blocks.is_multiple_of(8)
                && xi.q.len() == blocks * Q8_0_BLOCK
                && xi.sums.len() == blocks
                && w.len() >= out.len() * supers * size,
            "matvec_q5k: sizes"
        );
        let low = _mm256_set1_epi8(0x0F);
        let sixteen = _mm256_set1_epi8(0x10);
        for (r, o) in out.iter_mut().enumerate() {
            let row = w.as_ptr().add(r * supers * size);
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut mins = _mm256_setzero_ps();
            for s in 0..supers {
                let p = row.add(s * size);
                crate::kernels::prefetch_ahead_span(p, size);
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
                let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
                for c in 0..4 {
                    let packed = _mm256_loadu_si256(p.add(qs_at + 32 * c) as *const __m256i);
                    let halves = [
                        _mm256_and_si256(packed, low),
                        _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                    ];
                    for (h, nib) in halves.into_iter().enumerate() {
                        let j = 2 * c + h;
                        let bit = _mm256_set1_epi8((1u8 << j) as i8);
                        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                        let u = _mm256_or_si256(nib, _mm256_and_si256(set, sixteen));
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
            candle_same_input: true,
            q8k: true,
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
            q8k: false,
        });
    }
}
