//! Versions: regenerate and edit keep what they replace; switching brings a version back with
//! its message ids and snapshots; versions inside versions travel with them; deleting takes
//! them all; hidden versions are listed and searched nowhere.

use std::path::PathBuf;

use tptt_store::{
    ConversationId, Error, ListScope, Message, MessageStatus, MessageUpdate, ModelKey, NewSnapshot,
    Role, Store, VersionSet,
};

use crate::common::{conversation_with, fresh, fts_integrity};

fn key() -> ModelKey {
    ModelKey::new("m", "v", "h")
}

async fn texts(s: &Store, c: ConversationId) -> Vec<String> {
    s.list_messages(c)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| m.content)
        .collect()
}

async fn snapshot_after(s: &Store, c: ConversationId, m: &Message, path: &str) {
    s.record_snapshot(&NewSnapshot {
        conversation_id: c,
        message_id: m.id,
        key: key(),
        path: PathBuf::from(path),
        size_bytes: 1,
        token_count: 1,
    })
    .await
    .unwrap();
}

/// Regenerates the conversation's last answer with `text` (begin, a token, finish).
async fn regenerate(s: &Store, c: ConversationId, text: &str) -> Message {
    let last = s.last_message(c).await.unwrap().unwrap();
    let r = s.begin_replacing_answer(c, last.id).await.unwrap();
    s.update_message(r.new.id, &MessageUpdate::new(text, MessageStatus::Complete))
        .await
        .unwrap();
    s.finish_replacing_answer(last.id, r.new.id).await.unwrap();
    s.get_message(r.new.id).await.unwrap()
}

fn set(position: u32, current: u32, total: u32) -> VersionSet {
    VersionSet {
        position,
        current,
        total,
    }
}

#[tokio::test]
async fn regenerated_answers_are_versions_and_switching_brings_each_back() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(s, "t", &[(Role::User, "q1"), (Role::Assistant, "a1")]).await;
    assert!(s.list_versions(c).await.unwrap().is_empty());
    let first = s.last_message(c).await.unwrap().unwrap();
    let second = regenerate(s, c, "a1 second").await;
    let third = regenerate(s, c, "a1 third").await;
    assert_eq!(s.list_versions(c).await.unwrap(), [set(1, 3, 3)]);
    assert_eq!(texts(s, c).await, ["q1", "a1 third"]);

    // To version 1: the first answer is back with its id, at its position.
    let switched = s.switch_version(c, third.id, 1).await.unwrap();
    assert_eq!((switched.position, switched.version), (1, 1));
    assert_eq!(texts(s, c).await, ["q1", "a1"]);
    let shown = s.list_messages(c).await.unwrap().items;
    assert_eq!(shown[1].id, first.id);
    assert_eq!(s.list_versions(c).await.unwrap(), [set(1, 1, 3)]);
    // To version 2, addressed through the message shown now.
    s.switch_version(c, first.id, 2).await.unwrap();
    assert_eq!(texts(s, c).await, ["q1", "a1 second"]);
    assert_eq!(s.list_messages(c).await.unwrap().items[1].id, second.id);
    // The shown version again: nothing changes.
    s.switch_version(c, second.id, 2).await.unwrap();
    assert_eq!(texts(s, c).await, ["q1", "a1 second"]);
    assert_eq!(s.list_versions(c).await.unwrap(), [set(1, 2, 3)]);
    // No such version, or a message not shown in this conversation: refused, nothing moves.
    for v in [0, 4, u32::MAX] {
        let err = s.switch_version(c, second.id, v).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
    let err = s.switch_version(c, third.id, 3).await.unwrap_err();
    assert!(matches!(err, Error::MessageNotFound(_)), "{err:?}");
    assert_eq!(texts(s, c).await, ["q1", "a1 second"]);
    // A regenerate from a shown older version adds a fourth.
    regenerate(s, c, "a1 fourth").await;
    assert_eq!(s.list_versions(c).await.unwrap(), [set(1, 4, 4)]);
    // Hidden versions are in no list and no search, and their holders are no conversations of
    // the API (an id guessed by a caller is not found, nothing is changed).
    let listed = s.list_conversations(ListScope::All).await.unwrap().items;
    assert_eq!(listed.len(), 1);
    let holder: i64 = sqlx::query_scalar("SELECT id FROM conversations WHERE owner_id = ? LIMIT 1")
        .bind(c.0)
        .fetch_one(s.pool())
        .await
        .unwrap();
    let holder = ConversationId(holder);
    for err in [
        s.get_conversation(holder).await.unwrap_err(),
        s.rename_conversation(holder, "x").await.unwrap_err(),
        s.set_archived(holder, true).await.unwrap_err(),
        s.set_pinned(holder, true).await.unwrap_err(),
        s.delete_conversation(holder).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::ConversationNotFound(_)), "{err:?}");
    }
    assert_eq!(s.list_versions(c).await.unwrap(), [set(1, 4, 4)]);
    assert!(s.search("a1 third", 5).await.unwrap().items.is_empty());
    assert_eq!(s.search("a1 fourth", 5).await.unwrap().items.len(), 1);
    fts_integrity(s).await;
}

