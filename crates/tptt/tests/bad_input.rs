//! Bad input never panics: every broken repo, config, weight file or id list gives a specific
//! [`tptt::Error`] whose message names the culprit (file, key, value).
//!
//! Each test copies a tiny fixture repo variant and its base (`tests/fixtures/tiny`) into a
//! scratch folder, breaks one thing, runs the whole pipeline (open → variant → load → forward)
//! and hands the first error to `check`, which asserts the variant and the words of the message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Map, Value};
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt::repo::TpttRepo;
use tptt::Error;

// ---------------------------------------------------------------------------------------------
// Scratch copies of the fixtures.

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create scratch folder");
    for entry in std::fs::read_dir(from).expect("fixture folder is committed") {
        let entry = entry.expect("fixture entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
        }
    }
}

/// A copy of one fixture repo (some of its variants) and its base, deleted on drop:
/// `<scratch>/tptt-<arch>/<variant>/…` and `<scratch>/<arch>-base/…`, so the relative
/// `base_model_name` resolves next to the repo as it does in the fixtures.
struct Fx {
    root: PathBuf,
    repo: PathBuf,
    base: PathBuf,
    variant: String,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Fx {
    fn new(arch: &str, variants: &[&str]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("tptt-bad-input-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let repo = root.join(format!("tptt-{arch}"));
        let base = root.join(format!("{arch}-base"));
        for v in variants {
            copy_dir(
                &fixtures().join(format!("tptt-{arch}")).join(v),
                &repo.join(v),
            );
        }
        copy_dir(&fixtures().join(format!("{arch}-base")), &base);
        Self {
            root,
            repo,
            base,
            variant: variants[0].to_string(),
        }
    }

    fn llama(variant: &str) -> Self {
        Self::new("llama", &[variant])
    }

    fn qwen2(variant: &str) -> Self {
        Self::new("qwen2", &[variant])
    }

    fn dir(&self) -> PathBuf {
        self.repo.join(&self.variant)
    }

    fn config(&self) -> PathBuf {
        self.dir().join("config.json")
    }

    fn adapter(&self) -> PathBuf {
        self.dir().join("adapter_model.safetensors")
    }

    fn base_config(&self) -> PathBuf {
        self.base.join("config.json")
    }

    /// Load the variant: the whole path a caller takes, so every stage can report.
    fn load(&self) -> tptt::Result<Model> {
        let repo = TpttRepo::open(&self.repo)?;
        let files = repo.variant(Some(&self.variant), None)?;
        Model::load(&files, &LoadOptions::default())
    }

    /// Load and run `ids` through one full forward.
    fn run(&self, ids: &[u32]) -> tptt::Result<()> {
        self.load()?.forward_full(ids).map(|_| ())
    }

    fn run_ok(&self) -> tptt::Result<()> {
        self.run(&[1, 5, 9])
    }
}

// ---------------------------------------------------------------------------------------------
// Ways to break things.

fn edit_json(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let text = std::fs::read_to_string(path).expect("read json");
    let mut value: Value = serde_json::from_str(&text).expect("fixture json");
    edit(value.as_object_mut().expect("json object"));
    std::fs::write(
        path,
        serde_json::to_string_pretty(&value).expect("serialize"),
    )
    .expect("write json");
}

fn truncate(path: &Path, keep: usize) {
    let bytes = std::fs::read(path).expect("read");
    std::fs::write(path, &bytes[..keep.min(bytes.len())]).expect("write");
}

fn truncate_by(path: &Path, drop: usize) {
    let len = std::fs::metadata(path).expect("metadata").len() as usize;
    truncate(path, len - drop);
}

fn patch_bytes(path: &Path, at: usize, with: &[u8]) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at..at + with.len()].copy_from_slice(with);
    std::fs::write(path, bytes).expect("write");
}

/// One tensor of a safetensors file, owned.
#[derive(Clone)]
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn f32(shape: &[usize]) -> Self {
        let n: usize = shape.iter().product();
        Self {
            dtype: safetensors::Dtype::F32,
            shape: shape.to_vec(),
            data: vec![0u8; 4 * n],
        }
    }
}

