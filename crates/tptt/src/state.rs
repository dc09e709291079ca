//! The per-conversation [`State`]: what a conversation accumulates besides the weights (KV
//! window, the linear branch's carries, position), and its conversion to and from a flat map of
//! named tensors for snapshots (the engine adds the file format and metadata).
//!
//! Restoring (`state/restore.rs`) checks every value it reads against the model and the
//! invariants of the forward pass (window, key positions, shapes, finiteness; see
//! [`State::from_safetensors`]) and is built for speed: [`State::from_safetensors`] reads the little-endian bytes of a
//! (memory-mapped) snapshot straight into one KV allocation for all layers, sized to the capacity
//! the next decode step needs (so it does not reallocate) and, on Linux, marked for transparent
//! huge pages (faulting in hundreds of megabytes 4 KiB at a time costs more than the copy).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::linear::{CarryMode, LinearCarry};

mod arena;
mod buffer;
mod elem;
mod format;
mod paged;
mod restore;
pub(crate) use format::narrowed;
use format::widened;
pub use format::{KvChoice, KvFormat};
pub use paged::{KvPage, KvRef};

/// Largest softmax window `W` accepted anywhere it enters (a `--window` flag, a config's
/// `max_self_attn_length`, the app's settings, a snapshot): 2^20 positions, far beyond any
/// context the supported bases were trained on, yet small enough that a typo cannot ask for a
/// KV cache of terabytes.
pub const MAX_WINDOW: usize = 1 << 20;

/// Check a softmax window read from `field` (`--window`, `max_self_attn_length`, a snapshot's
/// `window`): between 1 and [`MAX_WINDOW`]. The error message names the field and the value.
pub fn validate_window(field: &str, window: usize) -> std::result::Result<usize, String> {
    if (1..=MAX_WINDOW).contains(&window) {
        Ok(window)
    } else {
        Err(format!(
            "{field} must be between 1 and {MAX_WINDOW} positions, got {window}"
        ))
    }
}

/// Per-layer part of a [`State`].
#[derive(Debug)]
pub struct LayerState {
    /// Cached RoPE'd keys `[Hkv, capacity, D]` in the state's [`KvFormat`]; the first
    /// `State::key_pos.len()` slots are valid. Written in place (`slice_set`), so a clone must
    /// deep-copy it. After a restore it is a view of one buffer shared by all layers' keys and
    /// values ([`State::from_safetensors`]).
    pub k: Option<Tensor>,
    /// Cached values, likewise.
    pub v: Option<Tensor>,
    /// The linear branch's carry.
    pub linear: LinearCarry,
}

impl LayerState {
    /// A copy that shares nothing with this layer (its KV buffers are mutated in place): just
    /// this layer's view is copied (`copy` would duplicate a restored state's whole shared
    /// buffer). A buffer that cannot be copied (a GPU out of memory) is an error, never a copy
    /// without its cache.
    pub fn try_clone(&self) -> Result<Self> {
        let deep = |t: &Option<Tensor>| t.as_ref().map(buffer::deep_copy).transpose();
        Ok(Self {
            k: deep(&self.k)?,
            v: deep(&self.v)?,
            linear: self.linear.clone(),
        })
    }

    /// The first `n` slots of the keys as f32 (`None` when empty): a view, or a converted copy
    /// of a compact cache.
    pub fn k_view(&self, n: usize) -> Result<Option<Tensor>> {
        view_f32(&self.k, n)
    }

    /// The first `n` slots of the values, likewise.
    pub fn v_view(&self, n: usize) -> Result<Option<Tensor>> {
        view_f32(&self.v, n)
    }

    /// The first `n` slots of the keys as stored (f32, f16 or 8-bit blocks; a view, `None` when
    /// empty): what a snapshot writes.
    pub fn k_stored(&self, n: usize) -> Result<Option<Tensor>> {
        view_stored(&self.k, n)
    }

