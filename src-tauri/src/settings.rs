//! Application settings: [`AppSettings`] (stored in the conversation database under
//! [`SETTINGS_KEY`], validated where they enter from the UI) and the Hugging Face token
//! ([`TokenFile`]).
//!
//! The token is a secret, so it is not in the database: it lives in a file only the user can
//! read (`hf_token`, mode 0600, in the app's config folder), is never logged and never sent back
//! to the UI (`hfTokenSet` only says whether there is one). The OS keyring is not used: on Linux
//! it needs a Secret Service daemon on the session bus, which headless machines (CI, servers,
//! Xvfb sessions) do not have, and a token that cannot be stored would make gated downloads
//! impossible there. The file follows what `huggingface-cli login` does with `~/.cache/
//! huggingface/token`. Without a stored token, `HF_TOKEN` / the huggingface-cli token is used.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tptt::model::Model;
use tptt::state::{KvChoice, KvFormat};
use tptt_engine::SamplingParams;

use crate::api_server::ApiServerSettings;
use crate::device::DevicePref;
use crate::dto::{SamplingDto, SettingsDto};
use crate::error::{CmdResult, CommandError, ErrorKind};

/// The database key of [`AppSettings`].
pub const SETTINGS_KEY: &str = "app.settings";
/// Longest system prompt accepted, in bytes.
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 64 * 1024;
/// Largest softmax window accepted (the engine's bound, [`tptt::state::MAX_WINDOW`]).
pub const MAX_WINDOW: u64 = tptt::state::MAX_WINDOW as u64;
/// Most tokens one answer may be asked for.
pub const MAX_NEW_TOKENS: u64 = 1 << 16;
/// Largest top-k accepted.
pub const MAX_TOP_K: u64 = 100_000;
/// Most tokens the repetition penalty may look back on.
pub const MAX_REPEAT_LAST_N: u64 = 1 << 16;
/// Largest seed accepted (a JavaScript number holds it exactly).
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// The UI theme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Theme {
    /// Light.
    Light,
    /// Dark.
    Dark,
    /// Follow the system.
    #[default]
    System,
}

impl Theme {
    /// Every theme, in the settings' order.
    pub const ALL: [Theme; 3] = [Theme::Light, Theme::Dark, Theme::System];

    /// The UI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Theme::Light => "light",
            Theme::Dark => "dark",
            Theme::System => "system",
        }
    }
}

/// How chats store the softmax keys and values of their memory (`tptt::state::KvChoice`):
/// stored by name, so a name a later version adds reads back as the default here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvSetting {
    /// The most compact format the model can use: 8-bit blocks where its heads are whole
    /// blocks and it runs on the CPU, else f16.
    #[default]
    Auto,
    /// 8-bit blocks (q8_0): 34/128 of f32's memory, perplexity within 0.05 % (tested on
    /// SmolLM2, `crates/engine/tests/kv_format.rs`).
    Q8_0,
    /// f16: half the memory, perplexity within 0.01 %.
    F16,
    /// f32: exact.
    F32,
}

impl KvSetting {
    /// Every choice, in the settings' order.
    pub const ALL: [KvSetting; 4] = [
        KvSetting::Auto,
        KvSetting::Q8_0,
        KvSetting::F16,
        KvSetting::F32,
    ];

    /// The engine's choice.
    pub fn choice(self) -> KvChoice {
        match self {
            KvSetting::Auto => KvChoice::Auto,
            KvSetting::Q8_0 => KvChoice::Exactly(KvFormat::Q8_0),
            KvSetting::F16 => KvChoice::Exactly(KvFormat::F16),
            KvSetting::F32 => KvChoice::Exactly(KvFormat::F32),
        }
    }

