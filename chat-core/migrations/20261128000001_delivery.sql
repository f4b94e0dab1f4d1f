-- Delivery, receipts, presence, push, retention and phone accounts. The same SQL runs on SQLite and
-- PostgreSQL; the sharding plan of the first migration holds: every new table is keyed by user
-- (distributed on user_id) or by phone (distributed on phone), and the new columns sit on tables
-- already keyed by conversation.

-- Per member of a conversation: the highest seq any of the user's devices has acked or read. The
-- sender's devices get these as receipts; kept beside the membership so they shard with it.
ALTER TABLE chat_members ADD COLUMN delivered_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE chat_members ADD COLUMN read_seq BIGINT NOT NULL DEFAULT 0;

-- Messages up to this seq were purged by retention; a device behind it is told so on connect.
ALTER TABLE chat_conversations ADD COLUMN purged_upto BIGINT NOT NULL DEFAULT 0;

-- When the user's last device went offline (Unix ms; 0 = never seen).
ALTER TABLE chat_users ADD COLUMN last_seen BIGINT NOT NULL DEFAULT 0;

-- Retention purges by age.
CREATE INDEX chat_messages_created ON chat_messages (created_at);

-- Offline push: at most one pending notification per user and conversation (the newest seq wins),
-- so the outbox stays bounded however many messages wait.
CREATE TABLE chat_push_outbox (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    sender_user     TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);
CREATE INDEX chat_push_outbox_due ON chat_push_outbox (next_attempt_at);

-- Phone accounts: one user per phone number (E.164).
CREATE TABLE chat_phones (
    phone      TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The pending verification code of a phone, hashed; attempts count wrong guesses.
CREATE TABLE chat_phone_codes (
    phone      TEXT PRIMARY KEY,
    code_hash  TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    attempts   BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

-- Refresh tokens, hashed. A token is spent once; presenting a spent one revokes its device.
CREATE TABLE chat_refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    spent_at   BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX chat_refresh_tokens_device ON chat_refresh_tokens (user_id, device_id);
