//! chat-core's tables in a SQLite file (rusqlite): the embedded default, one process.
//!
//! Every write runs on one thread that owns the writing connection: group commits and the rarer
//! writes (sign-in, groups, devices) queue for it in order and never wait in SQLite's busy handler,
//! and a batch runs from `BEGIN IMMEDIATE` to `COMMIT` without leaving the thread. Reads run on a
//! small pool of read-only connections beside it (WAL lets them read while it writes), each on a
//! blocking thread, never on the async runtime's. WAL with `synchronous = FULL`: an acknowledged
//! message survives a power cut, not only a crash. The schema is applied by the same sqlx
//! migrations PostgreSQL runs, so a data dir keeps one migration history.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use tokio::sync::{Semaphore, mpsc, oneshot};
use types::{ConversationId, DeviceId, UserId};

use super::{
    Acked, Appended, Bucket, Contact, ContactEntry, Conversation, ConversationDetails, ConversationKind,
    ConversationSummary, Cursor, DeviceInfo, EXPIRED_BODY, Effect, Flags, FlagsEdit, GroupInfo, LastMessage,
    LinkAnswer, LinkState, Linked, ListFrom, MAX_CONTACTS, MAX_DEVICES, MAX_PROFILE_WATCHERS, Member, MemberReceipt,
    Members, Message, NewLinkRequest, NewMessage, NewRefresh, Outcome, PendingCode, Privacy, Profile, ProfileEdit,
    ProfileSeen, PushIntent, PushTarget, Receipt, Role, Rotation, Spend, StoreError, SyncState, Target, Visibility,
    Write, Written, check_message, effect_on, expires_at, link_state, may_set_timer, pair_key, plan_change, retried,
    shared_media,
};

/// Users come into being the first time they are named.
const ENSURE_USER: &str =
    "INSERT INTO chat_users (user_id, created_at) VALUES (?1, ?2) ON CONFLICT (user_id) DO NOTHING";

const COUNT_DEVICES: &str = "SELECT COUNT(*) FROM chat_devices WHERE user_id = ?1";

/// The device to replace when a user links one past the limit: the least recently seen.
/// (Never `?2`: the device whose link request is being approved.)
const LEAST_RECENT_DEVICE: &str = "
    SELECT device_id FROM chat_devices WHERE user_id = ?1 AND device_id <> ?2
     ORDER BY COALESCE(last_seen, created_at), created_at, device_id LIMIT 1";

const DEVICES: &str =
    "SELECT device_id, name, created_at, last_seen FROM chat_devices WHERE user_id = ?1 ORDER BY created_at";

/// Noted at most once a minute per device: a device reconnecting in a loop costs no writes.
const DEVICE_SEEN: &str = "
    UPDATE chat_devices SET last_seen = ?3
     WHERE user_id = ?1 AND device_id = ?2 AND (last_seen IS NULL OR last_seen < ?3 - 60000)";

const PHONE_OF: &str = "SELECT phone FROM chat_phones WHERE user_id = ?1";

const INSERT_DEVICE: &str = "INSERT INTO chat_devices (user_id, device_id, name, created_at) VALUES (?1, ?2, ?3, ?4)";

const CLAIM_PAIR: &str = "
    INSERT INTO chat_direct_pairs (pair_key, conversation_id) VALUES (?1, ?2)
    ON CONFLICT (pair_key) DO NOTHING";

const PAIR: &str = "SELECT conversation_id FROM chat_direct_pairs WHERE pair_key = ?1";

const CONVERSATION: &str =
    "SELECT conversation_id, kind, name, last_seq FROM chat_conversations WHERE conversation_id = ?1";

const INSERT_CONVERSATION: &str = "
    INSERT INTO chat_conversations (conversation_id, kind, name, last_seq, created_at) VALUES (?1, ?2, ?3, 0, ?4)";

/// A member's history starts after `joined_seq` (the seq before the message that added them).
const INSERT_MEMBER: &str = "
    INSERT INTO chat_members (conversation_id, user_id, role, joined_at, joined_seq) VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (conversation_id, user_id) DO NOTHING";

const INSERT_MEMBERSHIP: &str = "
    INSERT INTO chat_memberships (user_id, conversation_id, joined_seq) VALUES (?1, ?2, ?3)
    ON CONFLICT (user_id, conversation_id) DO NOTHING";

/// A member who comes back is no longer one who left.
const DELETE_DEPARTURE: &str = "DELETE FROM chat_departures WHERE user_id = ?1 AND conversation_id = ?2";

/// A member who goes keeps their history up to the message of their going.
const INSERT_DEPARTURE: &str = "
    INSERT INTO chat_departures (user_id, conversation_id, joined_seq, left_seq) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (user_id, conversation_id) DO UPDATE SET joined_seq = excluded.joined_seq, left_seq = excluded.left_seq";

/// Which part of the log a user may read: after where they joined, up to where they left (NULL
/// while they are a member).
const SPAN: &str = "
    SELECT joined_seq, NULL FROM chat_members WHERE conversation_id = ?1 AND user_id = ?2
    UNION ALL
    SELECT joined_seq, left_seq FROM chat_departures WHERE user_id = ?2 AND conversation_id = ?1
    LIMIT 1";

/// The members as a change sees them, longest-standing first.
const ROSTER: &str = "
    SELECT user_id, role, joined_at, joined_seq FROM chat_members WHERE conversation_id = ?1
     ORDER BY joined_seq, joined_at, user_id";

/// A conversation and its settings.
const DETAILS: &str = "
    SELECT conversation_id, kind, name, last_seq, description, avatar, info_by_all, disappear_secs, created_at
      FROM chat_conversations WHERE conversation_id = ?1";

const SET_ROLE: &str = "UPDATE chat_members SET role = ?3 WHERE conversation_id = ?1 AND user_id = ?2";

const SET_INFO: &str = "UPDATE chat_conversations SET name = ?2, description = ?3, avatar = ?4, info_by_all = ?5 WHERE conversation_id = ?1";

const ROLE: &str = "SELECT role FROM chat_members WHERE conversation_id = ?1 AND user_id = ?2";

/// Up to so many members, by id: what a chat list names.
const MEMBER_SAMPLE: &str = "SELECT user_id FROM chat_members WHERE conversation_id = ?1 ORDER BY user_id LIMIT ?2";

const MEMBER_IDS: &str = "SELECT user_id FROM chat_members WHERE conversation_id = ?1";

const MEMBERS: &str = "SELECT user_id, role FROM chat_members WHERE conversation_id = ?1 ORDER BY joined_at, user_id";

const DELETE_MEMBER: &str = "DELETE FROM chat_members WHERE conversation_id = ?1 AND user_id = ?2";

const DELETE_MEMBERSHIP: &str = "DELETE FROM chat_memberships WHERE conversation_id = ?1 AND user_id = ?2";

/// A page of a user's chat list: pinned first, then by last activity, newest first, after the
/// cursor (?3, ?4, ?5) when one is given; with unread counts after the user's read receipt (so
/// reading on one device reads on all), system messages (?2, their device) left out of them.
const CONVERSATIONS: &str = "
    SELECT c.conversation_id, c.kind, c.name, c.last_seq, c.avatar,
           CASE WHEN c.last_seq = 0 THEN c.created_at ELSE c.last_at END AS activity,
           m.muted_until, m.archived, m.pinned,
           (SELECT COUNT(*) FROM chat_members x WHERE x.conversation_id = c.conversation_id) AS member_count,
           (SELECT COUNT(*) FROM chat_messages msg
             WHERE msg.conversation_id = c.conversation_id AND msg.sender_user <> ?1 AND msg.sender_device <> ?2
               AND msg.seq > MAX(me.read_seq, m.joined_seq)) AS unread,
           lm.sender_user AS last_sender, lm.body AS last_body, lm.created_at AS last_created_at
      FROM chat_memberships m
      JOIN chat_conversations c ON c.conversation_id = m.conversation_id
      JOIN chat_members me ON me.conversation_id = m.conversation_id AND me.user_id = m.user_id
      LEFT JOIN chat_messages lm
        ON lm.conversation_id = c.conversation_id AND lm.seq = c.last_seq AND lm.seq > m.joined_seq
     WHERE m.user_id = ?1
       AND (?3 IS NULL OR (m.pinned, CASE WHEN c.last_seq = 0 THEN c.created_at ELSE c.last_at END, c.conversation_id) < (?3, ?4, ?5))
     ORDER BY m.pinned DESC, activity DESC, c.conversation_id DESC
     LIMIT ?6";

const FLAGS: &str =
    "SELECT muted_until, archived, pinned FROM chat_memberships WHERE user_id = ?1 AND conversation_id = ?2";

const SET_FLAGS: &str = "
    UPDATE chat_memberships SET muted_until = ?3, archived = ?4, pinned = ?5
     WHERE user_id = ?1 AND conversation_id = ?2";

/// Takes the conversation's next seq (only a member gets one: no row otherwise) and its time: the node's clock, or the conversation's last time if that is later (times never
/// go backwards in seq order).
const TAKE_SEQ: &str = "
    UPDATE chat_conversations SET last_seq = last_seq + 1, last_at = MAX(last_at, ?3)
     WHERE conversation_id = ?1
       AND EXISTS (SELECT 1 FROM chat_members WHERE conversation_id = ?1 AND user_id = ?2)
    RETURNING last_seq, last_at, disappear_secs";

