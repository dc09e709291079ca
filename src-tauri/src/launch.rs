//! What the command line asks of the app at start: `tptt-chat [--model FOLDER [--variant V]]`.
//!
//! `--model FOLDER` imports a folder of TPTT variants (as the model manager's "Import a folder"
//! does: kept where it is) and makes it the model in use, so the app opens ready to chat with it.
//! `scripts/run.sh` starts the app this way with the offline demo (SmolLM2 + a distilled TPTT
//! memory). The variant is `--variant V` when given (it must be one of the folder's), else the
//! one already chosen when that is this folder's, else the folder's first. Nothing else changes:
//! conversations and other settings are kept, and a later choice in the app holds until the app is
//! started with `--model` again.
//!
//! Started again while it runs (one instance per session), the app hands the new command line
//! to the running one ([`handover`]), which follows its `--model` and tells the UI (a
//! [`LaunchEvent`]): the window comes forward with that model chosen.
//!
//! A command line the app cannot follow (an unknown option, a missing value, a folder without TPTT
//! variants, a variant the folder lacks) stops the start with a message on stderr and status 2,
//! before any window opens: the one who typed it is at the terminal.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::dto::LaunchEvent;
use crate::error::{CmdResult, CommandError, ErrorKind};
use crate::models;
use crate::state::AppState;

/// The usage line of `--help` and of a command line error.
pub const USAGE: &str = "usage: tptt-chat [--model FOLDER [--variant NAME]]\n\n  --model FOLDER   import this folder of TPTT variants and use it\n  --variant NAME   the variant of FOLDER to use (default: the folder's first)\n  --help           this text\n  --version        the app's version";

/// The command line, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchArgs {
    /// `--model FOLDER`.
    pub model: Option<PathBuf>,
    /// `--variant NAME`.
    pub variant: Option<String>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Start the app (with these arguments).
    Run(LaunchArgs),
    /// Print [`USAGE`] and exit.
    Help,
    /// Print the version and exit.
    Version,
}

impl Launch {
    /// Parses the arguments after the program's name. `--opt value` and `--opt=value` both work.
    pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Self, String> {
        let mut out = LaunchArgs::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let text = arg.to_string_lossy().into_owned();
            let (flag, inline) = match text.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(OsString::from(v))),
                _ => (text.clone(), None),
            };
            match flag.as_str() {
                "--help" | "-h" => return Ok(Self::Help),
                // WebKitGTK's WebDriver server starts the browser it drives with this flag (the
                // end-to-end test): the app has nothing to do for it.
                "--automation" => {}
                "--version" | "-V" => return Ok(Self::Version),
                "--model" | "--variant" => {
                    let value = inline
                        .or_else(|| args.next())
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| format!("{flag} needs a value"))?;
                    let seen = if flag == "--model" {
                        out.model.replace(PathBuf::from(value)).is_some()
                    } else {
                        out.variant
                            .replace(value.to_string_lossy().into_owned())
                            .is_some()
                    };
                    if seen {
                        return Err(format!("{flag} is given twice"));
                    }
                }
                _ => return Err(format!("unknown argument {text:?}")),
            }
        }
        if out.variant.is_some() && out.model.is_none() {
            return Err("--variant needs --model FOLDER".into());
        }
        Ok(Self::Run(out))
    }
}

/// A `--model` folder that was checked: its id (canonical path) and variants, and the variant
/// asked for, which is one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelChoice {
    /// The folder's canonical path: its id in the model manager.
    pub id: String,
    /// Its variants, sorted.
    pub variants: Vec<String>,
    /// `--variant`, when given.
    pub variant: Option<String>,
}

/// Checks the command line's folder and variant (files only: this runs before the app starts).
/// `None` without `--model`.
pub fn check(args: &LaunchArgs) -> CmdResult<Option<ModelChoice>> {
    let Some(folder) = &args.model else {
        return Ok(None);
    };
    let canonical = models::check_local_folder(&folder.to_string_lossy())?;
    let repo = tptt::repo::TpttRepo::open(&canonical).map_err(|e| {
        CommandError::new(
            ErrorKind::NotATpttRepo,
            format!("{} cannot be read: {e}", canonical.display()),
        )
    })?;
    if let Some(v) = &args.variant {
        if !repo.variants.contains(v) {
            return Err(CommandError::new(
                ErrorKind::NotFound,
                format!(
                    "{} has no variant {v:?}; its variants: {}.",
                    canonical.display(),
                    repo.variants.join(", ")
                ),
            ));
        }
    }
    Ok(Some(ModelChoice {
        id: canonical.display().to_string(),
        variants: repo.variants,
        variant: args.variant.clone(),
    }))
}

