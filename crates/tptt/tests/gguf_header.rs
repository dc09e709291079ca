//! GGUF headers written by strangers: a small builder writes a valid header for a tiny llama
//! base, and each test corrupts one field. Every corrupt file is refused by
//! `tptt::gguf::read_config` (the way `tptt inspect` / a repo with a GGUF base reads it) with an
//! `Error::Weights` that names the file and the field, never a panic (a `general.alignment` of
//! 0 panicked inside candle), never an allocation of what the header claims.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tptt::gguf::header::{self, MAX_METADATA_ELEMENTS, MAX_VALUE_DEPTH};
use tptt::Error;

#[path = "support/gguf.rs"]
mod gguf;
use gguf::{Gguf, ARRAY, F32, Q4_0, STRING, U32, U64, U8};

/// A scratch folder, deleted on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tptt-gguf-header-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        Self(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write gguf");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `read_config` of `bytes` fails with `Error::Weights` naming the file and every word.
fn refused(sc: &Scratch, what: &str, bytes: &[u8], words: &[&str]) {
    let path = sc.write("bad.gguf", bytes);
    let msg = match tptt::gguf::read_config(&path) {
        Err(e @ Error::Weights { .. }) => e.to_string(),
        Err(e) => panic!("{what}: expected Error::Weights, got {e:?}"),
        Ok(_) => panic!("{what}: the corrupt GGUF was accepted"),
    };
    eprintln!("{what}: {msg}");
    assert!(
        msg.contains("bad.gguf"),
        "{what}: the file is not named: {msg}"
    );
    for w in words {
        assert!(msg.contains(w), "{what}: {w:?} is not named: {msg}");
    }
}

#[test]
fn the_valid_header_reads_in_both_versions() {
    let sc = Scratch::new();
    for version in [1, 2, 3] {
        let v = Gguf::valid_version(version);
        let path = sc.write("ok.gguf", &v.bytes());
        let h = header::check_file(&path).expect("valid header");
        assert_eq!(h.version, version);
        assert_eq!(h.alignment, 32);
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].dims, [8, 4]);
        assert_eq!(h.tensors[0].bytes, 128);
        let cfg = tptt::gguf::read_config(&path).expect("config of a valid GGUF");
        assert_eq!((cfg.vocab_size, cfg.hidden_size), (4, 8));
    }
    let path = sc.write("ok.gguf", &Gguf::valid().bytes());
    tptt::gguf::read_config(&path).expect("the builder's file is valid");
}

#[test]
fn alignment_zero_not_a_power_of_two_or_of_another_type() {
    let sc = Scratch::new();
    for (ty, value, words) in [
        // 0 divided by zero inside candle: a panic.
        (
            U32,
            0u32.to_le_bytes().to_vec(),
            &["general.alignment", "is 0"][..],
        ),
        (
            U32,
            24u32.to_le_bytes().to_vec(),
            &["general.alignment", "24"],
        ),
        (
            U64,
            64u64.to_le_bytes().to_vec(),
            &["general.alignment", "value type 10"],
        ),
        (U8, vec![0u8], &["general.alignment", "is 0"]),
    ] {
        let mut g = Gguf::valid();
        g.set_kv("general.alignment", ty, &value);
        refused(&sc, &format!("alignment {value:?}"), &g.bytes(), words);
    }
}