/// Inserts the message, or nothing when the sending device already sent this client id.
const INSERT_MESSAGE: &str = "
    INSERT INTO chat_messages (conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
    ON CONFLICT (conversation_id, sender_device, client_id) DO NOTHING";

/// Takes back a message whose effect was refused (the seq goes back with [`GIVE_SEQ_BACK`]).
const DELETE_MESSAGE: &str = "DELETE FROM chat_messages WHERE conversation_id = ?1 AND seq = ?2";

/// The message an effect names, if the actor can see it (it is from after they joined).
const TARGET: &str = "
    SELECT sender_user, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = ?1 AND seq = ?2
       AND seq > (SELECT joined_seq FROM chat_members WHERE conversation_id = ?1 AND user_id = ?3)";

/// An edit names the message it edits and goes when that one does.
const MARK_EDIT: &str =
    "UPDATE chat_messages SET edits_seq = ?3, expires_at = ?4 WHERE conversation_id = ?1 AND seq = ?2";

/// A deleted message's edits lose their text too.
const TOMBSTONE_EDITS: &str =
    "UPDATE chat_messages SET body = ?3, expires_at = NULL WHERE conversation_id = ?1 AND edits_seq = ?2";

/// A grant a deleted message gave, to take back.
const INSERT_REVOCATION: &str = "
    INSERT INTO chat_media_revocations (conversation_id, seq, media_id, created_at) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (conversation_id, seq) DO NOTHING";

/// A body rewritten by the server (a media message's `media_info`), only if it is still the one
/// read before.
const REPLACE_BODY: &str = "UPDATE chat_messages SET body = ?4 WHERE conversation_id = ?1 AND seq = ?2 AND body = ?3";

const BODY_OF: &str = "SELECT body FROM chat_messages WHERE conversation_id = ?1 AND seq = ?2";

const DUE_REVOCATIONS: &str =
    "SELECT conversation_id, seq, media_id FROM chat_media_revocations ORDER BY created_at LIMIT ?1";

const DELETE_REVOCATION: &str = "DELETE FROM chat_media_revocations WHERE conversation_id = ?1 AND seq = ?2";

const EDIT_BODY: &str = "UPDATE chat_messages SET body = ?3 WHERE conversation_id = ?1 AND seq = ?2";

/// A tombstone in place of a message: it no longer disappears (there is nothing left).
const TOMBSTONE: &str = "UPDATE chat_messages SET body = ?3, expires_at = NULL WHERE conversation_id = ?1 AND seq = ?2";

/// The conversation's kind and the actor's role in it.
const KIND_AND_ROLE: &str = "
    SELECT c.kind, m.role FROM chat_conversations c
      JOIN chat_members m ON m.conversation_id = c.conversation_id AND m.user_id = ?2
     WHERE c.conversation_id = ?1";

const SET_TIMER: &str = "UPDATE chat_conversations SET disappear_secs = ?2 WHERE conversation_id = ?1";

/// Messages whose timer ran out, oldest first.
const DUE_EXPIRIES: &str = "
    SELECT conversation_id, seq, body FROM chat_messages WHERE expires_at <= ?1
     ORDER BY expires_at, conversation_id, seq LIMIT ?2";

/// A message whose timer ran out keeps a tombstone (unless it was deleted meanwhile).
const EXPIRE: &str = "
    UPDATE chat_messages SET body = ?3, expires_at = NULL
     WHERE conversation_id = ?1 AND seq = ?2 AND expires_at IS NOT NULL";

/// Gives a retry's seq back (the transaction holds the write lock, so it is still the last one).
/// Its time goes back with it (to the message before's), so a refused write does not move the
/// conversation up a chat list.
const GIVE_SEQ_BACK: &str = "
    UPDATE chat_conversations
       SET last_seq = last_seq - 1,
           last_at = COALESCE(
             (SELECT m.created_at FROM chat_messages m
               WHERE m.conversation_id = ?1 AND m.seq = chat_conversations.last_seq - 1),
             last_at)
     WHERE conversation_id = ?1";

/// The first copy of a retried message.
const BY_CLIENT_ID: &str = "
    SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = ?1 AND sender_device = ?2 AND client_id = ?3";

/// Moves a device's cursors, clamped to the log's end; only a member gets a row.
const MOVE_CURSOR: &str = "
    INSERT INTO chat_cursors (user_id, device_id, conversation_id, delivered_seq, read_seq)
    SELECT ?1, ?2, ?3, MIN(MAX(?4, 0), c.last_seq), MIN(MAX(?5, 0), c.last_seq)
      FROM chat_conversations c
      JOIN chat_members m ON m.conversation_id = c.conversation_id AND m.user_id = ?1
     WHERE c.conversation_id = ?3
    ON CONFLICT (user_id, device_id, conversation_id) DO UPDATE SET
      delivered_seq = MAX(excluded.delivered_seq, chat_cursors.delivered_seq),
      read_seq = MAX(excluded.read_seq, chat_cursors.read_seq)
    RETURNING delivered_seq, read_seq";

/// Moves the cursors of a device of a user who left, up to the message of their going (it shares
/// no receipt: they are not a member).
const MOVE_DEPARTED_CURSOR: &str = "
    INSERT INTO chat_cursors (user_id, device_id, conversation_id, delivered_seq, read_seq)
    SELECT ?1, ?2, ?3, MIN(MAX(?4, 0), d.left_seq), MIN(MAX(?5, 0), d.left_seq)
      FROM chat_departures d
     WHERE d.user_id = ?1 AND d.conversation_id = ?3
    ON CONFLICT (user_id, device_id, conversation_id) DO UPDATE SET
      delivered_seq = MAX(excluded.delivered_seq, chat_cursors.delivered_seq),
      read_seq = MAX(excluded.read_seq, chat_cursors.read_seq)
    RETURNING delivered_seq, read_seq";

/// Raises the user's receipt to a device's cursors; a row comes back only when it moved, saying
/// whether the user has answered there (else the receipt is not shared).
const MOVE_RECEIPT: &str = "
    UPDATE chat_members SET delivered_seq = MAX(?3, delivered_seq), read_seq = MAX(?4, read_seq)
     WHERE conversation_id = ?1 AND user_id = ?2 AND (delivered_seq < ?3 OR read_seq < ?4)
    RETURNING delivered_seq, read_seq, answered";

/// The user's receipt before an ack moves it.
const RECEIPT: &str = "SELECT delivered_seq, read_seq FROM chat_members WHERE conversation_id = ?1 AND user_id = ?2";

/// Whom a receipt over a range of messages concerns.
const SENDERS_BETWEEN: &str = "
    SELECT DISTINCT sender_user FROM chat_messages
     WHERE conversation_id = ?1 AND seq > ?2 AND seq <= ?3 AND sender_user <> COALESCE(?4, '')";

/// Every member's receipt and where they joined, for aggregated receipts.
const MEMBER_RECEIPTS: &str =
    "SELECT user_id, delivered_seq, read_seq, joined_seq, answered FROM chat_members WHERE conversation_id = ?1";

/// The sender has answered in the conversation (written once, on their first message).
const MARK_ANSWERED: &str =
    "UPDATE chat_members SET answered = TRUE WHERE conversation_id = ?1 AND user_id = ?2 AND NOT answered";

const MESSAGES_AFTER: &str = "
    SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4";

/// The newest messages before a seq (and after where the member joined), newest first.
const MESSAGES_BEFORE: &str = "
    SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at, expires_at FROM chat_messages
     WHERE conversation_id = ?1 AND seq < ?2 AND seq > ?3 ORDER BY seq DESC LIMIT ?4";

const DEVICE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM chat_devices WHERE user_id = ?1 AND device_id = ?2)";

const DELETE_DEVICE: &str = "DELETE FROM chat_devices WHERE user_id = ?1 AND device_id = ?2";

const DELETE_DEVICE_CURSORS: &str = "DELETE FROM chat_cursors WHERE user_id = ?1 AND device_id = ?2";

const DELETE_DEVICE_TOKENS: &str = "DELETE FROM chat_refresh_tokens WHERE user_id = ?1 AND device_id = ?2";

/// A device that goes takes its link requests with it: nobody can approve them any more.
const DELETE_DEVICE_LINKS: &str = "DELETE FROM chat_link_requests WHERE user_id = ?1 AND requested_by = ?2";

/// Where a device (?2) of a user (?1) stands in their conversations, and in those they left:
/// the log ends at their going for them (a device with no cursor there, linked since, gets only
/// the message of the going). Each part is narrowed by what follows it.
macro_rules! sync_rows {
    ($members:literal, $departed:literal) => {
        concat!(
            "SELECT c.conversation_id, c.last_seq, c.purged_upto,
                    MAX(COALESCE(cu.delivered_seq, 0), m.joined_seq) AS delivered
               FROM chat_memberships m
               JOIN chat_conversations c ON c.conversation_id = m.conversation_id
               LEFT JOIN chat_cursors cu
                 ON cu.user_id = m.user_id AND cu.device_id = ?2 AND cu.conversation_id = m.conversation_id
              WHERE m.user_id = ?1",
            $members,
            " UNION ALL
             SELECT c.conversation_id, d.left_seq, c.purged_upto,
                    MAX(COALESCE(cu.delivered_seq, d.left_seq - 1), d.joined_seq)
               FROM chat_departures d
               JOIN chat_conversations c ON c.conversation_id = d.conversation_id
               LEFT JOIN chat_cursors cu
                 ON cu.user_id = d.user_id AND cu.device_id = ?2 AND cu.conversation_id = d.conversation_id
              WHERE d.user_id = ?1",
            $departed
        )
    };
}

/// Where a device stands in each of a user's conversations, and in those they left whose last
/// message (their going) it has not got yet (unless retention took it).
const SYNC_STATE: &str =
    sync_rows!("", " AND COALESCE(cu.delivered_seq, 0) < d.left_seq AND d.left_seq > c.purged_upto");

/// The same, in one conversation (one left included, whatever the device got).
const SYNC_ONE: &str = sync_rows!(" AND m.conversation_id = ?3", " AND d.conversation_id = ?3");

const RECEIPTS: &str = "
    SELECT o.conversation_id, o.user_id, o.delivered_seq, o.read_seq
      FROM chat_memberships m
      JOIN chat_members o ON o.conversation_id = m.conversation_id
     WHERE m.user_id = ?1 AND o.user_id <> ?1 AND o.delivered_seq > 0 AND o.answered";

/// Whoever `?1` has exchanged messages with both ways in a direct conversation.
macro_rules! answered_both_ways {
    () => {
        "SELECT o.user_id FROM chat_memberships m
           JOIN chat_conversations c ON c.conversation_id = m.conversation_id AND c.kind = 'direct'
           JOIN chat_members me ON me.conversation_id = m.conversation_id AND me.user_id = ?1 AND me.answered
           JOIN chat_members o ON o.conversation_id = m.conversation_id AND o.user_id <> ?1 AND o.answered
          WHERE m.user_id = ?1"
    };
}

const AUDIENCE: &str =
    concat!("SELECT contact_id AS user_id FROM chat_contacts WHERE user_id = ?1 UNION ", answered_both_ways!());

const WATCHED: &str = concat!(
    "SELECT u.user_id, CASE WHEN u.share_last_seen THEN u.last_seen ELSE 0 END AS last_seen FROM chat_users u
      WHERE u.user_id IN (SELECT user_id FROM chat_contacts WHERE contact_id = ?1 UNION ",
    answered_both_ways!(),
    ") LIMIT 5000"
);

const CONTACT_LIST: &str =
    "SELECT contact_id, created_at FROM chat_contacts WHERE user_id = ?1 ORDER BY created_at, contact_id";

const USER_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM chat_users WHERE user_id = ?1)";