    /// The UI's spelling (the engine's name: `auto`, `q8_0`, `f16`, `f32`).
    pub fn as_str(self) -> &'static str {
        self.choice().as_str()
    }

    /// Whether a model with heads of `dim` values can keep its memories as this setting says,
    /// on the CPU (its device is known once loaded: [`KvSetting::format_for`]); the error says
    /// why not (an `invalid_settings` error on `kvFormat`).
    pub fn check_head_dim(self, dim: usize) -> CmdResult<()> {
        self.choice()
            .resolve(dim, &candle_core::Device::Cpu)
            .map(|_| ())
            .map_err(|e| bad("kvFormat", e))
    }

    /// The format memories of `model` use: the setting's, or, where the model cannot use an
    /// explicit one (heads that are not whole 8-bit blocks, a GPU: a model chosen after the
    /// setting was saved against another), the automatic choice, logged.
    pub fn format_for(self, model: &Model) -> KvFormat {
        model.kv_format(self.choice()).unwrap_or_else(|e| {
            let fallback = KvFormat::compact_for(model.config().base.head_dim, model.device());
            tracing::warn!(
                setting = self.as_str(),
                using = fallback.as_str(),
                reason = %e,
                "the memory precision setting does not suit this model"
            );
            fallback
        })
    }
}

/// Sampling settings as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// Softmax temperature (0: greedy).
    pub temperature: f32,
    /// Top-k (0: off).
    pub top_k: u32,
    /// Nucleus threshold.
    pub top_p: f32,
    /// Min-p.
    pub min_p: f32,
    /// Repetition penalty.
    pub repeat_penalty: f32,
    /// Tokens the penalty looks back on.
    pub repeat_last_n: u32,
    /// Answer length limit.
    pub max_new_tokens: u32,
    /// Fixed seed.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        let p = SamplingParams::default();
        Self {
            temperature: p.temperature,
            top_k: p.top_k as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n as u32,
            max_new_tokens: p.max_new_tokens as u32,
            seed: p.seed,
        }
    }
}

/// An `invalid_settings` error naming `field`.
fn bad(field: &str, msg: String) -> CommandError {
    CommandError::new(ErrorKind::InvalidSettings, format!("{field}: {msg}"))
}

/// A whole number in `lo..=hi`, or an error naming `field`.
pub fn whole(field: &str, v: f64, lo: u64, hi: u64) -> CmdResult<u64> {
    if v.is_finite() && v.fract() == 0.0 && v >= lo as f64 && v <= hi as f64 {
        Ok(v as u64)
    } else {
        Err(bad(
            field,
            format!("must be a whole number from {lo} to {hi}, got {v}"),
        ))
    }
}

