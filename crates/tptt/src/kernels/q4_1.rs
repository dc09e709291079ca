//! GGML Q4_1 matrices used as stored (no re-quantization at load): matrix × vector against the
//! input quantized per 32-block (Q8_1, as llama.cpp and candle do for this type), each kernel
//! beside its naive reference. A block is 20 bytes: an f16 scale `d`, an f16 minimum `m` and 16
//! bytes of 4-bit values, value `j` (< 16) in the low nibble of byte `j` and value `j + 16` in
//! its high nibble; the weight is `d·q + m`. So a block's product with an input block quantized
//! as `d_x·q_x` is `d·d_x·Σ q·q_x + m·s_x`, with `s_x = d_x·Σ q_x`.

use super::Q8_0_BLOCK;

/// Bytes of one Q4_1 block.
pub const Q4_1_BLOCK_BYTES: usize = 20;

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 values of one block, as `d·q + m`.
fn dequantize_block(blk: &[u8]) -> [f32; Q8_0_BLOCK] {
    let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
    let mut out = [0f32; Q8_0_BLOCK];
    for j in 0..16 {
        let byte = blk[4 + j];
        out[j] = d * f32::from(byte & 0x0F) + m;
        out[j + 16] = d * f32::from(byte >> 4) + m;
    }
    out
}

/// `out = W·x` over Q4_1 rows, dequantized value by value (the exact product of the stored
/// weights with the f32 input).
pub fn matvec_q4_1_naive(w: &[u8], x: &[f32], out: &mut [f32]) {
    let blocks = x.len() / Q8_0_BLOCK;
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let at = (r * blocks + b) * Q4_1_BLOCK_BYTES;
            let vals = dequantize_block(&w[at..at + Q4_1_BLOCK_BYTES]);
            acc += vals
                .iter()
                .zip(&x[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK])
                .map(|(a, b)| a * b)
                .sum::<f32>();
        }
        *o = acc;
    }
}

/// The input's block sums `s_b = d_b·Σ q` (Q8_1's second number) from its Q8 quantization,
/// rounded as candle's Q8_1 stores them (`f16(Σ q) · d` in half precision), so that the kernel
/// computes what candle's Q4_1 product (the tensor path's) computes.
pub fn block_sums(xq: &[i8], xd: &[f32]) -> Vec<f32> {
    use half::f16;
    xq.chunks_exact(Q8_0_BLOCK)
        .zip(xd)
        .map(|(q, &d)| {
            let sum = q.iter().map(|&v| i32::from(v)).sum::<i32>() as f32;
            (f16::from_f32(sum) * f16::from_f32(d)).to_f32()
        })
        .collect()
}

/// Q4_1 rows against the quantized input, the literal definition (the reference of the
/// optimized kernel): `Σ_b d_w·d_x·Σ q_w·q_x + m_w·s_x`.
pub fn matvec_q4_1_quantized_naive(w: &[u8], xq: &[i8], xd: &[f32], xs: &[f32], out: &mut [f32]) {
    let blocks = xd.len();
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let at = (r * blocks + b) * Q4_1_BLOCK_BYTES;
            let blk = &w[at..at + Q4_1_BLOCK_BYTES];
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            let qx = &xq[b * Q8_0_BLOCK..(b + 1) * Q8_0_BLOCK];
            let mut dot = 0i32;
            for j in 0..16 {
                dot += i32::from(blk[4 + j] & 0x0F) * i32::from(qx[j]);
                dot += i32::from(blk[4 + j] >> 4) * i32::from(qx[j + 16]);
            }
            acc += d * xd[b] * dot as f32 + m * xs[b];
        }
        *o = acc;
    }
}

