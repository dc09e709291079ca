//! KV pages: the keys and values of a range of absolute positions, in a file of their own that
//! the snapshots of successive turns share ([`super::save_paged`], format version 6). A chat's
//! softmax window moves by one turn's tokens per turn, so a snapshot after every turn costs the
//! recurrent state plus the turn's new positions, not a whole window.
//!
//! A page is a safetensors file, `<name>.kvpage` in the page folder: tensors `layers.{i}.k` and
//! `layers.{i}.v` (`[Hkv, len, D]`, f32 or f16 as the state's KV cache stores them) and metadata `format` = `tptt-chat-kv-page`, `version`
//! = `1`, `first` (absolute position of its first entry) and `len`. Its name is the XXH3-128
//! digest of the whole file (32 hex digits): a page is never written twice, and a loader checks
//! each page's bytes against its name, as it checks the snapshot against its checksum. A page
//! holds at most [`PAGE_POSITIONS`] positions.
//!
//! Writing a paged snapshot reuses the pages of earlier snapshots the caller names (the
//! conversation's previous turn, say) for the positions they hold with the same bytes — compared,
//! not assumed: after an edit the same positions hold other values — and writes new pages for
//! the rest. Pages no snapshot refers to any more are removed by [`sweep_pages`] (the caller
//! knows which snapshots exist: [`page_names`] lists one's pages).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::Tensor;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tptt::model::State;
use xxhash_rust::xxh3::Xxh3;

use super::{header, map, tensor_pieces, Part};
use crate::error::{Error, Result};

/// Most positions written into one page: a loader reads (and checks) whole pages, so a small
/// page bounds what a reference to a few of its positions costs.
pub const PAGE_POSITIONS: usize = 256;
/// The folder of pages beside a snapshot when the caller names none ([`super::load_marked`]).
pub const PAGES_DIR: &str = "kv-pages";
const PAGE_FORMAT: &str = "tptt-chat-kv-page";
const PAGE_VERSION: &str = "1";
const EXTENSION: &str = "kvpage";
/// Most page references a snapshot may list (a window of [`tptt::state::MAX_WINDOW`] positions
/// one page per position, with room to spare): a file cannot make the loader open more.
pub(super) const MAX_REFS: usize = tptt::state::MAX_WINDOW + 1;

/// Positions `start..start + len` taken from page `page` (its name): an entry of a paged
/// snapshot's `kv_pages` metadata (a JSON list of `[page, start, len]`, in position order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef(pub String, pub usize, pub usize);

impl PageRef {
    pub(super) fn page(&self) -> &str {
        &self.0
    }
    pub(super) fn start(&self) -> usize {
        self.1
    }
    pub(super) fn len(&self) -> usize {
        self.2
    }
}

/// A page's name is 32 lowercase hex digits (nothing else may reach a path).
pub(super) fn valid_name(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The file of page `name` in folder `dir`.
pub fn page_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{EXTENSION}"))
}

/// A page's name: the XXH3-128 digest of its bytes.
pub(super) fn digest(pieces: &[&[u8]]) -> String {
    let mut h = Xxh3::new();
    for p in pieces {
        h.update(p);
    }
    format!("{:032x}", h.digest128())
}

/// A memory-mapped page, its name checked against its bytes by the caller.
pub(super) struct Mapped {
    pub(super) name: String,
    pub(super) bytes: memmap2::Mmap,
}

/// Map page `name` from `dir`; a missing page is an error naming it.
pub(super) fn map_page(dir: &Path, name: &str) -> Result<Mapped> {
    let path = page_path(dir, name);
    let bytes = map(&path).map_err(|e| Error::Snapshot {
        path: path.clone(),
        reason: format!(
            "a KV page of the snapshot cannot be read (deleted, or the page folder moved): {e}"
        ),
    })?;
    Ok(Mapped {
        name: name.to_string(),
        bytes,
    })
}

/// A page's `first` and `len` metadata, checked to be a page.
pub(super) fn page_span(st_bytes: &[u8]) -> std::result::Result<(usize, usize), String> {
    let (_, md) =
        SafeTensors::read_metadata(st_bytes).map_err(|e| format!("not a KV page ({e})"))?;
    let meta = md.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(PAGE_FORMAT) {
        return Err("not a KV page (format tag missing)".into());
    }
    if meta.get("version").map(String::as_str) != Some(PAGE_VERSION) {
        return Err(format!(
            "KV page version {:?} is not supported (this build reads {PAGE_VERSION})",
            meta.get("version")
        ));
    }
    let num = |k: &str| -> std::result::Result<usize, String> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("KV page metadata {k:?} missing or not a number"))
    };
    let (first, len) = (num("first")?, num("len")?);
    if len == 0 || first.checked_add(len).is_none() {
        return Err(format!("KV page holds {len} positions from {first}"));
    }
    Ok((first, len))
}

