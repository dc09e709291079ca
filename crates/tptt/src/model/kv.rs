//! The softmax keys and values of a state in [`CarryMode::Continue`](crate::linear::CarryMode):
//! a ring of `W` slots shared by all layers, the key of position `p` in slot `p mod W`
//! (unbounded: slot `p`). [`KvRing`] owns that rule: which slot a position takes, the positions
//! the slots hold after a call ([`State::key_pos`]), and the writes into each layer's buffers,
//! so the tensor path and the fused step cannot disagree on it.
//!
//! Positions are contiguous from 0, so after `n` tokens the valid slots are `0..min(n, W)`; a
//! state that breaks this (a hole in the ring) is refused, never attended over.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::state::{KvFormat, LayerState, State};

/// The ring of a state (its window) for a model's key/value shape.
#[derive(Debug, Clone, Copy)]
pub(super) struct KvRing {
    window: Option<usize>,
    dim: usize,
    format: KvFormat,
}

impl KvRing {
    /// The ring of `state` for keys of `dim` per head (a layer's KV head count is that of the
    /// keys written: OpenELM's layers differ).
    pub(super) fn of(state: &State, dim: usize) -> Self {
        Self {
            window: state.window,
            dim,
            format: state.kv_format,
        }
    }

    /// The slot of position `p`.
    pub(super) fn slot(&self, p: usize) -> usize {
        self.window.map_or(p, |w| p % w)
    }

    /// One token at position `pos` after the slots `key_pos`: its slot, and the positions the
    /// slots hold once it is written.
    pub(super) fn after_one(&self, key_pos: &[usize], pos: usize) -> Result<(usize, Vec<usize>)> {
        let mut after = key_pos.to_vec();
        let slot = self.advance_one(&mut after, pos)?;
        Ok((slot, after))
    }

    /// [`KvRing::after_one`] in place: `key_pos` becomes the slots' positions once the token at
    /// `pos` is written; returns its slot.
    pub(super) fn advance_one(&self, key_pos: &mut Vec<usize>, pos: usize) -> Result<usize> {
        let slot = self.slot(pos);
        if slot < key_pos.len() {
            key_pos[slot] = pos;
        } else if slot == key_pos.len() {
            key_pos.push(pos);
        } else {
            return Err(hole());
        }
        Ok(slot)
    }

    /// The slots' positions after `s` tokens from position `pos` (the last `min(s, W)` of
    /// them written).
    pub(super) fn after_many(&self, key_pos: &mut Vec<usize>, pos: usize, s: usize) -> Result<()> {
        let keep = self.window.map_or(s, |w| w.min(s));
        let filled = self.window.map_or(pos + s, |w| w.min(pos + s));
        key_pos.resize(filled, usize::MAX);
        for t in s - keep..s {
            let p = pos + t;
            key_pos[self.slot(p)] = p;
        }
        if key_pos.contains(&usize::MAX) {
            return Err(hole());
        }
        Ok(())
    }

    /// Writes one token's key and value (`[Hkv, 1, D]`) into `slot` of a layer's buffers
    /// (grown as needed).
    pub(super) fn write_one(
        &self,
        ls: &mut LayerState,
        k: &Tensor,
        v: &Tensor,
        slot: usize,
        device: &Device,
    ) -> Result<()> {
        ls.ensure_capacity(
            slot + 1,
            self.window,
            k.dim(0)?,
            self.dim,
            self.format,
            device,
        )?;
        let (Some(kb), Some(vb)) = (&ls.k, &ls.v) else {
            return Err(Error::State("KV cache missing after allocation".into()));
        };
        kb.slice_set(&stored(k, kb)?, 1, slot)?;
        vb.slice_set(&stored(v, vb)?, 1, slot)?;
        Ok(())
    }

    /// Writes the keys and values (`[Hkv, S, D]`) of `S` tokens from position `pos`: the last
    /// `min(S, W)` of them, in runs of consecutive slots split where the ring wraps.
    pub(super) fn write_many(
        &self,
        ls: &mut LayerState,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        device: &Device,
    ) -> Result<()> {
        let s = k.dim(1)?;
        let keep = self.window.map_or(s, |w| w.min(s));
        let mut t = s - keep;
        while t < s {
            let slot = self.slot(pos + t);
            let run = self.window.map_or(s - t, |w| (w - slot).min(s - t));
            ls.ensure_capacity(
                slot + run,
                self.window,
                k.dim(0)?,
                self.dim,
                self.format,
                device,
            )?;
            if let (Some(kb), Some(vb)) = (&ls.k, &ls.v) {
                kb.slice_set(&stored(&k.narrow(1, t, run)?.contiguous()?, kb)?, 1, slot)?;
                vb.slice_set(&stored(&v.narrow(1, t, run)?.contiguous()?, vb)?, 1, slot)?;
            }
            t += run;
        }
        Ok(())
    }
}

