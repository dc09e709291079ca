//! State snapshots: a [`Session`] saved to a versioned, self-describing safetensors file and
//! restored onto the same model, variant, config and weights only ([`ModelIdentity`]).
//!
//! File: safetensors; tensors from [`tptt::state::State::to_tensors`] (the KV cache as the state
//! stores it, f32, f16 or 8-bit blocks (u8 `[Hkv, n, D/32·34]`) — a restore keeps that format —
//! everything else f32) plus `tokens` (u32, the last
//! [`HISTORY_KEPT`] ids, for the repetition penalty and the detokenizer context) and
//! `last_logits` (f32 `[V]`), stored in name order. `__metadata__` (all strings): `format` =
//! `tptt-chat-state`, `version` = [`SNAPSHOT_VERSION`], `engine_version`, `model`, `variant`,
//! `config_hash`, `weights` (the [`ModelIdentity`], see [`crate::identity`]), `dtype` (`f32`),
//! `window`, `mode`, `pos` (token count), `kv_len`, `history_len`, `surprise` (the [`Surprise`]
//! record as JSON; absent from files written before it existed, which still load with a fresh
//! record), `read_mark` (the [`ReadMark`] of the rendered text the session read, as JSON, when
//! the writer knew it: [`save_marked`]; [`load_marked`] returns it), and `checksum` (16 hex digits), so a corrupted file is refused instead of silently
//! restoring other numbers:
//!
//! * version 6 (written by [`save_paged`]): version 5 without the `layers.{i}.k` / `.v`
//!   tensors, and a `kv_pages` metadata entry (JSON list of `[page, start, len]` in position
//!   order) naming the KV pages ([`pages`]) that hold those positions, shared with the
//!   snapshots of other turns. Each page's name is the XXH3-128 digest of its bytes, checked on
//!   load; the references are checked against the cached positions ([`tptt::state::KvRef`]).
//!   [`load_paged`] takes the page folder; [`load_marked`] looks in [`PAGES_DIR`] beside the
//!   file.
//! * version 5 (written by [`save`] and [`save_marked`]): XXH3-64 ([`crate::digest::Xxh`]) over the other metadata (sorted by
//!   key, each key and value length-prefixed) and, per tensor in name order, its name, its dtype
//!   (by name), its shape (rank, then each extent, little-endian `u64`s), its byte count and its
//!   bytes. The identity is [`crate::identity`]'s (XXH3 digests of explicit fields).
//! * version 4 (still read): the same fields under a 64-bit FNV-1a chain (metadata sorted,
//!   length-prefixed; per tensor its name, the `Debug` text of dtype and shape, and a digest of
//!   its bytes by 8 FNV-style lanes over 64-byte blocks), with the same identity fields hashed
//!   by FNV ([`ModelIdentity::v4`]).
//! * version 3 (still read): the version 4 layout and checksum with the identity of before
//!   [`crate::identity`]: `config_hash` over the config's `Debug` text, no `weights`. Such a
//!   file loads when its hash matches that old hash of the model's config; its weights cannot
//!   be checked (it was written before they were fingerprinted).
//! * version 2 (still read, identity as version 3): the same FNV-1a chain fed the tensors' bytes
//!   8 at a time in a single lane.
//!
//! Other versions are refused with an error naming the version.
//!
//! A matching checksum only says the file is as it was written, not that the writer told the
//! truth, so every value is then checked before use and a file that fails is refused with an
//! [`Error::Snapshot`] naming the value: the window (`1..=`[`tptt::state::MAX_WINDOW`]), the
//! mode and dtype, `kv_len` / `history_len` against the tensors, the key positions against
//! `pos`, the mode and the window, the shape of every carried tensor against the model, finite
//! recurrent values and `last_logits` (length = vocabulary), token ids inside the vocabulary
//! (see [`State::from_safetensors`] for the state's part). The framing is the safetensors
//! crate's: a header length beyond the file or over its 100 MB cap is refused before anything
//! is allocated; what a file can make [`load`] allocate is bounded by its own size.
//! [`testing`] (feature `testing`) builds files with arbitrary values and a correct checksum.
//!
//! Speed: [`load`] memory-maps the file, checks the checksum on one thread while
//! [`State::from_safetensors`] copies the KV cache once, straight from the mapped bytes into its
//! final (ring-capacity) buffer, on the other, and judges the result only once the checksum
//! matched. [`save`] writes the tensors' bytes straight from the state's buffers (no
//! intermediate copies) while another thread computes the checksum, then fills the checksum into
//! the header (its length does not depend on the value).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use candle_core::{CpuStorage, Device, Storage, StridedBlocks, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use tptt::linear::CarryMode;
use tptt::model::{Model, State};

use crate::chat::ReadMark;
use crate::digest::{Fnv, Lanes, Xxh};
use crate::error::{Error, Result};
use crate::health::Surprise;
use crate::identity::config_hash_v3;
pub use crate::identity::{config_hash, ModelIdentity};
use crate::session::Session;

mod pages;
pub use pages::{page_path, sweep_pages, PageRef, Swept, PAGES_DIR, PAGE_POSITIONS};

