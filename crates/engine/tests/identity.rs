//! Model identities (`tptt_engine::identity`): the config hash is written field by field under
//! fixed names (pinned here, so a change to it is a deliberate one), every numeric setting
//! changes it, and the weights fingerprint tells a retrained adapter with the same shapes from
//! the original, so a snapshot is never restored onto weights that did not compute it.

mod common;

use std::path::Path;

use common::{token_ids, Fixture, Scratch};
use tptt::config::RopeScaling;
use tptt::model::{LoadOptions, Model};
use tptt::repo::TpttRepo;
use tptt_engine::identity::{canonical_config, config_hash, weights_hash};
use tptt_engine::{snapshot, Error, ModelIdentity, Session, SessionOptions};

/// The config hash of `tests/fixtures/tiny/tptt-llama/delta_product`. Saved chats are keyed by
/// it: if this test fails, every user's snapshots stop matching (their chats are read again).
/// Change the value only together with a change of the numerics. (XXH3-64 of the length-prefixed
/// canonical text: the value was checked with PyPI's `xxhash`, the reference C implementation.)
const DELTA_PRODUCT_CONFIG_HASH: &str = "3f64d498cd666691";

#[test]
fn the_config_hash_is_pinned_and_independent_of_paths() {
    let fx = Fixture::load("tptt-llama", "delta_product");
    let text = canonical_config(fx.model.config());
    for line in [
        "model_type=llama\n",
        "operator_mode=delta_product\n",
        "recurrent=order=2,alpha=c,beta=k,linear=true,trick=dt\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert!(
        !text.contains("llama-base"),
        "paths are not numerics:\n{text}"
    );
    assert_eq!(
        config_hash(fx.model.config()),
        DELTA_PRODUCT_CONFIG_HASH,
        "{text}"
    );

    let mut moved = fx.model.config().clone();
    moved.tptt.base_model_name = "/elsewhere/llama-base".into();
    moved.tptt.base_model_subfolder = Some("sub".into());
    assert_eq!(config_hash(&moved), DELTA_PRODUCT_CONFIG_HASH);
}

#[test]
fn every_numeric_setting_changes_the_config_hash() {
    let fx = Fixture::load("tptt-llama", "delta_product");
    let base = fx.model.config().clone();
    type Change = fn(&mut tptt::config::ModelConfig);
    let changes: &[(&str, Change)] = &[
        ("hidden_size", |c| c.base.hidden_size += 1),
        ("intermediate_size", |c| c.base.intermediate_size += 1),
        ("num_layers", |c| c.base.num_layers += 1),
        ("num_kv_heads", |c| c.base.num_kv_heads += 1),
        ("rms_norm_eps", |c| c.base.rms_norm_eps *= 2.0),
        ("rope_theta", |c| c.base.rope_theta += 1.0),
        ("rope_scaling", |c| {
            c.base.rope_scaling = RopeScaling::Linear { factor: 2.0 }
        }),
        ("vocab_size", |c| c.base.vocab_size += 1),
        ("tie_word_embeddings", |c| {
            c.base.tie_word_embeddings = !c.base.tie_word_embeddings
        }),
        ("layer_windows", |c| c.base.layer_windows[0] = Some(4)),
        ("attn_scale", |c| c.base.attn_scale *= 0.5),
        ("final_logit_softcap", |c| {
            c.base.final_logit_softcap = Some(30.0)
        }),
        ("clip_qkv", |c| c.base.clip_qkv = Some(8.0)),
        ("mag_weight", |c| c.tptt.mag_weight += 0.125),
        ("cross_gate", |c| c.tptt.cross_gate = !c.tptt.cross_gate),
        ("max_self_attn_length", |c| {
            c.tptt.max_self_attn_length = Some(7)
        }),
        ("max_chunk_size", |c| c.tptt.max_chunk_size += 1),
        ("recurrent order", |c| c.tptt.recurrent.order = 1),
        ("lora", |c| c.tptt.lora = None),
    ];
    let mut seen = vec![config_hash(&base)];
    for (what, change) in changes {
        let mut c = base.clone();
        change(&mut c);
        let h = config_hash(&c);
        assert!(!seen.contains(&h), "{what} did not change the config hash");
        seen.push(h);
    }
}

/// Copy `src` into `dst` (flat folders only: the fixture variants and bases).
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
}

/// The fixture variant `tptt-llama/delta_product` and its base, copied under `root`.
fn copied_variant(root: &Path) -> tptt::repo::VariantFiles {
    let tiny = common::fixtures();
    copy_dir(
        &tiny.join("tptt-llama/delta_product"),
        &root.join("tptt-llama/delta_product"),
    );
    copy_dir(&tiny.join("llama-base"), &root.join("llama-base"));
    TpttRepo::open(root.join("tptt-llama"))
        .and_then(|r| r.variant(Some("delta_product"), None))
        .expect("the copy opens")
}

#[test]
fn a_retrained_adapter_with_the_same_shapes_is_other_weights() {
    let scratch = Scratch::new("weights");
    let files = copied_variant(&scratch.0);
    let original = weights_hash(&files).expect("fingerprint");
    // A copy has the fingerprint of the original: only the contents count.
    let fx = Fixture::load("tptt-llama", "delta_product");
    assert_eq!(original, weights_hash(&fx.files).expect("fingerprint"));

    let model = Model::load(&files, &LoadOptions::default()).expect("load");
    let identity = ModelIdentity::of("copy", &files, model.config()).expect("identity");
    assert_eq!(identity.weights, original);
    let mut session = Session::new(std::sync::Arc::new(model), SessionOptions::default());
    session
        .feed(&token_ids(12, fx.model.config().base.vocab_size, 7), None)
        .expect("feed");
    let snap = scratch.path("s.tptt-state");
    snapshot::save(&session, &identity, &snap).expect("save");

    // "Retrain" the adapter: one value changes, the header and the length stay.
    let adapter = files.adapter.clone().expect("the fixture has an adapter");
    let mut bytes = std::fs::read(&adapter).expect("read");
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&adapter, &bytes).expect("write");
    let retrained = Model::load(&files, &LoadOptions::default()).expect("load");
    let new_identity = ModelIdentity::of("copy", &files, retrained.config()).expect("identity");
    assert_eq!(new_identity.config_hash, identity.config_hash);
    assert_ne!(new_identity.weights, identity.weights);
    match snapshot::load(std::sync::Arc::new(retrained), &new_identity, &snap) {
        Err(Error::Snapshot { reason, .. }) => {
            assert!(reason.contains("other weights"), "{reason}")
        }
        Err(e) => panic!("expected a snapshot error, got {e:?}"),
        Ok(_) => panic!("a snapshot was restored onto weights that did not compute it"),
    }

    // A base file of another length is another base.
    let base = files.base_dir.join("model.safetensors");
    let mut bytes = std::fs::read(&base).expect("read");
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&base, &bytes).expect("write");
    assert_ne!(
        weights_hash(&files).expect("fingerprint"),
        new_identity.weights
    );

    // Missing weight files are an error naming the file, not a panic.
    std::fs::remove_file(&adapter).expect("rm");
    let mut gone = files.clone();
    gone.adapter = Some(adapter.clone());
    match weights_hash(&gone) {
        Err(Error::Io { path, .. }) => assert_eq!(path, adapter),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}
