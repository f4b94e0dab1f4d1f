-- Storage that does not grow forever. A job's original is deleted once the job has succeeded
-- (after `ingest.keep_originals_days`): `original_gone` says so, and the job row keeps the source
-- hash and result, so the same bytes uploaded again still deduplicate against its variants.
ALTER TABLE jobs ADD COLUMN original_gone INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_originals_to_retire ON jobs (status, original_gone, updated_at);

-- Every blob deleted, in order: written in the transaction that decides it (so a crash cannot
-- leak the bytes: the sweep deletes what is not `removed` yet, on any node, idempotently), and
-- read by operators' edge purge jobs (`GET /admin/deleted-blobs?after=SEQ`).
CREATE TABLE deleted_blobs (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace  TEXT NOT NULL,              -- 'originals' | 'variants'
    blob       TEXT NOT NULL,
    deleted_at INTEGER NOT NULL,           -- unix ms
    removed    INTEGER NOT NULL DEFAULT 0  -- the bytes are gone from the blob store
);
CREATE INDEX deleted_blobs_pending ON deleted_blobs (removed, seq);
