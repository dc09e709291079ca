//! Where the hub is, where its files go, and who we are: [`HubConfig`].
//!
//! [`HubConfig::from_env`] follows the `huggingface_hub` Python package, so a cache filled by
//! `huggingface-cli download` is found and reused:
//! - endpoint: `HF_ENDPOINT`, else `https://huggingface.co`;
//! - `HF_HOME`: `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
//! - cache: `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE` (legacy), else `$HF_HOME/hub`;
//! - token: `$HF_TOKEN`, else `$HUGGING_FACE_HUB_TOKEN` (legacy), else the file `$HF_TOKEN_PATH`,
//!   else `$HF_HOME/token` (what `huggingface-cli login` writes).
//!
//! Empty variables count as unset. The token is never printed: `Debug` shows `<redacted>`.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How many times one file's broken transfer is resumed within a call, by default.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// How to reach the hub and where to cache what it serves.
///
/// Build it with [`HubConfig::from_env`] (what a user's other HF tools use) or
/// [`HubConfig::new`] (explicit, for tests and for an app that keeps its own settings), then
/// adjust the public fields.
#[derive(Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Base URL of the hub (scheme, host, optional port and path prefix), e.g.
    /// `https://huggingface.co` or `http://127.0.0.1:8080`. A trailing `/` is ignored.
    pub endpoint: String,
    /// The hub cache folder, the one that holds `models--{org}--{name}/` (Python's
    /// `HF_HUB_CACHE`, usually `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Access token, sent as `Authorization: Bearer …` to the endpoint's origin only (never to
    /// the CDN a file redirects to). Never logged, never in `Debug` or error messages.
    pub token: Option<String>,
    /// How many times a transfer that broke (connection lost, short body, 5xx) is resumed with
    /// a `Range` request within one call before the call fails with [`crate::Error::Network`].
    /// The partial file stays either way, so a later call resumes it.
    pub max_retries: u32,
}

impl HubConfig {
    /// An explicit configuration: no token, [`DEFAULT_MAX_RETRIES`].
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: endpoint.into(),
            cache_dir: cache_dir.into(),
            token: None,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }

    /// The same with a token (`None` clears it).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.trim().is_empty());
        self
    }

    /// The configuration the Python `huggingface_hub` would use in this environment (module doc).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// [`HubConfig::from_env`] with the variables looked up through `var` (testable without
    /// touching the process environment). The token file, if any, is still read from disk.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let endpoint = get("HF_ENDPOINT")
            .map(|v| v.to_string_lossy().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let hf_home = get("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = get("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                // Windows has no HOME; USERPROFILE plays its part. Without either, a relative
                // folder is the least surprising place.
                get("HOME")
                    .or_else(|| get("USERPROFILE"))
                    .map(PathBuf::from)
                    .unwrap_or_default()
                    .join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.to_string_lossy().trim().to_string())
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
            })
            .filter(|t| !t.is_empty());
        Self {
            endpoint,
            cache_dir,
            token,
            max_retries: DEFAULT_MAX_RETRIES,
        }
    }
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn check(vars: &[(&str, &str)], expected_cache: &str, expected_endpoint: &str) -> HubConfig {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let cfg = HubConfig::from_vars(|k| map.get(k).cloned());
        assert_eq!(
            cfg.cache_dir,
            PathBuf::from(expected_cache),
            "vars {vars:?}"
        );
        assert_eq!(cfg.endpoint, expected_endpoint, "vars {vars:?}");
        cfg
    }

    #[test]
    fn cache_dir_follows_the_python_rules() {
        check(
            &[("HOME", "/h")],
            "/h/.cache/huggingface/hub",
            DEFAULT_ENDPOINT,
        );
        check(
            &[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")],
            "/x/huggingface/hub",
            DEFAULT_ENDPOINT,
        );
        check(
            &[("HOME", "/h"), ("HF_HOME", "/hf")],
            "/hf/hub",
            DEFAULT_ENDPOINT,
        );
        check(
            &[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")],
            "/legacy",
            DEFAULT_ENDPOINT,
        );
        check(
            &[
                ("HF_HOME", "/hf"),
                ("HUGGINGFACE_HUB_CACHE", "/legacy"),
                ("HF_HUB_CACHE", "/c"),
            ],
            "/c",
            DEFAULT_ENDPOINT,
        );
        check(
            &[("HOME", "/h"), ("HF_HOME", "")],
            "/h/.cache/huggingface/hub",
            DEFAULT_ENDPOINT,
        );
        check(
            &[("USERPROFILE", "/u")],
            "/u/.cache/huggingface/hub",
            DEFAULT_ENDPOINT,
        );
        check(
            &[("HOME", "/h"), ("HF_ENDPOINT", "http://127.0.0.1:9/")],
            "/h/.cache/huggingface/hub",
            "http://127.0.0.1:9",
        );
    }

    #[test]
    fn token_from_variable_then_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let home = dir.path().to_str().expect("utf-8 temp path");
        let cfg = check(
            &[("HF_HOME", home)],
            &format!("{home}/hub"),
            DEFAULT_ENDPOINT,
        );
        assert_eq!(cfg.token, None);
        std::fs::write(dir.path().join("token"), "hf_file_token\n").expect("write token");
        let cfg = check(
            &[("HF_HOME", home)],
            &format!("{home}/hub"),
            DEFAULT_ENDPOINT,
        );
        assert_eq!(cfg.token.as_deref(), Some("hf_file_token"));
        let cfg = check(
            &[("HF_HOME", home), ("HF_TOKEN", "hf_env")],
            &format!("{home}/hub"),
            DEFAULT_ENDPOINT,
        );
        assert_eq!(cfg.token.as_deref(), Some("hf_env"));
    }

    #[test]
    fn debug_redacts_the_token() {
        let cfg = HubConfig::new("http://x", "/c").with_token(Some("hf_secret_value".into()));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hf_secret_value"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
