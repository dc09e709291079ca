//! Restoring a [`State`] whose KV cache a snapshot keeps in *pages*: files of keys and values
//! for a range of absolute positions, shared by the snapshots of successive turns (the engine
//! writes and names them; see `tptt_engine::snapshot`). The snapshot file itself holds
//! everything else (`key_pos`, the linear carries) and a list of [`KvRef`]s: which positions
//! come from which page.
//!
//! The pages' bytes are read in place, as a plain snapshot's are: each layer's keys (and
//! values) become a [`PagedValues`], a list of pieces of pages in slot order, which the restore
//! copies straight into its single KV buffer. Every reference is checked before use (inside its
//! page, in position order, not overlapping, covering exactly the cached positions), and so is
//! every page tensor's shape (`[Hkv, page length, D]`, the same heads and head size throughout)
//! and type (f32, or f16 / 8-bit blocks for a compact cache: each page decoded by its own);
//! the restore then applies its usual checks (shapes against the model, finite values).

use candle_core::Device;
use safetensors::SafeTensors;

use super::elem::{KvElem, Stored};
use super::restore::{file_u32s, file_values, Source, Values};
use super::State;
use crate::config::BaseConfig;
use crate::error::{Error, Result};
use crate::linear::CarryMode;

/// One page: its tensors `layers.{i}.k` / `layers.{i}.v` (f32, `[Hkv, len, D]`) hold the keys
/// and values of absolute positions `first..first + len`.
#[derive(Clone, Copy)]
pub struct KvPage<'a, 'b> {
    /// The page file, parsed.
    pub tensors: &'a SafeTensors<'b>,
    /// Absolute position of its first entry.
    pub first: usize,
    /// Positions it holds.
    pub len: usize,
}

/// Positions `start..start + len` (absolute) taken from page `page` (an index into the pages
/// given with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvRef {
    /// Which page.
    pub page: usize,
    /// First position taken.
    pub start: usize,
    /// Positions taken.
    pub len: usize,
}

/// Consecutive KV slots whose positions are consecutive entries of one page.
#[derive(Debug, Clone, Copy)]
struct Run {
    page: usize,
    /// Index of the run's first position in the page.
    offset: usize,
    len: usize,
}

/// A snapshot file plus the pages its KV cache comes from, as a [`Source`].
pub(super) struct PagedSource<'a, 'b> {
    pub(super) main: &'a SafeTensors<'b>,
    pages: &'a [KvPage<'a, 'b>],
    runs: Vec<Run>,
    slots: usize,
}

impl<'a, 'b> PagedSource<'a, 'b> {
    fn new(main: &'a SafeTensors<'b>, pages: &'a [KvPage<'a, 'b>], refs: &[KvRef]) -> Result<Self> {
        let bad = |why: String| Err(Error::State(format!("KV page references: {why}")));
        let key_pos = file_u32s(main, "key_pos")?
            .ok_or_else(|| Error::State("snapshot lacks tensor \"key_pos\"".into()))?;
        let mut total = 0usize;
        for (i, r) in refs.iter().enumerate() {
            let Some(page) = pages.get(r.page) else {
                return bad(format!(
                    "reference {i} names page {} of {}",
                    r.page,
                    pages.len()
                ));
            };
            let end = r.start.checked_add(r.len);
            let page_end = page.first.checked_add(page.len);
            if r.len == 0 || r.start < page.first || end.is_none() || end > page_end {
                return bad(format!(
                    "reference {i} takes positions {}+{} from a page holding {}+{}",
                    r.start, r.len, page.first, page.len
                ));
            }
            if let Some(prev) = i.checked_sub(1).map(|j| refs[j]) {
                if r.start < prev.start + prev.len {
                    return bad(format!(
                        "reference {i} (from position {}) overlaps or precedes the one before (to {})",
                        r.start,
                        prev.start + prev.len
                    ));
                }
            }
            total = total.saturating_add(r.len);
        }
        if total != key_pos.len() {
            return bad(format!(
                "they take {total} positions, the snapshot caches {}",
                key_pos.len()
            ));
        }
        let mut runs: Vec<Run> = Vec::new();
        for (slot, &p) in key_pos.iter().enumerate() {
            let p = p as usize;
            let i = refs.partition_point(|r| r.start + r.len <= p);
            let Some(r) = refs.get(i).filter(|r| r.start <= p) else {
                return bad(format!(
                    "slot {slot} holds position {p}, which no reference covers"
                ));
            };
            let offset = p - pages[r.page].first;
            match runs.last_mut() {
                Some(last) if last.page == r.page && last.offset + last.len == offset => {
                    last.len += 1
                }
                _ => runs.push(Run {
                    page: r.page,
                    offset,
                    len: 1,
                }),
            }
        }
        Ok(Self {
            main,
            pages,
            runs,
            slots: key_pos.len(),
        })
    }