#[test]
fn magic_version_and_counts() {
    let sc = Scratch::new();
    let mut g = Gguf::valid();
    g.magic = *b"GGUG";
    refused(&sc, "magic", &g.bytes(), &["magic"]);
    let mut g = Gguf::valid();
    g.version = 4;
    refused(&sc, "version", &g.bytes(), &["version 4"]);
    let mut g = Gguf::valid();
    g.tensor_count = Some(1 << 40);
    refused(
        &sc,
        "tensor count",
        &g.bytes(),
        &["tensor_count 1099511627776"],
    );
    let mut g = Gguf::valid();
    g.kv_count = Some(u64::MAX);
    refused(&sc, "metadata count", &g.bytes(), &["metadata_kv_count"]);
    // One entry more than there is: the walk runs into the tensor infos and then the end.
    let mut g = Gguf::valid();
    g.tensor_count = Some(3);
    refused(&sc, "one tensor too many", &g.bytes(), &[]);
    // A layer count of billions in a well-formed header: refused at once (the loader used to
    // walk every claimed layer, for a minute), in read_config and in load.
    let mut g = Gguf::valid();
    let key = g.string("llama.block_count");
    g.kvs.retain(|kv| !kv.starts_with(&key));
    g.kv_u32("llama.block_count", u32::MAX);
    let started = std::time::Instant::now();
    refused(
        &sc,
        "layer count",
        &g.bytes(),
        &["block_count is 4294967295"],
    );
    let path = sc.write("layers.gguf", &g.bytes());
    let err = tptt::gguf::load(&path, &candle_core::Device::Cpu).expect_err("refused");
    assert!(err.to_string().contains("block_count"), "{err}");
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
}

