//! `tptt-chat --model FOLDER [--variant V]` (src/launch.rs): the folder is imported and chosen,
//! nothing else changes; a command line the app cannot follow stops the program with status 2
//! and a message, before any window (these runs have no display).

use std::path::{Path, PathBuf};
use std::process::Command;

use tauri::async_runtime::block_on;
use tptt_chat::launch::{self, LaunchArgs};
use tptt_chat::{AppConfig, AppState, ErrorKind};

fn fixture() -> PathBuf {
    std::fs::canonicalize(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/tptt-llama"),
    )
    .expect("the tiny fixture")
}

fn state(dir: &Path) -> AppState {
    let hub = tptt_hub::HubConfig::new("http://127.0.0.1:9", dir.join("hf"));
    block_on(AppState::open(AppConfig::in_dir(dir, hub))).expect("app state")
}

fn args(model: &Path, variant: Option<&str>) -> LaunchArgs {
    LaunchArgs {
        model: Some(model.to_path_buf()),
        variant: variant.map(str::to_string),
    }
}

#[test]
fn the_folder_is_imported_once_and_chosen_and_other_settings_stay() {
    let dir = tempfile::tempdir().expect("dir");
    let st = state(dir.path());
    let mut s = st.settings();
    s.sampling.temperature = 0.3;
    s.system_prompt = "Be brief.".into();
    block_on(st.save_settings(s)).expect("settings");

    let folder = fixture();
    let id = folder.display().to_string();
    let choice = launch::check(&args(&folder, None))
        .expect("a TPTT folder")
        .expect("a choice");
    assert_eq!(choice.id, id);
    let mut sorted = choice.variants.clone();
    sorted.sort();
    assert_eq!(choice.variants, sorted, "variants in order");
    let first = block_on(launch::apply(&st, &choice)).expect("applied");
    assert_eq!(
        first, choice.variants[0],
        "without --variant: the folder's first"
    );
    assert_eq!(st.registry().local, vec![id.clone()]);
    let s = st.settings();
    assert_eq!(s.model_repo.as_deref(), Some(id.as_str()));
    assert_eq!(s.variant.as_deref(), Some(first.as_str()));
    assert_eq!(s.sampling.temperature, 0.3);
    assert_eq!(s.system_prompt, "Be brief.");

    // --variant chooses; a later start without it keeps that choice; the folder is not listed
    // twice.
    let other = choice.variants.last().expect("variants").clone();
    assert_ne!(other, first, "the fixture has several variants");
    let c = launch::check(&args(&folder, Some(&other)))
        .expect("ok")
        .expect("choice");
    assert_eq!(block_on(launch::apply(&st, &c)).expect("applied"), other);
    let c = launch::check(&args(&folder, None))
        .expect("ok")
        .expect("choice");
    assert_eq!(block_on(launch::apply(&st, &c)).expect("applied"), other);
    assert_eq!(st.registry().local, vec![id.clone()]);

    // What was stored is what the next start reads.
    drop(st);
    let again = state(dir.path());
    assert_eq!(again.settings().model_repo.as_deref(), Some(id.as_str()));
    assert_eq!(again.settings().variant.as_deref(), Some(other.as_str()));
}

#[test]
fn a_folder_or_variant_that_cannot_be_used_is_refused_by_name() {
    assert_eq!(
        launch::check(&LaunchArgs::default()).expect("nothing asked"),
        None
    );
    let empty = tempfile::tempdir().expect("dir");
    for folder in [empty.path().to_path_buf(), PathBuf::from("/no/such/folder")] {
        let e = launch::check(&args(&folder, None)).expect_err("not a TPTT folder");
        assert_eq!(e.kind, ErrorKind::NotATpttRepo, "{e:?}");
        assert!(e.message.contains(&folder.display().to_string()), "{e:?}");
    }
    let e = launch::check(&args(&fixture(), Some("no_such_variant"))).expect_err("no variant");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("no_such_variant") && e.message.contains("delta_rule"),
        "{e:?}"
    );
}

/// The program itself: usage errors exit 2 with the reason and the usage, at once.
#[test]
fn the_program_says_what_is_wrong_with_its_command_line() {
    let bin = env!("CARGO_BIN_EXE_tptt-chat");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .env("TPTT_CHAT_DATA_DIR", "/nonexistent-tptt-chat-test")
            .output()
            .expect("run tptt-chat");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--model FOLDER"), "{stdout}");
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("tptt-chat "), "{stdout}");
    for (args, why) in [
        (&["--modle", "x"][..], "unknown argument \"--modle\""),
        (&["--model"][..], "--model needs a value"),
        (&["--model", "/no/such/folder"][..], "/no/such/folder"),
    ] {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The app started again while it runs: the running app follows the new command line's
/// `--model` (a path relative to where the new launch started), and says what happened.
#[test]
fn a_later_launch_hands_its_model_over_to_the_running_app() {
    use tptt_chat::dto::LaunchEvent;
    let dir = tempfile::tempdir().expect("dir");
    let st = state(dir.path());
    let folder = fixture();
    let parent = folder.parent().expect("parent");
    let argv = |rest: &[&str]| -> Vec<String> {
        std::iter::once("tptt-chat")
            .chain(rest.iter().copied())
            .map(String::from)
            .collect()
    };

    // No --model (or --help): the window just comes forward.
    assert_eq!(block_on(launch::handover(&st, &argv(&[]), parent)), None);
    assert_eq!(
        block_on(launch::handover(&st, &argv(&["--help"]), parent)),
        None
    );
    assert_eq!(st.settings().model_repo, None, "nothing chosen");

    // A relative folder and a variant, from the later launch's working folder.
    let event = block_on(launch::handover(
        &st,
        &argv(&["--model", "tptt-llama", "--variant", "delta_product"]),
        parent,
    ));
    let id = folder.display().to_string();
    assert_eq!(
        event,
        Some(LaunchEvent::ModelChosen {
            repo_id: id.clone(),
            variant: "delta_product".into(),
        })
    );
    let s = st.settings();
    assert_eq!(s.model_repo.as_deref(), Some(id.as_str()));
    assert_eq!(s.variant.as_deref(), Some("delta_product"));
    assert_eq!(st.registry().local, vec![id.clone()]);

    // What cannot be followed is said, and changes nothing.
    for rest in [
        &["--model", "no-such-folder"][..],
        &["--model", "tptt-llama", "--variant", "no_such_variant"][..],
        &["--bogus"][..],
    ] {
        match block_on(launch::handover(&st, &argv(rest), parent)) {
            Some(LaunchEvent::Error { message }) => assert!(!message.is_empty(), "{rest:?}"),
            other => panic!("{rest:?}: {other:?}"),
        }
        assert_eq!(st.settings().variant.as_deref(), Some("delta_product"));
    }
}
