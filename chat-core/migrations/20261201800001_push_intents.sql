-- Push intents: one row per message that may need a push, written in the append's own
-- transaction (when a push notifier is configured), so a crash between the commit and any later
-- step loses no push. When it falls due (a few seconds later) a node claims it, pushes every
-- recipient device that has not acked the message by then, and deletes it. Keyed by conversation,
-- so it shards with the messages it names.
--
-- `due_at` is when the intent may next be claimed: the append's time plus the delay; a claim moves
-- it past the claim's lease (a node that dies mid-push leaves it to be claimed again), and a failed
-- push moves it to the retry.
CREATE TABLE chat_push_intents (
    conversation_id TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    sender_user     TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    due_at          BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, seq)
);
CREATE INDEX chat_push_intents_due ON chat_push_intents (due_at);

-- The per-user outbox it replaces: what was pending there is due at once.
INSERT INTO chat_push_intents (conversation_id, seq, sender_user, created_at, due_at, attempts)
SELECT conversation_id, seq, sender_user, created_at, next_attempt_at, attempts FROM chat_push_outbox WHERE TRUE
ON CONFLICT (conversation_id, seq) DO NOTHING;
DROP TABLE chat_push_outbox;
