-- Where each membership starts: the conversation's last seq when the member joined (0 for the
-- founders and for every membership before this migration). History, replay and unread counts start
-- after it, so a member added today does not read what was said before, and one removed and added
-- again does not read what was said while out. Kept on both membership tables: `chat_members` for
-- history (keyed by conversation), `chat_memberships` for a device's sync (keyed by user).
ALTER TABLE chat_members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE chat_memberships ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;
