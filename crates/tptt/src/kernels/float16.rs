//! Matrices kept in half precision (f16 or bf16, as a safetensors base stores them): matrix ×
//! vector with each weight widened to f32 as it is read (exact: every f16 and bf16 is an f32),
//! against the f32 input. Half the bytes of f32 rows, so half the time where decode is bound by
//! memory bandwidth. Each kernel beside its naive reference.

use half::{bf16, f16};

/// `out = W·x` over f16 rows, value by value (the reference).
pub fn matvec_f16_naive(w: &[f16], x: &[f32], out: &mut [f32]) {
    matvec_widened(w, x, out, f16::to_f32);
}

/// `out = W·x` over bf16 rows, value by value (the reference).
pub fn matvec_bf16_naive(w: &[bf16], x: &[f32], out: &mut [f32]) {
    matvec_widened(w, x, out, bf16::to_f32);
}

/// `out = W·x` with every weight widened by `wide`.
fn matvec_widened<T: Copy>(w: &[T], x: &[f32], out: &mut [f32], wide: fn(T) -> f32) {
    let n = x.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = w[r * n..(r + 1) * n]
            .iter()
            .zip(x)
            .map(|(&a, b)| wide(a) * b)
            .sum();
    }
}

/// Serial f16 `out = W·x` with the best kernel for this CPU.
pub(super) fn matvec_f16_rows(w: &[f16], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx2::matvec_half_rows::<false>(w.as_ptr().cast(), w.len(), x, out) };
            return;
        }
    }
    matvec_f16_naive(w, x, out);
}

/// Serial bf16 `out = W·x` with the best kernel for this CPU.
pub(super) fn matvec_bf16_rows(w: &[bf16], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2_fma_f16c() {
            // SAFETY: as above.
            unsafe { avx2::matvec_half_rows::<true>(w.as_ptr().cast(), w.len(), x, out) };
            return;
        }
    }
    matvec_bf16_naive(w, x, out);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::kernels::avx2::hsum;

    /// Eight half values at `p` as f32: f16 through F16C, bf16 (`BF = true`) by moving its 16
    /// bits to the top of an f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const BF: bool>(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else {
            _mm256_cvtph_ps(h)
        }
    }

    /// `out = W·x` over half rows (`len` values at `w`), one row at a time with four 8-lane FMA
    /// accumulators, as the f32 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` must point at `len` readable `u16`s.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_half_rows<const BF: bool>(
        w: *const u16,
        len: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let n = x.len();
        assert!(len >= out.len() * n, "matvec_half: weights too short");
        let xp = x.as_ptr();
        for (r, o) in out.iter_mut().enumerate() {
            let p = w.add(r * n);
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 32 <= n {
                // 64 bytes: one line.
                crate::kernels::prefetch_ahead(p.add(c) as *const u8);
                for (j, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(
                        load8::<BF>(p.add(c + 8 * j)),
                        _mm256_loadu_ps(xp.add(c + 8 * j)),
                        *acc,
                    );
                }
                c += 32;
            }
            while c + 8 <= n {
                a[0] = _mm256_fmadd_ps(load8::<BF>(p.add(c)), _mm256_loadu_ps(xp.add(c)), a[0]);
                c += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ));
            while c < n {
                let bits = *p.add(c);
                let v = if BF {
                    half::bf16::from_bits(bits).to_f32()
                } else {
                    half::f16::from_bits(bits).to_f32()
                };
                s += v * *xp.add(c);
                c += 1;
            }
            *o = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The SIMD kernels equal the naive references (which widen value by value) on odd widths
    /// (a tail that is not a whole vector) and extreme values; the portable path too.
    #[test]
    fn half_kernels_match_their_references() {
        for cols in [1, 7, 8, 33, 100, 257] {
            let rows = 5;
            let mut w = values(rows * cols, cols as u64);
            w[0] = 6.0e4; // near f16's largest
            let last = w.len() - 1;
            w[last] = 1e-7; // f16 subnormal
            let x = values(cols, 99);
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let (mut want_h, mut want_b) = (vec![0f32; rows], vec![0f32; rows]);
            matvec_f16_naive(&wh, &x, &mut want_h);
            matvec_bf16_naive(&wb, &x, &mut want_b);
            for portable in [false, true] {
                crate::cpu::force_portable(portable);
                let (mut got_h, mut got_b) = (vec![0f32; rows], vec![0f32; rows]);
                matvec_f16_rows(&wh, &x, &mut got_h);
                matvec_bf16_rows(&wb, &x, &mut got_b);
                crate::cpu::force_portable(false);
                for (g, e) in got_h.iter().zip(&want_h).chain(got_b.iter().zip(&want_b)) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "cols {cols} portable {portable}: {g} vs {e}"
                    );
                }
            }
            // bf16 and f16 differ (so each kernel reads its own format).
            assert!(want_h.iter().zip(&want_b).any(|(a, b)| a != b));
        }
    }
}
