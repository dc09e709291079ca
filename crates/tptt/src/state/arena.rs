//! Every layer's KV buffers as views of one allocation (an *arena*), on transparent huge pages
//! where the kernel grants them ([`super::buffer::zeros`]).
//!
//! A decode step reads every layer's whole window once per token. A small model's per-layer
//! buffers hold no whole 2 MiB page (SmolLM2 at W = 8192 in 8 bits: 1.67 MB each), so, allocated
//! one by one, they stay on 4 KiB pages and that stream takes a TLB miss every 4 KiB. One
//! allocation for all layers gets huge pages whatever the model's size (measured on this 2-core
//! Xeon, SmolLM2's 30 layers of 8-bit KV at 8192 slots read by the decode attention: 12.8 → 15.9
//! GB/s, interleaved runs). A restore already reads a snapshot into one such buffer; growing a
//! cache ([`super::State::reserve_kv`]) and cloning a state use this module.

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::error::Result;

/// One layer's place in an arena: `heads` KV heads of `cap` slots of `width` elements each for
/// its keys and for its values, and the buffers (`[heads, n, width]`, `n ≤ cap`, of the arena's
/// dtype) whose contents go into its first `n` slots.
pub(super) struct Place<'a> {
    pub(super) heads: usize,
    pub(super) cap: usize,
    pub(super) width: usize,
    pub(super) keep: Option<(&'a Tensor, &'a Tensor)>,
}

/// The layers' keys and values (`[heads, cap, width]` each, contiguous), views of one zeroed
/// allocation of `dtype`, with what [`Place::keep`] holds copied in. `None` off the CPU (the
/// caller allocates layer by layer, as before).
pub(super) fn arena(
    places: &[Place<'_>],
    dtype: DType,
    device: &Device,
) -> Result<Option<Vec<(Tensor, Tensor)>>> {
    if !device.is_cpu() {
        return Ok(None);
    }
    let len = |p: &Place<'_>| 2 * p.heads * p.cap * p.width;
    let total: usize = places.iter().map(len).sum();
    let all = super::buffer::zeros(total, dtype, device)?;
    let mut offset = 0;
    let mut out = Vec::with_capacity(places.len());
    for p in places {
        let layer = all
            .narrow(0, offset, len(p))?
            .reshape((2, p.heads, p.cap, p.width))?;
        offset += len(p);
        let (k, v) = (layer.i(0)?, layer.i(1)?);
        if let Some((ok, ov)) = p.keep {
            k.slice_set(&ok.contiguous()?, 1, 0)?;
            v.slice_set(&ov.contiguous()?, 1, 0)?;
        }
        out.push((k, v));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
            .expect("values")
    }

    /// Layers of different heads and capacities get their own zeroed views, with the kept
    /// buffers in their first slots, in every dtype a KV cache uses; writing one layer's view
    /// changes neither another layer's nor the kept source.
    #[test]
    fn layers_get_their_own_views_with_the_kept_slots() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::U8] {
            let src = |heads: usize, n: usize, w: usize, from: u32| {
                Tensor::arange(from, from + (heads * n * w) as u32, &dev)
                    .and_then(|x| x.to_dtype(dtype)?.reshape((heads, n, w)))
                    .expect("source")
            };
            let (k0, v0) = (src(2, 3, 4, 1), src(2, 3, 4, 100));
            let places = [
                Place {
                    heads: 2,
                    cap: 5,
                    width: 4,
                    keep: Some((&k0, &v0)),
                },
                Place {
                    heads: 1,
                    cap: 7,
                    width: 4,
                    keep: None,
                },
            ];
            let bufs = arena(&places, dtype, &dev)
                .expect("arena")
                .expect("on the CPU");
            assert_eq!(bufs.len(), 2);
            let (k, v) = &bufs[0];
            assert_eq!(k.dims(), &[2, 5, 4]);
            assert!(k.is_contiguous() && v.is_contiguous());
            assert_eq!(
                values(&k.narrow(1, 0, 3).expect("kept")),
                values(&k0),
                "{dtype:?}"
            );
            assert_eq!(values(&v.narrow(1, 0, 3).expect("kept")), values(&v0));
            assert!(values(&k.narrow(1, 3, 2).expect("rest"))
                .iter()
                .all(|&x| x == 0.0));
            let (k1, v1) = &bufs[1];
            assert_eq!(k1.dims(), &[1, 7, 4]);
            assert!(values(k1).iter().chain(&values(v1)).all(|&x| x == 0.0));

            let ones = Tensor::ones((1, 7, 4), dtype, &dev).expect("ones");
            k1.slice_set(&ones, 0, 0).expect("write");
            assert!(
                values(v1).iter().all(|&x| x == 0.0),
                "{dtype:?}: values changed"
            );
            assert_eq!(values(&v.narrow(1, 0, 3).expect("kept")), values(&v0));
            assert!(values(&bufs[0].1.narrow(1, 3, 2).expect("rest"))
                .iter()
                .all(|&x| x == 0.0));
            let ones = Tensor::ones((2, 5, 4), dtype, &dev).expect("ones");
            k.slice_set(&ones, 0, 0).expect("write");
            assert_eq!(values(&k0)[0], 1.0, "{dtype:?}: the kept source changed");
        }
    }
}
