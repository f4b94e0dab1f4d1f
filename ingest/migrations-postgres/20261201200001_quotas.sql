-- Bytes each user uploaded per UTC day, for the daily quota (as in ../migrations). Distribution:
-- local to the coordinator with the other ingest tables.
CREATE TABLE upload_days (
    owner TEXT NOT NULL,
    day   BIGINT NOT NULL,    -- days since the unix epoch, UTC
    bytes BIGINT NOT NULL,
    PRIMARY KEY (owner, day)
);
CREATE INDEX media_by_owner ON media (owner, created_at);
