//! The element types a restored KV cache is built of: `f32`, or `f16` ([`KvFormat::F16`]).
//! A snapshot's KV tensors are decoded by their own dtype (f32 or f16 little-endian bytes,
//! borrowed from the file or its pages) into the buffer's type: copied when the two agree,
//! converted (f16 → f32 exactly, f32 → f16 rounding to the nearest half) when they do not, so a
//! snapshot of one format is never read as another.

use half::f16;

use super::{KvFormat, MAX_CARRIED_MAGNITUDE};

/// A stored KV element type in a snapshot: how its bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    F32,
    F16,
}

impl Stored {
    /// Bytes of one value.
    pub(super) fn size(self) -> usize {
        match self {
            Stored::F32 => 4,
            Stored::F16 => 2,
        }
    }

    /// The stored type of a safetensors dtype, if it can hold a KV cache.
    pub(super) fn of(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(Stored::F32),
            safetensors::Dtype::F16 => Some(Stored::F16),
            _ => None,
        }
    }

    /// The state's format for this element type.
    pub(super) fn format(self) -> KvFormat {
        match self {
            Stored::F32 => KvFormat::F32,
            Stored::F16 => KvFormat::F16,
        }
    }
}

/// A restored KV buffer's element type.
pub(super) trait KvElem: candle_core::WithDType + bytemuck::Pod {
    /// Append the values of little-endian `bytes` stored as `from`.
    fn extend_from_le(dst: &mut Vec<Self>, bytes: &[u8], from: Stored);
    /// Append f32 values.
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32]);
    /// Append f16 values.
    fn extend_from_f16(dst: &mut Vec<Self>, values: &[f16]);
    /// The value as f32 (for the finiteness check).
    fn as_f32(self) -> f32;
}

/// Decode little-endian `bytes` of `T`s: one copy when aligned on a little-endian machine.
fn extend_same<T: bytemuck::Pod>(dst: &mut Vec<T>, bytes: &[u8], decode: fn(&[u8]) -> T) {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(values) if cfg!(target_endian = "little") => dst.extend_from_slice(values),
        _ => dst.extend(bytes.chunks_exact(std::mem::size_of::<T>()).map(decode)),
    }
}

fn f32_le(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn f16_le(b: &[u8]) -> f16 {
    f16::from_le_bytes([b[0], b[1]])
}

impl KvElem for f32 {
    fn extend_from_le(dst: &mut Vec<Self>, bytes: &[u8], from: Stored) {
        match from {
            Stored::F32 => extend_same(dst, bytes, f32_le),
            Stored::F16 => dst.extend(bytes.chunks_exact(2).map(|b| f16_le(b).to_f32())),
        }
    }
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32]) {
        dst.extend_from_slice(values);
    }
    fn extend_from_f16(dst: &mut Vec<Self>, values: &[f16]) {
        dst.extend(values.iter().map(|x| x.to_f32()));
    }
    fn as_f32(self) -> f32 {
        self
    }
}

impl KvElem for f16 {
    fn extend_from_le(dst: &mut Vec<Self>, bytes: &[u8], from: Stored) {
        match from {
            Stored::F16 => extend_same(dst, bytes, f16_le),
            Stored::F32 => dst.extend(bytes.chunks_exact(4).map(|b| f16::from_f32(f32_le(b)))),
        }
    }
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32]) {
        dst.extend(values.iter().map(|&x| f16::from_f32(x)));
    }
    fn extend_from_f16(dst: &mut Vec<Self>, values: &[f16]) {
        dst.extend_from_slice(values);
    }
    fn as_f32(self) -> f32 {
        self.to_f32()
    }
}

/// The first value of `values` that is not finite or beyond ±[`MAX_CARRIED_MAGNITUDE`], as f32
/// with its index (a branch-free pass first: the common case is a clean cache).
pub(super) fn first_bad<T: KvElem>(values: &[T]) -> Option<(usize, f32)> {
    let fine = |x: &T| x.as_f32().abs() <= MAX_CARRIED_MAGNITUDE; // false for NaN
    if values.iter().fold(true, |ok, x| ok & fine(x)) {
        return None;
    }
    values
        .iter()
        .position(|x| !fine(x))
        .map(|j| (j, values[j].as_f32()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stored_type_decodes_into_each_buffer_type() {
        let xs = [1.0f32, -2.5, 65504.0, 1e-3, 0.1];
        let f32_bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let halves: Vec<f16> = xs.iter().map(|&x| f16::from_f32(x)).collect();
        let f16_bytes: Vec<u8> = halves.iter().flat_map(|x| x.to_le_bytes()).collect();
        // Same type: the exact values.
        let mut a: Vec<f32> = Vec::new();
        f32::extend_from_le(&mut a, &f32_bytes, Stored::F32);
        assert_eq!(a, xs);
        let mut b: Vec<f16> = Vec::new();
        f16::extend_from_le(&mut b, &f16_bytes, Stored::F16);
        assert_eq!(b, halves);
        // Across: f16 → f32 exact, f32 → f16 to the nearest half.
        let mut c: Vec<f32> = Vec::new();
        f32::extend_from_le(&mut c, &f16_bytes, Stored::F16);
        assert_eq!(c, halves.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
        let mut d: Vec<f16> = Vec::new();
        f16::extend_from_le(&mut d, &f32_bytes, Stored::F32);
        assert_eq!(d, halves);
        // Unaligned bytes decode the same.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&f32_bytes);
        let mut e: Vec<f32> = Vec::new();
        f32::extend_from_le(&mut e, &shifted[1..], Stored::F32);
        assert_eq!(e, xs);
    }

    #[test]
    fn non_finite_halves_are_found() {
        let mut v = vec![f16::from_f32(1.0); 9];
        assert_eq!(first_bad(&v), None);
        v[7] = f16::INFINITY;
        assert_eq!(first_bad(&v).map(|(j, _)| j), Some(7));
        v[3] = f16::NAN;
        assert_eq!(first_bad(&v).map(|(j, _)| j), Some(3));
    }
}
