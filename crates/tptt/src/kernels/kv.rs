//! Cached keys and values as the attention kernels read them: [`KvSlice`], the storage of a KV
//! buffer in its format (f32, or f16 — half the bytes to read at long history), and the way the
//! portable and prefill kernels get f32 out of it, a block at a time ([`KvSlice::f32_range`]):
//! borrowed when stored as f32, converted into the task's scratch (F16C when the CPU has it,
//! through `half`) when stored as f16. A block is small (it stays in L1/L2 while the heads that
//! share it read it), so the conversion costs a pass over data already in cache, and memory
//! traffic is that of the compact format. The AVX2 decode kernel reads f16 in place instead,
//! widening eight halves at a time inside its products (`kernels.rs`, `avx2::Lanes`).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// A KV buffer's values, in the format they are stored in.
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    /// 4 bytes a value.
    F32(&'a [f32]),
    /// 2 bytes a value.
    F16(&'a [f16]),
}

impl<'a> KvSlice<'a> {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(x) => x.len(),
            KvSlice::F16(x) => x.len(),
        }
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `from..to` as f32: the stored slice itself (f32), or converted into `scratch`
    /// (f16; `scratch` is resized to the range and every element overwritten).
    ///
    /// # Panics
    /// When the range is out of bounds, as slicing does.
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
}