    /// The first `n` slots of the values as stored, likewise.
    pub fn v_stored(&self, n: usize) -> Result<Option<Tensor>> {
        view_stored(&self.v, n)
    }

    /// Make room for `slots` KV slots: capacity doubles (bounded by the window), existing
    /// slots are copied over. A new cache is allocated in `format`; an existing one keeps its
    /// own.
    #[allow(clippy::too_many_arguments)]
    pub fn ensure_capacity(
        &mut self,
        slots: usize,
        window: Option<usize>,
        kv_heads: usize,
        dim: usize,
        format: KvFormat,
        device: &Device,
    ) -> Result<()> {
        let cap = self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if slots <= cap {
            return Ok(());
        }
        let new_cap = grown_capacity(cap, slots, window);
        let dtype = self.k.as_ref().map_or(format.dtype(), Tensor::dtype);
        let width = row_width_of(dtype, dim, device)?;
        let grow = |old: &Option<Tensor>| -> Result<Tensor> {
            let buf = buffer::zeros((kv_heads, new_cap, width), dtype, device)?;
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

/// The first `n` slots of a cache in its own dtype.
fn view_stored(t: &Option<Tensor>, n: usize) -> Result<Option<Tensor>> {
    Ok(match t {
        Some(t) if n > 0 => Some(t.narrow(1, 0, n)?),
        _ => None,
    })
}

/// The first `n` slots of a cache as f32.
fn view_f32(t: &Option<Tensor>, n: usize) -> Result<Option<Tensor>> {
    Ok(match t {
        Some(t) if n > 0 => Some(widened(&t.narrow(1, 0, n)?)?),
        _ => None,
    })
}

/// The capacity [`LayerState::ensure_capacity`] grows a cache of `cap` slots to when it must hold
/// `slots`: doubled (at least 16), bounded by the window.
fn grown_capacity(cap: usize, slots: usize, window: Option<usize>) -> usize {
    let new_cap = (cap * 2).max(slots).max(16);
    match window {
        Some(w) => new_cap.min(w).max(slots),
        None => new_cap,
    }
}

/// Largest magnitude a restored value (KV cache, recurrent state, pooled rows, order-2 buffer)
/// may have. Healthy values stay within a few thousand (keys and values are projections of a
/// normalized hidden state; the delta rule keeps its state of the order of the values); one of
/// 1e30 is finite yet overflows the first dot product it enters and turns every later logit
/// into NaN. Refusing such a snapshot costs at most a rebuild from the text.
pub const MAX_CARRIED_MAGNITUDE: f32 = 1e15;

/// Everything one conversation needs besides the weights. A copy ([`State::try_clone`]) shares
/// nothing with it: its KV buffers are copied into one allocation for all layers
/// (`state/arena.rs`).
#[derive(Debug)]
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
    /// How the KV cache is stored (buffers allocated from now on; [`State::set_kv_format`]
    /// converts the existing ones).
    pub kv_format: KvFormat,
}

/// The row width of KV buffers of `dtype` holding heads of `dim` values on `device`, refused with
/// the reason where their format cannot hold such heads there.
fn row_width_of(dtype: candle_core::DType, dim: usize, device: &Device) -> Result<usize> {
    let format = KvFormat::of_dtype(dtype)
        .ok_or_else(|| Error::State(format!("a KV buffer of {dtype:?} is in no KV format")))?;
    format
        .check(dim, device)
        .map_err(|why| Error::State(format!("KV cache: {why}")))?;
    Ok(format.row_width(dim))
}

/// The slots a layer's KV buffers hold (0 without any).
fn capacity(l: &LayerState) -> usize {
    l.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0))
}

/// The head size `D` of a KV buffer `[Hkv, slots, width]` as stored.
fn stored_dim(t: &Tensor) -> Result<usize> {
    let width = t.dim(2)?;
    KvFormat::of_dtype(t.dtype())
        .and_then(|f| f.row_dim(width))
        .ok_or_else(|| {
            Error::State(format!(
                "a KV buffer of {:?} rows of {width} is in no KV format",
                t.dtype()
            ))
        })
}