/// Format version written.
pub const SNAPSHOT_VERSION: &str = "5";
/// The format written by [`save_paged`]: version 5 without the KV tensors, which lie in shared
/// pages that the `kv_pages` metadata lists ([`pages`]).
pub const SNAPSHOT_VERSION_PAGED: &str = "6";
/// An earlier format version, still read: FNV checksum and identity digests (module doc).
pub const SNAPSHOT_VERSION_V4: &str = "4";
/// An earlier format version, still read: the version 4 layout and checksum, an older identity
/// (a config hash of the `Debug` text, no weights fingerprint).
pub const SNAPSHOT_VERSION_V3: &str = "3";
/// The oldest format version still read (the version 3 layout, slower single-lane checksum).
pub const SNAPSHOT_VERSION_V2: &str = "2";
/// Token ids kept in a snapshot.
pub const HISTORY_KEPT: usize = 4096;
const FORMAT: &str = "tptt-chat-state";
/// A checksum value's placeholder while the data is written (same length as every value).
const CHECKSUM_PLACEHOLDER: &str = "0000000000000000";

/// Snapshot metadata, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    /// Which model it belongs to.
    pub identity: ModelIdentity,
    /// Tokens read by the session.
    pub pos: usize,
    /// Cached softmax positions.
    pub kv_len: usize,
    /// Softmax window.
    pub window: Option<usize>,
    /// File size in bytes.
    pub bytes: u64,
}

/// One tensor as written or read: its bytes may come in several pieces (the blocks of a view).
struct Part<'a> {
    name: &'a str,
    dtype: Dtype,
    shape: Vec<usize>,
    pieces: Vec<Cow<'a, [u8]>>,
}

impl Part<'_> {
    fn byte_len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }
}

/// The `checksum` metadata value of a snapshot of format `version` (see the module doc): the
/// metadata (sorted, without `checksum`) and the tensors (sorted by name).
fn checksum(version: &str, meta: &HashMap<String, String>, parts: &[Part<'_>]) -> String {
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.as_str() != "checksum").collect();
    keys.sort();
    let mut order: Vec<&Part<'_>> = parts.iter().collect();
    order.sort_by(|a, b| a.name.cmp(b.name));
    if version != SNAPSHOT_VERSION && version != SNAPSHOT_VERSION_PAGED {
        return checksum_fnv(version, meta, &keys, &order);
    }
    let mut h = Xxh::new();
    for k in keys {
        h.bytes(k.as_bytes());
        h.bytes(meta[k].as_bytes());
    }
    for p in order {
        h.bytes(p.name.as_bytes());
        h.bytes(dtype_name(p.dtype).as_bytes());
        h.word(p.shape.len() as u64);
        for &d in &p.shape {
            h.word(d as u64);
        }
        h.word(p.byte_len() as u64);
        for piece in &p.pieces {
            h.raw(piece);
        }
    }
    format!("{:016x}", h.finish())
}

/// A dtype's name in the version 5 checksum (safetensors' spelling, written out here so that a
/// change in how the crate prints its types cannot change a checksum).
fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BOOL => "BOOL",
        Dtype::U8 => "U8",
        Dtype::I8 => "I8",
        Dtype::I16 => "I16",
        Dtype::U16 => "U16",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::I32 => "I32",
        Dtype::U32 => "U32",
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        Dtype::I64 => "I64",
        Dtype::U64 => "U64",
        // Types no snapshot holds (the file is refused by its tensors' checks anyway).
        _ => "other",
    }
}

/// The checksum of versions 2 to 4 (module doc).
fn checksum_fnv(
    version: &str,
    meta: &HashMap<String, String>,
    keys: &[&String],
    order: &[&Part<'_>],
) -> String {
    let mut h = Fnv::new();
    for k in keys {
        h.bytes(k.as_bytes());
        h.bytes(meta[*k].as_bytes());
    }
    for p in order {
        h.bytes(p.name.as_bytes());
        h.bytes(format!("{:?}{:?}", p.dtype, p.shape).as_bytes());
        if version == SNAPSHOT_VERSION_V2 {
            // Version 2 fed the whole byte string, length-prefixed, into the chain.
            match &p.pieces[..] {
                [one] => h.bytes(one),
                many => h.bytes(&many.concat()),
            }
        } else {
            let mut d = Lanes::new();
            for piece in &p.pieces {
                d.update(piece);
            }
            h.word(d.finish());
        }
    }
    format!("{:016x}", h.0)
}

fn mode_name(m: CarryMode) -> &'static str {
    match m {
        CarryMode::Continue => "continue",
        CarryMode::Reference => "reference",
    }
}

/// The little-endian bytes of `values`, borrowed where the machine is little-endian.
fn le_bytes<T: bytemuck::Pod, const N: usize>(
    values: &[T],
    to_le: fn(&T) -> [u8; N],
) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") && std::mem::size_of::<T>() == N {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(to_le).collect())
    }
}

/// A tensor's dtype and its bytes in pieces.
type Pieces<'a> = (Dtype, Vec<Cow<'a, [u8]>>);

