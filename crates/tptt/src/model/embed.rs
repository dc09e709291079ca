//! The token embedding: f32 rows, or — for a quantized (GGUF) base on the CPU — the matrix as
//! stored, each looked-up row dequantized on its own (a row's quantization blocks are its own
//! bytes). A quantized vocabulary is not widened to f32 at load: for Llama-3.2-1B's 128k × 2048
//! that would be 1 GB beside a 4-bit file of under 1 GB. A tied head shares the same quantized
//! matrix; where the decode kernels take Q4_K, Q4_1 and Q8_0 repacked 16 rows to a group
//! ([`crate::kernels::q4k_x16`], [`crate::kernels::q32_x16`]), a tied head of those types is
//! repacked and the lookups read their rows from the repacked bytes (one copy of the vocabulary
//! either way).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::packed::Packed;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub(super) enum Embedding {
    /// `[V, E]` f32 (or the device's dtype).
    Dense(Tensor),
    /// `[V, E]` quantized, on the CPU.
    Quant(Arc<QTensor>),
    /// `[V, E]` repacked 16 rows to a group, on the CPU, shared with the tied head.
    Packed(Arc<Packed>),
}

impl Embedding {
    /// Rows `ids` as `[S, E]` f32 (ids are checked by the caller against the vocabulary; one
    /// outside it is an error, not a panic).
    pub(super) fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => {
                let ids_t = Tensor::from_vec(ids.to_vec(), ids.len(), device)?;
                let rows = t.index_select(&ids_t, 0)?;
                // A vocabulary kept in half precision on the CPU gives f32 rows.
                Ok(match t.device().is_cpu() && t.dtype() != DType::F32 {
                    true => rows.to_dtype(DType::F32)?,
                    false => rows,
                })
            }
            Embedding::Quant(q) => {
                let rows = ids
                    .iter()
                    .map(|&id| self.quant_row(q, id as usize))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&rows, 0)?.to_device(device)?)
            }
            Embedding::Packed(p) => {
                let mut values = Vec::with_capacity(ids.len() * p.cols);
                for &id in ids {
                    values.extend(packed_row(p, id as usize)?);
                }
                Ok(Tensor::from_vec(values, (ids.len(), p.cols), device)?)
            }
        }
    }

    /// Row `id` as f32 values.
    pub(super) fn row(&self, id: usize) -> Result<Vec<f32>> {
        match self {
            Embedding::Dense(t) => {
                if id >= t.dim(0)? {
                    return Err(outside(id));
                }
                Ok(t.narrow(0, id, 1)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1()?)
            }
            Embedding::Quant(q) => Ok(self.quant_row(q, id)?.flatten_all()?.to_vec1()?),
            Embedding::Packed(p) => packed_row(p, id),
        }
    }

    fn quant_row(&self, q: &QTensor, id: usize) -> Result<Tensor> {
        let rows = q.shape().dims().first().copied().unwrap_or(0);
        if id >= rows {
            return Err(outside(id));
        }
        Ok(crate::gguf::split_rows(q, id, 1, &Device::Cpu)?.dequantize(&Device::Cpu)?)
    }

    /// The dense matrix, if it is one.
    pub(super) fn dense(&self) -> Option<&Tensor> {
        match self {
            Embedding::Dense(t) => Some(t),
            Embedding::Quant(_) | Embedding::Packed(_) => None,
        }
    }

    /// The whole matrix as f32 (training, which never runs on a quantized base in practice:
    /// [`super::Model::check_trainable`] refuses quantized projections first).
    pub(super) fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => Ok(t.clone()),
            Embedding::Quant(q) => Ok(q.dequantize(device)?),
            Embedding::Packed(p) => {
                let ids: Vec<u32> = (0..p.rows as u32).collect();
                self.rows(&ids, device)
            }
        }
    }

    /// Values held.
    pub(super) fn elem_count(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count(),
            Embedding::Quant(q) => q.shape().elem_count(),
            Embedding::Packed(p) => p.rows * p.cols,
        }
    }

    /// Do lookups give f32 rows?
    pub(super) fn is_f32(&self) -> bool {
        match self {
            Embedding::Dense(t) => t.dtype() == DType::F32 || t.device().is_cpu(),
            Embedding::Quant(_) | Embedding::Packed(_) => true,
        }
    }
}

/// Row `id` of a repacked vocabulary, dequantized.
fn packed_row(p: &Packed, id: usize) -> Result<Vec<f32>> {
    if id >= p.rows {
        return Err(outside(id));
    }
    Ok(p.dequantize_rows(id, 1))
}

fn outside(id: usize) -> Error {
    Error::Input(format!("token id {id} is outside the embedding"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Rows looked up from the quantized matrix equal the rows of its dequantized whole; an id
    /// past the end is an error.
    #[test]
    fn quantized_rows_equal_the_dequantized_matrix() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (50, 64), &dev).expect("w");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K] {
            let cols = if dtype == GgmlDType::Q4K { 256 } else { 64 };
            let w = if cols == 64 {
                w.clone()
            } else {
                Tensor::randn(0f32, 1.0, (50, cols), &dev).expect("w")
            };
            let q = Arc::new(QTensor::quantize(&w, dtype).expect("quantize"));
            let whole = q.dequantize(&dev).expect("deq");
            let (emb, dense) = (Embedding::Quant(q), Embedding::Dense(whole));
            let ids = [0u32, 49, 7, 7];
            let d = (emb.rows(&ids, &dev).expect("rows") - dense.rows(&ids, &dev).expect("dense"))
                .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(d, 0.0, "{dtype:?}");
            assert_eq!(emb.row(49).expect("row"), dense.row(49).expect("row"));
            assert!(emb.row(50).is_err() && dense.row(50).is_err());
            assert!(emb.rows(&[50], &dev).is_err());
        }
    }

    /// A Q4_K, Q4_1 or Q8_0 vocabulary repacked 16 rows to a group (a tied head the decode
    /// kernels take repacked) gives the rows of the matrix as stored, bit for bit, one by one,
    /// as a batch and as the whole matrix; an id past the end is an error.
    #[test]
    fn repacked_rows_equal_the_rows_as_stored() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 512), &dev).expect("w");
        for dtype in [GgmlDType::Q4K, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype).expect("quantize"));
            let packed = Embedding::Packed(Arc::new(Packed::new(&q).expect("repack")));
            let stored = Embedding::Quant(q.clone());
            for id in [0usize, 15, 16, 47] {
                assert_eq!(
                    packed.row(id).expect("row"),
                    stored.row(id).expect("row"),
                    "{dtype:?} {id}"
                );
            }
            let ids = [47u32, 0, 16, 16, 31];
            let got: Vec<f32> = packed
                .rows(&ids, &dev)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
                .expect("rows");
            let want: Vec<f32> = stored
                .rows(&ids, &dev)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
                .expect("rows");
            assert_eq!(got, want, "{dtype:?}");
            let whole = |e: &Embedding| -> Vec<f32> {
                e.to_dense(&dev)
                    .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
                    .expect("dense")
            };
            assert_eq!(whole(&packed), whole(&stored), "{dtype:?}");
            assert_eq!(packed.elem_count(), stored.elem_count());
            assert!(packed.is_f32() && packed.dense().is_none());
            assert!(packed.row(48).is_err() && packed.rows(&[3, 48], &dev).is_err());
        }
    }
}
