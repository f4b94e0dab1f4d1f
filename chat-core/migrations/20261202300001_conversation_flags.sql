-- Per user and conversation, what the chat list shows and every device of the user shares:
-- muted until when (Unix ms; NULL: not muted, 9223372036854775807: until unmuted), archived,
-- pinned. Kept on chat_memberships (keyed by user), so leaving a conversation clears them.
ALTER TABLE chat_memberships ADD COLUMN muted_until BIGINT;
ALTER TABLE chat_memberships ADD COLUMN archived BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE chat_memberships ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT FALSE;