/// The bytes of a CPU f32, f16 or u8 (a compact KV cache) or u32 tensor, in row-major order, as the
/// blocks of its layout (borrowed from `storage`, the tensor's storage, no copy on a
/// little-endian machine).
fn tensor_pieces<'a>(
    t: &'a Tensor,
    storage: &'a Storage,
) -> std::result::Result<Pieces<'a>, String> {
    fn blocks<'a, T: bytemuck::Pod, const N: usize>(
        t: &'a Tensor,
        v: &'a [T],
        to_le: fn(&T) -> [u8; N],
    ) -> std::result::Result<Vec<Cow<'a, [u8]>>, String> {
        let block = |start: usize, len: usize| {
            v.get(start..start + len)
                .map(|s| le_bytes(s, to_le))
                .ok_or_else(|| "tensor layout outside its storage".to_string())
        };
        match t.strided_blocks() {
            StridedBlocks::SingleBlock { start_offset, len } => Ok(vec![block(start_offset, len)?]),
            StridedBlocks::UniformBlocks {
                start_offset,
                block_len,
                count,
                src_stride,
            } => (0..count)
                .map(|i| block(start_offset + i * src_stride, block_len))
                .collect(),
            StridedBlocks::MultipleBlocks {
                block_start_index,
                block_len,
            } => block_start_index
                .map(|start| block(start, block_len))
                .collect(),
        }
    }
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok((Dtype::F32, blocks(t, v, |x| x.to_le_bytes())?)),
        Storage::Cpu(CpuStorage::U32(v)) => Ok((Dtype::U32, blocks(t, v, |x| x.to_le_bytes())?)),
        Storage::Cpu(CpuStorage::F16(v)) => Ok((Dtype::F16, blocks(t, v, |x| x.to_le_bytes())?)),
        Storage::Cpu(CpuStorage::U8(v)) => Ok((Dtype::U8, blocks(t, v, |x| [*x])?)),
        _ => Err(format!(
            "unexpected tensor storage ({:?} on {:?})",
            t.dtype(),
            t.device().location()
        )),
    }
}

