//! Causal sliding-window softmax over attention scores as one candle op with its own backward:
//! the training path's attention (a `[.., S, S]` score tensor per head would otherwise go through
//! a mask add and the five generic ops of `candle_nn::ops::softmax`, each a pass over `H·S²`
//! floats forward and several backward).
//!
//! Row `r` of the scores is query `q = r mod S`; it sees keys `k ≤ q` with `q − k < W` (no
//! window: every `k ≤ q`). Forward: `y = softmax` over the visible keys, 0 elsewhere. Backward:
//! `∂x = y ⊙ (g − Σ g⊙y)` over the visible keys, 0 elsewhere. Rows run in parallel (rayon).
//! [`reference`] is the same computation from candle's generic ops (mask + softmax), the
//! specification the test holds this op to.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;

/// The op: `window` = `None` for plain causal attention.
#[derive(Debug, Clone, Copy)]
pub struct WindowSoftmax {
    /// Keys a query sees at most (itself included).
    pub window: Option<usize>,
}

impl WindowSoftmax {
    /// The visible keys of query `q`.
    fn range(&self, q: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| (q + 1).saturating_sub(w));
        lo..q + 1
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(
            "window softmax: a contiguous f32 tensor is needed".into(),
        )),
    }
}

impl CustomOp1 for WindowSoftmax {
    fn name(&self) -> &'static str {
        "window-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let dims = l.shape().dims();
        let n = *dims.last().unwrap_or(&0);
        if dims.len() < 2 || dims[dims.len() - 2] != n {
            return Err(candle_core::Error::Msg(format!(
                "window softmax: square [.., S, S] scores expected, got {dims:?}"
            )));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let vis = self.range(r % n);
                let m = xr[vis.clone()]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for k in vis.clone() {
                    let e = (xr[k] - m).exp();
                    yr[k] = e;
                    sum += e;
                }
                let inv = 1.0 / sum;
                yr[vis].iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = res.dim(D::Minus1)?;
        let y = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .enumerate()
            .for_each(|(r, (dr, (yr, gr)))| {
                let vis = self.range(r % n);
                let dot: f32 = vis.clone().map(|k| yr[k] * gr[k]).sum();
                for k in vis {
                    dr[k] = yr[k] * (gr[k] - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// The op on `scores: [.., S, S]` (CPU, f32).
pub fn window_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    Ok(scores.contiguous()?.apply_op1(WindowSoftmax { window })?)
}

/// The same from candle's generic ops: `softmax(scores + mask)`, the reference of the op.
pub fn reference(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let n = scores.dim(D::Minus1)?;
    let mut mask = vec![0f32; n * n];
    for q in 0..n {
        for k in 0..n {
            if k > q || window.is_some_and(|w| q - k >= w) {
                mask[q * n + k] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (n, n), scores.device())?.to_dtype(DType::F32)?;
    Ok(candle_nn::ops::softmax(
        &scores.broadcast_add(&mask)?,
        D::Minus1,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;
    use candle_core::{Device, Var};

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
        let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn forward_and_backward_equal_the_generic_ops() {
        let dev = Device::Cpu;
        for (heads, n, window) in [
            (3usize, 17usize, Some(5usize)),
            (2, 33, None),
            (1, 8, Some(1)),
            (4, 21, Some(40)),
        ] {
            let x = Var::from_vec(
                rand_vec(heads * n * n, n as u64)
                    .iter()
                    .map(|v| v * 4.0)
                    .collect(),
                (heads, n, n),
                &dev,
            )
            .expect("x");
            let g = Tensor::from_vec(rand_vec(heads * n * n, 99), (heads, n, n), &dev).expect("g");
            let fast = window_softmax(x.as_tensor(), window).expect("op");
            let slow = reference(x.as_tensor(), window).expect("reference");
            assert!(diff(&fast, &slow) < 1e-6, "forward n={n} w={window:?}");
            let gf = (fast * &g)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            let gs = (slow * &g)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("bwd");
            let (a, b) = (
                gf.get(x.as_tensor()).expect("grad"),
                gs.get(x.as_tensor()).expect("grad"),
            );
            assert!(
                diff(a, b) < 1e-5,
                "backward n={n} w={window:?}: {}",
                diff(a, b)
            );
        }
    }
}
