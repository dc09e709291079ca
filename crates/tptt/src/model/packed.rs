//! A quantized matrix repacked at load for CPUs with AVX-512 VNNI ([`Packed`]): Q4_K
//! (`kernels::q4k_x16`), Q4_1 and Q8_0 (`kernels::q32_x16`), 16 rows to a group, replacing the
//! stored copy; what a projection ([`super::layers::Matrix::Packed`]) and a tied vocabulary
//! ([`super::embed::Embedding::Packed`]) hold. Its kernels' view, its rows dequantized, and a
//! prompt's product through it.

use candle_core::Tensor;

use super::layers::out_dims;
use crate::error::Result;

/// The layouts a matrix is repacked into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Packing {
    /// Q4_K ([`crate::kernels::q4k_x16`]).
    Q4K,
    /// Q4_1 or Q8_0 ([`crate::kernels::q32_x16`]).
    Blocks32(crate::kernels::q32_x16::Format),
}

impl Packing {
    /// The layout for matrices of `dtype`, if there is one.
    fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use crate::kernels::q32_x16::Format;
        use candle_core::quantized::GgmlDType as G;
        match dtype {
            G::Q4K => Some(Packing::Q4K),
            G::Q4_1 => Some(Packing::Blocks32(Format::Q4_1)),
            G::Q8_0 => Some(Packing::Blocks32(Format::Q8_0)),
            _ => None,
        }
    }

    /// Values per block of a row (the row length must be a multiple).
    fn block(self) -> usize {
        match self {
            Packing::Q4K => crate::kernels::QK_K,
            Packing::Blocks32(_) => crate::kernels::Q8_0_BLOCK,
        }
    }
}

/// A quantized matrix repacked 16 rows to a group, for CPUs with AVX-512 VNNI: Q4_K
/// (`kernels::q4k_x16`), Q4_1 and Q8_0 (`kernels::q32_x16`). Decode and short prompts go
/// through its kernel; longer prompts through the 8-bit prompt kernels (`kernels::prompt_k`
/// for Q4_K, `kernels::prompt_q32` for Q4_1 and Q8_0).
#[derive(Debug)]
pub struct Packed {
    pub(super) packing: Packing,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) bytes: Vec<u8>,
    /// `[rows, cols]`.
    dims: [usize; 2],
}

impl Packed {
    /// Can `q` be repacked: Q4_K, Q4_1 or Q8_0 on the CPU, rows a multiple of 16, whole blocks?
    pub(super) fn takes(q: &candle_core::quantized::QTensor) -> bool {
        let dims = q.shape().dims();
        Packing::of(q.dtype()).is_some_and(|p| {
            q.device().is_cpu()
                && dims.len() == 2
                && dims[0].is_multiple_of(crate::kernels::q4k_x16::ROWS)
                && dims[1].is_multiple_of(p.block())
        })
    }