/// A system prompt's size check (`systemPrompt: …` when too long).
pub fn check_system_prompt(text: &str) -> CmdResult<()> {
    if text.len() > MAX_SYSTEM_PROMPT_BYTES {
        return Err(bad(
            "systemPrompt",
            format!(
                "is {} bytes, at most {MAX_SYSTEM_PROMPT_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    Ok(())
}

impl Sampling {
    /// The wire form.
    pub fn to_dto(&self) -> SamplingDto {
        SamplingDto {
            temperature: decimal(self.temperature),
            top_k: f64::from(self.top_k),
            top_p: decimal(self.top_p),
            min_p: decimal(self.min_p),
            repeat_penalty: decimal(self.repeat_penalty),
            repeat_last_n: f64::from(self.repeat_last_n),
            max_new_tokens: f64::from(self.max_new_tokens),
            seed: self.seed.map(|x| x as f64),
        }
    }

    /// Validates sampling from the UI: the first bad field is named in an `invalid_settings`
    /// error (`sampling.topP: …`).
    pub fn from_dto(s: &SamplingDto) -> CmdResult<Self> {
        let real = |field: &str, v: f64, ok: bool, expected: &str| -> CmdResult<f32> {
            if v.is_finite() && ok {
                Ok(v as f32)
            } else {
                Err(bad(field, format!("{expected}, got {v}")))
            }
        };
        let int = whole;
        let sampling = Self {
            temperature: real(
                "sampling.temperature",
                s.temperature,
                (0.0..=5.0).contains(&s.temperature),
                "must be from 0 (greedy) to 5",
            )?,
            top_k: int("sampling.topK", s.top_k, 0, MAX_TOP_K)? as u32,
            top_p: real(
                "sampling.topP",
                s.top_p,
                s.top_p > 0.0 && s.top_p <= 1.0,
                "must be above 0 and at most 1",
            )?,
            min_p: real(
                "sampling.minP",
                s.min_p,
                (0.0..1.0).contains(&s.min_p),
                "must be from 0 to below 1",
            )?,
            repeat_penalty: real(
                "sampling.repeatPenalty",
                s.repeat_penalty,
                s.repeat_penalty > 0.0 && s.repeat_penalty <= 10.0,
                "must be above 0 and at most 10",
            )?,
            repeat_last_n: int(
                "sampling.repeatLastN",
                s.repeat_last_n,
                0,
                MAX_REPEAT_LAST_N,
            )? as u32,
            max_new_tokens: int("sampling.maxNewTokens", s.max_new_tokens, 1, MAX_NEW_TOKENS)?
                as u32,
            seed: s
                .seed
                .map(|x| int("sampling.seed", x, 0, MAX_SEED))
                .transpose()?,
        };
        // The engine's own rules, as a backstop.
        sampling
            .params()
            .validate()
            .map_err(|e| bad("sampling", e.to_string()))?;
        Ok(sampling)
    }

    /// The engine's parameters.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n as usize,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens as usize,
        }
    }
}

/// Everything the settings screen sets, as stored (snake_case JSON; unknown keys ignored,
/// missing ones defaulted, so older and newer versions read each other's settings).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AppSettings {
    /// Model (hub id or imported folder) for the next message.
    pub model_repo: Option<String>,
    /// Its variant.
    pub variant: Option<String>,
    /// Device preference.
    pub device: DevicePref,
    /// Sampling.
    pub sampling: Sampling,
    /// System prompt ("" for none).
    pub system_prompt: String,
    /// Softmax window for new memories (`None`: the model's).
    pub window_size: Option<u32>,
    /// Theme.
    pub theme: Theme,
    /// The local API server.
    pub api_server: ApiServerSettings,
    /// How new and restored memories store their KV cache.
    pub kv_format: KvSetting,
}

impl AppSettings {
    /// The wire form.
    pub fn to_dto(&self, hf_token_set: bool) -> SettingsDto {
        SettingsDto {
            model_repo: self.model_repo.clone(),
            variant: self.variant.clone(),
            device: self.device.as_str().to_string(),
            sampling: self.sampling.to_dto(),
            system_prompt: self.system_prompt.clone(),
            window_size: self.window_size.map(f64::from),
            theme: self.theme.as_str().to_string(),
            api_server: self.api_server.to_dto(),
            kv_format: self.kv_format.as_str().to_string(),
            hf_token_set,
        }
    }

    /// Validates settings from the UI: the first bad field is named in an `invalid_settings`
    /// error (fields as the UI spells them, e.g. `sampling.topP`).
    pub fn from_dto(d: &SettingsDto) -> CmdResult<Self> {
        let sampling = Sampling::from_dto(&d.sampling)?;
        let device = DevicePref::parse(&d.device).ok_or_else(|| {
            bad(
                "device",
                format!("must be auto, cpu, cuda or metal, got {:?}", d.device),
            )
        })?;
        if !device.is_compiled() {
            return Err(bad(
                "device",
                format!("{} support is not compiled into this build (rebuild with the cargo feature `{}`)", device.label(), device.as_str()),
            ));
        }
        let theme = Theme::ALL
            .into_iter()
            .find(|t| t.as_str() == d.theme)
            .ok_or_else(|| {
                bad(
                    "theme",
                    format!("must be light, dark or system, got {:?}", d.theme),
                )
            })?;
        check_system_prompt(&d.system_prompt)?;
        let api_server = ApiServerSettings::from_dto(&d.api_server)?;
        let kv_format = KvSetting::ALL
            .into_iter()
            .find(|k| k.as_str() == d.kv_format)
            .ok_or_else(|| {
                bad(
                    "kvFormat",
                    format!("must be auto, q8_0, f16 or f32, got {:?}", d.kv_format),
                )
            })?;
        let window_size = d
            .window_size
            .map(|w| whole("windowSize", w, 1, MAX_WINDOW))
            .transpose()?
            .map(|w| w as u32);
        let model_repo = d
            .model_repo
            .as_ref()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty());
        let variant = d
            .variant
            .as_ref()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        if variant.is_some() && model_repo.is_none() {
            return Err(bad("variant", "is set but modelRepo is not".into()));
        }
        Ok(Self {
            model_repo,
            variant,
            device,
            sampling,
            system_prompt: d.system_prompt.clone(),
            window_size,
            theme,
            api_server,
            kv_format,
        })
    }
}

