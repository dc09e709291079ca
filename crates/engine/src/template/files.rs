//! The model's files a prompt depends on: `tokenizer_config.json` (the chat template, the
//! special tokens as plain strings or `AddedToken` objects), the `chat_template.jinja` and
//! `chat_template.json` files that override its template as `transformers` does, and
//! `generation_config.json` (the BOS id, and the EOS ids, one or a list). [`SpecialTokens`]
//! resolves the ids that end generation from both and the tokenizer's vocabulary. Every file is
//! read within [`MAX_CONFIG_BYTES`].

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The special tokens a tokenizer config names, as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token (`bos_token`).
    pub bos: Option<String>,
    /// End-of-sequence token (`eos_token`).
    pub eos: Option<String>,
    /// Unknown token (`unk_token`).
    pub unk: Option<String>,
    /// Padding token (`pad_token`).
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// The token ids that end generation, in order and without duplicates:
    /// `generation_config.json`'s `eos_token_id` (one id or a list) first, then the id of the
    /// `eos_token` string in `tokenizer`'s vocabulary. May be empty; a named EOS token missing
    /// from the vocabulary is logged and skipped.
    pub fn eos_token_ids(
        &self,
        tokenizer: &Tokenizer,
        generation: Option<&GenerationConfig>,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        if let Some(generation) = generation {
            ids.extend_from_slice(&generation.eos_token_ids);
        }
        if let Some(eos) = &self.eos {
            match tokenizer.token_to_id(eos) {
                Some(id) => ids.push(id),
                None => tracing::warn!(eos, "the eos_token is not in the tokenizer's vocabulary"),
            }
        }
        let mut seen = Vec::with_capacity(ids.len());
        ids.retain(|id| {
            let new = !seen.contains(id);
            seen.push(*id);
            new
        });
        ids
    }

    /// The beginning-of-sequence id: `generation_config.json`'s `bos_token_id`, else the id of
    /// the `bos_token` string.
    pub fn bos_token_id(
        &self,
        tokenizer: &Tokenizer,
        generation: Option<&GenerationConfig>,
    ) -> Option<u32> {
        generation
            .and_then(|g| g.bos_token_id)
            .or_else(|| self.bos.as_deref().and_then(|b| tokenizer.token_to_id(b)))
    }
}

/// What the engine needs from `tokenizer_config.json`: the chat template and special tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Where [`TokenizerConfig::chat_template`] was read from (the file's path, or
    /// `tokenizer_config.json` for JSON text): named by errors about the template.
    pub template_origin: Option<String>,
    /// The special tokens it names.
    pub special: SpecialTokens,
}

/// `tokenizer_config.json` as written by `transformers` (only the fields used here).
#[derive(Debug, Deserialize)]
struct RawTokenizerConfig {
    #[serde(default)]
    chat_template: Option<RawChatTemplate>,
    #[serde(default)]
    bos_token: Option<RawToken>,
    #[serde(default)]
    eos_token: Option<RawToken>,
    #[serde(default)]
    unk_token: Option<RawToken>,
    #[serde(default)]
    pad_token: Option<RawToken>,
}

/// `chat_template`: one template, or a list of named ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawChatTemplate {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token: a plain string or an `AddedToken` object with `content`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawToken {
    Plain(String),
    Added { content: String },
}

impl RawToken {
    fn into_string(self) -> String {
        match self {
            RawToken::Plain(s) | RawToken::Added { content: s } => s,
        }
    }
}

