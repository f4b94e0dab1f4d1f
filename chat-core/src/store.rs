//! The storage interface of chat-core and the values it speaks.

use std::future::Future;

use types::{ConversationId, DeviceId, UserId};

/// Largest group, creator included.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Most devices one user may link.
pub const MAX_DEVICES: i64 = 16;
/// Largest message body (opaque JSON), in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest `client_id`.
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Most messages one history read returns.
pub const MAX_PAGE: i64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationKind {
    Direct,
    Group,
}

impl ConversationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationKind::Direct => "direct",
            ConversationKind::Group => "group",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(ConversationKind::Direct),
            "group" => Some(ConversationKind::Group),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub kind: ConversationKind,
    pub name: Option<String>,
    /// The seq of the newest message, 0 when there is none.
    pub last_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conversation: Conversation,
    /// Messages from others after this device's read cursor.
    pub unread: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub conversation: ConversationId,
    pub seq: i64,
    pub sender: UserId,
    pub device: DeviceId,
    pub client_id: String,
    /// Opaque JSON, as sent.
    pub body: String,
    /// Unix milliseconds, server-assigned.
    pub created_at: i64,
}

/// What an append did. A retried send is not an error: it gets the first result back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    New(Message),
    Duplicate(Message),
}

impl Appended {
    pub fn message(&self) -> &Message {
        match self {
            Appended::New(m) | Appended::Duplicate(m) => m,
        }
    }
}

/// A write that may share a transaction with others (group commit): each one succeeds or fails on
/// its own, and all that succeeded are committed together.
#[derive(Debug, Clone)]
pub enum Write {
    Append {
        conversation: ConversationId,
        sender: UserId,
        device: DeviceId,
        client_id: String,
        body: String,
        now_ms: i64,
    },
    Ack {
        user: UserId,
        device: DeviceId,
        conversation: ConversationId,
        seq: i64,
        read: bool,
    },
}

impl Write {
    /// The conversation whose rows the write locks.
    pub fn conversation(&self) -> ConversationId {
        match self {
            Write::Append { conversation, .. } | Write::Ack { conversation, .. } => *conversation,
        }
    }
}

/// What a [`Write`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Appended(Appended),
    Acked(Acked),
}

/// Where one device stands in one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub delivered: i64,
    pub read: i64,
}

/// What an ack or read did: the device's cursor, and the user's receipt (the highest seq any of
/// their devices reached) when it moved, which the other members are told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub device: Cursor,
    pub receipt: Option<Cursor>,
}

/// Where a device stands in one of its conversations, for replay on connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncState {
    pub conversation: ConversationId,
    pub last_seq: i64,
    /// This device's delivered cursor.
    pub delivered: i64,
    /// Messages up to here were purged by retention.
    pub purged_upto: i64,
}

/// Another member's receipt in a conversation the asking user is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub conversation: ConversationId,
    pub user: UserId,
    pub cursor: Cursor,
}

/// Someone who shares a conversation with the asking user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub user: UserId,
    /// Unix ms when their last device went offline; 0 if never.
    pub last_seen: i64,
}

/// A notification waiting in the push outbox: `user` has unseen messages in `conversation` up to `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPush {
    pub user: UserId,
    pub conversation: ConversationId,
    pub seq: i64,
    pub sender: UserId,
    pub attempts: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversation does not exist or the user is not in it; callers answer 404 either way.
    #[error("no such conversation")]
    NotMember,
    #[error("only admins may do that")]
    NotAdmin,
    #[error("a group holds at most {MAX_GROUP_MEMBERS} members")]
    TooManyMembers,
    #[error("a user may link at most {MAX_DEVICES} devices")]
    TooManyDevices,
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("bad data in the database: {0}")]
    Corrupt(String),
    /// The batch this write was part of could not be committed.
    #[error("committing a batch of writes failed: {0}")]
    Batch(String),
}

