//! Messages: positions, the streaming / stop / error flow (partial saves), stats, truncation.

use serde_json::json;
use tptt_store::{
    Error, MessageId, MessageStatus, MessageUpdate, ModelKey, NewMessage, NewSnapshot, Role, Store,
};

use crate::common::{conversation_with, exec, fresh, fts_integrity};

#[tokio::test]
async fn messages_get_positions_in_order() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(
        s,
        "t",
        &[
            (Role::System, "sys"),
            (Role::User, "q"),
            (Role::Assistant, "a"),
        ],
    )
    .await;
    let listing = s.list_messages(c).await.unwrap();
    assert!(listing.skipped.is_empty());
    let got: Vec<(u32, Role, &str)> = listing
        .items
        .iter()
        .map(|m| (m.position, m.role, m.content.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (0, Role::System, "sys"),
            (1, Role::User, "q"),
            (2, Role::Assistant, "a")
        ]
    );
    for m in &listing.items {
        assert_eq!(m.status, MessageStatus::Complete);
        assert_eq!(m.conversation_id, c);
        assert_eq!(&s.get_message(m.id).await.unwrap(), m);
    }
    // Positions are per conversation.
    let other = conversation_with(s, "u", &[(Role::User, "first")]).await;
    assert_eq!(s.list_messages(other).await.unwrap().items[0].position, 0);
}

/// The app's generation flow: the user's message is committed before generation starts (a
/// second connection sees it), the answer streams into a partial message, and a stop keeps
/// its text as partial; a failure keeps its text with the error; a normal end is complete
/// with stats.
#[tokio::test]
async fn stopped_and_failed_answers_are_saved_with_their_text() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(s, "t", &[]).await;
    let user = s
        .add_message(c, &NewMessage::new(Role::User, "Tell me a story"))
        .await
        .unwrap();
    let other = Store::open(&db.path).await.unwrap();
    assert_eq!(
        other.get_message(user.id).await.unwrap().content,
        "Tell me a story"
    );

    // Stopped.
    let answer = s
        .add_message(c, &NewMessage::streaming_answer())
        .await
        .unwrap();
    assert_eq!(
        (answer.position, answer.status, answer.content.as_str()),
        (1, MessageStatus::Partial, "")
    );
    s.update_message(
        answer.id,
        &MessageUpdate::new("Once upon", MessageStatus::Partial),
    )
    .await
    .unwrap();
    s.update_message(
        answer.id,
        &MessageUpdate::new("Once upon a time", MessageStatus::Partial),
    )
    .await
    .unwrap();
    let saved = other.get_message(answer.id).await.unwrap();
    assert_eq!(
        (saved.content.as_str(), saved.status),
        ("Once upon a time", MessageStatus::Partial)
    );
    assert!(saved.updated_at > saved.created_at);

    // Failed.
    let failed = s
        .add_message(c, &NewMessage::streaming_answer())
        .await
        .unwrap();
    let update = MessageUpdate {
        error: Some("CUDA out of memory".into()),
        ..MessageUpdate::new("The dragon", MessageStatus::Error)
    };
    s.update_message(failed.id, &update).await.unwrap();
    let saved = s.get_message(failed.id).await.unwrap();
    assert_eq!(saved.status, MessageStatus::Error);
    assert_eq!(saved.content, "The dragon");
    assert_eq!(saved.error.as_deref(), Some("CUDA out of memory"));

    // Complete, with token count and stats.
    let done = s
        .add_message(c, &NewMessage::streaming_answer())
        .await
        .unwrap();
    let stats = json!({"generated_tokens": 12, "decode_tokens_per_s": 31.5, "finish": "eos"});
    let update = MessageUpdate {
        token_count: Some(12),
        stats: Some(stats.clone()),
        ..MessageUpdate::new("The end.", MessageStatus::Complete)
    };
    s.update_message(done.id, &update).await.unwrap();
    let saved = s.get_message(done.id).await.unwrap();
    assert_eq!(saved.status, MessageStatus::Complete);
    assert_eq!(saved.token_count, Some(12));
    assert_eq!(saved.stats, Some(stats));
    assert_eq!(saved.error, None);
    // The search index follows updates.
    assert_eq!(s.search("upon a time", 5).await.unwrap().items.len(), 1);
    assert!(s.search("Once upon\"", 5).await.unwrap().items.is_empty());
    fts_integrity(s).await;

    let missing = s
        .update_message(
            MessageId(999_999),
            &MessageUpdate::new("x", MessageStatus::Complete),
        )
        .await;
    assert!(
        matches!(missing, Err(Error::MessageNotFound(MessageId(999_999)))),
        "{missing:?}"
    );
    assert!(matches!(
        s.get_message(MessageId(999_999)).await,
        Err(Error::MessageNotFound(_))
    ));
    other.close().await;
}

