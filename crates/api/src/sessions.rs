//! The states of recent API conversations, so that a request that repeats a conversation the
//! server has seen, plus new messages, continues from its state instead of re-reading it.
//!
//! An entry is a [`Session`] and the [`ReadMark`] of the rendered text it has read (the chat
//! template's rendering of the conversation, then the answer as generated, special tokens
//! included). A request's conversation is rendered the same way; the entry whose text is the
//! longest prefix of that rendering is taken out of the cache (a session continues one
//! conversation: two requests never share one) and fed only the rest. Bounded by a number of
//! entries and by their bytes (a state holds its softmax window: up to ~380 MB for SmolLM2 at a
//! window of 8192); the least recently used go first.
//!
//! Unlike a KV prefix cache, which must keep (and attend over) every token of the prefix it
//! reuses, a TPTT state is the softmax window plus a fixed-size recurrent memory: resuming a
//! conversation of any length costs the same, and so does keeping it.

use std::sync::Arc;

use tptt::model::Model;
use tptt_engine::session::Session;
use tptt_engine::ReadMark;

struct Entry {
    mark: ReadMark,
    session: Session,
    bytes: usize,
    used: u64,
}

/// Recent conversations' states (module doc).
pub struct SessionCache {
    entries: Vec<Entry>,
    max_entries: usize,
    max_bytes: usize,
    clock: u64,
}

impl SessionCache {
    /// At most `max_entries` states of at most `max_bytes` together (0 entries: no cache).
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_entries,
            max_bytes,
            clock: 0,
        }
    }

    /// States held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops every state.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Takes out the state of `model` whose text is the longest prefix of `rendered`, with its
    /// mark; states of other models are dropped (the served model changed: they only hold its
    /// weights alive).
    pub fn take(&mut self, rendered: &str, model: &Arc<Model>) -> Option<(ReadMark, Session)> {
        self.entries
            .retain(|e| Arc::ptr_eq(e.session.model(), model));
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.mark.is_prefix_of(rendered))
            .max_by_key(|(_, e)| e.mark.len)
            .map(|(i, _)| i)?;
        let e = self.entries.swap_remove(best);
        Some((e.mark, e.session))
    }

    /// Keeps `session`, which has read the text of `mark`; the least recently used states go
    /// while the bounds are exceeded (a state larger than the byte bound is not kept).
    pub fn put(&mut self, mark: ReadMark, session: Session) {
        let bytes = session.state.size_bytes();
        if self.max_entries == 0 || bytes > self.max_bytes {
            return;
        }
        self.clock += 1;
        self.entries.retain(|e| e.mark != mark);
        self.entries.push(Entry {
            mark,
            session,
            bytes,
            used: self.clock,
        });
        while self.entries.len() > self.max_entries
            || self.entries.iter().map(|e| e.bytes).sum::<usize>() > self.max_bytes
        {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.swap_remove(oldest);
        }
    }
}
