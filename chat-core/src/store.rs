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

/// Where one device stands in one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub delivered: i64,
    pub read: i64,
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
}

/// Storage for chat-core. Every method that reads or writes a conversation checks membership.
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

    /// Up to `limit` messages with seq greater than `after`, in seq order.
    fn messages_after(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        after: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Message>, StoreError>> + Send;

    /// Moves this device's delivered cursor forward to `seq` (never back, never past the log).
    fn ack(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
    ) -> impl Future<Output = Result<Cursor, StoreError>> + Send;

    /// Moves this device's read cursor (and delivered with it) forward to `seq`.
    fn mark_read(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
    ) -> impl Future<Output = Result<Cursor, StoreError>> + Send;
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