/// Imports the checked folder (when the model manager does not list it yet) and makes it, and
/// its variant (module doc), the model in use. Returns the variant chosen.
pub async fn apply(state: &AppState, choice: &ModelChoice) -> CmdResult<String> {
    let current = state.settings();
    let variant = match &choice.variant {
        Some(v) => v.clone(),
        None => match &current.variant {
            Some(v)
                if current.model_repo.as_deref() == Some(&choice.id)
                    && choice.variants.contains(v) =>
            {
                v.clone()
            }
            _ => choice.variants.first().cloned().ok_or_else(|| {
                CommandError::new(
                    ErrorKind::NotATpttRepo,
                    format!("{} holds no TPTT variant.", choice.id),
                )
            })?,
        },
    };
    if !state.registry().local.contains(&choice.id) {
        state
            .update_registry(|r| r.local.push(choice.id.clone()))
            .await?;
    }
    let mut settings = current;
    settings.model_repo = Some(choice.id.clone());
    settings.variant = Some(variant.clone());
    state.save_settings(settings).await?;
    tracing::info!(model = %choice.id, %variant, "model chosen on the command line");
    Ok(variant)
}

/// A later launch's command line (`argv` with the program first, `cwd` its working folder),
/// handed over by the single-instance plugin when the app already runs: with `--model`, the
/// folder is checked and applied as at start; the event for the UI comes back (`None` without
/// `--model`: the window is just brought forward). The later process checked the command line
/// before handing it over, so an error here means the folder changed in between.
pub async fn handover(state: &AppState, argv: &[String], cwd: &Path) -> Option<LaunchEvent> {
    let args = match Launch::parse(argv.iter().skip(1).map(OsString::from)) {
        Ok(Launch::Run(args)) => args,
        Ok(_) => return None,
        Err(e) => {
            return Some(LaunchEvent::Error {
                message: format!("The command line of the new launch was not followed: {e}."),
            })
        }
    };
    let Some(folder) = &args.model else {
        return None;
    };
    // Relative to where the later launch was started, not to this process.
    let args = LaunchArgs {
        model: Some(cwd.join(folder)),
        ..args
    };
    let outcome = match check(&args) {
        Ok(Some(choice)) => apply(state, &choice)
            .await
            .map(|variant| (choice.id, variant)),
        Ok(None) => return None,
        Err(e) => Err(e),
    };
    Some(match outcome {
        Ok((repo_id, variant)) => {
            tracing::info!(model = %repo_id, %variant, "a later launch chose the model");
            LaunchEvent::ModelChosen { repo_id, variant }
        }
        Err(e) => {
            tracing::warn!(error = %e.message, "a later launch's --model was not followed");
            LaunchEvent::Error {
                message: format!("--model {}: {}", folder.display(), e.message),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Launch, String> {
        Launch::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn arguments_are_parsed_in_both_spellings() {
        assert_eq!(parse(&[]), Ok(Launch::Run(LaunchArgs::default())));
        let want = Launch::Run(LaunchArgs {
            model: Some("/m".into()),
            variant: Some("v".into()),
        });
        assert_eq!(
            parse(&["--model", "/m", "--variant", "v"]),
            Ok(want.clone())
        );
        assert_eq!(parse(&["--variant=v", "--model=/m"]), Ok(want));
        assert_eq!(parse(&["--model", "/m", "--help"]), Ok(Launch::Help));
        assert_eq!(parse(&["-V"]), Ok(Launch::Version));
        assert_eq!(
            parse(&["--automation"]),
            Ok(Launch::Run(LaunchArgs::default()))
        );
    }

    #[test]
    fn a_command_line_the_app_cannot_follow_says_why() {
        for (args, why) in [
            (&["--model"][..], "--model needs a value"),
            (&["--model="][..], "--model needs a value"),
            (&["--model", ""][..], "--model needs a value"),
            (&["--variant", "v"][..], "--variant needs --model"),
            (&["--model", "/a", "--model", "/b"][..], "given twice"),
            (&["--frobnicate"][..], "unknown argument"),
            (&["/some/folder"][..], "unknown argument"),
        ] {
            let err = parse(args).expect_err(why);
            assert!(err.contains(why), "{args:?}: {err}");
        }
    }
}
