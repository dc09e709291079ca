-- TPTT Chat store, schema 4: primed memories.
--
-- A memory is a conversation's state saved under a name ("my projects", "this book"): a state
-- snapshot file (the app's, as for `snapshots`) usable only by the same model, variant and
-- config hash. A new chat can start from it (`conversations.memory_id`): its first turn reads
-- only its own messages, on top of the memory. Deleting the memory leaves such chats as they
-- are (the memory they started from is in their own snapshots once they have answered).

CREATE TABLE memories (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    model           TEXT    NOT NULL,
    variant         TEXT    NOT NULL,
    config_hash     TEXT    NOT NULL,
    path            TEXT    NOT NULL,
    size_bytes      INTEGER NOT NULL CHECK (size_bytes >= 0),
    -- Tokens the state has read.
    token_count     INTEGER NOT NULL CHECK (token_count >= 0),
    -- The title of the conversation it was saved from, as it was then.
    source_title    TEXT    NOT NULL,
    created_at      INTEGER NOT NULL
) STRICT;

ALTER TABLE conversations ADD COLUMN memory_id INTEGER REFERENCES memories (id) ON DELETE SET NULL;
