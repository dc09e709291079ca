//! The per-conversation [`State`]: what a conversation accumulates besides the weights (KV
//! window, the linear branch's carries, position), and its conversion to and from a flat map of
//! named tensors for snapshots (the engine adds the file format and metadata).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::linear::{CarryMode, LinearCarry, PrevToken};

/// Per-layer part of a [`State`].
#[derive(Debug)]
pub struct LayerState {
    /// Cached RoPE'd keys `[Hkv, capacity, D]`; the first `State::key_pos.len()` slots are valid.
    /// Written in place (`slice_set`), so a clone must deep-copy it.
    pub k: Option<Tensor>,
    /// Cached values, likewise.
    pub v: Option<Tensor>,
    /// The linear branch's carry.
    pub linear: LinearCarry,
}

impl Clone for LayerState {
    fn clone(&self) -> Self {
        // The KV buffers are mutated in place: share nothing with the clone.
        let deep = |t: &Option<Tensor>| t.as_ref().and_then(|t| t.copy().ok());
        Self { k: deep(&self.k), v: deep(&self.v), linear: self.linear.clone() }
    }
}

impl LayerState {
    /// The first `n` slots of the keys (`None` when empty).
    pub fn k_view(&self, n: usize) -> Result<Option<Tensor>> {
        Ok(match &self.k {
            Some(k) if n > 0 => Some(k.narrow(1, 0, n)?),
            _ => None,
        })
    }

    /// The first `n` slots of the values.
    pub fn v_view(&self, n: usize) -> Result<Option<Tensor>> {
        Ok(match &self.v {
            Some(v) if n > 0 => Some(v.narrow(1, 0, n)?),
            _ => None,
        })
    }

    /// Make room for `slots` KV slots: capacity doubles (bounded by the window), existing
    /// slots are copied over.
    pub fn ensure_capacity(&mut self, slots: usize, window: Option<usize>, kv_heads: usize, dim: usize, device: &Device) -> Result<()> {
        let cap = self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if slots <= cap {
            return Ok(());
        }
        let mut new_cap = (cap * 2).max(slots).max(16);
        if let Some(w) = window {
            new_cap = new_cap.min(w).max(slots);
        }
        let grow = |old: &Option<Tensor>| -> Result<Tensor> {
            let buf = Tensor::zeros((kv_heads, new_cap, dim), candle_core::DType::F32, device)?;
            if let Some(o) = old {
                buf.slice_set(&o.contiguous()?, 1, 0)?;
            }
            Ok(buf)
        };
        self.k = Some(grow(&self.k)?);
        self.v = Some(grow(&self.v)?);
        Ok(())
    }
}

/// Everything one conversation needs besides the weights.
#[derive(Debug, Clone)]
pub struct State {
    /// Tokens consumed so far (the next token's absolute position).
    pub pos: usize,
    /// Absolute position held by each valid KV slot (shared by all layers). In
    /// `CarryMode::Continue` slot = position mod window (a ring); in `Reference` the list is in
    /// position order.
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
            if let (Some(k), Some(v)) = (l.k_view(self.key_pos.len())?, l.v_view(self.key_pos.len())?) {
                m.insert(format!("layers.{i}.k"), k.to_device(&cpu)?.contiguous()?);
                m.insert(format!("layers.{i}.v"), v.to_device(&cpu)?.contiguous()?);
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
                    (Some(k.to_device(device)?.copy()?), Some(v.to_device(device)?.copy()?))
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
