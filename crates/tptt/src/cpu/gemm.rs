//! A register-blocked f32 matrix product for the CPU kernels (the linear branch's chunk solves
//! and state products, the prefill attention's scores and outputs).

use super::math::{axpy, fmadd};

/// Micro-kernel rows.
pub(crate) const MR: usize = 6;
/// Micro-kernel columns (two 8-lane vectors).
pub(crate) const NR: usize = 16;

/// `c[i, j] = (acc ? c[i, j] : 0) + s·Σ_p a[i, p]·b[p, j]` for `i < m`, `j < n`, `p < k`, all
/// row-major with row strides `lda`, `ldb`, `ldc`.
///
/// Rows go in panels of [`MR`], packed `p`-major so the micro-kernel reads them contiguously;
/// columns in tiles of [`NR`], each a `MR×NR` block of accumulators kept in registers while `p`
/// runs over `k` (two vector loads of `b` and `MR` broadcasts feed `2·MR` multiply-adds). Columns
/// past the last whole tile take a scalar path. With `F` on a CPU with AVX-512 F, tiles are 32
/// columns wide in 16-lane registers ([`avx512::gemm`]), with the same multiply-adds in the same
/// order: the same results, bit for bit.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<const F: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    s: f32,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if m <= 2 {
        // One or two rows (decoding): a register tile would be a chain of `k` dependent
        // multiply-adds per vector; instead accumulate whole rows of `b` (`n/8` independent
        // vectors per step).
        let mut t = vec![0f32; n];
        for i in 0..m {
            t.fill(0.0);
            for (p, &x) in a[i * lda..i * lda + k].iter().enumerate() {
                axpy::<F>(&mut t, x, &b[p * ldb..p * ldb + n]);
            }
            for (cv, &tv) in c[i * ldc..i * ldc + n].iter_mut().zip(&t) {
                *cv = if acc { fmadd::<F>(s, tv, *cv) } else { s * tv };
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if F && n >= avx512::NR && k > 0 && super::has_avx512f() {
        // SAFETY: AVX-512 F (with AVX2 and FMA) detected just above; the slices' lengths are
        // checked inside.
        unsafe { avx512::gemm(m, n, k, (a, lda), (b, ldb), (c, ldc), s, acc) };
        return;
    }
    let mut pack = vec![0f32; MR * k];
    let whole = n - n % NR;
    for i0 in (0..m).step_by(MR) {
        let mr = MR.min(m - i0);
        pack_rows(&mut pack, a, lda, k, i0, mr);
        for j0 in (0..whole).step_by(NR) {
            // A short last panel (and single-row products when decoding) runs a kernel of its
            // own height rather than multiplying zero rows.
            match mr {
                1 => store::<F, 1>(
                    micro::<F, 1>(k, &pack, b, ldb, j0),
                    c,
                    (i0, j0, ldc),
                    s,
                    acc,
                ),
                2 => store::<F, 2>(
                    micro::<F, 2>(k, &pack, b, ldb, j0),
                    c,
                    (i0, j0, ldc),
                    s,
                    acc,
                ),
                3 => store::<F, 3>(
                    micro::<F, 3>(k, &pack, b, ldb, j0),
                    c,
                    (i0, j0, ldc),
                    s,
                    acc,
                ),
                4 => store::<F, 4>(
                    micro::<F, 4>(k, &pack, b, ldb, j0),
                    c,
                    (i0, j0, ldc),
                    s,
                    acc,
                ),
                5 => store::<F, 5>(
                    micro::<F, 5>(k, &pack, b, ldb, j0),
                    c,
                    (i0, j0, ldc),
                    s,
                    acc,
                ),
                _ => store::<F, MR>(
                    micro::<F, MR>(k, &pack, b, ldb, j0),
                    c,
                    (i0, j0, ldc),
                    s,
                    acc,
                ),
            }
        }
        for j in whole..n {
            for r in 0..mr {
                let mut t = 0f32;
                for p in 0..k {
                    t = fmadd::<F>(pack[p * MR + r], b[p * ldb + j], t);
                }
                let cv = &mut c[(i0 + r) * ldc + j];
                *cv = if acc { fmadd::<F>(s, t, *cv) } else { s * t };
            }
        }
    }
}

/// `c[i0 + r, j0 + j] = (acc ? c : 0) + s·tile[r][j]`.
#[inline(always)]
fn store<const F: bool, const M: usize>(
    tile: [[f32; NR]; M],
    c: &mut [f32],
    (i0, j0, ldc): (usize, usize, usize),
    s: f32,
    acc: bool,
) {
    for (r, tr) in tile.iter().enumerate() {
        let cr = &mut c[(i0 + r) * ldc + j0..(i0 + r) * ldc + j0 + NR];
        for (cv, &t) in cr.iter_mut().zip(tr) {
            *cv = if acc { fmadd::<F>(s, t, *cv) } else { s * t };
        }
    }
}

/// The `M×NR` block `Σ_p pack[p, :M]ᵀ·b[p, j0..j0+NR]` (`M ≤ MR`; the pack's row stride is `MR`).
#[inline(always)]
fn micro<const F: bool, const M: usize>(
    k: usize,
    pack: &[f32],
    b: &[f32],
    ldb: usize,
    j0: usize,
) -> [[f32; NR]; M] {
    let mut t = [[0f32; NR]; M];
    for (p, ap) in pack.chunks_exact(MR).take(k).enumerate() {
        let bp = &b[p * ldb + j0..p * ldb + j0 + NR];
        for r in 0..M {
            let ar = ap[r];
            for j in 0..NR {
                t[r][j] = fmadd::<F>(ar, bp[j], t[r][j]);
            }
        }
    }
    t
}

/// Pack rows `i0..i0 + mr` of `a` (`k` values each, row stride `lda`) `p`-major into `pack`
/// (`[k, MR]`), rows past `mr` zero.
#[inline(always)]
fn pack_rows(pack: &mut [f32], a: &[f32], lda: usize, k: usize, i0: usize, mr: usize) {
    for r in 0..MR {
        if r < mr {
            let row = &a[(i0 + r) * lda..(i0 + r) * lda + k];
            for (p, &x) in row.iter().enumerate() {
                pack[p * MR + r] = x;
            }
        } else {
            for p in 0..k {
                pack[p * MR + r] = 0.0;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! [`super::gemm`] with `MR × 32` tiles in 16-lane registers.
    use std::arch::x86_64::*;

    use super::{pack_rows, MR};

    /// Tile columns (two 16-lane vectors).
    pub(super) const NR: usize = 32;

    /// The largest `k` whose row panel is packed on the stack (6 KB).
    const STACK_K: usize = 256;

    /// [`super::gemm`] (fused), the same multiply-adds in the same order per element.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        (a, lda): (&[f32], usize),
        (b, ldb): (&[f32], usize),
        (c, ldc): (&mut [f32], usize),
        s: f32,
        acc: bool,
    ) {
        assert!(
            m > 0
                && n > 0
                && k > 0
                && lda >= k
                && ldb >= n
                && ldc >= n
                && a.len() >= (m - 1) * lda + k
                && b.len() >= (k - 1) * ldb + n
                && c.len() >= (m - 1) * ldc + n,
            "gemm: {m}x{n}x{k} with strides {lda}, {ldb}, {ldc}"
        );
        // The row panel's packing: on the stack for the decode step's small products (its
        // `k = D` ≤ 256), else on the heap.
        let mut stack = [0f32; MR * STACK_K];
        let mut heap = Vec::new();
        let pack: &mut [f32] = if k <= STACK_K {
            &mut stack[..MR * k]
        } else {
            heap.resize(MR * k, 0f32);
            &mut heap
        };
        let whole = n - n % NR;
        let sv = _mm512_set1_ps(s);
        for i0 in (0..m).step_by(MR) {
            let mr = MR.min(m - i0);
            pack_rows(pack, a, lda, k, i0, mr);
            let pp = pack.as_ptr();
            for j0 in (0..whole).step_by(NR) {
                let bp = b.as_ptr().add(j0);
                let mut t = [[_mm512_setzero_ps(); 2]; MR];
                for p in 0..k {
                    let b0 = _mm512_loadu_ps(bp.add(p * ldb));
                    let b1 = _mm512_loadu_ps(bp.add(p * ldb + 16));
                    for (r, tr) in t.iter_mut().enumerate() {
                        let ar = _mm512_set1_ps(*pp.add(p * MR + r));
                        tr[0] = _mm512_fmadd_ps(ar, b0, tr[0]);
                        tr[1] = _mm512_fmadd_ps(ar, b1, tr[1]);
                    }
                }
                for (r, tr) in t.iter().enumerate().take(mr) {
                    let cp = c.as_mut_ptr().add((i0 + r) * ldc + j0);
                    for (h, &v) in tr.iter().enumerate() {
                        let at = cp.add(16 * h);
                        let out = if acc {
                            _mm512_fmadd_ps(sv, v, _mm512_loadu_ps(at))
                        } else {
                            _mm512_mul_ps(sv, v)
                        };
                        _mm512_storeu_ps(at, out);
                    }
                }
            }
            for j in whole..n {
                for r in 0..mr {
                    let mut t = 0f32;
                    for p in 0..k {
                        t = pack[p * MR + r].mul_add(b[p * ldb + j], t);
                    }
                    let cv = &mut c[(i0 + r) * ldc + j];
                    *cv = if acc { s.mul_add(t, *cv) } else { s * t };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable product, fused as the AVX2 instantiation is: every element's multiply-adds
    /// in order `p = 0..k`, then `s·t` (`+ c`).
    #[allow(clippy::too_many_arguments)]
    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], s: f32, acc: bool) {
        for i in 0..m {
            for j in 0..n {
                let mut t = 0f32;
                for p in 0..k {
                    t = a[i * k + p].mul_add(b[p * n + j], t);
                }
                let cv = &mut c[i * n + j];
                *cv = if acc { s.mul_add(t, *cv) } else { s * t };
            }
        }
    }

    /// Every tile shape (short last panels, column tails, single rows) equals the naive
    /// product bit for bit, fused (AVX-512 or AVX2 tiles, whichever this CPU takes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fused_product_equals_the_naive_one_bit_for_bit() {
        if !crate::cpu::has_avx2_fma() {
            return;
        }
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fused(
            m: usize,
            n: usize,
            k: usize,
            a: &[f32],
            b: &[f32],
            c: &mut [f32],
            s: f32,
            acc: bool,
        ) {
            gemm::<true>(m, n, k, a, k, b, n, c, n, s, acc);
        }
        let v = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) * 1.37e-3)
                .collect()
        };
        for (m, n, k) in [
            (3, 32, 5),
            (6, 64, 64),
            (13, 70, 33),
            (7, 31, 9),
            (128, 64, 64),
            (5, 100, 1),
        ] {
            let (a, b) = (v(m * k, 1), v(k * n, 2));
            for acc in [false, true] {
                let c0 = v(m * n, 3);
                let (mut got, mut want) = (c0.clone(), c0);
                // SAFETY: AVX2 + FMA detected above.
                unsafe { fused(m, n, k, &a, &b, &mut got, 0.7, acc) };
                naive(m, n, k, &a, &b, &mut want, 0.7, acc);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{n}x{k} acc {acc}"
                );
            }
        }
    }
}
