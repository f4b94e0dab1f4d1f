-- Disappearing messages: a conversation's timer (seconds, 0 = off) and, per message sent while it
-- was on, when the message is deleted (Unix ms). The deletion leaves a tombstone in place, so the
-- log keeps its seqs gapless; retention removes it with the rest later.
ALTER TABLE chat_conversations ADD COLUMN disappear_secs BIGINT NOT NULL DEFAULT 0;
ALTER TABLE chat_messages ADD COLUMN expires_at BIGINT;
CREATE INDEX chat_messages_expiring ON chat_messages (expires_at) WHERE expires_at IS NOT NULL;