/// The safetensors header of `parts` (in order) with `meta`: 8-byte length, JSON, space padding
/// to a multiple of 8 (as the safetensors writer does).
fn header(
    meta: &HashMap<String, String>,
    parts: &[Part<'_>],
) -> std::result::Result<Vec<u8>, String> {
    let mut offset = 0;
    let infos = parts
        .iter()
        .map(|p| {
            let end = offset + p.byte_len();
            let info = TensorInfo {
                dtype: p.dtype,
                shape: p.shape.clone(),
                data_offsets: (offset, end),
            };
            offset = end;
            (p.name.to_string(), info)
        })
        .collect();
    let md = Metadata::new(Some(meta.clone()), infos)
        .map_err(|e| format!("cannot describe the tensors: {e}"))?;
    let mut json = serde_json::to_vec(&md).map_err(|e| format!("cannot write the header: {e}"))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Write `session` to `path` (atomically: a temporary file renamed into place), in format
/// [`SNAPSHOT_VERSION`]. Returns the file size.
pub fn save(session: &Session, identity: &ModelIdentity, path: &Path) -> Result<u64> {
    save_marked(session, identity, None, path)
}

/// [`save`], recording `mark` (what rendered text the session read, [`ReadMark`]) in the
/// checksummed metadata (`read_mark`), so the next turn knows what to feed from the file itself.
pub fn save_marked(
    session: &Session,
    identity: &ModelIdentity,
    mark: Option<ReadMark>,
    path: &Path,
) -> Result<u64> {
    write_file(session, identity, mark, path, None)
}

/// What [`save_paged`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// The snapshot file's size.
    pub file_bytes: u64,
    /// Bytes of the KV pages written for it (pages it shares with earlier snapshots cost
    /// nothing).
    pub new_page_bytes: u64,
    /// KV pages written for it.
    pub new_pages: usize,
    /// KV pages it refers to.
    pub pages: usize,
}

impl Saved {
    /// What this snapshot added to the disk.
    pub fn added_bytes(&self) -> u64 {
        self.file_bytes + self.new_page_bytes
    }
}

/// [`save_marked`] in format [`SNAPSHOT_VERSION_PAGED`]: the KV cache goes into pages in folder
/// `pages_dir` (shared by every snapshot that uses it), reusing the pages of the snapshots in
/// `reuse` (the conversation's previous turn, typically) for the positions where their bytes
/// are this session's, so a snapshot after each turn costs the recurrent state plus that turn's
/// new positions. A state whose cached positions are not one contiguous range is saved as
/// [`save_marked`] does (its pages count is then 0).
pub fn save_paged(
    session: &Session,
    identity: &ModelIdentity,
    mark: Option<ReadMark>,
    path: &Path,
    pages_dir: &Path,
    reuse: &[std::path::PathBuf],
) -> Result<Saved> {
    let Some(written) = pages::write_pages(&session.state, pages_dir, reuse)? else {
        let file_bytes = write_file(session, identity, mark, path, None)?;
        return Ok(Saved {
            file_bytes,
            new_page_bytes: 0,
            new_pages: 0,
            pages: 0,
        });
    };
    let file_bytes = write_file(session, identity, mark, path, Some(&written.refs))?;
    let mut names: Vec<&str> = written.refs.iter().map(PageRef::page).collect();
    names.sort_unstable();
    names.dedup();
    Ok(Saved {
        file_bytes,
        new_page_bytes: written.new_bytes,
        new_pages: written.new_pages,
        pages: names.len(),
    })
}

/// Write a snapshot file: format [`SNAPSHOT_VERSION`] with the KV cache inside, or
/// [`SNAPSHOT_VERSION_PAGED`] with `kv_pages` listing where it lies instead.
fn write_file(
    session: &Session,
    identity: &ModelIdentity,
    mark: Option<ReadMark>,
    path: &Path,
    kv_pages: Option<&[PageRef]>,
) -> Result<u64> {
    let snap_err = |reason: String| Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    };
    let st = &session.state;
    let mut tensors = st.to_tensors()?;
    let version = match kv_pages {
        Some(_) => {
            tensors.retain(|name, _| !(name.ends_with(".k") || name.ends_with(".v")));
            SNAPSHOT_VERSION_PAGED
        }
        None => SNAPSHOT_VERSION,
    };
    let hist = &session.tokens[session.tokens.len().saturating_sub(HISTORY_KEPT)..];
    let cpu = Device::Cpu;
    tensors.insert(
        "tokens".into(),
        Tensor::from_vec(hist.to_vec(), hist.len(), &cpu).map_err(tptt::Error::from)?,
    );
    if let Some(l) = &session.last_logits {
        tensors.insert(
            "last_logits".into(),
            Tensor::from_vec(l.clone(), l.len(), &cpu).map_err(tptt::Error::from)?,
        );
    }
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", version.to_string()),
        ("engine_version", env!("CARGO_PKG_VERSION").to_string()),
        ("model", identity.model.clone()),
        ("variant", identity.variant.clone()),
        ("config_hash", identity.config_hash.clone()),
        ("weights", identity.weights.clone()),
        ("dtype", "f32".to_string()),
        (
            "window",
            st.window
                .map(|w| w.to_string())
                .unwrap_or_else(|| "none".into()),
        ),
        ("mode", mode_name(st.mode).to_string()),
        ("pos", st.pos.to_string()),
        ("kv_len", st.kv_len().to_string()),
        ("history_len", hist.len().to_string()),
        (
            "surprise",
            serde_json::to_string(&session.surprise)
                .map_err(|e| snap_err(format!("cannot encode the surprise record: {e}")))?,
        ),
        ("checksum", CHECKSUM_PLACEHOLDER.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(refs) = kv_pages {
        meta.insert(
            "kv_pages".into(),
            serde_json::to_string(refs)
                .map_err(|e| snap_err(format!("cannot encode the KV page list: {e}")))?,
        );
    }
    if let Some(mark) = mark {
        meta.insert(
            "read_mark".into(),
            serde_json::to_string(&mark)
                .map_err(|e| snap_err(format!("cannot encode the read mark: {e}")))?,
        );
    }

    // The tensors in name order, their bytes borrowed from their storage (read-locked while
    // hashed and written).
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let guards: Vec<_> = named
        .iter()
        .map(|(_, t)| t.storage_and_layout().0)
        .collect();
    let parts = named
        .iter()
        .zip(&guards)
        .map(|((name, t), g)| {
            let (dtype, pieces) =
                tensor_pieces(t, g).map_err(|e| snap_err(format!("{name}: {e}")))?;
            Ok(Part {
                name: name.as_str(),
                dtype,
                shape: t.dims().to_vec(),
                pieces,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let placeholder = header(&meta, &parts).map_err(&snap_err)?;

    let tmp = path.with_extension("tmp");
    let write_err = |e: std::io::Error| snap_err(format!("cannot write: {e}"));
    let (sum, written) = std::thread::scope(|s| {
        let hasher = s.spawn(|| checksum(version, &meta, &parts));
        let written = (|| -> std::io::Result<File> {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            w.write_all(&placeholder)?;
            for piece in parts.iter().flat_map(|p| &p.pieces) {
                w.write_all(piece)?;
            }
            w.into_inner().map_err(std::io::IntoInnerError::into_error)
        })();
        (hasher.join(), written)
    });
    let sum = sum.map_err(|_| snap_err("the checksum computation panicked".into()))?;
    let mut file = written.map_err(write_err)?;
    meta.insert("checksum".into(), sum);
    let final_header = header(&meta, &parts).map_err(&snap_err)?;
    if final_header.len() != placeholder.len() {
        return Err(snap_err(
            "internal error: the header changed length with its checksum".into(),
        ));
    }
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&final_header))
        .map_err(write_err)?;
    drop(file);
    drop(guards);
    std::fs::rename(&tmp, path).map_err(|e| snap_err(format!("cannot move into place: {e}")))?;
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| snap_err(e.to_string()))
}

/// Memory-map a snapshot file for reading.
fn map(path: &Path) -> Result<memmap2::Mmap> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    // SAFETY: the map is only read, and only while this function's caller holds it. Snapshots
    // are never modified in place ([`save`] writes a temporary file and renames it over the
    // old one, so a map of the old file keeps the old inode's unchanged bytes); another program
    // truncating the file while it is mapped is the one case this does not guard against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)
}

/// Read a snapshot's metadata without restoring it (only the header is read from disk).
pub fn info(path: &Path) -> Result<SnapshotInfo> {
    let bytes = map(path)?;
    let meta = read_meta(path, &bytes)?;
    parse_info(path, &meta, bytes.len() as u64)
}

fn read_meta(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let snap_err = |reason: String| Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    };
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| snap_err(format!("not a valid snapshot file ({e})")))?;
    let meta = md
        .metadata()
        .clone()
        .ok_or_else(|| snap_err("no metadata: not a TPTT Chat state snapshot".into()))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(snap_err(
            "not a TPTT Chat state snapshot (format tag missing)".into(),
        ));
    }
    match meta.get("version").map(String::as_str) {
        Some(
            SNAPSHOT_VERSION_PAGED
            | SNAPSHOT_VERSION
            | SNAPSHOT_VERSION_V4
            | SNAPSHOT_VERSION_V3
            | SNAPSHOT_VERSION_V2,
        ) => Ok(meta),
        Some(v) => Err(snap_err(format!(
            "snapshot version {v:?} is not supported (this build reads versions {SNAPSHOT_VERSION_V2} to {SNAPSHOT_VERSION_PAGED}; a newer TPTT Chat may have written it)"
        ))),
        None => Err(snap_err("snapshot version missing".into())),
    }
}

