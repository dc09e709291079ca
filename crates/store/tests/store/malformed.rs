//! Rows written by hand (or by a newer version): each is a clear error for that row, and the
//! listings still return the others, reporting the bad one.

use tptt_store::{Error, ListScope, MessageId, Role};

use crate::common::{conversation_with, exec, fresh};

#[tokio::test]
async fn a_conversation_with_invalid_settings_is_skipped_and_reported() {
    let db = fresh().await;
    let s = &db.store;
    let good1 = conversation_with(s, "good one", &[(Role::User, "findme")]).await;
    let bad = conversation_with(s, "bad settings", &[(Role::User, "findme")]).await;
    let bad_utf8 = conversation_with(s, "bad title", &[(Role::User, "findme")]).await;
    let good2 = conversation_with(s, "good two", &[(Role::User, "findme")]).await;
    exec(
        &db.path,
        "UPDATE conversations SET settings = '{not json' WHERE title = 'bad settings'",
    )
    .await;
    exec(
        &db.path,
        "UPDATE conversations SET title = CAST(x'ff' AS TEXT) WHERE title = 'bad title'",
    )
    .await;

    let listing = s.list_conversations(ListScope::Active).await.unwrap();
    let ids: Vec<_> = listing.items.iter().map(|c| c.id).collect();
    assert_eq!(ids, [good2, good1]);
    let mut skipped: Vec<_> = listing.skipped.iter().map(|r| (r.table, r.id)).collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            ("conversations", Some(bad.0)),
            ("conversations", Some(bad_utf8.0))
        ]
    );

    let err = s.get_conversation(bad).await.unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("conversation {bad} cannot be read: settings")),
        "{message}"
    );
    assert!(message.contains("edited outside the app"), "{message}");
    assert!(matches!(
        s.get_conversation(bad_utf8).await,
        Err(Error::Malformed(_))
    ));

    // Search reports them the same way.
    let hits = s.search("findme", 10).await.unwrap();
    assert_eq!(hits.items.len(), 2);
    assert_eq!(hits.skipped.len(), 2);
    // Their messages still read, and they can be deleted.
    assert_eq!(s.list_messages(bad).await.unwrap().items.len(), 1);
    s.delete_conversation(bad).await.unwrap();
    s.delete_conversation(bad_utf8).await.unwrap();
    assert!(s
        .list_conversations(ListScope::All)
        .await
        .unwrap()
        .skipped
        .is_empty());
}

#[tokio::test]
async fn a_message_with_an_unknown_role_or_status_is_skipped_and_reported() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(
        s,
        "t",
        &[
            (Role::User, "one"),
            (Role::Assistant, "two"),
            (Role::User, "three"),
            (Role::Assistant, "four"),
        ],
    )
    .await;
    exec(
        &db.path,
        "UPDATE messages SET role = 'tool' WHERE content = 'two'",
    )
    .await;
    exec(
        &db.path,
        "UPDATE messages SET status = 'queued' WHERE content = 'three'",
    )
    .await;
    exec(
        &db.path,
        "UPDATE messages SET stats = '{oops' WHERE content = 'four'",
    )
    .await;

    let listing = s.list_messages(c).await.unwrap();
    let contents: Vec<&str> = listing.items.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["one"]);
    let reasons: Vec<&str> = listing.skipped.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3);
    assert!(reasons[0].contains("unknown role `tool`"), "{reasons:?}");
    assert!(
        reasons[1].contains("unknown message status `queued`"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("stats are not JSON"), "{reasons:?}");

    let bad_id = MessageId(listing.skipped[0].id.unwrap());
    let err = s.get_message(bad_id).await.unwrap_err();
    assert_eq!(
        err.to_string().split(" (").next().unwrap(),
        format!("message {bad_id} cannot be read: unknown role `tool` (expected system, user or assistant)")
            .split(" (")
            .next()
            .unwrap()
    );
    // Export refuses rather than silently dropping a message.
    assert!(matches!(
        s.export_markdown(c).await,
        Err(Error::Malformed(_))
    ));
    assert!(matches!(s.export_json(c).await, Err(Error::Malformed(_))));
    // The conversation itself lists fine.
    assert_eq!(
        s.list_conversations(ListScope::Active)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}
