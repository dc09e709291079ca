//! The per-conversation [`State`]: what a conversation accumulates besides the weights (KV
//! window, the linear branch's carries, position), and its conversion to and from a flat map of
//! named tensors for snapshots (the engine adds the file format and metadata).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::linear::{CarryMode, LinearCarry, PrevToken};

/// Per-layer part of a [`State`].
#[derive(Debug, Clone)]
pub struct LayerState {
    /// Cached RoPE'd keys `[Hkv, T, D]`.
    pub k: Option<Tensor>,
    /// Cached values `[Hkv, T, D]`.
    pub v: Option<Tensor>,
    /// The linear branch's carry.
    pub linear: LinearCarry,
}

/// Everything one conversation needs besides the weights.
#[derive(Debug, Clone)]
pub struct State {
    /// Tokens consumed so far (the next token's absolute position).
    pub pos: usize,
    /// Absolute positions of the cached keys (shared by all layers).
    pub key_pos: Vec<usize>,
    /// One entry per decoder layer.
    pub layers: Vec<LayerState>,
    /// How calls continue each other.
    pub mode: CarryMode,
    /// Softmax window `W` (None: unbounded).
    pub window: Option<usize>,
}



impl State {
    /// Number of cached softmax positions.
    pub fn kv_len(&self) -> usize {
        self.key_pos.len()
    }

    /// Bytes held by the state's tensors and vectors (KV window + linear carries).
    pub fn size_bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        self.layers
            .iter()
            .map(|l| {
                let kv = l.k.as_ref().map_or(0, |t| t.elem_count()) + l.v.as_ref().map_or(0, |t| t.elem_count());
                let lin = l.linear.state.len()
                    + l.linear.pool_k.iter().chain(&l.linear.pool_v).map(Vec::len).sum::<usize>()
                    + l.linear.prev.as_ref().map_or(0, |p| p.q.len() * 5);
                (kv + lin) * f
            })
            .sum::<usize>()
            + self.key_pos.len() * std::mem::size_of::<usize>()
    }

    /// Flatten into named f32/u32 tensors (CPU) for a snapshot.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let cpu = Device::Cpu;
        let mut m = HashMap::new();
        let kp: Vec<u32> = self.key_pos.iter().map(|&p| p as u32).collect();
        m.insert("key_pos".to_string(), Tensor::from_vec(kp.clone(), kp.len(), &cpu)?);
        for (i, l) in self.layers.iter().enumerate() {
            if let (Some(k), Some(v)) = (&l.k, &l.v) {
                m.insert(format!("layers.{i}.k"), k.to_device(&cpu)?);
                m.insert(format!("layers.{i}.v"), v.to_device(&cpu)?);
            }
            let c = &l.linear;
            m.insert(format!("layers.{i}.state"), Tensor::from_vec(c.state.clone(), c.state.len(), &cpu)?);
            for (name, rows) in [("pool_k", &c.pool_k), ("pool_v", &c.pool_v)] {
                if let Some(first) = rows.first() {
                    let flat: Vec<f32> = rows.concat();
                    m.insert(format!("layers.{i}.{name}"), Tensor::from_vec(flat, (rows.len(), first.len()), &cpu)?);
                }
            }
            if let Some(p) = &c.prev {
                let flat: Vec<f32> = [&p.q, &p.k, &p.v, &p.alpha, &p.beta].iter().flat_map(|x| x.iter().copied()).collect();
                m.insert(format!("layers.{i}.prev"), Tensor::from_vec(flat, (5, p.q.len()), &cpu)?);
            }
        }
        Ok(m)
    }

    /// Rebuild from [`State::to_tensors`] output. `heads`, `dim` and `num_layers` come from the
    /// model the state is restored onto; any disagreement is an error.
    pub fn from_tensors(
        t: &HashMap<String, Tensor>,
        num_layers: usize,
        heads: usize,
        dim: usize,
        pos: usize,
        mode: CarryMode,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: &str| t.get(name).ok_or_else(|| Error::State(format!("snapshot lacks tensor {name:?}")));
        let key_pos: Vec<usize> = get("key_pos")?.to_vec1::<u32>()?.into_iter().map(|p| p as usize).collect();
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let state: Vec<f32> = get(&format!("layers.{i}.state"))?.to_vec1()?;
            if state.len() != heads * dim * dim {
                return Err(Error::State(format!("layer {i}: recurrent state has {} values, model needs {}", state.len(), heads * dim * dim)));
            }
            let rows = |name: &str| -> Result<Vec<Vec<f32>>> {
                match t.get(&format!("layers.{i}.{name}")) {
                    Some(x) => Ok(x.to_vec2()?),
                    None => Ok(Vec::new()),
                }
            };
            let prev = match t.get(&format!("layers.{i}.prev")) {
                Some(x) => {
                    let r: Vec<Vec<f32>> = x.to_vec2()?;
                    if r.len() != 5 || r[0].len() != heads * dim {
                        return Err(Error::State(format!("layer {i}: order-2 buffer has the wrong shape")));
                    }
                    let mut it = r.into_iter();
                    let mut next = || it.next().unwrap_or_default();
                    Some(PrevToken { q: next(), k: next(), v: next(), alpha: next(), beta: next() })
                }
                None => None,
            };
            let (k, v) = match (t.get(&format!("layers.{i}.k")), t.get(&format!("layers.{i}.v"))) {
                (Some(k), Some(v)) => {
                    if k.dim(1)? != key_pos.len() || v.dims() != k.dims() || k.dim(2)? != dim {
                        return Err(Error::State(format!("layer {i}: KV cache shape {:?} does not match {} positions", k.dims(), key_pos.len())));
                    }
                    (Some(k.to_device(device)?), Some(v.to_device(device)?))
                }
                (None, None) if key_pos.is_empty() => (None, None),
                _ => return Err(Error::State(format!("layer {i}: KV cache missing"))),
            };
            layers.push(LayerState { k, v, linear: LinearCarry { state, pool_k: rows("pool_k")?, pool_v: rows("pool_v")?, prev } });
        }
        if t.contains_key(&format!("layers.{num_layers}.state")) {
            return Err(Error::State(format!("snapshot has more than {num_layers} layers")));
        }
        Ok(Self { pos, key_pos, layers, mode, window })
    }
}
