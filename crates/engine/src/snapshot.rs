//! State snapshots: a [`Session`] saved to a versioned, self-describing safetensors file and
//! restored onto the same model, variant and config only.
//!
//! File: safetensors; tensors from [`tptt::state::State::to_tensors`] plus `tokens` (u32, the last
//! [`HISTORY_KEPT`] ids, for the repetition penalty and the detokenizer context) and
//! `last_logits` (f32 `[V]`). `__metadata__` (all strings): `format` = `tptt-chat-state`,
//! `version` = [`SNAPSHOT_VERSION`], `engine_version`, `model`, `variant`, `config_hash`,
//! `dtype` (`f32`), `window`, `mode`, `pos` (token count), `kv_len`, `history_len`, and
//! `checksum`: a 64-bit FNV-1a hash of the other metadata and of every tensor's name, dtype,
//! shape and bytes, so a corrupted file is refused instead of silently restoring other numbers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use safetensors::View;
use tptt::config::ModelConfig;
use tptt::linear::CarryMode;
use tptt::model::{Model, State};

use crate::error::{Error, Result};
use crate::session::Session;

/// Format version written and accepted.
pub const SNAPSHOT_VERSION: &str = "2";
/// Token ids kept in a snapshot.
pub const HISTORY_KEPT: usize = 4096;
const FORMAT: &str = "tptt-chat-state";

/// Which model a snapshot belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    /// Repo id or folder.
    pub model: String,
    /// Variant name.
    pub variant: String,
    /// [`config_hash`] of the loaded config.
    pub config_hash: String,
}

/// A stable hash of everything in the config that changes the numerics (not paths).
pub fn config_hash(cfg: &ModelConfig) -> String {
    let mut t = cfg.tptt.clone();
    t.base_model_name.clear();
    t.base_model_subfolder = None;
    let text = format!("{:?}|{:?}", cfg.base, t);
    // FNV-1a 64
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

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

/// 64-bit FNV-1a, fed 8 bytes at a time (every step is a bijection of the running hash, so a
/// changed word always changes the result). Not cryptographic: it detects corruption only.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf29ce484222325)
    }
    fn word(&mut self, w: u64) {
        self.0 ^= w;
        self.0 = self.0.wrapping_mul(0x100000001b3);
    }
    /// Length-prefixed, so that field boundaries count.
    fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("chunks_exact(8) yields 8 bytes")));
        }
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        self.word(u64::from_le_bytes(last));
    }
}

/// The `checksum` metadata value: the metadata (sorted, without `checksum`) and the tensors
/// (sorted by name) as `(name, dtype, shape, bytes)`.
fn checksum<'a>(meta: &HashMap<String, String>, tensors: impl Iterator<Item = (&'a str, safetensors::Dtype, Vec<usize>, std::borrow::Cow<'a, [u8]>)>) -> String {
    let mut h = Fnv::new();
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.as_str() != "checksum").collect();
    keys.sort();
    for k in keys {
        h.bytes(k.as_bytes());
        h.bytes(meta[k].as_bytes());
    }
    let mut tensors: Vec<_> = tensors.collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in tensors {
        h.bytes(name.as_bytes());
        h.bytes(format!("{dtype:?}{shape:?}").as_bytes());
        h.bytes(&data);
    }
    format!("{:016x}", h.0)
}

fn mode_name(m: CarryMode) -> &'static str {
    match m {
        CarryMode::Continue => "continue",
        CarryMode::Reference => "reference",
    }
}

/// Write `session` to `path` (atomically: a temporary file renamed into place).
pub fn save(session: &Session, identity: &ModelIdentity, path: &Path) -> Result<u64> {
    let snap_err = |reason: String| Error::Snapshot { path: path.to_path_buf(), reason };
    let st = &session.state;
    let mut tensors = st.to_tensors()?;
    let hist = &session.tokens[session.tokens.len().saturating_sub(HISTORY_KEPT)..];
    let cpu = Device::Cpu;
    tensors.insert("tokens".into(), Tensor::from_vec(hist.to_vec(), hist.len(), &cpu).map_err(tptt::Error::from)?);
    if let Some(l) = &session.last_logits {
        tensors.insert("last_logits".into(), Tensor::from_vec(l.clone(), l.len(), &cpu).map_err(tptt::Error::from)?);
    }
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("version", SNAPSHOT_VERSION.to_string()),
        ("engine_version", env!("CARGO_PKG_VERSION").to_string()),
        ("model", identity.model.clone()),
        ("variant", identity.variant.clone()),
        ("config_hash", identity.config_hash.clone()),
        ("dtype", "f32".to_string()),
        ("window", st.window.map(|w| w.to_string()).unwrap_or_else(|| "none".into())),
        ("mode", mode_name(st.mode).to_string()),
        ("pos", st.pos.to_string()),
        ("kv_len", st.kv_len().to_string()),
        ("history_len", hist.len().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let sum = checksum(&meta, tensors.iter().map(|(k, t)| (k.as_str(), View::dtype(t), View::shape(t).to_vec(), View::data(t))));
    meta.insert("checksum".into(), sum);
    let tmp = path.with_extension("tmp");
    let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
    safetensors::serialize_to_file(views.iter().map(|(k, t)| (k.clone(), t)), Some(meta), &tmp)
        .map_err(|e| snap_err(format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| snap_err(format!("cannot move into place: {e}")))?;
    std::fs::metadata(path).map(|m| m.len()).map_err(|e| snap_err(e.to_string()))
}

/// Read a snapshot's metadata without restoring it.
pub fn info(path: &Path) -> Result<SnapshotInfo> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let meta = read_meta(path, &bytes)?;
    parse_info(path, &meta, bytes.len() as u64)
}

fn read_meta(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let snap_err = |reason: String| Error::Snapshot { path: path.to_path_buf(), reason };
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| snap_err(format!("not a valid snapshot file ({e})")))?;
    let meta = md.metadata().clone().ok_or_else(|| snap_err("no metadata: not a TPTT Chat state snapshot".into()))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(snap_err("not a TPTT Chat state snapshot (format tag missing)".into()));
    }
    if meta.get("version").map(String::as_str) != Some(SNAPSHOT_VERSION) {
        return Err(snap_err(format!("snapshot version {:?} is not supported (expected {SNAPSHOT_VERSION})", meta.get("version"))));
    }
    Ok(meta)
}

