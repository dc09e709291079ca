//! Restoring a [`State`] from named tensors ([`State::from_tensors`]) or a snapshot file read in
//! place ([`State::from_safetensors`]; `paged.rs` for one whose KV cache lies in pages): every
//! value read is checked against the model and the invariants of the forward pass (window, key
//! positions, shapes, finiteness), and the KV cache of every layer is copied once into one
//! allocation sized to the capacity the next decode step needs (on Linux marked for transparent
//! huge pages), in the snapshot's KV format (`elem.rs`).

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use safetensors::SafeTensors;

use super::elem::{KvElem, Stored};
use super::paged::{PagedSource, PagedValues};
use super::{grown_capacity, validate_window, KvFormat, LayerState, State, MAX_CARRIED_MAGNITUDE};
use crate::error::{Error, Result};
use crate::linear::{CarryMode, LinearCarry, PrevToken};

/// The query and KV heads of every layer of `base`.
pub(super) fn per_layer_heads(base: &crate::config::BaseConfig) -> (Vec<usize>, Vec<usize>) {
    (0..base.num_layers)
        .map(|i| {
            let l = base.layer(i);
            (l.num_heads, l.num_kv_heads)
        })
        .unzip()
}

/// KV slots to allocate for a restored cache of `n` positions: in `Continue` mode what the next
/// in-place decode write would grow it to (the full window once it has filled, since slot =
/// position mod W), so the first step after a restore does not reallocate; in `Reference` mode
/// exactly `n` (that mode concatenates instead of writing in place).
fn restored_capacity(n: usize, mode: CarryMode, window: Option<usize>) -> usize {
    match (mode, window) {
        (CarryMode::Reference, _) => n,
        (CarryMode::Continue, Some(w)) if n >= w => n,
        (CarryMode::Continue, _) => grown_capacity(n, n + 1, window),
    }
}

/// Check the positions a restored KV cache claims to hold against the invariants the forward
/// pass keeps (see [`State::key_pos`]), so that a snapshot whose checksum is right but whose
/// values are not is refused instead of reaching the ring's index arithmetic:
/// * `Continue` with window `W`: `min(pos, W)` positions, exactly the last ones, position `p`
///   in slot `p mod W`; without a window: positions `0..pos` in order;
/// * `Reference`: strictly increasing, each before `pos`, and with window `W` at most
///   `2W − 1` of them (the cache is cropped to its first `W − 1` before a call of at most `W`).
fn check_key_positions(
    key_pos: &[usize],
    pos: usize,
    mode: CarryMode,
    window: Option<usize>,
) -> Result<()> {
    let n = key_pos.len();
    let bad = |why: String| Err(Error::State(format!("key positions (key_pos): {why}")));
    let shown = window.map_or("no window".to_string(), |w| format!("a window of {w}"));
    match mode {
        CarryMode::Continue => {
            let want = window.map_or(pos, |w| w.min(pos));
            if n != want {
                return bad(format!(
                    "{n} cached positions after {pos} tokens with {shown}, which holds {want}"
                ));
            }
            let first = pos - want;
            for (slot, &p) in key_pos.iter().enumerate() {
                let in_slot = window.map_or(p == slot, |w| p % w == slot);
                if !(first..pos).contains(&p) || !in_slot {
                    return bad(format!(
                        "slot {slot} holds position {p}; after {pos} tokens with {shown} it holds one of the last {want} positions{}",
                        window.map_or(String::new(), |w| format!(" ≡ {slot} mod {w}"))
                    ));
                }
            }
        }
        CarryMode::Reference => {
            if let Some(w) = window {
                if n > 2 * w - 1 {
                    return bad(format!(
                        "{n} cached positions, more than the {} a window of {w} can leave",
                        2 * w - 1
                    ));
                }
            }
            if let Some(&p) = key_pos.iter().find(|&&p| p >= pos) {
                return bad(format!("position {p} is not before the {pos} tokens read"));
            }
            if let Some(i) = (1..n).find(|&i| key_pos[i] <= key_pos[i - 1]) {
                return bad(format!(
                    "positions {} then {} are not increasing",
                    key_pos[i - 1],
                    key_pos[i]
                ));
            }
        }
    }
    Ok(())
}

