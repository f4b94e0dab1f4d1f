-- Media expire: a record no message (nor avatar) references any more goes after
-- `ingest.media_retention_days` from its upload, or after `ingest.unsent_media_days` if it was
-- never shared. `last_shared_at` says it was shared; `expire_check_at` is when the sweep should
-- look at it next (NULL while it has grants: a revocation sets it again), so a sweep reads only
-- the records that may be due, not every record.
ALTER TABLE media ADD COLUMN last_shared_at INTEGER;
ALTER TABLE media ADD COLUMN expire_check_at INTEGER;
UPDATE media SET last_shared_at = created_at WHERE EXISTS (SELECT 1 FROM media_grants g WHERE g.media_id = media.id);
UPDATE media SET expire_check_at = created_at WHERE NOT EXISTS (SELECT 1 FROM media_grants g WHERE g.media_id = media.id);
CREATE INDEX media_expire_check ON media (expire_check_at) WHERE expire_check_at IS NOT NULL;
