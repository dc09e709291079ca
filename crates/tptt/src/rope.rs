//! Rotary position embeddings (rotate-half layout, as transformers' Llama/Mistral/Qwen2).
//!
//! Frequencies are computed like transformers (`inv_freq` in f32, Llama-3 scaling applied to it),
//! but the angle `position · inv_freq` is formed in f64 for each position on demand, so there is
//! no table and positions far past `max_position_embeddings` stay exact.

use candle_core::{Device, Tensor};

use crate::config::RopeScaling;
use crate::error::Result;

/// Per-model RoPE frequencies.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplier applied to positions (linear scaling).
    pos_scale: f64,
}

impl Rope {
    /// Frequencies for head dim `d`, base `theta` and a scaling.
    pub fn new(d: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let base = theta as f32;
        // inv_freq = 1 / base^(2i/d), in float32 like transformers.
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        let mut pos_scale = 1.0;
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => pos_scale = 1.0 / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let smooth = (old / wavelen - low) / (high - low);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    // The reference's expression, as written there.
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    *f = if medium { smoothed } else { scaled };
                }
            }
        }
        Self {
            inv_freq,
            pos_scale,
        }
    }

    /// `(cos, sin)`, each `[positions.len(), D]` (the half-frequencies repeated twice).
    pub fn cos_sin(&self, positions: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half * 2);
        let mut sin = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            let p = p as f64 * self.pos_scale;
            for rep in 0..2 {
                let _ = rep;
                for &f in &self.inv_freq {
                    let a = p * f as f64;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, half * 2), device)?,
            Tensor::from_vec(sin, (n, half * 2), device)?,
        ))
    }
}

impl Rope {
    /// `(cos, sin)` of one position, each `[D]` (as one row of [`Rope::cos_sin`]).
    pub fn cos_sin_one(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        let p = position as f64 * self.pos_scale;
        let (c, s): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|&f| {
                let a = p * f as f64;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        (
            [c.as_slice(), c.as_slice()].concat(),
            [s.as_slice(), s.as_slice()].concat(),
        )
    }
}

/// [`apply`] to one row of `heads` vectors of dim `D` in place: `x·cos + rotate_half(x)·sin`.
pub fn apply_one(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let d = cos.len();
    let half = d / 2;
    for v in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * cos[i] + -b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/// Apply RoPE to `x: [heads, S, D]` with `cos, sin: [S, D]`: `x·cos + rotate_half(x)·sin`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(2)?;
    let x1 = x.narrow(2, 0, d / 2)?;
    let x2 = x.narrow(2, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 2)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}
