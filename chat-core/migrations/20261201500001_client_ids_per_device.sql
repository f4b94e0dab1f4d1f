-- A client_id is the sending device's key, not the user's: two devices of one user may both send
-- "c-1". The table is rebuilt (SQLite cannot drop a table's UNIQUE constraint); the old key was per
-- user, stricter than per device, so every row fits the new one. In a cluster, upgrade with every
-- node stopped: a node still running the old code sends with the old key and is refused.
CREATE TABLE chat_messages_by_device (
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    sender_user     TEXT NOT NULL,
    sender_device   TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    body            TEXT NOT NULL,          -- opaque JSON
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
INSERT INTO chat_messages_by_device (conversation_id, seq, sender_user, sender_device, client_id, body, created_at)
SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at FROM chat_messages;
DROP TABLE chat_messages;
ALTER TABLE chat_messages_by_device RENAME TO chat_messages;
CREATE UNIQUE INDEX chat_messages_client_ids ON chat_messages (conversation_id, sender_device, client_id);
CREATE INDEX chat_messages_created ON chat_messages (created_at);
ANALYZE chat_messages;
