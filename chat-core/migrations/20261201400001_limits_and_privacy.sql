-- Rate limits every node sees: one row per (bucket, key) holding the time at which the bucket is
-- full again (GCRA's "theoretical arrival time", Unix ms). A request is let through when moving
-- it on by one interval stays within the bucket's burst; rows past their time are swept.
CREATE TABLE chat_rate_limits (
    bucket TEXT NOT NULL,
    key    TEXT NOT NULL,
    tat    BIGINT NOT NULL,
    PRIMARY KEY (bucket, key)
);

-- A user's own contacts: presence and typing go to them (and to whoever the user has exchanged
-- messages with both ways in a direct conversation), to nobody else.
CREATE TABLE chat_contacts (
    user_id    TEXT NOT NULL,
    contact_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, contact_id)
);
-- Whose contact a user is: what a connecting device may see the presence of.
CREATE INDEX chat_contacts_by_contact ON chat_contacts (contact_id);

-- Whether a member has ever sent a message in the conversation. A conversation a member has never
-- answered is a message request: their receipts are not shared there, and a direct conversation
-- counts towards trust (presence, typing) only once both have answered.
-- Existing members count as having answered where they wrote a message still kept, and in every
-- conversation retention has purged from (what they wrote there may be gone): an upgrade must not
-- turn long-standing chats into message requests.
ALTER TABLE chat_members ADD COLUMN answered BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE chat_members SET answered = TRUE
 WHERE EXISTS (SELECT 1 FROM chat_messages m
                WHERE m.conversation_id = chat_members.conversation_id AND m.sender_user = chat_members.user_id)
    OR EXISTS (SELECT 1 FROM chat_conversations c
                WHERE c.conversation_id = chat_members.conversation_id AND c.purged_upto > 0);

-- Whether the user's last-seen time is shown to anyone.
ALTER TABLE chat_users ADD COLUMN share_last_seen BOOLEAN NOT NULL DEFAULT TRUE;

-- A signed-in device asking for another device to be linked, for one of the user's other devices
-- to approve over the gateway (the other way to link besides a fresh SMS code). `status` goes
-- pending → approved (with the new `device_id`) or denied; the asking device collects an approved
-- one once (collected). Rows are swept an hour after they expire.
CREATE TABLE chat_link_requests (
    request_id   TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL,
    device_id    TEXT,
    expires_at   BIGINT NOT NULL
);
