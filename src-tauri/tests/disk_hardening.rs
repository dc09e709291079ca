//! What a model folder or a crash can leave on disk (issue #11): an imported folder with link
//! loops, dangling links and unreadable subfolders keeps the model list quick and whole; the
//! snapshot files a crash left half-written are deleted when the app starts.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use tptt_chat::cleanup::{self, TMP_GRACE};
use tptt_chat::models::{self, Registry};
use tptt_chat::{AppConfig, AppState};
use tptt_hub::{Hub, HubConfig};

#[cfg(unix)]
fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// Runs `f` on a thread; panics if it has not returned within `secs` seconds (a hang is a
/// failure, not a stuck test run).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

#[cfg(unix)]
#[test]
fn link_loops_in_an_imported_folder_do_not_hang_the_model_list() {
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = dir.path().join("my-tptt");
    let config =
        br#"{"model_type":"tptt","base_model_name":"org/base","operator_mode":"delta_rule"}"#;
    write(&repo.join("v1/config.json"), config);
    write(&repo.join("v1/adapter_model.safetensors"), &[7u8; 1000]);
    let real = (config.len() + 1000) as u64;
    // Loops to folders, at several levels: each level of the old walk tripled its work.
    symlink(".", &repo.join("v1/loop"));
    symlink("..", &repo.join("v1/up"));
    write(&repo.join("v1/sub/.keep"), b"");
    symlink("../..", &repo.join("v1/sub/back"));
    symlink(".", &repo.join("loop"));
    // A cycle of links, a dangling link.
    symlink("b", &repo.join("v1/a"));
    symlink("a", &repo.join("v1/b"));
    symlink("/no/such/target", &repo.join("v1/dangling"));
    // An unreadable subfolder (readable anyway when the tests run as root).
    write(&repo.join("v1/locked/secret.bin"), &[1u8; 10]);
    set_mode(&repo.join("v1/locked"), 0o000);

    let folder = repo.display().to_string();
    let canonical = within(20, "importing the folder", move || {
        models::check_local_folder(&folder)
    })
    .expect("a TPTT folder");
    let registry = Registry {
        local: vec![canonical.display().to_string()],
        ..Registry::default()
    };
    let hub = Hub::new(HubConfig::new("http://127.0.0.1:9", dir.path().join("hf"))).expect("hub");
    let entries = within(20, "the model list", move || {
        models::entries(&registry, &hub)
    });
    let entry = entries
        .iter()
        .find(|e| e.repo_id == canonical.display().to_string())
        .expect("the imported folder is listed");
    let variants = entry.variants.as_ref().expect("variants known");
    let v1 = variants.iter().find(|v| v.name == "v1").expect("v1 listed");
    assert_eq!(v1.operator_mode, "delta_rule");
    // Its own files, each once (the locked folder's only where it could be read).
    let size = v1.size_bytes.expect("size");
    assert!(size == real || size == real + 10, "{size} vs {real}");
    assert_eq!(
        within(20, "dir_size", {
            let v = repo.join("v1/sub");
            move || models::dir_size(&v)
        }),
        0,
        "links to folders are not followed"
    );
    // The temporary folder can be deleted again.
    set_mode(&repo.join("v1/locked"), 0o755);
}

/// Sets a file's modification time `ago` in the past.
fn age(path: &Path, ago: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(SystemTime::now() - ago).expect("set mtime");
}

/// Sets a folder's last change `ago` in the past.
fn age_dir(path: &Path, ago: Duration) {
    let f = std::fs::File::open(path).expect("open folder");
    f.set_modified(SystemTime::now() - ago).expect("set mtime");
}

#[test]
fn snapshot_files_a_crash_left_half_written_are_deleted_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AppConfig::in_dir(
        dir.path(),
        HubConfig::new("http://127.0.0.1:9", dir.path().join("hf")),
    );
    let states = config.snapshots_dir();
    let old = TMP_GRACE * 10;
    // A crash between writing and renaming: the temporary stays.
    let crashed = states.join("7/12.tmp");
    write(&crashed, &[0u8; 4096]);
    age(&crashed, old);
    // Finished snapshots and their sidecars stay, however old.
    let kept = [states.join("7/11.safetensors"), states.join("7/11.json")];
    for k in &kept {
        write(k, b"x");
        age(k, old);
    }
    // A snapshot being written right now (another copy of the app) stays.
    let fresh = states.join("8/20.tmp");
    write(&fresh, b"in progress");
    // Links are not followed out of the folder.
    let outside = dir.path().join("outside");
    write(&outside.join("mine.tmp"), b"not the app's");
    age(&outside.join("mine.tmp"), old);
    #[cfg(unix)]
    symlink(outside.to_str().expect("utf-8 path"), &states.join("9"));
    // A backup import a crash cut short: its copied states go, then its folder; a folder of an
    // import under way (young) and any other folder stay.
    let import = states.join("import-1700000000000-0");
    write(&import.join("0.tmp"), &[1u8; 100]);
    age(&import.join("0.tmp"), old);
    age_dir(&import, old);
    let importing = states.join("import-1700000000001-1");
    std::fs::create_dir_all(&importing).expect("folder");
    let empty_chat = states.join("10");
    std::fs::create_dir_all(&empty_chat).expect("folder");
    age_dir(&empty_chat, old);

    let state = tauri::async_runtime::block_on(AppState::open(config)).expect("app state");
    assert!(!import.exists(), "the cut import's folder is deleted");
    assert!(importing.exists(), "an import under way keeps its folder");
    assert!(empty_chat.exists(), "other folders stay");
    assert!(!crashed.exists(), "the crash's leftover is deleted");
    for k in &kept {
        assert!(k.exists(), "{} kept", k.display());
    }
    assert!(fresh.exists(), "a young temporary is kept");
    assert!(
        outside.join("mine.tmp").exists(),
        "nothing outside is touched"
    );
    drop(state);

    // The sweep on its own: nothing left to delete.
    assert_eq!(
        cleanup::sweep_snapshot_temps(&states),
        cleanup::Swept::default()
    );
    age(&fresh, old);
    assert_eq!(
        cleanup::sweep_snapshot_temps(&states),
        cleanup::Swept {
            files: 1,
            bytes: 11
        }
    );
}
