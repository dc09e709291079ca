//! Opening: files and folders created, WAL, migrations on reopen, damaged files, newer
//! schemas, two stores on one file.

use tptt_store::{Error, ListScope, NewConversation, NewMessage, Role, Store};

use crate::common::{exec, fresh};

#[tokio::test]
async fn open_creates_the_file_and_its_folders_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("chat.sqlite3");
    let store = Store::open(&path).await.expect("open creates everything");
    assert!(path.is_file());
    assert_eq!(store.path(), Some(path.as_path()));
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // Every commit is on disk when it returns (power loss included), not only in the WAL.
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(synchronous, 2, "synchronous = FULL");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
    store.close().await;
}

#[tokio::test]
async fn in_memory_store_works() {
    let store = Store::open_in_memory().await.expect("in memory");
    assert_eq!(store.path(), None);
    let c = store
        .create_conversation(&NewConversation::titled("m"))
        .await
        .unwrap();
    store
        .add_message(c.id, &NewMessage::new(Role::User, "hi"))
        .await
        .unwrap();
    let listed = store.list_conversations(ListScope::Active).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    // Foreign keys hold in memory too.
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
}

#[tokio::test]
async fn reopening_keeps_data_and_applies_no_migration_twice() {
    let db = fresh().await;
    let c = db
        .store
        .create_conversation(&NewConversation::titled("kept"))
        .await
        .unwrap();
    db.store
        .add_message(c.id, &NewMessage::new(Role::User, "still here"))
        .await
        .unwrap();
    let schema = |store: Store| async move {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name")
                .fetch_all(store.pool())
                .await
                .unwrap();
        let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(store.pool())
            .await
            .unwrap();
        (rows, migrations)
    };
    let before = schema(db.store.clone()).await;
    db.store.close().await;
    for _ in 0..3 {
        let store = Store::open(&db.path).await.expect("reopen");
        assert_eq!(schema(store.clone()).await, before);
        let messages = store.list_messages(c.id).await.unwrap();
        assert_eq!(messages.items[0].content, "still here");
        store.close().await;
    }
    let migration_files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(before.1, migration_files);
}

/// Garbage in place of the database: a clear error naming the file and the way out, the file
/// left as it was, and `move_aside` + open gives a working, empty store.
#[tokio::test]
async fn a_corrupt_file_gives_a_clear_error_and_can_be_moved_aside() {
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for content in [
        garbage.as_slice(),
        b"hello, I am not a database\n".as_slice(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.sqlite3");
        std::fs::write(&path, content).unwrap();
        let err = Store::open(&path).await.expect_err("garbage must not open");
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("Move it aside"), "{message}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            content,
            "the file is left untouched"
        );

        let moved = Store::move_aside(&path).expect("move aside");
        assert!(!path.exists());
        assert_eq!(std::fs::read(&moved).unwrap(), content);
        assert!(moved.to_string_lossy().contains(".corrupt-"));
        let store = Store::open(&path)
            .await
            .expect("a fresh database after moving aside");
        assert!(store
            .list_conversations(ListScope::All)
            .await
            .unwrap()
            .items
            .is_empty());
        store.close().await;
    }
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused_unchanged() {
    let db = fresh().await;
    db.store.close().await;
    exec(
        &db.path,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', 1, x'00', 0)",
    )
    .await;
    let err = Store::open(&db.path).await.expect_err("newer schema");
    assert!(
        matches!(err, Error::NewerSchema { version: 9999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer version"), "{err}");
}

#[tokio::test]
async fn a_folder_in_place_of_the_file_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path())
        .await
        .expect_err("a folder is no database");
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

/// Two stores open one new file at the same moment (both migrate), then write and read each
/// other's rows: WAL lets them share it.
#[tokio::test]
async fn two_stores_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.sqlite3");
    let (a, b) = tokio::join!(Store::open(&path), Store::open(&path));
    let (a, b) = (a.expect("first store"), b.expect("second store"));
    let c = a
        .create_conversation(&NewConversation::titled("from a"))
        .await
        .unwrap();
    // The user's message is committed: the other store sees it at once.
    a.add_message(c.id, &NewMessage::new(Role::User, "question"))
        .await
        .unwrap();
    let seen = b.list_messages(c.id).await.unwrap();
    assert_eq!(seen.items.len(), 1);
    b.add_message(c.id, &NewMessage::new(Role::Assistant, "answer"))
        .await
        .unwrap();
    // Interleaved writers on both, in flight together.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .add_message(c.id, &NewMessage::new(Role::User, format!("m{i}")))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("concurrent write");
    }
    let all = a.list_messages(c.id).await.unwrap().items;
    assert_eq!(all.len(), 12);
    let positions: Vec<u32> = all.iter().map(|m| m.position).collect();
    assert_eq!(positions, (0..12).collect::<Vec<_>>());
    let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(b.pool())
        .await
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(migrations, files);
    a.close().await;
    b.close().await;
}