impl TokenizerConfig {
    /// Parses the text of a `tokenizer_config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::parse(json, "tokenizer_config.json")
    }

    /// Reads a `tokenizer_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Reads a model directory the way `transformers` does: `tokenizer_config.json` (optional),
    /// whose template is overridden by `chat_template.jinja` or, failing that, by the
    /// `chat_template` of `chat_template.json` when those files exist.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() {
            Self::from_file(&config_path)?
        } else {
            Self::default()
        };
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        if jinja.is_file() {
            config.chat_template = Some(read(&jinja)?);
            config.template_origin = Some(jinja.display().to_string());
        } else if json.is_file() {
            let file = json.display().to_string();
            let raw: RawTokenizerConfig = parse_json(&read(&json)?, &file)?;
            if let Some(template) = raw.chat_template {
                config.chat_template = Some(pick_template(template, &file)?);
                config.template_origin = Some(file);
            }
        }
        Ok(config)
    }

    fn parse(json: &str, file: &str) -> Result<Self> {
        let raw: RawTokenizerConfig = parse_json(json, file)?;
        let chat_template = raw
            .chat_template
            .map(|t| pick_template(t, file))
            .transpose()?;
        Ok(Self {
            template_origin: chat_template.as_ref().map(|_| file.to_string()),
            chat_template,
            special: SpecialTokens {
                bos: raw.bos_token.map(RawToken::into_string),
                eos: raw.eos_token.map(RawToken::into_string),
                unk: raw.unk_token.map(RawToken::into_string),
                pad: raw.pad_token.map(RawToken::into_string),
            },
        })
    }
}

/// The `"default"` template of the named-templates form (the first one, with a warning, when
/// none is called that).
fn pick_template(raw: RawChatTemplate, file: &str) -> Result<String> {
    match raw {
        RawChatTemplate::Single(t) => Ok(t),
        RawChatTemplate::Named(mut list) => {
            if let Some(i) = list.iter().position(|t| t.name == "default") {
                return Ok(list.swap_remove(i).template);
            }
            if list.is_empty() {
                return Err(Error::InvalidConfig {
                    file: file.to_string(),
                    reason: "`chat_template` is an empty list".into(),
                });
            }
            let first = list.swap_remove(0);
            tracing::warn!(
                name = first.name,
                "no chat template is named \"default\"; using the first one"
            );
            Ok(first.template)
        }
    }
}

/// What the engine needs from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerationConfig {
    /// `bos_token_id`, if set.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id, a list, or none.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl GenerationConfig {
    /// Parses the text of a `generation_config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::parse(json, "generation_config.json")
    }

    /// Reads a `generation_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    fn parse(json: &str, file: &str) -> Result<Self> {
        let raw: RawGenerationConfig = parse_json(json, file)?;
        Ok(Self {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
        })
    }
}

/// The largest `tokenizer_config.json`, `generation_config.json` or chat template read. Real
/// ones are kilobytes to a few megabytes (a config listing thousands of added tokens); a file
/// past this is refused before it is read, not loaded whole into memory.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

fn read(path: &Path) -> Result<String> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_big = || Error::InvalidConfig {
        file: path.display().to_string(),
        reason: format!("the file is larger than {} MiB", MAX_CONFIG_BYTES >> 20),
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut text = String::new();
    // One byte past the cap tells a file at the cap from a longer one (one that grew since).
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    Ok(text)
}

fn parse_json<T: serde::de::DeserializeOwned>(json: &str, file: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|source| Error::Json {
        file: file.to_string(),
        source,
    })
}
#[cfg(test)]
mod tests {
    use super::super::fixtures::SMOLLM2_CONFIG;
    use super::*;

    #[test]
    fn special_tokens_come_from_the_config() {
        let config = TokenizerConfig::from_json(SMOLLM2_CONFIG).expect("loads");
        assert_eq!(config.special.bos.as_deref(), Some("<|im_start|>"));
        assert_eq!(config.special.eos.as_deref(), Some("<|im_end|>"));
        assert_eq!(config.special.unk.as_deref(), Some("<|endoftext|>"));
        let added = TokenizerConfig::from_json(
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": null}"#,
        )
        .expect("loads");
        assert_eq!(added.special.bos.as_deref(), Some("<s>"));
        assert_eq!(added.special.eos, None);
        assert_eq!(added.chat_template, None);
    }