/// Refuse a carried vector (`what` names it in the message) holding a NaN, an infinity or a
/// value beyond ±[`MAX_CARRIED_MAGNITUDE`]: it can only produce NaN logits from then on. One
/// branch-free pass first (vectorized), the position only on failure.
pub(super) fn check_finite(values: &[f32], what: impl FnOnce() -> String) -> Result<()> {
    let fine = |x: &f32| x.abs() <= MAX_CARRIED_MAGNITUDE; // false for NaN
    if values.iter().fold(true, |ok, x| ok & fine(x)) {
        return Ok(());
    }
    match values.iter().position(|x| !fine(x)) {
        None => Ok(()),
        Some(j) => Err(Error::State(format!(
            "{} holds {:e} at index {j} (a carried value must be finite and within ±{MAX_CARRIED_MAGNITUDE:e})",
            what(),
            values[j]
        ))),
    }
}

/// The values of one tensor of a snapshot: its little-endian bytes as stored (borrowed from
/// the file: f32, or f16 / 8-bit blocks for a compact KV cache; or owned, from a tensor) or
/// already decoded f32.
pub(super) enum Values<'a> {
    Bytes(&'a [u8], Stored),
    Owned(Vec<u8>, Stored),
    Decoded(Vec<f32>),
    /// A KV tensor gathered from the pages of a paged snapshot.
    Paged(PagedValues<'a>),
}

impl Values<'_> {
    /// Append rows `[first, first + rows)` of `dim` values each (a KV tensor `[Hkv, n, D]` is
    /// `Hkv·n` rows) to `dst`, decoded by their own stored type (the range is checked by the
    /// caller).
    pub(super) fn extend_rows<T: KvElem>(
        &self,
        dst: &mut Vec<T>,
        first: usize,
        rows: usize,
        dim: usize,
    ) {
        let stored = |b: &[u8], s: Stored, dst: &mut Vec<T>| {
            let rb = s.row_bytes(dim);
            T::extend_rows(dst, &b[first * rb..(first + rows) * rb], s, dim)
        };
        match self {
            Values::Bytes(b, s) => stored(b, *s, dst),
            Values::Owned(b, s) => stored(b, *s, dst),
            Values::Decoded(v) => {
                T::extend_from_f32(dst, &v[first * dim..(first + rows) * dim], dim)
            }
            Values::Paged(p) => p.extend_rows(dst, first, rows, dim),
        }
    }

    /// How the values are stored (a paged tensor: as its first page holds them).
    pub(super) fn stored(&self) -> Stored {
        match self {
            Values::Bytes(_, s) | Values::Owned(_, s) => *s,
            Values::Decoded(_) => Stored::F32,
            Values::Paged(p) => p.stored(),
        }
    }

    /// Every value as f32 (the recurrent state, pooled rows, order-2 buffer: f32 tensors).
    pub(super) fn into_vec(self) -> Vec<f32> {
        let rows = |bytes: &[u8], s: Stored| {
            // Whole blocks for 8-bit bytes, single values otherwise.
            let dim = if s == Stored::Q8_0 {
                crate::kernels::Q8_0_BLOCK
            } else {
                1
            };
            let mut v = Vec::new();
            f32::extend_rows(&mut v, bytes, s, dim);
            v
        };
        match self {
            Values::Decoded(v) => v,
            Values::Bytes(b, s) => rows(b, s),
            Values::Owned(b, s) => rows(&b, s),
            Values::Paged(p) => {
                let (n, dim) = p.rows();
                let mut v = Vec::new();
                p.extend_rows(&mut v, 0, n, dim);
                v
            }
        }
    }
}