#[test]
fn strings_past_the_end_of_the_file() {
    let sc = Scratch::new();
    let mut g = Gguf::valid();
    let mut value = (1u64 << 40).to_le_bytes().to_vec();
    value.extend_from_slice(b"tiny");
    g.set_kv("general.name", STRING, &value);
    refused(
        &sc,
        "value string",
        &g.bytes(),
        &["general.name", "string of 1099511627776 bytes"],
    );

    // A key whose length runs past the end.
    let mut g = Gguf::valid();
    let mut raw = (1u64 << 33).to_le_bytes().to_vec();
    raw.extend_from_slice(b"general.x");
    g.kvs.insert(0, raw);
    refused(&sc, "key", &g.bytes(), &["metadata key 0", "8589934592"]);

    // A tensor name likewise.
    let mut g = Gguf::valid();
    g.tensors[1][..8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    refused(&sc, "tensor name", &g.bytes(), &["tensor 1: name"]);
}

#[test]
fn arrays_whose_length_overflows_or_runs_past_the_end() {
    let sc = Scratch::new();
    let array = |elem: u32, count: u64| {
        let mut v = elem.to_le_bytes().to_vec();
        v.extend_from_slice(&count.to_le_bytes());
        v
    };
    for (elem, count) in [
        (U64, 1u64 << 61),
        (U64, u64::MAX),
        (STRING, 1 << 40),
        (U8, 1 << 30),
    ] {
        let mut g = Gguf::valid();
        g.kv("tokenizer.ggml.scores", ARRAY, &array(elem, count));
        refused(
            &sc,
            &format!("array of {count} × type {elem}"),
            &g.bytes(),
            &[
                "tokenizer.ggml.scores",
                &format!("an array of {count} elements"),
            ],
        );
    }
    // Arrays of arrays, nested deeper than allowed (each level holds one array).
    let mut value = Vec::new();
    for _ in 0..=MAX_VALUE_DEPTH {
        value.extend(array(ARRAY, 1));
    }
    value.extend(array(U8, 0));
    let mut g = Gguf::valid();
    g.kv("deep", ARRAY, &value);
    refused(&sc, "deep arrays", &g.bytes(), &["\"deep\"", "nested"]);
    // More elements in all than the metadata may hold (each would be a 32-byte value in candle).
    let n = MAX_METADATA_ELEMENTS / 2 + 1;
    let mut value = array(U8, n);
    value.resize(value.len() + n as usize, 0);
    let mut g = Gguf::valid();
    g.kv("a", ARRAY, &value);
    g.kv("b", ARRAY, &value);
    refused(
        &sc,
        "too many elements",
        &g.bytes(),
        &["\"b\"", "array elements"],
    );
    // An unknown value type.
    let mut g = Gguf::valid();
    g.set_kv("general.name", 13, &[]);
    refused(
        &sc,
        "value type 13",
        &g.bytes(),
        &["general.name", "unknown value type 13"],
    );
}

#[test]
fn tensor_infos_with_impossible_dimensions_types_or_offsets() {
    let sc = Scratch::new();
    let with_tensor = |dims: &[u64], ty: u32, offset: u64| {
        let mut g = Gguf::valid();
        g.tensors.truncate(1);
        g.tensor("output_norm.weight", dims, ty, offset);
        g.bytes()
    };
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "5 dimensions",
            with_tensor(&[8, 1, 1, 1, 1], F32, 128),
            &["output_norm.weight", "5 dimensions"],
        ),
        (
            // An empty tensor: candle's read of it panicked (a misaligned empty buffer).
            "a zero dimension",
            with_tensor(&[8, 0], F32, 128),
            &["output_norm.weight", "dimension 1 is 0"],
        ),
        (
            "a dimension product beyond u64",
            with_tensor(&[1 << 32, 1 << 32, 2], F32, 128),
            &["output_norm.weight", "multiply"],
        ),
        (
            "a size beyond u64",
            with_tensor(&[1 << 62], F32, 128),
            &["output_norm.weight", "overflows"],
        ),
        (
            "data past the end",
            with_tensor(&[8], F32, 1 << 20),
            &["output_norm.weight", "past the end of the file"],
        ),
        (
            "offset + size beyond u64",
            with_tensor(&[8], F32, u64::MAX - 31),
            &["output_norm.weight", "past the end of the file"],
        ),
        (
            "misaligned offset",
            with_tensor(&[8], F32, 132),
            &["output_norm.weight", "132", "multiple"],
        ),
        (
            "unknown ggml type",
            with_tensor(&[8], 99, 128),
            &["output_norm.weight", "ggml type 99"],
        ),
        (
            "a removed ggml type",
            with_tensor(&[8], 4, 128),
            &["output_norm.weight", "ggml type 4"],
        ),
        (
            "an i-quant candle does not read",
            with_tensor(&[256], 23, 128),
            &["output_norm.weight", "ggml type 23 (IQ4_XS)", "Q4_K_M"],
        ),
        (
            "rows not whole blocks",
            with_tensor(&[10, 2], Q4_0, 128),
            &["output_norm.weight", "blocks of 32"],
        ),
    ];
    for (what, bytes, words) in cases {
        refused(&sc, what, &bytes, words);
        // Loading the weights goes through the same check.
        let path = sc.write("bad.gguf", &bytes);
        assert!(
            matches!(
                tptt::gguf::load(&path, &candle_core::Device::Cpu),
                Err(Error::Weights { .. })
            ),
            "{what}: load"
        );
    }
    let mut g = Gguf::valid();
    g.tensor("output_norm.weight", &[8], F32, 128);
    refused(
        &sc,
        "duplicate tensor",
        &g.bytes(),
        &["output_norm.weight", "twice"],
    );
    let mut g = Gguf::valid();
    g.kv_u32("llama.block_count", 2);
    refused(
        &sc,
        "duplicate key",
        &g.bytes(),
        &["llama.block_count", "twice"],
    );
}

#[test]
fn every_truncation_is_refused() {
    let sc = Scratch::new();
    let good = Gguf::valid().bytes();
    for len in 0..good.len() {
        let path = sc.write("cut.gguf", &good[..len]);
        match tptt::gguf::read_config(&path) {
            Err(Error::Weights { .. }) => {}
            other => panic!("cut to {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn a_repo_whose_gguf_base_is_corrupt_names_the_file() {
    // `tptt inspect REPO --base FILE.gguf` and every load of such a repo read the base config
    // from the GGUF: the check runs there, before candle.
    let sc = Scratch::new();
    let mut g = Gguf::valid();
    g.set_kv("general.alignment", U32, &0u32.to_le_bytes());
    let gguf = sc.write("base.gguf", &g.bytes());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/tptt-llama");
    let repo = tptt::repo::TpttRepo::open(&repo).expect("fixture repo");
    match repo.variant(Some("delta_product"), Some(&gguf)) {
        Err(e @ Error::Weights { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("base.gguf") && msg.contains("general.alignment"),
                "{msg}"
            );
        }
        Err(e) => panic!("expected Error::Weights, got {e:?}"),
        Ok(_) => panic!("a GGUF base with alignment 0 was accepted"),
    }
}
