//! A conversation's own settings: its model and variant, its softmax window, its system prompt
//! and its sampling, each either its own or the app's (`Settings`). Stored as the store's [`ConversationSettings`] (all optional fields,
//! unknown keys kept); validated by the same rules as the app's settings; merged with the app's
//! for each turn ([`effective`]).

use tptt_store::{ConversationSettings, SamplingSettings};

use crate::dto::{ChatModelDto, ChatSettingsDto};
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::settings::{check_system_prompt, AppSettings, Sampling};

/// What a turn uses: the conversation's own settings over the app's.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// The model (repo id or folder), if any is chosen.
    pub model_repo: Option<String>,
    /// Its variant.
    pub variant: Option<String>,
    /// The softmax window of a new memory (`None`: the model's).
    pub window: Option<u32>,
    /// The system prompt ("" for none).
    pub system_prompt: String,
    /// The sampling.
    pub sampling: Sampling,
}

/// The conversation's settings over the app's.
pub fn effective(app: &AppSettings, chat: &ConversationSettings) -> Effective {
    let (model_repo, variant) = match own_model(chat) {
        Some(m) => (Some(m.repo_id), Some(m.variant)),
        None => (app.model_repo.clone(), app.variant.clone()),
    };
    Effective {
        model_repo,
        variant,
        window: chat.window.or(app.window_size),
        system_prompt: chat
            .system_prompt
            .clone()
            .unwrap_or_else(|| app.system_prompt.clone()),
        sampling: own_sampling(chat, &app.sampling).unwrap_or_else(|| app.sampling.clone()),
    }
}

/// The conversation's own model, if it has one (both its repo and its variant).
fn own_model(chat: &ConversationSettings) -> Option<ChatModelDto> {
    match (&chat.model_repo, &chat.variant) {
        (Some(repo_id), Some(variant)) => Some(ChatModelDto {
            repo_id: repo_id.clone(),
            variant: variant.clone(),
        }),
        _ => None,
    }
}

/// The conversation's own sampling, if it has any: the fields it stores over `defaults` (a
/// record written by another version may hold only some of them).
fn own_sampling(chat: &ConversationSettings, defaults: &Sampling) -> Option<Sampling> {
    let s = &chat.sampling;
    if *s == SamplingSettings::default() {
        return None;
    }
    Some(Sampling {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.unwrap_or(defaults.top_k),
        top_p: s.top_p.unwrap_or(defaults.top_p),
        min_p: s.min_p.unwrap_or(defaults.min_p),
        repeat_penalty: s.repeat_penalty.unwrap_or(defaults.repeat_penalty),
        repeat_last_n: s.repeat_last_n.unwrap_or(defaults.repeat_last_n),
        max_new_tokens: s.max_new_tokens.unwrap_or(defaults.max_new_tokens),
        // Own sampling is written whole: no seed of its own is a fresh one per answer.
        seed: s.seed,
    })
}

/// The wire form (sampling read over `defaults`, the app's).
pub fn to_dto(chat: &ConversationSettings, defaults: &Sampling) -> ChatSettingsDto {
    ChatSettingsDto {
        model: own_model(chat),
        window_size: chat.window.map(f64::from),
        system_prompt: chat.system_prompt.clone(),
        sampling: own_sampling(chat, defaults).map(|s| s.to_dto()),
    }
}

