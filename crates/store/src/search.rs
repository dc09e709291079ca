//! Search over conversation titles and message text.
//!
//! A query matches any substring, case-insensitively: `50%`, `a_b`, `it's` and `"quoted"` are
//! searched for as typed, never as patterns. Queries of three characters or more use the FTS5
//! trigram indexes (`messages_fts`, `conversations_fts`, kept in step by triggers in the
//! migration), with the query passed as one FTS5 string so no character is an operator.
//! Shorter ones, which trigrams cannot index, scan with `LIKE ... ESCAPE` (`%`, `_` and the
//! escape character escaped); there, case folding is ASCII only.

use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::conversations::{conversation_columns, conversation_from_row, Conversation};
use crate::error::{MalformedRow, Result};
use crate::types::{Listing, MessageId, Role};
use crate::Store;

/// A conversation that matches a search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchHit {
    /// The conversation.
    pub conversation: Conversation,
    /// Whether its title matches.
    pub title_matches: bool,
    /// Its first message that matches, if any.
    pub message: Option<MessageHit>,
}

/// The first matching message of a [`SearchHit`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageHit {
    /// The message.
    pub id: MessageId,
    /// Its position in the conversation.
    pub position: u32,
    /// Who wrote it.
    pub role: Role,
    /// A line of text around the first match (on one line, `…` where cut).
    pub snippet: String,
}

/// Characters of context kept before the match in a snippet.
const SNIPPET_BEFORE: usize = 40;
/// Characters kept from the start of the match on.
const SNIPPET_AFTER: usize = 80;
/// The `LIKE` escape character.
const LIKE_ESCAPE: char = '\\';

/// The query as one FTS5 string: inside double quotes, a quote is doubled; nothing else is
/// special there.
fn fts_phrase(query: &str) -> String {
    format!("\"{}\"", query.replace('"', "\"\""))
}

