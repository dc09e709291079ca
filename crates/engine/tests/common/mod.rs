//! Shared helpers of the engine's integration tests: the tiny fixture repos
//! (`tests/fixtures/tiny`, both bases, every variant), deterministic token ids, a scratch folder.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokenizers::Tokenizer;
use tptt::model::{LoadOptions, Model};
use tptt::repo::{TpttRepo, VariantFiles};
use tptt_engine::ModelIdentity;

/// Tiny fixture repos: two base architectures, and OpenELM (layers of different widths).
pub const REPOS: [&str; 3] = ["tptt-llama", "tptt-qwen2", "tptt-openelm"];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// The variant names of a fixture repo (Llama and Qwen2: 16 each, every operator mode among
/// them; OpenELM: 3).
pub fn variants(repo: &str) -> Vec<String> {
    TpttRepo::open(fixtures().join(repo))
        .expect("open fixture repo")
        .variants
}

/// A fixture variant, loaded.
pub struct Fixture {
    pub files: VariantFiles,
    pub model: Model,
}

impl Fixture {
    pub fn load(repo: &str, variant: &str) -> Self {
        let files = TpttRepo::open(fixtures().join(repo))
            .and_then(|r| r.variant(Some(variant), None))
            .unwrap_or_else(|e| panic!("{repo}/{variant}: {e}"));
        let model = Model::load(&files, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{repo}/{variant}: {e}"));
        Self { files, model }
    }

    /// A synthetic Llama repo (`tptt::synth`, heads of 32 values: the 8-bit KV cache needs
    /// whole blocks, which no committed fixture has) written under `dir`: its base, a
    /// `delta_product` variant (mag 0.5) and the Llama fixture's tokenizer (300 ids, inside its
    /// vocabulary of 320), loaded.
    pub fn synthetic_d32(dir: &Path) -> Self {
        let shape = tptt::synth::LlamaShape::SMALL_D32;
        let f32 = candle_core::DType::F32;
        tptt::synth::write_repo(dir, &shape, f32, 17, "delta_product", "delta_product", 0.5)
            .expect("synthetic repo");
        let from = fixtures().join("tptt-llama/delta_product");
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            std::fs::copy(from.join(f), dir.join("delta_product").join(f)).expect("tokenizer");
        }
        let files = TpttRepo::open(dir)
            .and_then(|r| r.variant(Some("delta_product"), None))
            .expect("synthetic variant found");
        let model = Model::load(&files, &LoadOptions::default()).expect("synthetic model loads");
        Self { files, model }
    }

    pub fn label(&self) -> String {
        format!(
            "{}/{}",
            self.files
                .dir
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            self.files.name
        )
    }

    /// The identity a snapshot of this variant carries (as the CLI builds it).
    pub fn identity(&self) -> ModelIdentity {
        identity_for(&self.files, &self.model)
    }

    pub fn tokenizer(&self) -> Tokenizer {
        let path = self
            .files
            .tokenizer
            .as_ref()
            .expect("fixture has a tokenizer.json");
        Tokenizer::from_file(path).expect("fixture tokenizer loads")
    }

    pub fn arc(&self) -> Arc<Model> {
        Arc::new(self.model.clone())
    }
}

pub fn identity_for(files: &VariantFiles, model: &Model) -> ModelIdentity {
    let root = files.dir.parent().unwrap_or(&files.dir);
    ModelIdentity::of(root.display().to_string(), files, model.config())
        .expect("the fixture's weight files are readable")
}

/// `n` deterministic pseudo-random token ids in `[0, vocab)` (xorshift, seeded).
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Max |a − b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// A scratch folder, deleted on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tptt-engine-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