fn parse_info(path: &Path, meta: &HashMap<String, String>, bytes: u64) -> Result<SnapshotInfo> {
    let snap_err = |reason: String| Error::Snapshot { path: path.to_path_buf(), reason };
    let get = |k: &str| meta.get(k).cloned().ok_or_else(|| snap_err(format!("metadata lacks {k:?}")));
    let num = |k: &str| -> Result<usize> { get(k)?.parse().map_err(|_| snap_err(format!("metadata {k:?} is not a number"))) };
    let window = match get("window")?.as_str() {
        "none" => None,
        w => Some(w.parse().map_err(|_| snap_err("metadata window is not a number".into()))?),
    };
    Ok(SnapshotInfo {
        identity: ModelIdentity { model: get("model")?, variant: get("variant")?, config_hash: get("config_hash")? },
        pos: num("pos")?,
        kv_len: num("kv_len")?,
        window,
        bytes,
    })
}

/// Restore a snapshot onto `model`, refusing one that belongs to another model, variant or config.
pub fn load(model: Arc<Model>, identity: &ModelIdentity, path: &Path) -> Result<Session> {
    let snap_err = |reason: String| Error::Snapshot { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let meta = read_meta(path, &bytes)?;
    // Integrity first: a corrupted file must not be judged by its (possibly damaged) identity.
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| snap_err(format!("not a valid snapshot file ({e})")))?;
    let want = meta.get("checksum").ok_or_else(|| snap_err("metadata lacks \"checksum\"".into()))?;
    let got = checksum(&meta, st.iter().map(|(k, t)| (k, t.dtype(), t.shape().to_vec(), std::borrow::Cow::Borrowed(t.data()))));
    if &got != want {
        return Err(snap_err(format!("the file is corrupt (checksum {got} does not match the recorded {want})")));
    }
    let info = parse_info(path, &meta, bytes.len() as u64)?;
    if info.identity.model != identity.model {
        return Err(snap_err(format!("it belongs to model {:?}, not {:?}", info.identity.model, identity.model)));
    }
    if info.identity.variant != identity.variant {
        return Err(snap_err(format!("it belongs to variant {:?}, not {:?}", info.identity.variant, identity.variant)));
    }
    if info.identity.config_hash != identity.config_hash {
        return Err(snap_err(format!(
            "it was saved with a different model configuration (config hash {} vs {})",
            info.identity.config_hash, identity.config_hash
        )));
    }
    let mode = match meta.get("mode").map(String::as_str) {
        Some("continue") => CarryMode::Continue,
        Some("reference") => CarryMode::Reference,
        other => return Err(snap_err(format!("unknown mode {other:?}"))),
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| snap_err(format!("corrupt tensor data ({e})")))?;
    let b = &model.config().base;
    let state = State::from_tensors(&tensors, b.num_layers, b.num_heads, b.head_dim, info.pos, mode, info.window, model.device())
        .map_err(|e| snap_err(e.to_string()))?;
    let tokens: Vec<u32> = match tensors.get("tokens") {
        Some(t) => t.to_vec1().map_err(|e| snap_err(format!("tokens: {e}")))?,
        None => return Err(snap_err("lacks tokens".into())),
    };
    let last_logits: Option<Vec<f32>> = match tensors.get("last_logits") {
        Some(t) => {
            let v: Vec<f32> = t.to_vec1().map_err(|e| snap_err(format!("last_logits: {e}")))?;
            if v.len() != b.vocab_size {
                return Err(snap_err(format!("last_logits has {} entries, vocabulary is {}", v.len(), b.vocab_size)));
            }
            Some(v)
        }
        None => None,
    };
    Ok(Session::from_parts(model, state, tokens, last_logits))
}