/// Rewrite a safetensors file through the `safetensors` crate (a well-formed file whose
/// *content* is wrong).
fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, Raw>)) {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut map: BTreeMap<String, Raw> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                Raw {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = map
        .iter()
        .map(|(k, r)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), &r.data)
                    .expect("view"),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, out).expect("write safetensors");
}

fn rename_key(map: &mut BTreeMap<String, Raw>, from: &str, to: &str) {
    let t = map
        .remove(from)
        .unwrap_or_else(|| panic!("fixture has no tensor {from}"));
    map.insert(to.to_string(), t);
}

const Q_A: &str = "model.model.layers.0.self_attn.base_attn.q_proj.lora_A.default.weight";
const Q_B: &str = "model.model.layers.0.self_attn.base_attn.q_proj.lora_B.default.weight";
const V1_A: &str = "model.model.layers.1.self_attn.base_attn.v_proj.lora_A.default.weight";
const V1_B: &str = "model.model.layers.1.self_attn.base_attn.v_proj.lora_B.default.weight";

// ---------------------------------------------------------------------------------------------
// The check.

/// Assert that `result` failed with an error that `is` accepts and whose message holds every
/// word of `names`.
fn check(result: tptt::Result<()>, is: fn(&Error) -> bool, names: &[&str]) {
    let err = match result {
        Ok(()) => panic!("expected an error, got success"),
        Err(e) => e,
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(is(&err), "wrong error variant: {err:?}\nmessage: {msg}");
    for name in names {
        assert!(msg.contains(name), "message does not name {name:?}: {msg}");
    }
}

#[test]
fn the_fixtures_load_unbroken() {
    // Guards every test below: each breaks exactly one thing of a copy that works.
    Fx::llama("delta_rule").run_ok().expect("llama delta_rule");
    Fx::qwen2("delta_rule_nolora")
        .run_ok()
        .expect("qwen2 delta_rule_nolora");
}

// ---------------------------------------------------------------------------------------------
// Truncated or corrupt safetensors.

#[test]
fn truncated_adapter() {
    let fx = Fx::llama("delta_rule");
    truncate_by(&fx.adapter(), 100);
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors", "truncated"],
    );
}

#[test]
fn adapter_truncated_inside_its_header() {
    let fx = Fx::llama("delta_rule");
    truncate(&fx.adapter(), 50);
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors", "truncated"],
    );
}

#[test]
fn adapter_shorter_than_a_header() {
    let fx = Fx::llama("delta_rule");
    truncate(&fx.adapter(), 3);
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors"],
    );
}

#[test]
fn empty_adapter_file() {
    let fx = Fx::llama("delta_rule");
    truncate(&fx.adapter(), 0);
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors", "0 bytes"],
    );
}

#[test]
fn adapter_header_bytes_flipped() {
    let fx = Fx::llama("delta_rule");
    patch_bytes(&fx.adapter(), 8, b"#!");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors", "JSON"],
    );
}

#[test]
fn adapter_header_length_absurd() {
    let fx = Fx::llama("delta_rule");
    patch_bytes(&fx.adapter(), 0, &u64::MAX.to_le_bytes());
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors"],
    );
}

#[test]
fn adapter_is_not_safetensors_at_all() {
    let fx = Fx::llama("delta_rule");
    std::fs::write(
        fx.adapter(),
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 30784\n",
    )
    .expect("write");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors"],
    );
}

#[test]
fn adapter_tensor_shape_overflows() {
    // A header whose shape product overflows usize: must be refused, not wrap or panic.
    let fx = Fx::llama("delta_rule");
    let header = format!(
        r#"{{"{Q_A}":{{"dtype":"F32","shape":[{big},{big}],"data_offsets":[0,16]}}}}"#,
        big = u64::MAX / 2
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(fx.adapter(), bytes).expect("write");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors"],
    );
}

/// Rewrite the JSON header of a safetensors file (the data stays), length prefix updated.
fn edit_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let bytes = std::fs::read(path).expect("read safetensors");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header json");
    edit(header.as_object_mut().expect("header object"));
    let json = serde_json::to_vec(&header).expect("serialize header");
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).expect("write safetensors");
}

