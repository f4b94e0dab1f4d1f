-- A grant names what gave it (`source`: for messaging, the message that shared the media, as
-- "conversation/seq"), so deleting that message takes back exactly its grants and no other
-- message's. Grants from before carry '' and are kept until their media goes.
ALTER TABLE media_grants ADD COLUMN source TEXT NOT NULL DEFAULT '';
ALTER TABLE media_grants DROP CONSTRAINT media_grants_pkey;
ALTER TABLE media_grants ADD PRIMARY KEY (media_id, user_id, source);
CREATE INDEX media_grants_by_source_key ON media_grants (source, media_id);
