-- How far a long job (a video) has got, 0.0–1.0, while it runs.
ALTER TABLE jobs ADD COLUMN progress REAL;
-- The runner claims per lane (images and audio, or videos), so the kind leads the claim index.
CREATE INDEX jobs_claimable_by_kind ON jobs (kind, status, run_after);