#[test]
fn weight_headers_that_lie_about_offsets() {
    // The safetensors crate checks every tensor's offsets (in order, contiguous, as long as
    // its shape and dtype say, inside the file) before anything is read: confirmed here for
    // the base weights, each lie on its own.
    let name = "model.layers.0.self_attn.q_proj.weight";
    let offsets = |m: &Map<String, Value>| -> (u64, u64) {
        let o = &m[name]["data_offsets"];
        (o[0].as_u64().expect("start"), o[1].as_u64().expect("end"))
    };
    type Lie = fn(u64, u64) -> (u64, u64);
    let lies: [(&str, Lie); 5] = [
        ("shorter than its shape", |a, b| (a, b - 4)),
        ("longer than its shape", |a, b| (a, b + 4)),
        ("shifted (overlaps the next tensor)", |a, b| (a + 4, b + 4)),
        ("past the end of the file", |a, b| {
            (a + (1 << 40), b + (1 << 40))
        }),
        ("end before start", |a, b| (b, a)),
    ];
    for (what, lie) in lies {
        let fx = Fx::llama("delta_rule");
        let path = fx.base.join("model.safetensors");
        edit_header(&path, |m| {
            let (a, b) = offsets(m);
            let (a, b) = lie(a, b);
            m[name]["data_offsets"] = json!([a, b]);
        });
        eprintln!("{what}:");
        check(
            fx.run_ok(),
            |e| matches!(e, Error::Weights { .. }),
            &["model.safetensors", "not a valid safetensors file"],
        );
    }
}

#[test]
fn adapter_tensor_of_unsupported_dtype() {
    let fx = Fx::llama("delta_rule");
    rewrite(&fx.adapter(), |m| {
        let t = m.get_mut(Q_A).expect("q lora_A");
        t.dtype = safetensors::Dtype::I32;
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["adapter_model.safetensors", Q_A, "I32"],
    );
}

#[test]
fn truncated_base_weights() {
    let fx = Fx::llama("delta_rule");
    truncate_by(&fx.base.join("model.safetensors"), 1000);
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["llama-base", "model.safetensors", "truncated"],
    );
}

#[test]
fn truncated_base_shard() {
    let fx = Fx::qwen2("delta_rule");
    truncate_by(&fx.base.join("model-00003-of-00009.safetensors"), 7);
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Weights { .. }),
        &["model-00003-of-00009.safetensors"],
    );
}

#[test]
fn missing_base_shard() {
    let fx = Fx::qwen2("delta_rule");
    std::fs::remove_file(fx.base.join("model-00005-of-00009.safetensors")).expect("rm");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_)),
        &[
            "model-00005-of-00009.safetensors",
            "model.safetensors.index.json",
        ],
    );
}

#[test]
fn corrupt_shard_index() {
    let fx = Fx::qwen2("delta_rule");
    std::fs::write(
        fx.base.join("model.safetensors.index.json"),
        "{\"weight_map\": [",
    )
    .expect("write");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Json { .. }),
        &["model.safetensors.index.json"],
    );
}

#[test]
fn shard_index_without_weight_map() {
    let fx = Fx::qwen2("delta_rule");
    std::fs::write(
        fx.base.join("model.safetensors.index.json"),
        "{\"metadata\": {}}",
    )
    .expect("write");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Json { .. }),
        &["model.safetensors.index.json", "weight_map"],
    );
}

#[test]
fn no_base_weights_at_all() {
    let fx = Fx::llama("delta_rule");
    std::fs::remove_file(fx.base.join("model.safetensors")).expect("rm");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_)),
        &["llama-base", "model.safetensors"],
    );
}

#[test]
fn base_tensor_missing() {
    let fx = Fx::llama("delta_rule");
    rewrite(&fx.base.join("model.safetensors"), |m| {
        m.remove("model.norm.weight").expect("norm");
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::MissingTensor { .. }),
        &["model.norm.weight", "llama-base"],
    );
}

#[test]
fn base_tensor_of_wrong_shape() {
    let fx = Fx::llama("delta_rule");
    rewrite(&fx.base.join("model.safetensors"), |m| {
        m.insert(
            "model.layers.1.mlp.up_proj.weight".into(),
            Raw::f32(&[100, 64]),
        );
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &[
            "model.layers.1.mlp.up_proj.weight",
            "[100, 64]",
            "[128, 64]",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Configs.

#[test]
fn variant_config_not_json() {
    let fx = Fx::llama("delta_rule");
    std::fs::write(fx.config(), "{ \"model_type\": \"tptt\", ").expect("write");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Json { .. }),
        &["delta_rule", "config.json"],
    );
}

#[test]
fn variant_config_not_an_object() {
    let fx = Fx::llama("delta_rule");
    std::fs::write(fx.config(), "[1, 2]").expect("write");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Json { .. }),
        &["delta_rule", "config.json", "object"],
    );
}

