//! How a state's softmax keys and values are stored ([`KvFormat`]: f32, f16 or 8-bit blocks),
//! what flags and settings ask for ([`KvChoice`]), and the conversions between a buffer in its
//! format and f32 values ([`widened`], [`narrowed`]).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// How a state stores its softmax keys and values (the recurrent memory is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum KvFormat {
    /// 4 bytes a value: exact, the reference's (parity tests, `CarryMode::Reference`).
    #[default]
    F32,
    /// 2 bytes a value (IEEE half): half the memory and half the bytes each decode step reads
    /// at long history; keys and values are rounded to 11 significant bits when written, and
    /// the attention kernels read them back to f32 (F16C where the CPU has it).
    F16,
    /// 8-bit blocks, llama.cpp's `q8_0` cache: per 32 values of a row an f16 scale and 32
    /// signed bytes (34 bytes, 1.06 a value; [`crate::kernels::kv::quantize_q8_0`]). Needs a
    /// head size that is a multiple of 32 and the CPU ([`KvFormat::check`]). The buffers are
    /// `u8` tensors `[Hkv, slots, D/32·34]`.
    Q8_0,
}

impl KvFormat {
    /// Every format, in the order settings list them.
    pub const ALL: [KvFormat; 3] = [KvFormat::F32, KvFormat::F16, KvFormat::Q8_0];

    /// The name settings, flags and snapshots use (`f32`, `f16`, `q8_0`).
    pub fn as_str(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::Q8_0 => "q8_0",
        }
    }

    /// The format named `name` (as [`KvFormat::as_str`] writes it), if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The buffers' element type (`u8` for the 8-bit blocks).
    pub fn dtype(self) -> DType {
        match self {
            KvFormat::F32 => DType::F32,
            KvFormat::F16 => DType::F16,
            KvFormat::Q8_0 => DType::U8,
        }
    }

    /// The format whose buffers have element type `dtype`, if any.
    pub fn of_dtype(dtype: DType) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.dtype() == dtype)
    }

    /// Elements of a buffer's row holding `dim` values (`dim`, or its 8-bit blocks' bytes).
    pub fn row_width(self, dim: usize) -> usize {
        match self {
            KvFormat::Q8_0 => crate::kernels::kv::q8_0_bytes(dim),
            _ => dim,
        }
    }

    /// The values of a buffer row of `width` elements, `None` when no row has that width.
    pub fn row_dim(self, width: usize) -> Option<usize> {
        use crate::kernels::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
        match self {
            KvFormat::Q8_0 => width
                .is_multiple_of(Q8_0_BLOCK_BYTES)
                .then_some(width / Q8_0_BLOCK_BYTES * Q8_0_BLOCK),
            _ => Some(width),
        }
    }

    /// Bytes of one row of `dim` values (one position of one KV head, keys or values).
    pub fn row_bytes(self, dim: usize) -> usize {
        self.row_width(dim) * self.dtype().size_in_bytes()
    }

    /// Whether a model with heads of `dim` values on `device` can keep its cache in this
    /// format; the error says why not.
    pub fn check(self, dim: usize, device: &Device) -> std::result::Result<(), String> {
        if self != KvFormat::Q8_0 {
            return Ok(());
        }
        if !dim.is_multiple_of(crate::kernels::Q8_0_BLOCK) || dim == 0 {
            return Err(format!(
                "the q8_0 KV cache stores blocks of 32 values of a head, and this model's heads have {dim}: choose f16 or f32"
            ));
        }
        if !device.is_cpu() {
            return Err(
                "the q8_0 KV cache is read by the CPU kernels; on a GPU choose f16 or f32".into(),
            );
        }
        Ok(())
    }

    /// The most compact format [`KvFormat::check`] accepts for heads of `dim` on `device`:
    /// 8-bit where it can be used, else f16 (what `auto` flags and settings give; its quality
    /// against f32 is held by `crates/engine/tests/kv_format.rs`).
    pub fn compact_for(dim: usize, device: &Device) -> Self {
        if KvFormat::Q8_0.check(dim, device).is_ok() {
            KvFormat::Q8_0
        } else {
            KvFormat::F16
        }
    }
}

/// A KV format as a setting or a flag asks for it: the most compact one the model can use
/// (`auto`: 8-bit where its heads are whole blocks and it runs on the CPU, else f16), or one
/// format, refused with the reason where the model cannot use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum KvChoice {
    /// [`KvFormat::compact_for`] the model.
    #[default]
    Auto,
    /// This format.
    Exactly(KvFormat),
}

impl KvChoice {
    /// Every choice, in the order settings list them.
    pub const ALL: [KvChoice; 4] = [
        KvChoice::Auto,
        KvChoice::Exactly(KvFormat::Q8_0),
        KvChoice::Exactly(KvFormat::F16),
        KvChoice::Exactly(KvFormat::F32),
    ];

    /// `auto`, or the format's name.
    pub fn as_str(self) -> &'static str {
        match self {
            KvChoice::Auto => "auto",
            KvChoice::Exactly(f) => f.as_str(),
        }
    }

    /// The choice named `name` (as [`KvChoice::as_str`] writes it), if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The format for a model with heads of `dim` values on `device`; an explicit format the
    /// model cannot use is refused with the reason ([`KvFormat::check`]).
    pub fn resolve(self, dim: usize, device: &Device) -> std::result::Result<KvFormat, String> {
        match self {
            KvChoice::Auto => Ok(KvFormat::compact_for(dim, device)),
            KvChoice::Exactly(f) => f.check(dim, device).map(|()| f),
        }
    }
}

/// A KV buffer (or a view of its slots, `[Hkv, slots, width]`) as f32 `[Hkv, slots, D]`.
pub(super) fn widened(view: &Tensor) -> Result<Tensor> {
    Ok(match view.dtype() {
        DType::F32 => view.clone(),
        DType::U8 => {
            let (h, n, width) = view.dims3()?;
            let dim = KvFormat::Q8_0.row_dim(width).ok_or_else(|| {
                Error::State(format!(
                    "an 8-bit KV row of {width} bytes is not whole blocks"
                ))
            })?;
            let bytes: Vec<u8> = view.flatten_all()?.to_vec1()?;
            let mut out = vec![0f32; h * n * dim];
            crate::kernels::kv::dequantize_q8_0(&bytes, &mut out);
            Tensor::from_vec(out, (h, n, dim), view.device())?
        }
        _ => view.to_dtype(DType::F32)?,
    })
}

/// f32 keys or values `[Hkv, S, D]` in `format`'s buffer element type (`[Hkv, S, width]`).
pub(crate) fn narrowed(x: &Tensor, format: KvFormat) -> Result<Tensor> {
    Ok(match format {
        KvFormat::Q8_0 => {
            let (h, s, dim) = x.dims3()?;
            format
                .check(dim, &Device::Cpu)
                .map_err(|why| Error::State(format!("KV cache: {why}")))?;
            let values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            // (A whole converted cache: on huge pages, as every KV buffer, `buffer`.)
            let mut bytes = super::buffer::huge_vec(crate::kernels::kv::q8_0_bytes(values.len()));
            crate::kernels::kv::quantize_q8_0(&values, &mut bytes);
            Tensor::from_vec(bytes, (h, s, format.row_width(dim)), x.device())?
        }
        _ if x.dtype() == format.dtype() => x.clone(),
        _ => x.to_dtype(format.dtype())?,
    })
}
