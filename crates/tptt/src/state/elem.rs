//! The element types a restored KV cache is built of: `f32`, `f16` ([`KvFormat::F16`]), or the
//! bytes of 8-bit blocks (`u8`, [`KvFormat::Q8_0`]). A snapshot's KV tensors are decoded by
//! their own stored type (f32, f16 or 8-bit little-endian bytes, borrowed from the file or its
//! pages), whole rows (one position of one KV head) at a time, into the buffer's type: copied
//! when the two agree, converted when they do not (f16 → f32 and 8-bit → f32 exactly, f32 → f16
//! to the nearest half, anything → 8-bit by quantizing each block of 32), so a snapshot of one
//! format is never read as another.

use half::f16;

use super::{KvFormat, MAX_CARRIED_MAGNITUDE};
use crate::kernels::kv::{dequantize_q8_0, quantize_q8_0};
use crate::kernels::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};

/// A stored KV element type in a snapshot: how its bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    F32,
    F16,
    /// 8-bit blocks (`u8` tensors whose rows are whole 34-byte blocks).
    Q8_0,
}

impl Stored {
    /// The stored type of a safetensors dtype, if it can hold a KV cache.
    pub(super) fn of(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(Stored::F32),
            safetensors::Dtype::F16 => Some(Stored::F16),
            safetensors::Dtype::U8 => Some(Stored::Q8_0),
            _ => None,
        }
    }

    /// The state's format for this element type.
    pub(super) fn format(self) -> KvFormat {
        match self {
            Stored::F32 => KvFormat::F32,
            Stored::F16 => KvFormat::F16,
            Stored::Q8_0 => KvFormat::Q8_0,
        }
    }

    /// Bytes of a row of `dim` values.
    pub(super) fn row_bytes(self, dim: usize) -> usize {
        self.format().row_bytes(dim)
    }

    /// The values of a stored row of `width` elements (a tensor's last extent), if whole.
    pub(super) fn row_dim(self, width: usize) -> Option<usize> {
        self.format().row_dim(width)
    }
}

/// A restored KV buffer's element type.
pub(super) trait KvElem: candle_core::WithDType + bytemuck::Pod {
    /// The format of a buffer of these elements.
    const FORMAT: KvFormat;
    /// Append the rows of `dim` values held by little-endian `bytes` stored as `from`.
    fn extend_rows(dst: &mut Vec<Self>, bytes: &[u8], from: Stored, dim: usize);
    /// Append rows of `dim` f32 values.
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32], dim: usize);
    /// The first element of `values` (rows of `dim` values in this type) that is not finite or
    /// beyond ±[`MAX_CARRIED_MAGNITUDE`], as f32 with its index (a branch-free pass first: the
    /// common case is a clean cache).
    fn first_bad(values: &[Self], dim: usize) -> Option<(usize, f32)>;
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

/// 8-bit rows as f32 values.
fn dequantized(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK];
    dequantize_q8_0(bytes, &mut out);
    out
}

/// The first value failing `fine`, with its index.
fn first_failing<T: Copy>(
    values: &[T],
    fine: impl Fn(T) -> bool,
    wide: impl Fn(T) -> f32,
) -> Option<(usize, f32)> {
    if values.iter().fold(true, |ok, &x| ok & fine(x)) {
        return None;
    }
    values
        .iter()
        .position(|&x| !fine(x))
        .map(|j| (j, wide(values[j])))
}

impl KvElem for f32 {
    const FORMAT: KvFormat = KvFormat::F32;
    fn extend_rows(dst: &mut Vec<Self>, bytes: &[u8], from: Stored, _dim: usize) {
        match from {
            Stored::F32 => extend_same(dst, bytes, f32_le),
            Stored::F16 => dst.extend(bytes.chunks_exact(2).map(|b| f16_le(b).to_f32())),
            Stored::Q8_0 => {
                let start = dst.len();
                dst.resize(start + bytes.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK, 0.0);
                dequantize_q8_0(bytes, &mut dst[start..]);
            }
        }
    }
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32], _dim: usize) {
        dst.extend_from_slice(values);
    }
    fn first_bad(values: &[Self], _dim: usize) -> Option<(usize, f32)> {
        first_failing(values, |x| x.abs() <= MAX_CARRIED_MAGNITUDE, |x| x) // false for NaN
    }
}

impl KvElem for f16 {
    const FORMAT: KvFormat = KvFormat::F16;
    fn extend_rows(dst: &mut Vec<Self>, bytes: &[u8], from: Stored, _dim: usize) {
        match from {
            Stored::F16 => extend_same(dst, bytes, f16_le),
            Stored::F32 => dst.extend(bytes.chunks_exact(4).map(|b| f16::from_f32(f32_le(b)))),
            Stored::Q8_0 => dst.extend(dequantized(bytes).into_iter().map(f16::from_f32)),
        }
    }
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32], _dim: usize) {
        dst.extend(values.iter().map(|&x| f16::from_f32(x)));
    }
    fn first_bad(values: &[Self], _dim: usize) -> Option<(usize, f32)> {
        first_failing(
            values,
            |x| x.to_f32().abs() <= MAX_CARRIED_MAGNITUDE,
            f16::to_f32,
        )
    }
}