/// The bytes of every layer's cached keys and values, row by row: `rows(layer, kv, head,
/// slot, count)` are the bytes of `count` consecutive slots of one head.
struct KvBytes<'a> {
    /// Per layer, keys then values: the bytes of a `[Hkv, n, D]` view, in one piece or one
    /// piece per head (as the cache's layout gives them, borrowed).
    tensors: Vec<[Vec<Cow<'a, [u8]>>; 2]>,
    /// KV heads per layer (OpenELM's layers differ).
    heads: Vec<usize>,
    slots: usize,
    /// Bytes of one position of one head (head size × the stored value's size).
    row: usize,
    /// Elements of a row: the head size (f32, f16), or the bytes of its 8-bit blocks.
    dim: usize,
    /// How the cache stores its values (f32, or f16 / u8 8-bit blocks for a compact cache).
    dtype: Dtype,
}

impl KvBytes<'_> {
    fn rows(&self, layer: usize, kv: usize, head: usize, slot: usize, count: usize) -> &[u8] {
        let pieces = &self.tensors[layer][kv];
        let (piece, at) = match pieces.len() {
            1 => (&pieces[0], (head * self.slots + slot) * self.row),
            _ => (&pieces[head], slot * self.row),
        };
        &piece[at..at + count * self.row]
    }
}

/// The keys and values of every layer (`views`, `[Hkv, n, D]` each, read-locked by `guards`)
/// as bytes, or `None` when the state caches nothing; errors name `dir`, the page folder.
fn kv_bytes<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
    views: &'a [(Tensor, Tensor)],
    guards: &'a [[G; 2]],
    dir: &Path,
) -> Result<Option<KvBytes<'a>>> {
    let Some((k0, _)) = views.first() else {
        return Ok(None);
    };
    let (_, slots, dim) = k0.dims3().map_err(tptt::Error::from)?;
    let (dtype, size) = match k0.dtype() {
        candle_core::DType::F16 => (Dtype::F16, 2),
        candle_core::DType::U8 => (Dtype::U8, 1),
        _ => (Dtype::F32, 4),
    };
    let per_head = slots * dim * size;
    let mut tensors = Vec::with_capacity(views.len());
    let mut layer_heads = Vec::with_capacity(views.len());
    for ((k, v), g) in views.iter().zip(guards) {
        let heads = k.dim(0).map_err(tptt::Error::from)?;
        layer_heads.push(heads);
        let one = |t: &'a Tensor, g: &'a candle_core::Storage| -> Result<Vec<Cow<'a, [u8]>>> {
            let (got, pieces) = tensor_pieces(t, g).map_err(|reason| Error::Snapshot {
                path: dir.to_path_buf(),
                reason: format!("the KV cache cannot be read for its pages: {reason}"),
            })?;
            if got != dtype {
                return Err(Error::Snapshot {
                    path: dir.to_path_buf(),
                    reason: format!("the KV cache mixes {got:?} and {dtype:?} layers"),
                });
            }
            let total: usize = pieces.iter().map(|p| p.len()).sum();
            if t.dims() != [heads, slots, dim] || total != heads * per_head {
                return Err(Error::Snapshot {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "KV cache view {:?}, want [{heads}, {slots}, {dim}]",
                        t.dims()
                    ),
                });
            }
            Ok(match pieces.len() {
                1 => pieces,
                n if n == heads && pieces.iter().all(|p| p.len() == per_head) => pieces,
                _ => vec![Cow::Owned(pieces.concat())],
            })
        };
        tensors.push([one(k, &g[0])?, one(v, &g[1])?]);
    }
    Ok(Some(KvBytes {
        tensors,
        heads: layer_heads,
        slots,
        row: dim * size,
        dim,
        dtype,
    }))
}