#[test]
fn variant_config_is_not_tptt() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.remove("base_model_name");
        m.insert("model_type".into(), json!("llama"));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_) | Error::Config { .. }),
        &["delta_rule", "config.json", "base_model_name"],
    );
}

#[test]
fn missing_base_model_name() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.remove("base_model_name");
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["delta_rule", "config.json", "base_model_name"],
    );
}

#[test]
fn base_config_missing_required_keys() {
    for key in [
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ] {
        let fx = Fx::llama("delta_rule");
        // The TPTT config carries merged copies of the base keys: remove the key from both.
        edit_json(&fx.base_config(), |m| {
            m.remove(key);
        });
        edit_json(&fx.config(), |m| {
            m.remove(key);
        });
        check(
            fx.run_ok(),
            |e| matches!(e, Error::Config { .. }),
            &["config.json", key],
        );
    }
}

#[test]
fn base_config_missing() {
    let fx = Fx::llama("delta_rule");
    std::fs::remove_file(fx.base_config()).expect("rm");
    // Without its config.json the folder is no base model: resolution fails and says so.
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_)),
        &["llama-base"],
    );
}

#[test]
fn config_value_of_wrong_type() {
    let cases: &[(&str, Value, bool)] = &[
        ("mag_weight", json!("high"), false),
        ("max_chunk_size", json!("64"), false),
        ("cross_gate", json!("yes"), false),
        ("max_self_attn_length", json!([16]), false),
        ("hidden_size", json!("64"), true),
        ("rms_norm_eps", json!(null), true),
    ];
    for (key, value, in_base) in cases {
        let fx = Fx::llama("delta_rule");
        let path = if *in_base {
            fx.base_config()
        } else {
            fx.config()
        };
        edit_json(&path, |m| {
            m.insert(key.to_string(), value.clone());
        });
        if *in_base {
            edit_json(&fx.config(), |m| {
                m.remove(*key);
            });
        }
        check(
            fx.run_ok(),
            |e| matches!(e, Error::Config { .. }),
            &[key, "config.json"],
        );
    }
}

#[test]
fn tptt_key_of_wrong_type_is_blamed_on_the_tptt_config() {
    // `hidden_size` is merged from the TPTT config over the base: the bad value is in the
    // variant's config.json, so that is the file the message must name.
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("hidden_size".into(), json!("sixty-four"));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["hidden_size", "delta_rule", "config.json"],
    );
}

#[test]
fn config_values_out_of_range() {
    let cases: &[(&str, Value, &str)] = &[
        ("max_chunk_size", json!(0), "max_chunk_size"),
        ("max_self_attn_length", json!(0), "max_self_attn_length"),
        ("max_self_attn_length", json!(-5), "max_self_attn_length"),
        // Beyond `MAX_WINDOW`: accepted before (a window of 2^40 positions).
        (
            "max_self_attn_length",
            json!(1u64 << 40),
            "max_self_attn_length",
        ),
        ("linear_precision", json!("int8"), "int8"),
        (
            "model_task",
            json!("sequence_classification"),
            "sequence_classification",
        ),
        (
            "lora_config",
            json!({"r": 0, "lora_alpha": 16}),
            "lora_config.r",
        ),
        (
            "lora_config",
            json!({"r": 8, "lora_alpha": 16, "use_dora": true}),
            "use_dora",
        ),
    ];
    for (key, value, word) in cases {
        let fx = Fx::llama("delta_rule");
        edit_json(&fx.config(), |m| {
            m.insert(key.to_string(), value.clone());
        });
        check(
            fx.run_ok(),
            |e| matches!(e, Error::Config { .. }),
            &[word, "config.json"],
        );
    }
}

#[test]
fn unknown_operator_mode() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("operator_mode".into(), json!("delta_rule_turbo"));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::UnknownOperatorMode(_)),
        &["delta_rule_turbo", "operator_mode"],
    );
}