impl State {
    /// A copy that shares nothing with this state: a fork of the conversation. Its KV buffers
    /// are copied into one allocation for all layers where they can be (`state/arena.rs`);
    /// a buffer that cannot be copied is an error, never a fork without its cache.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            pos: self.pos,
            key_pos: self.key_pos.clone(),
            layers: self.cloned_layers()?,
            mode: self.mode,
            window: self.window,
            kv_format: self.kv_format,
        })
    }

    /// The layers, their KV buffers copied into one arena when every layer has both, of one
    /// dtype and of rank 3 on the CPU; else each layer copied on its own
    /// ([`LayerState::try_clone`]).
    fn cloned_layers(&self) -> Result<Vec<LayerState>> {
        let kv: Option<Vec<(&Tensor, &Tensor)>> = self
            .layers
            .iter()
            .map(|l| l.k.as_ref().zip(l.v.as_ref()))
            .collect();
        if let Some((kv, first)) = kv.as_ref().and_then(|kv| Some((kv, kv.first()?.0))) {
            let dtype = first.dtype();
            let places: Option<Vec<arena::Place<'_>>> = kv
                .iter()
                .map(|&(k, v)| match (k.dims(), v.dims()) {
                    (&[heads, cap, width], vd)
                        if vd == k.dims() && k.dtype() == dtype && v.dtype() == dtype =>
                    {
                        Some(arena::Place {
                            heads,
                            cap,
                            width,
                            keep: Some((k, v)),
                        })
                    }
                    _ => None,
                })
                .collect();
            if let Some(places) = places {
                // No arena off the CPU (`None`): each layer on its own below. An arena that
                // fails on the CPU is an error, not a reason to copy another way.
                if let Some(bufs) = arena::arena(&places, dtype, first.device())? {
                    return Ok(self
                        .layers
                        .iter()
                        .zip(bufs)
                        .map(|(l, (k, v))| LayerState {
                            k: Some(k),
                            v: Some(v),
                            linear: l.linear.clone(),
                        })
                        .collect());
                }
            }
        }
        self.layers.iter().map(LayerState::try_clone).collect()
    }

    /// Every layer's buffers converted to `format` into one arena (`state/arena.rs`), layer by
    /// layer (one layer's f32 copy at a time besides the old buffers and the new ones). `None`
    /// off the CPU. The state is not changed: the caller swaps the buffers in.
    fn converted_into_arena(&self, format: KvFormat) -> Result<Option<Vec<(Tensor, Tensor)>>> {
        let mut places = Vec::with_capacity(self.layers.len());
        let mut device = None;
        for l in &self.layers {
            let (Some(k), Some(_)) = (&l.k, &l.v) else {
                return Ok(None);
            };
            let (heads, cap, _) = k.dims3()?;
            device = Some(k.device().clone());
            places.push(arena::Place {
                heads,
                cap,
                width: format.row_width(stored_dim(k)?),
                keep: None,
            });
        }
        let Some(device) = device else {
            return Ok(None);
        };
        let Some(bufs) = arena::arena(&places, format.dtype(), &device)? else {
            return Ok(None);
        };
        for (l, (k, v)) in self.layers.iter().zip(&bufs) {
            for (old, new) in [(&l.k, k), (&l.v, v)] {
                if let Some(old) = old {
                    new.slice_set(&narrowed(&widened(old)?, format)?, 1, 0)?;
                }
            }
        }
        Ok(Some(bufs))
    }

    /// Makes room in every layer's KV buffers for `slots` slots (what the ring holds after a
    /// call: `min(pos, W)`). Where any layer has fewer, every layer's buffers are reallocated
    /// together, at the capacity [`LayerState::ensure_capacity`] would grow to (doubled, at
    /// least 16, bounded by the window), as views of one allocation (`state/arena.rs`), their
    /// slots copied over. `heads(i)` is layer `i`'s KV head count. Off the CPU, or with buffers
    /// of mixed types, each layer grows on its own as before. A forward calls it before its
    /// first layer, so the buffers, which outlive the call, are also not allocated between the
    /// call's activations.
    pub fn reserve_kv(
        &mut self,
        slots: usize,
        heads: impl Fn(usize) -> usize,
        dim: usize,
        device: &Device,
    ) -> Result<()> {
        if self.layers.iter().all(|l| capacity(l) >= slots) {
            return Ok(());
        }
        let dtype = self
            .layers
            .iter()
            .find_map(|l| l.k.as_ref().map(Tensor::dtype))
            .unwrap_or(self.kv_format.dtype());
        let uniform = self.layers.iter().all(|l| match (&l.k, &l.v) {
            (Some(k), Some(v)) => k.dtype() == dtype && v.dtype() == dtype,
            (None, None) => true,
            _ => false,
        });
        if !uniform || !device.is_cpu() {
            for (i, l) in self.layers.iter_mut().enumerate() {
                l.ensure_capacity(slots, self.window, heads(i), dim, self.kv_format, device)?;
            }
            return Ok(());
        }
        let width = row_width_of(dtype, dim, device)?;
        let largest = self.layers.iter().map(capacity).max().unwrap_or(0);
        let cap = grown_capacity(largest, slots, self.window).max(largest);
        let places: Vec<arena::Place<'_>> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| arena::Place {
                heads: heads(i),
                cap,
                width,
                keep: l.k.as_ref().zip(l.v.as_ref()),
            })
            .collect();
        let bufs = arena::arena(&places, dtype, device)?;
        drop(places);
        match bufs {
            Some(bufs) => {
                for (l, (k, v)) in self.layers.iter_mut().zip(bufs) {
                    l.k = Some(k);
                    l.v = Some(v);
                }
            }
            None => {
                for (i, l) in self.layers.iter_mut().enumerate() {
                    l.ensure_capacity(slots, self.window, heads(i), dim, self.kv_format, device)?;
                }
            }
        }
        Ok(())
    }

    /// Stores the KV cache in `format` from now on, converting what it holds (f32 → f16 rounds
    /// every value to the nearest half, → 8-bit quantizes each block of 32; f16 → f32 and
    /// 8-bit → f32 are exact, 8-bit → f16 rounds). Only a `CarryMode::Continue` state may be
    /// compact: the reference mode reproduces tptt 0.12.1's f32 cache. A format the cache's
    /// heads cannot use ([`KvFormat::check`]) is refused with the reason, and the state is left
    /// as it was.
    pub fn set_kv_format(&mut self, format: KvFormat) -> Result<()> {
        if format != KvFormat::F32 && self.mode == CarryMode::Reference {
            return Err(Error::State(format!(
                "a {} KV cache needs CarryMode::Continue: the reference mode keeps tptt 0.12.1's f32 cache",
                format.as_str()
            )));
        }
        // Check every buffer before converting any: a refusal leaves the state whole.
        let mut pending = 0;
        for l in &self.layers {
            for x in [&l.k, &l.v].into_iter().flatten() {
                if x.dtype() != format.dtype() {
                    format
                        .check(stored_dim(x)?, x.device())
                        .map_err(|why| Error::State(format!("KV cache: {why}")))?;
                    pending += 1;
                }
            }
        }
        if pending == 2 * self.layers.len() && pending > 0 {
            if let Some(bufs) = self.converted_into_arena(format)? {
                for (l, (k, v)) in self.layers.iter_mut().zip(bufs) {
                    l.k = Some(k);
                    l.v = Some(v);
                }
                self.kv_format = format;
                return Ok(());
            }
        }
        // Each buffer on its own (off the CPU, or some already in `format`): all converted
        // before any is replaced.
        let mut converted: Vec<(usize, usize, Tensor)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (j, t) in [&l.k, &l.v].into_iter().enumerate() {
                if let Some(x) = t.as_ref().filter(|x| x.dtype() != format.dtype()) {
                    converted.push((i, j, narrowed(&widened(x)?, format)?));
                }
            }
        }
        for (i, j, x) in converted {
            let l = &mut self.layers[i];
            *(if j == 0 { &mut l.k } else { &mut l.v }) = Some(x);
        }
        self.kv_format = format;
        Ok(())
    }

    /// Number of cached softmax positions.
    pub fn kv_len(&self) -> usize {
        self.key_pos.len()
    }

    /// Bytes held by the KV cache's buffers (their whole capacity, in their format).
    pub fn kv_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .map(|t| {
                t.as_ref()
                    .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
            })
            .sum()
    }

    /// Bytes held by the state's tensors and vectors (KV window + linear carries).
    pub fn size_bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let bytes = |t: &Option<Tensor>| {
            t.as_ref()
                .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
        };
        self.layers
            .iter()
            .map(|l| {
                let kv = bytes(&l.k) + bytes(&l.v);
                let lin = l.linear.state.len()
                    + l.linear
                        .pool_k
                        .iter()
                        .chain(&l.linear.pool_v)
                        .map(Vec::len)
                        .sum::<usize>()
                    + l.linear.prev.as_ref().map_or(0, |p| p.q.len() * 5);
                kv + lin * f
            })
            .sum::<usize>()
            + self.key_pos.len() * std::mem::size_of::<usize>()
    }

    /// Flatten into named tensors (CPU) for a snapshot: `key_pos` (u32), and per layer
    /// `layers.{i}.k`/`.v` (`[Hkv, kv_len, D]` in the state's [`KvFormat`], f32 or f16, or
    /// `[Hkv, kv_len, D/32·34]` u8 for the 8-bit blocks: views of
    /// the cache's valid slots, possibly not contiguous), and the f32 `.state`,
    /// `.pool_k`/`.pool_v` (rows) and `.prev` (`[5, H·D]`) where present.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let cpu = Device::Cpu;
        let mut m = HashMap::new();
        let kp: Vec<u32> = self.key_pos.iter().map(|&p| p as u32).collect();
        m.insert(
            "key_pos".to_string(),
            Tensor::from_vec(kp.clone(), kp.len(), &cpu)?,
        );
        for (i, l) in self.layers.iter().enumerate() {
            if let (Some(k), Some(v)) = (
                l.k_stored(self.key_pos.len())?,
                l.v_stored(self.key_pos.len())?,
            ) {
                // Views of the first slots (not copied): a snapshot writer reads their blocks.
                m.insert(format!("layers.{i}.k"), k.to_device(&cpu)?);
                m.insert(format!("layers.{i}.v"), v.to_device(&cpu)?);
            }
            let c = &l.linear;
            m.insert(
                format!("layers.{i}.state"),
                Tensor::from_vec(c.state.clone(), c.state.len(), &cpu)?,
            );
            for (name, rows) in [("pool_k", &c.pool_k), ("pool_v", &c.pool_v)] {
                if let Some(first) = rows.first() {
                    let flat: Vec<f32> = rows.concat();
                    m.insert(
                        format!("layers.{i}.{name}"),
                        Tensor::from_vec(flat, (rows.len(), first.len()), &cpu)?,
                    );
                }
            }
            if let Some(p) = &c.prev {
                let flat: Vec<f32> = [&p.q, &p.k, &p.v, &p.alpha, &p.beta]
                    .iter()
                    .flat_map(|x| x.iter().copied())
                    .collect();
                m.insert(
                    format!("layers.{i}.prev"),
                    Tensor::from_vec(flat, (5, p.q.len()), &cpu)?,
                );
            }
        }
        Ok(m)
    }
}
