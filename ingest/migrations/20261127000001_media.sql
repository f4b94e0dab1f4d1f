-- Media records and the transcode jobs behind them.
--
-- A job is keyed by the BLAKE3 of the uploaded bytes, so the same bytes are transcoded once however
-- many media records (uploads, by anyone) point at them; a media record's status is its job's.
CREATE TABLE media (
    id           TEXT PRIMARY KEY,      -- UUIDv7
    owner        TEXT NOT NULL,         -- user id (token sub)
    kind         TEXT NOT NULL,         -- 'image'
    source_blob  TEXT NOT NULL,         -- BLAKE3 hex of the upload, in the originals namespace
    source_mime  TEXT NOT NULL,         -- the sniffed type
    source_bytes INTEGER NOT NULL,
    created_at   INTEGER NOT NULL       -- unix ms
);
CREATE INDEX media_by_source_blob ON media (source_blob);

CREATE TABLE jobs (
    source_blob   TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    source_mime   TEXT NOT NULL,
    status        TEXT NOT NULL,        -- 'processing' | 'ready' | 'failed'
    attempts      INTEGER NOT NULL DEFAULT 0,
    run_after     INTEGER NOT NULL,     -- unix ms; back-off after a failed attempt
    lease_until   INTEGER,              -- unix ms; a claimed job is someone's until then
    permanent     INTEGER NOT NULL DEFAULT 0,  -- failed for a reason a retry cannot fix
    error_code    TEXT,
    error_message TEXT,
    result        TEXT,                 -- JSON of the variants once ready
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX jobs_claimable ON jobs (status, run_after);