fn parse_info(path: &Path, meta: &HashMap<String, String>, bytes: u64) -> Result<SnapshotInfo> {
    let snap_err = |reason: String| Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    };
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| snap_err(format!("metadata lacks {k:?}")))
    };
    let num = |k: &str| -> Result<usize> {
        let v = get(k)?;
        v.parse()
            .map_err(|_| snap_err(format!("metadata {k:?} = {v:?} is not a number")))
    };
    let window = match get("window")?.as_str() {
        "none" => None,
        w => Some(
            w.parse()
                .map_err(|_| snap_err(format!("metadata window {w:?} is not a number")))
                .and_then(|w| {
                    tptt::state::validate_window("metadata window", w).map_err(snap_err)
                })?,
        ),
    };
    Ok(SnapshotInfo {
        identity: ModelIdentity {
            model: get("model")?,
            variant: get("variant")?,
            config_hash: get("config_hash")?,
            // Versions 2 and 3 recorded no weights fingerprint.
            weights: meta.get("weights").cloned().unwrap_or_default(),
            v4: Default::default(),
        },
        pos: num("pos")?,
        kv_len: num("kv_len")?,
        window,
        bytes,
    })
}

/// Restore a snapshot (versions [`SNAPSHOT_VERSION_V2`] to [`SNAPSHOT_VERSION_PAGED`]) onto
/// `model`, refusing a corrupt one, or one that belongs to another model, variant, config or
/// weights. A paged snapshot's pages are looked for in the folder [`PAGES_DIR`] beside it (see
/// [`load_paged`]).
pub fn load(model: Arc<Model>, identity: &ModelIdentity, path: &Path) -> Result<Session> {
    load_marked(model, identity, path).map(|(session, _)| session)
}

/// [`load`], with the [`ReadMark`] the file records (`None` for files written without one:
/// by [`save`], or before marks were kept in snapshots), checked by the checksum like the rest.
pub fn load_marked(
    model: Arc<Model>,
    identity: &ModelIdentity,
    path: &Path,
) -> Result<(Session, Option<ReadMark>)> {
    let beside = path.parent().unwrap_or(Path::new(".")).join(PAGES_DIR);
    load_paged(model, identity, path, &beside)
}

/// The KV page references a snapshot's `kv_pages` metadata lists, checked (names, at most
/// [`pages::MAX_REFS`]); none for a snapshot of another version.
fn parse_refs(path: &Path, meta: &HashMap<String, String>) -> Result<Vec<PageRef>> {
    let snap_err = |reason: String| Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    };
    if meta.get("version").map(String::as_str) != Some(SNAPSHOT_VERSION_PAGED) {
        return Ok(Vec::new());
    }
    let text = meta
        .get("kv_pages")
        .ok_or_else(|| snap_err("metadata lacks \"kv_pages\"".into()))?;
    let refs: Vec<PageRef> = serde_json::from_str(text)
        .map_err(|e| snap_err(format!("kv_pages is not a list of [page, start, len]: {e}")))?;
    if refs.len() > pages::MAX_REFS {
        return Err(snap_err(format!(
            "kv_pages lists {} references (at most {})",
            refs.len(),
            pages::MAX_REFS
        )));
    }
    if let Some(r) = refs.iter().find(|r| !pages::valid_name(r.page())) {
        return Err(snap_err(format!(
            "kv_pages names {:?}, which is not a page name (32 hex digits)",
            r.page()
        )));
    }
    Ok(refs)
}

/// The KV pages a snapshot refers to, in position order (reads only its header): empty for a
/// snapshot that keeps its KV cache itself.
pub fn page_refs(path: &Path) -> Result<Vec<PageRef>> {
    let bytes = map(path)?;
    let meta = read_meta(path, &bytes)?;
    parse_refs(path, &meta)
}

/// The names of the KV pages a snapshot refers to (see [`sweep_pages`]).
pub fn page_names(path: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = page_refs(path)?.into_iter().map(|r| r.0).collect();
    names.sort_unstable();
    names.dedup();
    Ok(names)
}

/// The pages of a paged snapshot, mapped, and its references as (page index, start, len).
type OpenPages = (Vec<pages::Mapped>, Vec<tptt::state::KvRef>);

fn open_pages(refs: &[PageRef], dir: &Path) -> Result<OpenPages> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut maps = Vec::new();
    let mut kv_refs = Vec::with_capacity(refs.len());
    for r in refs {
        let page = match index.get(r.page()) {
            Some(&i) => i,
            None => {
                maps.push(pages::map_page(dir, r.page())?);
                index.insert(r.page(), maps.len() - 1);
                maps.len() - 1
            }
        };
        kv_refs.push(tptt::state::KvRef {
            page,
            start: r.start(),
            len: r.len(),
        });
    }
    Ok((maps, kv_refs))
}