#[test]
fn operator_mode_of_wrong_type() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("operator_mode".into(), json!(3));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["operator_mode", "config.json"],
    );
}

#[test]
fn unknown_architecture() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.base_config(), |m| {
        m.insert("model_type".into(), json!("gpt2"));
        m.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::UnsupportedArchitecture(_)),
        &["gpt2", "llama", "qwen2"],
    );
}

#[test]
fn unknown_architecture_without_model_type() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.base_config(), |m| {
        m.remove("model_type");
        m.insert("architectures".into(), json!(["MambaForCausalLM"]));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::UnsupportedArchitecture(_)),
        &["MambaForCausalLM"],
    );
}

#[test]
fn unsupported_activation() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("hidden_act".into(), json!("gelu"));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["hidden_act", "gelu"],
    );
}

#[test]
fn operator_mode_null_uses_alpha_gate_one() {
    // tptt 0.12.1 falls back to alpha_gate "1", which its gate map lacks: it cannot load this.
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("operator_mode".into(), Value::Null);
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["operator_mode", "alpha_gate", "\"1\"", "config.json"],
    );
}

#[test]
fn operator_mode_null_with_unknown_gates() {
    let cases: &[(&str, &str)] = &[("alpha_gate", "q"), ("beta_gate", "1")];
    for (key, value) in cases {
        let fx = Fx::llama("delta_rule");
        edit_json(&fx.config(), |m| {
            m.insert("operator_mode".into(), Value::Null);
            m.insert("alpha_gate".into(), json!("k"));
            m.insert(key.to_string(), json!(value));
        });
        check(
            fx.run_ok(),
            |e| matches!(e, Error::Config { .. }),
            &[key, &format!("{value:?}"), "config.json"],
        );
    }
}

#[test]
fn bidirectional() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("bidirectional".into(), json!(true));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["bidirectional", "config.json"],
    );
}

// ---------------------------------------------------------------------------------------------
// Adapters.

#[test]
fn lora_tensor_of_wrong_shape() {
    let cases: &[(&str, &[usize])] = &[(Q_A, &[8, 32]), (Q_B, &[64, 4]), (V1_B, &[8, 32])];
    for (key, shape) in cases {
        let fx = Fx::llama("delta_rule");
        rewrite(&fx.adapter(), |m| {
            m.insert(key.to_string(), Raw::f32(shape));
        });
        let got = format!("{shape:?}");
        check(
            fx.run_ok(),
            |e| matches!(e, Error::AdapterShapeMismatch { .. }),
            &["adapter_model.safetensors", key, &got],
        );
    }
}

#[test]
fn lora_rank_differs_from_config() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m["lora_config"]["r"] = json!(4);
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::AdapterShapeMismatch { .. }),
        &["adapter_model.safetensors", "lora_A", "r = 4", "[8, 64]"],
    );
}

#[test]
fn full_weight_of_wrong_shape() {
    let fx = Fx::qwen2("delta_rule_nolora");
    let key = "model.layers.1.self_attn.base_attn.k_proj.bias";
    rewrite(&fx.adapter(), |m| {
        m.insert(key.into(), Raw::f32(&[64]));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::AdapterShapeMismatch { .. }),
        &["adapter_model.safetensors", key, "[64]", "[32]"],
    );
}

#[test]
fn adapter_key_that_matches_nothing() {
    let cases: &[(&str, &str)] = &[
        (
            Q_A,
            "model.model.layers.7.self_attn.base_attn.q_proj.lora_A.default.weight",
        ),
        (
            Q_B,
            "model.model.layers.0.self_attn.base_attn.qq_proj.lora_B.default.weight",
        ),
        (
            Q_A,
            "model.model.layers.0.self_attn.base_attn.q_proj.lora_A.default.weight.extra",
        ),
        (Q_A, "lonely"),
    ];
    for (from, to) in cases {
        let fx = Fx::llama("delta_rule");
        rewrite(&fx.adapter(), |m| rename_key(m, from, to));
        check(
            fx.run_ok(),
            |e| matches!(e, Error::UnexpectedAdapterKey { .. }),
            &["adapter_model.safetensors", to],
        );
    }
}