/// Does a query at position `p` see the key at position `kp` under `window` (keys not later, and
/// fewer than `window` positions back)? The rule of every attention path.
pub(super) fn sees(kp: usize, p: usize, window: Option<usize>) -> bool {
    kp <= p && window.is_none_or(|w| p - kp < w)
}

/// `x` (f32 `[Hkv, S, D]`) in the format of the buffer it is written into.
fn stored(x: &Tensor, buffer: &Tensor) -> Result<Tensor> {
    let format = KvFormat::of_dtype(buffer.dtype()).ok_or_else(|| {
        Error::State(format!(
            "a KV buffer of {:?} is in no KV format",
            buffer.dtype()
        ))
    })?;
    crate::state::narrowed(x, format)
}

fn hole() -> Error {
    Error::State("KV ring has unfilled slots (positions not contiguous)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::{CarryMode, LinearCarry};

    fn state(window: Option<usize>) -> State {
        State {
            pos: 0,
            key_pos: Vec::new(),
            layers: vec![LayerState {
                k: None,
                v: None,
                linear: LinearCarry::grouped(1, 2),
            }],
            mode: CarryMode::Continue,
            window,
            kv_format: KvFormat::F32,
        }
    }

    /// Token by token and in calls of any length, the ring ends with the same slots holding
    /// the same positions and keys: position p in slot p mod W, the last W positions kept.
    #[test]
    fn one_by_one_equals_many() {
        let dev = Device::Cpu;
        for window in [Some(1), Some(3), Some(4), None] {
            for calls in [vec![1usize; 9], vec![2, 5, 2], vec![9], vec![3, 1, 1, 4]] {
                let mut a = state(window);
                let mut b = state(window);
                let ring = KvRing::of(&a, 2);
                for p in 0..9usize {
                    let kv =
                        Tensor::from_vec(vec![p as f32, -(p as f32)], (1, 1, 2), &dev).expect("kv");
                    let (slot, after) = ring.after_one(&a.key_pos, p).expect("one");
                    ring.write_one(&mut a.layers[0], &kv, &kv, slot, &dev)
                        .expect("write");
                    a.key_pos = after;
                }
                let mut pos = 0;
                for s in calls {
                    let vals: Vec<f32> = (pos..pos + s)
                        .flat_map(|p| [p as f32, -(p as f32)])
                        .collect();
                    let kv = Tensor::from_vec(vals, (1, s, 2), &dev).expect("kv");
                    ring.write_many(&mut b.layers[0], &kv, &kv, pos, &dev)
                        .expect("write");
                    ring.after_many(&mut b.key_pos, pos, s).expect("positions");
                    pos += s;
                }
                assert_eq!(a.key_pos, b.key_pos, "{window:?}");
                let n = a.key_pos.len();
                assert_eq!(n, window.map_or(9, |w| w.min(9)));
                for (slot, &p) in a.key_pos.iter().enumerate() {
                    assert_eq!(slot, ring.slot(p));
                    assert!(p + n >= 9, "only the last W positions are kept");
                }
                let view = |s: &State| {
                    s.layers[0]
                        .k_view(n)
                        .expect("view")
                        .expect("keys")
                        .flatten_all()
                        .expect("flat")
                        .to_vec1::<f32>()
                        .expect("vec")
                };
                assert_eq!(view(&a), view(&b), "{window:?}");
            }
        }
    }

    #[test]
    fn a_hole_in_the_ring_is_refused() {
        let ring = KvRing::of(&state(Some(8)), 2);
        // Slots 0..2 filled, the next token would go to slot 5.
        assert!(ring.after_one(&[0, 1], 5).is_err());
        let mut key_pos = vec![0, 1];
        // Two tokens from position 5 leave slots 2..5 empty.
        assert!(ring.after_many(&mut key_pos, 5, 2).is_err());
    }
}
