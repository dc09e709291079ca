//! What the CPU can do, and the numeric building blocks every CPU kernel shares (the attention
//! kernels of `kernels`, the linear branch's fast scan):
//! - feature detection, in one place: [`has_avx2_fma`], [`has_avx2_fma_f16c`], [`has_avx512f`],
//!   [`has_avx512_vnni`] (checked at run
//!   time and cached by std, so one binary runs on any x86-64 and uses AVX2 where it exists);
//!   tests force the portable paths on an AVX2 machine with [`force_portable`], so both variants
//!   of every dispatched kernel are compared with their naive references;
//! - [`math`]: a libm-free `exp` (scalar and eight lanes), fused multiply-add, dot, axpy;
//! - [`gemm`]: a register-blocked f32 matrix product;
//! - [`stream`]: the memory-bandwidth passes of the bench's ceiling (read, read-modify-write).

pub mod gemm;
pub mod math;
pub mod stream;

#[cfg(test)]
static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tests: make [`has_avx2_fma`] and [`has_avx2_fma_f16c`] answer `false` (`on`) or the truth
/// again. Other tests running meanwhile may take the portable paths too; they check the same
/// contracts.
#[cfg(test)]
pub(crate) fn force_portable(on: bool) {
    FORCE_PORTABLE.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
fn forced_portable() -> bool {
    FORCE_PORTABLE.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(test))]
#[inline(always)]
fn forced_portable() -> bool {
    false
}

/// Whether the AVX2 + FMA variants may run.
#[inline(always)]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !forced_portable()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX2 + FMA + F16C variants (half-precision scales) may run.
#[inline(always)]
pub fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 F variants may run (the f32 matrix product's 16-lane tiles).
#[inline(always)]
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 (F, BW) + VNNI variants may run (the prompt kernels' 8-bit products).
#[inline(always)]
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