/// An edit keeps the old message and all that followed as version 1, with the latest
/// snapshot; switching back restores them and the snapshot is the conversation's again
/// (the memory continues from it without re-reading).
#[tokio::test]
async fn an_edit_keeps_the_old_continuation_with_its_latest_snapshot() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(
        s,
        "t",
        &[
            (Role::User, "q1"),
            (Role::Assistant, "a1"),
            (Role::User, "q2"),
            (Role::Assistant, "a2"),
            (Role::User, "q3"),
            (Role::Assistant, "a3"),
        ],
    )
    .await;
    let m = s.list_messages(c).await.unwrap().items;
    snapshot_after(s, c, &m[1], "/snap/1").await;
    snapshot_after(s, c, &m[3], "/snap/3").await;
    snapshot_after(s, c, &m[5], "/snap/5").await;
    let edited = s.edit_and_truncate(c, m[2].id, "q2 edited").await.unwrap();
    // The old continuation keeps /snap/5 (its latest); /snap/3 is dropped.
    assert_eq!(edited.files, [PathBuf::from("/snap/3")]);
    assert_eq!(texts(s, c).await, ["q1", "a1", "q2 edited", ""]);
    assert_eq!(s.list_versions(c).await.unwrap(), [set(2, 2, 2)]);
    // The memory to start the edited turn from is the one before it.
    let latest = s.latest_snapshot(c, &key()).await.unwrap().unwrap();
    assert_eq!(latest.message_id, m[1].id);

    s.switch_version(c, edited.user.id, 1).await.unwrap();
    let back = s.list_messages(c).await.unwrap().items;
    assert_eq!(
        back.iter().map(|x| x.id).collect::<Vec<_>>(),
        m.iter().map(|x| x.id).collect::<Vec<_>>()
    );
    let latest = s.latest_snapshot(c, &key()).await.unwrap().unwrap();
    assert_eq!(
        (latest.message_id, latest.path),
        (m[5].id, PathBuf::from("/snap/5"))
    );
    assert_eq!(s.list_versions(c).await.unwrap(), [set(2, 1, 2)]);
    // The edited version, now held, is not searchable; it comes back on request.
    assert!(s.search("q2 edited", 5).await.unwrap().items.is_empty());
    s.switch_version(c, m[2].id, 2).await.unwrap();
    assert_eq!(texts(s, c).await, ["q1", "a1", "q2 edited", ""]);
    assert_eq!(
        s.latest_snapshot(c, &key())
            .await
            .unwrap()
            .unwrap()
            .message_id,
        m[1].id
    );
    fts_integrity(s).await;
}

/// Versions at a later position inside a version travel with it: switching the earlier
/// position away and back finds them as they were.
#[tokio::test]
async fn versions_inside_a_version_travel_with_it() {
    let db = fresh().await;
    let s = &db.store;
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
    let m = s.list_messages(c).await.unwrap().items;
    regenerate(s, c, "a2 again").await;
    assert_eq!(s.list_versions(c).await.unwrap(), [set(3, 2, 2)]);
    // Edit q1: the whole continuation (with the versions of a2) becomes version 1 of 0.
    let edited = s.edit_and_truncate(c, m[0].id, "q1 edited").await.unwrap();
    assert_eq!(s.list_versions(c).await.unwrap(), [set(0, 2, 2)]);
    s.switch_version(c, edited.user.id, 1).await.unwrap();
    assert_eq!(texts(s, c).await, ["q1", "a1", "q2", "a2 again"]);
    assert_eq!(
        s.list_versions(c).await.unwrap(),
        [set(0, 1, 2), set(3, 2, 2)]
    );
    let shown = s.list_messages(c).await.unwrap().items;
    s.switch_version(c, shown[3].id, 1).await.unwrap();
    assert_eq!(texts(s, c).await, ["q1", "a1", "q2", "a2"]);
    assert_eq!(s.list_messages(c).await.unwrap().items[3].id, m[3].id);
    // Deleting the conversation takes every holder, nested ones included, and their snapshots.
    let holders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations WHERE owner_id = ?")
        .bind(c.0)
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(holders, 2);
    let shown = s.list_messages(c).await.unwrap().items;
    snapshot_after(s, c, &shown[3], "/snap/shown").await;
    s.switch_version(c, shown[0].id, 2).await.unwrap();
    let files = s.delete_conversation(c).await.unwrap();
    assert_eq!(files, [PathBuf::from("/snap/shown")]);
    for sql in [
        "SELECT COUNT(*) FROM conversations",
        "SELECT COUNT(*) FROM messages",
        "SELECT COUNT(*) FROM versions",
        "SELECT COUNT(*) FROM snapshots",
    ] {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(s.pool()).await.unwrap();
        assert_eq!(n, 0, "{sql}");
    }
    fts_integrity(s).await;
}

/// Deleting messages from a position deletes the versions of that position and later ones
/// (and the snapshots their holders kept); earlier versions stay.
#[tokio::test]
async fn deleting_messages_deletes_their_versions() {
    let db = fresh().await;
    let s = &db.store;
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
    let m = s.list_messages(c).await.unwrap().items;
    regenerate(s, c, "a2 again").await;
    let shown = s.list_messages(c).await.unwrap().items;
    snapshot_after(s, c, &shown[3], "/snap/a2-again").await;
    // Edit q2: the continuation from 2 (q2 + "a2 again" with its snapshot, and a2's versions)
    // becomes version 1 of position 2.
    s.edit_and_truncate(c, m[2].id, "q2 edited").await.unwrap();
    assert_eq!(s.list_versions(c).await.unwrap(), [set(2, 2, 2)]);
    let files = s.delete_messages_from(c, 2).await.unwrap();
    assert_eq!(files, [PathBuf::from("/snap/a2-again")]);
    assert!(s.list_versions(c).await.unwrap().is_empty());
    assert_eq!(texts(s, c).await, ["q1", "a1"]);
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM conversations")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    // An unknown conversation has no versions.
    let err = s
        .list_versions(ConversationId(c.0 + 1000))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ConversationNotFound(_)), "{err:?}");
}
