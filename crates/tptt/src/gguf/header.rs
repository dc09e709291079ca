//! A bounded reader for GGUF headers (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>),
//! run on every GGUF file before candle's [`Content::read`](candle_core::quantized::gguf_file::Content::read)
//! sees it.
//!
//! candle trusts parts of the header: a `general.alignment` of 0 divides by zero (a panic), and
//! a tensor's dimension product may overflow. This reader checks every count, length, type,
//! dimension and offset against the file's size *before* using it, and refuses the file with an
//! [`Error::Weights`] naming the file and the field:
//!
//! * magic `GGUF`, version 1–3;
//! * the tensor and metadata counts fit in what is left of the file (each entry has a minimum
//!   size), strings and arrays end inside the file, at most [`MAX_METADATA_ELEMENTS`] array
//!   elements in all (candle keeps each as a 32-byte value: the bound keeps that under 128 MiB
//!   whatever the file claims) and arrays nested at most [`MAX_VALUE_DEPTH`] deep;
//! * names (keys, tensor names) at most [`MAX_NAME_BYTES`] long, none repeated;
//! * `general.alignment`: an unsigned 32-bit integer, a power of two;
//! * each tensor: at most [`MAX_DIMS`] dimensions, none 0 (candle panics on an empty tensor),
//!   whose product fits `u64` and `usize`, a ggml
//!   type candle handles, rows a whole number of quantization blocks, an offset aligned and
//!   its data (offset + size) inside the file.
//!
//! Nothing the header claims is allocated: values are skipped by seeking; only names (bounded)
//! and one record per tensor (bounded by the file size) are kept. The walk is linear in the
//! header's size.

use std::collections::HashSet;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Longest metadata key or tensor name accepted, in bytes (real ones are under 100).
pub const MAX_NAME_BYTES: u64 = 1 << 16;
/// Most array elements in all of a header's metadata (a large vocabulary's tokens, scores,
/// types and merges come to about a million).
pub const MAX_METADATA_ELEMENTS: u64 = 1 << 22;
/// Deepest nesting of arrays of arrays.
pub const MAX_VALUE_DEPTH: usize = 8;

/// GGUF metadata value types (the spec's `gguf_metadata_value_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// One tensor as the header describes it (checked).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Its name.
    pub name: String,
    /// Its ggml type.
    pub dtype: GgmlDType,
    /// Dimensions in GGUF order (`ne[0]`, the row length, first).
    pub dims: Vec<u64>,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
    /// Size of its data in bytes.
    pub bytes: u64,
}

/// What a checked GGUF header holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Format version (1, 2 or 3).
    pub version: u32,
    /// Number of metadata entries.
    pub metadata_count: u64,
    /// `general.alignment` (32 when absent).
    pub alignment: u64,
    /// Where the data section starts (the header's end, aligned).
    pub data_offset: u64,
    /// The tensors, in file order.
    pub tensors: Vec<TensorEntry>,
}

/// Check the header of the GGUF file at `path` (see the module doc).
pub fn check_file(path: &Path) -> Result<Header> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    check(path, BufReader::new(file), len)
}