/// Positions `a..b` as runs of consecutive slots: `(first position, first slot, count)`.
fn slot_runs(slot_of: &[usize], base: usize, a: usize, b: usize) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for p in a..b {
        let s = slot_of[p - base];
        match runs.last_mut() {
            Some((_, s0, n)) if *s0 + *n == s => *n += 1,
            _ => runs.push((p, s, 1)),
        }
    }
    runs
}

/// What [`write_pages`] did.
pub(super) struct Written {
    /// The snapshot's references, in position order.
    pub(super) refs: Vec<PageRef>,
    /// Bytes of the pages it wrote (reused pages cost nothing).
    pub(super) new_bytes: u64,
    /// Pages written.
    pub(super) new_pages: usize,
}

/// Write the pages `state`'s KV cache needs into `dir`, reusing those of the snapshots in
/// `reuse` whose bytes match; `None` when the cached positions are not one contiguous range
/// (the caller then keeps the KV cache in the snapshot itself).
pub(super) fn write_pages(state: &State, dir: &Path, reuse: &[PathBuf]) -> Result<Option<Written>> {
    let io_err = |path: &Path, source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let n = state.kv_len();
    // The cached positions must be one range: `base..base + n` (the last `n` in the usual
    // mode; the reference-compatible mode may keep others, then the KV stays in the file).
    let base = state.key_pos.iter().copied().min().unwrap_or(state.pos);
    let pos = base + n;
    let mut slot_of = vec![usize::MAX; n];
    for (slot, &p) in state.key_pos.iter().enumerate() {
        match p.checked_sub(base).and_then(|i| slot_of.get_mut(i)) {
            Some(s) if *s == usize::MAX => *s = slot,
            _ => return Ok(None),
        }
    }
    let cpu = candle_core::Device::Cpu;
    let mut views = Vec::with_capacity(state.layers.len());
    for l in &state.layers {
        match (l.k_stored(n)?, l.v_stored(n)?) {
            (Some(k), Some(v)) => views.push((
                k.to_device(&cpu).map_err(tptt::Error::from)?,
                v.to_device(&cpu).map_err(tptt::Error::from)?,
            )),
            _ if n == 0 => {}
            _ => return Ok(None),
        }
    }
    let guards: Vec<[_; 2]> = views
        .iter()
        .map(|(k, v)| [k.storage_and_layout().0, v.storage_and_layout().0])
        .collect();
    let Some(kv) = kv_bytes(&views, &guards, dir)? else {
        return Ok(Some(Written {
            refs: Vec::new(),
            new_bytes: 0,
            new_pages: 0,
        }));
    };
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;

    // Candidate pages: those the named snapshots refer to, with their spans.
    let mut names: Vec<String> = Vec::new();
    for snap in reuse {
        if let Ok(refs) = super::page_refs(snap) {
            for r in refs {
                if !names.contains(&r.0) {
                    names.push(r.0);
                }
            }
        }
    }
    let mut candidates: Vec<(Mapped, usize, usize)> = Vec::new();
    for name in names {
        if let Ok(m) = map_page(dir, &name) {
            if let Ok((first, len)) = page_span(&m.bytes) {
                candidates.push((m, first, len));
            }
        }
    }
    // Whether candidate `c` holds this state's bytes for positions a..b.
    let matches = |c: &(Mapped, usize, usize), a: usize, b: usize| -> bool {
        let Ok(st) = SafeTensors::deserialize(&c.0.bytes) else {
            return false;
        };
        let (first, len) = (c.1, c.2);
        let runs = slot_runs(&slot_of, base, a, b);
        (0..kv.tensors.len()).all(|layer| {
            ["k", "v"].iter().enumerate().all(|(which, kind)| {
                let Ok(t) = st.tensor(&format!("layers.{layer}.{kind}")) else {
                    return false;
                };
                let heads = kv.heads[layer];
                if t.dtype() != kv.dtype || t.shape() != [heads, len, kv.dim] {
                    return false;
                }
                let data = t.data();
                (0..heads).all(|h| {
                    runs.iter().all(|&(p, s, count)| {
                        let at = (h * len + (p - first)) * kv.row;
                        data.get(at..at + count * kv.row)
                            == Some(kv.rows(layer, which, h, s, count))
                    })
                })
            })
        })
    };

    let mut refs = Vec::new();
    let (mut new_bytes, mut new_pages) = (0u64, 0usize);
    let mut x = base;
    let mut rejected: HashSet<usize> = HashSet::new();
    while x < pos {
        // The candidate covering x that reaches furthest and matches.
        let mut best: Option<(usize, usize)> = None;
        for (i, c) in candidates.iter().enumerate() {
            let end = (c.1 + c.2).min(pos);
            if rejected.contains(&i) || c.1 > x || end <= x || best.is_some_and(|(_, e)| e >= end) {
                continue;
            }
            if matches(c, x, end) {
                best = Some((i, end));
            } else {
                rejected.insert(i);
            }
        }
        if let Some((i, end)) = best {
            refs.push(PageRef(candidates[i].0.name.clone(), x, end - x));
            x = end;
            continue;
        }
        // New pages up to the next candidate's start.
        let next = candidates
            .iter()
            .enumerate()
            .filter(|(i, c)| !rejected.contains(i) && c.1 > x)
            .map(|(_, c)| c.1)
            .min()
            .unwrap_or(pos)
            .min(pos);
        while x < next {
            let end = (x + PAGE_POSITIONS).min(next);
            let (name, bytes) = write_page(&kv, &slot_of, base, x, end, dir)?;
            refs.push(PageRef(name, x, end - x));
            new_bytes += bytes;
            new_pages += usize::from(bytes > 0);
            x = end;
        }
    }
    Ok(Some(Written {
        refs,
        new_bytes,
        new_pages,
    }))
}