/// The bytes of 8-bit blocks: rows of `dim` values (a multiple of 32) as 34-byte blocks.
impl KvElem for u8 {
    const FORMAT: KvFormat = KvFormat::Q8_0;
    fn extend_rows(dst: &mut Vec<Self>, bytes: &[u8], from: Stored, dim: usize) {
        match from {
            Stored::Q8_0 => dst.extend_from_slice(bytes),
            Stored::F32 | Stored::F16 => {
                let mut wide = Vec::new();
                f32::extend_rows(&mut wide, bytes, from, dim);
                quantize_q8_0(&wide, dst);
            }
        }
    }
    fn extend_from_f32(dst: &mut Vec<Self>, values: &[f32], _dim: usize) {
        quantize_q8_0(values, dst);
    }
    /// A block's values are its scale times bytes in ±127: the block is bad when its scale is
    /// not finite or 127 times it is beyond the bound (the index is the block's first value).
    fn first_bad(values: &[Self], _dim: usize) -> Option<(usize, f32)> {
        let scale = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let fine = |b: &[u8]| (scale(b) * 127.0).abs() <= MAX_CARRIED_MAGNITUDE;
        let blocks = values.chunks_exact(Q8_0_BLOCK_BYTES);
        if blocks.clone().fold(true, |ok, b| ok & fine(b)) {
            return None;
        }
        blocks
            .enumerate()
            .find(|(_, b)| !fine(b))
            .map(|(j, b)| (j * Q8_0_BLOCK, scale(b) * 127.0))
    }
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
        f32::extend_rows(&mut a, &f32_bytes, Stored::F32, 5);
        assert_eq!(a, xs);
        let mut b: Vec<f16> = Vec::new();
        f16::extend_rows(&mut b, &f16_bytes, Stored::F16, 5);
        assert_eq!(b, halves);
        // Across: f16 → f32 exact, f32 → f16 to the nearest half.
        let mut c: Vec<f32> = Vec::new();
        f32::extend_rows(&mut c, &f16_bytes, Stored::F16, 5);
        assert_eq!(c, halves.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
        let mut d: Vec<f16> = Vec::new();
        f16::extend_rows(&mut d, &f32_bytes, Stored::F32, 5);
        assert_eq!(d, halves);
        // Unaligned bytes decode the same.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&f32_bytes);
        let mut e: Vec<f32> = Vec::new();
        f32::extend_rows(&mut e, &shifted[1..], Stored::F32, 5);
        assert_eq!(e, xs);
    }

    #[test]
    fn eight_bit_rows_convert_both_ways() {
        let xs: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let f32_bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        // f32 → 8-bit: the blocks quantize_q8_0 writes.
        let mut q: Vec<u8> = Vec::new();
        u8::extend_rows(&mut q, &f32_bytes, Stored::F32, 32);
        let mut want = Vec::new();
        quantize_q8_0(&xs, &mut want);
        assert_eq!(q, want);
        // 8-bit → 8-bit is a copy; → f32 the blocks' values; → f16 those rounded.
        let mut same: Vec<u8> = Vec::new();
        u8::extend_rows(&mut same, &q, Stored::Q8_0, 32);
        assert_eq!(same, q);
        let mut wide: Vec<f32> = Vec::new();
        f32::extend_rows(&mut wide, &q, Stored::Q8_0, 32);
        assert_eq!(wide, dequantized(&q));
        let mut half_rows: Vec<f16> = Vec::new();
        f16::extend_rows(&mut half_rows, &q, Stored::Q8_0, 32);
        assert_eq!(
            half_rows,
            wide.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()
        );
        for (a, b) in xs.iter().zip(&wide) {
            assert!((a - b).abs() <= 0.2, "{a} vs {b}");
        }
        assert_eq!(u8::first_bad(&q, 32), None);
        // A block whose scale is infinite (or NaN) is found, by its first value.
        let mut bad = q.clone();
        bad[Q8_0_BLOCK_BYTES..Q8_0_BLOCK_BYTES + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        assert_eq!(u8::first_bad(&bad, 32).map(|(j, _)| j), Some(32));
        bad[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        assert_eq!(u8::first_bad(&bad, 32).map(|(j, _)| j), Some(0));
    }

    #[test]
    fn non_finite_halves_are_found() {
        let mut v = vec![f16::from_f32(1.0); 9];
        assert_eq!(f16::first_bad(&v, 9), None);
        v[7] = f16::INFINITY;
        assert_eq!(f16::first_bad(&v, 9).map(|(j, _)| j), Some(7));
        v[3] = f16::NAN;
        assert_eq!(f16::first_bad(&v, 9).map(|(j, _)| j), Some(3));
    }
}