/// Where a state is restored from: candle tensors or a parsed safetensors buffer.
pub(super) enum Source<'a, 'b> {
    Tensors(&'a HashMap<String, Tensor>),
    File(&'a SafeTensors<'b>),
    /// A snapshot file whose KV cache lies in pages.
    Paged(&'a PagedSource<'a, 'b>),
}

impl<'b> Source<'_, 'b> {
    /// Shape and values of a KV cache tensor (f32, f16 or 8-bit blocks), `None` when absent.
    /// The shape is the values' (`[Hkv, n, D]`), whatever the bytes of a row.
    pub(super) fn kv(&self, name: &str) -> Result<Option<(Vec<usize>, Values<'b>)>> {
        match self {
            Source::Tensors(t) => match t.get(name) {
                None => Ok(None),
                Some(x) if x.dtype() == DType::F16 => {
                    let halves: Vec<half::f16> = x.flatten_all()?.to_vec1()?;
                    let bytes = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
                    Ok(Some((x.dims().to_vec(), Values::Owned(bytes, Stored::F16))))
                }
                Some(x) if x.dtype() == DType::U8 => {
                    let shape = value_shape(name, x.dims(), Stored::Q8_0)?;
                    let bytes = x.flatten_all()?.to_vec1()?;
                    Ok(Some((shape, Values::Owned(bytes, Stored::Q8_0))))
                }
                Some(_) => self.f32s(name),
            },
            Source::File(st) => file_values(st, name, true),
            Source::Paged(p) => p.kv(name),
        }
    }

    /// Shape and values of an f32 tensor, `None` when absent.
    pub(super) fn f32s(&self, name: &str) -> Result<Option<(Vec<usize>, Values<'b>)>> {
        match self {
            Source::Tensors(t) => match t.get(name) {
                None => Ok(None),
                Some(x) if x.dtype() != DType::F32 => Err(Error::State(format!(
                    "tensor {name:?} is {:?}, not f32",
                    x.dtype()
                ))),
                Some(x) => Ok(Some((
                    x.dims().to_vec(),
                    Values::Decoded(x.flatten_all()?.to_vec1()?),
                ))),
            },
            Source::File(st) => file_values(st, name, false),
            Source::Paged(p) => file_values(p.main, name, false),
        }
    }

    /// The values of a rank-1 u32 tensor, `None` when absent.
    pub(super) fn u32s(&self, name: &str) -> Result<Option<Vec<u32>>> {
        match self {
            Source::Tensors(t) => t
                .get(name)
                .map(|x| x.to_vec1::<u32>())
                .transpose()
                .map_err(Error::from),
            Source::File(st) => file_u32s(st, name),
            Source::Paged(p) => file_u32s(p.main, name),
        }
    }
}

/// Shape and values of an f32 tensor of a safetensors file (or f16 and 8-bit blocks too when
/// `kv`: a KV cache tensor, its shape then the values' `[Hkv, n, D]`), `None` when absent.
pub(super) fn file_values<'b>(
    st: &SafeTensors<'b>,
    name: &str,
    kv: bool,
) -> Result<Option<(Vec<usize>, Values<'b>)>> {
    match st.tensor(name) {
        Err(_) => Ok(None),
        Ok(v) => match Stored::of(v.dtype()) {
            // The file's parser has checked that the byte length matches the shape.
            Some(s) if kv || s == Stored::F32 => Ok(Some((
                value_shape(name, v.shape(), s)?,
                Values::Bytes(v.data(), s),
            ))),
            _ => Err(Error::State(format!(
                "tensor {name:?} is {:?}, not {}",
                v.dtype(),
                if kv {
                    "f32, f16 or u8 (8-bit blocks)"
                } else {
                    "f32"
                }
            ))),
        },
    }
}

/// The values' shape of a KV tensor of `dims` stored as `s`: the last extent counts values, not
/// the bytes of 8-bit blocks (a row that is not whole blocks is refused).
pub(super) fn value_shape(name: &str, dims: &[usize], s: Stored) -> Result<Vec<usize>> {
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = s.row_dim(*last).ok_or_else(|| {
            Error::State(format!(
                "tensor {name:?}: 8-bit rows of {last} bytes are not whole blocks of 34"
            ))
        })?;
    }
    Ok(shape)
}

/// The values of a rank-1 u32 tensor of a safetensors file, `None` when absent.
pub(super) fn file_u32s(st: &SafeTensors<'_>, name: &str) -> Result<Option<Vec<u32>>> {
    match st.tensor(name) {
        Err(_) => Ok(None),
        Ok(v) if v.dtype() != safetensors::Dtype::U32 || v.shape().len() != 1 => {
            Err(Error::State(format!("tensor {name:?} is not a u32 vector")))
        }
        Ok(v) => Ok(Some(
            v.data()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )),
    }
}

