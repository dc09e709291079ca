//! Q4_K matrices repacked at load for CPUs with AVX-512 VNNI: 16 rows interleaved, so that
//! decode multiplies 16 rows at once, each in a lane of one register, instead of one row at a
//! time with a horizontal sum per row (about twice the rows per second on one thread).
//!
//! A matrix of `rows` (a multiple of 16) rows of `cols` values (whole super-blocks) becomes
//! `rows / 16` groups; a group holds, per super-block, [`SB_BYTES`] bytes:
//! - 32 slots of 64 bytes: slot `t`, lane `r` (bytes `4r..4r + 4`) holds values `8t..8t + 4`
//!   of row `r` in its low nibbles and `8t + 4..8t + 8` in its high ones;
//! - the 6-bit scales, `[8][16]` bytes, then the 6-bit minima, `[8][16]` bytes;
//! - `d`, then `dmin`, 16 f16 each.
//!
//! That is 148 bytes per row and super-block against Q4_K's 144 (the scales unpacked to a byte
//! each). The values and the formula are Q4_K's ([`super::kquants`]): against the input quantized
//! per 256 values (Q8_K), a row is `Σ_s d·d_x·Σ_j sc_j·Σ u·q_x − dmin·d_x·Σ_j m_j·Σ q_x`, equal
//! to the row's Q4_K product to f32 rounding. [`matvec_naive`] (dequantized) and
//! [`matvec_quantized_naive`] (the integer formula, scalar: the portable path) are the references.

use super::kquants::{scales_mins, Q4K_BLOCK_BYTES, Q8K};
use super::{f16_at, QuantInput, QK_K};

/// Rows per group.
pub const ROWS: usize = 16;

/// Bytes of one super-block of a group of 16 rows.
pub const SB_BYTES: usize = 2048 + 128 + 128 + 32 + 32;

/// Bytes per row and super-block (a group's super-block over its 16 rows).
pub const ROW_SB_BYTES: usize = SB_BYTES / ROWS;

/// Offsets in a super-block: the scales, the minima, `d`, `dmin`.
pub(super) const SCALES: usize = 2048;
pub(super) const MINS: usize = 2048 + 128;
pub(super) const D: usize = 2048 + 256;
pub(super) const DMIN: usize = 2048 + 256 + 32;

/// Repack `w`, `rows` Q4_K rows of `cols` values (`rows` a multiple of 16, `cols` of 256).
pub fn pack(w: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let supers = check_shape(w.len(), rows, cols);
    let len = rows / ROWS * supers * SB_BYTES;
    let mut out = Vec::with_capacity(len);
    crate::alloc::advise_huge_pages(&mut out);
    out.resize(len, 0u8);
    for (group, stored) in out
        .chunks_exact_mut(supers * SB_BYTES)
        .zip(w.chunks_exact(ROWS * supers * Q4K_BLOCK_BYTES))
    {
        pack_group(stored, supers, group);
    }
    out
}

/// Bytes of the repacked `[rows, cols]` matrix ([`pack`]'s length; more than stored).
pub fn packed_len(rows: usize, cols: usize) -> usize {
    rows / ROWS * (cols / QK_K) * SB_BYTES
}

/// [`pack`] in place: `buf` holds the stored rows and is left holding the same bytes as `pack`
/// returns, grown to [`packed_len`] (without a new allocation when its capacity allows: reserve
/// it before reading the rows in). A repacked group is larger than stored, so the groups are
/// repacked from the last one down: group `g`'s repacked bytes start at or after its stored
/// ones and overwrite only itself (copied to a one-group scratch first) and groups above it,
/// already repacked into their final place.
pub fn pack_in_place(buf: &mut Vec<u8>, rows: usize, cols: usize) {
    let supers = check_shape(buf.len(), rows, cols);
    let (stored_group, packed_group) = (ROWS * supers * Q4K_BLOCK_BYTES, supers * SB_BYTES);
    buf.resize(packed_len(rows, cols), 0u8);
    let mut scratch = vec![0u8; stored_group];
    for g in (0..rows / ROWS).rev() {
        scratch.copy_from_slice(&buf[g * stored_group..(g + 1) * stored_group]);
        pack_group(
            &scratch,
            supers,
            &mut buf[g * packed_group..(g + 1) * packed_group],
        );
    }
}

