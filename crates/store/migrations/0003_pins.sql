-- TPTT Chat store, schema 3: pinned conversations (listed first, most recent first among them).

ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1));