/// An `f32` as the decimal number it was written as (0.7, not 0.699999988...).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The Hugging Face token file (module doc).
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// The token file in `config_dir`.
    pub fn new(config_dir: &Path) -> Self {
        Self {
            path: config_dir.join("hf_token"),
        }
    }

    /// Whether a token is stored.
    pub fn is_set(&self) -> bool {
        self.read().is_some()
    }

    /// The stored token.
    pub fn read(&self) -> Option<String> {
        std::fs::read_to_string(&self.path)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    /// Stores `token` (readable by the user only), or removes it with `None` / an empty string.
    pub fn write(&self, token: Option<&str>) -> CmdResult<()> {
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return match std::fs::remove_file(&self.path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(CommandError::internal(
                    "Cannot remove the stored Hugging Face token",
                    e,
                )),
            };
        };
        if token.len() > 1024 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            // Not echoed: it is a secret even when malformed.
            return Err(CommandError::new(
                ErrorKind::InvalidSettings,
                "hfToken: a Hugging Face token is one word of printable ASCII characters (hf_...)",
            ));
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CommandError::internal("Cannot create the settings folder", e))?;
        }
        let tmp = self.path.with_extension("tmp");
        write_private(&tmp, token.as_bytes())
            .map_err(|e| storage_error("the Hugging Face token", e))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| storage_error("the Hugging Face token", e))?;
        tracing::info!("Hugging Face token stored");
        Ok(())
    }
}

/// A file only the user can read and write (0600 on Unix), created or truncated.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let mut f = opts.open(path)?;
        // An existing file keeps its mode through `open`: set it again.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut f = opts.open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }
}

/// An I/O failure while saving `what`: `disk_full` when it is one.
pub fn storage_error(what: &str, e: std::io::Error) -> CommandError {
    if is_disk_full(&e) {
        CommandError::new(
            ErrorKind::DiskFull,
            format!("The disk is full: {what} could not be saved. Free some space and try again."),
        )
    } else {
        CommandError::internal(&format!("Cannot save {what}"), e)
    }
}