/// Regenerate / edit-and-resend: messages from a position on go, with the snapshots taken
/// after them; positions continue from there.
#[tokio::test]
async fn truncating_drops_later_messages_and_their_snapshots() {
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
    let messages = s.list_messages(c).await.unwrap().items;
    let key = ModelKey::new("m", "v", "h");
    for (i, m) in [(1, &messages[1]), (3, &messages[3])] {
        s.record_snapshot(&NewSnapshot {
            conversation_id: c,
            message_id: m.id,
            key: key.clone(),
            path: format!("/snap/{i}").into(),
            size_bytes: 1,
            token_count: 1,
        })
        .await
        .unwrap();
    }
    let files = s.delete_messages_from(c, 2).await.unwrap();
    assert_eq!(files, [std::path::PathBuf::from("/snap/3")]);
    let left: Vec<String> = s
        .list_messages(c)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(left, ["q1", "a1"]);
    assert_eq!(
        s.latest_snapshot(c, &key)
            .await
            .unwrap()
            .unwrap()
            .message_id,
        messages[1].id
    );
    let again = s
        .add_message(c, &NewMessage::new(Role::User, "q2 edited"))
        .await
        .unwrap();
    assert_eq!(again.position, 2);
    assert!(s.search("a2", 5).await.unwrap().items.is_empty());
    // Truncating past the end deletes nothing.
    assert!(s.delete_messages_from(c, 100).await.unwrap().is_empty());
    assert_eq!(s.list_messages(c).await.unwrap().items.len(), 3);
    fts_integrity(s).await;
}

/// A 1 MB paste is stored, read back, indexed and exported whole.
#[tokio::test]
async fn a_one_megabyte_message_round_trips() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(s, "big", &[]).await;
    let mut text = String::new();
    let mut i = 0u64;
    while text.len() < 1 << 20 {
        text.push_str(&format!("line {i}: lorem ipsum dolor sit amet ✓\n"));
        i += 1;
    }
    text.push_str("the needle at the very end");
    let started = std::time::Instant::now();
    let m = s
        .add_message(c, &NewMessage::new(Role::User, text.clone()))
        .await
        .unwrap();
    let insert = started.elapsed();
    assert_eq!(s.get_message(m.id).await.unwrap().content, text);
    let hits = s.search("needle at the very", 5).await.unwrap().items;
    assert_eq!(hits.len(), 1);
    let snippet = &hits[0].message.as_ref().unwrap().snippet;
    assert!(snippet.contains("needle at the very end"), "{snippet}");
    assert!(s.export_markdown(c).await.unwrap().contains(&text));
    eprintln!("1 MB message: insert (with trigram indexing) took {insert:?}");
}

#[tokio::test]
async fn the_last_message_is_the_preview() {
    let db = fresh().await;
    let s = &db.store;
    let empty = conversation_with(s, "e", &[]).await;
    assert_eq!(s.last_message(empty).await.unwrap(), None);
    let c = conversation_with(s, "t", &[(Role::User, "q"), (Role::Assistant, "a")]).await;
    let last = s.last_message(c).await.unwrap().expect("a message");
    assert_eq!(
        (last.position, last.role, last.content.as_str()),
        (1, Role::Assistant, "a")
    );
    s.delete_messages_from(c, 1).await.unwrap();
    assert_eq!(
        s.last_message(c).await.unwrap().map(|m| m.content),
        Some("q".to_string())
    );
}

/// A document attached to a user message round-trips; a range outside the text is refused on
/// the way in, and a hand-edited one makes that row unreadable (reported, the others listed).
#[tokio::test]
async fn an_attachment_round_trips_and_a_bad_range_is_refused() {
    let db = fresh().await;
    let s = &db.store;
    let c = conversation_with(s, "doc", &[]).await;
    let content = "Summarize this.\n\n<document>The text ✓</document>";
    let start = content.find("<document>").unwrap();
    let attachment = tptt_store::Attachment {
        name: "notes.md".into(),
        kind: "markdown".into(),
        bytes: 42,
        start,
        end: content.len(),
    };
    let m = s
        .add_message(
            c,
            &NewMessage {
                attachment: Some(attachment.clone()),
                ..NewMessage::new(Role::User, content)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        s.get_message(m.id).await.unwrap().attachment,
        Some(attachment.clone())
    );
    for (start, end) in [
        (0, content.len() + 1),
        (5, 4),
        (content.find('✓').unwrap() + 1, content.len()),
    ] {
        let bad = tptt_store::Attachment {
            start,
            end,
            ..attachment.clone()
        };
        let err = s
            .add_message(
                c,
                &NewMessage {
                    attachment: Some(bad),
                    ..NewMessage::new(Role::User, content)
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, tptt_store::Error::InvalidInput(_)),
            "{start}..{end}: {err:?}"
        );
    }
    exec(
        &db.path,
        "UPDATE messages SET attachment = '{\"name\":\"x\",\"kind\":\"text\",\"bytes\":1,\"start\":0,\"end\":99999}'",
    )
    .await;
    let listing = s.list_messages(c).await.unwrap();
    assert!(listing.items.is_empty());
    assert_eq!(listing.skipped.len(), 1);
}
