//! Import: conversations from a backup come in whole, in one transaction, as new conversations
//! with new ids; a failure in the middle imports none.

use tptt_store::{
    Attachment, ConversationSettings, ImportConversation, ImportMessage, ListScope, MessageStatus,
    Role, Timestamp,
};

use crate::common::{conversation_with, exec, fresh, fts_integrity};

fn conversation(title: &str, texts: &[(Role, &str)]) -> ImportConversation {
    ImportConversation {
        title: title.into(),
        created_at: Timestamp(1_700_000_000_000),
        updated_at: Timestamp(1_700_000_000_500),
        model: Some("/models/demo".into()),
        variant: Some("delta_product".into()),
        settings: ConversationSettings {
            window: Some(512),
            ..ConversationSettings::default()
        },
        archived: false,
        pinned: true,
        messages: texts
            .iter()
            .map(|&(role, text)| ImportMessage {
                role,
                content: text.into(),
                status: MessageStatus::Complete,
                error: None,
                created_at: Timestamp(1_700_000_000_100),
                updated_at: Timestamp(1_700_000_000_200),
                token_count: Some(3),
                stats: Some(serde_json::json!({"ttft_ms": 5})),
                attachment: (text == "q").then(|| Attachment {
                    name: "q.txt".into(),
                    kind: "text".into(),
                    bytes: 1,
                    start: 0,
                    end: 1,
                }),
            })
            .collect(),
    }
}

#[tokio::test]
async fn imported_conversations_are_new_and_whole() {
    let db = fresh().await;
    let s = &db.store;
    let mine = conversation_with(s, "mine", &[(Role::User, "keep me")]).await;
    let done = s
        .import_conversations(&[
            conversation("a", &[(Role::User, "q"), (Role::Assistant, "a")]),
            conversation("b", &[]),
        ])
        .await
        .unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].messages.len(), 2);
    let a = s.get_conversation(done[0].conversation).await.unwrap();
    assert_eq!(
        (a.title.as_str(), a.pinned, a.settings.window),
        ("a", true, Some(512))
    );
    assert_eq!(a.updated_at, Timestamp(1_700_000_000_500));
    let messages = s.list_messages(a.id).await.unwrap().items;
    assert_eq!(
        messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        done[0].messages
    );
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.position, m.content.as_str()))
            .collect::<Vec<_>>(),
        [(0, "q"), (1, "a")]
    );
    assert_eq!(messages[1].stats, Some(serde_json::json!({"ttft_ms": 5})));
    assert_eq!(
        messages[0].attachment.as_ref().map(|a| a.name.as_str()),
        Some("q.txt")
    );
    assert_eq!(messages[1].attachment, None);
    assert_eq!(
        s.list_messages(mine).await.unwrap().items[0].content,
        "keep me"
    );
    assert_eq!(s.search("keep", 5).await.unwrap().items.len(), 1);
    fts_integrity(s).await;
}

#[tokio::test]
async fn a_failed_import_imports_nothing() {
    let db = fresh().await;
    let s = &db.store;
    exec(
        &db.path,
        "CREATE TRIGGER no_answers BEFORE INSERT ON messages WHEN new.content = 'boom' \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    )
    .await;
    let err = s
        .import_conversations(&[
            conversation("fine", &[(Role::User, "q")]),
            conversation("broken", &[(Role::User, "boom")]),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(s
        .list_conversations(ListScope::All)
        .await
        .unwrap()
        .items
        .is_empty());
}
