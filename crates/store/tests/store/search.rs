//! Search: titles and text, case, order, snippets, and characters that must be taken
//! literally (`%`, `_`, quotes, backslash, FTS5 operators) on both the FTS5 path (3+
//! characters) and the LIKE path (1-2 characters).

use tptt_store::{ConversationId, NewMessage, Role, Store};

use crate::common::{conversation_with, fresh};

async fn found(store: &Store, query: &str) -> Vec<ConversationId> {
    let listing = store.search(query, 50).await.unwrap();
    assert!(listing.skipped.is_empty());
    listing.items.iter().map(|h| h.conversation.id).collect()
}

#[tokio::test]
async fn finds_titles_and_messages_case_insensitively_most_recent_first() {
    let db = fresh().await;
    let s = &db.store;
    let by_title = conversation_with(s, "Rust lifetimes", &[(Role::User, "nothing here")]).await;
    let by_text = conversation_with(
        s,
        "Untitled",
        &[
            (Role::User, "first"),
            (Role::Assistant, "Borrowing in RUST is...\nsecond line"),
            (Role::User, "more rust"),
        ],
    )
    .await;
    let neither = conversation_with(s, "Cooking", &[(Role::User, "pasta")]).await;

    assert_eq!(found(s, "rust").await, [by_text, by_title]);
    let hits = s.search("rust", 50).await.unwrap().items;
    assert!(!hits[0].title_matches);
    let first = hits[0].message.as_ref().expect("a matching message");
    assert_eq!((first.position, first.role), (1, Role::Assistant));
    assert_eq!(first.snippet, "Borrowing in RUST is... second line");
    assert!(hits[1].title_matches);
    assert!(hits[1].message.is_none());

    // Activity reorders results.
    s.add_message(by_title, &NewMessage::new(Role::User, "ok"))
        .await
        .unwrap();
    assert_eq!(found(s, "RUST").await, [by_title, by_text]);
    // Unicode case folding (FTS5 path), accents kept distinct.
    let cafe = conversation_with(s, "x", &[(Role::User, "un CAFÉ noir")]).await;
    assert_eq!(found(s, "café").await, [cafe]);
    assert!(found(s, "cafe").await.is_empty());
    assert_eq!(found(s, "pasta").await, [neither]);
    assert!(found(s, "").await.is_empty());
    assert!(found(s, "   ").await.is_empty());
    assert!(found(s, "absent words").await.is_empty());
    // Trimmed.
    assert_eq!(found(s, "  pasta \n").await, [neither]);
}

#[tokio::test]
async fn limit_caps_the_results() {
    let db = fresh().await;
    let s = &db.store;
    for i in 0..5 {
        conversation_with(s, &format!("chat {i}"), &[(Role::User, "common text")]).await;
    }
    assert_eq!(s.search("common", 3).await.unwrap().items.len(), 3);
    assert_eq!(s.search("co", 2).await.unwrap().items.len(), 2);
}

/// Every special character is a literal: `%` and `_` are not wildcards, quotes and FTS5
/// syntax (`AND`, `*`, `NEAR(`, `:`) are not operators.
#[tokio::test]
async fn special_characters_are_literal() {
    let db = fresh().await;
    let s = &db.store;
    let texts = [
        "100% sure",            // 0
        "100 percent sure",     // 1
        "snake_case name",      // 2
        "snakeXcase name",      // 3
        "it's \"quoted\" here", // 4
        "its quoted here",      // 5
        r"C:\path\to",          // 6
        "a AND b",              // 7
        "wild* card",           // 8
        "NEAR(x y) col:val",    // 9
        "_",                    // 10
        "%",                    // 11
        "x",                    // 12
    ];
    let mut ids = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        ids.push(conversation_with(s, &format!("c{i}"), &[(Role::User, text)]).await);
    }
    let expect = |query: &'static str, which: &'static [usize]| {
        let ids = ids.clone();
        async move {
            let mut got = found(s, query).await;
            got.sort();
            let want: Vec<ConversationId> = which.iter().map(|&i| ids[i]).collect();
            assert_eq!(got, want, "query {query:?}");
        }
    };
    // FTS5 path (3+ characters).
    expect("100%", &[0]).await;
    expect("0% s", &[0]).await;
    expect("snake_case", &[2]).await;
    expect("e_c", &[2]).await;
    expect("it's", &[4]).await;
    expect("\"quoted\"", &[4]).await;
    expect("s \"q", &[4]).await;
    expect(r"C:\path", &[6]).await;
    expect(r"\to", &[6]).await;
    expect("a AND b", &[7]).await;
    expect("AND", &[7]).await;
    expect("d* c", &[8]).await;
    expect("NEAR(x", &[9]).await;
    expect("col:val", &[9]).await;
    expect("\"\"\"", &[]).await;
    // LIKE path (1-2 characters).
    expect("%", &[0, 11]).await;
    expect("_", &[2, 10]).await;
    expect(" % ", &[0, 11]).await; // trimmed to "%"
    expect("'s", &[4]).await;
    expect("\"", &[4]).await;
    expect(r"\", &[6]).await;
    expect(r":\", &[6]).await;
    expect("*", &[8]).await;
    expect("(", &[9]).await;
    // Titles too ("c1" is in "c1", "c10", "c11", "c12").
    expect("c1", &[1, 10, 11, 12]).await;
}