    /// Shape and values of a layer's keys or values (f32, f16 or 8-bit; the shape counts
    /// values) gathered from the pages
    /// (any other tensor: from the snapshot file, f32).
    pub(super) fn kv(&self, name: &str) -> Result<Option<(Vec<usize>, Values<'b>)>> {
        let is_kv = name
            .strip_prefix("layers.")
            .and_then(|r| r.strip_suffix(".k").or_else(|| r.strip_suffix(".v")))
            .is_some_and(|i| i.parse::<usize>().is_ok());
        if !is_kv {
            return file_values(self.main, name, false);
        }
        if self.main.tensor(name).is_ok() {
            return Err(Error::State(format!(
                "a snapshot whose KV cache is in pages holds {name:?} itself"
            )));
        }
        if self.runs.is_empty() {
            return Ok(None);
        }
        let mut shape: Option<(usize, usize)> = None;
        let mut pieces = Vec::with_capacity(self.runs.len());
        let mut starts = Vec::with_capacity(self.runs.len());
        let mut slot = 0;
        for run in &self.runs {
            let page = &self.pages[run.page];
            let view = page
                .tensors
                .tensor(name)
                .map_err(|_| Error::State(format!("KV page {} lacks tensor {name:?}", run.page)))?;
            let dims = view.shape();
            let stored = Stored::of(view.dtype());
            // The head size of a page's rows (8-bit rows: whole 34-byte blocks).
            let values = match (dims, stored) {
                (&[h, l, w], Some(s)) if l == page.len => s.row_dim(w).map(|d| (h, d)),
                _ => None,
            };
            let fits = values.is_some_and(|v| shape.is_none_or(|s| s == v));
            let (Some(stored), Some(values), true) = (stored, values, fits) else {
                return Err(Error::State(format!(
                    "KV page {}: {name:?} is {:?} {dims:?}, not f32, f16 or 8-bit [heads, {}, head size] like the other pages",
                    run.page,
                    view.dtype(),
                    page.len
                )));
            };
            shape = Some(values);
            pieces.push(Piece {
                stored,
                bytes: view.data(),
                page_len: page.len,
                offset: run.offset,
                len: run.len,
            });
            starts.push(slot);
            slot += run.len;
        }
        let Some((heads, dim)) = shape else {
            return Ok(None);
        };
        Ok(Some((
            vec![heads, self.slots, dim],
            Values::Paged(PagedValues {
                pieces,
                starts,
                slots: self.slots,
                heads,
                dim,
            }),
        )))
    }
}

/// A run of slots in one page's tensor (`[Hkv, page_len, D]`, little-endian bytes of its own
/// stored type: the pages of one snapshot may differ, each is decoded by its own).
struct Piece<'b> {
    stored: Stored,
    bytes: &'b [u8],
    page_len: usize,
    offset: usize,
    len: usize,
}

/// A `[Hkv, slots, D]` tensor gathered from pages: its pieces in slot order.
pub(super) struct PagedValues<'b> {
    pieces: Vec<Piece<'b>>,
    /// The slot each piece starts at.
    starts: Vec<usize>,
    slots: usize,
    heads: usize,
    dim: usize,
}

impl PagedValues<'_> {
    /// Rows (`Hkv · slots`) and the values of each.
    pub(super) fn rows(&self) -> (usize, usize) {
        (self.heads * self.slots, self.dim)
    }

    /// How the first piece is stored (the restore's buffer type follows it; other pieces are
    /// converted as they are read).
    pub(super) fn stored(&self) -> Stored {
        self.pieces.first().map_or(Stored::F32, |p| p.stored)
    }

    /// Append rows `[first, first + rows)` of the gathered tensor (row `r`: KV head
    /// `r / slots`, slot `r % slots`; `dim` values each) to `dst`, each piece decoded by its own
    /// stored type (the range is checked by the caller).
    pub(super) fn extend_rows<T: KvElem>(
        &self,
        dst: &mut Vec<T>,
        first: usize,
        rows: usize,
        dim: usize,
    ) {
        let (mut r, end) = (first, first + rows);
        while r < end {
            let (head, slot) = (r / self.slots, r % self.slots);
            let k = self.starts.partition_point(|&s| s <= slot) - 1;
            let piece = &self.pieces[k];
            let within = slot - self.starts[k];
            let take = (piece.len - within).min(end - r);
            let src = head * piece.page_len + piece.offset + within;
            let rb = piece.stored.row_bytes(dim);
            T::extend_rows(
                dst,
                &piece.bytes[src * rb..(src + take) * rb],
                piece.stored,
                dim,
            );
            r += take;
        }
    }
}

impl State {
    /// [`State::from_safetensors`] for a snapshot whose KV cache lies in `pages`: `refs` (in
    /// position order) say which positions come from which page; the snapshot file `t` holds
    /// everything else and must not hold the KV tensors itself. The references are checked
    /// (module doc), then the state is restored and checked exactly as from a plain snapshot.
    #[allow(clippy::too_many_arguments)]
    pub fn from_safetensors_paged<'a, 'b>(
        t: &'a SafeTensors<'b>,
        pages: &'a [KvPage<'a, 'b>],
        refs: &[KvRef],
        base: &BaseConfig,
        pos: usize,
        mode: CarryMode,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let source = PagedSource::new(t, pages, refs)?;
        let (heads, kv_heads) = super::restore::per_layer_heads(base);
        Self::restore(
            &Source::Paged(&source),
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
}
