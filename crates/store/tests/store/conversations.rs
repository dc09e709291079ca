//! Conversations: create, get, list order and scopes, rename, model, settings, archive, pin,
//! delete with cascade.

use std::path::PathBuf;

use tptt_store::{
    ConversationId, ConversationSettings, Error, ListScope, ModelKey, NewConversation, NewMessage,
    NewSnapshot, Role, SamplingSettings,
};

use crate::common::{conversation_with, fresh, fts_integrity};

fn ids(listing: &tptt_store::Listing<tptt_store::Conversation>) -> Vec<ConversationId> {
    listing.items.iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn create_then_get_round_trips_every_field() {
    let db = fresh().await;
    let settings = ConversationSettings {
        system_prompt: Some("Answer in French.".into()),
        window: Some(1024),
        model_repo: Some("/models/demo".into()),
        variant: Some("delta_product".into()),
        sampling: SamplingSettings {
            temperature: Some(0.2),
            top_k: Some(20),
            seed: Some(7),
            ..SamplingSettings::default()
        },
        ..ConversationSettings::default()
    };
    let new = NewConversation {
        title: "Café ☕ \"quoted\"".into(),
        model: Some("ffurfaro/Titans-Llama-3.2-1B".into()),
        variant: Some("liza_callable".into()),
        settings: settings.clone(),
    };
    let created = db.store.create_conversation(&new).await.unwrap();
    assert_eq!(created.created_at, created.updated_at);
    assert!(!created.archived);
    let got = db.store.get_conversation(created.id).await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got.settings, settings);
    assert_eq!(got.title, "Café ☕ \"quoted\"");
}

#[tokio::test]
async fn listing_is_most_recent_first() {
    let db = fresh().await;
    let s = &db.store;
    let a = conversation_with(s, "a", &[]).await;
    let b = conversation_with(s, "b", &[]).await;
    let c = conversation_with(s, "c", &[]).await;
    assert_eq!(
        ids(&s.list_conversations(ListScope::Active).await.unwrap()),
        [c, b, a]
    );
    // A new message moves a conversation to the top, and so does a rename.
    s.add_message(a, &NewMessage::new(Role::User, "hi"))
        .await
        .unwrap();
    assert_eq!(
        ids(&s.list_conversations(ListScope::Active).await.unwrap()),
        [a, c, b]
    );
    s.rename_conversation(b, "b2").await.unwrap();
    let listing = s.list_conversations(ListScope::Active).await.unwrap();
    assert_eq!(ids(&listing), [b, a, c]);
    assert!(listing.skipped.is_empty());
    let times: Vec<_> = listing.items.iter().map(|c| c.updated_at).collect();
    assert!(times.windows(2).all(|w| w[0] > w[1]), "{times:?}");
}

/// Pinned conversations come first (most recent first among them); pinning does not move a
/// conversation among the recent ones; archived ones, pinned or not, leave the main list.
#[tokio::test]
async fn pinned_come_first_and_archived_leave_the_list() {
    let db = fresh().await;
    let s = &db.store;
    let a = conversation_with(s, "a", &[]).await;
    let b = conversation_with(s, "b", &[]).await;
    let c = conversation_with(s, "c", &[]).await;
    let before = s.get_conversation(a).await.unwrap().updated_at;
    s.set_pinned(a, true).await.unwrap();
    assert!(s.get_conversation(a).await.unwrap().pinned);
    assert_eq!(s.get_conversation(a).await.unwrap().updated_at, before);
    let active = |s: &tptt_store::Store| {
        let s = s.clone();
        async move { ids(&s.list_conversations(ListScope::Active).await.unwrap()) }
    };
    assert_eq!(active(s).await, [a, c, b]);
    s.set_pinned(b, true).await.unwrap();
    assert_eq!(
        active(s).await,
        [b, a, c],
        "among pinned, most recent first"
    );
    s.set_pinned(b, false).await.unwrap();
    assert_eq!(active(s).await, [a, c, b]);
    s.set_archived(a, true).await.unwrap();
    assert_eq!(active(s).await, [c, b]);
    let archived = s.list_conversations(ListScope::Archived).await.unwrap();
    assert_eq!(ids(&archived), [a]);
    assert!(archived.items[0].pinned, "archiving keeps the pin");
    let err = s.set_pinned(ConversationId(9999), true).await.unwrap_err();
    assert!(matches!(err, Error::ConversationNotFound(_)), "{err:?}");
}