/// The super-blocks per row of a `[rows, cols]` Q4_K matrix of `len` stored bytes.
///
/// # Panics
/// When the shape is not whole groups of whole super-blocks in `len` bytes.
fn check_shape(len: usize, rows: usize, cols: usize) -> usize {
    assert!(
        rows.is_multiple_of(ROWS)
            && cols.is_multiple_of(QK_K)
            && len == rows * cols / QK_K * Q4K_BLOCK_BYTES,
        "pack: {len} bytes for [{rows}, {cols}] Q4_K"
    );
    cols / QK_K
}

/// One group: `stored`, 16 rows of `supers` Q4_K super-blocks, repacked into `group`.
fn pack_group(stored: &[u8], supers: usize, group: &mut [u8]) {
    for (s, sb) in group.chunks_exact_mut(SB_BYTES).enumerate() {
        for r in 0..ROWS {
            let at = (r * supers + s) * Q4K_BLOCK_BYTES;
            let blk = &stored[at..at + Q4K_BLOCK_BYTES];
            let (sc, m) = scales_mins(&blk[4..16]);
            for j in 0..8 {
                sb[SCALES + 16 * j + r] = sc[j];
                sb[MINS + 16 * j + r] = m[j];
            }
            sb[D + 2 * r..D + 2 * r + 2].copy_from_slice(&blk[0..2]);
            sb[DMIN + 2 * r..DMIN + 2 * r + 2].copy_from_slice(&blk[2..4]);
            let u = values(blk);
            for t in 0..32 {
                for b in 0..4 {
                    sb[64 * t + 4 * r + b] = u[8 * t + b] | (u[8 * t + 4 + b] << 4);
                }
            }
        }
    }
}

/// The 256 values of a Q4_K super-block in order: chunk `c` of 64 holds values `64c..64c + 32`
/// in the low nibbles of its 32 bytes and `64c + 32..64c + 64` in the high ones.
fn values(blk: &[u8]) -> [u8; QK_K] {
    let mut u = [0u8; QK_K];
    for (qs, u) in blk[16..144].chunks_exact(32).zip(u.chunks_exact_mut(64)) {
        let (lo, hi) = u.split_at_mut(32);
        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
            *l = b & 0x0F;
            *h = b >> 4;
        }
    }
    u
}

/// Super-block `s` of row `r` of a packed group: `d`, `dmin`, the scales, the minima and the
/// values in order.
pub(super) struct RowBlock {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; 8],
    pub m: [u8; 8],
    pub u: [u8; QK_K],
}

/// Super-block `s` of row `r` (< 16) of the group `group` (`supers` super-blocks).
pub(super) fn row_block(group: &[u8], r: usize, s: usize) -> RowBlock {
    let sb = &group[s * SB_BYTES..(s + 1) * SB_BYTES];
    let mut u = [0u8; QK_K];
    for t in 0..32 {
        for b in 0..4 {
            let byte = sb[64 * t + 4 * r + b];
            u[8 * t + b] = byte & 0x0F;
            u[8 * t + 4 + b] = byte >> 4;
        }
    }
    RowBlock {
        d: f16_at(sb, D + 2 * r),
        dmin: f16_at(sb, DMIN + 2 * r),
        sc: std::array::from_fn(|j| sb[SCALES + 16 * j + r]),
        m: std::array::from_fn(|j| sb[MINS + 16 * j + r]),
        u,
    }
}

/// Row `r` of a packed matrix of `cols` values, dequantized: `d·sc_j·u − dmin·m_j`.
pub fn dequantize_row(packed: &[u8], cols: usize, r: usize) -> Vec<f32> {
    let supers = cols / QK_K;
    let group = &packed[r / ROWS * supers * SB_BYTES..(r / ROWS + 1) * supers * SB_BYTES];
    let mut out = Vec::with_capacity(cols);
    for s in 0..supers {
        let b = row_block(group, r % ROWS, s);
        for (i, &u) in b.u.iter().enumerate() {
            let j = i / 32;
            out.push(b.d * f32::from(b.sc[j]) * f32::from(u) - b.dmin * f32::from(b.m[j]));
        }
    }
    out
}

