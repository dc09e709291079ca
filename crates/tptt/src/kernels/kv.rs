//! Cached keys and values as the attention kernels read them: [`KvSlice`], the storage of a KV
//! buffer in its format (f32; f16 — half the bytes to read at long history; or 8-bit blocks,
//! GGML's Q8_0 layout as llama.cpp's `q8_0` cache uses it: per 32 values of a row an f16 scale
//! `d` and 32 signed bytes `q`, value `d·q`, 34 bytes where f32 takes 128), and the way the
//! portable and prefill kernels get f32 out of it, a block at a time ([`KvSlice::f32_range`]):
//! borrowed when stored as f32, converted into the task's scratch (F16C when the CPU has it,
//! through `half`; 8-bit rows by [`dequantize_q8_0`], AVX2 when the CPU has it) otherwise. A
//! block is small (it stays in L1/L2 while the heads that share it read it), so the conversion
//! costs a pass over data already in cache, and memory traffic is that of the compact format.
//! The AVX2 decode kernel reads f16 in place instead, widening eight halves at a time inside its
//! products (`kernels.rs`, `avx2::Lanes`).
//!
//! [`quantize_q8_0`] writes the 8-bit rows (llama.cpp's `quantize_row_q8_0_ref`: `d = max|x|/127`,
//! `q = round(x/d)`); [`dequantize_q8_0`] reads them, beside its naive reference
//! [`dequantize_q8_0_naive`].

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

/// Bytes of `values` values (a multiple of 32) as 8-bit KV blocks.
pub fn q8_0_bytes(values: usize) -> usize {
    values / Q8_0_BLOCK * Q8_0_BLOCK_BYTES
}

/// Append `x` (its length a multiple of 32) to `out` as Q8_0 blocks, per block `d = max|x|/127`
/// stored as f16 and `q = round(x/d)` (llama.cpp's reference quantization; a block of zeros gets
/// `d = 0`).
///
/// # Panics
/// When `x.len()` is not a multiple of 32.
pub fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    assert!(
        x.len().is_multiple_of(Q8_0_BLOCK),
        "quantize_q8_0: {} values are not whole blocks",
        x.len()
    );
    out.reserve(q8_0_bytes(x.len()));
    let mut q = [0i8; Q8_0_BLOCK];
    for blk in x.chunks_exact(Q8_0_BLOCK) {
        let amax = super::abs_max(blk);
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        super::scale_round(blk, id, &mut q);
        out.extend(q.iter().map(|&v| v as u8));
    }
}

/// The literal definition: each value `d·q`. `out.len()` values from `bytes`.
///
/// # Panics
/// When `out.len()` is not a multiple of 32 or `bytes` is too short.
pub fn dequantize_q8_0_naive(bytes: &[u8], out: &mut [f32]) {
    assert!(
        out.len().is_multiple_of(Q8_0_BLOCK) && bytes.len() >= q8_0_bytes(out.len()),
        "dequantize_q8_0: sizes"
    );
    for (o, b) in out
        .chunks_exact_mut(Q8_0_BLOCK)
        .zip(bytes.chunks_exact(Q8_0_BLOCK_BYTES))
    {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (x, &q) in o.iter_mut().zip(&b[2..]) {
            *x = d * (q as i8) as f32;
        }
    }
}

/// [`dequantize_q8_0_naive`], eight lanes at a time with AVX2 + F16C when the CPU has them.
///
/// # Panics
/// As [`dequantize_q8_0_naive`].
pub fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    assert!(
        out.len().is_multiple_of(Q8_0_BLOCK) && bytes.len() >= q8_0_bytes(out.len()),
        "dequantize_q8_0: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the features the function is compiled for were detected just above; the
            // sizes were checked.
            unsafe { avx2::dequantize(bytes, out) };
            return;
        }
    }
    dequantize_q8_0_naive(bytes, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

    /// # Safety
    /// The CPU must have AVX2 and F16C; `bytes` must hold the blocks of `out`, whose length is
    /// a multiple of 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(bytes: &[u8], out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(Q8_0_BLOCK).enumerate() {
            let p = bytes.as_ptr().add(b * Q8_0_BLOCK_BYTES);
            let d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                u16::from_le_bytes([*p, *p.add(1)]) as i32,
            ))));
            for j in 0..4 {
                let q = _mm_loadl_epi64(p.add(2 + 8 * j) as *const __m128i);
                let x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * j), _mm256_mul_ps(d, x));
            }
        }
    }
}

