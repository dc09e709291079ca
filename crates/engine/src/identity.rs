//! Which model a saved state belongs to: [`ModelIdentity`].
//!
//! A conversation's state is numbers computed by one set of weights under one configuration;
//! restored onto anything else it would silently continue with wrong numbers. An identity is:
//!
//! - `model` and `variant`: the repo id (or folder) and the variant's name, as the user chose
//!   them;
//! - `config_hash` ([`config_hash`]): a digest of [`canonical_config`], every configuration value
//!   that changes the numerics, written out field by field under fixed names. It does not depend
//!   on how the Rust types print (`Debug`) or are named, so renaming a field or bumping a
//!   dependency keeps every saved chat; changing a value, or the canonical text on purpose, does
//!   not. Paths and names that only say where files are (`base_model_name`,
//!   `base_model_subfolder`) are left out;
//! - `weights` ([`weights_hash`]): a fingerprint of the weight files. The adapter (a few MB) is
//!   digested whole, so a retrained or updated variant with the same shapes gets a new identity;
//!   the base (GBs, immutable in practice: Hugging Face serves it content-addressed) by each
//!   file's name, length and header (the safetensors header, or the first
//!   [`GGUF_HEADER_BYTES`] of a GGUF, which hold the tensors' names, types and offsets).
//!
//! Both are XXH3-64 ([`crate::digest::Xxh`]) of explicit, length-prefixed fields, pinned by
//! tests; they tell files apart, they do not resist a forger (a snapshot's values are validated
//! on load regardless). Snapshots written before format version 5 recorded FNV digests of the
//! same fields: [`ModelIdentity::v4`] recognises them, so those
//! chats reopen without re-reading.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use tptt::config::{Activation, Gate, ModelConfig, NormKind, QkNorm, RopeScaling, Trick};
use tptt::repo::VariantFiles;

use crate::digest::{Fnv, Lanes, Xxh};
use crate::error::{Error, Result};

/// Bytes of a GGUF base read into its fingerprint (its header: metadata and tensor infos).
pub const GGUF_HEADER_BYTES: u64 = 8 << 20;
/// The largest safetensors header read into a fingerprint (the safetensors crate's own cap).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Which model a snapshot belongs to (module doc). Two identities are equal when their model,
/// variant, config hash and weights fingerprint are ([`ModelIdentity::v4`] holds the same
/// digests in an older form, unknown for an identity read from a file).
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    /// Repo id or folder.
    pub model: String,
    /// Variant name.
    pub variant: String,
    /// [`config_hash`] of the loaded config.
    pub config_hash: String,
    /// [`weights_hash`] of the loaded files.
    pub weights: String,
    /// The same digests as snapshot format version 4 computed them (FNV), to recognise files
    /// (and the app's records of them) written before version 5; empty where unknown (an
    /// identity read from a file).
    pub v4: LegacyDigests,
}

/// The config hash and weights fingerprint of an older snapshot format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyDigests {
    /// The config hash.
    pub config_hash: String,
    /// The weights fingerprint.
    pub weights: String,
}

impl PartialEq for ModelIdentity {
    fn eq(&self, other: &Self) -> bool {
        (&self.model, &self.variant, &self.config_hash, &self.weights)
            == (
                &other.model,
                &other.variant,
                &other.config_hash,
                &other.weights,
            )
    }
}

impl Eq for ModelIdentity {}

impl ModelIdentity {
    /// The identity of `files` loaded with the configuration `cfg` (the loaded model's: a GGUF
    /// base's metadata replaces the base config), under the name `model`.
    pub fn of(model: impl Into<String>, files: &VariantFiles, cfg: &ModelConfig) -> Result<Self> {
        let (weights, weights_v4) = fingerprints(files)?;
        Ok(Self {
            model: model.into(),
            variant: files.name.clone(),
            config_hash: config_hash(cfg),
            weights,
            v4: LegacyDigests {
                config_hash: config_hash_v4(cfg),
                weights: weights_v4,
            },
        })
    }

    /// The config hash and the weights fingerprint in one string (for stores keyed by both).
    pub fn numerics_key(&self) -> String {
        format!("{}-{}", self.config_hash, self.weights)
    }

    /// [`ModelIdentity::numerics_key`] as it was before snapshot format version 5 (records of
    /// older snapshots are found by it).
    pub fn numerics_key_v4(&self) -> String {
        format!("{}-{}", self.v4.config_hash, self.v4.weights)
    }
}

/// A digest of [`canonical_config`] (16 hex digits).
pub fn config_hash(cfg: &ModelConfig) -> String {
    let mut h = Xxh::new();
    h.bytes(canonical_config(cfg).as_bytes());
    format!("{:016x}", h.finish())
}

