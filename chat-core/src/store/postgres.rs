//! chat-core's tables on PostgreSQL (sqlx), shared by every node of a cluster.
//!
//! Every write transaction that touches a conversation starts by updating its row, which locks it:
//! appends, acks and membership changes of one conversation run one at a time, and a group commit
//! locks its conversations in ascending id order so two nodes' batches cannot deadlock.

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres as Pg, Transaction};
use types::{ConversationId, DeviceId, UserId};

use super::{
    Acked, Appended, Bucket, Contact, ContactEntry, Conversation, ConversationDetails, ConversationKind,
    ConversationSummary, Cursor, DeviceInfo, EXPIRED_BODY, Effect, Flags, FlagsEdit, GroupInfo, LinkAnswer, LinkState,
    Linked, ListFrom, MAX_CONTACTS, MAX_DEVICES, MAX_PROFILE_WATCHERS, Member, MemberReceipt, Members, Message,
    NewLinkRequest, NewMessage, NewRefresh, Outcome, PendingCode, Privacy, ProfileEdit, ProfileSeen, PushIntent,
    PushTarget, Receipt, Role, Rotation, Spend, StoreError, SyncState, Target, Write, Written, check_message,
    effect_on, expires_at, link_state, may_set_timer, pair_key, plan_change, retried, shared_media,
};

/// Users come into being the first time they are named.
const ENSURE_USER: &str =
    "INSERT INTO chat_users (user_id, created_at) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING";

/// Locks the user's row, so two links at once cannot both take the last place.
const LOCK_USER: &str = "SELECT 1 FROM chat_users WHERE user_id = $1 FOR UPDATE";

const COUNT_DEVICES: &str = "SELECT COUNT(*) FROM chat_devices WHERE user_id = $1";

/// The device to replace when a user links one past the limit: the least recently seen.
/// (Never `$2`: the device whose link request is being approved.)
const LEAST_RECENT_DEVICE: &str = "
    SELECT device_id FROM chat_devices WHERE user_id = $1 AND device_id <> $2
     ORDER BY COALESCE(last_seen, created_at), created_at, device_id LIMIT 1";

const DEVICES: &str =
    "SELECT device_id, name, created_at, last_seen FROM chat_devices WHERE user_id = $1 ORDER BY created_at";

/// Noted at most once a minute per device: a device reconnecting in a loop costs no writes.
const DEVICE_SEEN: &str = "
    UPDATE chat_devices SET last_seen = $3
     WHERE user_id = $1 AND device_id = $2 AND (last_seen IS NULL OR last_seen < $3 - 60000)";

const PHONE_OF: &str = "SELECT phone FROM chat_phones WHERE user_id = $1";

const INSERT_DEVICE: &str = "INSERT INTO chat_devices (user_id, device_id, name, created_at) VALUES ($1, $2, $3, $4)";

const CLAIM_PAIR: &str = "
    INSERT INTO chat_direct_pairs (pair_key, conversation_id) VALUES ($1, $2)
    ON CONFLICT (pair_key) DO NOTHING";

const PAIR: &str = "SELECT conversation_id FROM chat_direct_pairs WHERE pair_key = $1";

const CONVERSATION: &str =
    "SELECT conversation_id, kind, name, last_seq FROM chat_conversations WHERE conversation_id = $1";

const INSERT_CONVERSATION: &str = "
    INSERT INTO chat_conversations (conversation_id, kind, name, last_seq, created_at) VALUES ($1, $2, $3, 0, $4)";

/// A member's history starts after `joined_seq` (the seq before the message that added them).
const INSERT_MEMBER: &str = "
    INSERT INTO chat_members (conversation_id, user_id, role, joined_at, joined_seq) VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (conversation_id, user_id) DO NOTHING";

const INSERT_MEMBERSHIP: &str = "
    INSERT INTO chat_memberships (user_id, conversation_id, joined_seq) VALUES ($1, $2, $3)
    ON CONFLICT (user_id, conversation_id) DO NOTHING";

/// A member who comes back is no longer one who left.
const DELETE_DEPARTURE: &str = "DELETE FROM chat_departures WHERE user_id = $1 AND conversation_id = $2";

/// A member who goes keeps their history up to the message of their going.
const INSERT_DEPARTURE: &str = "
    INSERT INTO chat_departures (user_id, conversation_id, joined_seq, left_seq) VALUES ($1, $2, $3, $4)
    ON CONFLICT (user_id, conversation_id) DO UPDATE SET joined_seq = excluded.joined_seq, left_seq = excluded.left_seq";

/// Which part of the log a user may read: after where they joined, up to where they left (NULL
/// while they are a member).
const SPAN: &str = "
    SELECT joined_seq, NULL::BIGINT FROM chat_members WHERE conversation_id = $1 AND user_id = $2
    UNION ALL
    SELECT joined_seq, left_seq FROM chat_departures WHERE user_id = $2 AND conversation_id = $1
    LIMIT 1";

/// The members as a change sees them, longest-standing first.
const ROSTER: &str = "
    SELECT user_id, role, joined_at, joined_seq FROM chat_members WHERE conversation_id = $1
     ORDER BY joined_seq, joined_at, user_id";

/// A conversation and its settings.
const DETAILS: &str = "
    SELECT conversation_id, kind, name, last_seq, description, avatar, info_by_all, disappear_secs, created_at
      FROM chat_conversations WHERE conversation_id = $1";

const SET_ROLE: &str = "UPDATE chat_members SET role = $3 WHERE conversation_id = $1 AND user_id = $2";

const SET_INFO: &str = "UPDATE chat_conversations SET name = $2, description = $3, avatar = $4, info_by_all = $5 WHERE conversation_id = $1";

const ROLE: &str = "SELECT role FROM chat_members WHERE conversation_id = $1 AND user_id = $2";

/// Up to so many members, by id: what a chat list names.
const MEMBER_SAMPLE: &str = "SELECT user_id FROM chat_members WHERE conversation_id = $1 ORDER BY user_id LIMIT $2";

const MEMBER_IDS: &str = "SELECT user_id FROM chat_members WHERE conversation_id = $1";

const MEMBERS: &str = "SELECT user_id, role FROM chat_members WHERE conversation_id = $1 ORDER BY joined_at, user_id";

const DELETE_MEMBER: &str = "DELETE FROM chat_members WHERE conversation_id = $1 AND user_id = $2";

const DELETE_MEMBERSHIP: &str = "DELETE FROM chat_memberships WHERE conversation_id = $1 AND user_id = $2";

/// A page of a user's chat list: pinned first, then by last activity, newest first, after the
/// cursor ($3, $4, $5) when one is given; with unread counts after the user's read receipt (so
/// reading on one device reads on all), system messages ($2, their device) left out of them.
const CONVERSATIONS: &str = "
    SELECT c.conversation_id, c.kind, c.name, c.last_seq, c.avatar,
           CASE WHEN c.last_seq = 0 THEN c.created_at ELSE c.last_at END AS activity,
           m.muted_until, m.archived, m.pinned,
           (SELECT COUNT(*) FROM chat_members x WHERE x.conversation_id = c.conversation_id) AS member_count,
           (SELECT COUNT(*) FROM chat_messages msg
             WHERE msg.conversation_id = c.conversation_id AND msg.sender_user <> $1 AND msg.sender_device <> $2
               AND msg.seq > GREATEST(me.read_seq, m.joined_seq)) AS unread,
           lm.sender_user AS last_sender, lm.body AS last_body, lm.created_at AS last_created_at
      FROM chat_memberships m
      JOIN chat_conversations c ON c.conversation_id = m.conversation_id
      JOIN chat_members me ON me.conversation_id = m.conversation_id AND me.user_id = m.user_id
      LEFT JOIN chat_messages lm
        ON lm.conversation_id = c.conversation_id AND lm.seq = c.last_seq AND lm.seq > m.joined_seq
     WHERE m.user_id = $1
       AND ($3::BOOLEAN IS NULL
            OR (m.pinned, CASE WHEN c.last_seq = 0 THEN c.created_at ELSE c.last_at END, c.conversation_id)
               < ($3::BOOLEAN, $4::BIGINT, $5::TEXT))
     ORDER BY m.pinned DESC, activity DESC, c.conversation_id DESC
     LIMIT $6";

/// A user's flags on a conversation, locked until the change commits.
const FLAGS: &str =
    "SELECT muted_until, archived, pinned FROM chat_memberships WHERE user_id = $1 AND conversation_id = $2 FOR UPDATE";

const SET_FLAGS: &str = "
    UPDATE chat_memberships SET muted_until = $3, archived = $4, pinned = $5
     WHERE user_id = $1 AND conversation_id = $2";

/// Takes the conversation's next seq (only a member gets one: no row otherwise) and its time: the node's clock, or the conversation's last time if that is later (times never
/// go backwards in seq order).
const TAKE_SEQ: &str = "
    UPDATE chat_conversations SET last_seq = last_seq + 1, last_at = GREATEST(last_at, $3)
     WHERE conversation_id = $1
       AND EXISTS (SELECT 1 FROM chat_members WHERE conversation_id = $1 AND user_id = $2)
    RETURNING last_seq, last_at, disappear_secs";

