//! Branches: a copy of a conversation up to a message, in one transaction; the source stays as
//! it was; searchable like any conversation; bad ids refused.

use tptt_store::{ConversationSettings, Error, MessageId, Role};

use crate::common::{conversation_with, fresh, fts_integrity};

#[tokio::test]
async fn a_branch_copies_the_conversation_up_to_a_message() {
    let db = fresh().await;
    let s = &db.store;
    let src = conversation_with(
        s,
        "Trip",
        &[
            (Role::User, "Plan a trip to Lisbon."),
            (Role::Assistant, "Day 1: Alfama."),
            (Role::User, "And Porto?"),
            (Role::Assistant, "Porto is 3 hours away."),
        ],
    )
    .await;
    let settings = ConversationSettings {
        system_prompt: Some("Be brief.".into()),
        ..ConversationSettings::default()
    };
    s.update_conversation_settings(src, &settings)
        .await
        .expect("settings");
    s.set_conversation_model(src, Some("m"), Some("v"))
        .await
        .expect("model");
    let before = s.list_messages(src).await.expect("messages").items;
    let through = before[1].id;

    let branch = s
        .branch_conversation(src, through, "Trip (branch)")
        .await
        .expect("branch");
    assert_ne!(branch.conversation, src);
    let c = s
        .get_conversation(branch.conversation)
        .await
        .expect("branch");
    assert_eq!(c.title, "Trip (branch)");
    assert_eq!(
        (c.model.as_deref(), c.variant.as_deref()),
        (Some("m"), Some("v"))
    );
    assert_eq!(c.settings, settings);
    let copied = s
        .list_messages(branch.conversation)
        .await
        .expect("copied")
        .items;
    assert_eq!(copied.len(), 2);
    for (old, new) in before.iter().zip(&copied) {
        assert_eq!(
            (old.role, &old.content, old.status, old.position),
            (new.role, &new.content, new.status, new.position)
        );
        assert_ne!(old.id, new.id);
    }
    assert_eq!(
        branch.messages,
        vec![(before[0].id, copied[0].id), (before[1].id, copied[1].id)]
    );
    // The source is untouched; the copies are searchable.
    assert_eq!(s.list_messages(src).await.expect("source").items, before);
    let hits = s.search("Alfama", 10).await.expect("search").items;
    assert_eq!(hits.len(), 2, "{hits:?}");
    fts_integrity(s).await;

    // A message of another conversation, or an unknown one, is refused; nothing is created.
    let count = s
        .list_conversations(tptt_store::ListScope::All)
        .await
        .expect("list")
        .items
        .len();
    let other = conversation_with(s, "Other", &[(Role::User, "Hi")]).await;
    let foreign = s.list_messages(other).await.expect("other").items[0].id;
    assert!(matches!(
        s.branch_conversation(src, foreign, "x").await,
        Err(Error::MessageNotFound(m)) if m == foreign
    ));
    assert!(matches!(
        s.branch_conversation(src, MessageId(i64::MAX), "x").await,
        Err(Error::MessageNotFound(_))
    ));
    assert!(matches!(
        s.branch_conversation(tptt_store::ConversationId(-1), through, "x")
            .await,
        Err(Error::ConversationNotFound(_))
    ));
    assert_eq!(
        s.list_conversations(tptt_store::ListScope::All)
            .await
            .expect("list")
            .items
            .len(),
        count + 1,
        "only the conversation made for the test was added"
    );
}
