-- TPTT Chat store, schema 5: documents attached to a user message.
--
-- The document's text is part of the message's content (the model reads it with the message);
-- `attachment` says which part, as JSON: {"name", "kind", "bytes", "start", "end"} (the file's
-- name, its kind — text, markdown, code, html, pdf —, its size on disk, and the byte range of
-- its text in `content`), so the UI shows the attachment instead of the text.

ALTER TABLE messages ADD COLUMN attachment TEXT CHECK (attachment IS NULL OR json_valid(attachment));
