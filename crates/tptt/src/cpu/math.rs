//! Vector math without library calls, so the loops over it vectorise: [`exp`] (one exponential
//! for every kernel: attention's softmax, the linear branch's gates and SiLU) and its eight-lane
//! form, and the fused multiply-add, dot product and axpy the blocked kernels are built of (each
//! generic over `F`: fused inside the AVX2 + FMA variants, separate elsewhere).

/// ln 2 split for Cody–Waite: a part exact in `n · LN2_HI` (few mantissa bits) and the rest.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = 2.121_944_4e-4;
/// The Taylor coefficients of `eʳ` after `1/7!`, from the highest degree down (Horner).
const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];
/// The degree-7 coefficient.
const EXP_POLY_TOP: f32 = 1.0 / 5040.0;

/// `eˣ` without a libm call: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-7 Taylor polynomial
/// for `eʳ` (relative error ~1e-7 on that range) and `2ⁿ` put into the exponent bits. Below −87
/// the result flushes to 0 (−∞ gives 0: a softmax weight under 1e-38 next to the max's 1); above
/// 88.3 it stays at `e^88.3` (so `2ⁿ` is a normal float), where it only feeds `1/(1 + eˣ)`-type
/// expressions that are then 0 to well within float tolerance.
#[inline(always)]
pub fn exp(x_in: f32) -> f32 {
    let x = x_in.clamp(-87.0, 88.3);
    // Adding and subtracting 1.5·2²³ rounds to an integer, which `t`'s low mantissa bits then
    // hold: `2ⁿ` comes from those bits, with no float-to-int conversion (a saturating cast does
    // not vectorise).
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // Cody–Waite: ln 2 split in a part exact in n·hi (few mantissa bits) and the rest.
    let r = (x - n * LN2_HI) + n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [−126, 127]: 2^n is a normal f32 with exponent bits n + 127.
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    // A select, not a branch: the loop stays vectorised.
    if x_in < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// `a·b + c`, fused when `F` (only instantiated with `F` inside the AVX2 + FMA variants, where
/// `mul_add` is one instruction; elsewhere it would be a slow library call).
#[inline(always)]
pub(crate) fn fmadd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with 8 independent accumulators, so that it vectorises (a single f32 sum is a
/// serial dependency chain the compiler may not reorder).
#[inline(always)]
pub(crate) fn dot<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = fmadd::<F>(x[i], y[i], acc[i]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// The largest of `x` (−∞ for none), in 8 lanes so that it vectorises.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let tail = c
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for v in c {
        for i in 0..8 {
            acc[i] = acc[i].max(v[i]);
        }
    }
    acc.into_iter().fold(tail, f32::max)
}

/// The sum of `x`, in 8 lanes so that it vectorises (in another order than a serial sum).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for i in 0..8 {
            acc[i] += v[i];
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// `y += a·x`.
#[inline(always)]
pub(crate) fn axpy<const F: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = fmadd::<F>(a, xi, *yi);
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! The eight-lane forms.
    use std::arch::x86_64::*;

    /// [`super::exp`] for `x ≤ 0`, eight lanes, with the same reduction.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA ([`crate::cpu::has_avx2_fma`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x_in: __m256) -> __m256 {
        let x = _mm256_max_ps(x_in, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_add_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(super::LN2_HI))),
            _mm256_mul_ps(n, _mm256_set1_ps(super::LN2_LO)),
        );
        let mut p = _mm256_set1_ps(super::EXP_POLY_TOP);
        for c in super::EXP_POLY {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        let y = _mm256_mul_ps(p, scale);
        // Below −87 (and −∞): exactly 0.
        let tiny = _mm256_cmp_ps(x_in, _mm256_set1_ps(-87.0), _CMP_LT_OQ);
        _mm256_andnot_ps(tiny, y)
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    //! The sixteen-lane forms.
    use std::arch::x86_64::*;

    /// [`super::avx2::exp8`] on sixteen lanes: the same reduction and polynomial, lane for lane.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F ([`crate::cpu::has_avx512_vnni`] implies it).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp16(x_in: __m512) -> __m512 {
        let x = _mm512_max_ps(x_in, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_add_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(super::LN2_HI))),
            _mm512_mul_ps(n, _mm512_set1_ps(super::LN2_LO)),
        );
        let mut p = _mm512_set1_ps(super::EXP_POLY_TOP);
        for c in super::EXP_POLY {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        )));
        let y = _mm512_mul_ps(p, scale);
        // Below −87 (and −∞): exactly 0.
        let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x_in, _mm512_set1_ps(-87.0));
        _mm512_maskz_mov_ps(!tiny, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.0044; // [-88, 88]
            if x.abs() < 87.0 {
                let (a, b) = (exp(x), x.exp());
                assert!(
                    (a - b).abs() <= 4.0 * f32::EPSILON * b,
                    "exp({x}): {a} vs {b}"
                );
            }
        }
        let mut x = 0f32;
        while x > -100.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 3e-7 * want + 2e-38,
                "exp({x}) = {want}, got {got}"
            );
            x -= 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::INFINITY).is_finite() && exp(1e30) > 1e38);
    }

    /// The lane-wise max and sum equal the serial fold (the max exactly, the sum to rounding),
    /// for every length around the lanes, with −∞ and ties.
    #[test]
    fn lane_max_and_sum_match_the_serial_fold() {
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(sum(&[]), 0.0);
        for n in 0..40 {
            let x: Vec<f32> = (0..n)
                .map(|i| match i % 7 {
                    3 => f32::NEG_INFINITY,
                    5 => 2.5,
                    _ => ((i * 37 % 11) as f32 - 5.0) * 0.37,
                })
                .collect();
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), want_max, "max of {x:?}");
            let finite: Vec<f32> = x.iter().map(|v| v.max(-1.0)).collect();
            let want_sum: f32 = finite.iter().sum();
            assert!((sum(&finite) - want_sum).abs() <= 1e-5, "sum of {finite:?}");
        }
    }

    /// The sixteen lanes give the eight lanes' values exactly.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_equals_exp8() {
        if !(crate::cpu::has_avx512_vnni() && crate::cpu::has_avx2_fma()) {
            return;
        }
        let xs: Vec<f32> = (0..1600)
            .map(|i| -(i as f32) * 0.0613)
            .chain([
                f32::NEG_INFINITY,
                -87.0,
                -86.99,
                -87.01,
                0.0,
                -0.0,
                -1e-30,
                -1e30,
            ])
            .chain([f32::NEG_INFINITY; 8])
            .collect();
        for chunk in xs.chunks_exact(16) {
            let (mut wide, mut narrow) = ([0f32; 16], [0f32; 16]);
            // SAFETY: AVX-512 F, AVX2 and FMA detected above; the buffers hold 16 floats.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(
                    wide.as_mut_ptr(),
                    avx512::exp16(_mm512_loadu_ps(chunk.as_ptr())),
                );
                for h in 0..2 {
                    _mm256_storeu_ps(
                        narrow.as_mut_ptr().add(8 * h),
                        avx2::exp8(_mm256_loadu_ps(chunk.as_ptr().add(8 * h))),
                    );
                }
            }
            for ((x, a), b) in chunk.iter().zip(wide).zip(narrow) {
                assert_eq!(a.to_bits(), b.to_bits(), "exp16({x}) = {a}, exp8 = {b}");
            }
        }
    }

    /// The eight lanes give the scalar's values (to an ulp: the rounding to `n` differs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp8_matches_exp() {
        if !crate::cpu::has_avx2_fma() {
            return;
        }
        let xs: Vec<f32> = (0..800)
            .map(|i| -(i as f32) * 0.13)
            .chain([f32::NEG_INFINITY; 8])
            .collect();
        for chunk in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 + FMA detected above; `chunk` and `out` hold eight floats.
            unsafe {
                use std::arch::x86_64::*;
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    avx2::exp8(_mm256_loadu_ps(chunk.as_ptr())),
                );
            }
            for (x, y) in chunk.iter().zip(out) {
                let want = exp(*x);
                assert!(
                    (y - want).abs() <= 2.0 * f32::EPSILON * want + 1e-38,
                    "exp8({x}) = {y}, exp = {want}"
                );
            }
        }
    }
}