/// Distinguishes the temporary files of concurrent writers in one process.
static TMP_SERIAL: AtomicU64 = AtomicU64::new(0);

/// Write the page of positions `a..b` (unless a page with the same bytes exists): its name and
/// the bytes written (0 when it existed).
fn write_page(
    kv: &KvBytes<'_>,
    slot_of: &[usize],
    base: usize,
    a: usize,
    b: usize,
    dir: &Path,
) -> Result<(String, u64)> {
    let runs = slot_runs(slot_of, base, a, b);
    let names: Vec<(String, usize, usize)> = (0..kv.tensors.len())
        .flat_map(|l| {
            [
                (format!("layers.{l}.k"), l, 0),
                (format!("layers.{l}.v"), l, 1),
            ]
        })
        .collect();
    let parts: Vec<Part<'_>> = names
        .iter()
        .map(|(name, layer, which)| Part {
            name,
            dtype: kv.dtype,
            shape: vec![kv.heads[*layer], b - a, kv.dim],
            pieces: (0..kv.heads[*layer])
                .flat_map(|h| {
                    runs.iter().map(move |&(_, s, count)| {
                        Cow::Borrowed(kv.rows(*layer, *which, h, s, count))
                    })
                })
                .collect(),
        })
        .collect();
    let meta: HashMap<String, String> = [
        ("format", PAGE_FORMAT.to_string()),
        ("version", PAGE_VERSION.to_string()),
        ("first", a.to_string()),
        ("len", (b - a).to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let head = header(&meta, &parts).map_err(|reason| Error::Snapshot {
        path: dir.to_path_buf(),
        reason,
    })?;
    let mut all: Vec<&[u8]> = vec![&head];
    all.extend(parts.iter().flat_map(|p| p.pieces.iter().map(|c| &c[..])));
    let name = digest(&all);
    let path = page_path(dir, &name);
    if path.exists() {
        return Ok((name, 0));
    }
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TMP_SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let io_err = |source| Error::Io {
        path: tmp.clone(),
        source,
    };
    let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io_err)?);
    let written = all
        .iter()
        .try_for_each(|piece| w.write_all(piece))
        .and_then(|_| w.flush());
    drop(w);
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    Ok((name, all.iter().map(|p| p.len() as u64).sum()))
}

/// What [`sweep_pages`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Pages removed.
    pub pages: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Remove from `dir` the pages not in `keep` (and temporaries left by a crash) that are older
/// than `min_age` — younger ones may belong to a snapshot being written. A missing folder is
/// nothing to sweep.
pub fn sweep_pages(dir: &Path, keep: &HashSet<String>, min_age: Duration) -> Result<Swept> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Swept::default()),
        Err(source) => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut swept = Swept::default();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let page = file
            .strip_suffix(&format!(".{EXTENSION}"))
            .filter(|n| valid_name(n));
        let temporary = file.starts_with('.') && file.ends_with(".tmp");
        let unreferenced = page.is_some_and(|n| !keep.contains(n));
        if !(unreferenced || temporary) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            swept.pages += usize::from(page.is_some());
            swept.bytes += meta.len();
        }
    }
    Ok(swept)
}
