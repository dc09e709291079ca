//! Writes that keep the user's text: edit-and-resend in one transaction, a regenerated answer
//! that replaces the old one only once it has started, answers left streaming by a process
//! that died; and a damaged database at open: a damaged search index rebuilt
//! from the text, a file that fails `quick_check` refused untouched.

use std::path::{Path, PathBuf};

use tptt_store::messages::INTERRUPTED;
use tptt_store::{
    ConversationId, Damage, Error, Message, MessageStatus, MessageUpdate, ModelKey, NewMessage,
    NewSnapshot, Role, Store, VersionSet,
};

use crate::common::{conversation_with, exec, fresh, fts_integrity, raw};

async fn contents(s: &Store, c: ConversationId) -> Vec<(u32, Role, String)> {
    s.list_messages(c)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| (m.position, m.role, m.content))
        .collect()
}

fn owned(v: &[(u32, Role, &str)]) -> Vec<(u32, Role, String)> {
    v.iter().map(|&(p, r, t)| (p, r, t.to_string())).collect()
}

async fn snapshot_after(s: &Store, c: ConversationId, m: &Message, path: &str) {
    s.record_snapshot(&NewSnapshot {
        conversation_id: c,
        message_id: m.id,
        key: ModelKey::new("m", "v", "h"),
        path: PathBuf::from(path),
        size_bytes: 1,
        token_count: 1,
    })
    .await
    .unwrap();
}

async fn two_turns(s: &Store) -> (ConversationId, Vec<Message>) {
    let c = conversation_with(
        s,
        "t",
        &[
            (Role::User, "q1"),
            (Role::Assistant, "a1"),
            (Role::User, "q2"),
            (Role::Assistant, "a2"),
        ],
    )
    .await;
    let messages = s.list_messages(c).await.unwrap().items;
    snapshot_after(s, c, &messages[1], "/snap/1").await;
    snapshot_after(s, c, &messages[3], "/snap/3").await;
    (c, messages)
}

