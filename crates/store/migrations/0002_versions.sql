-- TPTT Chat store, schema 2: alternatives ("versions") of a conversation's continuation.
--
-- Regenerating an answer or editing a message keeps what it replaces: the continuation from
-- that position on (the old answer, or the old message and everything after it) moves, with
-- its snapshots, into a *holder*: a conversation row that belongs to the conversation the user
-- sees (`owner_id`) and is listed and searched nowhere. `versions` numbers the continuations
-- of one position; the one shown has no holder (its messages are the conversation's own).
-- Switching versions swaps the shown continuation with a holder's. Versions inside a held
-- continuation (at later positions) travel with it: their rows name the holder as their
-- conversation. Every holder's `owner_id` is the conversation the user sees, so deleting that
-- conversation deletes all of them.

ALTER TABLE conversations ADD COLUMN owner_id INTEGER REFERENCES conversations (id) ON DELETE CASCADE;

CREATE INDEX conversations_by_owner ON conversations (owner_id);

CREATE TABLE versions (
    -- The conversation (or holder) whose continuation from `position` this is a version of.
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position        INTEGER NOT NULL CHECK (position >= 0),
    -- 1, 2, 3... in the order they were made.
    version         INTEGER NOT NULL CHECK (version >= 1),
    -- The holder of this version's messages; NULL for the version shown.
    holder_id       INTEGER UNIQUE REFERENCES conversations (id) ON DELETE CASCADE,
    PRIMARY KEY (conversation_id, position, version)
) STRICT;
