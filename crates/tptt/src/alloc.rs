//! Process-wide allocator tuning for inference, for binaries to call once at start-up.
//!
//! A prompt's forward allocates and frees many tensors of a few megabytes each (activations of
//! every layer). glibc serves allocations above its mmap threshold (dynamic, from 128 KiB) with
//! fresh `mmap`s and gives them back on free, so every such tensor pays its page faults again and
//! the kernel zeroes its pages: measured here, 12 % of a 512-token prefill's CPU time in the
//! kernel and 8–15 % slower prefill. Raising the mmap threshold (and the trim threshold with it)
//! keeps those blocks in the heap for reuse; allocations above it (the KV ring, whole weight
//! files) still get their own mappings.

/// Allocations up to this size come from the heap.
pub const MMAP_THRESHOLD: usize = 64 << 20;
/// Free memory at the top of the heap beyond this is returned to the system.
pub const TRIM_THRESHOLD: usize = 256 << 20;

/// Apply the tuning (glibc on Linux; elsewhere a no-op). Returns whether it was applied.
pub fn tune_for_inference() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes allocator parameters; both values fit a C int.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// [`tune_for_inference`], and no `mmap` for allocations at all: training frees and allocates
/// tensors of hundreds of megabytes (attention scores of a long sequence, `[S, V]` logits) at
/// every layer, above any mmap threshold glibc accepts (32 MiB at most), so each one would be
/// mapped, faulted in and zeroed again. From the heap they are reused. Returns whether applied.
pub fn tune_for_training() -> bool {
    let inference = tune_for_inference();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes allocator parameters.
        inference && unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        inference
    }
}

/// Return the heap's free memory to the system (glibc's `malloc_trim`; elsewhere a no-op), so
/// that what the process holds afterwards is what it uses: the bench calls it before measuring
/// the peak memory of a decode, after measurements that cloned whole states. Returns whether
/// anything was released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Asks the kernel to back `v`'s allocation with transparent huge pages as its pages are first
/// touched (Linux's `MADV_HUGEPAGE` on the whole 2 MiB pages inside the allocation; elsewhere a
/// no-op). For weights, called before they are written: a decode streams every weight once per
/// token, and with 4 KiB pages that stream takes a TLB miss every 4 KiB (measured on the
/// 1B-class Q4_K model: about +6 % decode, paired runs). The contents are never changed, and
/// where the kernel has no huge page free it falls back to small ones. Returns whether the
/// advice was taken.
pub fn advise_huge_pages<T>(v: &mut Vec<T>) -> bool {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (p, n) = (
            v.as_mut_ptr() as usize,
            v.capacity() * std::mem::size_of::<T>(),
        );
        let (start, end) = (p.next_multiple_of(HUGE), (p + n) / HUGE * HUGE);
        if end <= start {
            return false;
        }
        // SAFETY: the range lies inside `v`'s allocation, which `v` owns; MADV_HUGEPAGE only
        // changes how its pages are mapped, never their contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = v;
        false
    }
}