/// Edit-and-resend: keeping the old message and what follows as a version (with its latest
/// snapshot), the edited message and the new answer are one change.
#[tokio::test]
async fn edit_and_truncate_edits_drops_what_follows_and_adds_the_answer() {
    let db = fresh().await;
    let s = &db.store;
    let (c, messages) = two_turns(s).await;
    let edited = s
        .edit_and_truncate(c, messages[0].id, "q1 edited")
        .await
        .unwrap();
    assert_ne!(edited.user.id, messages[0].id);
    assert_eq!(edited.user.position, 0);
    assert_eq!(edited.user.content, "q1 edited");
    assert_eq!(edited.answer.position, 1);
    assert_eq!(edited.answer.status, MessageStatus::Partial);
    // The old continuation keeps its latest snapshot only.
    assert_eq!(edited.files, [PathBuf::from("/snap/1")]);
    assert_eq!(
        contents(s, c).await,
        owned(&[(0, Role::User, "q1 edited"), (1, Role::Assistant, "")])
    );
    assert_eq!(s.get_message(edited.user.id).await.unwrap(), edited.user);
    // The old message is kept, with its id and text, outside the conversation shown.
    let kept = s.get_message(messages[0].id).await.unwrap();
    assert_eq!((kept.content.as_str(), kept.position), ("q1", 0));
    assert_ne!(kept.conversation_id, c);
    assert!(s.list_snapshots(c).await.unwrap().items.is_empty());
    assert_eq!(
        s.list_versions(c).await.unwrap(),
        [VersionSet {
            position: 0,
            current: 2,
            total: 2
        }]
    );
    // The search index follows the edit; kept versions are not found.
    assert!(s.search("q1 edited", 5).await.unwrap().items.len() == 1);
    assert!(s.search("a2", 5).await.unwrap().items.is_empty());
    fts_integrity(s).await;

    // Only a user message of this conversation can be edited.
    let other = conversation_with(s, "u", &[(Role::User, "x")]).await;
    for (conv, id) in [(c, edited.answer.id), (other, messages[0].id)] {
        let err = s.edit_and_truncate(conv, id, "no").await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
}

/// A failure in the middle of edit-and-resend (here the new answer cannot be inserted)
/// changes nothing: the old text, the later messages and their snapshots are all still there.
/// (The three calls it replaces — delete the later messages, add the edited one, add the
/// answer — left the later messages deleted under the same fault.)
#[tokio::test]
async fn a_failed_edit_and_truncate_changes_nothing() {
    let db = fresh().await;
    let s = &db.store;
    let (c, _) = two_turns(s).await;
    let before = contents(s, c).await;
    let messages = s.list_messages(c).await.unwrap().items;
    exec(
        &db.path,
        "CREATE TRIGGER no_answers BEFORE INSERT ON messages WHEN new.role = 'assistant' \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .await;
    let err = s
        .edit_and_truncate(c, messages[2].id, "q2 edited")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(contents(s, c).await, before);
    assert_eq!(s.list_snapshots(c).await.unwrap().items.len(), 2);
    fts_integrity(s).await;
}

/// Regenerate: the old answer stays until the new one has started; then the new one takes
/// its place in one step. Given up before it started, the new one goes and the old one is
/// as it was.
#[tokio::test]
async fn a_replaced_answer_stays_until_the_new_one_has_started() {
    let db = fresh().await;
    let s = &db.store;
    let (c, messages) = two_turns(s).await;
    let old = &messages[3];

    let r = s.begin_replacing_answer(c, old.id).await.unwrap();
    assert_eq!(r.old, *old);
    assert_eq!(r.new.position, 4);
    // Meanwhile the old answer is there, whole, with its snapshot; the memory to start the new
    // one from is the one before the old one's position.
    assert_eq!(s.get_message(old.id).await.unwrap(), *old);
    let key = ModelKey::new("m", "v", "h");
    let latest = |before| s.latest_snapshot_before(c, &key, before);
    assert_eq!(
        latest(old.position).await.unwrap().unwrap().message_id,
        messages[1].id
    );
    assert_eq!(latest(u32::MAX).await.unwrap().unwrap().message_id, old.id);
    // Given up (failed or stopped before its first token): as before, snapshot included.
    let files = s.abandon_replacing_answer(r.new.id).await.unwrap();
    assert!(files.is_empty());
    assert_eq!(latest(u32::MAX).await.unwrap().unwrap().message_id, old.id);
    assert_eq!(
        contents(s, c).await,
        owned(&[
            (0, Role::User, "q1"),
            (1, Role::Assistant, "a1"),
            (2, Role::User, "q2"),
            (3, Role::Assistant, "a2"),
        ])
    );
    assert_eq!(s.get_message(old.id).await.unwrap(), *old);

    // Started: the new answer takes the old one's place.
    let r = s.begin_replacing_answer(c, old.id).await.unwrap();
    s.update_message(
        r.new.id,
        &MessageUpdate::new("a2 again", MessageStatus::Partial),
    )
    .await
    .unwrap();
    s.finish_replacing_answer(old.id, r.new.id).await.unwrap();
    assert_eq!(
        contents(s, c).await,
        owned(&[
            (0, Role::User, "q1"),
            (1, Role::Assistant, "a1"),
            (2, Role::User, "q2"),
            (3, Role::Assistant, "a2 again"),
        ])
    );
    // The old answer is kept as version 1 of its position, with its snapshot.
    assert_eq!(
        latest(u32::MAX).await.unwrap().unwrap().message_id,
        messages[1].id
    );
    let kept = s.get_message(old.id).await.unwrap();
    assert_eq!((kept.content.as_str(), kept.position), ("a2", 3));
    assert_ne!(kept.conversation_id, c);
    assert_eq!(
        s.list_versions(c).await.unwrap(),
        [VersionSet {
            position: 3,
            current: 2,
            total: 2
        }]
    );
    // Finishing twice is harmless; the next message comes after the new answer.
    assert!(s
        .finish_replacing_answer(old.id, r.new.id)
        .await
        .unwrap()
        .is_empty());
    let next = s
        .add_message(c, &NewMessage::new(Role::User, "q3"))
        .await
        .unwrap();
    assert_eq!(next.position, 4);
    fts_integrity(s).await;

    // Only the conversation's last message, an answer, can be replaced.
    for id in [messages[1].id, next.id] {
        let err = s.begin_replacing_answer(c, id).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
}

/// The app was killed while answers streamed: at the next open, the text saved until then is
/// there, marked interrupted (not streaming forever); a regeneration that had not started is
/// dropped (the old answer stays), one that had is kept in the old one's place. Stopped,
/// failed and complete answers are left alone, and the conversation goes on.
#[tokio::test]
async fn answers_left_streaming_by_a_dead_process_are_settled_at_open() {
    let db = fresh().await;
    let s = &db.store;
    // Streaming, with text saved (a send that was killed).
    let streaming = conversation_with(s, "streaming", &[(Role::User, "q")]).await;
    let a = s
        .add_message(streaming, &NewMessage::streaming_answer())
        .await
        .unwrap();
    s.update_message(
        a.id,
        &MessageUpdate::new("Once upon", MessageStatus::Partial),
    )
    .await
    .unwrap();
    // Regenerations killed before and after their first token.
    let (not_started, m1) = two_turns(s).await;
    s.begin_replacing_answer(not_started, m1[3].id)
        .await
        .unwrap();
    let (started, m2) = two_turns(s).await;
    let r = s.begin_replacing_answer(started, m2[3].id).await.unwrap();
    s.update_message(
        r.new.id,
        &MessageUpdate::new("a2 be", MessageStatus::Partial),
    )
    .await
    .unwrap();
    // Stopped (saved with its stats) and failed answers are finished: left alone.
    let stopped = conversation_with(s, "stopped", &[(Role::User, "q")]).await;
    let st = s
        .add_message(stopped, &NewMessage::streaming_answer())
        .await
        .unwrap();
    let stopped_update = MessageUpdate {
        stats: Some(serde_json::json!({"finish": "Cancelled"})),
        ..MessageUpdate::new("half", MessageStatus::Partial)
    };
    s.update_message(st.id, &stopped_update).await.unwrap();
    let stopped_before = s.get_message(st.id).await.unwrap();
    s.close().await;

    let s = Store::open(&db.path).await.expect("reopen");
    let a = s.get_message(a.id).await.unwrap();
    assert_eq!(
        (a.content.as_str(), a.status, a.error.as_deref()),
        ("Once upon", MessageStatus::Partial, Some(INTERRUPTED))
    );
    assert_eq!(
        contents(&s, not_started).await,
        owned(&[
            (0, Role::User, "q1"),
            (1, Role::Assistant, "a1"),
            (2, Role::User, "q2"),
            (3, Role::Assistant, "a2"),
        ])
    );
    assert_eq!(
        contents(&s, started).await,
        owned(&[
            (0, Role::User, "q1"),
            (1, Role::Assistant, "a1"),
            (2, Role::User, "q2"),
            (3, Role::Assistant, "a2 be"),
        ])
    );
    assert_eq!(
        s.get_message(r.new.id).await.unwrap().error.as_deref(),
        Some(INTERRUPTED)
    );
    // The answer it replaced is kept as a version; the one not started made none.
    assert_eq!(
        s.list_versions(started).await.unwrap(),
        [VersionSet {
            position: 3,
            current: 2,
            total: 2
        }]
    );
    assert!(s.list_versions(not_started).await.unwrap().is_empty());
    assert_eq!(s.get_message(st.id).await.unwrap(), stopped_before);
    // Settling is done once: a second open changes nothing.
    let all = |s: Store| async move {
        let mut out = Vec::new();
        for c in [streaming, not_started, started, stopped] {
            out.push(s.list_messages(c).await.unwrap().items);
        }
        out
    };
    let settled = all(s.clone()).await;
    s.close().await;
    let s = Store::open(&db.path).await.expect("reopen again");
    assert_eq!(all(s.clone()).await, settled);
    // The conversation goes on after the interrupted answer.
    let next = s
        .add_message(streaming, &NewMessage::new(Role::User, "go on"))
        .await
        .unwrap();
    assert_eq!(next.position, 2);
    fts_integrity(&s).await;
    s.close().await;
}

/// Reads the main file's bytes (the store must be closed: nothing in the WAL).
fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("database file")
}

async fn found(s: &Store, query: &str) -> usize {
    s.search(query, 50).await.expect("search works").items.len()
}

/// A search index that no longer matches the text (entries deleted behind the table's back) or
/// whose own storage is damaged (rows of its shadow table deleted) is detected at open and
/// rebuilt from the messages: search finds everything again, no message changed.
#[tokio::test]
async fn a_damaged_search_index_is_rebuilt_at_open() {
    let damages: [&[&'static str]; 2] = [
        // The index forgets a message and a title (FTS5 'delete' of external content).
        &[
            "INSERT INTO messages_fts (messages_fts, rowid, content) \
             SELECT 'delete', id, content FROM messages WHERE content = 'the lighthouse keeper'",
            "INSERT INTO conversations_fts (conversations_fts, rowid, title) \
             SELECT 'delete', id, title FROM conversations WHERE title = 'Harbour notes'",
        ],
        // The index's own storage loses its segments.
        &[
            "DELETE FROM messages_fts_data WHERE id > 10",
            "DELETE FROM conversations_fts_data WHERE id > 10",
        ],
    ];
    for damage in damages {
        let db = fresh().await;
        let s = &db.store;
        let c = conversation_with(
            s,
            "Harbour notes",
            &[
                (Role::User, "Who lives in the lighthouse?"),
                (Role::Assistant, "the lighthouse keeper"),
            ],
        )
        .await;
        let messages_before = s.list_messages(c).await.unwrap().items;
        assert_eq!(found(s, "lighthouse keeper").await, 1);
        s.close().await;

        let mut conn = raw(&db.path).await;
        for sql in damage {
            sqlx::query(*sql).execute(&mut conn).await.expect(sql);
        }
        // Damaged: the index misses the text, or fails.
        let hits: Result<i64, _> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH '\"lighthouse keeper\"'",
        )
        .fetch_one(&mut conn)
        .await;
        assert!(!matches!(hits, Ok(1)), "the damage shows: {hits:?}");
        drop(conn);

        let s = Store::open(&db.path).await.expect("open repairs the index");
        assert_eq!(found(&s, "lighthouse keeper").await, 1);
        assert_eq!(found(&s, "Harbour").await, 1);
        assert_eq!(s.list_messages(c).await.unwrap().items, messages_before);
        fts_integrity(&s).await;
        s.close().await;
    }
}

/// A file whose B-tree is damaged (two rows of the messages table out of order) fails
/// `quick_check` at open: refused with an error that names the file and says it was not
/// changed — and it was not. (Opening did not read that table before: it opened.)
#[tokio::test]
async fn a_file_failing_quick_check_is_refused_untouched() {
    let db = fresh().await;
    conversation_with(
        &db.store,
        "t",
        &[(Role::User, "precious"), (Role::Assistant, "kept")],
    )
    .await;
    let (root, page_size): (i64, i64) = (
        sqlx::query_scalar("SELECT rootpage FROM sqlite_schema WHERE name = 'messages'")
            .fetch_one(db.store.pool())
            .await
            .unwrap(),
        sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(db.store.pool())
            .await
            .unwrap(),
    );
    db.store.close().await;
    let mut file = bytes(&db.path);
    // The table's only page (a leaf: an 8-byte header, then the cell pointers): the first
    // row's id (the varint after its payload size) becomes 5, after the second row's 2.
    let page = usize::try_from((root - 1) * page_size).unwrap();
    assert_eq!(file[page], 0x0d, "a table leaf page");
    let cell = page + usize::from(u16::from_be_bytes([file[page + 8], file[page + 9]]));
    assert_eq!(file[cell + 1], 1, "the first row's id");
    file[cell + 1] = 5;
    std::fs::write(&db.path, &file).unwrap();

    let err = Store::open(&db.path).await.expect_err("a damaged file");
    assert!(
        matches!(
            err,
            Error::Corrupt {
                source: Damage::QuickCheck(_),
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&db.path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("Nothing was changed"), "{message}");
    assert!(message.contains("integrity check"), "{message}");
    assert_eq!(bytes(&db.path), file, "the file is left as it was");
}
