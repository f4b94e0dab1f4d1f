-- The time of a conversation's newest message. A message takes MAX(its node's clock, this), so a
-- conversation's times never go backwards in seq order (nodes' clocks disagree, and a time is taken
-- before the write queue): retention, which deletes by age, then always deletes a prefix of the log.
ALTER TABLE chat_conversations ADD COLUMN last_at BIGINT NOT NULL DEFAULT 0;
UPDATE chat_conversations SET last_at = COALESCE(
    (SELECT MAX(m.created_at) FROM chat_messages m WHERE m.conversation_id = chat_conversations.conversation_id), 0);
