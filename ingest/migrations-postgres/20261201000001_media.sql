-- ingest's tables on PostgreSQL: the same tables as the SQLite migrations in ../migrations, in
-- PostgreSQL's types (times are unix ms in BIGINT, flags are BOOLEAN).
--
-- Distribution: these tables stay whole on one PostgreSQL server (on Citus, local tables on the
-- coordinator). They hold a row per upload, small next to messages, and the claim's
-- `FOR UPDATE SKIP LOCKED` and the media-to-job join by source_blob need them undistributed.

CREATE TABLE media (
    id           TEXT PRIMARY KEY,      -- UUIDv7
    owner        TEXT NOT NULL,         -- user id (token sub)
    kind         TEXT NOT NULL,         -- 'image' | 'audio' | 'video'
    source_blob  TEXT NOT NULL,         -- BLAKE3 hex of the upload, in the originals namespace
    source_mime  TEXT NOT NULL,         -- the sniffed type
    source_bytes BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX media_by_source_blob ON media (source_blob);

CREATE TABLE jobs (
    source_blob   TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    source_mime   TEXT NOT NULL,
    status        TEXT NOT NULL,        -- 'processing' | 'ready' | 'failed'
    attempts      INTEGER NOT NULL DEFAULT 0,
    run_after     BIGINT NOT NULL,      -- back-off after a failed attempt
    lease_until   BIGINT,               -- a claimed job is its runner's until then
    claim         TEXT,                 -- the current claim's token, which its runner's writes name
    permanent     BOOLEAN NOT NULL DEFAULT FALSE,  -- failed for a reason a retry cannot fix
    error_code    TEXT,
    error_message TEXT,
    result        TEXT,                 -- JSON of the variants once ready
    progress      DOUBLE PRECISION,     -- 0.0–1.0 while a long job runs
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX jobs_claimable_by_kind ON jobs (kind, status, run_after);

CREATE TABLE media_grants (
    media_id   TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    granted_at BIGINT NOT NULL,
    PRIMARY KEY (media_id, user_id)
);