    /// Would a `[rows, cols]` matrix of `dtype` on the CPU be repacked ([`Packed::takes`]), and
    /// how many bytes does it take repacked (at least its stored size)?
    pub(crate) fn packed_len(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Option<usize> {
        let packing = Packing::of(dtype)?;
        if !rows.is_multiple_of(crate::kernels::q4k_x16::ROWS)
            || !cols.is_multiple_of(packing.block())
        {
            return None;
        }
        Some(match packing {
            Packing::Q4K => crate::kernels::q4k_x16::packed_len(rows, cols),
            Packing::Blocks32(_) => rows * cols / dtype.block_size() * dtype.type_size(),
        })
    }

    /// A `[rows, cols]` matrix of `dtype` from its stored bytes, repacked in place (the
    /// bytes' allocation becomes the matrix's: reserve [`Packed::packed_len`] before reading
    /// them in, and the load never holds the matrix twice).
    pub(crate) fn from_stored(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        mut bytes: Vec<u8>,
    ) -> Result<Self> {
        let stored = rows * cols / dtype.block_size() * dtype.type_size();
        let packing = Packing::of(dtype)
            .filter(|_| Self::packed_len(dtype, rows, cols).is_some() && bytes.len() == stored)
            .ok_or_else(|| {
                crate::error::Error::State(format!(
                    "cannot repack a [{rows}, {cols}] {dtype:?} matrix of {} bytes",
                    bytes.len()
                ))
            })?;
        match packing {
            Packing::Q4K => crate::kernels::q4k_x16::pack_in_place(&mut bytes, rows, cols),
            Packing::Blocks32(f) => {
                crate::kernels::q32_x16::pack_in_place(f, &mut bytes, rows, cols);
            }
        }
        Ok(Self {
            packing,
            rows,
            cols,
            bytes,
            dims: [rows, cols],
        })
    }

    /// The matrix's `[rows, cols]`.
    pub(crate) fn dims_ref(&self) -> &[usize] {
        &self.dims
    }

    /// Bytes held.
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// `q` (which [`Packed::takes`]) repacked: its bytes copied once, into an allocation of
    /// the repacked size, and repacked there ([`Packed::from_stored`]).
    pub(super) fn new(q: &candle_core::quantized::QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let data = q.data()?;
        let len = Self::packed_len(q.dtype(), rows, cols)
            .filter(|_| Self::takes(q))
            .ok_or_else(|| {
                crate::error::Error::State(format!(
                    "cannot repack a [{rows}, {cols}] {:?} matrix of {} bytes",
                    q.dtype(),
                    data.len()
                ))
            })?;
        let mut bytes = Vec::with_capacity(len.max(data.len()));
        crate::alloc::advise_huge_pages(&mut bytes);
        bytes.extend_from_slice(&data);
        Self::from_stored(q.dtype(), rows, cols, bytes)
    }

    /// The kernels' view of the matrix.
    pub(super) fn kernel_rows(&self) -> crate::kernels::Rows<'_> {
        match self.packing {
            Packing::Q4K => crate::kernels::Rows::Q4KX16(&self.bytes),
            Packing::Blocks32(f) => crate::kernels::Rows::X16(f, &self.bytes),
        }
    }

    /// Rows `start..start + len`, dequantized, row-major.
    pub(super) fn dequantize_rows(&self, start: usize, len: usize) -> Vec<f32> {
        match self.packing {
            Packing::Q4K => (start..start + len)
                .flat_map(|r| crate::kernels::q4k_x16::dequantize_row(&self.bytes, self.cols, r))
                .collect(),
            Packing::Blocks32(f) => {
                crate::kernels::q32_x16::dequantize_rows(f, &self.bytes, self.cols, start, len)
            }
        }
    }

    /// The matrix dequantized, `[rows, cols]` f32 on `device`.
    pub fn dequantize(&self, device: &candle_core::Device) -> Result<Tensor> {
        let v = self.dequantize_rows(0, self.rows);
        Ok(Tensor::from_vec(v, (self.rows, self.cols), device)?)
    }

    /// `x · selfᵀ` for a prompt (`x` on the CPU, f32): the 8-bit prompt kernels
    /// (`kernels::prompt_k` for Q4_K, `kernels::prompt_q32` for Q4_1 and Q8_0), the activations
    /// read where they are (copied only when not contiguous f32).
    pub(super) fn prompt_product(&self, x: &Tensor) -> Result<Tensor> {
        let xc = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let data = super::step::Data::of(&xc);
        let out = match self.packing {
            Packing::Q4K => crate::kernels::prompt_k::matmul_packed(
                &self.bytes,
                self.rows,
                self.cols,
                data.slice()?,
            ),
            Packing::Blocks32(f) => crate::kernels::prompt_q32::matmul(
                f,
                &self.bytes,
                self.rows,
                self.cols,
                data.slice()?,
            ),
        };
        Ok(Tensor::from_vec(out, out_dims(x, self.rows), x.device())?)
    }
}
