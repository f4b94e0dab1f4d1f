-- Disappearing messages: a conversation's timer (seconds, 0 = off) and, per message sent while it
-- was on, when the message is deleted (Unix ms). The deletion leaves a tombstone in place, so the
-- log keeps its seqs gapless; retention removes it with the rest later.
ALTER TABLE chat_conversations ADD COLUMN disappear_secs BIGINT NOT NULL DEFAULT 0;
ALTER TABLE chat_messages ADD COLUMN expires_at BIGINT;
CREATE INDEX chat_messages_expiring ON chat_messages (expires_at) WHERE expires_at IS NOT NULL;

-- An edit is a message of its own that carries the new text: `edits_seq` names the message it
-- edits, so deleting that message (or its timer running out) takes the edits' text too.
ALTER TABLE chat_messages ADD COLUMN edits_seq BIGINT;
CREATE INDEX chat_messages_edits ON chat_messages (conversation_id, edits_seq) WHERE edits_seq IS NOT NULL;

-- Media grants a deleted message gave, to take back: written in the deletion's own transaction and
-- drained by a sweep on any node (taking a grant back twice is harmless), so a crash between the
-- deletion and the revocation leaves nothing readable. Keyed by conversation, like the messages.
CREATE TABLE chat_media_revocations (
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    media_id        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