#[test]
fn full_weight_key_that_matches_nothing() {
    let fx = Fx::qwen2("delta_rule_nolora");
    let to = "model.layers.0.self_attn.base_attn.o_proj.bias"; // qwen2 has no o_proj bias
    rewrite(&fx.adapter(), |m| {
        m.insert(to.into(), Raw::f32(&[64]));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::UnexpectedAdapterKey { .. }),
        &["adapter_model.safetensors", to],
    );
}

#[test]
fn missing_half_of_a_lora_pair() {
    // The message names the adapter key that should be there, beside its partner.
    for gone in [Q_B, V1_A] {
        let fx = Fx::llama("delta_rule");
        rewrite(&fx.adapter(), |m| {
            m.remove(gone).expect("fixture key");
        });
        check(
            fx.run_ok(),
            |e| matches!(e, Error::MissingTensor { .. }),
            &["adapter_model.safetensors", gone],
        );
    }
}

#[test]
fn missing_whole_lora_pair() {
    let fx = Fx::llama("delta_rule");
    rewrite(&fx.adapter(), |m| {
        m.remove(V1_A).expect("fixture key");
        m.remove(V1_B).expect("fixture key");
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::MissingTensor { .. }),
        &[
            "adapter_model.safetensors",
            "model.layers.1.self_attn.v_proj",
            "lora_A",
            "lora_B",
        ],
    );
}

#[test]
fn lora_keys_without_lora_config() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("lora_config".into(), Value::Null);
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["adapter_model.safetensors", "lora_config", "lora_A"],
    );
}

#[test]
fn lora_config_without_adapter_file() {
    let fx = Fx::llama("delta_rule");
    std::fs::remove_file(fx.adapter()).expect("rm");
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_)),
        &["delta_rule", "adapter_model.safetensors"],
    );
}

// ---------------------------------------------------------------------------------------------
// Repos and variants.

#[test]
fn variant_folder_that_does_not_exist() {
    let fx = Fx::new("llama", &["delta_rule", "delta_product"]);
    let repo = TpttRepo::open(&fx.repo).expect("open");
    let err = repo.variant(Some("delta_rule_turbo"), None).map(|_| ());
    check(
        err,
        |e| matches!(e, Error::NotFound(_)),
        &["delta_rule_turbo", "delta_product", "delta_rule"],
    );
}

#[test]
fn several_variants_and_none_chosen() {
    let fx = Fx::new("llama", &["delta_rule", "delta_product"]);
    let repo = TpttRepo::open(&fx.repo).expect("open");
    check(
        repo.variant(None, None).map(|_| ()),
        |e| matches!(e, Error::NotFound(_)),
        &["delta_product", "delta_rule"],
    );
}

#[test]
fn repo_folder_that_does_not_exist() {
    let fx = Fx::llama("delta_rule");
    check(
        TpttRepo::open(fx.root.join("nope")).map(|_| ()),
        |e| matches!(e, Error::NotFound(_)),
        &["nope"],
    );
}

#[test]
fn repo_without_variants() {
    let fx = Fx::llama("delta_rule");
    std::fs::remove_file(fx.config()).expect("rm");
    check(
        TpttRepo::open(&fx.repo).map(|_| ()),
        |e| matches!(e, Error::NotFound(_)),
        &["tptt-llama", "no TPTT variant"],
    );
}

#[test]
fn base_model_that_does_not_exist() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("base_model_name".into(), json!("someone/not-downloaded-7b"));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_)),
        &["someone/not-downloaded-7b", "--base"],
    );
}

#[test]
fn base_model_subfolder_that_does_not_exist() {
    let fx = Fx::llama("delta_rule");
    edit_json(&fx.config(), |m| {
        m.insert("base_model_subfolder".into(), json!("weights"));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::NotFound(_)),
        &["weights"],
    );
}

#[test]
fn base_override_that_is_not_a_folder() {
    let fx = Fx::llama("delta_rule");
    let repo = TpttRepo::open(&fx.repo).expect("open");
    let err = repo
        .variant(Some("delta_rule"), Some(&fx.root.join("elsewhere")))
        .map(|_| ());
    check(err, |e| matches!(e, Error::NotFound(_)), &["elsewhere"]);
}

// ---------------------------------------------------------------------------------------------
// Inputs.