/// `out = W·x` over packed rows, dequantized value by value (the exact product).
pub fn matvec_naive(packed: &[u8], x: &[f32], out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = dequantize_row(packed, x.len(), r)
            .iter()
            .zip(x)
            .map(|(w, x)| w * x)
            .sum();
    }
}

/// Packed rows against the input quantized per 256 values, the integer formula, scalar (the
/// reference of the optimized kernel, and its portable path).
pub fn matvec_quantized_naive(packed: &[u8], xi: &QuantInput, out: &mut [f32]) {
    let k = &xi.k;
    let supers = k.d.len();
    for (r, o) in out.iter_mut().enumerate() {
        let group = &packed[r / ROWS * supers * SB_BYTES..(r / ROWS + 1) * supers * SB_BYTES];
        let mut acc = 0f32;
        for s in 0..supers {
            let b = row_block(group, r % ROWS, s);
            let (mut sumi, mut summ) = (0i32, 0i32);
            for j in 0..8 {
                let dot: i32 = b.u[32 * j..32 * j + 32]
                    .iter()
                    .zip(&k.q[s * QK_K + 32 * j..s * QK_K + 32 * j + 32])
                    .map(|(&u, &q)| i32::from(u) * i32::from(q))
                    .sum();
                sumi += i32::from(b.sc[j]) * dot;
                summ += i32::from(b.m[j])
                    * (i32::from(k.bsums[s * 16 + 2 * j]) + i32::from(k.bsums[s * 16 + 2 * j + 1]));
            }
            acc += b.d * k.d[s] * sumi as f32 - b.dmin * k.d[s] * summ as f32;
        }
        *o = acc;
    }
}