/// Check a GGUF header read from `reader` (positioned at the file's start, `len` bytes long);
/// `path` names the file in errors.
pub fn check<R: Read + Seek>(path: &Path, reader: R, len: u64) -> Result<Header> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        len,
        path: path.to_path_buf(),
        v1: false,
        elements: 0,
    };
    let magic = r.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(r.err(format!(
            "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        )));
    }
    let version = r.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(r.err(format!("version {version} is not supported (1 to 3)")));
    }
    r.v1 = version == 1;
    let tensor_count = r.length("tensor_count")?;
    let metadata_count = r.length("metadata_kv_count")?;
    // Each metadata entry takes at least a key length, a type and one byte; each tensor entry
    // a name length, n_dims, a type and an offset.
    let prefix = r.prefix_bytes();
    let needed = metadata_count
        .saturating_mul(prefix + 4 + 1)
        .saturating_add(tensor_count.saturating_mul(prefix + 4 + 4 + 8));
    if needed > r.remaining() {
        return Err(r.err(format!(
            "tensor_count {tensor_count} and metadata_kv_count {metadata_count} need at least {needed} bytes, the file has {} left",
            r.remaining()
        )));
    }

    let mut alignment = None;
    let mut keys = HashSet::new();
    for i in 0..metadata_count {
        let key = r.name(&format!("metadata key {i}"))?;
        let ty = r.u32(&format!("metadata {key:?}: type"))?;
        if key == "general.alignment" {
            alignment = Some(r.alignment(ty)?);
        } else {
            r.skip_value(ty, &format!("metadata {key:?}"), 0)?;
        }
        if !keys.insert(key.clone()) {
            return Err(r.err(format!("metadata key {key:?} appears twice")));
        }
    }
    drop(keys);
    let alignment = alignment.unwrap_or(32);

    // The count is bounded by the file size; reserve no more than a few pages up front.
    let mut tensors = Vec::with_capacity(tensor_count.min(1024) as usize);
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        let name = r.name(&format!("tensor {i}: name"))?;
        let entry = r.tensor(name)?;
        if !names.insert(entry.name.clone()) {
            return Err(r.err(format!("tensor {:?} appears twice", entry.name)));
        }
        tensors.push(entry);
    }
    let data_offset = r
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| r.err("the data section's offset overflows".to_string()))?;
    for t in &tensors {
        let at = |what: String| r.err(format!("tensor {:?}: {what}", t.name));
        if !t.offset.is_multiple_of(alignment) {
            return Err(at(format!(
                "data offset {} is not a multiple of general.alignment {alignment}",
                t.offset
            )));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.bytes));
        match end {
            Some(end) if end <= len => {}
            _ => {
                return Err(at(format!(
                    "its {} bytes at offset {} of the data section (which starts at byte {data_offset}) run past the end of the file ({len} bytes)",
                    t.bytes, t.offset
                )))
            }
        }
    }
    Ok(Header {
        version,
        metadata_count,
        alignment,
        data_offset,
        tensors,
    })
}

