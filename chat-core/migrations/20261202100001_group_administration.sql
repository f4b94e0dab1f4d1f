-- Group administration: what a group says about itself besides its name, and who may change it.
-- `avatar` is a media id (an image its setter could share); `info_by_all` lets every member, not
-- only admins, change the name, description and avatar. Every change is a system message in the
-- conversation's log, written in the change's own transaction.
ALTER TABLE chat_conversations ADD COLUMN description TEXT;
ALTER TABLE chat_conversations ADD COLUMN avatar TEXT;
ALTER TABLE chat_conversations ADD COLUMN info_by_all BOOLEAN NOT NULL DEFAULT FALSE;

-- Who left a conversation (or was removed) and at which seq: the message of their own removal is
-- the last they get. Their devices replay up to `left_seq` (the removal) and may read their old
-- history from `joined_seq` up to it; a return deletes the row. Keyed by user first, like
-- chat_memberships (distributed by user_id in the sharding plan).
CREATE TABLE chat_departures (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    joined_seq      BIGINT NOT NULL,
    left_seq        BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);