const CLEAR_CONTACTS: &str = "DELETE FROM chat_contacts WHERE user_id = ?1";

const INSERT_CONTACT: &str = "
    INSERT INTO chat_contacts (user_id, contact_id, created_at) VALUES (?1, ?2, ?3)
    ON CONFLICT (user_id, contact_id) DO NOTHING";

const COUNT_CONTACTS: &str = "SELECT COUNT(*) FROM chat_contacts WHERE user_id = ?1";

const DELETE_CONTACT: &str = "DELETE FROM chat_contacts WHERE user_id = ?1 AND contact_id = ?2";

/// A user's profile, with whether they have the viewer (?2) as a contact and whether the two
/// share a conversation in which the owner has written (being put in a group earns nobody a name).
const PROFILE_SEEN: &str = "
    SELECT u.user_id, u.profile_name, u.about, u.avatar, u.profile_visibility, u.profile_at,
           EXISTS (SELECT 1 FROM chat_contacts k WHERE k.user_id = u.user_id AND k.contact_id = ?2) AS contact,
           EXISTS (SELECT 1 FROM chat_memberships v
                     JOIN chat_members o ON o.conversation_id = v.conversation_id AND o.user_id = u.user_id
                    WHERE v.user_id = ?2 AND o.answered) AS shared
      FROM chat_users u WHERE u.user_id = ?1";

const SET_PROFILE: &str = "
    UPDATE chat_users SET profile_name = ?2, about = ?3, avatar = ?4, profile_visibility = ?5, profile_at = ?6
     WHERE user_id = ?1";

/// Who may see a user's name (see [`PROFILE_SEEN`]): the members of the conversations they have
/// written in, and their contacts.
const PROFILE_WATCHERS: &str = "
    SELECT o.user_id FROM chat_memberships m
      JOIN chat_members mine ON mine.conversation_id = m.conversation_id AND mine.user_id = m.user_id
      JOIN chat_members o ON o.conversation_id = m.conversation_id
     WHERE m.user_id = ?1 AND mine.answered
    UNION
    SELECT contact_id FROM chat_contacts WHERE user_id = ?1
    LIMIT ?2";

const PRIVACY: &str = "SELECT share_last_seen FROM chat_users WHERE user_id = ?1";

const SET_PRIVACY: &str = "UPDATE chat_users SET share_last_seen = ?2 WHERE user_id = ?1";

const INSERT_LINK_REQUEST: &str = "
    INSERT INTO chat_link_requests (request_id, user_id, requested_by, name, status, expires_at)
    VALUES (?1, ?2, ?3, ?4, 'pending', ?5)";

/// Answers a pending, unexpired request from another device than the one that asked.
const ANSWER_LINK: &str = "
    UPDATE chat_link_requests SET status = ?4
     WHERE request_id = ?1 AND user_id = ?2 AND requested_by <> ?3 AND status = 'pending'
       AND expires_at > ?5
    RETURNING name, requested_by";

const LINK_ASKER: &str = "
    SELECT requested_by FROM chat_link_requests
     WHERE request_id = ?1 AND user_id = ?2 AND status = 'pending' AND expires_at > ?3";

/// (The asking device has the request's lifetime again to collect an approval.)
const SET_LINK_DEVICE: &str =
    "UPDATE chat_link_requests SET device_id = ?2, expires_at = expires_at + 300000 WHERE request_id = ?1";

/// Hands an approved request's device over, once.
const COLLECT_LINK: &str = "
    UPDATE chat_link_requests SET status = 'collected'
     WHERE request_id = ?1 AND user_id = ?2 AND requested_by = ?3 AND status = 'approved'
       AND device_id IS NOT NULL AND expires_at > ?4
    RETURNING device_id";

const LINK_STATUS: &str = "
    SELECT status, expires_at FROM chat_link_requests
     WHERE request_id = ?1 AND user_id = ?2 AND requested_by = ?3";

const SWEEP_LINKS: &str = "DELETE FROM chat_link_requests WHERE expires_at < ?1";

/// GCRA: moves the bucket's full-again time on by one interval, unless that passes the burst.
const TAKE_TOKEN: &str = "
    INSERT INTO chat_rate_limits (bucket, key, tat) VALUES (?1, ?2, ?3 + ?4)
    ON CONFLICT (bucket, key) DO UPDATE SET tat = MAX(tat, ?3) + ?4
     WHERE MAX(tat, ?3) + ?4 - ?3 <= ?5
    RETURNING tat";

const TOKEN_TAT: &str = "SELECT tat FROM chat_rate_limits WHERE bucket = ?1 AND key = ?2";

/// Returns a token taken from a bucket (the request it let through did not go ahead).
const GIVE_BACK: &str = "UPDATE chat_rate_limits SET tat = tat - ?3 WHERE bucket = ?1 AND key = ?2";

const SWEEP_LIMITS: &str = "DELETE FROM chat_rate_limits WHERE tat < ?1";

const SET_LAST_SEEN: &str = "UPDATE chat_users SET last_seen = ?2 WHERE user_id = ?1";

/// A message's push intent, written with it.
const INSERT_PUSH_INTENT: &str = "
    INSERT INTO chat_push_intents (conversation_id, seq, sender_user, created_at, due_at) VALUES (?1, ?2, ?3, ?4, ?5)";

/// Claims due intents for a lease (the single writer: no two claims run at once).
const CLAIM_PUSHES: &str = "
    UPDATE chat_push_intents SET due_at = ?2, attempts = attempts + 1
     WHERE (conversation_id, seq) IN
           (SELECT conversation_id, seq FROM chat_push_intents WHERE due_at <= ?1 ORDER BY due_at LIMIT ?3)
    RETURNING conversation_id, seq, sender_user, created_at, attempts, due_at";

/// The devices of the members at the message's seq, but the sender's, that have not acked it and
/// were linked by the time it was sent.
const PUSH_TARGETS: &str = "
    SELECT d.user_id, d.device_id
      FROM chat_members m
      JOIN chat_devices d ON d.user_id = m.user_id
      LEFT JOIN chat_cursors cu
        ON cu.user_id = d.user_id AND cu.device_id = d.device_id AND cu.conversation_id = m.conversation_id
     WHERE m.conversation_id = ?1 AND m.user_id <> ?2 AND m.joined_seq < ?3 AND d.created_at <= ?4
       AND COALESCE(cu.delivered_seq, 0) < ?3
     ORDER BY d.user_id, d.device_id";

/// Drops an intent this claim still holds.
const DELETE_PUSH_INTENT: &str =
    "DELETE FROM chat_push_intents WHERE conversation_id = ?1 AND seq = ?2 AND due_at = ?3";

/// A deleted message is not pushed.
const CANCEL_PUSH_INTENT: &str = "DELETE FROM chat_push_intents WHERE conversation_id = ?1 AND seq = ?2";

/// Puts off an intent this claim still holds.
const RETRY_PUSH_INTENT: &str =
    "UPDATE chat_push_intents SET due_at = ?4 WHERE conversation_id = ?1 AND seq = ?2 AND due_at = ?3";

const NEXT_PUSH_DUE: &str = "SELECT MIN(due_at) FROM chat_push_intents";

/// Marks how far each conversation with old messages is purged (deleted next, same transaction).
/// Per conversation with messages older than the cutoff, in id order from where the last round
/// stopped: where its purge starts and the horizon it purges to (the newest old message's seq;
/// times never go backwards in seq order, so that is a prefix of the log).
const RETENTION_HORIZONS: &str = "
    SELECT m.conversation_id, MIN(MIN(m.seq) - 1, c.purged_upto), MAX(m.seq)
      FROM chat_messages m JOIN chat_conversations c ON c.conversation_id = m.conversation_id
     WHERE m.created_at < ?1 AND m.conversation_id > ?3
     GROUP BY m.conversation_id, c.purged_upto ORDER BY m.conversation_id LIMIT ?2";

/// One slice of a conversation's purge.
const PURGE_RANGE: &str = "DELETE FROM chat_messages WHERE conversation_id = ?1 AND seq > ?2 AND seq <= ?3";

/// The messages a purge takes that may carry media (their bodies are read to be sure): the grants
/// they gave are taken back as a deletion's are, and the media then lives on only as long as
/// ingest's retention keeps a media nothing references.
const PURGED_MEDIA_BODIES: &str = "
    SELECT seq, body FROM chat_messages
     WHERE conversation_id = ?1 AND seq > ?2 AND seq <= ?3 AND body LIKE '%\"media\"%'";

const MARK_PURGED: &str = "UPDATE chat_conversations SET purged_upto = MAX(purged_upto, ?2) WHERE conversation_id = ?1";

const PUT_CODE: &str = "
    INSERT INTO chat_phone_codes (phone, code_hash, expires_at, attempts, created_at) VALUES (?1, ?2, ?3, 0, ?4)
    ON CONFLICT (phone) DO UPDATE SET code_hash = excluded.code_hash, expires_at = excluded.expires_at,
      attempts = 0, created_at = excluded.created_at";

const COUNT_ATTEMPT: &str = "
    UPDATE chat_phone_codes SET attempts = attempts + 1 WHERE phone = ?1 RETURNING code_hash, expires_at, attempts";

const USE_CODE: &str = "DELETE FROM chat_phone_codes WHERE phone = ?1 AND code_hash = ?2";

const CLAIM_PHONE: &str =
    "INSERT INTO chat_phones (phone, user_id, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (phone) DO NOTHING";

const PHONE_USER: &str = "SELECT user_id FROM chat_phones WHERE phone = ?1";

const INSERT_REFRESH: &str = "
    INSERT INTO chat_refresh_tokens (token_hash, user_id, device_id, expires_at, spent_at, created_at)
    VALUES (?1, ?2, ?3, ?4, NULL, ?5)";

/// Spends a live token for its successor, noting who spent it; no row when it is unknown,
/// expired or spent.
const SPEND_REFRESH: &str = "
    UPDATE chat_refresh_tokens SET spent_at = ?2, spent_by = ?3, replaced_by = ?4
     WHERE token_hash = ?1 AND spent_at IS NULL AND expires_at > ?2
    RETURNING user_id, device_id";

/// A token spent within the grace (?4 ms) by the same client, presented again because the answer
/// carrying its successor was lost: the successor, never used, is spent now, so that presenting it
/// later counts as a copy. No row otherwise.
const TAKE_BACK_SUCCESSOR: &str = "
    UPDATE chat_refresh_tokens SET spent_at = ?2, spent_by = 'taken back'
     WHERE spent_at IS NULL
       AND token_hash = (SELECT replaced_by FROM chat_refresh_tokens
                          WHERE token_hash = ?1 AND spent_at > ?2 - ?4 AND spent_by = ?3
                            AND expires_at > ?2)
    RETURNING user_id, device_id";

