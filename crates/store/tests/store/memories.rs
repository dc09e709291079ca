//! Primed memories: saved, listed most recent first, renamed, deleted (the file returned), and
//! conversations started from one (which outlive it).

use std::path::PathBuf;

use tptt_store::{
    ConversationSettings, Error, MemoryId, ModelKey, NewMemory, MAX_MEMORY_NAME_CHARS,
};

use crate::common::fresh;

fn new_memory(name: &str, path: &str) -> NewMemory {
    NewMemory {
        name: name.into(),
        key: ModelKey::new("/models/demo", "delta_product", "h"),
        path: PathBuf::from(path),
        size_bytes: 1234,
        token_count: 567,
        source_title: "My projects".into(),
    }
}

#[tokio::test]
async fn memories_are_saved_listed_renamed_and_deleted() {
    let db = fresh().await;
    let s = &db.store;
    let a = s
        .add_memory(&new_memory("  projects ", "/m/a"))
        .await
        .unwrap();
    assert_eq!(a.name, "projects", "trimmed");
    let b = s
        .add_memory(&new_memory("this book", "/m/b"))
        .await
        .unwrap();
    let listed: Vec<MemoryId> = s
        .list_memories()
        .await
        .unwrap()
        .items
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, [b.id, a.id], "most recent first");
    assert_eq!(s.get_memory(a.id).await.unwrap(), a);
    assert_eq!((a.token_count, a.size_bytes), (567, 1234));

    s.rename_memory(a.id, "work").await.unwrap();
    assert_eq!(s.get_memory(a.id).await.unwrap().name, "work");
    let long = "x".repeat(MAX_MEMORY_NAME_CHARS + 1);
    for bad in ["", "   ", long.as_str()] {
        let err = s.rename_memory(a.id, bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
        let err = s.add_memory(&new_memory(bad, "/m/c")).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    }
    assert_eq!(s.delete_memory(a.id).await.unwrap(), PathBuf::from("/m/a"));
    for err in [
        s.delete_memory(a.id).await.unwrap_err(),
        s.get_memory(a.id).await.unwrap_err(),
        s.rename_memory(a.id, "again").await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::MemoryNotFound(_)), "{err:?}");
    }
    assert_eq!(s.list_memories().await.unwrap().items.len(), 1);
}

#[tokio::test]
async fn a_conversation_started_from_a_memory_outlives_it() {
    let db = fresh().await;
    let s = &db.store;
    let m = s.add_memory(&new_memory("projects", "/m/a")).await.unwrap();
    let c = s
        .create_conversation_from_memory(m.id, "projects", &ConversationSettings::default())
        .await
        .unwrap();
    assert_eq!(c.title, "projects");
    assert_eq!(c.model.as_deref(), Some("/models/demo"));
    assert_eq!(c.variant.as_deref(), Some("delta_product"));
    assert_eq!(s.conversation_memory(c.id).await.unwrap(), Some(m.clone()));
    s.delete_memory(m.id).await.unwrap();
    assert_eq!(s.conversation_memory(c.id).await.unwrap(), None);
    assert_eq!(s.get_conversation(c.id).await.unwrap().title, "projects");
    let err = s
        .create_conversation_from_memory(m.id, "x", &ConversationSettings::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MemoryNotFound(_)), "{err:?}");
}