/// A KV buffer's values, in the format they are stored in.
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    /// 4 bytes a value.
    F32(&'a [f32]),
    /// 2 bytes a value.
    F16(&'a [f16]),
    /// 8-bit blocks: 34 bytes per 32 values of a row ([`quantize_q8_0`]).
    Q8_0(&'a [u8]),
}

impl<'a> KvSlice<'a> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(x) => x.len(),
            KvSlice::F16(x) => x.len(),
            KvSlice::Q8_0(x) => x.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK,
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `from..to` as f32: the stored slice itself (f32), or converted into `scratch`
    /// (f16, 8-bit; `scratch` is resized to the range and every element overwritten).
    ///
    /// # Panics
    /// When the range is out of bounds, as slicing does, or (8-bit) does not start and end on
    /// a block (rows of a multiple of 32 values always do).
    #[inline]
    pub fn f32_range<'s>(&'s self, from: usize, to: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self {
            KvSlice::F32(x) => &x[from..to],
            KvSlice::F16(x) => {
                // Every element is overwritten: a scratch reused from block to block is only
                // zero-filled where it grows.
                scratch.resize(to - from, 0.0);
                x[from..to].convert_to_f32_slice(scratch);
                scratch
            }
            KvSlice::Q8_0(x) => {
                assert!(
                    from.is_multiple_of(Q8_0_BLOCK) && to.is_multiple_of(Q8_0_BLOCK),
                    "an 8-bit KV range must cover whole blocks: {from}..{to}"
                );
                scratch.resize(to - from, 0.0);
                dequantize_q8_0(&x[q8_0_bytes(from)..q8_0_bytes(to)], scratch);
                scratch
            }
        }
    }

    /// Every value as f32 (for the naive references).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut scratch = Vec::new();
        self.f32_range(0, self.len(), &mut scratch).to_vec()
    }
}

impl<'a> From<&'a [f32]> for KvSlice<'a> {
    fn from(x: &'a [f32]) -> Self {
        KvSlice::F32(x)
    }
}

impl<'a> From<&'a Vec<f32>> for KvSlice<'a> {
    fn from(x: &'a Vec<f32>) -> Self {
        KvSlice::F32(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_reads_the_same_values_in_either_format() {
        let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.25 - 7.0).collect();
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let mut scratch = vec![1.0; 3];
        let (a, b) = (KvSlice::F32(&x), KvSlice::F16(&h));
        assert_eq!(a.f32_range(10, 42, &mut scratch), &x[10..42]);
        // Quarters up to 25 are exact in f16.
        assert_eq!(b.f32_range(10, 42, &mut scratch), &x[10..42]);
        assert_eq!(b.to_f32_vec(), x);
        assert_eq!(b.len(), 100);
        assert!(!b.is_empty());
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                // Mixed magnitudes per block, an all-zero block, a lone outlier.
                let x = (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
                match i / 32 % 4 {
                    0 => x * 3.0,
                    1 => 0.0,
                    2 => x * 1e-3,
                    _ if i % 32 == 5 => 40.0,
                    _ => x,
                }
            })
            .collect()
    }

    #[test]
    fn q8_0_rows_round_trip_within_half_a_step() {
        let x = values(32 * 12, 3);
        let mut q = Vec::new();
        quantize_q8_0(&x, &mut q);
        assert_eq!(q.len(), q8_0_bytes(x.len()));
        let mut naive = vec![f32::NAN; x.len()];
        dequantize_q8_0_naive(&q, &mut naive);
        let mut fast = vec![f32::NAN; x.len()];
        dequantize_q8_0(&q, &mut fast);
        assert_eq!(fast, naive, "the SIMD read is the definition, bit for bit");
        crate::cpu::force_portable(true);
        let mut portable = vec![f32::NAN; x.len()];
        dequantize_q8_0(&q, &mut portable);
        crate::cpu::force_portable(false);
        assert_eq!(portable, naive);
        for (blk, (xs, ys)) in x.chunks(32).zip(naive.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Half a quantization step, plus up to 127 times the f16 rounding of the scale
            // (2⁻¹¹ relative, or absolute where the scale is subnormal in f16).
            let d = amax / 127.0;
            let tol = d * 0.5 + 127.0 * (d - f16::from_f32(d).to_f32()).abs() + 1e-7 * amax;
            for (a, b) in xs.iter().zip(ys) {
                assert!((a - b).abs() <= tol, "block {blk}: {a} vs {b}");
            }
            if amax == 0.0 {
                assert!(ys.iter().all(|&v| v == 0.0));
            }
        }
        // Through a slice, by block-aligned ranges.
        let s = KvSlice::Q8_0(&q);
        assert_eq!(s.len(), x.len());
        let mut scratch = vec![7.0; 5];
        assert_eq!(s.f32_range(64, 160, &mut scratch), &naive[64..160]);
        assert_eq!(s.to_f32_vec(), naive);
    }

    #[test]
    #[should_panic(expected = "whole blocks")]
    fn an_8_bit_range_inside_a_block_is_refused() {
        let mut q = Vec::new();
        quantize_q8_0(&[1.0; 64], &mut q);
        let mut scratch = Vec::new();
        let _ = KvSlice::Q8_0(&q).f32_range(3, 40, &mut scratch);
    }
}
