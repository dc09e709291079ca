//! Memory-bandwidth kernels for the bench's ceiling (STREAM-like): a read-only pass that sums
//! every 64-bit word of a buffer, and a read-modify-write pass that adds one to every word.
//! Eight independent accumulators keep the loads in flight; the same loop is compiled a second
//! time with AVX2 enabled and chosen at run time ([`super::has_avx2_fma`]), so the loads are as
//! wide as the engine's own kernels'. Each keeps its naive reference beside it (tests).

/// The wrapping sum of `words` (the read-only pass).
pub fn read_sum(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { read_sum_avx2(words) };
    }
    read_sum_lanes(words)
}

/// Adds one (wrapping) to every word of `words` (the read-modify-write pass).
pub fn add_one(words: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { add_one_avx2(words) };
    }
    add_one_lanes(words)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_sum_avx2(words: &[u64]) -> u64 {
    read_sum_lanes(words)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_one_avx2(words: &mut [u64]) {
    add_one_lanes(words)
}

#[inline(always)]
fn read_sum_lanes(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut blocks = words.chunks_exact(8);
    for b in &mut blocks {
        for (a, &w) in acc.iter_mut().zip(b) {
            *a = a.wrapping_add(w);
        }
    }
    let rest = blocks
        .remainder()
        .iter()
        .fold(0u64, |s, &w| s.wrapping_add(w));
    acc.iter().fold(rest, |s, &a| s.wrapping_add(a))
}

#[inline(always)]
fn add_one_lanes(words: &mut [u64]) {
    for w in words {
        *w = w.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_sum_naive(words: &[u64]) -> u64 {
        let mut s = 0u64;
        for &w in words {
            s = s.wrapping_add(w);
        }
        s
    }

    #[test]
    fn both_passes_match_their_naive_references_on_both_paths() {
        for portable in [false, true] {
            super::super::force_portable(portable);
            for n in [0usize, 1, 7, 8, 9, 63, 1000, 4099] {
                let words: Vec<u64> = (0..n as u64)
                    .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::MAX.rotate_left(i as u32))
                    .collect();
                assert_eq!(read_sum(&words), read_sum_naive(&words), "n {n}");
                let mut bumped = words.clone();
                add_one(&mut bumped);
                let want: Vec<u64> = words.iter().map(|w| w.wrapping_add(1)).collect();
                assert_eq!(bumped, want, "n {n}");
            }
        }
        super::super::force_portable(false);
    }
}
