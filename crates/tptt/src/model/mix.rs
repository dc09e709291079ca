//! The Memory-as-Gate mix (SPEC §6) of the softmax branch's output `attn` and the linear
//! branch's `y` through the layer's shared `o_proj`, resolved once from the settings
//! ([`MagMix::of`]) and applied the same way by the tensor path, the fused step and training:
//! - `o((1−m)·attn + m·y)` when neither `cross_gate` nor `base_scale_attn` is set (the mix is
//!   then linear in the branch outputs: one `o` product);
//! - else `sw = (1−m)·o(attn)`, `lw = m·o(y)` (with `base_scale_attn`, `o(y)` rescaled by
//!   `rms(o(attn))` first), and `sw + lw`, plus `sw ⊙ lw` with `cross_gate`.
//!
//! With `m = 0` the linear branch is off ([`MagMix::branch_on`]): inference skips it.

use candle_core::{Tensor, D};

use crate::config::TpttSettings;
use crate::error::Result;

/// The mix of one model, from its TPTT settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MagMix {
    /// The memory's weight `m`.
    m: f32,
    /// Whether the two outputs go through `o` separately (`cross_gate` or `base_scale_attn`).
    separate: bool,
    cross_gate: bool,
    base_scale_attn: bool,
}

impl MagMix {
    /// The mix the settings describe.
    pub(crate) fn of(t: &TpttSettings) -> Self {
        Self {
            m: t.mag_weight,
            separate: t.cross_gate || t.base_scale_attn,
            cross_gate: t.cross_gate,
            base_scale_attn: t.base_scale_attn,
        }
    }

    /// Whether the linear branch contributes (`m ≠ 0`).
    pub(crate) fn branch_on(&self) -> bool {
        self.m != 0.0
    }

    /// The weights `(1−m, m)` as the reference computes them (in f64, then used in f32).
    fn weights(&self) -> (f64, f64) {
        ((1.0 - self.m) as f64, self.m as f64)
    }

    /// The mixed output `[S, E]` of `attn` and `y` (both `[S, H·D]`), `o` being the layer's
    /// output projection.
    pub(crate) fn tensors(
        &self,
        attn: &Tensor,
        y: &Tensor,
        o: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (wa, wl) = self.weights();
        if !self.separate {
            return o(&((attn * wa)? + (y * wl)?)?);
        }
        let o_base = o(attn)?; // [S, E]
        let mut o_lin = o(y)?;
        if self.base_scale_attn {
            let rms = (o_base.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
            o_lin = o_lin.broadcast_mul(&rms)?;
        }
        let sw = (&o_base * wa)?;
        let lw = (o_lin * wl)?;
        Ok(if self.cross_gate {
            ((&sw + &lw)? + (&sw * &lw)?)?
        } else {
            (sw + lw)?
        })
    }

    /// [`MagMix::tensors`] for one token on slices (the fused step): `o` multiplies a row.
    pub(crate) fn row(
        &self,
        attn: &[f32],
        y: &[f32],
        o: impl Fn(&[f32]) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let (wa, wl) = self.weights();
        let (wa, wl) = (wa as f32, wl as f32);
        if !self.separate {
            let mixed: Vec<f32> = attn.iter().zip(y).map(|(a, y)| a * wa + y * wl).collect();
            return o(&mixed);
        }
        let o_base = o(attn)?;
        let mut o_lin = o(y)?;
        if self.base_scale_attn {
            let rms =
                (o_base.iter().map(|x| x * x).sum::<f32>() / o_base.len() as f32 + 1e-5).sqrt();
            o_lin.iter_mut().for_each(|x| *x *= rms);
        }
        Ok(o_base
            .iter()
            .zip(&o_lin)
            .map(|(ob, ol)| {
                let (sw, lw) = (ob * wa, ol * wl);
                if self.cross_gate {
                    (sw + lw) + sw * lw
                } else {
                    sw + lw
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The slice form equals the tensor form for every combination of the flags.
    #[test]
    fn row_equals_tensors() {
        let dev = Device::Cpu;
        let (hd, e) = (8, 6);
        let attn: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.91).cos()).collect();
        let w = Tensor::from_vec(
            (0..e * hd)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0)
                .collect::<Vec<f32>>(),
            (e, hd),
            &dev,
        )
        .expect("w");
        let o_t = |x: &Tensor| -> Result<Tensor> { Ok(x.matmul(&w.t()?)?) };
        let o_r = |x: &[f32]| -> Result<Vec<f32>> {
            let t = Tensor::from_vec(x.to_vec(), (1, x.len()), &dev)?;
            Ok(o_t(&t)?.flatten_all()?.to_vec1::<f32>()?)
        };
        for (cross_gate, base_scale_attn) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let mut t = TpttSettings::injected("delta_rule", 0.3, "base").expect("settings");
            t.cross_gate = cross_gate;
            t.base_scale_attn = base_scale_attn;
            let mix = MagMix::of(&t);
            let at = Tensor::from_vec(attn.clone(), (1, hd), &dev).expect("attn");
            let yt = Tensor::from_vec(y.clone(), (1, hd), &dev).expect("y");
            let a = mix.tensors(&at, &yt, o_t).expect("tensors");
            let a = a
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec");
            let b = mix.row(&attn, &y, o_r).expect("row");
            for (x, z) in a.iter().zip(&b) {
                assert!(
                    (x - z).abs() < 1e-5,
                    "{cross_gate} {base_scale_attn}: {x} vs {z}"
                );
            }
        }
        assert!(
            !MagMix::of(&TpttSettings::injected("delta_rule", 0.0, "b").expect("s")).branch_on()
        );
    }
}