/// Restore a paged snapshot's state from its mapped pages.
fn restore_paged(
    st: &SafeTensors<'_>,
    (maps, refs): &OpenPages,
    base: &tptt::config::BaseConfig,
    info: &SnapshotInfo,
    mode: CarryMode,
    device: &Device,
) -> std::result::Result<State, String> {
    let parsed = maps
        .iter()
        .map(|m| {
            let span =
                pages::page_span(&m.bytes).map_err(|e| format!("KV page {}: {e}", m.name))?;
            let st = SafeTensors::deserialize(&m.bytes)
                .map_err(|e| format!("KV page {}: not a valid page ({e})", m.name))?;
            Ok((st, span))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let kv_pages: Vec<tptt::state::KvPage<'_, '_>> = parsed
        .iter()
        .map(|(st, (first, len))| tptt::state::KvPage {
            tensors: st,
            first: *first,
            len: *len,
        })
        .collect();
    State::from_safetensors_paged(
        st,
        &kv_pages,
        refs,
        base,
        info.pos,
        mode,
        info.window,
        device,
    )
    .map_err(|e| e.to_string())
}

/// [`load_marked`], with the folder of the KV pages a paged snapshot ([`save_paged`]) refers to.
pub fn load_paged(
    model: Arc<Model>,
    identity: &ModelIdentity,
    path: &Path,
    pages_dir: &Path,
) -> Result<(Session, Option<ReadMark>)> {
    let snap_err = |reason: String| Error::Snapshot {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = map(path)?;
    let meta = read_meta(path, &bytes)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| snap_err(format!("not a valid snapshot file ({e})")))?;
    let want = meta
        .get("checksum")
        .ok_or_else(|| snap_err("metadata lacks \"checksum\"".into()))?;
    let version = meta
        .get("version")
        .map(String::as_str)
        .unwrap_or(SNAPSHOT_VERSION);
    let info = parse_info(path, &meta, bytes.len() as u64);
    let mode = match meta.get("mode").map(String::as_str) {
        Some("continue") => Ok(CarryMode::Continue),
        Some("reference") => Ok(CarryMode::Reference),
        Some(other) => Err(snap_err(format!(
            "metadata mode {other:?} is not known (continue, reference)"
        ))),
        None => Err(snap_err("metadata lacks \"mode\"".into())),
    };
    let b = &model.config().base;
    let parts: Vec<Part<'_>> = st
        .iter()
        .map(|(name, v)| Part {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            pieces: vec![Cow::Borrowed(v.data())],
        })
        .collect();
    let paged = version == SNAPSHOT_VERSION_PAGED;
    let opened = parse_refs(path, &meta).and_then(|refs| open_pages(&refs, pages_dir));
    // The checksum (and the pages' digests) on one thread, the state (one copy of the KV cache)
    // on this one; the state is only looked at once the checksum matched.
    let (got, state) = std::thread::scope(|s| {
        let hasher = s.spawn(|| {
            let sum = checksum(version, &meta, &parts);
            let corrupt_page = opened.as_ref().ok().and_then(|(maps, _)| {
                maps.iter()
                    .find(|m| pages::digest(&[&m.bytes]) != m.name)
                    .map(|m| m.name.clone())
            });
            (sum, corrupt_page)
        });
        let state = match (&info, &mode, &opened) {
            (Ok(i), Ok(m), Ok(open)) if paged => {
                Some(restore_paged(&st, open, b, i, *m, model.device()))
            }
            (Ok(i), Ok(m), _) if !paged => Some(
                State::from_safetensors(&st, b, i.pos, *m, i.window, model.device())
                    .map_err(|e| e.to_string()),
            ),
            _ => None,
        };
        (hasher.join(), state)
    });
    let (got, corrupt_page) =
        got.map_err(|_| snap_err("the checksum computation panicked".into()))?;
    // Integrity first: a corrupted file must not be judged by its (possibly damaged) identity.
    if &got != want {
        return Err(snap_err(format!(
            "the file is corrupt (checksum {got} does not match the recorded {want})"
        )));
    }
    let info = info?;
    if info.identity.model != identity.model {
        return Err(snap_err(format!(
            "it belongs to model {:?}, not {:?}",
            info.identity.model, identity.model
        )));
    }
    if info.identity.variant != identity.variant {
        return Err(snap_err(format!(
            "it belongs to variant {:?}, not {:?}",
            info.identity.variant, identity.variant
        )));
    }
    // Older versions are judged by the identity of their time: version 4 by the same fields
    // under FNV, versions 2 and 3 by the config's `Debug` text and no weights fingerprint.
    let (want_config, want_weights) = match version {
        SNAPSHOT_VERSION | SNAPSHOT_VERSION_PAGED => {
            (identity.config_hash.clone(), Some(&identity.weights))
        }
        SNAPSHOT_VERSION_V4 => (identity.v4.config_hash.clone(), Some(&identity.v4.weights)),
        _ => (config_hash_v3(model.config()), None),
    };
    if info.identity.config_hash != want_config {
        return Err(snap_err(format!(
            "it was saved with a different model configuration (config hash {} vs {want_config})",
            info.identity.config_hash
        )));
    }
    if let Some(want) = want_weights {
        if &info.identity.weights != want {
            return Err(snap_err(format!(
                "it was computed by other weights (fingerprint {} vs {want}): the variant or its base changed",
                info.identity.weights
            )));
        }
    }
    mode?;
    match meta.get("dtype").map(String::as_str) {
        Some("f32") => {}
        Some(other) => {
            return Err(snap_err(format!(
                "metadata dtype {other:?} is not supported (f32 only)"
            )))
        }
        None => return Err(snap_err("metadata lacks \"dtype\"".into())),
    }
    opened?;
    if let Some(name) = corrupt_page {
        return Err(snap_err(format!(
            "KV page {name} is corrupt (its bytes do not match its name)"
        )));
    }
    let state = match state {
        Some(r) => r.map_err(snap_err)?,
        None => return Err(snap_err("the state could not be read".into())),
    };
    let vector = |name: &str, dtype: Dtype| -> Result<Option<&[u8]>> {
        match st.tensor(name) {
            Err(_) => Ok(None),
            Ok(v) if v.dtype() == dtype && v.shape().len() == 1 => Ok(Some(v.data())),
            Ok(v) => Err(snap_err(format!(
                "{name} is {:?} {:?}, not a {dtype:?} vector",
                v.dtype(),
                v.shape()
            ))),
        }
    };
    let words = |b: &[u8]| -> Vec<[u8; 4]> {
        b.chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let tokens: Vec<u32> = match vector("tokens", Dtype::U32)? {
        Some(b) => words(b).into_iter().map(u32::from_le_bytes).collect(),
        None => return Err(snap_err("lacks tokens".into())),
    };
    // The metadata's counts must describe the tensors (the checksum only says that nothing
    // changed since they were written, not that the writer told the truth).
    let counted = |k: &str, have: usize, what: &str| -> Result<()> {
        match meta.get(k).map(|v| (v, v.parse::<usize>())) {
            Some((_, Ok(n))) if n == have => Ok(()),
            Some((v, _)) => Err(snap_err(format!(
                "metadata {k} = {v:?} but the file holds {have} {what}"
            ))),
            None => Err(snap_err(format!("metadata lacks {k:?}"))),
        }
    };
    counted("kv_len", state.kv_len(), "cached positions (key_pos)")?;
    counted("history_len", tokens.len(), "token ids (tokens)")?;
    if tokens.len() > state.pos.min(HISTORY_KEPT) {
        return Err(snap_err(format!(
            "{} token ids kept after {} tokens read (at most min(pos, {HISTORY_KEPT}))",
            tokens.len(),
            state.pos
        )));
    }
    if let Some((i, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= b.vocab_size)
    {
        return Err(snap_err(format!(
            "token id {id} (tokens[{i}]) is outside the vocabulary of {}",
            b.vocab_size
        )));
    }
    let last_logits: Option<Vec<f32>> = match vector("last_logits", Dtype::F32)? {
        Some(bytes) => {
            let v: Vec<f32> = words(bytes).into_iter().map(f32::from_le_bytes).collect();
            if v.len() != b.vocab_size {
                return Err(snap_err(format!(
                    "last_logits has {} entries, vocabulary is {}",
                    v.len(),
                    b.vocab_size
                )));
            }
            if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                return Err(snap_err(format!(
                    "last_logits holds a non-finite value ({}) at index {j}",
                    v[j]
                )));
            }
            Some(v)
        }
        None => None,
    };
    let mut session = Session::from_parts(model, state, tokens, last_logits);
    // Older snapshots have no surprise record: the health is measured afresh.
    if let Some(text) = meta.get("surprise") {
        session.surprise = serde_json::from_str::<Surprise>(text)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validated())
            .map_err(|e| snap_err(format!("surprise record: {e}")))?;
    }
    let mark = meta
        .get("read_mark")
        .map(|text| {
            serde_json::from_str::<ReadMark>(text)
                .map_err(|e| snap_err(format!("read mark {text:?}: {e}")))
        })
        .transpose()?;
    Ok((session, mark))
}

/// Snapshot files with arbitrary contents and a correct checksum (feature `testing`): the
/// loader's value checks can only be reached by a file whose checksum matches, so its tests and
/// the fuzz tests craft files here.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::collections::{BTreeMap, HashMap};

    use safetensors::{Dtype, SafeTensors};

    use super::{checksum, header, Part, SNAPSHOT_VERSION};

    /// One tensor of a snapshot, owned.
    #[derive(Debug, Clone, PartialEq)]
    pub struct RawTensor {
        /// Element type.
        pub dtype: Dtype,
        /// Shape.
        pub shape: Vec<usize>,
        /// Little-endian bytes (nothing checks that they match the shape: a test may lie).
        pub data: Vec<u8>,
    }

    /// A snapshot file taken apart: its metadata (all strings) and tensors by name.
    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct RawSnapshot {
        /// `__metadata__`, `checksum` included (it is recomputed by [`RawSnapshot::to_bytes`]).
        pub meta: HashMap<String, String>,
        /// The tensors.
        pub tensors: BTreeMap<String, RawTensor>,
    }

    impl RawSnapshot {
        /// Take a safetensors file's bytes apart (no check beyond the safetensors format).
        pub fn parse(bytes: &[u8]) -> Result<Self, String> {
            let (_, md) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
            let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
            let tensors = st
                .iter()
                .map(|(name, v)| {
                    let raw = RawTensor {
                        dtype: v.dtype(),
                        shape: v.shape().to_vec(),
                        data: v.data().to_vec(),
                    };
                    (name.to_string(), raw)
                })
                .collect();
            Ok(Self {
                meta: md.metadata().clone().unwrap_or_default(),
                tensors,
            })
        }

        /// The file's bytes, tensors in name order, with `checksum` recomputed as the loader
        /// computes it for `meta["version"]` (format 3 when absent).
        pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
            let parts: Vec<Part<'_>> = self
                .tensors
                .iter()
                .map(|(name, t)| Part {
                    name,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    pieces: vec![std::borrow::Cow::Borrowed(&t.data[..])],
                })
                .collect();
            let version = self
                .meta
                .get("version")
                .map_or(SNAPSHOT_VERSION, String::as_str);
            let mut meta = self.meta.clone();
            meta.insert("checksum".into(), checksum(version, &self.meta, &parts));
            let mut out = header(&meta, &parts)?;
            for t in self.tensors.values() {
                out.extend_from_slice(&t.data);
            }
            Ok(out)
        }

        /// Replace (or add) an f32 tensor.
        pub fn set_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) {
            let data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.set(name, Dtype::F32, shape, data);
        }

        /// Replace (or add) a u32 tensor.
        pub fn set_u32(&mut self, name: &str, shape: &[usize], values: &[u32]) {
            let data = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.set(name, Dtype::U32, shape, data);
        }

        fn set(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) {
            let t = RawTensor {
                dtype,
                shape: shape.to_vec(),
                data,
            };
            self.tensors.insert(name.to_string(), t);
        }

        /// The values of a 4-byte tensor, as `f32` (`None` when absent).
        pub fn f32s(&self, name: &str) -> Option<Vec<f32>> {
            let t = self.tensors.get(name)?;
            Some(
                t.data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }

        /// The values of a 4-byte tensor, as `u32` (`None` when absent).
        pub fn u32s(&self, name: &str) -> Option<Vec<u32>> {
            let t = self.tensors.get(name)?;
            Some(
                t.data
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(pieces: &[&[u8]]) -> u64 {
        let mut d = Lanes::new();
        for p in pieces {
            d.update(p);
        }
        d.finish()
    }

    #[test]
    fn lane_digest_does_not_depend_on_how_the_bytes_are_split() {
        let data: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let whole = digest(&[&data]);
        for cut in [0, 1, 7, 63, 64, 65, 500, 999, 1000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(digest(&[a, b]), whole, "cut at {cut}");
        }
        let (a, rest) = data.split_at(3);
        let (b, c) = rest.split_at(130);
        assert_eq!(digest(&[a, b, c]), whole);
    }

    #[test]
    fn lane_digest_sees_every_single_byte_flip_and_the_length() {
        for len in [0usize, 1, 8, 63, 64, 65, 200] {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let base = digest(&[&data]);
            for at in 0..len {
                for mask in [0x01u8, 0x80, 0xff] {
                    let mut d = data.clone();
                    d[at] ^= mask;
                    assert_ne!(digest(&[&d]), base, "len {len}: byte {at} ^ {mask:#x}");
                }
            }
            // Trailing zeros are not padding: the length counts.
            let mut longer = data.clone();
            longer.push(0);
            assert_ne!(digest(&[&longer]), base, "len {len} + a zero byte");
        }
    }

    /// Synthetic metadata and two tensors, the second in two pieces.
    fn sample() -> (HashMap<String, String>, Vec<Part<'static>>) {
        let meta: HashMap<String, String> =
            [("format", FORMAT), ("pos", "20"), ("checksum", "ignored")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let parts = vec![
            Part {
                name: "tokens",
                dtype: Dtype::U32,
                shape: vec![2],
                pieces: vec![Cow::Borrowed(&[1, 0, 0, 0, 2, 0, 0, 0])],
            },
            Part {
                name: "last_logits",
                dtype: Dtype::F32,
                shape: vec![1, 2],
                pieces: vec![
                    Cow::Borrowed(&[0, 0, 128, 63]),
                    Cow::Borrowed(&[0, 0, 0, 64]),
                ],
            },
        ];
        (meta, parts)
    }

    /// The version 5 checksum is pinned: files written today must verify in every later build.
    /// If this fails, saved chats stop reopening (they are read again): change the value only
    /// together with a new format version. (The value was computed independently from the
    /// framing in the module doc with PyPI's `xxhash`, the reference C implementation.)
    #[test]
    fn the_version_5_checksum_is_pinned() {
        let (meta, parts) = sample();
        assert_eq!(
            checksum(SNAPSHOT_VERSION, &meta, &parts),
            "1656d062a110b3a2"
        );
        // Neither the tensors' order nor how their bytes are split matters; the checksum key
        // itself is left out.
        let (mut meta2, mut parts2) = sample();
        parts2.reverse();
        parts2[0].pieces = vec![Cow::Owned(vec![0, 0, 128, 63, 0, 0, 0, 64])];
        meta2.insert("checksum".into(), "other".into());
        assert_eq!(
            checksum(SNAPSHOT_VERSION, &meta2, &parts2),
            checksum(SNAPSHOT_VERSION, &meta, &parts)
        );
        // A shape with the same bytes, or a moved byte between tensors, is another file.
        let (_, mut reshaped) = sample();
        reshaped[1].shape = vec![2, 1];
        assert_ne!(
            checksum(SNAPSHOT_VERSION, &meta, &reshaped),
            checksum(SNAPSHOT_VERSION, &meta, &parts)
        );
    }
}
