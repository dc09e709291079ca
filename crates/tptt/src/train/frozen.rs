//! `x · Wᵀ` with a frozen `W`, as one candle op whose backward gives only `∂x = g · W`.
//!
//! candle's backward of `matmul` computes the gradients of both operands; for a frozen weight
//! the second one (`xᵀ · g`, as many flops as the product itself, and a weight-sized buffer) is
//! thrown away. Training multiplies by seven frozen matrices per layer, so this op halves the
//! cost of their backward. [`frozen_matmul`]'s reference is `x.matmul(&w.t())`, which the test
//! compares it with (values and `∂x`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::Result;

/// The op: `w` is `[out, in]`.
#[derive(Debug, Clone)]
struct Frozen {
    w: Tensor,
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                Tensor::from_slice(&v[a..b], l.shape(), self.w.device())?
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "frozen matmul: a contiguous f32 input is needed".into(),
                ))
            }
        };
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.w)?))
    }
}

/// `x · Wᵀ` for `x: [S, in]` and a frozen `w: [out, in]` (CPU, f32); the gradient flows to `x`
/// only. On other devices, candle's matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.rank() != 2 {
        return Ok(x.matmul(&w.t()?)?);
    }
    Ok(x.contiguous()?.apply_op1(Frozen { w: w.clone() })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;
    use candle_core::{Device, Var};

    #[test]
    fn equals_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_vec(rand_vec(7 * 5, 1), (7, 5), &dev).expect("x");
        let w = Tensor::from_vec(rand_vec(3 * 5, 2), (3, 5), &dev).expect("w");
        let g = Tensor::from_vec(rand_vec(7 * 3, 3), (7, 3), &dev).expect("g");
        let fast = frozen_matmul(x.as_tensor(), &w).expect("op");
        let slow = x.as_tensor().matmul(&w.t().expect("t")).expect("matmul");
        let d = crate::testutil::max_diff;
        assert!(d(&fast, &slow) < 1e-6);
        let gf = (fast * &g)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("bwd");
        let gs = (slow * &g)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("bwd");
        assert!(
            d(
                gf.get(x.as_tensor()).expect("fast"),
                gs.get(x.as_tensor()).expect("slow")
            ) < 1e-6
        );
    }
}