#[tokio::test]
async fn rename_model_settings_and_archive() {
    let db = fresh().await;
    let s = &db.store;
    let id = conversation_with(s, "old", &[]).await;
    let before = s.get_conversation(id).await.unwrap();

    s.rename_conversation(id, "new title").await.unwrap();
    s.set_conversation_model(id, Some("ffurfaro/Titanesque-gemma-3-270m"), Some("v1"))
        .await
        .unwrap();
    let mut settings = ConversationSettings::default();
    settings.sampling.top_p = Some(0.8);
    settings
        .extra
        .insert("future_key".into(), serde_json::json!([1, 2]));
    s.update_conversation_settings(id, &settings).await.unwrap();
    let after = s.get_conversation(id).await.unwrap();
    assert_eq!(after.title, "new title");
    assert_eq!(
        after.model.as_deref(),
        Some("ffurfaro/Titanesque-gemma-3-270m")
    );
    assert_eq!(after.variant.as_deref(), Some("v1"));
    assert_eq!(after.settings, settings);
    assert_eq!(after.created_at, before.created_at);
    assert!(after.updated_at > before.updated_at);

    s.set_conversation_model(id, None, None).await.unwrap();
    let cleared = s.get_conversation(id).await.unwrap();
    assert_eq!((cleared.model, cleared.variant), (None, None));

    let other = conversation_with(s, "other", &[]).await;
    s.set_archived(id, true).await.unwrap();
    assert_eq!(
        ids(&s.list_conversations(ListScope::Active).await.unwrap()),
        [other]
    );
    assert_eq!(
        ids(&s.list_conversations(ListScope::Archived).await.unwrap()),
        [id]
    );
    assert_eq!(
        ids(&s.list_conversations(ListScope::All).await.unwrap()).len(),
        2
    );
    assert!(s.get_conversation(id).await.unwrap().archived);
    s.set_archived(id, false).await.unwrap();
    assert!(s
        .list_conversations(ListScope::Archived)
        .await
        .unwrap()
        .items
        .is_empty());
}

#[tokio::test]
async fn operations_on_a_missing_conversation_say_so() {
    let db = fresh().await;
    let s = &db.store;
    let missing = ConversationId(424242);
    let is_missing = |e: Error| matches!(e, Error::ConversationNotFound(ConversationId(424242)));
    assert!(is_missing(s.get_conversation(missing).await.unwrap_err()));
    assert!(is_missing(
        s.rename_conversation(missing, "x").await.unwrap_err()
    ));
    assert!(is_missing(
        s.set_conversation_model(missing, None, None)
            .await
            .unwrap_err()
    ));
    assert!(is_missing(
        s.update_conversation_settings(missing, &ConversationSettings::default())
            .await
            .unwrap_err()
    ));
    assert!(is_missing(s.set_archived(missing, true).await.unwrap_err()));
    assert!(is_missing(
        s.delete_conversation(missing).await.unwrap_err()
    ));
    assert!(is_missing(s.list_messages(missing).await.unwrap_err()));
    assert!(is_missing(
        s.add_message(missing, &NewMessage::new(Role::User, "x"))
            .await
            .unwrap_err()
    ));
    assert!(is_missing(
        s.delete_messages_from(missing, 0).await.unwrap_err()
    ));
    assert_eq!(
        s.get_conversation(missing).await.unwrap_err().to_string(),
        "conversation 424242 does not exist"
    );
}

/// Deleting a conversation removes its messages, snapshot rows and index entries, returns
/// its snapshot files, and leaves other conversations alone.
#[tokio::test]
async fn delete_cascades_to_messages_snapshots_and_search() {
    let db = fresh().await;
    let s = &db.store;
    let doomed =
        conversation_with(s, "doomed zebra", &[(Role::User, "unique giraffe words")]).await;
    let kept = conversation_with(s, "kept", &[(Role::User, "other words")]).await;
    let message = s.list_messages(doomed).await.unwrap().items[0].id;
    let kept_message = s.list_messages(kept).await.unwrap().items[0].id;
    let key = ModelKey::new("m", "v", "h");
    for (conversation, message_id, path) in [
        (doomed, message, "/snap/d1"),
        (doomed, message, "/snap/d2"),
        (kept, kept_message, "/snap/k"),
    ] {
        s.record_snapshot(&NewSnapshot {
            conversation_id: conversation,
            message_id,
            key: key.clone(),
            path: path.into(),
            size_bytes: 10,
            token_count: 3,
        })
        .await
        .unwrap();
    }
    assert_eq!(s.search("giraffe", 10).await.unwrap().items.len(), 1);

    let files = s.delete_conversation(doomed).await.unwrap();
    assert_eq!(
        files,
        [PathBuf::from("/snap/d1"), PathBuf::from("/snap/d2")]
    );
    assert!(matches!(
        s.get_conversation(doomed).await,
        Err(Error::ConversationNotFound(_))
    ));
    assert!(matches!(
        s.get_message(message).await,
        Err(Error::MessageNotFound(_))
    ));
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(doomed.0)
            .fetch_one(s.pool())
            .await
            .unwrap()
    };
    assert_eq!(
        count("SELECT COUNT(*) FROM messages WHERE conversation_id = ?").await,
        0
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM snapshots WHERE conversation_id = ?").await,
        0
    );
    assert!(s.search("giraffe", 10).await.unwrap().items.is_empty());
    assert!(s.search("zebra", 10).await.unwrap().items.is_empty());
    fts_integrity(s).await;

    assert_eq!(s.list_messages(kept).await.unwrap().items.len(), 1);
    assert_eq!(s.list_snapshots(kept).await.unwrap().items.len(), 1);
    // Ids are not reused.
    let next = conversation_with(s, "next", &[]).await;
    assert!(next.0 > kept.0);
}