const SET_SUCCESSOR: &str = "UPDATE chat_refresh_tokens SET replaced_by = ?2 WHERE token_hash = ?1";

const SPENT_REFRESH: &str =
    "SELECT user_id, device_id FROM chat_refresh_tokens WHERE token_hash = ?1 AND spent_at IS NOT NULL";

/// Unix milliseconds by the database's clock (SQLite 3.40 has no `unixepoch('subsec')`).
macro_rules! db_now_ms {
    () => {
        "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    };
}

const NODE_ALIVE_BEFORE: &str = "SELECT alive_until FROM chat_nodes WHERE node_id = ?1";

const NODE_ALIVE: &str = concat!(
    "INSERT INTO chat_nodes (node_id, alive_until) VALUES (?1, ",
    db_now_ms!(),
    " + ?2)
     ON CONFLICT (node_id) DO UPDATE SET alive_until = excluded.alive_until"
);

const NOW_MS: &str = concat!("SELECT ", db_now_ms!());

const DELETE_NODE: &str = "DELETE FROM chat_nodes WHERE node_id = ?1";

const DELETE_NODE_PRESENCE: &str = "DELETE FROM chat_presence WHERE node_id = ?1";

/// Nodes silent for longer than ?1 ms, removed at once.
const SWEEP_NODES: &str =
    concat!("DELETE FROM chat_nodes WHERE alive_until < ", db_now_ms!(), " - ?1 RETURNING node_id");

const PRESENT: &str = "
    INSERT INTO chat_presence (user_id, node_id) VALUES (?1, ?2) ON CONFLICT (user_id, node_id) DO NOTHING";

const ABSENT: &str = "DELETE FROM chat_presence WHERE user_id = ?1 AND node_id = ?2";

/// One user at a time: SQLite binds no arrays (and a cluster needs PostgreSQL anyway).
const NODES_OF_USER: &str = concat!(
    "SELECT p.node_id FROM chat_presence p JOIN chat_nodes n ON n.node_id = p.node_id
      WHERE p.user_id = ?1 AND n.alive_until >= ",
    db_now_ms!()
);

/// WAL pages before a commit copies them back into the database (SQLite's default is 1,000). The
/// rows every append and ack touch (the conversation's `last_seq`, members, cursors) sit on a few
/// hot pages: checkpointing ten times less often copies them ten times less often.
const WAL_AUTOCHECKPOINT: i64 = 10_000;

/// The writer's page cache, in KiB (SQLite takes a negative cache_size as KiB).
const WRITER_CACHE_KIB: i64 = -64 * 1024;

/// Read connections beside the writer.
const READERS: u32 = 4;

/// Writes waiting for the writer thread before callers wait to queue.
const WRITE_QUEUE: usize = 1024;

/// How long anything waits for a lock or a connection.
const WAIT: Duration = Duration::from_secs(5);

/// A piece of work for the writer thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// chat-core's tables in a SQLite file.
#[derive(Clone)]
pub struct Sqlite {
    writer: mpsc::Sender<Job>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    /// One permit per read connection, taken before a blocking thread is: a burst of reads waits
    /// here, holding no thread.
    reading: Arc<Semaphore>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Sqlite {
    pub(super) async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(WAIT);
        let path = options.get_filename().to_owned();
        // The writer and readers open the file by its path: an in-memory database (which sqlx
        // names `file:sqlx-in-memory-…`) or one with URL settings would not be the one migrated.
        let named = path.to_string_lossy();
        if url.contains('?') || named.is_empty() || named.starts_with("file:") || named.contains(":memory:") {
            return Err(StoreError::Invalid(format!(
                "chat-core's SQLite database must be a file named as sqlite://PATH, without settings: {url}"
            )));
        }
        // Creates the file in WAL mode (which sticks to it) and applies the schema.
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
        let mut migrator = sqlx::migrate!("./migrations");
        // Other crates keep their own migrations in the same database.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await.map_err(sqlx::Error::from)?;
        pool.close().await;

        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Ok::<_, StoreError>((open_writer(&path)?, open_readers(&path)?)))
                .await
                .map_err(|e| StoreError::Database(Box::new(e)))??
        };
        let (writer, readers) = opened;
        Ok(Self {
            writer: spawn_writer(writer),
            readers,
            reading: Arc::new(Semaphore::new(READERS as usize)),
            path: Arc::new(path),
        })
    }

    /// Runs `work` on the writer thread, after the writes queued before it.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // A caller that gave up while this waited (a cancelled request) wants nothing written
            // any more: a refresh token spent for a session nobody receives would log the device
            // out on its next refresh.
            if reply.is_closed() {
                return;
            }
            let _ = reply.send(work(conn));
        });
        self.writer.send(job).await.map_err(|_| StoreError::Batch("the SQLite writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Batch("the write failed on the SQLite writer (see its log)".into()))?
    }

    /// Runs `work` on a read connection, on a blocking thread.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self.reading.clone().acquire_owned().await.map_err(|e| StoreError::Database(Box::new(e)))?;
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = readers.get().map_err(|e| StoreError::Database(Box::new(e)))?;
            work(&conn)
        })
        .await
        .map_err(|e| StoreError::Database(Box::new(e)))?
    }

    pub(super) async fn write_batch(&self, batch: Vec<Write>) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        self.write(move |conn| {
            // One writer: no other transaction can hold a conversation, so the batch runs in order.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut results = Vec::with_capacity(batch.len());
            // The members each appended message goes to, read inside the transaction that took its
            // seq (no membership change can come between them).
            let mut members: HashMap<ConversationId, Members> = HashMap::new();
            let mut answered: std::collections::HashSet<(ConversationId, UserId)> = std::collections::HashSet::new();
            for write in &batch {
                let result = match write {
                    Write::Append { conversation, sender, device, client_id, body, now_ms, push_delay_ms, effect } => {
                        let new = NewMessage { conversation, sender, device, client_id, body, now_ms: *now_ms, effect };
                        append(&tx, &new).and_then(|appended| {
                            if let (Appended::New(message), Some(delay)) = (&appended, push_delay_ms) {
                                let due = message.created_at.saturating_add(*delay);
                                tx.prepare_cached(INSERT_PUSH_INTENT)?.execute(params![
                                    conversation,
                                    message.seq,
                                    sender,
                                    message.created_at,
                                    due
                                ])?;
                            }
                            // A sender's first message marks them as having answered; once a batch. A
                            // system message is not theirs to answer with.
                            let change = matches!(effect, Effect::Change(_));
                            if matches!(appended, Appended::New(_))
                                && !change
                                && answered.insert((*conversation, sender.clone()))
                            {
                                tx.prepare_cached(MARK_ANSWERED)?.execute(params![conversation, sender])?;
                            }
                            if change {
                                members.remove(conversation);
                            }
                            let mut to = match members.get(conversation) {
                                Some(to) => to.clone(),
                                None => {
                                    let to: Members = member_ids(&tx, conversation)?.into();
                                    members.insert(*conversation, to.clone());
                                    to
                                }
                            };
                            if let (Appended::New(_), Some(departing)) = (&appended, write.departing()) {
                                to = to.iter().chain(std::iter::once(departing)).cloned().collect();
                            }
                            Ok(Written::Appended(appended, to))
                        })
                    }
                    Write::Ack { user, device, conversation, seq, read } => {
                        move_cursor(&tx, user, device, conversation, *seq, *read).map(Written::Acked)
                    }
                };
                // Refusals wrote nothing; a database error may have written half: roll it all back.
                if let Err(e @ (StoreError::Database(_) | StoreError::Corrupt(_))) = result {
                    return Err(e);
                }
                results.push(result);
            }
            tx.commit()?;
            Ok(results)
        })
        .await
    }

    pub(super) async fn add_device(&self, user: &UserId, name: &str, now: i64) -> Result<Linked, StoreError> {
        let (user, name) = (user.clone(), name.to_owned());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let linked = link_device(&tx, &user, &name, None, now)?;
            tx.commit()?;
            Ok(linked)
        })
        .await
    }

    pub(super) async fn devices(&self, user: &UserId) -> Result<Vec<DeviceInfo>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(DEVICES)?;
            let rows = statement.query_map(params![user], |r| {
                Ok(DeviceInfo {
                    id: r.get("device_id")?,
                    name: r.get("name")?,
                    created_at: r.get("created_at")?,
                    last_seen: r.get("last_seen")?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn device_seen(&self, user: &UserId, device: &DeviceId, now: i64) -> Result<(), StoreError> {
        let (user, device) = (user.clone(), *device);
        self.write(move |conn| {
            conn.prepare_cached(DEVICE_SEEN)?.execute(params![user, device, now])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn phone_of(&self, user: &UserId) -> Result<Option<String>, StoreError> {
        let user = user.clone();
        self.read(move |conn| Ok(conn.prepare_cached(PHONE_OF)?.query_row(params![user], |r| r.get(0)).optional()?))
            .await
    }

    pub(super) async fn direct(&self, a: &UserId, b: &UserId, now: i64) -> Result<Conversation, StoreError> {
        let (a, b) = (a.clone(), b.clone());
        self.write(move |conn| {
            let key = pair_key(&a, &b);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<ConversationId> =
                tx.prepare_cached(PAIR)?.query_row(params![key], |r| r.get(0)).optional()?;
            if let Some(existing) = existing {
                let found = tx.prepare_cached(CONVERSATION)?.query_row(params![existing], conversation).optional()?;
                return found.ok_or_else(|| StoreError::Corrupt("a direct pair names no conversation".into()));
            }
            let id = ConversationId::new();
            let kind = ConversationKind::Direct;
            tx.prepare_cached(CLAIM_PAIR)?.execute(params![key, id])?;
            tx.prepare_cached(INSERT_CONVERSATION)?.execute(params![id, kind.as_str(), None::<&str>, now])?;
            insert_members(&tx, &id, &[(a, Role::Member), (b, Role::Member)], now, 0)?;
            tx.commit()?;
            Ok(Conversation { id, kind, name: None, last_seq: 0 })
        })
        .await
    }

    pub(super) async fn create_group(
        &self,
        name: &str,
        roster: &[(UserId, Role)],
        now: i64,
    ) -> Result<Conversation, StoreError> {
        let (name, roster) = (name.to_owned(), roster.to_vec());
        self.write(move |conn| {
            let id = ConversationId::new();
            let kind = ConversationKind::Group;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(INSERT_CONVERSATION)?.execute(params![id, kind.as_str(), name, now])?;
            insert_members(&tx, &id, &roster, now, 0)?;
            tx.commit()?;
            Ok(Conversation { id, kind, name: Some(name), last_seq: 0 })
        })
        .await
    }

    pub(super) async fn details(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<Option<ConversationDetails>, StoreError> {
        let (conversation, user) = (*conversation, user.clone());
        self.read(move |conn| {
            if role(conn, &conversation, &user)?.is_none() {
                return Ok(None);
            }
            let Some((details, _)) = details(conn, &conversation)? else { return Ok(None) };
            Ok(Some(details))
        })
        .await
    }

    pub(super) async fn members(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<Vec<(UserId, Role)>, StoreError> {
        let (conversation, user) = (*conversation, user.clone());
        self.read(move |conn| {
            role(conn, &conversation, &user)?.ok_or(StoreError::NotMember)?;
            let mut statement = conn.prepare_cached(MEMBERS)?;
            let rows = statement.query_map(params![conversation], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn conversations(
        &self,
        user: &UserId,
        from: Option<&ListFrom>,
        limit: i64,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let (user, from) = (user.clone(), from.cloned());
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(CONVERSATIONS)?;
            let rows = statement.query_map(
                params![
                    user,
                    DeviceId::SYSTEM,
                    from.as_ref().map(|f| f.pinned),
                    from.as_ref().map(|f| f.activity),
                    from.as_ref().map(|f| f.conversation),
                    limit
                ],
                |r| {
                    Ok(ConversationSummary {
                        conversation: conversation(r)?,
                        unread: r.get("unread")?,
                        avatar: r.get("avatar")?,
                        activity: r.get("activity")?,
                        member_count: r.get("member_count")?,
                        flags: Flags {
                            muted_until: r.get("muted_until")?,
                            archived: r.get("archived")?,
                            pinned: r.get("pinned")?,
                        },
                        last: LastMessage {
                            sender: r.get("last_sender")?,
                            body: r.get("last_body")?,
                            created_at: r.get("last_created_at")?,
                        },
                    })
                },
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn set_flags(
        &self,
        user: &UserId,
        conversation: &ConversationId,
        edit: FlagsEdit,
    ) -> Result<Option<Flags>, StoreError> {
        let (user, conversation) = (user.clone(), *conversation);
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current = tx
                .prepare_cached(FLAGS)?
                .query_row(params![user, conversation], |r| {
                    Ok(Flags { muted_until: r.get(0)?, archived: r.get(1)?, pinned: r.get(2)? })
                })
                .optional()?;
            let Some(current) = current else { return Ok(None) };
            let next = current.edited(edit);
            tx.prepare_cached(SET_FLAGS)?.execute(params![
                user,
                conversation,
                next.muted_until,
                next.archived,
                next.pinned
            ])?;
            tx.commit()?;
            Ok(Some(next))
        })
        .await
    }

    pub(super) async fn messages_after(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Message>, StoreError> {
        let (conversation, user) = (*conversation, user.clone());
        self.read(move |conn| {
            let (joined, left) = span(conn, &conversation, &user)?;
            let mut statement = conn.prepare_cached(MESSAGES_AFTER)?;
            let upto = left.unwrap_or(i64::MAX);
            let rows = statement.query_map(params![conversation, after.max(joined), upto, limit], message)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn messages_before(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        before: i64,
        limit: i64,
    ) -> Result<Vec<Message>, StoreError> {
        let (conversation, user) = (*conversation, user.clone());
        self.read(move |conn| {
            let (joined, left) = span(conn, &conversation, &user)?;
            let before = left.map_or(before, |left| before.min(left + 1));
            let mut statement = conn.prepare_cached(MESSAGES_BEFORE)?;
            let rows = statement.query_map(params![conversation, before, joined, limit], message)?;
            let mut page: Vec<Message> = rows.collect::<Result<_, _>>()?;
            page.reverse();
            Ok(page)
        })
        .await
    }

    pub(super) async fn device_exists(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        let (user, device) = (user.clone(), *device);
        self.read(move |conn| Ok(conn.prepare_cached(DEVICE_EXISTS)?.query_row(params![user, device], |r| r.get(0))?))
            .await
    }

    pub(super) async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        let (user, device) = (user.clone(), *device);
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let removed = unlink_device(&tx, &user, &device)?;
            tx.commit()?;
            Ok(removed)
        })
        .await
    }

    pub(super) async fn sync_state(&self, user: &UserId, device: &DeviceId) -> Result<Vec<SyncState>, StoreError> {
        let (user, device) = (user.clone(), *device);
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(SYNC_STATE)?;
            let rows = statement.query_map(params![user, device], sync_state)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn sync_one(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
    ) -> Result<Option<SyncState>, StoreError> {
        let (user, device, conversation) = (user.clone(), *device, *conversation);
        self.read(move |conn| {
            Ok(conn.prepare_cached(SYNC_ONE)?.query_row(params![user, device, conversation], sync_state).optional()?)
        })
        .await
    }

    pub(super) async fn senders_between(
        &self,
        conversation: &ConversationId,
        after: i64,
        upto: i64,
        except: Option<&UserId>,
    ) -> Result<Vec<UserId>, StoreError> {
        let (conversation, except) = (*conversation, except.cloned());
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(SENDERS_BETWEEN)?;
            let rows = statement.query_map(params![conversation, after, upto, except], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn member_receipts(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<MemberReceipt>, StoreError> {
        let conversation = *conversation;
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(MEMBER_RECEIPTS)?;
            let rows = statement.query_map(params![conversation], |r| {
                Ok(MemberReceipt {
                    user: r.get(0)?,
                    delivered: r.get(1)?,
                    read: r.get(2)?,
                    joined_seq: r.get(3)?,
                    answered: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn member_sample(
        &self,
        conversation: &ConversationId,
        limit: i64,
    ) -> Result<Vec<UserId>, StoreError> {
        let conversation = *conversation;
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(MEMBER_SAMPLE)?;
            let rows = statement.query_map(params![conversation, limit], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn member_ids(&self, conversation: &ConversationId) -> Result<Vec<UserId>, StoreError> {
        let conversation = *conversation;
        self.read(move |conn| member_ids(conn, &conversation)).await
    }

    pub(super) async fn receipts(&self, user: &UserId) -> Result<Vec<Receipt>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(RECEIPTS)?;
            let rows = statement.query_map(params![user], |r| {
                Ok(Receipt { conversation: r.get("conversation_id")?, user: r.get("user_id")?, cursor: cursor(r)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn audience(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(AUDIENCE)?;
            let rows = statement.query_map(params![user], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn watched(&self, user: &UserId) -> Result<Vec<Contact>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(WATCHED)?;
            let rows = statement.query_map(params![user], |r| {
                Ok(Contact { user: r.get("user_id")?, last_seen: r.get("last_seen")? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn contact_list(&self, user: &UserId) -> Result<Vec<ContactEntry>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(CONTACT_LIST)?;
            let rows = statement.query_map(params![user], |r| {
                Ok(ContactEntry { user: r.get("contact_id")?, created_at: r.get("created_at")? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn unknown_users(&self, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        let users = users.to_vec();
        self.read(move |conn| {
            let mut unknown = Vec::new();
            for user in users {
                if !conn.prepare_cached(USER_EXISTS)?.query_row(params![user], |r| r.get::<_, bool>(0))? {
                    unknown.push(user);
                }
            }
            Ok(unknown)
        })
        .await
    }

    pub(super) async fn add_contacts(
        &self,
        user: &UserId,
        contacts: &[UserId],
        replace: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let (user, contacts) = (user.clone(), contacts.to_vec());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut unknown = Vec::new();
            for contact in &contacts {
                if !tx.prepare_cached(USER_EXISTS)?.query_row(params![contact], |r| r.get::<_, bool>(0))? {
                    unknown.push(contact.clone());
                }
            }
            if !unknown.is_empty() {
                return Err(StoreError::UnknownUsers(unknown));
            }
            tx.prepare_cached(ENSURE_USER)?.execute(params![user, now])?;
            if replace {
                tx.prepare_cached(CLEAR_CONTACTS)?.execute(params![user])?;
            }
            for contact in &contacts {
                tx.prepare_cached(INSERT_CONTACT)?.execute(params![user, contact, now])?;
            }
            let count: i64 = tx.prepare_cached(COUNT_CONTACTS)?.query_row(params![user], |r| r.get(0))?;
            if count > MAX_CONTACTS as i64 {
                return Err(StoreError::Invalid(format!("a user keeps at most {MAX_CONTACTS} contacts")));
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn remove_contact(&self, user: &UserId, contact: &UserId) -> Result<bool, StoreError> {
        let (user, contact) = (user.clone(), contact.clone());
        self.write(move |conn| Ok(conn.prepare_cached(DELETE_CONTACT)?.execute(params![user, contact])? > 0)).await
    }

    pub(super) async fn privacy(&self, user: &UserId) -> Result<Privacy, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let share: Option<bool> =
                conn.prepare_cached(PRIVACY)?.query_row(params![user], |r| r.get(0)).optional()?;
            Ok(share.map(|share_last_seen| Privacy { share_last_seen }).unwrap_or_default())
        })
        .await
    }

    pub(super) async fn profile_seen(&self, user: &UserId, viewer: &UserId) -> Result<Option<ProfileSeen>, StoreError> {
        let (user, viewer) = (user.clone(), viewer.clone());
        self.read(move |conn| profile_seen(conn, &user, &viewer)).await
    }

    pub(super) async fn set_profile(&self, user: &UserId, edit: &ProfileEdit, now: i64) -> Result<(), StoreError> {
        let (user, edit) = (user.clone(), edit.clone());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(ENSURE_USER)?.execute(params![user, now])?;
            let current = profile_seen(&tx, &user, &user)?
                .ok_or_else(|| StoreError::Corrupt("a user just ensured is missing".into()))?;
            let next = current.profile.edited(&edit);
            tx.prepare_cached(SET_PROFILE)?.execute(params![
                user,
                next.name,
                next.about,
                next.avatar,
                next.visibility.as_str(),
                now
            ])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn profile_watchers(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        let user = user.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(PROFILE_WATCHERS)?;
            let rows = statement.query_map(params![user, MAX_PROFILE_WATCHERS], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn set_privacy(&self, user: &UserId, privacy: Privacy, now: i64) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(ENSURE_USER)?.execute(params![user, now])?;
            tx.prepare_cached(SET_PRIVACY)?.execute(params![user, privacy.share_last_seen])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn create_link_request(&self, request: &NewLinkRequest<'_>) -> Result<(), StoreError> {
        let (id, user, asker, name) =
            (request.id.to_owned(), request.user.clone(), *request.requested_by, request.name.to_owned());
        let expires_at = request.expires_at_ms;
        self.write(move |conn| {
            conn.prepare_cached(INSERT_LINK_REQUEST)?.execute(params![id, user, asker, name, expires_at])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn answer_link_request(
        &self,
        request_id: &str,
        user: &UserId,
        approver: &DeviceId,
        status: &'static str,
        now: i64,
    ) -> Result<LinkAnswer, StoreError> {
        let (id, user, approver) = (request_id.to_owned(), user.clone(), *approver);
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let answered: Option<(String, DeviceId)> = tx
                .prepare_cached(ANSWER_LINK)?
                .query_row(params![id, user, approver, status, now], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((name, requested_by)) = answered else {
                let asker: Option<DeviceId> =
                    tx.prepare_cached(LINK_ASKER)?.query_row(params![id, user, now], |r| r.get(0)).optional()?;
                return Ok(if asker == Some(approver) { LinkAnswer::OwnRequest } else { LinkAnswer::Unknown });
            };
            let mut linked = None;
            if status == "approved" {
                let device = link_device(&tx, &user, &name, Some(&requested_by), now)?;
                tx.prepare_cached(SET_LINK_DEVICE)?.execute(params![id, device.device])?;
                linked = Some(device);
            }
            tx.commit()?;
            Ok(LinkAnswer::Answered { name, requested_by, linked })
        })
        .await
    }

    pub(super) async fn collect_link(
        &self,
        request_id: &str,
        user: &UserId,
        requested_by: &DeviceId,
        now: i64,
    ) -> Result<LinkState, StoreError> {
        let (id, user, asker) = (request_id.to_owned(), user.clone(), *requested_by);
        self.write(move |conn| {
            let device: Option<DeviceId> =
                conn.prepare_cached(COLLECT_LINK)?.query_row(params![id, user, asker, now], |r| r.get(0)).optional()?;
            if let Some(device) = device {
                return Ok(LinkState::Linked(device));
            }
            let status: Option<(String, i64)> = conn
                .prepare_cached(LINK_STATUS)?
                .query_row(params![id, user, asker], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Ok(link_state(status, now))
        })
        .await
    }

    pub(super) async fn sweep_link_requests(&self, before: i64) -> Result<u64, StoreError> {
        self.write(move |conn| Ok(conn.prepare_cached(SWEEP_LINKS)?.execute(params![before])? as u64)).await
    }

    pub(super) async fn take_token(&self, limit: &Bucket<'_>) -> Result<Option<i64>, StoreError> {
        let (bucket, key) = (limit.bucket.to_owned(), limit.key.to_owned());
        let (every, burst, now) = (limit.every_ms, limit.burst, limit.now_ms);
        let tat = self
            .write(move |conn| {
                let taken: Option<i64> = conn
                    .prepare_cached(TAKE_TOKEN)?
                    .query_row(params![bucket, key, now, every, burst * every], |r| r.get(0))
                    .optional()?;
                if taken.is_some() {
                    return Ok(None);
                }
                // Swept in between: as if full, one interval from now.
                let tat: Option<i64> =
                    conn.prepare_cached(TOKEN_TAT)?.query_row(params![bucket, key], |r| r.get(0)).optional()?;
                Ok(Some(tat.unwrap_or(now + burst * every)))
            })
            .await?;
        Ok(tat.map(|tat| limit.wait_ms(tat)))
    }

    pub(super) async fn token_tat(&self, bucket: &str, key: &str) -> Result<Option<i64>, StoreError> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        self.read(move |conn| {
            Ok(conn.prepare_cached(TOKEN_TAT)?.query_row(params![bucket, key], |r| r.get(0)).optional()?)
        })
        .await
    }

    pub(super) async fn give_back(&self, bucket: &str, key: &str, every: i64) -> Result<(), StoreError> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(GIVE_BACK)?.execute(params![bucket, key, every])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn sweep_limits(&self, now: i64) -> Result<u64, StoreError> {
        self.write(move |conn| Ok(conn.prepare_cached(SWEEP_LIMITS)?.execute(params![now])? as u64)).await
    }

    pub(super) async fn set_last_seen(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |conn| {
            conn.prepare_cached(SET_LAST_SEEN)?.execute(params![user, at_ms])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn claim_pushes(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<PushIntent>, StoreError> {
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(CLAIM_PUSHES)?;
            let rows = statement.query_map(params![now_ms, until_ms, limit], |r| {
                Ok(PushIntent {
                    conversation: r.get("conversation_id")?,
                    seq: r.get("seq")?,
                    sender: r.get("sender_user")?,
                    created_at: r.get("created_at")?,
                    attempts: r.get("attempts")?,
                    lease: r.get("due_at")?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn push_targets(&self, intent: &PushIntent) -> Result<Vec<PushTarget>, StoreError> {
        let intent = intent.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(PUSH_TARGETS)?;
            let rows = statement
                .query_map(params![intent.conversation, intent.sender, intent.seq, intent.created_at], |r| {
                    Ok(PushTarget { user: r.get("user_id")?, device: r.get("device_id")? })
                })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn pushes_done(&self, intents: &[PushIntent]) -> Result<(), StoreError> {
        let keys: Vec<(ConversationId, i64, i64)> = intents.iter().map(|i| (i.conversation, i.seq, i.lease)).collect();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (conversation, seq, lease) in &keys {
                tx.prepare_cached(DELETE_PUSH_INTENT)?.execute(params![conversation, seq, lease])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn retry_pushes(&self, intents: &[PushIntent], retry_at_ms: i64) -> Result<(), StoreError> {
        let keys: Vec<(ConversationId, i64, i64)> = intents.iter().map(|i| (i.conversation, i.seq, i.lease)).collect();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (conversation, seq, lease) in &keys {
                tx.prepare_cached(RETRY_PUSH_INTENT)?.execute(params![conversation, seq, lease, retry_at_ms])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn next_push_due(&self) -> Result<Option<i64>, StoreError> {
        self.read(move |conn| Ok(conn.prepare_cached(NEXT_PUSH_DUE)?.query_row([], |r| r.get(0))?)).await
    }

    pub(super) async fn due_expiries(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(ConversationId, i64, String)>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(DUE_EXPIRIES)?;
            let rows = statement.query_map(params![now_ms, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn expire(
        &self,
        messages: &[(ConversationId, i64, Option<String>)],
        now: i64,
    ) -> Result<(), StoreError> {
        let messages = messages.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (conversation, seq, media) in &messages {
                let expired = tx.prepare_cached(EXPIRE)?.execute(params![conversation, seq, EXPIRED_BODY])?;
                if let (1.., Some(media)) = (expired, media) {
                    tx.prepare_cached(INSERT_REVOCATION)?.execute(params![conversation, seq, media, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn replace_body(
        &self,
        conversation: &ConversationId,
        seq: i64,
        before: &str,
        after: &str,
    ) -> Result<bool, StoreError> {
        let (conversation, before, after) = (*conversation, before.to_owned(), after.to_owned());
        self.write(move |conn| {
            Ok(conn.prepare_cached(REPLACE_BODY)?.execute(params![conversation, seq, before, after])? > 0)
        })
        .await
    }

    pub(super) async fn body_of(&self, conversation: &ConversationId, seq: i64) -> Result<Option<String>, StoreError> {
        let conversation = *conversation;
        self.read(move |conn| {
            Ok(conn.prepare_cached(BODY_OF)?.query_row(params![conversation, seq], |r| r.get(0)).optional()?)
        })
        .await
    }

    pub(super) async fn due_revocations(&self, limit: i64) -> Result<Vec<(ConversationId, i64, String)>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(DUE_REVOCATIONS)?;
            let rows = statement.query_map(params![limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn revoked(&self, messages: &[(ConversationId, i64)]) -> Result<(), StoreError> {
        let messages = messages.to_vec();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (conversation, seq) in &messages {
                tx.prepare_cached(DELETE_REVOCATION)?.execute(params![conversation, seq])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn retention_horizons(
        &self,
        before_ms: i64,
        after: String,
        limit: i64,
    ) -> Result<Vec<(ConversationId, i64, i64)>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(RETENTION_HORIZONS)?;
            let rows =
                statement.query_map(params![before_ms, limit, after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn purge_range(
        &self,
        conversation: &ConversationId,
        after: i64,
        upto: i64,
        now: i64,
    ) -> Result<u64, StoreError> {
        let conversation = *conversation;
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(MARK_PURGED)?.execute(params![conversation, upto])?;
            let bodies: Vec<(i64, String)> = tx
                .prepare_cached(PURGED_MEDIA_BODIES)?
                .query_map(params![conversation, after, upto], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (seq, media) in shared_media(bodies) {
                tx.prepare_cached(INSERT_REVOCATION)?.execute(params![conversation, seq, media, now])?;
            }
            let purged = tx.prepare_cached(PURGE_RANGE)?.execute(params![conversation, after, upto])?;
            tx.commit()?;
            Ok(purged as u64)
        })
        .await
    }

    pub(super) async fn put_code(
        &self,
        phone: &str,
        code_hash: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (phone, code_hash) = (phone.to_owned(), code_hash.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(PUT_CODE)?.execute(params![phone, code_hash, expires_at_ms, now_ms])?;
            Ok(())
        })
        .await
    }

    pub(super) async fn count_attempt(&self, phone: &str) -> Result<Option<PendingCode>, StoreError> {
        let phone = phone.to_owned();
        self.write(move |conn| {
            let code = conn
                .prepare_cached(COUNT_ATTEMPT)?
                .query_row(params![phone], |r| {
                    Ok(PendingCode { code_hash: r.get(0)?, expires_at: r.get(1)?, attempts: r.get(2)? })
                })
                .optional()?;
            Ok(code)
        })
        .await
    }

    pub(super) async fn use_code(&self, phone: &str, code_hash: &str) -> Result<bool, StoreError> {
        let (phone, code_hash) = (phone.to_owned(), code_hash.to_owned());
        self.write(move |conn| Ok(conn.prepare_cached(USE_CODE)?.execute(params![phone, code_hash])? > 0)).await
    }

    pub(super) async fn user_for_phone(&self, phone: &str, fresh: &UserId, now_ms: i64) -> Result<UserId, StoreError> {
        let (phone, fresh) = (phone.to_owned(), fresh.clone());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(CLAIM_PHONE)?.execute(params![phone, fresh, now_ms])?;
            let user: UserId = tx.prepare_cached(PHONE_USER)?.query_row(params![phone], |r| r.get(0))?;
            tx.prepare_cached(ENSURE_USER)?.execute(params![user, now_ms])?;
            tx.commit()?;
            Ok(user)
        })
        .await
    }

    pub(super) async fn lookup_phones(&self, phones: &[String]) -> Result<Vec<(String, UserId)>, StoreError> {
        let phones = phones.to_vec();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(PHONE_USER)?;
            let mut found = Vec::new();
            for phone in phones {
                if let Some(user) = statement.query_row(params![phone], |r| r.get(0)).optional()? {
                    found.push((phone, user));
                }
            }
            Ok(found)
        })
        .await
    }

    pub(super) async fn lookup_phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        let phone = phone.to_owned();
        self.read(move |conn| {
            Ok(conn.prepare_cached(PHONE_USER)?.query_row(params![phone], |r| r.get(0)).optional()?)
        })
        .await
    }

    pub(super) async fn issue_refresh(&self, token: &NewRefresh<'_>) -> Result<(), StoreError> {
        let (hash, user, device) = (token.hash.to_owned(), token.user.clone(), *token.device);
        let (expires_at_ms, now_ms) = (token.expires_at_ms, token.now_ms);
        self.write(move |conn| {
            conn.prepare_cached(INSERT_REFRESH)?.execute(params![hash, user, device, expires_at_ms, now_ms])?;
            Ok(())
        })
        .await
    }

    /// Spends `old_hash` for `new_hash`; a spent token comes back as `Reused` (the caller logs its
    /// device out).
    pub(super) async fn rotate_refresh(&self, spend: &Spend<'_>) -> Result<Rotation, StoreError> {
        let Spend { old_hash, new_hash, client, grace_ms, expires_at_ms, now_ms } = *spend;
        let (old_hash, new_hash, client) = (old_hash.to_owned(), new_hash.to_owned(), client.to_owned());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let pair = |r: &Row<'_>| Ok((r.get::<_, UserId>(0)?, r.get::<_, DeviceId>(1)?));
            let spent = tx
                .prepare_cached(SPEND_REFRESH)?
                .query_row(params![old_hash, now_ms, client, new_hash], pair)
                .optional()?;
            let retried = match spent {
                Some(_) => None,
                None => tx
                    .prepare_cached(TAKE_BACK_SUCCESSOR)?
                    .query_row(params![old_hash, now_ms, client, grace_ms], pair)
                    .optional()?,
            };
            let was_retry = retried.is_some();
            if let Some((user, device)) = spent.or(retried) {
                if was_retry {
                    tx.prepare_cached(SET_SUCCESSOR)?.execute(params![old_hash, new_hash])?;
                }
                tx.prepare_cached(INSERT_REFRESH)?.execute(params![new_hash, user, device, expires_at_ms, now_ms])?;
                tx.commit()?;
                return Ok(Rotation::Rotated { user, device });
            }
            let reused = tx.prepare_cached(SPENT_REFRESH)?.query_row(params![old_hash], pair).optional()?;
            Ok(match reused {
                Some((user, device)) => Rotation::Reused { user, device },
                None => Rotation::Invalid,
            })
        })
        .await
    }
}

impl Sqlite {
    pub(super) async fn node_alive(&self, node: &str, for_ms: i64) -> Result<bool, StoreError> {
        let node = node.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let before: Option<i64> =
                tx.prepare_cached(NODE_ALIVE_BEFORE)?.query_row(params![node], |r| r.get(0)).optional()?;
            let now: i64 = tx.prepare_cached(NOW_MS)?.query_row([], |r| r.get(0))?;
            tx.prepare_cached(NODE_ALIVE)?.execute(params![node, for_ms])?;
            tx.commit()?;
            Ok(before.unwrap_or(0) < now)
        })
        .await
    }

    pub(super) async fn node_gone(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(DELETE_NODE_PRESENCE)?.execute(params![node])?;
            tx.prepare_cached(DELETE_NODE)?.execute(params![node])?;
            Ok(tx.commit()?)
        })
        .await
    }

    pub(super) async fn sweep_nodes(&self, silent_ms: i64) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let gone: Vec<String> = {
                let mut statement = tx.prepare_cached(SWEEP_NODES)?;
                let rows = statement.query_map(params![silent_ms], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            for node in &gone {
                tx.prepare_cached(DELETE_NODE_PRESENCE)?.execute(params![node])?;
            }
            tx.commit()?;
            Ok(gone.len() as u64)
        })
        .await
    }

    pub(super) async fn present(&self, user: &UserId, node: &str) -> Result<(), StoreError> {
        let (user, node) = (user.clone(), node.to_owned());
        self.write(move |conn| Ok(conn.prepare_cached(PRESENT)?.execute(params![user, node]).map(drop)?)).await
    }

    pub(super) async fn absent(&self, user: &UserId, node: &str) -> Result<(), StoreError> {
        let (user, node) = (user.clone(), node.to_owned());
        self.write(move |conn| Ok(conn.prepare_cached(ABSENT)?.execute(params![user, node]).map(drop)?)).await
    }

    pub(super) async fn nodes_of(&self, users: &[UserId]) -> Result<Vec<(UserId, String)>, StoreError> {
        let users = users.to_vec();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(NODES_OF_USER)?;
            let mut found = Vec::new();
            for user in users {
                let nodes = statement.query_map(params![user], |r| r.get::<_, String>(0))?;
                for node in nodes {
                    found.push((user.clone(), node?));
                }
            }
            Ok(found)
        })
        .await
    }
}

/// The writing connection: WAL (already set on the file), `synchronous = FULL` (per connection).
/// It checks that the schema is there, so a file other than the one migrated is refused now.
fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT)?;
    // Appends land at random places in the message indexes (conversation ids are random): a page
    // cache of SQLite's default 2 MiB misses on most of them and reads the page back from the file.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.busy_timeout(WAIT)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.prepare("SELECT 1 FROM chat_conversations LIMIT 0")?;
    Ok(conn)
}

/// The read-only connections, opened on a blocking thread (the pool opens its first at once).
fn open_readers(path: &Path) -> Result<r2d2::Pool<SqliteConnectionManager>, StoreError> {
    r2d2::Pool::builder()
        .max_size(READERS)
        .min_idle(Some(1))
        .connection_timeout(WAIT)
        // A checkout runs no query of its own: a broken connection fails its statement.
        .test_on_check_out(false)
        .build(SqliteConnectionManager::file(path).with_init(|conn| {
            conn.busy_timeout(WAIT)?;
            conn.pragma_update(None, "query_only", true)?;
            conn.set_prepared_statement_cache_capacity(32);
            Ok(())
        }))
        .map_err(|e| StoreError::Database(Box::new(e)))
}

/// Starts the writer thread; it ends when every sender is gone. A job that panics (a bug) fails
/// only its own caller: whatever transaction it left open is rolled back and the thread goes on.
fn spawn_writer(mut conn: Connection) -> mpsc::Sender<Job> {
    let (jobs, mut queue) = mpsc::channel::<Job>(WRITE_QUEUE);
    std::thread::Builder::new()
        .name("chat-sqlite-writer".into())
        .spawn(move || {
            while let Some(job) = queue.blocking_recv() {
                if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
                    tracing::error!("a chat-core write panicked; its caller was told it failed");
                    if !conn.is_autocommit() {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                }
            }
        })
        .expect("spawning the chat-core SQLite writer thread");
    jobs
}

impl FromSql for ConversationKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        ConversationKind::parse(value.as_str()?).ok_or_else(|| FromSqlError::Other("bad conversation kind".into()))
    }
}

impl FromSql for Role {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Role::try_from(value.as_str()?.to_owned()).map_err(|e| FromSqlError::Other(e.into()))
    }
}

fn conversation(r: &Row<'_>) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: r.get("conversation_id")?,
        kind: r.get("kind")?,
        name: r.get("name")?,
        last_seq: r.get("last_seq")?,
    })
}

fn message(r: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        conversation: r.get("conversation_id")?,
        seq: r.get("seq")?,
        sender: r.get("sender_user")?,
        device: r.get("sender_device")?,
        client_id: r.get("client_id")?,
        body: r.get("body")?,
        created_at: r.get("created_at")?,
        expires_at: r.get("expires_at")?,
    })
}

fn cursor(r: &Row<'_>) -> rusqlite::Result<Cursor> {
    Ok(Cursor { delivered: r.get("delivered_seq")?, read: r.get("read_seq")? })
}

fn sync_state(r: &Row<'_>) -> rusqlite::Result<SyncState> {
    Ok(SyncState {
        conversation: r.get("conversation_id")?,
        last_seq: r.get("last_seq")?,
        delivered: r.get("delivered")?,
        purged_upto: r.get("purged_upto")?,
    })
}

/// Which part of `conversation` `user` may read: after where they joined, up to where they left
/// (`None` while a member); [`StoreError::NotMember`] if they were never in it.
fn span(conn: &Connection, conversation: &ConversationId, user: &UserId) -> Result<(i64, Option<i64>), StoreError> {
    let span =
        conn.prepare_cached(SPAN)?.query_row(params![conversation, user], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
    span.ok_or(StoreError::NotMember)
}

/// A user's profile as [`PROFILE_SEEN`] reads it for `viewer`.
fn profile_seen(conn: &Connection, user: &UserId, viewer: &UserId) -> Result<Option<ProfileSeen>, StoreError> {
    let found = conn
        .prepare_cached(PROFILE_SEEN)?
        .query_row(params![user, viewer], |r| {
            let visibility: String = r.get("profile_visibility")?;
            let profile = Profile {
                user: r.get("user_id")?,
                name: r.get("profile_name")?,
                about: r.get("about")?,
                avatar: r.get("avatar")?,
                visibility: Visibility::parse(&visibility).unwrap_or_default(),
                updated_at: r.get("profile_at")?,
            };
            Ok(ProfileSeen { profile, contact: r.get("contact")?, shared: r.get("shared")? })
        })
        .optional()?;
    Ok(found)
}

/// A conversation, its settings and members, with its kind; `None` if there is none.
fn details(
    conn: &Connection,
    conversation: &ConversationId,
) -> Result<Option<(ConversationDetails, ConversationKind)>, StoreError> {
    let found = conn
        .prepare_cached(DETAILS)?
        .query_row(params![conversation], |r| {
            let info = GroupInfo {
                name: r.get("name")?,
                description: r.get("description")?,
                avatar: r.get("avatar")?,
                info_by_all: r.get("info_by_all")?,
            };
            Ok((self::conversation(r)?, info, r.get("disappear_secs")?, r.get("created_at")?))
        })
        .optional()?;
    let Some((conversation, info, disappear_secs, created_at)) = found else { return Ok(None) };
    let mut statement = conn.prepare_cached(ROSTER)?;
    let rows = statement.query_map(params![conversation.id], |r| {
        Ok(Member { user: r.get(0)?, role: r.get(1)?, joined_at: r.get(2)?, joined_seq: r.get(3)? })
    })?;
    let members = rows.collect::<Result<_, _>>()?;
    let kind = conversation.kind;
    Ok(Some((ConversationDetails { conversation, info, disappear_secs, created_at, members }, kind)))
}

fn role(conn: &Connection, conversation: &ConversationId, user: &UserId) -> Result<Option<Role>, StoreError> {
    Ok(conn.prepare_cached(ROLE)?.query_row(params![conversation, user], |r| r.get(0)).optional()?)
}

fn member_ids(conn: &Connection, conversation: &ConversationId) -> Result<Vec<UserId>, StoreError> {
    let mut statement = conn.prepare_cached(MEMBER_IDS)?;
    let rows = statement.query_map(params![conversation], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Links a new device of `user` inside `tx` (creating the user on first sight); past
/// [`MAX_DEVICES`] the least recently seen one is unlinked.
fn link_device(
    tx: &Transaction<'_>,
    user: &UserId,
    name: &str,
    keep: Option<&DeviceId>,
    now: i64,
) -> Result<Linked, StoreError> {
    tx.prepare_cached(ENSURE_USER)?.execute(params![user, now])?;
    let linked: i64 = tx.prepare_cached(COUNT_DEVICES)?.query_row(params![user], |r| r.get(0))?;
    let mut replaced = None;
    if linked >= MAX_DEVICES {
        let keep = keep.map(DeviceId::to_string).unwrap_or_default();
        let oldest: DeviceId = tx.prepare_cached(LEAST_RECENT_DEVICE)?.query_row(params![user, keep], |r| r.get(0))?;
        unlink_device(tx, user, &oldest)?;
        replaced = Some(oldest);
    }
    let device = DeviceId::new();
    tx.prepare_cached(INSERT_DEVICE)?.execute(params![user, device, name, now])?;
    Ok(Linked { device, replaced })
}

/// Unlinks a device inside `tx`: its cursors, refresh tokens and link requests go with it.
fn unlink_device(tx: &Transaction<'_>, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
    let removed = tx.prepare_cached(DELETE_DEVICE)?.execute(params![user, device])?;
    tx.prepare_cached(DELETE_DEVICE_CURSORS)?.execute(params![user, device])?;
    tx.prepare_cached(DELETE_DEVICE_TOKENS)?.execute(params![user, device])?;
    tx.prepare_cached(DELETE_DEVICE_LINKS)?.execute(params![user, device])?;
    Ok(removed > 0)
}

/// Adds members who read after `joined_seq` (creating users on first sight); ignores users
/// already in.
fn insert_members(
    tx: &Transaction<'_>,
    conversation: &ConversationId,
    users: &[(UserId, Role)],
    now: i64,
    joined_seq: i64,
) -> Result<(), StoreError> {
    for (user, role) in users {
        tx.prepare_cached(ENSURE_USER)?.execute(params![user, now])?;
        tx.prepare_cached(INSERT_MEMBER)?.execute(params![conversation, user, role.as_str(), now, joined_seq])?;
        tx.prepare_cached(INSERT_MEMBERSHIP)?.execute(params![user, conversation, joined_seq])?;
        tx.prepare_cached(DELETE_DEPARTURE)?.execute(params![user, conversation])?;
    }
    Ok(())
}

/// Appends inside `tx`. A refusal (not a member, a bad message) writes nothing, and a duplicate
/// gives its seq back, so a batch goes on after either without a savepoint.
fn append(tx: &Transaction<'_>, write: &NewMessage<'_>) -> Result<Appended, StoreError> {
    let NewMessage { conversation, sender, device, client_id, body, now_ms, effect } = *write;
    check_message(client_id, body)?;
    let taken: Option<(i64, i64, i64)> = tx
        .prepare_cached(TAKE_SEQ)?
        .query_row(params![conversation, sender, now_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((seq, now_ms, disappear_secs)) = taken else { return Err(StoreError::NotMember) };
    let expires_at = expires_at(effect, now_ms, disappear_secs);
    let inserted = tx.prepare_cached(INSERT_MESSAGE)?.execute(params![
        conversation,
        seq,
        sender,
        device,
        client_id,
        body,
        now_ms,
        expires_at
    ])?;
    if inserted == 0 {
        tx.prepare_cached(GIVE_SEQ_BACK)?.execute(params![conversation])?;
        let first =
            tx.prepare_cached(BY_CLIENT_ID)?.query_row(params![conversation, device, client_id], message).optional()?;
        return retried(first, body);
    }
    let (expires_at, body) = match apply_effect(tx, conversation, sender, seq, now_ms, effect) {
        Ok(Outcome { expires_at: inherited, body: written }) => {
            (inherited.or(expires_at), written.unwrap_or_else(|| body.to_owned()))
        }
        Err(e) => {
            // Refused: the message goes, and its seq with it (the writer still holds the lock).
            if !matches!(e, StoreError::Database(_) | StoreError::Corrupt(_)) {
                tx.prepare_cached(DELETE_MESSAGE)?.execute(params![conversation, seq])?;
                tx.prepare_cached(GIVE_SEQ_BACK)?.execute(params![conversation])?;
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
fn apply_effect(
    tx: &Transaction<'_>,
    conversation: &ConversationId,
    actor: &UserId,
    seq: i64,
    now_ms: i64,
    effect: &Effect,
) -> Result<Outcome, StoreError> {
    match effect {
        Effect::Ordinary => Ok(Outcome::default()),
        Effect::Change(change) => {
            let Some((details, kind)) = details(tx, conversation)? else { return Err(StoreError::NotMember) };
            let plan = plan_change(change, actor, kind, &details.members, &details.info)?;
            let newcomers: Vec<(UserId, Role)> = plan.add.iter().map(|u| (u.clone(), Role::Member)).collect();
            // They read from this message on.
            insert_members(tx, conversation, &newcomers, now_ms, seq - 1)?;
            if let Some(user) = &plan.remove {
                let joined = details.members.iter().find(|m| &m.user == user).map_or(0, |m| m.joined_seq);
                tx.prepare_cached(DELETE_MEMBER)?.execute(params![conversation, user])?;
                tx.prepare_cached(DELETE_MEMBERSHIP)?.execute(params![conversation, user])?;
                tx.prepare_cached(INSERT_DEPARTURE)?.execute(params![user, conversation, joined, seq])?;
            }
            for (user, role) in &plan.roles {
                tx.prepare_cached(SET_ROLE)?.execute(params![conversation, user, role.as_str()])?;
            }
            if let Some(info) = &plan.info {
                tx.prepare_cached(SET_INFO)?.execute(params![
                    conversation,
                    info.name,
                    info.description,
                    info.avatar,
                    info.info_by_all
                ])?;
            }
            tx.prepare_cached(EDIT_BODY)?.execute(params![conversation, seq, plan.body])?;
            Ok(Outcome { expires_at: None, body: Some(plan.body) })
        }
        Effect::Timer { secs } => {
            let found: Option<(ConversationKind, Role)> = tx
                .prepare_cached(KIND_AND_ROLE)?
                .query_row(params![conversation, actor], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            may_set_timer(found)?;
            tx.prepare_cached(SET_TIMER)?.execute(params![conversation, secs])?;
            Ok(Outcome::default())
        }
        Effect::React { to } | Effect::Edit { to, .. } | Effect::Delete { to } => {
            let target = if *to < seq {
                tx.prepare_cached(TARGET)?
                    .query_row(params![conversation, to, actor], |r| {
                        Ok(Target { sender: r.get(0)?, body: r.get(1)?, created_at: r.get(2)?, expires_at: r.get(3)? })
                    })
                    .optional()?
            } else {
                None
            };
            let applied = effect_on(effect, actor, target, now_ms)?;
            match (effect, applied.body) {
                (Effect::Delete { .. }, Some(body)) => {
                    tx.prepare_cached(TOMBSTONE)?.execute(params![conversation, to, body])?;
                    tx.prepare_cached(TOMBSTONE_EDITS)?.execute(params![conversation, to, body])?;
                    tx.prepare_cached(CANCEL_PUSH_INTENT)?.execute(params![conversation, to])?;
                    if let Some(media) = applied.revoke {
                        tx.prepare_cached(INSERT_REVOCATION)?.execute(params![conversation, to, media, now_ms])?;
                    }
                }
                (_, Some(body)) => {
                    tx.prepare_cached(EDIT_BODY)?.execute(params![conversation, to, body])?;
                    tx.prepare_cached(MARK_EDIT)?.execute(params![conversation, seq, to, applied.expires_at])?;
                }
                (_, None) => {}
            }
            Ok(Outcome { expires_at: applied.expires_at, body: None })
        }
    }
}

/// Moves a device's cursor and the user's receipt inside `tx`; a non-member writes nothing.
fn move_cursor(
    tx: &Transaction<'_>,
    user: &UserId,
    device: &DeviceId,
    conversation: &ConversationId,
    seq: i64,
    read: bool,
) -> Result<Acked, StoreError> {
    let moved = tx
        .prepare_cached(MOVE_CURSOR)?
        .query_row(params![user, device, conversation, seq, if read { seq } else { 0 }], cursor)
        .optional()?;
    let Some(device) = moved else {
        // One who left acks up to the message of their going.
        let cursor = tx
            .prepare_cached(MOVE_DEPARTED_CURSOR)?
            .query_row(params![user, device, conversation, seq, if read { seq } else { 0 }], cursor)
            .optional()?;
        return match cursor {
            Some(device) => Ok(Acked { device, receipt: None, before: Cursor::default() }),
            None => Err(StoreError::NotMember),
        };
    };
    let before =
        tx.prepare_cached(RECEIPT)?.query_row(params![conversation, user], cursor).optional()?.unwrap_or_default();
    // The user's receipt is the furthest any of their devices got; each column only grows.
    let receipt = tx
        .prepare_cached(MOVE_RECEIPT)?
        .query_row(params![conversation, user, device.delivered, device.read], |r| {
            Ok((cursor(r)?, r.get::<_, bool>("answered")?))
        })
        .optional()?;
    Ok(Acked { device, receipt: receipt.and_then(|(receipt, answered)| answered.then_some(receipt)), before })
}
