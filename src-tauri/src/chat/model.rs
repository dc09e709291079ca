//! The model a turn runs on: chosen by the settings, checked before anything is stored, loaded
//! once and cached (dropped when its engine thread is gone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tptt::repo::VariantFiles;

use crate::chat_settings::Effective;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::runtime::{self, LoadKey, LoadedModel};
use crate::state::{lock, AppState};

/// What a turn will run on: checked before anything is stored.
pub struct Target {
    pub(super) key: LoadKey,
    pub(super) files: VariantFiles,
}

/// The model `settings` choose (a conversation's own, else the app's), with its files:
/// `no_model` when none is chosen or its files are gone.
pub fn target(state: &AppState, settings: &Effective) -> CmdResult<Target> {
    let s = state.settings();
    let (Some(repo), Some(variant)) = (settings.model_repo.as_deref(), settings.variant.as_deref())
    else {
        return Err(CommandError::new(
            ErrorKind::NoModel,
            "No model is chosen: download a model in the model manager, then pick it and a variant in Settings.",
        ));
    };
    let model = crate::models::model_ref(&state.registry(), repo);
    let files = runtime::variant_files(&state.hub()?, &model, variant)?;
    Ok(Target {
        key: LoadKey {
            model,
            variant: variant.to_string(),
            device: s.device,
        },
        files,
    })
}

/// [`target`] on a worker thread (it reads the cache through a blocking hub client).
pub(super) async fn find_target(state: &AppState, settings: &Effective) -> CmdResult<Target> {
    let (st, settings) = (state.clone(), settings.clone());
    crate::state::blocking(move || target(&st, &settings)).await
}

/// Drops `model` from the cache when it is still the one cached: its engine thread is gone, so
/// the next turn loads the model again instead of failing on a dead thread.
pub(super) fn forget_model(state: &AppState, model: &Arc<LoadedModel>) {
    let mut g = lock(&state.model);
    if g.as_ref().is_some_and(|m| Arc::ptr_eq(m, model)) {
        tracing::warn!("the generation thread is gone: the model is loaded again next turn");
        *g = None;
    }
}

/// The model for `target`, loading it (and dropping another one first) when needed; with how
/// long the loading took, when it was loaded now.
pub(crate) fn ensure_model(
    state: &AppState,
    target: &Target,
) -> CmdResult<(Arc<LoadedModel>, Option<Duration>)> {
    // One load at a time (a chat's turn, the API server): the second finds the first's model.
    let _loading = lock(&state.loading);
    {
        let mut g = lock(&state.model);
        match g.as_ref() {
            Some(m) if m.key == target.key => return Ok((m.clone(), None)),
            Some(_) => *g = None,
            None => {}
        }
    }
    // The cached memory holds the old weights (and device) alive: let both go before loading;
    // it is in its snapshot.
    *lock(&state.session) = None;
    state.api_server.forget_sessions();
    let started = Instant::now();
    let loaded = Arc::new(runtime::load(target.key.clone(), &target.files)?);
    *lock(&state.model) = Some(loaded.clone());
    Ok((loaded, Some(started.elapsed())))
}
