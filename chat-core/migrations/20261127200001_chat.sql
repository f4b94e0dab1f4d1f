-- chat-core's tables. The same SQL runs on SQLite and PostgreSQL.
--
-- Sharding (Citus or another Postgres-compatible distributed engine): tables keyed by conversation
-- (conversations, members, messages) are distributed on conversation_id and co-located, so appending
-- and replaying a conversation stays on one shard; tables keyed by user (users, devices, memberships,
-- cursors) are distributed on user_id. No hot-path query joins across the two groups.

CREATE TABLE chat_users (
    user_id    TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE chat_devices (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE chat_conversations (
    conversation_id TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,          -- 'direct' | 'group'
    name            TEXT,
    -- The seq of the newest message; appends bump it in their transaction, which keeps seqs gapless.
    last_seq        BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL
);

-- The one direct conversation of a pair: pair_key is 'a|b' with a < b.
CREATE TABLE chat_direct_pairs (
    pair_key        TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL
);

CREATE TABLE chat_members (
    conversation_id TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    role            TEXT NOT NULL,          -- 'admin' | 'member'
    joined_at       BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

-- The same membership keyed by user, for "my conversations" without a cross-shard scan.
CREATE TABLE chat_memberships (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);

CREATE TABLE chat_messages (
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    sender_user     TEXT NOT NULL,
    sender_device   TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    body            TEXT NOT NULL,          -- opaque JSON
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, sender_user, client_id)
);

-- Per device and conversation: delivered up to, read up to.
CREATE TABLE chat_cursors (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    delivered_seq   BIGINT NOT NULL DEFAULT 0,
    read_seq        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, conversation_id)
);