#[test]
fn token_id_outside_the_vocabulary() {
    let fx = Fx::llama("delta_rule");
    let model = fx.load().expect("load");
    for bad in [300u32, u32::MAX] {
        let err = model.forward_full(&[1, bad, 5]).map(|_| ());
        check(
            err,
            |e| matches!(e, Error::Input(_)),
            &[&bad.to_string(), "300"],
        );
    }
}

#[test]
fn a_state_with_an_impossible_window_is_refused_not_a_panic() {
    // `--window 0` reached the ring's `position mod W` and panicked; the flags, configs and
    // snapshots now refuse such a window where it enters, and `forward` refuses a state made
    // with one by hand, on both paths (the fused decode step and the tensor path).
    let fx = Fx::llama("delta_rule");
    let model = fx.load().expect("load");
    for mode in [CarryMode::Continue, CarryMode::Reference] {
        for w in [0, tptt::state::MAX_WINDOW + 1] {
            for ids in [&[1u32][..], &[1, 5, 9]] {
                let mut st = model.new_state(mode, Some(w));
                check(
                    model.forward(ids, &mut st, Logits::Last).map(|_| ()),
                    |e| matches!(e, Error::State(_)),
                    &["window", &w.to_string()],
                );
            }
        }
    }
}

#[test]
fn empty_id_list() {
    let fx = Fx::llama("delta_rule");
    let model = fx.load().expect("load");
    check(
        model.forward_full(&[]).map(|_| ()),
        |e| matches!(e, Error::Input(_)),
        &["no tokens"],
    );
}

#[test]
fn absurd_sizes_in_the_config() {
    // Sizes that disagree with the weights are caught when the tensors are checked.
    let cases: &[(&str, Value, &str)] = &[
        (
            "vocab_size",
            json!(1_000_000_000_000u64),
            "model.embed_tokens.weight",
        ),
        ("intermediate_size", json!(1_000_000_000_000u64), "mlp"),
        ("num_key_value_heads", json!(1), "k_proj"),
    ];
    for (key, value, word) in cases {
        let fx = Fx::llama("delta_rule");
        for path in [fx.base_config(), fx.config()] {
            edit_json(&path, |m| {
                m.insert(key.to_string(), value.clone());
            });
        }
        check(
            fx.run_ok(),
            |e| {
                matches!(
                    e,
                    Error::MissingTensor { .. }
                        | Error::ShapeMismatch { .. }
                        | Error::AdapterShapeMismatch { .. }
                )
            },
            &[word],
        );
    }
}

#[test]
fn head_sizes_whose_product_overflows() {
    let fx = Fx::llama("delta_rule");
    for path in [fx.base_config(), fx.config()] {
        edit_json(&path, |m| {
            m.insert("num_attention_heads".into(), json!(1u64 << 33));
            m.insert("num_key_value_heads".into(), json!(1u64 << 33));
            m.insert("head_dim".into(), json!(1u64 << 32));
        });
    }
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["num_attention_heads", "head_dim", "config.json"],
    );
}

#[test]
fn absurd_layer_count_in_the_config() {
    // A config that asks for 10^12 layers must fail on the first missing layer, not allocate
    // for all of them first. The case runs in a child process: a failed allocation aborts the
    // process, which would take every other test of this file down with it.
    const CHILD: &str = "TPTT_BAD_INPUT_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let fx = Fx::llama("delta_rule");
        for path in [fx.base_config(), fx.config()] {
            edit_json(&path, |m| {
                m.insert("num_hidden_layers".into(), json!(1_000_000_000_000u64));
            });
        }
        check(
            fx.run_ok(),
            |e| matches!(e, Error::MissingTensor { .. }),
            &["model.layers.2."],
        );
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "absurd_layer_count_in_the_config",
            "--test-threads",
            "1",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loading a config with 10^12 layers did not fail cleanly ({}):\n{stderr}",
        out.status
    );
}

