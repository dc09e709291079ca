//! The KV cache's buffers on the CPU, backed by transparent huge pages where the kernel allows
//! them ([`crate::alloc::advise_huge_pages`]): a new cache (zeros), a deep copy (a cloned state:
//! a fork, the bench's decode runs) and the one buffer a restore fills. A decode step reads the
//! whole window of every layer once per token; with 4 KiB pages that stream takes a TLB miss
//! every 4 KiB (measured on this 2-core Xeon, 8-bit KV of 30 layers × 3 heads × 32k slots read
//! once per token: 13.3–13.7 GB/s on small pages, 15.6–16.8 on huge ones). Other dtypes and
//! devices go through candle as before.

use candle_core::{CpuStorage, DType, Device, Shape, Storage, Tensor, WithDType};

use crate::error::Result;

/// An empty vector of `capacity` elements whose allocation is marked for huge pages (before
/// anything is written to it, so its pages are faulted in as huge ones).
pub(super) fn huge_vec<T>(capacity: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(capacity);
    crate::alloc::advise_huge_pages(&mut v);
    v
}

/// `n` zeros in a [`huge_vec`].
fn huge_zeros<T: Copy>(n: usize, zero: T) -> Vec<T> {
    let mut v = huge_vec(n);
    v.resize(n, zero);
    v
}

/// A copy of `src` in a [`huge_vec`].
fn huge_copy<T: Copy>(src: &[T]) -> Vec<T> {
    let mut v = huge_vec(src.len());
    v.extend_from_slice(src);
    v
}

/// A zeroed KV buffer of `shape` and `dtype` on `device`.
pub(super) fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let n = shape.elem_count();
    if !device.is_cpu() {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    Ok(match dtype {
        DType::F32 => Tensor::from_vec(huge_zeros(n, 0f32), shape, device)?,
        DType::F16 => Tensor::from_vec(huge_zeros(n, half::f16::ZERO), shape, device)?,
        DType::BF16 => Tensor::from_vec(huge_zeros(n, half::bf16::ZERO), shape, device)?,
        DType::U8 => Tensor::from_vec(huge_zeros(n, 0u8), shape, device)?,
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// A deep copy of `t` (contiguous, sharing nothing with it): of the view's elements only, so a
/// layer's view into a restored state's shared buffer copies that layer alone.
pub(super) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    /// `x` (the view's elements) in a [`huge_vec`], shaped as `t`.
    fn copied<T: WithDType>(x: &[T], t: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::from_vec(huge_copy(x), t.shape(), t.device())
    }
    let copied = {
        let (storage, layout) = t.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(c), Some((a, b))) => match c {
                CpuStorage::F32(x) => Some(copied(&x[a..b], t)?),
                CpuStorage::F16(x) => Some(copied(&x[a..b], t)?),
                CpuStorage::BF16(x) => Some(copied(&x[a..b], t)?),
                CpuStorage::U8(x) => Some(copied(&x[a..b], t)?),
                _ => None,
            },
            _ => None,
        }
    };
    match copied {
        Some(c) => Ok(c),
        None => Ok(t.force_contiguous()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zeros and copies hold what candle's would, in every dtype a KV cache uses, and a copy
    /// of a view shares nothing with its source (writing one leaves the other as it was).
    #[test]
    fn zeros_and_copies_equal_candles_and_share_nothing() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::U8] {
            let z = zeros((2, 5, 3), dtype, &dev).expect("zeros");
            assert_eq!(z.dims(), &[2, 5, 3]);
            assert_eq!(z.dtype(), dtype);
            let sum = z
                .to_dtype(DType::F32)
                .and_then(|x| x.abs()?.sum_all()?.to_scalar::<f32>());
            assert_eq!(sum.expect("sum"), 0.0);

            let all = Tensor::arange(0u32, 60, &dev)
                .and_then(|x| x.to_dtype(dtype)?.reshape((4, 5, 3)))
                .expect("source");
            // A view with an offset, as a restored state's layers are.
            let view = all.narrow(0, 1, 2).expect("view");
            let copy = deep_copy(&view).expect("copy");
            let as_f32 = |x: &Tensor| {
                x.to_dtype(DType::F32)
                    .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
                    .expect("values")
            };
            assert_eq!(as_f32(&copy), as_f32(&view), "{dtype:?}");
            let ones = Tensor::ones((1, 5, 3), dtype, &dev).expect("ones");
            copy.slice_set(&ones, 0, 0).expect("write");
            assert_eq!(as_f32(&view)[0], 15.0, "{dtype:?}: the source changed");
            assert_eq!(as_f32(&copy)[0], 1.0, "{dtype:?}");
        }
    }
}