/// Serial `out = W·x` over whole packed groups on the quantized input, with the best kernel for
/// this CPU.
pub(super) fn matvec_rows(packed: &[u8], xi: &QuantInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx512_vnni() && out.len().is_multiple_of(ROWS) {
            // SAFETY: the CPU has the features the function is compiled for (checked above); the
            // sizes are checked inside.
            unsafe { avx512::matvec(packed, &xi.k, out) };
            return;
        }
    }
    matvec_quantized_naive(packed, xi, out);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{D, DMIN, MINS, Q8K, ROWS, SB_BYTES, SCALES};
    use crate::kernels::QK_K;

    /// Whole groups of 16 rows against the Q8_K input, a row per lane. Per slot (64 bytes: 8
    /// values of 16 rows) the low and high nibbles, each `dpbusd` with four input bytes
    /// broadcast, in two chains (at most 4·15·128 per lane and slot, 4 slots per sub-block: <
    /// 2¹⁵ per chain); per sub-block the sum times the 16 scales (`mullo`, ≤ 63) and the minima
    /// times the input's 32-value sum; per super-block one conversion each and `d·d_x`,
    /// `dmin·d_x`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn matvec(packed: &[u8], k: &Q8K, out: &mut [f32]) {
        let supers = k.d.len();
        assert!(
            out.len().is_multiple_of(ROWS)
                && k.q.len() == supers * QK_K
                && k.bsums.len() == supers * 16
                && packed.len() >= out.len() / ROWS * supers * SB_BYTES,
            "q4k_x16 matvec: sizes"
        );
        let low = _mm512_set1_epi8(0x0F);
        let xq = k.q.as_ptr();
        for (g, o) in out.chunks_exact_mut(ROWS).enumerate() {
            let group = packed.as_ptr().add(g * supers * SB_BYTES);
            let mut f = _mm512_setzero_ps();
            for s in 0..supers {
                let sb = group.add(s * SB_BYTES);
                let x = xq.add(s * QK_K);
                let (mut sup, mut mn) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for j in 0..8 {
                    let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for t in 4 * j..4 * j + 4 {
                        crate::kernels::prefetch_ahead(sb.add(64 * t));
                        let v = _mm512_loadu_si512(sb.add(64 * t) as *const __m512i);
                        let lo = _mm512_and_si512(v, low);
                        let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                        let x0 = _mm512_set1_epi32((x.add(8 * t) as *const i32).read_unaligned());
                        let x1 =
                            _mm512_set1_epi32((x.add(8 * t + 4) as *const i32).read_unaligned());
                        a = _mm512_dpbusd_epi32(a, lo, x0);
                        b = _mm512_dpbusd_epi32(b, hi, x1);
                    }
                    let sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        sb.add(SCALES + 16 * j) as *const __m128i
                    ));
                    sup = _mm512_add_epi32(sup, _mm512_mullo_epi32(_mm512_add_epi32(a, b), sc));
                    let m = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        sb.add(MINS + 16 * j) as *const __m128i
                    ));
                    let bsum = i32::from(*k.bsums.get_unchecked(s * 16 + 2 * j))
                        + i32::from(*k.bsums.get_unchecked(s * 16 + 2 * j + 1));
                    mn = _mm512_add_epi32(mn, _mm512_mullo_epi32(m, _mm512_set1_epi32(bsum)));
                }
                let dx = _mm512_set1_ps(*k.d.get_unchecked(s));
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(D) as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(DMIN) as *const __m256i));
                f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sup), _mm512_mul_ps(d, dx), f);
                f = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mn), _mm512_mul_ps(dmin, dx), f);
            }
            _mm512_storeu_ps(o.as_mut_ptr(), f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kquants::{dequantize_q4k, matvec_q4k_quantized_naive};
    use crate::testutil::{q8k_rounding_bound, quantized_bytes, rand_scaled as rand};
    use candle_core::quantized::GgmlDType;

    /// Packing keeps every value (each row dequantizes as its Q4_K row); the kernel (when the
    /// CPU has AVX-512 VNNI) and the portable path equal the Q4_K integer formula on the same
    /// input to f32 rounding, and the exact product within the input's rounding; extreme and
    /// zero rows stay finite.
    #[test]
    fn packed_q4k_matches_q4k() {
        for (rows, cols) in [(16, 256), (48, 768), (64, 256)] {
            let mut w = rand(rows * cols, cols as u64, 1.0);
            w[..cols].iter_mut().for_each(|v| *v *= 1e4);
            w[cols..2 * cols].fill(0.0);
            let bytes = quantized_bytes(&w, (rows, cols), GgmlDType::Q4K);
            let packed = pack(&bytes, rows, cols);
            assert_eq!(packed.len(), packed_len(rows, cols));
            let mut in_place = bytes.clone();
            pack_in_place(&mut in_place, rows, cols);
            assert!(in_place == packed, "[{rows}, {cols}]: in place");
            assert_eq!(packed.len(), rows * cols / QK_K * ROW_SB_BYTES);
            let row_bytes = cols / QK_K * Q4K_BLOCK_BYTES;
            for r in 0..rows {
                assert_eq!(
                    dequantize_row(&packed, cols, r),
                    dequantize_q4k(&bytes[r * row_bytes..(r + 1) * row_bytes]),
                    "row {r}"
                );
            }
            let x = rand(cols, 3, 2.0);
            let xi = QuantInput::new(&x);
            let mut want = vec![0f32; rows];
            matvec_q4k_quantized_naive(&bytes, &xi, &mut want);
            let mut exact = vec![0f32; rows];
            matvec_naive(&packed, &x, &mut exact);
            let mut portable = vec![0f32; rows];
            matvec_quantized_naive(&packed, &xi, &mut portable);
            let mut best = vec![0f32; rows];
            matvec_rows(&packed, &xi, &mut best);
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            for r in 0..rows {
                let rounding = q8k_rounding_bound(&dequantize_row(&packed, cols, r), &x);
                for (what, got) in [("portable", portable[r]), ("best", best[r])] {
                    assert!(got.is_finite(), "{what} row {r}");
                    assert!(
                        (got - want[r]).abs() <= 1e-5 * scale,
                        "{what} row {r}: {got} vs Q4_K {}",
                        want[r]
                    );
                    assert!(
                        (got - exact[r]).abs() <= rounding + 1e-5 * scale,
                        "{what} row {r}: {got} vs exact {} (input rounding up to {rounding})",
                        exact[r]
                    );
                }
            }
        }
    }
}