/// `ENOSPC` / `EDQUOT` (and `StorageFull`).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28) | Some(122))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dto() -> SettingsDto {
        AppSettings::default().to_dto(false)
    }

    #[test]
    fn defaults_round_trip() {
        let d = dto();
        assert_eq!(d.sampling.temperature, 0.7, "shown as written");
        assert_eq!(
            AppSettings::from_dto(&d).expect("valid"),
            AppSettings::default()
        );
    }

    /// Memory precision: the engine's names, `auto` by default; a format the model's heads
    /// cannot hold is refused naming `kvFormat` and the reason, and a model loaded after the
    /// setting was saved falls back to the automatic choice.
    #[test]
    fn memory_precision_names_default_and_model_checks() {
        assert_eq!(KvSetting::default(), KvSetting::Auto);
        let names: Vec<&str> = KvSetting::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["auto", "q8_0", "f16", "f32"]);
        for k in KvSetting::ALL {
            let json = serde_json::to_string(&k).expect("serialize");
            assert_eq!(
                json,
                format!("\"{}\"", k.as_str()),
                "stored by the UI's name"
            );
            let mut d = dto();
            d.kv_format = k.as_str().into();
            assert_eq!(AppSettings::from_dto(&d).expect("valid").kv_format, k);
        }
        let files = tptt::repo::TpttRepo::open(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/tptt-llama"),
        )
        .and_then(|r| r.variant(Some("delta_rule"), None))
        .expect("fixture");
        let model = Model::load(&files, &Default::default()).expect("load");
        let dim = model.config().base.head_dim;
        let e = KvSetting::Q8_0
            .check_head_dim(dim)
            .expect_err("heads of 16");
        assert_eq!(e.kind, ErrorKind::InvalidSettings);
        assert!(
            e.message.starts_with("kvFormat:") && e.message.contains("blocks of 32"),
            "{}",
            e.message
        );
        assert_eq!(KvSetting::Q8_0.format_for(&model), KvFormat::F16);
        assert_eq!(KvSetting::Auto.format_for(&model), KvFormat::F16);
        assert_eq!(KvSetting::F32.format_for(&model), KvFormat::F32);
        KvSetting::F16.check_head_dim(dim).expect("f16 always fits");
        KvSetting::Q8_0
            .check_head_dim(64)
            .expect("heads of 64 hold two blocks");
    }

    #[test]
    fn bad_values_name_their_field() {
        type Edit = fn(&mut SettingsDto);
        let cases: &[(Edit, &str)] = &[
            (|d| d.sampling.top_p = 1.5, "sampling.topP"),
            (|d| d.sampling.top_p = 0.0, "sampling.topP"),
            (|d| d.sampling.temperature = -0.1, "sampling.temperature"),
            (
                |d| d.sampling.temperature = f64::NAN,
                "sampling.temperature",
            ),
            (|d| d.sampling.top_k = 2.5, "sampling.topK"),
            (|d| d.sampling.max_new_tokens = 0.0, "sampling.maxNewTokens"),
            (|d| d.sampling.min_p = 1.0, "sampling.minP"),
            (
                |d| d.sampling.repeat_penalty = 0.0,
                "sampling.repeatPenalty",
            ),
            (|d| d.sampling.seed = Some(-1.0), "sampling.seed"),
            (|d| d.window_size = Some(0.0), "windowSize"),
            (|d| d.device = "tpu".into(), "device"),
            (|d| d.theme = "blue".into(), "theme"),
            (
                |d| d.system_prompt = "x".repeat(MAX_SYSTEM_PROMPT_BYTES + 1),
                "systemPrompt",
            ),
            (|d| d.variant = Some("v".into()), "variant"),
            (|d| d.api_server.port = 70_000.0, "apiServer.port"),
            (|d| d.kv_format = "q4".into(), "kvFormat"),
        ];
        for (edit, field) in cases {
            let mut d = dto();
            edit(&mut d);
            let e = AppSettings::from_dto(&d).expect_err(field);
            assert_eq!(e.kind, ErrorKind::InvalidSettings, "{field}");
            assert!(
                e.message.starts_with(&format!("{field}:")),
                "{field}: {}",
                e.message
            );
        }
    }

    #[test]
    fn the_token_file_is_private_and_never_echoed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = TokenFile::new(&dir.path().join("cfg"));
        assert!(!f.is_set());
        f.write(Some(" hf_secret123 ")).expect("write");
        assert_eq!(f.read().as_deref(), Some("hf_secret123"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("cfg/hf_token"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let e = f.write(Some("hf secret with spaces")).expect_err("invalid");
        assert!(!e.message.contains("secret with"), "{}", e.message);
        f.write(None).expect("remove");
        assert!(!f.is_set());
        f.write(None).expect("remove twice");
    }
}
