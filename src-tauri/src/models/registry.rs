//! What the model manager remembers ([`Registry`], stored under [`REGISTRY_KEY`]) and the
//! catalog of published repositories: plain data, so the app's shared state can hold it without
//! depending on the manager's operations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dto::ModelSource;

/// The database key of the [`Registry`].
pub const REGISTRY_KEY: &str = "models.registry";

/// The published TPTT repositories: `(repo id, title, description)`. Their variants are
/// listed from the hub.
pub const CATALOG: &[(&str, &str, &str)] = &[
    ("ffurfaro/Titans-Llama-3.2-1B", "Titans Llama 3.2 1B", "Llama 3.2 1B turned into a Titans-style model with TPTT (the Llama base is gated: a Hugging Face token is needed)."),
    ("ffurfaro/Titans-Qwen2.5-1.5B", "Titans Qwen2.5 1.5B", "Qwen2.5 1.5B turned into a Titans-style model with TPTT."),
    ("ffurfaro/Titans-OLMo-1B-hf", "Titans OLMo 1B", "OLMo 1B turned into a Titans-style model with TPTT."),
    ("ffurfaro/Titans-v2-Mistral-7B-v0.3", "Titans v2 Mistral 7B v0.3", "Mistral 7B v0.3 turned into a Titans-style model with TPTT (large: about 15 GB)."),
    ("ffurfaro/Titanesque-gemma-3-270m", "Titanesque Gemma 3 270M", "Gemma 3 270M turned into a Titans-style model with TPTT: small and fast."),
    ("ffurfaro/Titans-OpenELM-1_1B", "Titans OpenELM 1.1B", "Apple's OpenELM 1.1B (its layers grow in width from first to last) turned into a Titans-style model with TPTT."),
];

/// A variant as a listing found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedVariant {
    /// Folder name.
    pub name: String,
    /// `operator_mode` of its config.
    pub operator_mode: String,
    /// Bytes of its own files.
    pub size_bytes: Option<u64>,
}

/// A repository's last listing.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Listed {
    /// Its variants.
    pub variants: Vec<ListedVariant>,
    /// The base model the variants name (the first one's).
    pub base_model: Option<String>,
    /// Bytes of that base model's weights and configs on the hub (absent from listings made
    /// before it was recorded, or when the base cannot be listed: a gated one without a token).
    #[serde(default)]
    pub base_size_bytes: Option<u64>,
}

/// What the model manager remembers (module doc).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Registry {
    /// Repositories added by id, in order.
    pub added: Vec<String>,
    /// Imported folders (absolute paths), in order.
    pub local: Vec<String>,
    /// Last listing per hub repository.
    pub listings: BTreeMap<String, Listed>,
}

/// Where `repo_id` comes from, if the manager knows it from its own records (a repository only
/// found in the cache is [`ModelSource::Cache`] in [`entries`], unknown here: it acts as a hub
/// repository nobody added).
pub fn source_of(registry: &Registry, repo_id: &str) -> Option<ModelSource> {
    if CATALOG.iter().any(|(r, ..)| *r == repo_id) {
        Some(ModelSource::Catalog)
    } else if registry.added.iter().any(|r| r == repo_id) {
        Some(ModelSource::Added)
    } else if registry.local.iter().any(|r| r == repo_id) {
        Some(ModelSource::Local)
    } else {
        None
    }
}