/// Storage for chat-core. Every method that reads or writes a conversation checks membership.
/// Runs group-commit batches synchronously; see [`MessageStore::blocking_writer`]. Same contract
/// as [`MessageStore::write_batch`].
pub trait BlockingWriter: Send {
    fn write_batch(&mut self, batch: &[Write]) -> Vec<Result<Written, StoreError>>;
}

pub trait MessageStore: Send + Sync {
    /// Registers a device for `user` (creating the user on first sight), up to [`MAX_DEVICES`].
    fn add_device(&self, user: &UserId, name: &str) -> impl Future<Output = Result<DeviceId, StoreError>> + Send;

    /// The one direct conversation of `a` and `b`, created the first time it is asked for.
    fn direct(&self, a: &UserId, b: &UserId) -> impl Future<Output = Result<Conversation, StoreError>> + Send;

    /// A new group; `creator` is its admin, `members` join as members.
    fn create_group(
        &self,
        creator: &UserId,
        name: &str,
        members: &[UserId],
    ) -> impl Future<Output = Result<Conversation, StoreError>> + Send;

    /// Admins add members to a group.
    fn add_members(
        &self,
        conversation: &ConversationId,
        actor: &UserId,
        users: &[UserId],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Admins remove members from a group; anyone may remove themselves (leave).
    fn remove_member(
        &self,
        conversation: &ConversationId,
        actor: &UserId,
        user: &UserId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The members of a conversation, for one of its members.
    fn members(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> impl Future<Output = Result<Vec<(UserId, Role)>, StoreError>> + Send;

    /// The conversations of `user`, with unread counts for `device`, newest activity first.
    fn conversations(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> impl Future<Output = Result<Vec<ConversationSummary>, StoreError>> + Send;

    /// Appends a message with the conversation's next seq, or returns the one already stored under
    /// the sender's `client_id`.
    fn append(
        &self,
        conversation: &ConversationId,
        sender: &UserId,
        device: &DeviceId,
        client_id: &str,
        body: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// How many group-commit writers this backend profits from: one for SQLite (one writer at a
    /// time anyway), several for a server database where conversations lock apart.
    fn writers(&self) -> usize {
        1
    }

    /// Runs `batch` in one transaction: one commit (one fsync) for all. Each write succeeds or is
    /// refused on its own; a database error fails them all. The results come in the batch's order.
    fn write_batch(&self, batch: &[Write]) -> impl Future<Output = Vec<Result<Written, StoreError>>> + Send;

    /// A writer that runs [`MessageStore::write_batch`]'s work synchronously on a thread of its
    /// own, for an embedded database where each statement handed to an async driver costs a trip
    /// between threads. `None` (the default): batches go through `write_batch`.
    fn blocking_writer(&self) -> Option<Box<dyn BlockingWriter>> {
        None
    }

    /// Up to `limit` messages with seq greater than `after`, in seq order.
    fn messages_after(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        after: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;

    /// Moves this device's delivered cursor forward to `seq` (never back, never past the log), and
    /// the user's delivered receipt with it.
    fn ack(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
    ) -> impl Future<Output = Result<Acked, StoreError>> + Send;

    /// Moves this device's read cursor (and delivered with it) forward to `seq`, and the user's
    /// receipts with them.
    fn mark_read(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
    ) -> impl Future<Output = Result<Acked, StoreError>> + Send;

    /// Whether `device` is one of `user`'s linked devices.
    fn device_exists(&self, user: &UserId, device: &DeviceId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Unlinks a device: its cursors and refresh tokens go with it. False if there was none.
    fn remove_device(&self, user: &UserId, device: &DeviceId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Where `device` stands in each of `user`'s conversations.
    fn sync_state(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> impl Future<Output = Result<Vec<SyncState>, StoreError>> + Send;

    /// Where `device` stands in one conversation; `NotMember` if the user is not in it.
    fn sync_one(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
    ) -> impl Future<Output = Result<SyncState, StoreError>> + Send;

    /// Who is in a conversation, for fan-out inside chat-core (no membership check: callers have
    /// made theirs).
    fn member_ids(&self, conversation: &ConversationId)
    -> impl Future<Output = Result<Vec<UserId>, StoreError>> + Send;

    /// The other members' receipts in `user`'s conversations, where they have any.
    fn receipts(&self, user: &UserId) -> impl Future<Output = Result<Vec<Receipt>, StoreError>> + Send;

    /// Everyone who shares a conversation with `user`.
    fn contacts(&self, user: &UserId) -> impl Future<Output = Result<Vec<Contact>, StoreError>> + Send;

    /// Records when the user's last device went offline.
    fn set_last_seen(&self, user: &UserId, at_ms: i64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Queues (or refreshes) a push for each of `users`: they have a message at `seq`.
    fn queue_pushes(
        &self,
        users: &[UserId],
        conversation: &ConversationId,
        seq: i64,
        sender: &UserId,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` pushes due at `now_ms`, oldest due first.
    fn due_pushes(&self, now_ms: i64, limit: i64) -> impl Future<Output = Result<Vec<PendingPush>, StoreError>> + Send;

    /// A push went out: drops it unless a newer message replaced it meanwhile.
    fn push_done(&self, push: &PendingPush) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A push failed: tries again at `retry_at_ms`, or drops it when `retry_at_ms` is `None`.
    fn push_failed(
        &self,
        push: &PendingPush,
        retry_at_ms: Option<i64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes messages created before `before_ms`; returns how many went.
    fn purge_before(&self, before_ms: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

pub(crate) fn check_message(client_id: &str, body: &str) -> Result<(), StoreError> {
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_LEN {
        return Err(StoreError::Invalid(format!("client_id must be 1 to {MAX_CLIENT_ID_LEN} bytes")));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(StoreError::Invalid(format!("a message body holds at most {MAX_BODY_BYTES} bytes")));
    }
    Ok(())
}

/// What checking a verification code found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeCheck {
    /// Right code, in time: the code is used up.
    Valid,
    Wrong,
    Expired,
    /// Too many wrong guesses: the phone must ask for a new code.
    Locked,
    /// No code was asked for (or it was used).
    Missing,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live: it is spent now and the new one replaces it.
    Rotated { user: UserId, device: DeviceId },
    /// The token had been spent before: someone replayed it, so the device is logged out.
    Reused { user: UserId, device: DeviceId },
    /// Unknown or expired.
    Invalid,
}

/// Most wrong guesses one code takes.
pub const MAX_CODE_ATTEMPTS: i64 = 5;

/// Phone accounts and refresh tokens. Codes and tokens are stored as hashes only.
pub trait AccountStore: Send + Sync {
    /// Stores the pending code of `phone`, replacing any earlier one (and its attempt count).
    fn put_code(
        &self,
        phone: &str,
        code_hash: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counts one attempt against the phone's code and says whether `code_hash` is it.
    fn check_code(
        &self,
        phone: &str,
        code_hash: &str,
        now_ms: i64,
    ) -> impl Future<Output = Result<CodeCheck, StoreError>> + Send;

    /// The user of a phone number, created the first time it is verified.
    fn user_for_phone(&self, phone: &str, now_ms: i64) -> impl Future<Output = Result<UserId, StoreError>> + Send;

    /// The user of a phone number, if it has one.
    fn lookup_phone(&self, phone: &str) -> impl Future<Output = Result<Option<UserId>, StoreError>> + Send;

    /// Stores a new refresh token for a device.
    fn issue_refresh(
        &self,
        token_hash: &str,
        user: &UserId,
        device: &DeviceId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Spends `old_hash` and stores `new_hash` in its place; a second spend logs the device out.
    fn rotate_refresh(
        &self,
        old_hash: &str,
        new_hash: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<Rotation, StoreError>> + Send;
}