/// Serial Q4_1 `out = W·x` on the quantized input, with the best kernel for this CPU.
pub(super) fn matvec_q4_1_rows(w: &[u8], xq: &[i8], xd: &[f32], xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_q4_1_rows(w, xq, xd, xs, out) };
            return;
        }
    }
    matvec_q4_1_quantized_naive(w, xq, xd, xs, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Q4_1_BLOCK_BYTES, Q8_0_BLOCK};

    /// Q4_1 rows against the Q8-quantized input: per block, the 16 bytes of nibbles spread to
    /// 32 unsigned bytes (low nibbles, then high), multiplied with the input's signed bytes and
    /// summed in pairs (`maddubs`: at most 2·15·127, no overflow), then to 8 × i32, scaled by
    /// `d_w·d_x`; the minima's part `m_w·s_x` summed beside.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_q4_1_rows(
        w: &[u8],
        xq: &[i8],
        xd: &[f32],
        xs: &[f32],
        out: &mut [f32],
    ) {
        let blocks = xd.len();
        assert!(
            xq.len() == blocks * Q8_0_BLOCK
                && xs.len() == blocks
                && w.len() >= out.len() * blocks * Q4_1_BLOCK_BYTES,
            "matvec_q4_1: sizes"
        );
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        let half = |p: *const u8| -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                u16::from_le_bytes([*p, *p.add(1)]) as i32,
            )))
        };
        // Two rows at a time: two independent accumulator chains and two weight streams per
        // thread, the input block loaded once for both (in the decode, where the matrices come
        // from memory, 66–69 → 88–93 tok/s for SmolLM2's Q4_1 base on an Intel Xeon; four rows
        // at a time measured slower). An odd last row goes through the one-row loop below.
        const N: usize = 2;
        let pairs = out.len() / N;
        for pr in 0..pairs {
            let rows: [usize; N] = std::array::from_fn(|j| N * pr + j);
            let base = rows.map(|r| w.as_ptr().add(r * blocks * Q4_1_BLOCK_BYTES));
            let mut acc = [_mm256_setzero_ps(); N];
            let mut mins = [0f32; N];
            for b in 0..blocks {
                let qx = _mm256_loadu_si256(xq.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i);
                let (xdb, xsb) = (*xd.get_unchecked(b), *xs.get_unchecked(b));
                for j in 0..N {
                    let p = base[j].add(b * Q4_1_BLOCK_BYTES);
                    crate::kernels::prefetch_ahead(p);
                    let (dw, mw) = (half(p), half(p.add(2)));
                    let packed = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let nib = _mm256_set_m128i(
                        _mm_and_si128(_mm_srli_epi16(packed, 4), low),
                        _mm_and_si128(packed, low),
                    );
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, qx), ones);
                    acc[j] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(dw * xdb), acc[j]);
                    mins[j] += mw * xsb;
                }
            }
            for j in 0..N {
                out[rows[j]] = crate::kernels::avx2::hsum(acc[j]) + mins[j];
            }
        }
        for (r, o) in out.iter_mut().enumerate().skip(N * pairs) {
            let row = w.as_ptr().add(r * blocks * Q4_1_BLOCK_BYTES);
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0f32;
            for b in 0..blocks {
                let p = row.add(b * Q4_1_BLOCK_BYTES);
                crate::kernels::prefetch_ahead(p);
                let (dw, mw) = (half(p), half(p.add(2)));
                let packed = _mm_loadu_si128(p.add(4) as *const __m128i);
                let nib = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(packed, 4), low),
                    _mm_and_si128(packed, low),
                );
                let qx = _mm256_loadu_si256(xq.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i);
                let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, qx), ones);
                acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(prod),
                    _mm256_set1_ps(dw * *xd.get_unchecked(b)),
                    acc,
                );
                mins += mw * *xs.get_unchecked(b);
            }
            *o = crate::kernels::avx2::hsum(acc) + mins;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{matvec_group, quantize_q8_0, MatVec, Rows};
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A matrix quantized by candle to Q4_1: its bytes, and candle's own product with `x`.
    fn q4_1(rows: usize, cols: usize, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(random(rows, cols, 7), (rows, cols), &dev).expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("q4_1");
        let bytes = q.data().expect("bytes").into_owned();
        let xt = Tensor::from_slice(x, (1, cols), &dev).expect("x");
        let candle = QMatMul::from_qtensor(q)
            .and_then(|m| m.forward(&xt))
            .and_then(|y| y.flatten_all()?.to_vec1::<f32>())
            .expect("candle");
        (bytes, candle)
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }

    /// The optimized kernel equals its quantized-input reference (AVX2 and portable), which is
    /// candle's own Q4_1 × Q8_1 product; and against the exact product of the stored weights
    /// with the f32 input it is off by the input's 8-bit quantization only.
    #[test]
    fn q4_1_kernel_matches_its_references() {
        let (rows, cols) = (48, 256);
        let x = random(1, cols, 3);
        let (w, candle) = q4_1(rows, cols, &x);
        assert_eq!(w.len(), rows * cols / 32 * Q4_1_BLOCK_BYTES);
        let (xq, xd) = quantize_q8_0(&x);
        let xs = block_sums(&xq, &xd);
        let mut reference = vec![0f32; rows];
        matvec_q4_1_quantized_naive(&w, &xq, &xd, &xs, &mut reference);
        assert!(max_rel(&reference, &candle) < 1e-5, "reference vs candle");
        for portable in [false, true] {
            crate::cpu::force_portable(portable);
            let mut got = vec![0f32; rows];
            matvec_q4_1_rows(&w, &xq, &xd, &xs, &mut got);
            crate::cpu::force_portable(false);
            assert!(max_rel(&got, &reference) < 1e-5, "portable {portable}");
        }
        // Row counts that leave an odd last row beside the kernel's pairs of rows (tests that
        // force the portable path may run meanwhile: compared to the reference's rounding).
        let row_bytes = cols / 32 * Q4_1_BLOCK_BYTES;
        for n in [1, 2, 7, 33] {
            let mut got = vec![0f32; n];
            matvec_q4_1_rows(&w[..n * row_bytes], &xq, &xd, &xs, &mut got);
            assert!(max_rel(&got, &reference[..n]) < 1e-5, "{n} rows");
        }
        let mut exact = vec![0f32; rows];
        matvec_q4_1_naive(&w, &x, &mut exact);
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = exact
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d > 0.0 && d < 2e-2 * scale,
            "activation quantization: {d} of {scale}"
        );
        // Through a group beside an f32 matrix (the fused step's path), rows split in tasks.
        let dense = random(8, cols, 11);
        let (mut a, mut b) = (vec![0f32; rows], vec![0f32; 8]);
        matvec_group(
            vec![
                MatVec {
                    w: Rows::Q4_1(&w),
                    bias: None,
                    out: &mut a,
                },
                MatVec {
                    w: Rows::F32(&dense),
                    bias: None,
                    out: &mut b,
                },
            ],
            &x,
        );
        assert!(max_rel(&a, &reference) < 1e-5, "group");
        assert!(!Rows::Q4_1(&w).fits(rows + 1, cols));
    }
}
