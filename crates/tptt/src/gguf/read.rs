//! Reading one GGUF tensor's quantized blocks straight into the storage the model keeps.
//!
//! candle's reader reads a tensor into a byte buffer and then copies it into a vector of typed
//! blocks: for a moment the tensor is in memory twice, and the largest tensor (a vocabulary of
//! 128k rows) sets the process's peak. Here the typed vector is allocated once and the file's
//! bytes are read into it. Float tensors (widened to f32 at load anyway) and other devices go
//! through candle's reader.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::TensorInfo;
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::Device;

/// The tensor `info` of a file whose tensor data starts at `data_offset`.
pub(crate) fn tensor<R: Read + Seek>(
    reader: &mut R,
    info: &TensorInfo,
    data_offset: u64,
    device: &Device,
) -> candle_core::Result<QTensor> {
    let elems = info.shape.elem_count();
    let block = info.ggml_dtype.block_size();
    if !device.is_cpu() || !elems.is_multiple_of(block) {
        return info.read(reader, data_offset, device);
    }
    let n = elems / block;
    let start = data_offset.saturating_add(info.offset);
    let storage: Box<dyn QuantizedType> = match info.ggml_dtype {
        GgmlDType::Q4_0 => blocks::<k_quants::BlockQ4_0, R>(reader, start, n)?,
        GgmlDType::Q4_1 => blocks::<k_quants::BlockQ4_1, R>(reader, start, n)?,
        GgmlDType::Q5_0 => blocks::<k_quants::BlockQ5_0, R>(reader, start, n)?,
        GgmlDType::Q5_1 => blocks::<k_quants::BlockQ5_1, R>(reader, start, n)?,
        GgmlDType::Q8_0 => blocks::<k_quants::BlockQ8_0, R>(reader, start, n)?,
        GgmlDType::Q8_1 => blocks::<k_quants::BlockQ8_1, R>(reader, start, n)?,
        GgmlDType::Q2K => blocks::<k_quants::BlockQ2K, R>(reader, start, n)?,
        GgmlDType::Q3K => blocks::<k_quants::BlockQ3K, R>(reader, start, n)?,
        GgmlDType::Q4K => blocks::<k_quants::BlockQ4K, R>(reader, start, n)?,
        GgmlDType::Q5K => blocks::<k_quants::BlockQ5K, R>(reader, start, n)?,
        GgmlDType::Q6K => blocks::<k_quants::BlockQ6K, R>(reader, start, n)?,
        GgmlDType::Q8K => blocks::<k_quants::BlockQ8K, R>(reader, start, n)?,
        _ => return info.read(reader, data_offset, device),
    };
    QTensor::new(QStorage::Cpu(storage), info.shape.clone())
}

/// `n` blocks of `T` read from byte `start`.
fn blocks<T, R>(reader: &mut R, start: u64, n: usize) -> candle_core::Result<Box<dyn QuantizedType>>
where
    T: GgmlType + Send + Sync + 'static,
    R: Read + Seek,
{
    let size = std::mem::size_of::<T>();
    if size != T::DTYPE.type_size() {
        candle_core::bail!(
            "{:?} blocks are {size} bytes in memory, {} in the file",
            T::DTYPE,
            T::DTYPE.type_size()
        );
    }
    let bytes = n
        .checked_mul(size)
        .ok_or_else(|| candle_core::Error::Msg(format!("{n} {:?} blocks overflow", T::DTYPE)))?;
    check_in_file(reader, start, bytes)?;
    let mut v: Vec<T> = Vec::with_capacity(n);
    crate::alloc::advise_huge_pages(&mut v);
    // SAFETY: the capacity holds `n` blocks (`bytes` bytes); they are zeroed before the slice is
    // formed, and GGML blocks are plain `repr(C)` structs of f16 / f32 scales and byte or i16
    // arrays (size checked above against GGML's), for which every bit pattern — zeros and
    // whatever the file holds — is a valid value.
    let buf = unsafe {
        std::ptr::write_bytes(v.as_mut_ptr().cast::<u8>(), 0, bytes);
        v.set_len(n);
        std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), bytes)
    };
    reader.seek(SeekFrom::Start(start))?;
    reader.read_exact(buf)?;
    Ok(Box::new(v))
}

/// Whether the file holds `bytes` bytes from `start`.
fn check_in_file<R: Seek>(reader: &mut R, start: u64, bytes: usize) -> candle_core::Result<()> {
    let file_len = reader.seek(SeekFrom::End(0))?;
    if (bytes as u64) > file_len.saturating_sub(start) {
        candle_core::bail!(
            "tensor needs {bytes} bytes at offset {start}, only {} remaining in file",
            file_len.saturating_sub(start)
        );
    }
    Ok(())
}

/// The stored bytes of the quantized tensor `info`, in a vector with room for `capacity` bytes
/// (marked for huge pages): what a repack in place starts from (`model::Packed::from_stored`).
pub(crate) fn stored_bytes<R: Read + Seek>(
    reader: &mut R,
    info: &TensorInfo,
    data_offset: u64,
    capacity: usize,
) -> candle_core::Result<Vec<u8>> {
    let elems = info.shape.elem_count();
    let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
    if !elems.is_multiple_of(block) {
        candle_core::bail!("{elems} values are not whole {:?} blocks", info.ggml_dtype);
    }
    let bytes = (elems / block).checked_mul(size).ok_or_else(|| {
        candle_core::Error::Msg(format!("{elems} {:?} values overflow", info.ggml_dtype))
    })?;
    let start = data_offset.saturating_add(info.offset);
    check_in_file(reader, start, bytes)?;
    let mut v: Vec<u8> = Vec::with_capacity(capacity.max(bytes));
    crate::alloc::advise_huge_pages(&mut v);
    v.resize(bytes, 0);
    reader.seek(SeekFrom::Start(start))?;
    reader.read_exact(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use candle_core::Tensor;

    /// Every block type reads back the bytes candle's own reader gives, and a file cut short
    /// is an error, not a panic.
    #[test]
    fn direct_read_equals_candles_reader() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (4, 256), &dev).expect("w");
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ];
        let qs: Vec<(String, QTensor)> = types
            .iter()
            .map(|&t| {
                (
                    format!("{t:?}"),
                    QTensor::quantize(&w, t).expect("quantize"),
                )
            })
            .collect();
        let refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let mut file = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut file, &[], &refs).expect("write");
        file.set_position(0);
        let content = gguf_file::Content::read(&mut file).expect("read");
        for (name, q) in &qs {
            let info = &content.tensor_infos[name];
            let got = tensor(&mut file, info, content.tensor_data_offset, &dev).expect("direct");
            assert_eq!(got.dtype(), q.dtype());
            assert_eq!(got.shape(), q.shape());
            assert_eq!(got.data().expect("data"), q.data().expect("data"), "{name}");
        }
        let bytes = file.into_inner();
        let by_offset = |last: bool| {
            let it = content.tensor_infos.values();
            if last {
                it.max_by_key(|i| i.offset)
            } else {
                it.min_by_key(|i| i.offset)
            }
            .expect("tensors")
        };
        let mut short = std::io::Cursor::new(bytes[..bytes.len() - 10].to_vec());
        let err = tensor(
            &mut short,
            by_offset(true),
            content.tensor_data_offset,
            &dev,
        )
        .expect_err("cut short");
        assert!(err.to_string().contains("remaining"), "{err}");
        assert!(tensor(
            &mut short,
            by_offset(false),
            content.tensor_data_offset,
            &dev
        )
        .is_ok());
    }
}
