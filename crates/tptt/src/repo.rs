//! A TPTT repository on disk: one subfolder per variant, each with a TPTT `config.json` and an
//! `adapter_model.safetensors`; the base weights come from `base_model_name`.
//!
//! Base resolution order (first hit wins): an explicit override (`--base DIR`); an absolute path;
//! a path relative to the working directory (as the reference resolves it); relative to the
//! directory that holds the repo; relative to the repo itself; a snapshot in the Hugging Face
//! cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{is_tptt_config, merge_configs, read_json_object, ModelConfig};
use crate::error::{Error, Result};

/// A repo folder and the variants found in it.
#[derive(Debug, Clone)]
pub struct TpttRepo {
    /// The repo folder.
    pub root: PathBuf,
    /// Variant subfolder names, sorted (`"."` when the folder itself is a variant).
    pub variants: Vec<String>,
}

/// Everything needed to load one variant.
#[derive(Debug, Clone)]
pub struct VariantFiles {
    /// Variant name.
    pub name: String,
    /// The variant folder.
    pub dir: PathBuf,
    /// Its TPTT `config.json`.
    pub config_path: PathBuf,
    /// The adapter file, if present.
    pub adapter: Option<PathBuf>,
    /// The base model folder (weights; after `base_model_subfolder`).
    pub base_dir: PathBuf,
    /// A quantized GGUF base given with `--base FILE.gguf` (its metadata replaces the base config).
    pub base_gguf: Option<PathBuf>,
    /// The base `config.json` used for the merge.
    pub base_config_path: PathBuf,
    /// `tokenizer.json`: variant, else repo root, else base.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, same search.
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json`: variant, repo root, base.
    pub generation_config: Option<PathBuf>,
    /// The validated, merged configuration.
    pub config: ModelConfig,
    /// The raw TPTT JSON (for target modules and inspection).
    pub raw: Map<String, Value>,
}

impl TpttRepo {
    /// Find the variants of a repo folder.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::NotFound(format!(
                "repository folder {} does not exist",
                root.display()
            )));
        }
        let mut variants = Vec::new();
        // Subfolders that are not variants, and the first config.json that could not be read.
        let mut others = Vec::new();
        let mut unreadable: Option<Error> = None;
        let entries = std::fs::read_dir(&root).map_err(|source| Error::Io {
            path: root.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            if !p.is_dir() || name.starts_with('.') {
                continue;
            }
            let cfg = p.join("config.json");
            match cfg.is_file().then(|| read_json_object(&cfg)) {
                Some(Ok(m)) if is_tptt_config(&m) => variants.push(name),
                Some(Err(e)) => {
                    unreadable.get_or_insert(e);
                    others.push(name);
                }
                _ => others.push(name),
            }
        }
        variants.sort();
        others.sort();
        if variants.is_empty() {
            let cfg = root.join("config.json");
            if cfg.is_file() && is_tptt_config(&read_json_object(&cfg)?) {
                variants.push(".".into());
            }
        }
        if variants.is_empty() {
            // A broken config.json is the likelier story than "no variant": say what is wrong.
            if let Some(e) = unreadable {
                return Err(e);
            }
            let seen = if others.is_empty() {
                "it has no subfolders".to_string()
            } else {
                format!("subfolders: {}", others.join(", "))
            };
            return Err(Error::NotFound(format!(
                "{} holds no TPTT variant: no subfolder has a config.json with base_model_name or model_type \"tptt\" ({seen})",
                root.display()
            )));
        }
        Ok(Self { root, variants })
    }

    /// Resolve one variant (the only one when `name` is `None` and there is a single variant).
    pub fn variant(
        &self,
        name: Option<&str>,
        base_override: Option<&Path>,
    ) -> Result<VariantFiles> {
        let name = match name {
            Some(n) => {
                if !self.variants.iter().any(|v| v == n) {
                    return Err(self.not_a_variant(n));
                }
                n.to_string()
            }
            None if self.variants.len() == 1 => self.variants[0].clone(),
            None => {
                return Err(Error::NotFound(format!(
                    "{} has several variants, pick one with --variant: {}",
                    self.root.display(),
                    self.variants.join(", ")
                )))
            }
        };
        let dir = if name == "." {
            self.root.clone()
        } else {
            self.root.join(&name)
        };
        let config_path = dir.join("config.json");
        let raw = read_json_object(&config_path)?;
        let base_name = raw
            .get("base_model_name")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Config {
                path: Some(config_path.clone()),
                message: "missing required key base_model_name".into(),
            })?;
        let base_gguf = base_override.filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        });
        let base_root = match base_override {
            Some(p) if p.is_dir() => p.to_path_buf(),
            Some(p) if base_gguf.is_some() => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            Some(p) => {
                return Err(Error::NotFound(format!(
                    "--base {} is neither a model folder nor a .gguf file",
                    p.display()
                )))
            }
            None => resolve_base(base_name, &self.root)?,
        };
        let sub = raw
            .get("base_model_subfolder")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let base_dir = match sub {
            Some(s) if base_override.is_none() => base_root.join(s),
            _ => base_root.clone(),
        };
        if !base_dir.is_dir() {
            return Err(Error::NotFound(format!(
                "base model subfolder {} does not exist",
                base_dir.display()
            )));
        }
        let (base_config_path, config) = match base_gguf {
            Some(g) => {
                // A quantized base: its GGUF metadata is the base config.
                let base = crate::gguf::read_config(g)?;
                let tptt = crate::config::TpttSettings::from_json(&raw, Some(&config_path))?;
                (g.to_path_buf(), ModelConfig { base, tptt })
            }
            None => {
                let p = if base_dir.join("config.json").is_file() {
                    base_dir.join("config.json")
                } else {
                    base_root.join("config.json")
                };
                let base_json = read_json_object(&p)?;
                let config = merge_configs(&base_json, &p, &raw, &config_path)?;
                (p, config)
            }
        };
        // With an overriding base (e.g. a GGUF file), the named base may still hold the tokenizer.
        let named_base = if base_override.is_some() {
            resolve_base(base_name, &self.root).ok()
        } else {
            None
        };
        let find = |file: &str| -> Option<PathBuf> {
            [
                Some(dir.join(file)),
                Some(self.root.join(file)),
                Some(base_dir.join(file)),
                Some(base_root.join(file)),
                named_base.as_ref().map(|b| b.join(file)),
            ]
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
        };
        let adapter = Some(dir.join("adapter_model.safetensors")).filter(|p| p.is_file());
        Ok(VariantFiles {
            name,
            tokenizer: find("tokenizer.json"),
            tokenizer_config: find("tokenizer_config.json"),
            generation_config: find("generation_config.json"),
            dir,
            config_path,
            adapter,
            base_dir,
            base_gguf: base_gguf.map(Path::to_path_buf),
            base_config_path,
            config,
            raw,
        })
    }
}

impl TpttRepo {
    /// Why `name` is not one of the variants: no such folder, no config.json, a config.json
    /// that does not parse (that error itself), or one that is not a TPTT config.
    fn not_a_variant(&self, name: &str) -> Error {
        let available = self.variants.join(", ");
        let dir = self.root.join(name);
        let cfg = dir.join("config.json");
        if !dir.is_dir() {
            return Error::NotFound(format!(
                "variant {name:?} not found in {}; available: {available}",
                self.root.display()
            ));
        }
        if !cfg.is_file() {
            return Error::NotFound(format!(
                "variant folder {} has no config.json; available: {available}",
                dir.display()
            ));
        }
        match read_json_object(&cfg) {
            Err(e) => e,
            Ok(_) => Error::Config {
                path: Some(cfg),
                message: format!(
                    "not a TPTT config (no base_model_name, model_type is not \"tptt\"); available variants: {available}"
                ),
            },
        }
    }
}

impl VariantFiles {
    /// LoRA `target_modules` (names), default q/k/v/o.
    pub fn target_modules(&self) -> Vec<String> {
        let from_cfg = self
            .raw
            .get("lora_config")
            .and_then(|l| l.get("target_modules"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            });
        from_cfg.unwrap_or_else(|| {
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }
}

/// The Hugging Face hub cache folder.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// The snapshot folder of `repo_id` in a hub cache (`refs/main`, else the only/newest snapshot).
pub fn cached_snapshot(cache: &Path, repo_id: &str) -> Option<PathBuf> {
    let dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snaps = dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs").join("main")) {
        let p = snaps.join(rev.trim());
        if p.is_dir() {
            return Some(p);
        }
    }
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snaps)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            (
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                e.path(),
            )
        })
        .collect();
    all.sort();
    all.pop().map(|(_, p)| p)
}

/// Resolve `base_model_name` to a folder (module doc for the order).
pub fn resolve_base(name: &str, repo_root: &Path) -> Result<PathBuf> {
    let p = Path::new(name);
    let mut tried = Vec::new();
    let mut candidates = vec![p.to_path_buf()];
    if p.is_relative() {
        if let Some(parent) = repo_root.parent() {
            candidates.push(parent.join(p));
        }
        candidates.push(repo_root.join(p));
    }
    for c in candidates {
        if c.join("config.json").is_file() {
            return Ok(c);
        }
        if c.is_dir() {
            tried.push(format!("{} (a folder without config.json)", c.display()));
        } else {
            tried.push(c.display().to_string());
        }
    }
    if let Some(cache) = hf_hub_cache() {
        if let Some(snap) = cached_snapshot(&cache, name) {
            return Ok(snap);
        }
        tried.push(format!("Hugging Face cache {}", cache.display()));
    }
    Err(Error::NotFound(format!(
        "base model {name:?} not found (tried {}); download it or pass --base DIR",
        tried.join(", ")
    )))
}
