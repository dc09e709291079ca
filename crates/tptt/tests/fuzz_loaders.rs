//! Structured fuzzing of the model's loaders: GGUF files, safetensors weight files and
//! `config.json` bodies, mutated from valid ones, fed a fixed number of times each with a fixed
//! seed (deterministic in CI, about a minute in all with `crates/engine/tests/fuzz_snapshot.rs`).
//! Every input must give an `Err` or a valid result — and a valid result must then run — never a
//! panic, a hang or an allocation out of proportion with the input (`support/fuzz.rs`).

#[path = "support/fuzz.rs"]
mod fuzz;
#[path = "support/gguf.rs"]
mod gguf;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tptt::model::{LoadOptions, Model};
use tptt::repo::TpttRepo;

use fuzz::{apply, check_bounded, mutations, Mutation};
use gguf::{Gguf, F32};

const MIB: usize = 1 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("fixture folder") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A scratch folder, deleted on drop; with a copy of `tptt-llama/delta_rule` and its base.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tptt-fuzz-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        Self(dir)
    }

    fn with_repo(tag: &str) -> Self {
        let s = Self::new(tag);
        copy_dir(
            &fixtures().join("tptt-llama/delta_rule"),
            &s.0.join("tptt-llama/delta_rule"),
        );
        copy_dir(&fixtures().join("llama-base"), &s.0.join("llama-base"));
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Load the scratch repo's variant and run three tokens: the "valid result" must work.
fn load_and_run(repo: &Path) -> Result<(), String> {
    let repo = TpttRepo::open(repo).map_err(|e| e.to_string())?;
    let files = repo
        .variant(Some("delta_rule"), None)
        .map_err(|e| e.to_string())?;
    let model = Model::load(&files, &LoadOptions::default()).map_err(|e| e.to_string())?;
    model
        .forward_full(&[1, 5, 9])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A valid llama GGUF with F32, Q8_0 and Q4_0 tensors and arbitrary (seeded) tensor bytes.
fn gguf_file() -> (Vec<u8>, usize) {
    let mut g = Gguf::valid();
    // [32 cols, 8 rows] Q8_0: 8 × 34 bytes at 160; [32, 4] Q4_0: 4 × 18 bytes at 448.
    g.tensor("blk.0.attn_q.weight", &[32, 8], 8, 160);
    g.tensor("blk.0.attn_k.weight", &[32, 4], 2, 448);
    g.data_len = 448 + 72;
    let mut b = g.bytes();
    let header = b.len() - g.data_len;
    let mut x = 0x9e37_79b9u32;
    for byte in &mut b[header..] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    (b, header)
}

#[test]
fn fuzz_gguf_headers() {
    let (good, header) = gguf_file();
    let sc = Scratch::new("gguf");
    let path = sc.path("base.gguf");
    std::fs::write(&path, &good).expect("write");
    tptt::gguf::read_config(&path).expect("the valid GGUF reads");
    tptt::gguf::load(&path, &Device::Cpu).expect("the valid GGUF loads");
    let n = AtomicUsize::new(0);
    fuzz::run(
        "GGUF",
        1,
        25_000,
        mutations(header, 4),
        |edits: Vec<Mutation>| {
            let bytes = apply(&good, &edits);
            let p = sc.path(&format!("case-{}.gguf", n.fetch_add(1, Ordering::Relaxed)));
            std::fs::write(&p, &bytes).map_err(|e| e.to_string())?;
            let q = p.clone();
            // candle keeps each metadata array element as a 32-byte value (64 with the
            // vector's growth), and dequantizes: bounded by the file, never by its header.
            let r = check_bounded("GGUF", bytes.len(), 96, 2 * MIB, move || {
                tptt::gguf::read_config(&q).map_err(|e| e.to_string())?;
                tptt::gguf::load(&q, &Device::Cpu)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            let _ = std::fs::remove_file(&p);
            r
        },
    );
}

#[test]
fn fuzz_gguf_header_fields() {
    // Structured: each header field set to a boundary value, the file otherwise valid.
    let sc = Scratch::new("gguf-fields");
    let n = AtomicUsize::new(0);
    let field = prop_oneof![
        Just("alignment"),
        Just("dims"),
        Just("type"),
        Just("offset"),
        Just("count"),
        Just("string"),
    ];
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(3),
        Just(4),
        Just(16),
        Just(24),
        Just(31),
        Just(32),
        Just(64),
        Just(u32::MAX as u64),
        Just(u64::MAX),
        (0u32..64).prop_map(|k| 1u64 << k),
    ];
    fuzz::run(
        "GGUF fields",
        2,
        10_000,
        (field, value, 0usize..4, 0usize..5),
        |(field, v, i, d)| {
            let mut g = Gguf::valid();
            match field {
                "alignment" => g.set_kv("general.alignment", gguf::U32, &(v as u32).to_le_bytes()),
                "dims" => {
                    let mut dims = vec![8u64, 4, 1, 1, 1];
                    dims.truncate(d.max(1));
                    let at = i % dims.len();
                    dims[at] = v;
                    g.tensors.truncate(1);
                    g.tensor("output_norm.weight", &dims, F32, 128);
                }
                "type" => {
                    g.tensors.truncate(1);
                    g.tensor("output_norm.weight", &[8], v as u32, 128);
                }
                "offset" => {
                    g.tensors.truncate(1);
                    g.tensor("output_norm.weight", &[8], F32, v);
                }
                "count" if i % 2 == 0 => g.tensor_count = Some(v),
                "count" => g.kv_count = Some(v),
                _ => {
                    let mut value = v.to_le_bytes().to_vec();
                    value.extend_from_slice(b"tiny");
                    g.set_kv("general.name", gguf::STRING, &value);
                }
            }
            let bytes = g.bytes();
            let p = sc.path(&format!("case-{}.gguf", n.fetch_add(1, Ordering::Relaxed)));
            std::fs::write(&p, &bytes).map_err(|e| e.to_string())?;
            let q = p.clone();
            let r = check_bounded("GGUF field", bytes.len(), 96, 2 * MIB, move || {
                tptt::gguf::load(&q, &Device::Cpu)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            let _ = std::fs::remove_file(&p);
            r
        },
    );
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// The JSON header of a safetensors file and where its data starts.
fn split_safetensors(bytes: &[u8]) -> (Map<String, Value>, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    (header.as_object().expect("object").clone(), 8 + n)
}

fn join_safetensors(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("serialize");
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(2)),
        Just(json!(16)),
        Just(json!(64)),
        Just(json!(300)),
        Just(json!(u32::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1u64 << 40)),
        Just(json!(0.5)),
        Just(json!(1e308)),
        any::<u16>().prop_map(|x| json!(x)),
    ]
}

/// Any small JSON value, numbers on boundaries.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        prop_oneof![
            Just("llama"),
            Just("silu"),
            Just("delta_rule"),
            Just("F32"),
            Just("llama3"),
            Just(""),
            Just("float32"),
        ]
        .prop_map(|s| json!(s)),
        "[a-z_]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,10}", inner), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One edit of a safetensors header: a tensor's dtype, shape or offsets, or a key renamed.
#[derive(Debug, Clone)]
enum HeaderEdit {
    Dtype(usize, String),
    Shape(usize, Vec<Value>),
    Offsets(usize, Value, Value),
    Field(usize, Value),
    Remove(usize),
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    let dtype = prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("F64"),
        Just("I32"),
        Just("U8"),
        Just("BOOL"),
        Just("F8_E4M3"),
        Just("U64"),
        Just("XYZ"),
    ]
    .prop_map(String::from);
    prop_oneof![
        (any::<usize>(), dtype).prop_map(|(i, d)| HeaderEdit::Dtype(i, d)),
        (any::<usize>(), prop::collection::vec(json_number(), 0..5))
            .prop_map(|(i, s)| HeaderEdit::Shape(i, s)),
        (any::<usize>(), json_number(), json_number())
            .prop_map(|(i, a, b)| HeaderEdit::Offsets(i, a, b)),
        (any::<usize>(), json_value()).prop_map(|(i, v)| HeaderEdit::Field(i, v)),
        any::<usize>().prop_map(HeaderEdit::Remove),
    ]
}

fn edit_header(header: &mut Map<String, Value>, e: &HeaderEdit) {
    let names: Vec<String> = header.keys().cloned().collect();
    if names.is_empty() {
        return;
    }
    let pick = |i: usize| names[i % names.len()].clone();
    let mut set = |i: usize, field: &str, v: Value| {
        if let Some(t) = header.get_mut(&pick(i)).and_then(Value::as_object_mut) {
            t.insert(field.into(), v);
        }
    };
    match e {
        HeaderEdit::Dtype(i, d) => set(*i, "dtype", json!(d)),
        HeaderEdit::Shape(i, s) => set(*i, "shape", Value::Array(s.clone())),
        HeaderEdit::Offsets(i, a, b) => set(*i, "data_offsets", json!([a, b])),
        HeaderEdit::Field(i, v) => {
            header.insert(pick(*i), v.clone());
        }
        HeaderEdit::Remove(i) => {
            header.remove(&pick(*i));
        }
    }
}

#[test]
fn fuzz_safetensors_weights() {
    // The base weights: raw byte edits and structured header edits; an accepted file is then
    // loaded as the model's base and run.
    let sc = Scratch::with_repo("safetensors");
    let weights = sc.path("llama-base/model.safetensors");
    let good = std::fs::read(&weights).expect("fixture weights");
    let (header, data_start) = split_safetensors(&good);
    let input = prop_oneof![
        mutations(data_start, 4).prop_map(|m| (m, Vec::new())),
        prop::collection::vec(header_edit(), 1..4).prop_map(|e| (Vec::new(), e)),
    ];
    let repo = sc.path("tptt-llama");
    fuzz::run(
        "safetensors",
        3,
        5_000,
        input,
        |(edits, header_edits): (Vec<Mutation>, Vec<HeaderEdit>)| {
            let bytes = if header_edits.is_empty() {
                apply(&good, &edits)
            } else {
                let mut h = header.clone();
                for e in &header_edits {
                    edit_header(&mut h, e);
                }
                join_safetensors(&h, &good[data_start..])
            };
            std::fs::write(&weights, &bytes).map_err(|e| e.to_string())?;
            let (w, r) = (weights.clone(), repo.clone());
            // The file read whole (1×), tensors widened to f32 (≤ 2× for f16), the model built.
            check_bounded("safetensors", bytes.len(), 16, 8 * MIB, move || {
                tptt::weights::load_safetensors(&w, &Device::Cpu).map_err(|e| e.to_string())?;
                load_and_run(&r)
            })
        },
    );
}

// ---------------------------------------------------------------------------------------------
// config.json

/// One edit of a config object.
#[derive(Debug, Clone)]
enum ConfigEdit {
    Set(usize, Value),
    Add(String, Value),
    Remove(usize),
}

fn config_edit() -> impl Strategy<Value = ConfigEdit> {
    prop_oneof![
        4 => (any::<usize>(), json_value()).prop_map(|(i, v)| ConfigEdit::Set(i, v)),
        1 => ("[a-z_]{1,24}", json_value()).prop_map(|(k, v)| ConfigEdit::Add(k, v)),
        1 => any::<usize>().prop_map(ConfigEdit::Remove),
    ]
}

fn edit_config(map: &mut Map<String, Value>, e: &ConfigEdit) {
    let keys: Vec<String> = map.keys().cloned().collect();
    match e {
        ConfigEdit::Set(i, v) if !keys.is_empty() => {
            map.insert(keys[i % keys.len()].clone(), v.clone());
        }
        ConfigEdit::Remove(i) if !keys.is_empty() => {
            map.remove(&keys[i % keys.len()]);
        }
        ConfigEdit::Add(k, v) => {
            map.insert(k.clone(), v.clone());
        }
        _ => {}
    }
}

#[test]
fn fuzz_config_bodies() {
    // Both config.json files (the variant's TPTT keys, the base's): structured edits of keys
    // and values, or byte edits of the text. Accepted configs are loaded and run.
    let sc = Scratch::with_repo("config");
    let variant_cfg = sc.path("tptt-llama/delta_rule/config.json");
    let base_cfg = sc.path("llama-base/config.json");
    let texts = [
        std::fs::read(&variant_cfg).expect("variant config"),
        std::fs::read(&base_cfg).expect("base config"),
    ];
    let input = (
        any::<bool>(),
        prop_oneof![
            3 => prop::collection::vec(config_edit(), 1..4).prop_map(|e| (e, Vec::new())),
            1 => mutations(4096, 3).prop_map(|m| (Vec::new(), m)),
        ],
    );
    let repo = sc.path("tptt-llama");
    fuzz::run(
        "config.json",
        4,
        2_500,
        input,
        |(base, (edits, bytes_edits)): (bool, (Vec<ConfigEdit>, Vec<Mutation>))| {
            let (which, path) = if base {
                (1, &base_cfg)
            } else {
                (0, &variant_cfg)
            };
            let text = if edits.is_empty() {
                apply(&texts[which], &bytes_edits)
            } else {
                let mut map: Map<String, Value> =
                    serde_json::from_slice(&texts[which]).map_err(|e| e.to_string())?;
                for e in &edits {
                    edit_config(&mut map, e);
                }
                serde_json::to_vec_pretty(&map).map_err(|e| e.to_string())?
            };
            std::fs::write(path, &text).map_err(|e| e.to_string())?;
            let (b, v, r) = (base_cfg.clone(), variant_cfg.clone(), repo.clone());
            let out = check_bounded("config.json", text.len(), 64, 8 * MIB, move || {
                let base = tptt::config::read_json_object(&b).map_err(|e| e.to_string())?;
                let tptt = tptt::config::read_json_object(&v).map_err(|e| e.to_string())?;
                tptt::config::merge_configs(&base, &b, &tptt, &v).map_err(|e| e.to_string())?;
                load_and_run(&r)
            });
            std::fs::write(path, &texts[which]).map_err(|e| e.to_string())?;
            out
        },
    );
}
