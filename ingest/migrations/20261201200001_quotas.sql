-- Bytes each user uploaded per UTC day, for the daily quota. A deleted media record keeps its
-- bytes counted here, and so does an upload its job refused (both cost the bandwidth and the
-- work): deleting or sending junk does not buy more uploads today. A user's rows before yesterday
-- are dropped as they upload.
CREATE TABLE upload_days (
    owner TEXT NOT NULL,
    day   INTEGER NOT NULL,   -- days since the unix epoch, UTC
    bytes INTEGER NOT NULL,
    PRIMARY KEY (owner, day)
);
-- A user's media, for the bytes they store and the jobs they have waiting.
CREATE INDEX media_by_owner ON media (owner, created_at);
