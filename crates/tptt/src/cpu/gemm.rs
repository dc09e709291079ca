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
/// past the last whole tile take a scalar path.
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
    let mut pack = vec![0f32; MR * k];
    let whole = n - n % NR;
    for i0 in (0..m).step_by(MR) {
        let mr = MR.min(m - i0);
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
