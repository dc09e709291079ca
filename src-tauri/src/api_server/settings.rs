//! The "Local API server" settings ([`ApiServerSettings`], stored inside the app's settings) and
//! their wire form ([`ApiServerDto`]), validated where they enter from the UI.

use serde::{Deserialize, Serialize};
use ts_rs::TS;

use crate::error::{CmdResult, CommandError, ErrorKind};

/// The port offered until the user picks one.
pub const DEFAULT_PORT: u16 = 8484;
/// Longest API key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// The local API server as stored: off by default; loopback only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiServerSettings {
    /// Whether it runs.
    pub enabled: bool,
    /// The port on 127.0.0.1 (0: any free port, shown once it listens).
    pub port: u16,
    /// The key clients must send ("" for none: only programs of this computer can reach it).
    pub api_key: String,
}

impl Default for ApiServerSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            port: DEFAULT_PORT,
            api_key: String::new(),
        }
    }
}

/// `Settings.apiServer`: the local OpenAI-compatible API server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "ApiServerSettings")]
pub struct ApiServerDto {
    /// Whether it runs (serving the model chosen in Settings).
    pub enabled: bool,
    /// Its port on 127.0.0.1 (0: any free port).
    #[serde(serialize_with = "crate::dto::whole")]
    pub port: f64,
    /// The key clients must send as `Authorization: Bearer <key>` ("" for none).
    pub api_key: String,
}

impl Default for ApiServerDto {
    fn default() -> Self {
        ApiServerSettings::default().to_dto()
    }
}

impl ApiServerSettings {
    /// The wire form.
    pub fn to_dto(&self) -> ApiServerDto {
        ApiServerDto {
            enabled: self.enabled,
            port: f64::from(self.port),
            api_key: self.api_key.clone(),
        }
    }

    /// Validates the UI's values: the first bad field is named (`apiServer.port: …`).
    pub fn from_dto(d: &ApiServerDto) -> CmdResult<Self> {
        let port = crate::settings::whole("apiServer.port", d.port, 0, u64::from(u16::MAX))?;
        let key = d.api_key.trim();
        if key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            // Not echoed: it is a secret even when malformed.
            return Err(CommandError::new(
                ErrorKind::InvalidSettings,
                format!("apiServer.apiKey: a key is one word of printable ASCII characters, at most {MAX_KEY_BYTES}"),
            ));
        }
        Ok(Self {
            enabled: d.enabled,
            port: port as u16,
            api_key: key.to_string(),
        })
    }
}

/// `ApiServerStatus`: what the local API server is doing.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(tag = "state", rename_all = "camelCase")]
#[ts(rename = "ApiServerStatus")]
pub enum ApiServerStatus {
    /// Switched off in Settings.
    Off,
    /// Listening.
    #[serde(rename_all = "camelCase")]
    Listening {
        /// The base URL clients use (`http://127.0.0.1:PORT/v1`).
        url: String,
        /// The model id requests name (the model chosen in Settings), if any is chosen.
        model_id: Option<String>,
        /// Requests answered since it started.
        #[ts(type = "number")]
        served: u64,
    },
    /// It could not start (the port is taken...): why, for people.
    Failed {
        /// What went wrong and what to do.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bad_ones_name_their_field() {
        let s = ApiServerSettings {
            enabled: true,
            port: 9000,
            api_key: "sk-local".into(),
        };
        assert_eq!(ApiServerSettings::from_dto(&s.to_dto()).expect("valid"), s);
        let bad: &[(f64, &str)] = &[
            (-1.0, "apiServer.port"),
            (65536.0, "apiServer.port"),
            (80.5, "apiServer.port"),
            (f64::NAN, "apiServer.port"),
            (8080.0, "apiServer.apiKey"),
        ];
        for (port, field) in bad {
            let mut d = s.to_dto();
            d.port = *port;
            if *field == "apiServer.apiKey" {
                d.api_key = "two words".into();
            }
            let e = ApiServerSettings::from_dto(&d).expect_err(field);
            assert!(e.message.starts_with(field), "{}", e.message);
            assert!(!e.message.contains("two words"), "the key is not echoed");
        }
        let mut d = s.to_dto();
        d.api_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(ApiServerSettings::from_dto(&d).is_err(), "a huge key");
        d.api_key = "  ".into();
        assert_eq!(
            ApiServerSettings::from_dto(&d).expect("blank").api_key,
            "",
            "a blank key is no key"
        );
    }
}