impl State {
    /// Rebuild from [`State::to_tensors`] output. `heads`, `dim` and `num_layers` come from the
    /// model the state is restored onto; any disagreement is an error. The KV cache gets the
    /// capacity the next decode step needs (see [`State::from_safetensors`]).
    #[allow(clippy::too_many_arguments)]
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
        Self::restore(
            &Source::Tensors(t),
            num_layers,
            &vec![heads; num_layers],
            None,
            dim,
            pos,
            mode,
            window,
            device,
        )
    }

    /// Rebuild from a parsed safetensors buffer holding [`State::to_tensors`] output (a snapshot
    /// file, memory-mapped by the caller), reading the tensors' bytes in place: the KV cache is
    /// copied once, into a single allocation for all layers (each layer's keys and values are
    /// views of it) that already has the capacity the next decode step needs, so restoring
    /// costs one pass over the file. `base` is the config of the model the state is restored
    /// onto; any disagreement in shape (layers, heads, KV heads, head size) is an error. Tensors
    /// other than the state's (the engine's `tokens`, say) are ignored.
    ///
    /// Every value is checked before use, because a file can be well formed (its checksum right)
    /// and still wrong: the window (`1..=`[`MAX_WINDOW`]), the key positions against `pos`, the
    /// mode and the window (`check_key_positions`), the shape of every carried tensor against
    /// the model (KV `[Hkv, kv_len, D]`, recurrent state, at most two pooled rows of `Hkv·D`,
    /// order-2 buffer `[5, H·D]`), and every carried value (KV cache, recurrent state, pooled
    /// rows, order-2 buffer) is finite and within ±[`MAX_CARRIED_MAGNITUDE`]. What a file can make this allocate is bounded by the file's own tensors (the KV
    /// buffer at most about twice their size). The KV cache keeps the file's format (f32, f16 or 8-bit,
    /// [`State::kv_format`]; a `CarryMode::Reference` state is always f32): callers that want
    /// another call [`State::set_kv_format`].
    pub fn from_safetensors(
        t: &SafeTensors<'_>,
        base: &crate::config::BaseConfig,
        pos: usize,
        mode: CarryMode,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let (heads, kv_heads) = per_layer_heads(base);
        Self::restore(
            &Source::File(t),
            base.num_layers,
            &heads,
            Some(&kv_heads),
            base.head_dim,
            pos,
            mode,
            window,
            device,
        )
    }

    /// [`State::from_tensors`] and [`State::from_safetensors`]: `heads` (query heads) and
    /// `kv_heads` are per layer; `kv_heads` is checked when given.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn restore(
        t: &Source<'_, '_>,
        num_layers: usize,
        heads: &[usize],
        kv_heads: Option<&[usize]>,
        dim: usize,
        pos: usize,
        mode: CarryMode,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: &str| {
            t.f32s(name)?
                .ok_or_else(|| Error::State(format!("snapshot lacks tensor {name:?}")))
        };
        let key_pos: Vec<usize> = t
            .u32s("key_pos")?
            .ok_or_else(|| Error::State("snapshot lacks tensor \"key_pos\"".into()))?
            .into_iter()
            .map(|p| p as usize)
            .collect();
        if let Some(w) = window {
            validate_window("the snapshot's softmax window", w).map_err(Error::State)?;
        }
        let n = key_pos.len();
        check_key_positions(&key_pos, pos, mode, window)?;

        // The KV cache of every layer, checked: [Hkv, n, D] each (Hkv per layer: OpenELM's
        // layers differ), f32, f16 or 8-bit.
        if heads.len() != num_layers || kv_heads.is_some_and(|k| k.len() != num_layers) {
            return Err(Error::State(format!(
                "head counts given for {} layers, the model has {num_layers}",
                heads.len()
            )));
        }
        let mut kv: Vec<(Values<'_>, Values<'_>)> = Vec::with_capacity(num_layers);
        let mut hkv: Vec<Option<usize>> = (0..num_layers).map(|i| kv_heads.map(|k| k[i])).collect();
        for i in 0..num_layers {
            match (
                t.kv(&format!("layers.{i}.k"))?,
                t.kv(&format!("layers.{i}.v"))?,
            ) {
                (Some((ks, k)), Some((vs, v))) => {
                    let h = *hkv[i].get_or_insert(ks.first().copied().unwrap_or(0));
                    // Without the model's KV head count (`from_tensors`), the layer's own
                    // must at least divide its query heads.
                    if h == 0 || !heads[i].is_multiple_of(h) || ks != [h, n, dim] || vs != ks {
                        return Err(Error::State(format!(
                            "layer {i}: KV cache shapes {ks:?} / {vs:?} do not match {n} positions of {h} heads × {dim}"
                        )));
                    }
                    kv.push((k, v));
                }
                (None, None) if n == 0 => {}
                _ => return Err(Error::State(format!("layer {i}: KV cache missing"))),
            }
        }
        // The restored cache keeps the snapshot's format (its first layer's keys); a tensor
        // stored otherwise is converted as it is copied, never reinterpreted.
        // (The reference-compatible mode keeps tptt's f32 cache whatever a file holds; an
        // 8-bit cache restored where 8 bits cannot be used — onto a GPU — becomes f16.)
        let format = match kv.first() {
            Some((k, _)) if mode == CarryMode::Continue => k.stored().format(),
            _ => KvFormat::F32,
        };
        let format = if format.check(dim, device).is_ok() {
            format
        } else {
            KvFormat::F16
        };
        let kv_bufs: Vec<Option<(Tensor, Tensor)>> = if kv.len() == num_layers && n > 0 {
            let cap = restored_capacity(n, mode, window);
            let layer_heads: Vec<usize> = hkv.iter().map(|h| h.unwrap_or(0)).collect();
            let shape = KvShape {
                heads: &layer_heads,
                n,
                cap,
                dim,
            };
            match format {
                KvFormat::F16 => restore_kv::<half::f16>(kv, &shape, device)?,
                KvFormat::F32 => restore_kv::<f32>(kv, &shape, device)?,
                KvFormat::Q8_0 => restore_kv::<u8>(kv, &shape, device)?,
            }
        } else {
            (0..num_layers).map(|_| None).collect()
        };

        let mut layers = Vec::with_capacity(num_layers);
        for (i, kv) in kv_bufs.into_iter().enumerate() {
            let (heads, hkv) = (heads[i], hkv[i]);
            let (shape, state) = get(&format!("layers.{i}.state"))?;
            // One state per query head, or one per kv head (`LinearCarry::state`).
            let dd = dim * dim;
            let stored = match shape[..] {
                [len] if dd > 0 && len % dd == 0 => len / dd,
                _ => 0,
            };
            let fits = stored == heads
                || (stored > 0 && heads.is_multiple_of(stored) && hkv.is_none_or(|k| stored == k));
            if !fits {
                return Err(Error::State(format!(
                    "layer {i}: recurrent state has shape {shape:?}, model needs [{}] (one per query head) or one per kv head",
                    heads * dd
                )));
            }
            let state = state.into_vec();
            check_finite(&state, || format!("layer {i}: the recurrent state"))?;
            // Gate pooling history: up to two raw key / value rows of `Hkv·D` (when the KV head
            // count is unknown, a width of whole heads that divides the query heads).
            let row_width_fits = |c: usize| match hkv {
                Some(h) => c == h * dim,
                None => c > 0 && c.is_multiple_of(dim) && heads.is_multiple_of(c / dim),
            };
            let rows = |name: &str| -> Result<Vec<Vec<f32>>> {
                match t.f32s(&format!("layers.{i}.{name}"))? {
                    Some((shape, x)) => match shape[..] {
                        [0, _] => Ok(Vec::new()),
                        [r, c] if r <= 2 && row_width_fits(c) => {
                            let x = x.into_vec();
                            check_finite(&x, || format!("layer {i}: {name}"))?;
                            Ok(x.chunks_exact(c).map(<[f32]>::to_vec).collect())
                        }
                        _ => Err(Error::State(format!(
                            "layer {i}: {name} has the wrong shape {shape:?} (at most 2 rows of {})",
                            hkv.map_or("whole heads".to_string(), |h| (h * dim).to_string())
                        ))),
                    },
                    None => Ok(Vec::new()),
                }
            };
            let (pool_k, pool_v) = (rows("pool_k")?, rows("pool_v")?);
            if pool_k.len() != pool_v.len() {
                return Err(Error::State(format!(
                    "layer {i}: {} pooled key rows but {} value rows (they are kept together)",
                    pool_k.len(),
                    pool_v.len()
                )));
            }
            let prev = match t.f32s(&format!("layers.{i}.prev"))? {
                Some((shape, x)) => {
                    if shape != [5, heads * dim] {
                        return Err(Error::State(format!(
                            "layer {i}: order-2 buffer (prev) has shape {shape:?}, model needs [5, {}]",
                            heads * dim
                        )));
                    }
                    let r = x.into_vec();
                    check_finite(&r, || format!("layer {i}: the order-2 buffer (prev)"))?;
                    let part = |j: usize| r[j * heads * dim..(j + 1) * heads * dim].to_vec();
                    Some(PrevToken {
                        q: part(0),
                        k: part(1),
                        v: part(2),
                        alpha: part(3),
                        beta: part(4),
                    })
                }
                None => None,
            };
            let (k, v) = match kv {
                Some((k, v)) => (Some(k), Some(v)),
                None => (None, None),
            };
            layers.push(LayerState {
                k,
                v,
                linear: LinearCarry {
                    state,
                    pool_k,
                    pool_v,
                    prev,
                },
            });
        }
        let extra = format!("layers.{num_layers}.state");
        if t.f32s(&extra)?.is_some() {
            return Err(Error::State(format!(
                "snapshot has more than {num_layers} layers"
            )));
        }
        Ok(Self {
            pos,
            key_pos,
            layers,
            mode,
            window,
            kv_format: format,
        })
    }
}

