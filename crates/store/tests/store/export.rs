//! Export: exact Markdown for a small conversation, text kept verbatim, JSON round trip.

use tptt_store::{
    ConversationSettings, MessageStatus, MessageUpdate, NewConversation, NewMessage, Role,
};

use crate::common::{exec, fresh};

#[tokio::test]
async fn markdown_export_of_a_small_conversation() {
    let db = fresh().await;
    let s = &db.store;
    let c = s
        .create_conversation(&NewConversation {
            title: "Greetings".into(),
            model: Some("ffurfaro/Titans-Llama-3.2-1B".into()),
            variant: Some("liza_callable".into()),
            settings: ConversationSettings {
                system_prompt: Some("You are terse.".into()),
                ..ConversationSettings::default()
            },
        })
        .await
        .unwrap();
    s.add_message(c.id, &NewMessage::new(Role::User, "Hello! What's 2 * 3?"))
        .await
        .unwrap();
    s.add_message(c.id, &NewMessage::new(Role::Assistant, "It's **6**."))
        .await
        .unwrap();
    s.add_message(c.id, &NewMessage::new(Role::User, "Show it in Rust"))
        .await
        .unwrap();
    // Stopped inside a code block.
    let stopped = s
        .add_message(c.id, &NewMessage::streaming_answer())
        .await
        .unwrap();
    s.update_message(
        stopped.id,
        &MessageUpdate::new("```rust\nlet x = 2 * 3;", MessageStatus::Partial),
    )
    .await
    .unwrap();
    s.add_message(c.id, &NewMessage::new(Role::User, "Again?"))
        .await
        .unwrap();
    let failed = s
        .add_message(c.id, &NewMessage::streaming_answer())
        .await
        .unwrap();
    let update = MessageUpdate {
        error: Some("the model failed to load".into()),
        ..MessageUpdate::new("", MessageStatus::Error)
    };
    s.update_message(failed.id, &update).await.unwrap();
    exec(
        &db.path,
        "UPDATE conversations SET created_at = 1700000000000, updated_at = 1700000300000",
    )
    .await;

    let expected = "\
# Greetings

- Model: `ffurfaro/Titans-Llama-3.2-1B`, variant `liza_callable`
- Created: 2023-11-14 22:13:20 UTC
- Updated: 2023-11-14 22:18:20 UTC

## System prompt

You are terse.

## User

Hello! What's 2 * 3?

## Assistant

It's **6**.

## User

Show it in Rust

## Assistant

```rust
let x = 2 * 3;
```

*(Partial: generation was stopped before the end.)*

## User

Again?

## Assistant

*(Generation failed: the model failed to load)*
";
    assert_eq!(s.export_markdown(c.id).await.unwrap(), expected);
}

/// Model output is text: HTML, Markdown, control characters, trailing whitespace and odd
/// Unicode all come out as they went in, in both formats.
#[tokio::test]
async fn exports_keep_every_character() {
    let db = fresh().await;
    let s = &db.store;
    let tricky = [
        "<script>alert('x')</script> & &amp; <b>bold</b>",
        "# not a heading of ours\n## User\n> quote\n\n\n  trailing spaces  \n",
        "tab\tcarriage\r\nreturn, NUL \0 inside, bell \u{7}",
        "emoji 👩‍💻, RTL \u{202E}txet, line sep \u{2028}, BOM \u{FEFF}, é vs e\u{301}",
        "\\backslashes\\ and `backticks` and \"quotes\" and 'single' and {braces} and $dollar",
        "~~~\nunclosed tilde fence",
    ];
    let c = s
        .create_conversation(&NewConversation::titled("Tricky \"title\" <i>"))
        .await
        .unwrap();
    for text in tricky {
        s.add_message(c.id, &NewMessage::new(Role::Assistant, text))
            .await
            .unwrap();
    }
    let markdown = s.export_markdown(c.id).await.unwrap();
    for text in tricky {
        assert!(markdown.contains(text), "{text:?} lost in:\n{markdown}");
    }
    assert!(markdown.starts_with("# Tricky \"title\" <i>\n"));
    assert!(markdown.contains("~~~\nunclosed tilde fence\n~~~\n"));

    let json: serde_json::Value =
        serde_json::from_str(&s.export_json(c.id).await.unwrap()).unwrap();
    assert_eq!(json["format"], "tptt-chat-conversation");
    assert_eq!(json["version"], 1);
    assert_eq!(json["conversation"]["title"], "Tricky \"title\" <i>");
    let contents: Vec<&str> = json["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, tricky);
}

#[tokio::test]
async fn json_export_has_every_field() {
    let db = fresh().await;
    let s = &db.store;
    let mut settings = ConversationSettings {
        window: Some(512),
        ..Default::default()
    };
    settings.sampling.temperature = Some(0.5);
    let c = s
        .create_conversation(&NewConversation {
            title: "J".into(),
            model: Some("repo".into()),
            variant: None,
            settings,
        })
        .await
        .unwrap();
    let m = s
        .add_message(c.id, &NewMessage::streaming_answer())
        .await
        .unwrap();
    let update = MessageUpdate {
        token_count: Some(3),
        stats: Some(serde_json::json!({"ttft_ms": 12})),
        ..MessageUpdate::new("partial text", MessageStatus::Partial)
    };
    s.update_message(m.id, &update).await.unwrap();
    exec(
        &db.path,
        "UPDATE conversations SET created_at = 1700000000000, updated_at = 1700000000001",
    )
    .await;
    exec(
        &db.path,
        "UPDATE messages SET created_at = 1700000000000, updated_at = 1700000000001",
    )
    .await;
    let json: serde_json::Value =
        serde_json::from_str(&s.export_json(c.id).await.unwrap()).unwrap();
    let expected = serde_json::json!({
        "format": "tptt-chat-conversation",
        "version": 1,
        "conversation": {
            "id": c.id.0,
            "title": "J",
            "created_at": "2023-11-14T22:13:20.000Z",
            "updated_at": "2023-11-14T22:13:20.001Z",
            "model": "repo",
            "variant": null,
            "settings": {"window": 512, "sampling": {"temperature": 0.5}},
            "archived": false,
            "pinned": false
        },
        "messages": [{
            "id": m.id.0,
            "conversation_id": c.id.0,
            "position": 0,
            "role": "assistant",
            "content": "partial text",
            "status": "partial",
            "error": null,
            "created_at": "2023-11-14T22:13:20.000Z",
            "updated_at": "2023-11-14T22:13:20.001Z",
            "token_count": 3,
            "stats": {"ttft_ms": 12},
            "attachment": null
        }]
    });
    assert_eq!(json, expected);
}
