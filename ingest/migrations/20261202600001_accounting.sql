-- What each job's blobs take, so a user's stored bytes and the totals per namespace are sums: the
-- original's bytes (in the store until `original_gone`) and each variant its result names, which
-- also answers "does any job still name this variant?" by index rather than by reading results.
ALTER TABLE jobs ADD COLUMN source_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET source_bytes = COALESCE((SELECT MAX(m.source_bytes) FROM media m WHERE m.source_blob = jobs.source_blob), 0);
CREATE TABLE job_variants (
    blob        TEXT NOT NULL,
    source_blob TEXT NOT NULL REFERENCES jobs (source_blob) ON DELETE CASCADE,
    bytes       INTEGER NOT NULL,
    PRIMARY KEY (blob, source_blob)
);
CREATE INDEX job_variants_by_source ON job_variants (source_blob);
INSERT OR IGNORE INTO job_variants (blob, source_blob, bytes)
SELECT json_extract(v.value, '$.blob'), j.source_blob, json_extract(v.value, '$.bytes')
  FROM jobs j, json_each(j.result, '$.variants') v
 WHERE j.result IS NOT NULL;

-- A sweep claims a logged deletion before it deletes the bytes (`claimed_at`, in the transaction
-- that checks nothing needs them), so a writer that needs the same bytes again (an upload, a
-- completing job) sees the deletion in flight, waits for it, and stores its bytes after it.
ALTER TABLE deleted_blobs ADD COLUMN claimed_at INTEGER;
CREATE INDEX deleted_blobs_by_blob ON deleted_blobs (blob);
