//! State snapshots: record, latest for a model, stale ones dropped, pruning, shared files,
//! bad input.

use std::path::PathBuf;

use tptt_store::{ConversationId, Error, MessageId, ModelKey, NewSnapshot, Role, Store};

use crate::common::{conversation_with, fresh};

fn snap(c: ConversationId, m: MessageId, key: &ModelKey, path: &str) -> NewSnapshot {
    NewSnapshot {
        conversation_id: c,
        message_id: m,
        key: key.clone(),
        path: path.into(),
        size_bytes: 123_456,
        token_count: 789,
    }
}

async fn two_turns(s: &Store) -> (ConversationId, Vec<MessageId>) {
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
    let ids = s
        .list_messages(c)
        .await
        .unwrap()
        .items
        .iter()
        .map(|m| m.id)
        .collect();
    (c, ids)
}

#[tokio::test]
async fn latest_snapshot_is_the_last_turn_for_the_same_model() {
    let db = fresh().await;
    let s = &db.store;
    let (c, m) = two_turns(s).await;
    let liza = ModelKey::new("ffurfaro/Titans-Llama-3.2-1B", "liza", "00ff");
    let other_variant = ModelKey::new("ffurfaro/Titans-Llama-3.2-1B", "delta", "00ff");
    let other_config = ModelKey::new("ffurfaro/Titans-Llama-3.2-1B", "liza", "beef");
    assert_eq!(s.latest_snapshot(c, &liza).await.unwrap(), None);

    let recorded = s
        .record_snapshot(&snap(c, m[1], &liza, "/s/turn1"))
        .await
        .unwrap();
    assert_eq!(
        s.latest_snapshot(c, &liza).await.unwrap().as_ref(),
        Some(&recorded)
    );
    s.record_snapshot(&snap(c, m[3], &liza, "/s/turn2"))
        .await
        .unwrap();
    s.record_snapshot(&snap(c, m[3], &other_variant, "/s/turn2-delta"))
        .await
        .unwrap();
    let latest = s.latest_snapshot(c, &liza).await.unwrap().unwrap();
    assert_eq!(latest.path, PathBuf::from("/s/turn2"));
    assert_eq!(
        (latest.size_bytes, latest.token_count, latest.message_id),
        (123_456, 789, m[3])
    );
    assert_eq!(latest.key, liza);
    assert_eq!(
        s.latest_snapshot(c, &other_variant)
            .await
            .unwrap()
            .unwrap()
            .path,
        PathBuf::from("/s/turn2-delta")
    );
    assert_eq!(s.latest_snapshot(c, &other_config).await.unwrap(), None);
    // A later-recorded snapshot of an earlier turn does not win over the later turn.
    s.record_snapshot(&snap(c, m[1], &liza, "/s/turn1-again"))
        .await
        .unwrap();
    assert_eq!(
        s.latest_snapshot(c, &liza).await.unwrap().unwrap().path,
        PathBuf::from("/s/turn2")
    );
    let listed = s.list_snapshots(c).await.unwrap();
    assert_eq!(listed.items.len(), 4);
    assert!(listed.skipped.is_empty());
}

#[tokio::test]
async fn stale_snapshots_are_deleted_and_their_files_returned() {
    let db = fresh().await;
    let s = &db.store;
    let (c, m) = two_turns(s).await;
    let (d, dm) = two_turns(s).await;
    let current = ModelKey::new("repo", "v2", "h2");
    let old_variant = ModelKey::new("repo", "v1", "h2");
    let old_config = ModelKey::new("repo", "v2", "h1");
    let old_model = ModelKey::new("other", "v2", "h2");
    s.record_snapshot(&snap(c, m[1], &current, "/s/current"))
        .await
        .unwrap();
    s.record_snapshot(&snap(c, m[1], &old_variant, "/s/v1"))
        .await
        .unwrap();
    s.record_snapshot(&snap(c, m[3], &old_config, "/s/h1"))
        .await
        .unwrap();
    s.record_snapshot(&snap(c, m[3], &old_model, "/s/other"))
        .await
        .unwrap();
    s.record_snapshot(&snap(d, dm[1], &old_model, "/s/d-other"))
        .await
        .unwrap();

    let mut files = s.delete_stale_snapshots(c, &current).await.unwrap();
    files.sort();
    assert_eq!(files, ["/s/h1", "/s/other", "/s/v1"].map(PathBuf::from));
    let left: Vec<PathBuf> = s
        .list_snapshots(c)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|x| x.path)
        .collect();
    assert_eq!(left, [PathBuf::from("/s/current")]);
    // Only that conversation.
    assert_eq!(s.list_snapshots(d).await.unwrap().items.len(), 1);
    assert!(s
        .delete_stale_snapshots(c, &current)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn pruning_keeps_the_latest_and_never_returns_a_file_still_in_use() {
    let db = fresh().await;
    let s = &db.store;
    let (c, m) = two_turns(s).await;
    let key = ModelKey::new("repo", "v", "h");
    s.record_snapshot(&snap(c, m[0], &key, "/s/0"))
        .await
        .unwrap();
    s.record_snapshot(&snap(c, m[1], &key, "/s/shared"))
        .await
        .unwrap();
    s.record_snapshot(&snap(c, m[2], &key, "/s/2"))
        .await
        .unwrap();
    // The engine overwrote one file in place: two rows, one path.
    s.record_snapshot(&snap(c, m[3], &key, "/s/shared"))
        .await
        .unwrap();

    let mut files = s.prune_snapshots(c, 1).await.unwrap();
    files.sort();
    // "/s/shared" of turn 1 is gone as a row but the latest row still uses the file.
    assert_eq!(files, ["/s/0", "/s/2"].map(PathBuf::from));
    let left = s.list_snapshots(c).await.unwrap().items;
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].message_id, left[0].path.clone()),
        (m[3], PathBuf::from("/s/shared"))
    );
    assert!(s.prune_snapshots(c, 1).await.unwrap().is_empty());
    assert_eq!(
        s.prune_snapshots(c, 0).await.unwrap(),
        [PathBuf::from("/s/shared")]
    );
}

#[tokio::test]
async fn bad_snapshot_input_is_refused() {
    let db = fresh().await;
    let s = &db.store;
    let (c, m) = two_turns(s).await;
    let (d, _) = two_turns(s).await;
    let key = ModelKey::new("repo", "v", "h");
    let err = s
        .record_snapshot(&snap(d, m[1], &key, "/s/x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(err.to_string().contains("belongs to conversation"), "{err}");
    let err = s
        .record_snapshot(&snap(c, MessageId(999_999), &key, "/s/x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MessageNotFound(_)), "{err:?}");
    let mut too_big = snap(c, m[1], &key, "/s/x");
    too_big.size_bytes = u64::MAX;
    assert!(matches!(
        s.record_snapshot(&too_big).await,
        Err(Error::InvalidInput(_))
    ));
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let mut not_utf8 = snap(c, m[1], &key, "/s/x");
        not_utf8.path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/s/\xff"));
        assert!(matches!(
            s.record_snapshot(&not_utf8).await,
            Err(Error::InvalidInput(_))
        ));
    }
    assert!(s.list_snapshots(c).await.unwrap().items.is_empty());
}
