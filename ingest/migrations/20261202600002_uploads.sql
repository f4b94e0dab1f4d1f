-- Resumable uploads (tus 1.0): where each upload stands and the parts its PATCH requests stored
-- (each in the blob store's `parts` namespace under a key of its own), so the next PATCH may come
-- after a restart, or to another node. The id is the media id the upload becomes.
CREATE TABLE uploads (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    mime          TEXT NOT NULL,
    length        INTEGER,                    -- NULL while deferred (Upload-Defer-Length)
    upload_offset INTEGER NOT NULL DEFAULT 0,
    head          BLOB NOT NULL,              -- the first bytes, until there are enough to sniff
    metadata      TEXT NOT NULL,              -- Upload-Metadata as sent, which HEAD echoes
    done          INTEGER NOT NULL DEFAULT 0, -- the media exists; the row answers HEAD until it expires
    writer        TEXT,                       -- the PATCH appending now, until writer_until
    writer_until  INTEGER,
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX uploads_by_owner ON uploads (owner, done);
CREATE INDEX uploads_by_expiry ON uploads (expires_at);
CREATE TABLE upload_parts (
    upload_id TEXT NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    start_at  INTEGER NOT NULL,
    len       INTEGER NOT NULL,
    key       TEXT NOT NULL,
    PRIMARY KEY (upload_id, start_at)
);