/// The header walk: a reader that knows its position and the file's length.
struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
    path: PathBuf,
    /// Version 1: lengths, counts and dimensions are u32 (u64 from version 2 on).
    v1: bool,
    /// Array elements seen so far.
    elements: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn err(&self, what: String) -> Error {
        Error::Weights {
            path: self.path.clone(),
            message: format!("invalid GGUF header: {what}"),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn prefix_bytes(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    /// Refuse `n` bytes of `what` that do not fit in the rest of the file.
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what}: {n} bytes at byte {} run past the end of the file ({} bytes)",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("{what}: cannot read at byte {}: {e}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A length, count or dimension: u32 in version 1, u64 after.
    fn length(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        // n ≤ remaining < file length, which fits i64 on any real file system.
        let step = i64::try_from(n).map_err(|_| self.err(format!("{what}: {n} bytes")))?;
        self.inner
            .seek(SeekFrom::Current(step))
            .map_err(|e| self.err(format!("{what}: cannot skip {n} bytes: {e}")))?;
        self.pos += n;
        Ok(())
    }

    /// A key or tensor name: bounded, kept.
    fn name(&mut self, what: &str) -> Result<String> {
        let n = self.length(&format!("{what} (length)"))?;
        if n > MAX_NAME_BYTES {
            return Err(self.err(format!(
                "{what}: a name of {n} bytes (at most {MAX_NAME_BYTES})"
            )));
        }
        self.need(n, what)?;
        let mut b = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.err(format!("{what}: cannot read: {e}")))?;
        self.pos += n;
        // candle drops trailing NULs and reads names lossily: so do we, to compare the same.
        while b.last() == Some(&0) {
            b.pop();
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Bytes a value of fixed-size type `ty` takes, `None` for strings and arrays.
    fn fixed_size(ty: u32) -> Option<u64> {
        match ty {
            T_U8 | T_I8 | T_BOOL => Some(1),
            T_U16 | T_I16 => Some(2),
            T_U32 | T_I32 | T_F32 => Some(4),
            T_U64 | T_I64 | T_F64 => Some(8),
            _ => None,
        }
    }

    /// Skip one metadata value of type `ty`, checking its lengths.
    fn skip_value(&mut self, ty: u32, what: &str, depth: usize) -> Result<()> {
        if let Some(n) = Self::fixed_size(ty) {
            return self.skip(n, what);
        }
        match ty {
            T_STRING => {
                let n = self.length(&format!("{what} (string length)"))?;
                self.skip(n, &format!("{what} (a string of {n} bytes)"))
            }
            T_ARRAY => {
                if depth >= MAX_VALUE_DEPTH {
                    return Err(self.err(format!(
                        "{what}: arrays nested more than {MAX_VALUE_DEPTH} deep"
                    )));
                }
                let elem = self.u32(&format!("{what} (array element type)"))?;
                let count = self.length(&format!("{what} (array length)"))?;
                let min = match (Self::fixed_size(elem), elem) {
                    (Some(n), _) => n,
                    (None, T_STRING) => self.prefix_bytes(),
                    (None, T_ARRAY) => 4 + self.prefix_bytes(),
                    (None, other) => {
                        return Err(self.err(format!("{what}: unknown array element type {other}")))
                    }
                };
                self.need(
                    count.saturating_mul(min),
                    &format!("{what} (an array of {count} elements)"),
                )?;
                self.elements = self.elements.saturating_add(count);
                if self.elements > MAX_METADATA_ELEMENTS {
                    return Err(self.err(format!(
                        "{what}: more than {MAX_METADATA_ELEMENTS} array elements in the metadata"
                    )));
                }
                match Self::fixed_size(elem) {
                    Some(n) => self.skip(count * n, what),
                    None => {
                        for i in 0..count {
                            self.skip_value(elem, &format!("{what}[{i}]"), depth + 1)?;
                        }
                        Ok(())
                    }
                }
            }
            other => Err(self.err(format!("{what}: unknown value type {other}"))),
        }
    }

    /// `general.alignment` of type `ty`: an unsigned 32-bit integer (candle also reads the
    /// smaller and signed integer types: accepted when non-negative), a power of two.
    fn alignment(&mut self, ty: u32) -> Result<u64> {
        const WHAT: &str = "general.alignment";
        let v: i64 = match ty {
            T_U8 => i64::from(self.array::<1>(WHAT)?[0]),
            T_I8 => i64::from(i8::from_le_bytes(self.array::<1>(WHAT)?)),
            T_U16 => i64::from(u16::from_le_bytes(self.array::<2>(WHAT)?)),
            T_I16 => i64::from(i16::from_le_bytes(self.array::<2>(WHAT)?)),
            T_U32 => i64::from(self.u32(WHAT)?),
            T_I32 => i64::from(i32::from_le_bytes(self.array::<4>(WHAT)?)),
            other => {
                return Err(self.err(format!(
                    "{WHAT} has value type {other}, not an unsigned 32-bit integer"
                )))
            }
        };
        match u64::try_from(v) {
            Ok(a) if a.is_power_of_two() => Ok(a),
            _ => Err(self.err(format!("{WHAT} is {v}, not a power of two"))),
        }
    }

    /// One tensor info after its name: dimensions, type, offset.
    fn tensor(&mut self, name: String) -> Result<TensorEntry> {
        let what = |field: &str| format!("tensor {name:?}: {field}");
        let n_dims = self.u32(&what("n_dimensions"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(self.err(what(&format!("{n_dims} dimensions (at most {MAX_DIMS})"))));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let n = self.length(&what(&format!("dimension {d}")))?;
            // An empty tensor holds nothing a model could use, and candle panics on one (its
            // zero-length buffer is not aligned for the element type).
            if n == 0 {
                return Err(self.err(what(&format!("dimension {d} is 0 (an empty tensor)"))));
            }
            dims.push(n);
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| {
                self.err(what(&format!(
                    "dimensions {dims:?} multiply beyond what a size can hold (2^64)"
                )))
            })?;
        let ty = self.u32(&what("type"))?;
        let dtype = ggml_dtype(ty).ok_or_else(|| {
            let name = ggml_name(ty).map_or(String::new(), |n| format!(" ({n})"));
            self.err(what(&format!(
                "ggml type {ty}{name} is unknown or not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K … Q8_K): re-quantize the model to one of these, e.g. Q4_K_M"
            )))
        })?;
        let block = dtype.block_size() as u64;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(self.err(what(&format!(
                "rows of {row} values are not a whole number of {dtype:?} blocks of {block}"
            ))));
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| self.err(what(&format!("the size of {dims:?} overflows"))))?;
        let offset = self.u64(&what("offset"))?;
        Ok(TensorEntry {
            name,
            dtype,
            dims,
            offset,
            bytes,
        })
    }
}

/// ggml's name of a type candle does not read, for the refusal (ggml.h's `ggml_type`).
fn ggml_name(ty: u32) -> Option<&'static str> {
    Some(match ty {
        4 | 5 => "Q4_2 / Q4_3, removed from ggml",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => return None,
    })
}

/// The ggml type numbered `ty` in GGUF files, among those candle reads.
fn ggml_dtype(ty: u32) -> Option<GgmlDType> {
    Some(match ty {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}
