-- Who besides the owner may read a media record: members of conversations it was sent to.
-- Keyed by media, so checking a read stays on the media's shard.
CREATE TABLE media_grants (
    media_id   TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (media_id, user_id)
);
