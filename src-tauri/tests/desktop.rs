//! The desktop pieces that run without a desktop: the rotating log file (`logging::log_file`),
//! the log folder's place, and the file name an export proposes. The dialogs, the opener, one
//! instance and the window's geometry need a real session: `tests/package/run` checks them on
//! the installed app.

use std::io::Write;

use tptt_chat::commands::export_file_stem;
use tptt_chat::logging::{log_file, LOG_FILE_PREFIX};
use tptt_chat::AppConfig;

#[test]
fn the_log_file_is_created_in_its_folder_with_the_day_in_its_name() {
    let dir = tempfile::tempdir().expect("dir");
    let logs = dir.path().join("data").join("logs");
    let mut file = log_file(&logs).expect("a log file in a new folder");
    file.write_all(b"hello from the test\n").expect("write");
    file.flush().expect("flush");
    let names: Vec<String> = std::fs::read_dir(&logs)
        .expect("the folder was created")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let name = &names[0];
    // tptt-chat.YYYY-MM-DD.log
    let date = name
        .strip_prefix(&format!("{LOG_FILE_PREFIX}."))
        .and_then(|rest| rest.strip_suffix(".log"))
        .unwrap_or_else(|| panic!("unexpected log file name {name}"));
    assert_eq!(date.len(), 10, "{name}");
    assert_eq!(date.matches('-').count(), 2, "{name}");
    let text = std::fs::read_to_string(logs.join(name)).expect("read");
    assert_eq!(text, "hello from the test\n");
}

#[test]
fn an_unwritable_log_folder_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("dir");
    // A file where the folder should be: it cannot be created.
    let blocked = dir.path().join("logs");
    std::fs::write(&blocked, b"not a folder").expect("file");
    let err = log_file(&blocked.join("inner")).expect_err("no folder inside a file");
    assert!(err.to_string().contains("logs"), "{err}");
}

#[test]
fn the_log_folder_is_in_the_data_folder() {
    let dir = tempfile::tempdir().expect("dir");
    let config = AppConfig::in_dir(dir.path(), tptt_hub::HubConfig::from_env());
    assert_eq!(config.log_dir(), dir.path().join("logs"));
}

#[test]
fn an_export_proposes_the_title_as_a_file_name() {
    let check = |title: &str, expected: &str| {
        assert_eq!(export_file_stem(title), expected, "title {title:?}");
    };
    check("Trip to Lisbon", "Trip to Lisbon");
    check("  What is 2/3 of 9?  ", "What is 23 of 9");
    check("../../etc/passwd", "etcpasswd");
    check("Ünïcödé — naïve_café-1", "Ünïcödé  naïve_café-1");
    check("?!/\\:*", "conversation");
    check("", "conversation");
    let long = "a".repeat(100);
    check(&long, &"a".repeat(60));
    // 59 letters, a space, then more: cut at 60, the trailing space dropped.
    check(&format!("{} bcd", "x".repeat(59)), &"x".repeat(59));
}
