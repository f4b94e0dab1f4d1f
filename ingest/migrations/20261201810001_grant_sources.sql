-- A grant names what gave it (`source`: for messaging, the message that shared the media, as
-- "conversation/seq"), so deleting that message takes back exactly its grants and no other
-- message's. Grants from before carry '' and are kept until their media goes. SQLite cannot change
-- a primary key: the table is rebuilt.
CREATE TABLE media_grants_by_source (
    media_id   TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    source     TEXT NOT NULL DEFAULT '',
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (media_id, user_id, source)
);
INSERT INTO media_grants_by_source (media_id, user_id, source, granted_at)
SELECT media_id, user_id, '', granted_at FROM media_grants;
DROP TABLE media_grants;
ALTER TABLE media_grants_by_source RENAME TO media_grants;
CREATE INDEX media_grants_by_source_key ON media_grants (source, media_id);