/// Inserts the message, or nothing when the sending device already sent this client id.
const INSERT_MESSAGE: &str = "
    INSERT INTO chat_messages (conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (conversation_id, sender_device, client_id) DO NOTHING";

/// Takes back a message whose effect was refused (the seq goes back with [`GIVE_SEQ_BACK`]).
const DELETE_MESSAGE: &str = "DELETE FROM chat_messages WHERE conversation_id = $1 AND seq = $2";

/// The message an effect names, if the actor can see it (it is from after they joined), locked
/// so the timer's sweep cannot tombstone it between the check and the change.
const TARGET: &str = "
    SELECT sender_user, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = $1 AND seq = $2
       AND seq > (SELECT joined_seq FROM chat_members WHERE conversation_id = $1 AND user_id = $3)
       FOR UPDATE";

/// An edit names the message it edits and goes when that one does.
const MARK_EDIT: &str =
    "UPDATE chat_messages SET edits_seq = $3, expires_at = $4 WHERE conversation_id = $1 AND seq = $2";

/// A deleted message's edits lose their text too.
const TOMBSTONE_EDITS: &str =
    "UPDATE chat_messages SET body = $3, expires_at = NULL WHERE conversation_id = $1 AND edits_seq = $2";

/// A grant a deleted message gave, to take back.
const INSERT_REVOCATION: &str = "
    INSERT INTO chat_media_revocations (conversation_id, seq, media_id, created_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (conversation_id, seq) DO NOTHING";

/// A body rewritten by the server (a media message's `media_info`), only if it is still the one
/// read before.
const REPLACE_BODY: &str = "UPDATE chat_messages SET body = $4 WHERE conversation_id = $1 AND seq = $2 AND body = $3";

const BODY_OF: &str = "SELECT body FROM chat_messages WHERE conversation_id = $1 AND seq = $2";

const DUE_REVOCATIONS: &str =
    "SELECT conversation_id, seq, media_id FROM chat_media_revocations ORDER BY created_at LIMIT $1";

const DELETE_REVOCATION: &str = "DELETE FROM chat_media_revocations WHERE conversation_id = $1 AND seq = $2";

const EDIT_BODY: &str = "UPDATE chat_messages SET body = $3 WHERE conversation_id = $1 AND seq = $2";

/// A tombstone in place of a message: it no longer disappears (there is nothing left).
const TOMBSTONE: &str = "UPDATE chat_messages SET body = $3, expires_at = NULL WHERE conversation_id = $1 AND seq = $2";

/// The conversation's kind and the actor's role in it.
const KIND_AND_ROLE: &str = "
    SELECT c.kind, m.role FROM chat_conversations c
      JOIN chat_members m ON m.conversation_id = c.conversation_id AND m.user_id = $2
     WHERE c.conversation_id = $1";

const SET_TIMER: &str = "UPDATE chat_conversations SET disappear_secs = $2 WHERE conversation_id = $1";

/// Messages whose timer ran out, oldest first.
const DUE_EXPIRIES: &str = "
    SELECT conversation_id, seq, body FROM chat_messages WHERE expires_at <= $1
     ORDER BY expires_at, conversation_id, seq LIMIT $2";

/// A message whose timer ran out keeps a tombstone (unless it was deleted meanwhile).
const EXPIRE: &str = "
    UPDATE chat_messages SET body = $3, expires_at = NULL
     WHERE conversation_id = $1 AND seq = $2 AND expires_at IS NOT NULL";

/// Gives a retry's seq back (the transaction holds the row, so it is still the last one).
/// Its time goes back with it (to the message before's), so a refused write does not move the
/// conversation up a chat list.
const GIVE_SEQ_BACK: &str = "
    UPDATE chat_conversations
       SET last_seq = last_seq - 1,
           last_at = COALESCE(
             (SELECT m.created_at FROM chat_messages m
               WHERE m.conversation_id = $1 AND m.seq = chat_conversations.last_seq - 1),
             last_at)
     WHERE conversation_id = $1";

/// The first copy of a retried message.
const BY_CLIENT_ID: &str = "
    SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = $1 AND sender_device = $2 AND client_id = $3";

/// Moves a device's cursors, clamped to the log's end; only a member gets a row.
const MOVE_CURSOR: &str = "
    INSERT INTO chat_cursors (user_id, device_id, conversation_id, delivered_seq, read_seq)
    SELECT $1, $2, $3, LEAST(GREATEST($4, 0), c.last_seq), LEAST(GREATEST($5, 0), c.last_seq)
      FROM chat_conversations c
      JOIN chat_members m ON m.conversation_id = c.conversation_id AND m.user_id = $1
     WHERE c.conversation_id = $3
    ON CONFLICT (user_id, device_id, conversation_id) DO UPDATE SET
      delivered_seq = GREATEST(excluded.delivered_seq, chat_cursors.delivered_seq),
      read_seq = GREATEST(excluded.read_seq, chat_cursors.read_seq)
    RETURNING delivered_seq, read_seq";

/// Moves the cursors of a device of a user who left, up to the message of their going (it shares
/// no receipt: they are not a member).
const MOVE_DEPARTED_CURSOR: &str = "
    INSERT INTO chat_cursors (user_id, device_id, conversation_id, delivered_seq, read_seq)
    SELECT $1, $2, $3, LEAST(GREATEST($4, 0), d.left_seq), LEAST(GREATEST($5, 0), d.left_seq)
      FROM chat_departures d
     WHERE d.user_id = $1 AND d.conversation_id = $3
    ON CONFLICT (user_id, device_id, conversation_id) DO UPDATE SET
      delivered_seq = GREATEST(excluded.delivered_seq, chat_cursors.delivered_seq),
      read_seq = GREATEST(excluded.read_seq, chat_cursors.read_seq)
    RETURNING delivered_seq, read_seq";

/// Raises the user's receipt to a device's cursors; a row comes back only when it moved, saying
/// whether the user has answered there (else the receipt is not shared).
const MOVE_RECEIPT: &str = "
    UPDATE chat_members SET delivered_seq = GREATEST($3, delivered_seq), read_seq = GREATEST($4, read_seq)
     WHERE conversation_id = $1 AND user_id = $2 AND (delivered_seq < $3 OR read_seq < $4)
    RETURNING delivered_seq, read_seq, answered";

/// The user's receipt before an ack moves it.
const RECEIPT: &str = "SELECT delivered_seq, read_seq FROM chat_members WHERE conversation_id = $1 AND user_id = $2";

/// Whom a receipt over a range of messages concerns.
/// Every member's receipt and where they joined, for aggregated receipts.
const MEMBER_RECEIPTS: &str =
    "SELECT user_id, delivered_seq, read_seq, joined_seq, answered FROM chat_members WHERE conversation_id = $1";

const SENDERS_BETWEEN: &str = "
    SELECT DISTINCT sender_user FROM chat_messages
     WHERE conversation_id = $1 AND seq > $2 AND seq <= $3 AND sender_user <> COALESCE($4, '')";

/// The sender has answered in the conversation (written once, on their first message).
const MARK_ANSWERED: &str =
    "UPDATE chat_members SET answered = TRUE WHERE conversation_id = $1 AND user_id = $2 AND NOT answered";

const MESSAGES_AFTER: &str = "
    SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4";

/// The newest messages before a seq (and after where the member joined), newest first.
const MESSAGES_BEFORE: &str = "
    SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = $1 AND seq < $2 AND seq > $3 ORDER BY seq DESC LIMIT $4";

const DEVICE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM chat_devices WHERE user_id = $1 AND device_id = $2)";

const DELETE_DEVICE: &str = "DELETE FROM chat_devices WHERE user_id = $1 AND device_id = $2";

const DELETE_DEVICE_CURSORS: &str = "DELETE FROM chat_cursors WHERE user_id = $1 AND device_id = $2";

const DELETE_DEVICE_TOKENS: &str = "DELETE FROM chat_refresh_tokens WHERE user_id = $1 AND device_id = $2";

/// A device that goes takes its link requests with it: nobody can approve them any more.
const DELETE_DEVICE_LINKS: &str = "DELETE FROM chat_link_requests WHERE user_id = $1 AND requested_by = $2";

/// Where a device ($2) of a user ($1) stands in their conversations, and in those they left:
/// the log ends at their going for them (a device with no cursor there, linked since, gets only
/// the message of the going). Each part is narrowed by what follows it.
macro_rules! sync_rows {
    ($members:literal, $departed:literal) => {
        concat!(
            "SELECT c.conversation_id, c.last_seq, c.purged_upto,
                    GREATEST(COALESCE(cu.delivered_seq, 0), m.joined_seq) AS delivered
               FROM chat_memberships m
               JOIN chat_conversations c ON c.conversation_id = m.conversation_id
               LEFT JOIN chat_cursors cu
                 ON cu.user_id = m.user_id AND cu.device_id = $2 AND cu.conversation_id = m.conversation_id
              WHERE m.user_id = $1",
            $members,
            " UNION ALL
             SELECT c.conversation_id, d.left_seq, c.purged_upto,
                    GREATEST(COALESCE(cu.delivered_seq, d.left_seq - 1), d.joined_seq)
               FROM chat_departures d
               JOIN chat_conversations c ON c.conversation_id = d.conversation_id
               LEFT JOIN chat_cursors cu
                 ON cu.user_id = d.user_id AND cu.device_id = $2 AND cu.conversation_id = d.conversation_id
              WHERE d.user_id = $1",
            $departed
        )
    };
}

/// Where a device stands in each of a user's conversations, and in those they left whose last
/// message (their going) it has not got yet (unless retention took it).
const SYNC_STATE: &str =
    sync_rows!("", " AND COALESCE(cu.delivered_seq, 0) < d.left_seq AND d.left_seq > c.purged_upto");

/// The same, in one conversation (one left included, whatever the device got).
const SYNC_ONE: &str = sync_rows!(" AND m.conversation_id = $3", " AND d.conversation_id = $3");

const RECEIPTS: &str = "
    SELECT o.conversation_id, o.user_id, o.delivered_seq, o.read_seq
      FROM chat_memberships m
      JOIN chat_members o ON o.conversation_id = m.conversation_id
     WHERE m.user_id = $1 AND o.user_id <> $1 AND o.delivered_seq > 0 AND o.answered";

/// Whoever `$1` has exchanged messages with both ways in a direct conversation.
macro_rules! answered_both_ways {
    () => {
        "SELECT o.user_id FROM chat_memberships m
           JOIN chat_conversations c ON c.conversation_id = m.conversation_id AND c.kind = 'direct'
           JOIN chat_members me ON me.conversation_id = m.conversation_id AND me.user_id = $1 AND me.answered
           JOIN chat_members o ON o.conversation_id = m.conversation_id AND o.user_id <> $1 AND o.answered
          WHERE m.user_id = $1"
    };
}

const AUDIENCE: &str =
    concat!("SELECT contact_id AS user_id FROM chat_contacts WHERE user_id = $1 UNION ", answered_both_ways!());

const WATCHED: &str = concat!(
    "SELECT u.user_id, CASE WHEN u.share_last_seen THEN u.last_seen ELSE 0 END AS last_seen FROM chat_users u
      WHERE u.user_id IN (SELECT user_id FROM chat_contacts WHERE contact_id = $1 UNION ",
    answered_both_ways!(),
    ") LIMIT 5000"
);

const CONTACT_LIST: &str =
    "SELECT contact_id, created_at FROM chat_contacts WHERE user_id = $1 ORDER BY created_at, contact_id";

/// Which of the named users exist.
const EXISTING_USERS: &str = "SELECT user_id FROM chat_users WHERE user_id = ANY($1)";

const CLEAR_CONTACTS: &str = "DELETE FROM chat_contacts WHERE user_id = $1";

const INSERT_CONTACTS: &str = "
    INSERT INTO chat_contacts (user_id, contact_id, created_at) SELECT $1, c, $3 FROM UNNEST($2::TEXT[]) AS c
    ON CONFLICT (user_id, contact_id) DO NOTHING";

const COUNT_CONTACTS: &str = "SELECT COUNT(*) FROM chat_contacts WHERE user_id = $1";

const DELETE_CONTACT: &str = "DELETE FROM chat_contacts WHERE user_id = $1 AND contact_id = $2";

/// A user's profile, with whether they have the viewer ($2) as a contact and whether the two
/// share a conversation in which the owner has written (being put in a group earns nobody a name).
const PROFILE_SEEN: &str = "
    SELECT u.user_id, u.profile_name, u.about, u.avatar, u.profile_visibility, u.profile_at,
           EXISTS (SELECT 1 FROM chat_contacts k WHERE k.user_id = u.user_id AND k.contact_id = $2) AS contact,
           EXISTS (SELECT 1 FROM chat_memberships v
                     JOIN chat_members o ON o.conversation_id = v.conversation_id AND o.user_id = u.user_id
                    WHERE v.user_id = $2 AND o.answered) AS shared
      FROM chat_users u WHERE u.user_id = $1";

const SET_PROFILE: &str = "
    UPDATE chat_users SET profile_name = $2, about = $3, avatar = $4, profile_visibility = $5, profile_at = $6
     WHERE user_id = $1";

/// Who may see a user's name (see [`PROFILE_SEEN`]): the members of the conversations they have
/// written in, and their contacts.
const PROFILE_WATCHERS: &str = "
    SELECT o.user_id FROM chat_memberships m
      JOIN chat_members mine ON mine.conversation_id = m.conversation_id AND mine.user_id = m.user_id
      JOIN chat_members o ON o.conversation_id = m.conversation_id
     WHERE m.user_id = $1 AND mine.answered
    UNION
    SELECT contact_id FROM chat_contacts WHERE user_id = $1
    LIMIT $2";

const PRIVACY: &str = "SELECT share_last_seen FROM chat_users WHERE user_id = $1";

const SET_PRIVACY: &str = "UPDATE chat_users SET share_last_seen = $2 WHERE user_id = $1";

const INSERT_LINK_REQUEST: &str = "
    INSERT INTO chat_link_requests (request_id, user_id, requested_by, name, status, expires_at)
    VALUES ($1, $2, $3, $4, 'pending', $5)";

/// Answers a pending, unexpired request from another device than the one that asked.
const ANSWER_LINK: &str = "
    UPDATE chat_link_requests SET status = $4
     WHERE request_id = $1 AND user_id = $2 AND requested_by <> $3 AND status = 'pending'
       AND expires_at > $5
    RETURNING name, requested_by";

const LINK_ASKER: &str = "
    SELECT requested_by FROM chat_link_requests
     WHERE request_id = $1 AND user_id = $2 AND status = 'pending' AND expires_at > $3";

/// (The asking device has the request's lifetime again to collect an approval.)
const SET_LINK_DEVICE: &str =
    "UPDATE chat_link_requests SET device_id = $2, expires_at = expires_at + 300000 WHERE request_id = $1";

/// Hands an approved request's device over, once.
const COLLECT_LINK: &str = "
    UPDATE chat_link_requests SET status = 'collected'
     WHERE request_id = $1 AND user_id = $2 AND requested_by = $3 AND status = 'approved'
       AND device_id IS NOT NULL AND expires_at > $4
    RETURNING device_id";

const LINK_STATUS: &str = "
    SELECT status, expires_at FROM chat_link_requests
     WHERE request_id = $1 AND user_id = $2 AND requested_by = $3";

const SWEEP_LINKS: &str = "DELETE FROM chat_link_requests WHERE expires_at < $1";

/// GCRA: moves the bucket's full-again time on by one interval, unless that passes the burst.
const TAKE_TOKEN: &str = "
    INSERT INTO chat_rate_limits (bucket, key, tat) VALUES ($1, $2, $3 + $4)
    ON CONFLICT (bucket, key) DO UPDATE SET tat = GREATEST(chat_rate_limits.tat, $3) + $4
     WHERE GREATEST(chat_rate_limits.tat, $3) + $4 - $3 <= $5
    RETURNING tat";

const TOKEN_TAT: &str = "SELECT tat FROM chat_rate_limits WHERE bucket = $1 AND key = $2";

/// Returns a token taken from a bucket (the request it let through did not go ahead).
const GIVE_BACK: &str = "UPDATE chat_rate_limits SET tat = tat - $3 WHERE bucket = $1 AND key = $2";

const SWEEP_LIMITS: &str = "DELETE FROM chat_rate_limits WHERE tat < $1";

const SET_LAST_SEEN: &str = "UPDATE chat_users SET last_seen = $2 WHERE user_id = $1";

/// A message's push intent, written with it.
const INSERT_PUSH_INTENT: &str = "
    INSERT INTO chat_push_intents (conversation_id, seq, sender_user, created_at, due_at) VALUES ($1, $2, $3, $4, $5)";

/// Claims due intents for a lease; rows another node's claim holds are skipped, not waited for.
const CLAIM_PUSHES: &str = "
    WITH due AS (
        SELECT conversation_id, seq FROM chat_push_intents WHERE due_at <= $1 ORDER BY due_at LIMIT $3
           FOR UPDATE SKIP LOCKED)
    UPDATE chat_push_intents p SET due_at = $2, attempts = p.attempts + 1
      FROM due WHERE p.conversation_id = due.conversation_id AND p.seq = due.seq
    RETURNING p.conversation_id, p.seq, p.sender_user, p.created_at, p.attempts, p.due_at";

/// The devices of the members at the message's seq, but the sender's, that have not acked it and
/// were linked by the time it was sent.
const PUSH_TARGETS: &str = "
    SELECT d.user_id, d.device_id
      FROM chat_members m
      JOIN chat_devices d ON d.user_id = m.user_id
      LEFT JOIN chat_cursors cu
        ON cu.user_id = d.user_id AND cu.device_id = d.device_id AND cu.conversation_id = m.conversation_id
     WHERE m.conversation_id = $1 AND m.user_id <> $2 AND m.joined_seq < $3 AND d.created_at <= $4
       AND COALESCE(cu.delivered_seq, 0) < $3
     ORDER BY d.user_id, d.device_id";

/// Drops an intent this claim still holds.
const DELETE_PUSH_INTENT: &str =
    "DELETE FROM chat_push_intents WHERE conversation_id = $1 AND seq = $2 AND due_at = $3";

/// A deleted message is not pushed.
const CANCEL_PUSH_INTENT: &str = "DELETE FROM chat_push_intents WHERE conversation_id = $1 AND seq = $2";

/// Puts off an intent this claim still holds.
const RETRY_PUSH_INTENT: &str =
    "UPDATE chat_push_intents SET due_at = $4 WHERE conversation_id = $1 AND seq = $2 AND due_at = $3";

const NEXT_PUSH_DUE: &str = "SELECT MIN(due_at) FROM chat_push_intents";

/// Marks how far each conversation with old messages is purged (deleted next, same transaction).
/// Per conversation with messages older than the cutoff, in id order from where the last round
/// stopped: where its purge starts and the horizon it purges to (the newest old message's seq;
/// times never go backwards in seq order, so that is a prefix of the log).
const RETENTION_HORIZONS: &str = "
    SELECT m.conversation_id, LEAST(MIN(m.seq) - 1, c.purged_upto), MAX(m.seq)
      FROM chat_messages m JOIN chat_conversations c ON c.conversation_id = m.conversation_id
     WHERE m.created_at < $1 AND m.conversation_id > $3
     GROUP BY m.conversation_id, c.purged_upto ORDER BY m.conversation_id LIMIT $2";

/// One slice of a conversation's purge.
const PURGE_RANGE: &str = "DELETE FROM chat_messages WHERE conversation_id = $1 AND seq > $2 AND seq <= $3";

/// The messages a purge takes that may carry media (their bodies are read to be sure): the grants
/// they gave are taken back as a deletion's are, and the media then lives on only as long as
/// ingest's retention keeps a media nothing references.
const PURGED_MEDIA_BODIES: &str = "
    SELECT seq, body FROM chat_messages
     WHERE conversation_id = $1 AND seq > $2 AND seq <= $3 AND body LIKE '%\"media\"%'";

const MARK_PURGED: &str =
    "UPDATE chat_conversations SET purged_upto = GREATEST(purged_upto, $2) WHERE conversation_id = $1";

const PUT_CODE: &str = "
    INSERT INTO chat_phone_codes (phone, code_hash, expires_at, attempts, created_at) VALUES ($1, $2, $3, 0, $4)
    ON CONFLICT (phone) DO UPDATE SET code_hash = excluded.code_hash, expires_at = excluded.expires_at,
      attempts = 0, created_at = excluded.created_at";

const COUNT_ATTEMPT: &str = "
    UPDATE chat_phone_codes SET attempts = attempts + 1 WHERE phone = $1 RETURNING code_hash, expires_at, attempts";

const USE_CODE: &str = "DELETE FROM chat_phone_codes WHERE phone = $1 AND code_hash = $2";

const CLAIM_PHONE: &str =
    "INSERT INTO chat_phones (phone, user_id, created_at) VALUES ($1, $2, $3) ON CONFLICT (phone) DO NOTHING";

const PHONE_USER: &str = "SELECT user_id FROM chat_phones WHERE phone = $1";

const PHONES_USERS: &str = "SELECT phone, user_id FROM chat_phones WHERE phone = ANY($1)";

const INSERT_REFRESH: &str = "
    INSERT INTO chat_refresh_tokens (token_hash, user_id, device_id, expires_at, spent_at, created_at)
    VALUES ($1, $2, $3, $4, NULL, $5)";

/// Spends a live token for its successor, noting who spent it; no row when it is unknown,
/// expired or spent.
const SPEND_REFRESH: &str = "
    UPDATE chat_refresh_tokens SET spent_at = $2, spent_by = $3, replaced_by = $4
     WHERE token_hash = $1 AND spent_at IS NULL AND expires_at > $2
    RETURNING user_id, device_id";

/// A token spent within the grace ($4 ms) by the same client, presented again because the answer
/// carrying its successor was lost: the successor, never used, is spent now, so that presenting it
/// later counts as a copy. No row otherwise.
const TAKE_BACK_SUCCESSOR: &str = "
    UPDATE chat_refresh_tokens SET spent_at = $2, spent_by = 'taken back'
     WHERE spent_at IS NULL
       AND token_hash = (SELECT replaced_by FROM chat_refresh_tokens
                          WHERE token_hash = $1 AND spent_at > $2 - $4 AND spent_by = $3
                            AND expires_at > $2)
    RETURNING user_id, device_id";

/// Two retries of one token at once take turns, so the second sees the first's successor.
const LOCK_REFRESH: &str = "SELECT 1 FROM chat_refresh_tokens WHERE token_hash = $1 FOR UPDATE";

const SET_SUCCESSOR: &str = "UPDATE chat_refresh_tokens SET replaced_by = $2 WHERE token_hash = $1";

const SPENT_REFRESH: &str =
    "SELECT user_id, device_id FROM chat_refresh_tokens WHERE token_hash = $1 AND spent_at IS NOT NULL";

/// Unix milliseconds by the database's clock.
macro_rules! db_now_ms {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}

/// Renews a node; says whether its row had lapsed (or was missing) before.
const NODE_ALIVE: &str = concat!(
    "WITH before AS (SELECT alive_until FROM chat_nodes WHERE node_id = $1)
     INSERT INTO chat_nodes (node_id, alive_until) VALUES ($1, ",
    db_now_ms!(),
    " + $2)
     ON CONFLICT (node_id) DO UPDATE SET alive_until = excluded.alive_until
     RETURNING COALESCE((SELECT alive_until FROM before), 0) < ",
    db_now_ms!()
);

const DELETE_NODE: &str = "DELETE FROM chat_nodes WHERE node_id = $1";

const DELETE_NODE_PRESENCE: &str = "DELETE FROM chat_presence WHERE node_id = $1";

/// Nodes silent for longer than $1 ms, removed at once (a node that beat meanwhile is not one).
const SWEEP_NODES: &str =
    concat!("DELETE FROM chat_nodes WHERE alive_until < ", db_now_ms!(), " - $1 RETURNING node_id");

const PRESENT: &str = "
    INSERT INTO chat_presence (user_id, node_id) VALUES ($1, $2) ON CONFLICT (user_id, node_id) DO NOTHING";

const ABSENT: &str = "DELETE FROM chat_presence WHERE user_id = $1 AND node_id = $2";

const NODES_OF: &str = concat!(
    "SELECT p.user_id, p.node_id FROM chat_presence p JOIN chat_nodes n ON n.node_id = p.node_id
      WHERE p.user_id = ANY($1) AND n.alive_until >= ",
    db_now_ms!()
);

/// chat-core's tables in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct Postgres {
    db: PgPool,
}

impl Postgres {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        let db = PgPoolOptions::new().max_connections(16).connect(url).await?;
        let mut migrator = sqlx::migrate!("./migrations");
        // Other crates keep their own migrations in the same database.
        migrator.set_ignore_missing(true);
        migrator.run(&db).await.map_err(sqlx::Error::from)?;
        Ok(Self { db })
    }

    pub(super) async fn write_batch(&self, batch: Vec<Write>) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        let mut tx = self.db.begin().await?;
        // Conversations are locked in ascending id order (stable within one), so two writers'
        // batches [X, Y] and [Y, X] cannot deadlock; results go back in the batch's order.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        // Within a conversation appends go first: an ack locks a member row that a first message
        // marks as answered after taking the conversation's, so the other order could deadlock.
        order.sort_by_key(|&i| (batch[i].conversation(), matches!(batch[i], Write::Ack { .. })));
        let mut results: Vec<Option<Result<Written, StoreError>>> = batch.iter().map(|_| None).collect();
        let mut members: std::collections::HashMap<ConversationId, Members> = std::collections::HashMap::new();
        let mut answered: std::collections::HashSet<(ConversationId, UserId)> = std::collections::HashSet::new();
        for i in order {
            let result = match &batch[i] {
                Write::Append { conversation, sender, device, client_id, body, now_ms, push_delay_ms, effect } => {
                    let new = NewMessage { conversation, sender, device, client_id, body, now_ms: *now_ms, effect };
                    let appended = append(&mut tx, &new).await;
                    if let (Ok(Appended::New(message)), Some(delay)) = (&appended, push_delay_ms) {
                        sqlx::query(INSERT_PUSH_INTENT)
                            .bind(conversation)
                            .bind(message.seq)
                            .bind(sender)
                            .bind(message.created_at)
                            .bind(message.created_at.saturating_add(*delay))
                            .execute(&mut *tx)
                            .await?;
                    }
                    // A sender's first message marks them as having answered; once a batch. A
                    // system message is not theirs to answer with.
                    let change = matches!(effect, Effect::Change(_));
                    if let Ok(Appended::New(_)) = appended
                        && !change
                        && answered.insert((*conversation, sender.clone()))
                    {
                        sqlx::query(MARK_ANSWERED).bind(conversation).bind(sender).execute(&mut *tx).await?;
                    }
                    if change {
                        members.remove(conversation);
                    }
                    match appended {
                        // The members it goes to, read under the conversation's lock that took its
                        // seq (no membership change can come between them).
                        Ok(appended) => {
                            let mut to = match members.get(conversation) {
                                Some(to) => to.clone(),
                                None => {
                                    let to: Members = sqlx::query_scalar::<_, UserId>(MEMBER_IDS)
                                        .bind(conversation)
                                        .fetch_all(&mut *tx)
                                        .await?
                                        .into();
                                    members.insert(*conversation, to.clone());
                                    to
                                }
                            };
                            if let (Appended::New(_), Some(departing)) = (&appended, batch[i].departing()) {
                                to = to.iter().chain(std::iter::once(departing)).cloned().collect();
                            }
                            Ok(Written::Appended(appended, to))
                        }
                        Err(e) => Err(e),
                    }
                }
                Write::Ack { user, device, conversation, seq, read } => {
                    move_cursor(&mut tx, user, device, conversation, *seq, *read).await.map(Written::Acked)
                }
            };
            // Refusals wrote nothing; a database error may have written half, so the batch fails.
            if let Err(e @ (StoreError::Database(_) | StoreError::Corrupt(_))) = result {
                return Err(e);
            }
            results[i] = Some(result);
        }
        tx.commit().await?;
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Batch("a write did not run".into()))))
            .collect())
    }

    pub(super) async fn add_device(&self, user: &UserId, name: &str, now: i64) -> Result<Linked, StoreError> {
        let mut tx = self.db.begin().await?;
        let linked = link_device(&mut tx, user, name, None, now).await?;
        tx.commit().await?;
        Ok(linked)
    }

    pub(super) async fn devices(&self, user: &UserId) -> Result<Vec<DeviceInfo>, StoreError> {
        Ok(sqlx::query_as(DEVICES).bind(user).fetch_all(&self.db).await?)
    }

    pub(super) async fn device_seen(&self, user: &UserId, device: &DeviceId, now: i64) -> Result<(), StoreError> {
        sqlx::query(DEVICE_SEEN).bind(user).bind(device).bind(now).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn phone_of(&self, user: &UserId) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(PHONE_OF).bind(user).fetch_optional(&self.db).await?)
    }

    pub(super) async fn direct(&self, a: &UserId, b: &UserId, now: i64) -> Result<Conversation, StoreError> {
        let key = pair_key(a, b);
        let id = ConversationId::new();
        let mut tx = self.db.begin().await?;
        let claimed = sqlx::query(CLAIM_PAIR).bind(&key).bind(id).execute(&mut *tx).await?.rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            let existing: ConversationId = sqlx::query_scalar(PAIR).bind(&key).fetch_one(&self.db).await?;
            let found: Option<Conversation> =
                sqlx::query_as(CONVERSATION).bind(existing).fetch_optional(&self.db).await?;
            return found.ok_or_else(|| StoreError::Corrupt("a direct pair names no conversation".into()));
        }
        let kind = ConversationKind::Direct;
        sqlx::query(INSERT_CONVERSATION)
            .bind(id)
            .bind(kind.as_str())
            .bind(None::<&str>)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        insert_members(&mut tx, &id, &[(a.clone(), Role::Member), (b.clone(), Role::Member)], now, 0).await?;
        tx.commit().await?;
        Ok(Conversation { id, kind, name: None, last_seq: 0 })
    }

    pub(super) async fn create_group(
        &self,
        name: &str,
        roster: &[(UserId, Role)],
        now: i64,
    ) -> Result<Conversation, StoreError> {
        let id = ConversationId::new();
        let kind = ConversationKind::Group;
        let mut tx = self.db.begin().await?;
        sqlx::query(INSERT_CONVERSATION).bind(id).bind(kind.as_str()).bind(name).bind(now).execute(&mut *tx).await?;
        insert_members(&mut tx, &id, roster, now, 0).await?;
        tx.commit().await?;
        Ok(Conversation { id, kind, name: Some(name.to_owned()), last_seq: 0 })
    }

    pub(super) async fn details(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<Option<ConversationDetails>, StoreError> {
        let mut conn = self.db.acquire().await?;
        if role(&mut conn, conversation, user).await?.is_none() {
            return Ok(None);
        }
        Ok(details(&mut conn, conversation).await?.map(|(details, _)| details))
    }

    pub(super) async fn members(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<Vec<(UserId, Role)>, StoreError> {
        let mut conn = self.db.acquire().await?;
        role(&mut conn, conversation, user).await?.ok_or(StoreError::NotMember)?;
        let rows: Vec<(UserId, String)> = sqlx::query_as(MEMBERS).bind(conversation).fetch_all(&mut *conn).await?;
        rows.into_iter().map(|(user, role)| Ok((user, Role::try_from(role).map_err(StoreError::Corrupt)?))).collect()
    }

    pub(super) async fn conversations(
        &self,
        user: &UserId,
        from: Option<&ListFrom>,
        limit: i64,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        Ok(sqlx::query_as(CONVERSATIONS)
            .bind(user)
            .bind(DeviceId::SYSTEM)
            .bind(from.map(|f| f.pinned))
            .bind(from.map(|f| f.activity))
            .bind(from.map(|f| f.conversation))
            .bind(limit)
            .fetch_all(&self.db)
            .await?)
    }

    pub(super) async fn set_flags(
        &self,
        user: &UserId,
        conversation: &ConversationId,
        edit: FlagsEdit,
    ) -> Result<Option<Flags>, StoreError> {
        let mut tx = self.db.begin().await?;
        let current: Option<Flags> =
            sqlx::query_as(FLAGS).bind(user).bind(conversation).fetch_optional(&mut *tx).await?;
        let Some(current) = current else { return Ok(None) };
        let next = current.edited(edit);
        sqlx::query(SET_FLAGS)
            .bind(user)
            .bind(conversation)
            .bind(next.muted_until)
            .bind(next.archived)
            .bind(next.pinned)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(next))
    }

    pub(super) async fn messages_after(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Message>, StoreError> {
        let mut conn = self.db.acquire().await?;
        let (joined, left) = span(&mut conn, conversation, user).await?;
        Ok(sqlx::query_as(MESSAGES_AFTER)
            .bind(conversation)
            .bind(after.max(joined))
            .bind(left.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?)
    }

    pub(super) async fn messages_before(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        before: i64,
        limit: i64,
    ) -> Result<Vec<Message>, StoreError> {
        let mut conn = self.db.acquire().await?;
        let (joined, left) = span(&mut conn, conversation, user).await?;
        let before = left.map_or(before, |left| before.min(left + 1));
        let mut page: Vec<Message> = sqlx::query_as(MESSAGES_BEFORE)
            .bind(conversation)
            .bind(before)
            .bind(joined)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        page.reverse();
        Ok(page)
    }

    pub(super) async fn device_exists(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(DEVICE_EXISTS).bind(user).bind(device).fetch_one(&self.db).await?)
    }

    pub(super) async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        let mut tx = self.db.begin().await?;
        let removed = unlink_device(&mut tx, user, device).await?;
        tx.commit().await?;
        Ok(removed)
    }

    pub(super) async fn sync_state(&self, user: &UserId, device: &DeviceId) -> Result<Vec<SyncState>, StoreError> {
        Ok(sqlx::query_as(SYNC_STATE).bind(user).bind(device).fetch_all(&self.db).await?)
    }

    pub(super) async fn sync_one(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
    ) -> Result<Option<SyncState>, StoreError> {
        Ok(sqlx::query_as(SYNC_ONE).bind(user).bind(device).bind(conversation).fetch_optional(&self.db).await?)
    }

    pub(super) async fn senders_between(
        &self,
        conversation: &ConversationId,
        after: i64,
        upto: i64,
        except: Option<&UserId>,
    ) -> Result<Vec<UserId>, StoreError> {
        Ok(sqlx::query_scalar(SENDERS_BETWEEN)
            .bind(conversation)
            .bind(after)
            .bind(upto)
            .bind(except)
            .fetch_all(&self.db)
            .await?)
    }

    pub(super) async fn member_receipts(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<MemberReceipt>, StoreError> {
        Ok(sqlx::query_as(MEMBER_RECEIPTS).bind(conversation).fetch_all(&self.db).await?)
    }

    pub(super) async fn member_sample(
        &self,
        conversation: &ConversationId,
        limit: i64,
    ) -> Result<Vec<UserId>, StoreError> {
        Ok(sqlx::query_scalar(MEMBER_SAMPLE).bind(conversation).bind(limit).fetch_all(&self.db).await?)
    }

    pub(super) async fn member_ids(&self, conversation: &ConversationId) -> Result<Vec<UserId>, StoreError> {
        Ok(sqlx::query_scalar(MEMBER_IDS).bind(conversation).fetch_all(&self.db).await?)
    }

    pub(super) async fn receipts(&self, user: &UserId) -> Result<Vec<Receipt>, StoreError> {
        Ok(sqlx::query_as(RECEIPTS).bind(user).fetch_all(&self.db).await?)
    }

    pub(super) async fn audience(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        Ok(sqlx::query_scalar(AUDIENCE).bind(user).fetch_all(&self.db).await?)
    }

    pub(super) async fn watched(&self, user: &UserId) -> Result<Vec<Contact>, StoreError> {
        Ok(sqlx::query_as(WATCHED).bind(user).fetch_all(&self.db).await?)
    }

    pub(super) async fn contact_list(&self, user: &UserId) -> Result<Vec<ContactEntry>, StoreError> {
        Ok(sqlx::query_as(CONTACT_LIST).bind(user).fetch_all(&self.db).await?)
    }

    pub(super) async fn unknown_users(&self, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        let ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
        let existing: std::collections::HashSet<UserId> =
            sqlx::query_scalar(EXISTING_USERS).bind(&ids).fetch_all(&self.db).await?.into_iter().collect();
        Ok(users.iter().filter(|u| !existing.contains(*u)).cloned().collect())
    }

    pub(super) async fn add_contacts(
        &self,
        user: &UserId,
        contacts: &[UserId],
        replace: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let ids: Vec<&str> = contacts.iter().map(UserId::as_str).collect();
        let mut tx = self.db.begin().await?;
        let existing: std::collections::HashSet<UserId> =
            sqlx::query_scalar(EXISTING_USERS).bind(&ids).fetch_all(&mut *tx).await?.into_iter().collect();
        let unknown: Vec<UserId> = contacts.iter().filter(|c| !existing.contains(*c)).cloned().collect();
        if !unknown.is_empty() {
            return Err(StoreError::UnknownUsers(unknown));
        }
        sqlx::query(ENSURE_USER).bind(user).bind(now).execute(&mut *tx).await?;
        // Two replacements at once take turns.
        sqlx::query(LOCK_USER).bind(user).execute(&mut *tx).await?;
        if replace {
            sqlx::query(CLEAR_CONTACTS).bind(user).execute(&mut *tx).await?;
        }
        sqlx::query(INSERT_CONTACTS).bind(user).bind(&ids).bind(now).execute(&mut *tx).await?;
        let count: i64 = sqlx::query_scalar(COUNT_CONTACTS).bind(user).fetch_one(&mut *tx).await?;
        if count > MAX_CONTACTS as i64 {
            return Err(StoreError::Invalid(format!("a user keeps at most {MAX_CONTACTS} contacts")));
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn remove_contact(&self, user: &UserId, contact: &UserId) -> Result<bool, StoreError> {
        Ok(sqlx::query(DELETE_CONTACT).bind(user).bind(contact).execute(&self.db).await?.rows_affected() > 0)
    }

    pub(super) async fn privacy(&self, user: &UserId) -> Result<Privacy, StoreError> {
        let share: Option<bool> = sqlx::query_scalar(PRIVACY).bind(user).fetch_optional(&self.db).await?;
        Ok(share.map(|share_last_seen| Privacy { share_last_seen }).unwrap_or_default())
    }

    pub(super) async fn profile_seen(&self, user: &UserId, viewer: &UserId) -> Result<Option<ProfileSeen>, StoreError> {
        Ok(sqlx::query_as(PROFILE_SEEN).bind(user).bind(viewer).fetch_optional(&self.db).await?)
    }

    pub(super) async fn set_profile(&self, user: &UserId, edit: &ProfileEdit, now: i64) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        sqlx::query(ENSURE_USER).bind(user).bind(now).execute(&mut *tx).await?;
        sqlx::query(LOCK_USER).bind(user).execute(&mut *tx).await?;
        let current: Option<ProfileSeen> =
            sqlx::query_as(PROFILE_SEEN).bind(user).bind(user).fetch_optional(&mut *tx).await?;
        let current = current.ok_or_else(|| StoreError::Corrupt("a user just ensured is missing".into()))?;
        let next = current.profile.edited(edit);
        sqlx::query(SET_PROFILE)
            .bind(user)
            .bind(&next.name)
            .bind(&next.about)
            .bind(&next.avatar)
            .bind(next.visibility.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn profile_watchers(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        Ok(sqlx::query_scalar(PROFILE_WATCHERS).bind(user).bind(MAX_PROFILE_WATCHERS).fetch_all(&self.db).await?)
    }

    pub(super) async fn set_privacy(&self, user: &UserId, privacy: Privacy, now: i64) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        sqlx::query(ENSURE_USER).bind(user).bind(now).execute(&mut *tx).await?;
        sqlx::query(SET_PRIVACY).bind(user).bind(privacy.share_last_seen).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn create_link_request(&self, request: &NewLinkRequest<'_>) -> Result<(), StoreError> {
        sqlx::query(INSERT_LINK_REQUEST)
            .bind(request.id)
            .bind(request.user)
            .bind(request.requested_by)
            .bind(request.name)
            .bind(request.expires_at_ms)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    pub(super) async fn answer_link_request(
        &self,
        request_id: &str,
        user: &UserId,
        approver: &DeviceId,
        status: &'static str,
        now: i64,
    ) -> Result<LinkAnswer, StoreError> {
        let mut tx = self.db.begin().await?;
        let answered: Option<(String, DeviceId)> = sqlx::query_as(ANSWER_LINK)
            .bind(request_id)
            .bind(user)
            .bind(approver)
            .bind(status)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((name, requested_by)) = answered else {
            let asker: Option<DeviceId> =
                sqlx::query_scalar(LINK_ASKER).bind(request_id).bind(user).bind(now).fetch_optional(&mut *tx).await?;
            return Ok(if asker.as_ref() == Some(approver) { LinkAnswer::OwnRequest } else { LinkAnswer::Unknown });
        };
        let mut linked = None;
        if status == "approved" {
            let device = link_device(&mut tx, user, &name, Some(&requested_by), now).await?;
            sqlx::query(SET_LINK_DEVICE).bind(request_id).bind(device.device).execute(&mut *tx).await?;
            linked = Some(device);
        }
        tx.commit().await?;
        Ok(LinkAnswer::Answered { name, requested_by, linked })
    }

    pub(super) async fn collect_link(
        &self,
        request_id: &str,
        user: &UserId,
        requested_by: &DeviceId,
        now: i64,
    ) -> Result<LinkState, StoreError> {
        let device: Option<DeviceId> = sqlx::query_scalar(COLLECT_LINK)
            .bind(request_id)
            .bind(user)
            .bind(requested_by)
            .bind(now)
            .fetch_optional(&self.db)
            .await?;
        if let Some(device) = device {
            return Ok(LinkState::Linked(device));
        }
        let status: Option<(String, i64)> =
            sqlx::query_as(LINK_STATUS).bind(request_id).bind(user).bind(requested_by).fetch_optional(&self.db).await?;
        Ok(link_state(status, now))
    }

    pub(super) async fn sweep_link_requests(&self, before: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(SWEEP_LINKS).bind(before).execute(&self.db).await?.rows_affected())
    }

    pub(super) async fn take_token(&self, limit: &Bucket<'_>) -> Result<Option<i64>, StoreError> {
        let taken: Option<i64> = sqlx::query_scalar(TAKE_TOKEN)
            .bind(limit.bucket)
            .bind(limit.key)
            .bind(limit.now_ms)
            .bind(limit.every_ms)
            .bind(limit.burst * limit.every_ms)
            .fetch_optional(&self.db)
            .await?;
        if taken.is_some() {
            return Ok(None);
        }
        let tat: Option<i64> =
            sqlx::query_scalar(TOKEN_TAT).bind(limit.bucket).bind(limit.key).fetch_optional(&self.db).await?;
        // Swept in between: as if full, one interval from now.
        Ok(Some(limit.wait_ms(tat.unwrap_or(limit.now_ms + limit.burst * limit.every_ms))))
    }

    pub(super) async fn token_tat(&self, bucket: &str, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(TOKEN_TAT).bind(bucket).bind(key).fetch_optional(&self.db).await?)
    }

    pub(super) async fn give_back(&self, bucket: &str, key: &str, every: i64) -> Result<(), StoreError> {
        sqlx::query(GIVE_BACK).bind(bucket).bind(key).bind(every).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn sweep_limits(&self, now: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(SWEEP_LIMITS).bind(now).execute(&self.db).await?.rows_affected())
    }

    pub(super) async fn set_last_seen(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        sqlx::query(SET_LAST_SEEN).bind(user).bind(at_ms).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn claim_pushes(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<PushIntent>, StoreError> {
        Ok(sqlx::query_as(CLAIM_PUSHES).bind(now_ms).bind(until_ms).bind(limit).fetch_all(&self.db).await?)
    }

    pub(super) async fn push_targets(&self, intent: &PushIntent) -> Result<Vec<PushTarget>, StoreError> {
        Ok(sqlx::query_as(PUSH_TARGETS)
            .bind(intent.conversation)
            .bind(&intent.sender)
            .bind(intent.seq)
            .bind(intent.created_at)
            .fetch_all(&self.db)
            .await?)
    }

    pub(super) async fn pushes_done(&self, intents: &[PushIntent]) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for intent in intents {
            sqlx::query(DELETE_PUSH_INTENT)
                .bind(intent.conversation)
                .bind(intent.seq)
                .bind(intent.lease)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn retry_pushes(&self, intents: &[PushIntent], retry_at_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for intent in intents {
            sqlx::query(RETRY_PUSH_INTENT)
                .bind(intent.conversation)
                .bind(intent.seq)
                .bind(intent.lease)
                .bind(retry_at_ms)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn next_push_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(NEXT_PUSH_DUE).fetch_one(&self.db).await?)
    }

    pub(super) async fn due_expiries(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(ConversationId, i64, String)>, StoreError> {
        Ok(sqlx::query_as(DUE_EXPIRIES).bind(now_ms).bind(limit).fetch_all(&self.db).await?)
    }

    pub(super) async fn expire(
        &self,
        messages: &[(ConversationId, i64, Option<String>)],
        now: i64,
    ) -> Result<(), StoreError> {
        // One message a transaction: none holds two message rows, so none waits on a send's in a
        // cycle.
        for (conversation, seq, media) in messages {
            let mut tx = self.db.begin().await?;
            let expired = sqlx::query(EXPIRE)
                .bind(conversation)
                .bind(seq)
                .bind(EXPIRED_BODY)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if let (1.., Some(media)) = (expired, media) {
                sqlx::query(INSERT_REVOCATION)
                    .bind(conversation)
                    .bind(seq)
                    .bind(media)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    pub(super) async fn replace_body(
        &self,
        conversation: &ConversationId,
        seq: i64,
        before: &str,
        after: &str,
    ) -> Result<bool, StoreError> {
        let replaced =
            sqlx::query(REPLACE_BODY).bind(conversation).bind(seq).bind(before).bind(after).execute(&self.db).await?;
        Ok(replaced.rows_affected() > 0)
    }

    pub(super) async fn body_of(&self, conversation: &ConversationId, seq: i64) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(BODY_OF).bind(conversation).bind(seq).fetch_optional(&self.db).await?)
    }

    pub(super) async fn due_revocations(&self, limit: i64) -> Result<Vec<(ConversationId, i64, String)>, StoreError> {
        Ok(sqlx::query_as(DUE_REVOCATIONS).bind(limit).fetch_all(&self.db).await?)
    }

    pub(super) async fn revoked(&self, messages: &[(ConversationId, i64)]) -> Result<(), StoreError> {
        for (conversation, seq) in messages {
            sqlx::query(DELETE_REVOCATION).bind(conversation).bind(seq).execute(&self.db).await?;
        }
        Ok(())
    }

    pub(super) async fn retention_horizons(
        &self,
        before_ms: i64,
        after: String,
        limit: i64,
    ) -> Result<Vec<(ConversationId, i64, i64)>, StoreError> {
        Ok(sqlx::query_as(RETENTION_HORIZONS).bind(before_ms).bind(limit).bind(after).fetch_all(&self.db).await?)
    }

    pub(super) async fn purge_range(
        &self,
        conversation: &ConversationId,
        after: i64,
        upto: i64,
        now: i64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin().await?;
        sqlx::query(MARK_PURGED).bind(conversation).bind(upto).execute(&mut *tx).await?;
        let bodies: Vec<(i64, String)> =
            sqlx::query_as(PURGED_MEDIA_BODIES).bind(conversation).bind(after).bind(upto).fetch_all(&mut *tx).await?;
        for (seq, media) in shared_media(bodies) {
            sqlx::query(INSERT_REVOCATION).bind(conversation).bind(seq).bind(media).bind(now).execute(&mut *tx).await?;
        }
        let purged =
            sqlx::query(PURGE_RANGE).bind(conversation).bind(after).bind(upto).execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(purged)
    }

    pub(super) async fn put_code(
        &self,
        phone: &str,
        code_hash: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(PUT_CODE).bind(phone).bind(code_hash).bind(expires_at_ms).bind(now_ms).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn count_attempt(&self, phone: &str) -> Result<Option<PendingCode>, StoreError> {
        Ok(sqlx::query_as(COUNT_ATTEMPT).bind(phone).fetch_optional(&self.db).await?)
    }

    pub(super) async fn use_code(&self, phone: &str, code_hash: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query(USE_CODE).bind(phone).bind(code_hash).execute(&self.db).await?.rows_affected() > 0)
    }

    pub(super) async fn user_for_phone(&self, phone: &str, fresh: &UserId, now_ms: i64) -> Result<UserId, StoreError> {
        let mut tx = self.db.begin().await?;
        sqlx::query(CLAIM_PHONE).bind(phone).bind(fresh).bind(now_ms).execute(&mut *tx).await?;
        let user: UserId = sqlx::query_scalar(PHONE_USER).bind(phone).fetch_one(&mut *tx).await?;
        sqlx::query(ENSURE_USER).bind(&user).bind(now_ms).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(user)
    }

    pub(super) async fn lookup_phones(&self, phones: &[String]) -> Result<Vec<(String, UserId)>, StoreError> {
        Ok(sqlx::query_as(PHONES_USERS).bind(phones).fetch_all(&self.db).await?)
    }

    pub(super) async fn lookup_phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        Ok(sqlx::query_scalar(PHONE_USER).bind(phone).fetch_optional(&self.db).await?)
    }

    pub(super) async fn issue_refresh(&self, token: &NewRefresh<'_>) -> Result<(), StoreError> {
        insert_refresh(&mut *self.db.acquire().await?, token).await
    }

    /// Spends `old_hash` for `new_hash`; a spent token comes back as `Reused` (the caller logs its
    /// device out).
    pub(super) async fn rotate_refresh(&self, spend: &Spend<'_>) -> Result<Rotation, StoreError> {
        let Spend { old_hash, new_hash, client, grace_ms, expires_at_ms, now_ms } = *spend;
        let mut tx = self.db.begin().await?;
        let spent: Option<(UserId, DeviceId)> = sqlx::query_as(SPEND_REFRESH)
            .bind(old_hash)
            .bind(now_ms)
            .bind(client)
            .bind(new_hash)
            .fetch_optional(&mut *tx)
            .await?;
        let retried = match spent {
            Some(_) => None,
            None => {
                sqlx::query(LOCK_REFRESH).bind(old_hash).execute(&mut *tx).await?;
                sqlx::query_as(TAKE_BACK_SUCCESSOR)
                    .bind(old_hash)
                    .bind(now_ms)
                    .bind(client)
                    .bind(grace_ms)
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let was_retry = retried.is_some();
        if let Some((user, device)) = spent.or(retried) {
            if was_retry {
                sqlx::query(SET_SUCCESSOR).bind(old_hash).bind(new_hash).execute(&mut *tx).await?;
            }
            let token = NewRefresh { hash: new_hash, user: &user, device: &device, expires_at_ms, now_ms };
            insert_refresh(&mut tx, &token).await?;
            tx.commit().await?;
            return Ok(Rotation::Rotated { user, device });
        }
        tx.rollback().await?;
        let reused: Option<(UserId, DeviceId)> =
            sqlx::query_as(SPENT_REFRESH).bind(old_hash).fetch_optional(&self.db).await?;
        Ok(match reused {
            Some((user, device)) => Rotation::Reused { user, device },
            None => Rotation::Invalid,
        })
    }
}

impl Postgres {
    pub(super) async fn node_alive(&self, node: &str, for_ms: i64) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(NODE_ALIVE).bind(node).bind(for_ms).fetch_one(&self.db).await?)
    }

    pub(super) async fn node_gone(&self, node: &str) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        sqlx::query(DELETE_NODE_PRESENCE).bind(node).execute(&mut *tx).await?;
        sqlx::query(DELETE_NODE).bind(node).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn sweep_nodes(&self, silent_ms: i64) -> Result<u64, StoreError> {
        let mut tx = self.db.begin().await?;
        let gone: Vec<String> = sqlx::query_scalar(SWEEP_NODES).bind(silent_ms).fetch_all(&mut *tx).await?;
        for node in &gone {
            sqlx::query(DELETE_NODE_PRESENCE).bind(node).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(gone.len() as u64)
    }

    pub(super) async fn present(&self, user: &UserId, node: &str) -> Result<(), StoreError> {
        sqlx::query(PRESENT).bind(user).bind(node).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn absent(&self, user: &UserId, node: &str) -> Result<(), StoreError> {
        sqlx::query(ABSENT).bind(user).bind(node).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn nodes_of(&self, users: &[UserId]) -> Result<Vec<(UserId, String)>, StoreError> {
        let ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
        Ok(sqlx::query_as(NODES_OF).bind(ids).fetch_all(&self.db).await?)
    }
}

/// Links a new device of `user` inside `tx` (creating the user on first sight); past
/// [`MAX_DEVICES`] the least recently seen one is unlinked. Two links at once count the devices one
/// after the other (the user's row is locked).
async fn link_device(
    tx: &mut Transaction<'_, Pg>,
    user: &UserId,
    name: &str,
    keep: Option<&DeviceId>,
    now: i64,
) -> Result<Linked, StoreError> {
    sqlx::query(ENSURE_USER).bind(user).bind(now).execute(&mut **tx).await?;
    sqlx::query(LOCK_USER).bind(user).execute(&mut **tx).await?;
    let linked: i64 = sqlx::query_scalar(COUNT_DEVICES).bind(user).fetch_one(&mut **tx).await?;
    let mut replaced = None;
    if linked >= MAX_DEVICES {
        let keep = keep.map(DeviceId::to_string).unwrap_or_default();
        let oldest: DeviceId =
            sqlx::query_scalar(LEAST_RECENT_DEVICE).bind(user).bind(keep).fetch_one(&mut **tx).await?;
        unlink_device(tx, user, &oldest).await?;
        replaced = Some(oldest);
    }
    let device = DeviceId::new();
    sqlx::query(INSERT_DEVICE).bind(user).bind(device).bind(name).bind(now).execute(&mut **tx).await?;
    Ok(Linked { device, replaced })
}

/// Unlinks a device inside `tx`: its cursors, refresh tokens and link requests go with it.
async fn unlink_device(tx: &mut Transaction<'_, Pg>, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
    let removed = sqlx::query(DELETE_DEVICE).bind(user).bind(device).execute(&mut **tx).await?.rows_affected();
    sqlx::query(DELETE_DEVICE_CURSORS).bind(user).bind(device).execute(&mut **tx).await?;
    sqlx::query(DELETE_DEVICE_TOKENS).bind(user).bind(device).execute(&mut **tx).await?;
    sqlx::query(DELETE_DEVICE_LINKS).bind(user).bind(device).execute(&mut **tx).await?;
    Ok(removed > 0)
}

async fn insert_refresh(conn: &mut PgConnection, token: &NewRefresh<'_>) -> Result<(), StoreError> {
    sqlx::query(INSERT_REFRESH)
        .bind(token.hash)
        .bind(token.user)
        .bind(token.device)
        .bind(token.expires_at_ms)
        .bind(token.now_ms)
        .execute(conn)
        .await?;
    Ok(())
}

/// Which part of `conversation` `user` may read: after where they joined, up to where they left
/// (`None` while a member); [`StoreError::NotMember`] if they were never in it.
async fn span(
    conn: &mut PgConnection,
    conversation: &ConversationId,
    user: &UserId,
) -> Result<(i64, Option<i64>), StoreError> {
    let span: Option<(i64, Option<i64>)> =
        sqlx::query_as(SPAN).bind(conversation).bind(user).fetch_optional(conn).await?;
    span.ok_or(StoreError::NotMember)
}

/// A conversation row with its settings.
#[derive(sqlx::FromRow)]
struct DetailsRow {
    #[sqlx(flatten)]
    conversation: Conversation,
    description: Option<String>,
    avatar: Option<String>,
    info_by_all: bool,
    disappear_secs: i64,
    created_at: i64,
}

/// A conversation, its settings and members, with its kind; `None` if there is none.
async fn details(
    conn: &mut PgConnection,
    conversation: &ConversationId,
) -> Result<Option<(ConversationDetails, ConversationKind)>, StoreError> {
    let row: Option<DetailsRow> = sqlx::query_as(DETAILS).bind(conversation).fetch_optional(&mut *conn).await?;
    let Some(row) = row else { return Ok(None) };
    let rows: Vec<(UserId, String, i64, i64)> = sqlx::query_as(ROSTER).bind(conversation).fetch_all(&mut *conn).await?;
    let members = rows
        .into_iter()
        .map(|(user, role, joined_at, joined_seq)| {
            Ok(Member { user, role: Role::try_from(role).map_err(StoreError::Corrupt)?, joined_at, joined_seq })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let kind = row.conversation.kind;
    let info = GroupInfo {
        name: row.conversation.name.clone(),
        description: row.description,
        avatar: row.avatar,
        info_by_all: row.info_by_all,
    };
    let details = ConversationDetails {
        conversation: row.conversation,
        info,
        disappear_secs: row.disappear_secs,
        created_at: row.created_at,
        members,
    };
    Ok(Some((details, kind)))
}

async fn role(
    conn: &mut PgConnection,
    conversation: &ConversationId,
    user: &UserId,
) -> Result<Option<Role>, StoreError> {
    let role: Option<String> = sqlx::query_scalar(ROLE).bind(conversation).bind(user).fetch_optional(conn).await?;
    role.map(|r| Role::try_from(r).map_err(StoreError::Corrupt)).transpose()
}

/// Adds members who read after `joined_seq` (creating users on first sight); ignores users
/// already in.
async fn insert_members(
    tx: &mut Transaction<'_, Pg>,
    conversation: &ConversationId,
    users: &[(UserId, Role)],
    now: i64,
    joined_seq: i64,
) -> Result<(), StoreError> {
    for (user, role) in users {
        sqlx::query(ENSURE_USER).bind(user).bind(now).execute(&mut **tx).await?;
        sqlx::query(INSERT_MEMBER)
            .bind(conversation)
            .bind(user)
            .bind(role.as_str())
            .bind(now)
            .bind(joined_seq)
            .execute(&mut **tx)
            .await?;
        sqlx::query(INSERT_MEMBERSHIP).bind(user).bind(conversation).bind(joined_seq).execute(&mut **tx).await?;
        sqlx::query(DELETE_DEPARTURE).bind(user).bind(conversation).execute(&mut **tx).await?;
    }
    Ok(())
}

/// Appends inside `tx`. A refusal (not a member, a bad message) writes nothing, and a duplicate
/// gives its seq back, so a batch goes on after either without a savepoint.
async fn append(tx: &mut Transaction<'_, Pg>, write: &NewMessage<'_>) -> Result<Appended, StoreError> {
    let NewMessage { conversation, sender, device, client_id, body, now_ms, effect } = *write;
    check_message(client_id, body)?;
    // Taking the next seq locks the conversation row, and only a member takes one.
    let taken: Option<(i64, i64, i64)> =
        sqlx::query_as(TAKE_SEQ).bind(conversation).bind(sender).bind(now_ms).fetch_optional(&mut **tx).await?;
    let Some((seq, now_ms, disappear_secs)) = taken else { return Err(StoreError::NotMember) };
    let expires_at = expires_at(effect, now_ms, disappear_secs);
    let inserted = sqlx::query(INSERT_MESSAGE)
        .bind(conversation)
        .bind(seq)
        .bind(sender)
        .bind(device)
        .bind(client_id)
        .bind(body)
        .bind(now_ms)
        .bind(expires_at)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if inserted == 0 {
        sqlx::query(GIVE_SEQ_BACK).bind(conversation).execute(&mut **tx).await?;
        let first: Option<Message> = sqlx::query_as(BY_CLIENT_ID)
            .bind(conversation)
            .bind(device)
            .bind(client_id)
            .fetch_optional(&mut **tx)
            .await?;
        return retried(first, body);
    }
    let (expires_at, body) = match apply_effect(tx, conversation, sender, seq, now_ms, effect).await {
        Ok(Outcome { expires_at: inherited, body: written }) => {
            (inherited.or(expires_at), written.unwrap_or_else(|| body.to_owned()))
        }
        Err(e) => {
            // Refused: the message goes, and its seq with it (the transaction still holds the row).
            if !matches!(e, StoreError::Database(_) | StoreError::Corrupt(_)) {
                sqlx::query(DELETE_MESSAGE).bind(conversation).bind(seq).execute(&mut **tx).await?;
                sqlx::query(GIVE_SEQ_BACK).bind(conversation).execute(&mut **tx).await?;
            }
            return Err(e);
        }
    };
    Ok(Appended::New(Message {
        conversation: *conversation,
        seq,
        sender: sender.clone(),
        device: *device,
        client_id: client_id.to_owned(),
        body,
        created_at: now_ms,
        expires_at,
    }))
}

/// Does what the message at `seq` does besides being stored (see [`Effect`]).
async fn apply_effect(
    tx: &mut Transaction<'_, Pg>,
    conversation: &ConversationId,
    actor: &UserId,
    seq: i64,
    now_ms: i64,
    effect: &Effect,
) -> Result<Outcome, StoreError> {
    match effect {
        Effect::Ordinary => Ok(Outcome::default()),
        Effect::Change(change) => {
            // The append that took this seq holds the conversation's row: nothing changes meanwhile.
            let Some((details, kind)) = details(tx, conversation).await? else {
                return Err(StoreError::NotMember);
            };
            let plan = plan_change(change, actor, kind, &details.members, &details.info)?;
            let newcomers: Vec<(UserId, Role)> = plan.add.iter().map(|u| (u.clone(), Role::Member)).collect();
            // They read from this message on.
            insert_members(tx, conversation, &newcomers, now_ms, seq - 1).await?;
            if let Some(user) = &plan.remove {
                let joined = details.members.iter().find(|m| &m.user == user).map_or(0, |m| m.joined_seq);
                sqlx::query(DELETE_MEMBER).bind(conversation).bind(user).execute(&mut **tx).await?;
                sqlx::query(DELETE_MEMBERSHIP).bind(conversation).bind(user).execute(&mut **tx).await?;
                sqlx::query(INSERT_DEPARTURE)
                    .bind(user)
                    .bind(conversation)
                    .bind(joined)
                    .bind(seq)
                    .execute(&mut **tx)
                    .await?;
            }
            for (user, role) in &plan.roles {
                sqlx::query(SET_ROLE).bind(conversation).bind(user).bind(role.as_str()).execute(&mut **tx).await?;
            }
            if let Some(info) = &plan.info {
                sqlx::query(SET_INFO)
                    .bind(conversation)
                    .bind(&info.name)
                    .bind(&info.description)
                    .bind(&info.avatar)
                    .bind(info.info_by_all)
                    .execute(&mut **tx)
                    .await?;
            }
            sqlx::query(EDIT_BODY).bind(conversation).bind(seq).bind(&plan.body).execute(&mut **tx).await?;
            Ok(Outcome { expires_at: None, body: Some(plan.body) })
        }
        Effect::Timer { secs } => {
            let found: Option<(String, String)> =
                sqlx::query_as(KIND_AND_ROLE).bind(conversation).bind(actor).fetch_optional(&mut **tx).await?;
            let found = match found {
                Some((kind, role)) => {
                    let kind = ConversationKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("conversation kind {kind:?}")))?;
                    Some((kind, Role::try_from(role).map_err(StoreError::Corrupt)?))
                }
                None => None,
            };
            may_set_timer(found)?;
            sqlx::query(SET_TIMER).bind(conversation).bind(secs).execute(&mut **tx).await?;
            Ok(Outcome::default())
        }
        Effect::React { to } | Effect::Edit { to, .. } | Effect::Delete { to } => {
            let target = if *to < seq {
                sqlx::query_as::<_, (UserId, String, i64, Option<i64>)>(TARGET)
                    .bind(conversation)
                    .bind(to)
                    .bind(actor)
                    .fetch_optional(&mut **tx)
                    .await?
                    .map(|(sender, body, created_at, expires_at)| Target { sender, body, created_at, expires_at })
            } else {
                None
            };
            let applied = effect_on(effect, actor, target, now_ms)?;
            match (effect, applied.body) {
                (Effect::Delete { .. }, Some(body)) => {
                    sqlx::query(TOMBSTONE).bind(conversation).bind(to).bind(&body).execute(&mut **tx).await?;
                    sqlx::query(TOMBSTONE_EDITS).bind(conversation).bind(to).bind(&body).execute(&mut **tx).await?;
                    sqlx::query(CANCEL_PUSH_INTENT).bind(conversation).bind(to).execute(&mut **tx).await?;
                    if let Some(media) = applied.revoke {
                        sqlx::query(INSERT_REVOCATION)
                            .bind(conversation)
                            .bind(to)
                            .bind(media)
                            .bind(now_ms)
                            .execute(&mut **tx)
                            .await?;
                    }
                }
                (_, Some(body)) => {
                    sqlx::query(EDIT_BODY).bind(conversation).bind(to).bind(body).execute(&mut **tx).await?;
                    sqlx::query(MARK_EDIT)
                        .bind(conversation)
                        .bind(seq)
                        .bind(to)
                        .bind(applied.expires_at)
                        .execute(&mut **tx)
                        .await?;
                }
                (_, None) => {}
            }
            Ok(Outcome { expires_at: applied.expires_at, body: None })
        }
    }
}

/// Moves a device's cursor and the user's receipt inside `tx`; a non-member writes nothing.
async fn move_cursor(
    tx: &mut Transaction<'_, Pg>,
    user: &UserId,
    device: &DeviceId,
    conversation: &ConversationId,
    seq: i64,
    read: bool,
) -> Result<Acked, StoreError> {
    let moved: Option<Cursor> = sqlx::query_as(MOVE_CURSOR)
        .bind(user)
        .bind(device)
        .bind(conversation)
        .bind(seq)
        .bind(if read { seq } else { 0 })
        .fetch_optional(&mut **tx)
        .await?;
    let Some(device) = moved else {
        // One who left acks up to the message of their going.
        let cursor: Option<Cursor> = sqlx::query_as(MOVE_DEPARTED_CURSOR)
            .bind(user)
            .bind(device)
            .bind(conversation)
            .bind(seq)
            .bind(if read { seq } else { 0 })
            .fetch_optional(&mut **tx)
            .await?;
        return match cursor {
            Some(device) => Ok(Acked { device, receipt: None, before: Cursor::default() }),
            None => Err(StoreError::NotMember),
        };
    };
    let before: Option<Cursor> =
        sqlx::query_as(RECEIPT).bind(conversation).bind(user).fetch_optional(&mut **tx).await?;
    let before = before.unwrap_or_default();
    // The user's receipt is the furthest any of their devices got; each column only grows.
    let receipt: Option<(i64, i64, bool)> = sqlx::query_as(MOVE_RECEIPT)
        .bind(conversation)
        .bind(user)
        .bind(device.delivered)
        .bind(device.read)
        .fetch_optional(&mut **tx)
        .await?;
    let receipt = receipt.and_then(|(delivered, read, answered)| answered.then_some(Cursor { delivered, read }));
    Ok(Acked { device, receipt, before })
}