#[test]
fn zero_sliding_window() {
    let fx = Fx::llama("delta_rule");
    for path in [fx.base_config(), fx.config()] {
        edit_json(&path, |m| {
            m.insert("sliding_window".into(), json!(0));
        });
    }
    edit_json(&fx.base_config(), |m| {
        m.insert("model_type".into(), json!("mistral"));
        m.insert("architectures".into(), json!(["MistralForCausalLM"]));
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["sliding_window", "config.json"],
    );
}

// ---------------------------------------------------------------------------------------------
// OpenELM: per-layer sizes from the config, fused projections from the weights.

/// Edit a key of an OpenELM variant's config everywhere it is read (the base's config and the
/// copy the TPTT config carries, which overlays it).
fn edit_openelm(fx: &Fx, key: &str, value: Value) {
    for path in [fx.base_config(), fx.config()] {
        edit_json(&path, |m| {
            m.insert(key.into(), value.clone());
        });
    }
}

#[test]
fn openelm_fixture_loads_unbroken() {
    Fx::new("openelm", &["delta_rule"])
        .run_ok()
        .expect("openelm delta_rule");
}

#[test]
fn openelm_per_layer_lists_of_the_wrong_length() {
    for (key, value, words) in [
        (
            "num_query_heads",
            json!([2, 4]),
            "num_query_heads has 2 entries for 3 layers",
        ),
        (
            "num_kv_heads",
            json!([1, 2, 2, 2]),
            "num_kv_heads has 4 entries for 3 layers",
        ),
        (
            "ffn_multipliers",
            json!([0.5, 1.0, 2.0, 4.0]),
            "ffn_multipliers: 4 entries for 3 layers",
        ),
    ] {
        let fx = Fx::new("openelm", &["delta_rule"]);
        edit_openelm(&fx, key, value);
        check(fx.run_ok(), |e| matches!(e, Error::Config { .. }), &[words]);
    }
}

#[test]
fn openelm_head_counts_that_do_not_fit() {
    // KV heads that do not divide the query heads (3 of layer 1's 4), and a group count that
    // changes every layer's heads from what the lists (and the weights) say.
    let fx = Fx::new("openelm", &["delta_rule"]);
    edit_openelm(&fx, "num_kv_heads", json!([1, 3, 2]));
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["num_kv_heads [1, 3, 2]", "[1, 2, 2]"],
    );
    let fx = Fx::new("openelm", &["delta_rule"]);
    edit_openelm(&fx, "num_gqa_groups", json!(0));
    check(
        fx.run_ok(),
        |e| matches!(e, Error::Config { .. }),
        &["num_gqa_groups"],
    );
    // Lists removed, groups changed: the computed heads no longer match the weights.
    let fx = Fx::new("openelm", &["delta_rule"]);
    for path in [fx.base_config(), fx.config()] {
        edit_json(&path, |m| {
            m.remove("num_query_heads");
            m.remove("num_kv_heads");
            m.insert("num_gqa_groups".into(), json!(4));
        });
    }
    check(
        fx.run_ok(),
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &["transformer.layers.0.attn.qkv_proj.weight", "[96, 64]"],
    );
}

#[test]
fn openelm_qkv_rows_that_do_not_match_the_heads() {
    // The plain base (no adapter in the way): the fused projection named as the checkpoint has it.
    let fx = Fx::new("openelm", &["delta_rule"]);
    let name = "transformer.layers.1.attn.qkv_proj.weight";
    rewrite(&fx.base.join("model.safetensors"), |m| {
        m.insert(name.into(), Raw::f32(&[100, 64]));
    });
    let plain = Model::load_plain(
        &fx.base,
        tptt::config::TpttSettings::injected("delta_rule", 0.5, "openelm-base").expect("settings"),
        &LoadOptions::default(),
    );
    check(
        plain.map(|_| ()),
        |e| matches!(e, Error::ShapeMismatch { .. }),
        &[name, "[100, 64]", "[128, 64]"],
    );
    // Through the variant, the adapter's LoRA for it is the first to disagree.
    check(
        fx.run_ok(),
        |e| matches!(e, Error::AdapterShapeMismatch { .. }),
        &["qkv_proj.lora_B", name],
    );
    // A fused FFN projection that is missing.
    let fx = Fx::new("openelm", &["delta_rule"]);
    rewrite(&fx.base.join("model.safetensors"), |m| {
        m.remove("transformer.layers.2.ffn.proj_1.weight");
    });
    check(
        fx.run_ok(),
        |e| matches!(e, Error::MissingTensor { .. }),
        &["transformer.layers.2.ffn.proj_1.weight"],
    );
}