/// The sizes of a restored KV cache: KV heads per layer, cached positions, slots, head size.
struct KvShape<'a> {
    heads: &'a [usize],
    n: usize,
    cap: usize,
    dim: usize,
}

/// Copy every layer's keys and values into one buffer of `T` (`[2, Hkv_i, cap, width]` per
/// layer after one another, `width` the elements of a row of `D` values in `T`'s format, each
/// head's `n` positions then zeros up to `cap`), each value checked, and return the layers'
/// views of it.
fn restore_kv<T: KvElem>(
    kv: Vec<(Values<'_>, Values<'_>)>,
    shape: &KvShape<'_>,
    device: &Device,
) -> Result<Vec<Option<(Tensor, Tensor)>>> {
    let KvShape { heads, n, cap, dim } = *shape;
    let width = T::FORMAT.row_width(dim);
    let total: usize = heads.iter().map(|h| 2 * h * cap * width).sum();
    // Marked for huge pages (`buffer::huge_vec`): filling a few hundred megabytes of fresh
    // memory 4 KiB page by page costs several times the copy itself, and decoding reads it all.
    let mut buf: Vec<T> = super::buffer::huge_vec(total);
    let zero = T::from_f64(0.0);
    for (i, (k, v)) in kv.iter().enumerate() {
        for (name, x) in [("keys", k), ("values", v)] {
            for head in 0..heads[i] {
                let from = buf.len();
                x.extend_rows(&mut buf, head * n, n, dim);
                // Checked while the copy is in cache (a branch-free pass the compiler
                // vectorizes): a NaN here would poison every later answer.
                if let Some((j, bad)) = T::first_bad(&buf[from..], dim) {
                    return Err(Error::State(format!(
                        "layer {i}: the cached {name} of KV head {head} holds {bad:e} at index {j} (a carried value must be finite and within ±{MAX_CARRIED_MAGNITUDE:e})"
                    )));
                }
                buf.resize(buf.len() + (cap - n) * width, zero);
            }
        }
    }
    drop(kv);
    let all = Tensor::from_vec(buf, total, &Device::Cpu)?.to_device(device)?;
    let mut offset = 0;
    let mut bufs = Vec::with_capacity(heads.len());
    for &h in heads {
        let len = 2 * h * cap * width;
        let layer = all.narrow(0, offset, len)?.reshape((2, h, cap, width))?;
        offset += len;
        bufs.push(Some((layer.i(0)?, layer.i(1)?)));
    }
    Ok(bufs)
}