    #[test]
    fn named_templates_pick_default() {
        let json = r#"{"chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"}
        ]}"#;
        let config = TokenizerConfig::from_json(json).expect("loads");
        assert_eq!(config.chat_template.as_deref(), Some("DEFAULT"));
        let only =
            TokenizerConfig::from_json(r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#)
                .expect("loads");
        assert_eq!(only.chat_template.as_deref(), Some("R"));
        let err = TokenizerConfig::from_json(r#"{"chat_template": []}"#).expect_err("empty list");
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }

    #[test]
    fn malformed_config_is_an_error() {
        let err = TokenizerConfig::from_json("{not json").expect_err("bad JSON");
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let err = TokenizerConfig::from_json(r#"{"chat_template": 3}"#).expect_err("bad type");
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let err = TokenizerConfig::from_file(Path::new("/nonexistent/tokenizer_config.json"))
            .expect_err("missing file");
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn generation_config_eos_forms() {
        let one = GenerationConfig::from_json(r#"{"bos_token_id": 1, "eos_token_id": 2}"#)
            .expect("loads");
        assert_eq!(one.eos_token_ids, vec![2]);
        assert_eq!(one.bos_token_id, Some(1));
        let many = GenerationConfig::from_json(r#"{"eos_token_id": [128001, 128008, 128009]}"#)
            .expect("loads");
        assert_eq!(many.eos_token_ids, vec![128001, 128008, 128009]);
        let none = GenerationConfig::from_json(r#"{"eos_token_id": null}"#).expect("loads");
        assert!(none.eos_token_ids.is_empty());
    }

    #[test]
    fn eos_ids_merge_generation_config_and_tokenizer() {
        let tokenizer: Tokenizer = r#"{
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 3, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true},
                {"id": 4, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "<unk>": 2, "<|im_end|>": 3, "<|endoftext|>": 4},
                      "unk_token": "<unk>"}
        }"#
        .parse()
        .expect("valid tokenizer.json");
        let special = TokenizerConfig::from_json(SMOLLM2_CONFIG)
            .expect("loads")
            .special;
        assert_eq!(special.eos_token_ids(&tokenizer, None), vec![3]);
        let generation = GenerationConfig::from_json(r#"{"eos_token_id": [4, 3]}"#).expect("loads");
        assert_eq!(
            special.eos_token_ids(&tokenizer, Some(&generation)),
            vec![4, 3]
        );
        let unknown = SpecialTokens {
            eos: Some("</s>".into()),
            ..SpecialTokens::default()
        };
        assert!(unknown.eos_token_ids(&tokenizer, None).is_empty());
        assert_eq!(special.bos_token_id(&tokenizer, None), None);
    }

    #[test]
    fn model_dir_prefers_chat_template_jinja() {
        let dir = std::env::temp_dir().join(format!("tptt-engine-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("tokenizer_config.json"), SMOLLM2_CONFIG).expect("write");
        let config = TokenizerConfig::from_model_dir(&dir).expect("loads");
        assert!(config
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("SmolLM")));
        std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}")
            .expect("write");
        let config = TokenizerConfig::from_model_dir(&dir).expect("loads");
        assert_eq!(
            config.chat_template.as_deref(),
            Some("{{ messages[0].content }}")
        );
        assert_eq!(config.special.eos.as_deref(), Some("<|im_end|>"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn an_oversized_config_is_refused_before_it_is_read() {
        let dir = std::env::temp_dir().join(format!("tptt-engine-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tokenizer_config.json");
        let file = std::fs::File::create(&path).expect("create");
        // Sparse: no disk space used.
        file.set_len(MAX_CONFIG_BYTES + 1).expect("grow");
        match TokenizerConfig::from_file(&path) {
            Err(Error::InvalidConfig { file, reason }) => {
                assert!(file.ends_with("tokenizer_config.json"), "{file}");
                assert!(reason.contains("64 MiB"), "{reason}");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
