-- TPTT Chat store, schema 1: conversations, messages, state snapshots, app settings.
--
-- Never edit this file once shipped: change the schema in a new numbered migration.
--
-- Conventions:
-- * Tables are STRICT: a column holds the type it declares, so a hand edit cannot put text in a
--   timestamp. Enumerations and JSON are also CHECKed; the Rust side still validates every row it
--   reads (a row may have been written with `PRAGMA ignore_check_constraints`), and reports a bad
--   row instead of failing a whole listing.
-- * Timestamps are INTEGER milliseconds since the Unix epoch, UTC.
-- * Ids use AUTOINCREMENT so an id is never reused after a delete: snapshot files and the UI refer
--   to conversations and messages by id.

CREATE TABLE conversations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    title       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    -- Last change to the conversation, its messages or its settings; the list is ordered by it.
    updated_at  INTEGER NOT NULL,
    -- Hugging Face repo id or local folder of the model the next message uses; NULL until chosen.
    model       TEXT,
    -- Variant (a subfolder of the repo holding a TPTT config.json); NULL until chosen.
    variant     TEXT,
    -- Per-conversation settings (system prompt, sampling parameters, softmax window) as JSON.
    settings    TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(settings)),
    archived    INTEGER NOT NULL DEFAULT 0 CHECK (archived IN (0, 1))
) STRICT;

CREATE INDEX conversations_by_recency ON conversations (archived, updated_at DESC, id DESC);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- Order inside the conversation: 0, 1, 2... assigned by the store on insert.
    position        INTEGER NOT NULL CHECK (position >= 0),
    role            TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    -- Exactly the text shown: model output is stored as it came, never escaped.
    content         TEXT    NOT NULL,
    -- 'partial': a generation that was stopped or is still streaming (or was cut by a crash);
    -- 'error': a generation that failed, with the text it had produced and `error`.
    status          TEXT    NOT NULL DEFAULT 'complete'
                            CHECK (status IN ('complete', 'partial', 'error')),
    error           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    -- Tokens this message takes in the prompt, when known (the memory meter sums them).
    token_count     INTEGER CHECK (token_count IS NULL OR token_count >= 0),
    -- Generation statistics as JSON (tokens/s, time to first token, finish reason...).
    stats           TEXT    CHECK (stats IS NULL OR json_valid(stats)),
    UNIQUE (conversation_id, position)
) STRICT;

-- TPTT state snapshots taken at turn boundaries. The engine writes the file; the store keeps
-- where it is and what it belongs to. A snapshot is usable only by the same model, variant and
-- config hash; deleting the message it follows deletes the row (the file is the caller's).
CREATE TABLE snapshots (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- The last message the state has read (checked to belong to conversation_id on insert).
    message_id      INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    model           TEXT    NOT NULL,
    variant         TEXT    NOT NULL,
    config_hash     TEXT    NOT NULL,
    path            TEXT    NOT NULL,
    size_bytes      INTEGER NOT NULL CHECK (size_bytes >= 0),
    -- Tokens the state has read (its position).
    token_count     INTEGER NOT NULL CHECK (token_count >= 0),
    created_at      INTEGER NOT NULL
) STRICT;

CREATE INDEX snapshots_by_conversation ON snapshots (conversation_id);
CREATE INDEX snapshots_by_message ON snapshots (message_id);

-- Application settings: one JSON value per key. Secrets (the Hugging Face token) do not belong
-- here: they go to the OS keyring or a file only the user can read.
CREATE TABLE settings (
    key         TEXT    PRIMARY KEY,
    value       TEXT    NOT NULL CHECK (json_valid(value)),
    updated_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Full-text search: FTS5 with the trigram tokenizer, so a query matches any substring
-- (case-insensitively), punctuation, `%`, `_` and quotes included. External-content tables: the
-- text lives once, in the tables above; the triggers keep the indexes in step.
CREATE VIRTUAL TABLE messages_fts USING fts5 (
    content, content = 'messages', content_rowid = 'id', tokenize = 'trigram'
);

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;

CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;

CREATE VIRTUAL TABLE conversations_fts USING fts5 (
    title, content = 'conversations', content_rowid = 'id', tokenize = 'trigram'
);

CREATE TRIGGER conversations_fts_insert AFTER INSERT ON conversations BEGIN
    INSERT INTO conversations_fts (rowid, title) VALUES (new.id, new.title);
END;

CREATE TRIGGER conversations_fts_delete AFTER DELETE ON conversations BEGIN
    INSERT INTO conversations_fts (conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
END;

CREATE TRIGGER conversations_fts_update AFTER UPDATE OF title ON conversations BEGIN
    INSERT INTO conversations_fts (conversations_fts, rowid, title) VALUES ('delete', old.id, old.title);
    INSERT INTO conversations_fts (rowid, title) VALUES (new.id, new.title);
END;