/// The config hash that snapshot version 4 recorded: FNV-1a of the same [`canonical_config`].
fn config_hash_v4(cfg: &ModelConfig) -> String {
    let mut h = Fnv::new();
    h.bytes(canonical_config(cfg).as_bytes());
    format!("{:016x}", h.0)
}

/// The config hash that snapshot versions 2 and 3 recorded: 64-bit FNV-1a over the `Debug`
/// text of the config with its paths cleared. Kept only to recognise those files (their chats
/// reopen without re-reading); if the types' `Debug` text changes, such files are refused and
/// their conversations read again, which is safe.
pub(crate) fn config_hash_v3(cfg: &ModelConfig) -> String {
    let mut t = cfg.tptt.clone();
    t.base_model_name.clear();
    t.base_model_subfolder = None;
    // `layer_dims` came later (with OpenELM, which no such snapshot can hold): left out, so
    // that a uniform base's text is the one those versions hashed.
    let base = format!("{:?}", cfg.base).replacen(", layer_dims: None", "", 1);
    let text = format!("{base}|{t:?}");
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Every configuration value that changes the numerics, one `name=value` line each, under
/// names fixed here (the `config.json` spellings where there is one). Floats are written as
/// their bit patterns (exact, independent of float printing). Changing this text changes every
/// saved chat's identity: do it only when the numerics change.
pub fn canonical_config(cfg: &ModelConfig) -> String {
    let b = &cfg.base;
    let t = &cfg.tptt;
    let mut s = String::new();
    let mut put = |k: &str, v: String| {
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{k}={v}");
    };
    let f = |x: f64| format!("{:016x}", x.to_bits());
    let opt_f = |x: Option<f64>| x.map(f).unwrap_or_else(|| "none".into());
    put("model_type", b.arch.name().into());
    put("hidden_size", b.hidden_size.to_string());
    put("intermediate_size", b.intermediate_size.to_string());
    put("num_hidden_layers", b.num_layers.to_string());
    put("num_attention_heads", b.num_heads.to_string());
    put("num_key_value_heads", b.num_kv_heads.to_string());
    if let Some(dims) = &b.layer_dims {
        // OpenELM: the per-layer sizes (absent for uniform bases, whose identity is unchanged).
        let list = dims
            .iter()
            .map(|d| format!("{}/{}/{}", d.num_heads, d.num_kv_heads, d.intermediate_size))
            .collect::<Vec<_>>()
            .join(",");
        put("layer_dims", list);
    }
    put("head_dim", b.head_dim.to_string());
    put("rms_norm_eps", f(b.rms_norm_eps));
    put("rope_theta", f(b.rope_theta));
    put(
        "rope_scaling",
        match &b.rope_scaling {
            RopeScaling::None => "none".into(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => format!(
                "llama3,{},{},{},{}",
                f(*factor),
                f(*low_freq_factor),
                f(*high_freq_factor),
                f(*original_max_position_embeddings)
            ),
            RopeScaling::Linear { factor } => format!("linear,{}", f(*factor)),
        },
    );
    put(
        "max_position_embeddings",
        b.max_position_embeddings.to_string(),
    );
    put("vocab_size", b.vocab_size.to_string());
    put("tie_word_embeddings", b.tie_word_embeddings.to_string());
    put("qkv_bias", b.qkv_bias.to_string());
    put("o_bias", b.o_bias.to_string());
    put("mlp_bias", b.mlp_bias.to_string());
    put(
        "layer_windows",
        b.layer_windows
            .iter()
            .map(|w| w.map(|w| w.to_string()).unwrap_or_else(|| "none".into()))
            .collect::<Vec<_>>()
            .join(","),
    );
    put("local_rope_theta", opt_f(b.local_rope_theta));
    put(
        "hidden_act",
        match b.hidden_act {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
        .into(),
    );
    put(
        "norm",
        match b.norm {
            NormKind::Rms => "rms",
            NormKind::RmsOnePlus => "rms_one_plus",
            NormKind::LayerNoParam => "layer_no_param",
        }
        .into(),
    );
    put("sandwich_norms", b.sandwich_norms.to_string());
    put(
        "qk_norm",
        match b.qk_norm {
            QkNorm::None => "none",
            QkNorm::PerHead => "per_head",
            QkNorm::Full => "full",
        }
        .into(),
    );
    put("attn_scale", f(b.attn_scale));
    put("embed_scale", opt_f(b.embed_scale));
    put("final_logit_softcapping", opt_f(b.final_logit_softcap));
    put("clip_qkv", opt_f(b.clip_qkv));
    put(
        "moe",
        b.moe
            .map(|m| format!("{},{},{}", m.num_experts, m.top_k, m.norm_topk_prob))
            .unwrap_or_else(|| "none".into()),
    );
    put(
        "bos_token_id",
        b.bos_token_id
            .map(|i| i.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    put(
        "eos_token_id",
        b.eos_token_ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    // The TPTT settings. The operator mode's name is kept beside its decoded form: both are
    // what the reference reads.
    let r = &t.recurrent;
    let gate = |g: Gate| match g {
        Gate::K => "k",
        Gate::V => "v",
        Gate::Kv => "kv",
        Gate::C => "c",
    };
    put("operator_mode", t.operator_mode.clone());
    put(
        "recurrent",
        format!(
            "order={},alpha={},beta={},linear={},trick={}",
            r.order,
            gate(r.alpha_gate),
            gate(r.beta_gate),
            r.linear,
            match r.trick {
                Trick::Dt => "dt",
                Trick::Rot => "rot",
                Trick::Rdt => "rdt",
                Trick::Cte => "cte",
            }
        ),
    );
    put("mag_weight", format!("{:08x}", t.mag_weight.to_bits()));
    put("cross_gate", t.cross_gate.to_string());
    put("base_scale_attn", t.base_scale_attn.to_string());
    put(
        "max_self_attn_length",
        t.max_self_attn_length
            .map(|w| w.to_string())
            .unwrap_or_else(|| "none".into()),
    );
    put("max_chunk_size", t.max_chunk_size.to_string());
    put("linear_precision", t.linear_precision.clone());
    put(
        "lora",
        t.lora
            .as_ref()
            .map(|l| format!("r={},alpha={},rslora={}", l.r, f(l.alpha), l.use_rslora))
            .unwrap_or_else(|| "none".into()),
    );
    s
}

/// A fingerprint of the weight files of `files` (16 hex digits; module doc).
pub fn weights_hash(files: &VariantFiles) -> Result<String> {
    fingerprints(files).map(|(current, _)| current)
}

/// The fingerprint of `files` and its version 4 (FNV) form, from one read of each file.
fn fingerprints(files: &VariantFiles) -> Result<(String, String)> {
    let mut h = Both {
        xxh: Xxh::new(),
        v4: Fnv::new(),
    };
    match &files.adapter {
        Some(path) => {
            h.bytes(b"adapter");
            h.file(&digest_file(path, u64::MAX)?);
        }
        None => h.bytes(b"no adapter"),
    }
    match &files.base_gguf {
        Some(path) => {
            h.bytes(b"gguf");
            h.word(file_len(path)?);
            h.file(&digest_file(path, GGUF_HEADER_BYTES)?);
        }
        None => {
            for path in tptt::weights::weight_files(&files.base_dir)? {
                h.bytes(b"safetensors");
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                h.bytes(name.unwrap_or_default().as_bytes());
                let len = file_len(&path)?;
                h.word(len);
                h.file(&digest_file(
                    &path,
                    safetensors_header_len(&path)?.min(len),
                )?);
            }
        }
    }
    Ok((
        format!("{:016x}", h.xxh.finish()),
        format!("{:016x}", h.v4.0),
    ))
}

/// The current and the version 4 fingerprint, fed the same fields.
struct Both {
    xxh: Xxh,
    v4: Fnv,
}

impl Both {
    fn bytes(&mut self, b: &[u8]) {
        self.xxh.bytes(b);
        self.v4.bytes(b);
    }
    fn word(&mut self, w: u64) {
        self.xxh.word(w);
        self.v4.word(w);
    }
    fn file(&mut self, d: &FileDigest) {
        self.xxh.word(d.xxh);
        self.v4.word(d.lanes);
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(io_err(path))?.len())
}

/// The length of a safetensors file's framing: the 8-byte header length plus the header.
fn safetensors_header_len(path: &Path) -> Result<u64> {
    let mut n = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(io_err(path))?;
    Ok(8 + u64::from_le_bytes(n).min(MAX_SAFETENSORS_HEADER))
}

/// A file's digests: XXH3 of its bytes and their count, and the version 4 [`Lanes`] digest.
struct FileDigest {
    xxh: u64,
    lanes: u64,
}

/// The digests of the first `limit` bytes of a file (all of it with `u64::MAX`), one read.
fn digest_file(path: &Path, limit: u64) -> Result<FileDigest> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = file.take(limit);
    let mut x = Xxh::new();
    let mut d = Lanes::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_all = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        x.raw(&buf[..n]);
        d.update(&buf[..n]);
        n_all += n as u64;
    }
    x.word(n_all);
    Ok(FileDigest {
        xxh: x.finish(),
        lanes: d.finish(),
    })
}