/// Validates `d` (`invalid_settings` naming the field) and returns `current` with its system
/// settings replaced (keys of other versions kept).
pub fn from_dto(
    d: &ChatSettingsDto,
    current: &ConversationSettings,
) -> CmdResult<ConversationSettings> {
    if let Some(p) = &d.system_prompt {
        check_system_prompt(p)?;
    }
    let model = match &d.model {
        None => None,
        Some(m) => {
            let (repo, variant) = (m.repo_id.trim(), m.variant.trim());
            if repo.is_empty() || variant.is_empty() {
                return Err(CommandError::new(
                    ErrorKind::InvalidSettings,
                    "model: needs both a model (repoId) and a variant",
                ));
            }
            Some((repo.to_string(), variant.to_string()))
        }
    };
    let sampling = match &d.sampling {
        None => SamplingSettings::default(),
        Some(s) => {
            let s = Sampling::from_dto(s)?;
            SamplingSettings {
                temperature: Some(s.temperature),
                top_k: Some(s.top_k),
                top_p: Some(s.top_p),
                min_p: Some(s.min_p),
                repeat_penalty: Some(s.repeat_penalty),
                repeat_last_n: Some(s.repeat_last_n),
                seed: s.seed,
                max_new_tokens: Some(s.max_new_tokens),
            }
        }
    };
    let window = d
        .window_size
        .map(|w| crate::settings::whole("windowSize", w, 1, crate::settings::MAX_WINDOW))
        .transpose()?
        .map(|w| w as u32);
    let (model_repo, variant) = model.unzip();
    Ok(ConversationSettings {
        system_prompt: d.system_prompt.clone(),
        window,
        model_repo,
        variant,
        sampling,
        ..current.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppSettings {
        AppSettings {
            system_prompt: "Be brief.".into(),
            ..AppSettings::default()
        }
    }

    #[test]
    fn a_chat_without_settings_follows_the_app() {
        let e = effective(&app(), &ConversationSettings::default());
        assert_eq!(e.system_prompt, "Be brief.");
        assert_eq!(e.sampling, app().sampling);
        assert_eq!(
            to_dto(&ConversationSettings::default(), &app().sampling),
            ChatSettingsDto::default()
        );
    }

    #[test]
    fn own_settings_win_and_round_trip() {
        let mut sampling = app().sampling.to_dto();
        sampling.temperature = 0.0;
        sampling.max_new_tokens = 3.0;
        let d = ChatSettingsDto {
            model: Some(ChatModelDto {
                repo_id: "/models/demo".into(),
                variant: "delta_product".into(),
            }),
            window_size: Some(64.0),
            system_prompt: Some(String::new()),
            sampling: Some(sampling.clone()),
        };
        let mut current = ConversationSettings::default();
        current
            .extra
            .insert("newer".into(), serde_json::json!({"kept": true}));
        let stored = from_dto(&d, &current).expect("valid");
        assert_eq!(
            stored.window,
            Some(64),
            "what the dialog does not set is kept"
        );
        assert_eq!(stored.extra, current.extra);
        let e = effective(&app(), &stored);
        assert_eq!(e.model_repo.as_deref(), Some("/models/demo"));
        assert_eq!(e.variant.as_deref(), Some("delta_product"));
        assert_eq!(e.window, Some(64));
        assert_eq!(e.system_prompt, "", "an empty prompt of its own: none");
        assert_eq!(e.sampling.max_new_tokens, 3);
        assert_eq!(e.sampling.temperature, 0.0);
        assert_eq!(to_dto(&stored, &app().sampling), d);
        // Back to the app's.
        let back = from_dto(&ChatSettingsDto::default(), &stored).expect("valid");
        assert_eq!(effective(&app(), &back).sampling, app().sampling);
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut sampling = app().sampling.to_dto();
        sampling.top_p = 0.0;
        let d = ChatSettingsDto {
            sampling: Some(sampling),
            ..ChatSettingsDto::default()
        };
        let e = from_dto(&d, &ConversationSettings::default()).expect_err("refused");
        assert!(e.message.starts_with("sampling.topP:"), "{}", e.message);
        let d = ChatSettingsDto {
            system_prompt: Some("x".repeat(crate::settings::MAX_SYSTEM_PROMPT_BYTES + 1)),
            ..ChatSettingsDto::default()
        };
        let e = from_dto(&d, &ConversationSettings::default()).expect_err("refused");
        assert!(e.message.starts_with("systemPrompt:"), "{}", e.message);
        let d = ChatSettingsDto {
            model: Some(ChatModelDto {
                repo_id: " ".into(),
                variant: "v".into(),
            }),
            ..ChatSettingsDto::default()
        };
        let e = from_dto(&d, &ConversationSettings::default()).expect_err("refused");
        assert!(e.message.starts_with("model:"), "{}", e.message);
        for w in [0.0, 1.5, -3.0, f64::INFINITY, 1e12] {
            let d = ChatSettingsDto {
                window_size: Some(w),
                ..ChatSettingsDto::default()
            };
            let e = from_dto(&d, &ConversationSettings::default()).expect_err("refused");
            assert!(e.message.starts_with("windowSize:"), "{w}: {}", e.message);
        }
    }
}