/// The query as a `LIKE` pattern matching it anywhere, with `%`, `_` and the escape character
/// escaped.
fn like_pattern(query: &str) -> String {
    let mut out = String::with_capacity(query.len() + 2);
    out.push('%');
    for c in query.chars() {
        if matches!(c, '%' | '_' | LIKE_ESCAPE) {
            out.push(LIKE_ESCAPE);
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// The byte range of the first case-insensitive occurrence of `needle` in `haystack`
/// (characters compared by their Unicode lowercase).
fn find_ignoring_case(haystack: &str, needle: &str) -> Option<(usize, usize)> {
    let needle: Vec<char> = needle.chars().flat_map(char::to_lowercase).collect();
    if needle.is_empty() {
        return None;
    }
    'starts: for (start, _) in haystack.char_indices() {
        let mut matched = 0;
        for (offset, c) in haystack[start..].char_indices() {
            for folded in c.to_lowercase() {
                if needle.get(matched) != Some(&folded) {
                    continue 'starts;
                }
                matched += 1;
            }
            if matched == needle.len() {
                return Some((start, start + offset + c.len_utf8()));
            }
        }
        // The text ran out: later starts are shorter still.
        return None;
    }
    None
}

/// A one-line excerpt of `content` around the first match of `query` (the start of the text
/// when folding finds none, as for a `LIKE` hit on a non-ASCII letter).
fn snippet(content: &str, query: &str) -> String {
    let start = find_ignoring_case(content, query).map_or(0, |(s, _)| s);
    let before = content[..start].chars().count();
    let skip = before.saturating_sub(SNIPPET_BEFORE);
    let mut chars = content.chars().skip(skip);
    let mut out = String::new();
    if skip > 0 {
        out.push('…');
    }
    let keep = (before - skip) + SNIPPET_AFTER;
    out.extend(
        chars
            .by_ref()
            .take(keep)
            .map(|c| if c.is_whitespace() { ' ' } else { c }),
    );
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// Reads one search row: a conversation, plus the first matching message's columns.
fn hit_from_row(row: &SqliteRow, query: &str) -> Result<SearchHit, MalformedRow> {
    let conversation = conversation_from_row(row)?;
    let bad = |reason: String| MalformedRow::new("conversations", Some(conversation.id.0), reason);
    let title_matches: bool = row
        .try_get("title_matches")
        .map_err(|e| bad(e.to_string()))?;
    let message_id: Option<i64> = row.try_get("hit_id").map_err(|e| bad(e.to_string()))?;
    let message = match message_id {
        None => None,
        Some(id) => {
            let bad = |reason: String| MalformedRow::new("messages", Some(id), reason);
            let position: i64 = row
                .try_get("hit_position")
                .map_err(|e| bad(e.to_string()))?;
            let role: String = row.try_get("hit_role").map_err(|e| bad(e.to_string()))?;
            let content: String = row
                .try_get("hit_content")
                .map_err(|e| bad(format!("content: {e}")))?;
            Some(MessageHit {
                id: MessageId(id),
                position: u32::try_from(position)
                    .map_err(|_| bad(format!("position {position} out of range")))?,
                role: role.parse().map_err(bad)?,
                snippet: snippet(&content, query),
            })
        }
    };
    Ok(SearchHit {
        conversation,
        title_matches,
        message,
    })
}

/// The search statement around a matching rule: `title_hit` and `message_hit` are the
/// `WHERE` clauses of the two sub-searches, both bound to `?1`; `?2` is the limit.
macro_rules! search_sql {
    ($title_ids:literal, $message_ids:literal) => {
        concat!(
            "WITH message_hits AS (SELECT m.id AS hit_id, m.conversation_id AS cid, \
                 m.position AS hit_position, m.role AS hit_role, m.content AS hit_content \
                 FROM messages m WHERE m.id IN (",
            $message_ids,
            ")), first_hits AS (SELECT hit_id, cid, MIN(hit_position) AS hit_position, \
                 hit_role, hit_content FROM message_hits GROUP BY cid), \
             title_hits AS (",
            $title_ids,
            ") SELECT ",
            conversation_columns!(),
            ", id IN title_hits AS title_matches, hit_id, hit_position, hit_role, hit_content \
             FROM conversations LEFT JOIN first_hits ON first_hits.cid = conversations.id \
             WHERE (id IN title_hits OR hit_id IS NOT NULL) AND owner_id IS NULL \
             ORDER BY updated_at DESC, id DESC LIMIT ?2"
        )
    };
}

impl Store {
    /// Conversations whose title or messages contain `query` (trimmed; case-insensitive),
    /// most recently updated first, at most `limit`, each with its first matching message.
    /// An empty query finds nothing. Archived conversations are included (see
    /// [`Conversation::archived`]).
    pub async fn search(&self, query: &str, limit: u32) -> Result<Listing<SearchHit>> {
        // SQLite's bare-column rule: with MIN(), the other columns come from the row holding
        // the minimum, i.e. the first matching message.
        const FTS: &str = search_sql!(
            "SELECT rowid FROM conversations_fts WHERE conversations_fts MATCH ?1",
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?1"
        );
        const LIKE: &str = search_sql!(
            "SELECT id FROM conversations WHERE title LIKE ?1 ESCAPE '\\'",
            "SELECT id FROM messages WHERE content LIKE ?1 ESCAPE '\\'"
        );
        let query = query.trim();
        if query.is_empty() {
            return Ok(Listing::default());
        }
        // Trigrams index substrings of 3 characters or more.
        let (sql, pattern) = if query.chars().count() >= 3 {
            (FTS, fts_phrase(query))
        } else {
            (LIKE, like_pattern(query))
        };
        let rows = sqlx::query(sql)
            .bind(pattern)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(Listing::collect(
            rows.iter().map(|row| hit_from_row(row, query)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escaping() {
        assert_eq!(fts_phrase(r#"say "hi""#), r#""say ""hi""""#);
        assert_eq!(like_pattern(r"5%_\"), r"%5\%\_\\%");
    }

    #[test]
    fn case_insensitive_find() {
        assert_eq!(find_ignoring_case("Hello World", "WORLD"), Some((6, 11)));
        assert_eq!(find_ignoring_case("ÉCOLE é", "école"), Some((0, 6)));
        assert_eq!(find_ignoring_case("abc", "abcd"), None);
        assert_eq!(find_ignoring_case("abc", ""), None);
    }

    #[test]
    fn snippets_are_one_line_around_the_match() {
        assert_eq!(
            snippet("first line\nsecond NEEDLE here", "needle"),
            "first line second NEEDLE here"
        );
        let long = format!("{}needle{}", "a".repeat(100), "b".repeat(100));
        let s = snippet(&long, "needle");
        assert!(s.starts_with('…') && s.ends_with('…'), "{s}");
        assert!(s.contains("needle"));
        assert_eq!(s.chars().count(), 1 + SNIPPET_BEFORE + SNIPPET_AFTER + 1);
        // No match (a LIKE hit that folding does not find): the start of the text.
        assert_eq!(snippet("short", "zzz"), "short");
    }
}
