//! A prompt's gated MLP product `silu(gate) · up`, written over the gate's own buffer.
//!
//! With candle's ops a `[S, I]` prompt holds four such matrices at once (the gate, its SiLU,
//! the up projection, the product), each 3 MB for SmolLM2 at 512 tokens and 17 MB for a
//! 1B-class model; in place it holds two, and frees the up projection before the down one
//! runs. The arithmetic is candle's, value for value (`g / (1 + e^−g)`, then `· u`), and it runs
//! over rayon's threads (candle's elementwise ops run on one). [`silu_mul_naive`] is the
//! reference: candle's two ops.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// `g ← silu(g) · u`, element by element (`g` and `u` of one length).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul: lengths differ");
    let serial = |g: &mut [f32], u: &[f32]| {
        for (x, &y) in g.iter_mut().zip(u) {
            *x = *x / (1.0 + (-*x).exp()) * y;
        }
    };
    if g.len() >= 2 * CHUNK {
        g.par_chunks_mut(CHUNK)
            .zip(u.par_chunks(CHUNK))
            .for_each(|(g, u)| serial(g, u));
    } else {
        serial(g, u);
    }
}

/// The in-place op on contiguous f32 CPU storage.
struct SiluMul;

impl InplaceOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (dst, src) else {
            candle_core::bail!("silu-mul: f32 only")
        };
        let (Some((ga, gb)), Some((ua, ub))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous operands only")
        };
        if gb - ga != ub - ua {
            candle_core::bail!("silu-mul: {} and {} elements", gb - ga, ub - ua)
        }
        silu_mul(&mut g[ga..gb], &u[ua..ub]);
        Ok(())
    }
}

/// Whether [`silu_mul_in_place`] takes `gate` and `up`: f32 on the CPU, contiguous, one shape
/// (candle itself refuses operands sharing a buffer).
pub fn applies(gate: &Tensor, up: &Tensor) -> bool {
    gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape()
        && gate.is_contiguous()
        && up.is_contiguous()
}

/// `gate ← silu(gate) · up` in `gate`'s own buffer ([`applies`] must hold; `gate` must be a
/// tensor nothing else holds, such as a projection's fresh output).
pub fn silu_mul_in_place(gate: &Tensor, up: &Tensor) -> Result<()> {
    Ok(gate.inplace_op2(up, &SiluMul)?)
}

/// The reference: candle's SiLU, then candle's product.
pub fn silu_mul_naive(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;
    use candle_core::Device;

    /// In place equals candle's two ops bit for bit, below and above the parallel size, with
    /// large, tiny, zero and negative gates.
    #[test]
    fn in_place_equals_candles_ops() {
        let dev = Device::Cpu;
        for (rows, cols) in [(1, 7), (3, 1536), (40, 1637)] {
            let n = rows * cols;
            let mut g = rand_vec(n, 5);
            g.iter_mut().enumerate().for_each(|(i, x)| {
                *x *= match i % 5 {
                    0 => 30.0,
                    1 => 1e-6,
                    2 => 0.0,
                    _ => -4.0,
                }
            });
            let u = rand_vec(n, 6);
            let gate = Tensor::from_vec(g, (rows, cols), &dev).expect("gate");
            let up = Tensor::from_vec(u, (rows, cols), &dev).expect("up");
            let want = silu_mul_naive(&gate, &up).expect("naive");
            assert!(applies(&gate, &up));
            silu_mul_in_place(&gate, &up).expect("in place");
            let (a, b) = (
                gate.flatten_all()
                    .and_then(|x| x.to_vec1::<f32>())
                    .expect("got"),
                want.flatten_all()
                    .and_then(|x| x.to_vec1::<f32>())
                    .expect("want"),
            );
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{rows}×{cols} element {i}: {x} vs {y}"
                );
            }
        }
    }

    /// Operands it does not take are refused by [`applies`], and the op itself refuses
    /// mismatched lengths with an error, not a panic.
    #[test]
    fn refuses_what_it_does_not_take() {
        let dev = Device::Cpu;
        let g = Tensor::zeros((2, 3), DType::F32, &dev).expect("g");
        let u3 = Tensor::zeros((3, 3), DType::F32, &dev).expect("u");
        let half = Tensor::zeros((2, 3), DType::F16, &dev).expect("f16");
        let t = Tensor::zeros((3, 2), DType::F32, &dev)
            .and_then(|x| x.t())
            .expect("transposed");
        assert!(!applies(&g, &u3));
        assert!(!applies(&g, &half));
        assert!(!applies(&t, &g));
        assert!(silu_mul_in_place(&g, &u3).is_err());
        assert!(
            silu_mul_in_place(&g, &g).is_err(),
            "one buffer as both operands"
        );
    }
}
