//! chat-core's tables on SQLite (the embedded default) or PostgreSQL (shared by many nodes), and
//! the values they hold.
//!
//! Each engine is a plain module with one `const` per statement, written for that engine:
//! [`postgres`] on sqlx, [`sqlite`] on rusqlite (one writer thread that runs every write, and
//! reader connections beside it under WAL). [`Store`] picks one by the database URL and passes
//! each call through; both are held to one conformance suite (`tests/conformance.rs`). Appends and
//! acks go through one entry point, [`Store::write_batch`] (a group commit), so a lone append is a
//! batch of one. Ids are bound and read as their own types (the `types` crate's column codecs).
//!
//! Room for what comes next: per-device end-to-end envelopes are a table keyed by
//! (conversation_id, seq, recipient device) beside `chat_messages`, written by a third [`Write`]
//! kind inside the same batch as the append that takes the seq.

mod postgres;
mod sqlite;

use types::{ConversationId, DeviceId, UserId};

/// Largest group, creator included.
pub const MAX_GROUP_MEMBERS: usize = 1024;
/// Most devices one user may link.
pub const MAX_DEVICES: i64 = 16;
/// Largest message body (opaque JSON) a client sends, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest body the store keeps: a client's, with what the server adds to a media message
/// (`media_info`: sizes, waveform, preview, signed URLs) on top.
pub const MAX_STORED_BODY_BYTES: usize = MAX_BODY_BYTES + 16 * 1024;
/// Longest `client_id`.
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Most messages one retention transaction deletes.
pub const PURGE_SLICE: i64 = 500;
/// Conversations one retention round looks at.
const PURGE_CONVERSATIONS: i64 = 256;
/// Most messages one history read returns.
pub const MAX_PAGE: i64 = 500;
/// Most bytes of bodies one history read returns (it always returns at least one message): 500
/// full-size bodies would be 32 MiB held for one request.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

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

impl TryFrom<String> for ConversationKind {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("bad conversation kind {s:?}"))
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

impl TryFrom<String> for Role {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "admin" => Ok(Role::Admin),
            "member" => Ok(Role::Member),
            _ => Err(format!("bad role {s:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Conversation {
    #[sqlx(rename = "conversation_id")]
    pub id: ConversationId,
    #[sqlx(try_from = "String")]
    pub kind: ConversationKind,
    pub name: Option<String>,
    /// The seq of the newest message, 0 when there is none.
    pub last_seq: i64,
}

/// A conversation with everything a member sees about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationDetails {
    pub conversation: Conversation,
    pub info: GroupInfo,
    /// The disappearing timer, in seconds (0: off).
    pub disappear_secs: i64,
    /// Unix ms.
    pub created_at: i64,
    /// Longest-standing first.
    pub members: Vec<Member>,
}

/// A conversation as a user's chat list shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ConversationSummary {
    #[sqlx(flatten)]
    pub conversation: Conversation,
    /// Messages from others (not system messages) after this device's read cursor.
    pub unread: i64,
    /// A group's avatar (a media id).
    pub avatar: Option<String>,
    /// When something last happened: the newest message's time, or the conversation's creation.
    pub activity: i64,
    pub member_count: i64,
    #[sqlx(flatten)]
    pub flags: Flags,
    /// The newest message, if this user may see it (it is from after they joined).
    #[sqlx(flatten)]
    pub last: LastMessage,
}

/// The newest message of a conversation, as a chat list previews it (all `None` when there is
/// none the user may see).
#[derive(Debug, Clone, PartialEq, Eq, Default, sqlx::FromRow)]
pub struct LastMessage {
    #[sqlx(rename = "last_sender")]
    pub sender: Option<UserId>,
    #[sqlx(rename = "last_body")]
    pub body: Option<String>,
    #[sqlx(rename = "last_created_at")]
    pub created_at: Option<i64>,
}

/// What one user set on one conversation, shared by all their devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, sqlx::FromRow)]
pub struct Flags {
    /// Muted until then (Unix ms; [`i64::MAX`]: until unmuted).
    pub muted_until: Option<i64>,
    pub archived: bool,
    pub pinned: bool,
}

impl Flags {
    /// These flags with `edit` made to them.
    pub(crate) fn edited(mut self, edit: FlagsEdit) -> Flags {
        if let Some(muted_until) = edit.muted_until {
            self.muted_until = muted_until;
        }
        self.archived = edit.archived.unwrap_or(self.archived);
        self.pinned = edit.pinned.unwrap_or(self.pinned);
        self
    }
}

/// What a change of flags sets; `None` leaves a flag as it is (`muted_until: Some(None)` unmutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlagsEdit {
    pub muted_until: Option<Option<i64>>,
    pub archived: Option<bool>,
    pub pinned: Option<bool>,
}

/// Where a page of a chat list goes on from: after this conversation, in the list's order
/// (pinned first, then by last activity, newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFrom {
    pub pinned: bool,
    pub activity: i64,
    pub conversation: ConversationId,
}

impl ListFrom {
    /// Where the page after `last` starts.
    pub fn after(last: &ConversationSummary) -> Self {
        ListFrom { pinned: last.flags.pinned, activity: last.activity, conversation: last.conversation.id }
    }
}

impl std::fmt::Display for ListFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", u8::from(self.pinned), self.activity, self.conversation)
    }
}

impl std::str::FromStr for ListFrom {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.splitn(3, '.');
        let pinned = match parts.next() {
            Some("1") => true,
            Some("0") => false,
            _ => return Err(()),
        };
        let activity = parts.next().and_then(|a| a.parse().ok()).ok_or(())?;
        let conversation = parts.next().and_then(|c| c.parse().ok()).ok_or(())?;
        Ok(ListFrom { pinned, activity, conversation })
    }
}

/// Most conversations one page of a chat list holds.
pub const MAX_LIST_PAGE: i64 = 200;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Message {
    #[sqlx(rename = "conversation_id")]
    pub conversation: ConversationId,
    pub seq: i64,
    #[sqlx(rename = "sender_user")]
    pub sender: UserId,
    #[sqlx(rename = "sender_device")]
    pub device: DeviceId,
    pub client_id: String,
    /// Opaque JSON, as sent (an edit rewrites it, a deletion or its timer leaves a tombstone).
    pub body: String,
    /// Unix milliseconds, server-assigned.
    pub created_at: i64,
    /// When the conversation's disappearing timer deletes it (Unix ms), if it had one when sent.
    pub expires_at: Option<i64>,
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
        /// How long after the message's time its push falls due (a push intent is written with
        /// it), or `None` when no push notifier is configured.
        push_delay_ms: Option<i64>,
        /// What the message does besides being stored.
        effect: Effect,
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
    /// The system message of a change to a group, by `actor` (its body is written by the change).
    pub fn change(conversation: &ConversationId, actor: &UserId, change: Change, now_ms: i64) -> Write {
        Write::Append {
            conversation: *conversation,
            sender: actor.clone(),
            device: DeviceId::SYSTEM,
            client_id: format!("system-{}", DeviceId::new()),
            body: "{}".into(),
            now_ms,
            push_delay_ms: None,
            effect: Effect::Change(change),
        }
    }

    /// Whom an appended message goes to besides the members after it: a member it removes gets
    /// the message of their own removal.
    pub(crate) fn departing(&self) -> Option<&UserId> {
        match self {
            Write::Append { effect: Effect::Change(Change::Remove(user)), .. } => Some(user),
            _ => None,
        }
    }

    /// The conversation whose rows the write locks.
    pub fn conversation(&self) -> ConversationId {
        match self {
            Write::Append { conversation, .. } | Write::Ack { conversation, .. } => *conversation,
        }
    }
}

/// What a message does besides being stored, checked and done in its append's own transaction
/// (so two of them on one message cannot cross).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Effect {
    /// A message to read (text, media, ciphertext): it disappears on the conversation's timer.
    #[default]
    Ordinary,
    /// A reaction to the message at `to`, which must be one to read.
    React { to: i64 },
    /// The sender's own text message at `to`, within [`EDIT_WINDOW_MS`], now says `text`.
    Edit { to: i64, text: String },
    /// The sender's own message at `to`, within [`DELETE_WINDOW_MS`], is deleted for everyone.
    Delete { to: i64 },
    /// The conversation's disappearing timer is set (0: off). In a group, admins only.
    Timer { secs: i64 },
    /// A group's members or settings change: the message is the system message that says so
    /// (its body is written by the change, see [`plan_change`]).
    Change(Change),
}

/// A change to a group, made by a system message of its own in the group's log (so every device
/// learns of it in order, and replays it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Admins add members; they read from this message on.
    Add(Vec<UserId>),
    /// An admin removes a member, or a member leaves (the actor is `user`). The member gets this
    /// message and nothing after it. When the last admin goes, the longest-standing member left
    /// becomes admin.
    Remove(UserId),
    /// An admin makes a member an admin (`admin`), or an admin a member again.
    Role { user: UserId, admin: bool },
    /// The group's name, description or avatar (admins, or every member when `info_by_all`), or
    /// who may change them (admins).
    Info(InfoChange),
}

/// What a [`Change::Info`] sets; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InfoChange {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub avatar: Option<Option<String>>,
    pub info_by_all: Option<bool>,
}

/// What a group says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupInfo {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A media id (an image).
    pub avatar: Option<String>,
    /// Whether every member, not only admins, may change the name, description and avatar.
    pub info_by_all: bool,
}

/// A member of a conversation, as its details show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user: UserId,
    pub role: Role,
    /// Unix ms.
    pub joined_at: i64,
    /// They read from after this seq.
    pub joined_seq: i64,
}

/// What a [`Change`] does, decided from the group as it stands.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub add: Vec<UserId>,
    pub remove: Option<UserId>,
    pub roles: Vec<(UserId, Role)>,
    pub info: Option<GroupInfo>,
    /// The system message's body.
    pub body: String,
}

/// Decides what `change` by `actor` does to a conversation of `kind` whose members are `members`
/// (longest-standing first) and whose settings are `info`, and writes its system message.
pub(crate) fn plan_change(
    change: &Change,
    actor: &UserId,
    kind: ConversationKind,
    members: &[Member],
    info: &GroupInfo,
) -> Result<Plan, StoreError> {
    let role_of = |user: &UserId| members.iter().find(|m| &m.user == user).map(|m| m.role);
    let Some(actor_role) = role_of(actor) else { return Err(StoreError::NotMember) };
    if kind == ConversationKind::Direct {
        return Err(StoreError::DirectConversation);
    }
    let admin = actor_role == Role::Admin;
    let system = |event: &str, mut fields: serde_json::Map<String, serde_json::Value>| {
        fields.insert("system".into(), event.into());
        fields.insert("by".into(), actor.as_str().into());
        serde_json::Value::Object(fields).to_string()
    };
    let mut fields = serde_json::Map::new();
    match change {
        Change::Add(users) => {
            if !admin {
                return Err(StoreError::NotAdmin);
            }
            let present: Vec<UserId> = members.iter().map(|m| m.user.clone()).collect();
            let add: Vec<UserId> = newcomers(users, &present).into_iter().map(|(u, _)| u).collect();
            if add.is_empty() {
                return Err(StoreError::Unchanged);
            }
            if present.len() + add.len() > MAX_GROUP_MEMBERS {
                return Err(StoreError::TooManyMembers);
            }
            fields.insert("users".into(), add.iter().map(|u| u.as_str()).collect::<Vec<_>>().into());
            Ok(Plan { body: system("members_added", fields), add, ..Plan::default() })
        }
        Change::Remove(user) => {
            if user != actor && !admin {
                return Err(StoreError::NotAdmin);
            }
            let Some(role) = role_of(user) else { return Err(StoreError::Unchanged) };
            fields.insert("user".into(), user.as_str().into());
            // A group is never left without an admin while it has members.
            let mut roles = Vec::new();
            let others = || members.iter().filter(|m| &m.user != user);
            if role == Role::Admin
                && !others().any(|m| m.role == Role::Admin)
                && let Some(heir) = others().next()
            {
                roles.push((heir.user.clone(), Role::Admin));
                fields.insert("admins".into(), vec![heir.user.as_str()].into());
            }
            let event = if user == actor { "member_left" } else { "member_removed" };
            Ok(Plan { body: system(event, fields), remove: Some(user.clone()), roles, ..Plan::default() })
        }
        Change::Role { user, admin: promote } => {
            if !admin {
                return Err(StoreError::NotAdmin);
            }
            let Some(role) = role_of(user) else {
                return Err(StoreError::Invalid(format!("{user} is not a member of this group")));
            };
            let wanted = if *promote { Role::Admin } else { Role::Member };
            if role == wanted {
                return Err(StoreError::Unchanged);
            }
            if !promote && !members.iter().any(|m| &m.user != user && m.role == Role::Admin) {
                return Err(StoreError::LastAdmin);
            }
            fields.insert("user".into(), user.as_str().into());
            let event = if *promote { "admin_added" } else { "admin_removed" };
            Ok(Plan { body: system(event, fields), roles: vec![(user.clone(), wanted)], ..Plan::default() })
        }
        Change::Info(set) => {
            if !admin && (set.info_by_all.is_some() || !info.info_by_all) {
                return Err(StoreError::NotAdmin);
            }
            let mut next = info.clone();
            if let Some(name) = &set.name
                && next.name.as_ref() != Some(name)
            {
                next.name = Some(name.clone());
                fields.insert("name".into(), name.as_str().into());
            }
            if let Some(description) = &set.description
                && &next.description != description
            {
                next.description = description.clone();
                fields.insert("description".into(), description.clone().into());
            }
            if let Some(avatar) = &set.avatar
                && &next.avatar != avatar
            {
                next.avatar = avatar.clone();
                fields.insert("avatar".into(), avatar.clone().into());
            }
            if let Some(by_all) = set.info_by_all
                && next.info_by_all != by_all
            {
                next.info_by_all = by_all;
                fields.insert("info_by_all".into(), by_all.into());
            }
            if fields.is_empty() {
                return Err(StoreError::Unchanged);
            }
            Ok(Plan { body: system("group_updated", fields), info: Some(next), ..Plan::default() })
        }
    }
}

/// How long after sending a message its sender may edit it: 15 minutes.
pub const EDIT_WINDOW_MS: i64 = 15 * 60 * 1000;
/// How long after sending a message its sender may delete it for everyone: 48 hours.
pub const DELETE_WINDOW_MS: i64 = 48 * 3600 * 1000;
/// The body a message deleted for everyone keeps.
pub const DELETED_BODY: &str = r#"{"deleted":true}"#;
/// The body a message its conversation's timer deleted keeps.
pub const EXPIRED_BODY: &str = r#"{"expired":true}"#;

/// An append's fields, as the engines take them.
#[derive(Clone, Copy)]
pub(crate) struct NewMessage<'a> {
    pub conversation: &'a ConversationId,
    pub sender: &'a UserId,
    pub device: &'a DeviceId,
    pub client_id: &'a str,
    pub body: &'a str,
    pub now_ms: i64,
    pub effect: &'a Effect,
}

/// When a message sent at `now_ms` disappears, given its conversation's timer: only messages to
/// read do (a reaction or an edit goes with its message).
pub(crate) fn expires_at(effect: &Effect, now_ms: i64, disappear_secs: i64) -> Option<i64> {
    (matches!(effect, Effect::Ordinary) && disappear_secs > 0).then(|| now_ms.saturating_add(disappear_secs * 1000))
}

/// Whether a member (`found`: the conversation's kind and their role, if they are one) may set
/// its disappearing timer: anyone in a direct chat, admins in a group.
pub(crate) fn may_set_timer(found: Option<(ConversationKind, Role)>) -> Result<(), StoreError> {
    match found {
        None => Err(StoreError::NotMember),
        Some((ConversationKind::Group, role)) if role != Role::Admin => Err(StoreError::NotAdmin),
        Some(_) => Ok(()),
    }
}

/// The earlier message an [`Effect`] names, as stored.
pub(crate) struct Target {
    pub sender: UserId,
    pub body: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// What an accepted [`Effect`] does to its target.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The target's new body, when it changes.
    pub body: Option<String>,
    /// The media whose grants the target gave and a deletion takes back.
    pub revoke: Option<String>,
    /// When an edit disappears: with the message it edits.
    pub expires_at: Option<i64>,
}

/// What an engine's effect did to its own message: when it disappears (an edit, with the message
/// it edits), and its body when the effect wrote it (a system message).
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub expires_at: Option<i64>,
    pub body: Option<String>,
}

/// Whether a stored body is a message to read (not a reaction, an edit, a deletion, a timer or a
/// tombstone).
fn readable(body: &serde_json::Map<String, serde_json::Value>) -> bool {
    ["text", "media", "ciphertext"].iter().any(|k| body.contains_key(*k))
        && !["edit", "reaction", "deleted", "expired"].iter().any(|k| body.contains_key(*k))
}

/// Checks `effect`, by `actor` at `now`, against its target (`None`: no such message the actor can
/// see), and says what it does to it.
pub(crate) fn effect_on(
    effect: &Effect,
    actor: &UserId,
    target: Option<Target>,
    now: i64,
) -> Result<Applied, StoreError> {
    let Some(target) = target else { return Err(StoreError::UnknownMessage) };
    let Ok(serde_json::Value::Object(mut body)) = serde_json::from_str(&target.body) else {
        return Err(StoreError::Corrupt("a stored body is not a JSON object".into()));
    };
    if !readable(&body) || target.expires_at.is_some_and(|at| at <= now) {
        return Err(StoreError::NotEditable);
    }
    match effect {
        Effect::Ordinary | Effect::Timer { .. } | Effect::React { .. } | Effect::Change(_) => Ok(Applied::default()),
        Effect::Edit { text, .. } => {
            if &target.sender != actor {
                return Err(StoreError::NotSender);
            }
            if !body.contains_key("text") {
                return Err(StoreError::NotEditable);
            }
            if now - target.created_at > EDIT_WINDOW_MS {
                return Err(StoreError::TooLate);
            }
            body.insert("text".into(), text.clone().into());
            body.insert("edited_at".into(), now.into());
            let body = Some(serde_json::Value::Object(body).to_string());
            Ok(Applied { body, revoke: None, expires_at: target.expires_at })
        }
        Effect::Delete { .. } => {
            if &target.sender != actor {
                return Err(StoreError::NotSender);
            }
            if now - target.created_at > DELETE_WINDOW_MS {
                return Err(StoreError::TooLate);
            }
            let revoke = body.get("media").and_then(|m| m.as_str()).map(str::to_owned);
            Ok(Applied { body: Some(DELETED_BODY.to_owned()), revoke, expires_at: None })
        }
    }
}

/// How many of `messages`, in the order given, fit a page's [`MAX_PAGE_BYTES`] (always at least
/// one); `None` when all of them do.
fn within_budget<'a>(messages: impl Iterator<Item = &'a Message>) -> Option<usize> {
    let mut bytes = 0;
    let over = messages.into_iter().position(|m| {
        bytes += m.body.len() + m.client_id.len();
        bytes > MAX_PAGE_BYTES
    })?;
    Some(over.max(1))
}

/// Where a page of history starts: after a seq (reading forward) or before one (reading back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    After(i64),
    Before(i64),
}

/// Who a conversation's members were when a message was appended.
pub type Members = std::sync::Arc<[UserId]>;

/// What a [`Write`] did: an append with the members at its seq (whom it goes to), or an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Appended(Appended, Members),
    Acked(Acked),
}

/// Where one device stands in one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Cursor {
    #[sqlx(rename = "delivered_seq")]
    pub delivered: i64,
    #[sqlx(rename = "read_seq")]
    pub read: i64,
}

/// What an ack or read did: the device's cursor, and the user's receipt (the highest seq any of
/// their devices reached) when it moved, which the senders of the messages it passed are told
/// about, with where it stood `before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub device: Cursor,
    pub receipt: Option<Cursor>,
    pub before: Cursor,
}

/// Where a device stands in one of its conversations, for replay on connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct SyncState {
    #[sqlx(rename = "conversation_id")]
    pub conversation: ConversationId,
    pub last_seq: i64,
    /// This device's delivered cursor.
    pub delivered: i64,
    /// Messages up to here were purged by retention.
    pub purged_upto: i64,
}

/// Another member's receipt in a conversation the asking user is in.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Receipt {
    #[sqlx(rename = "conversation_id")]
    pub conversation: ConversationId,
    #[sqlx(rename = "user_id")]
    pub user: UserId,
    #[sqlx(flatten)]
    pub cursor: Cursor,
}

/// A member's receipt in a conversation, with where they joined and whether they have written
/// there (a member who has not shares no receipts of their own).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MemberReceipt {
    #[sqlx(rename = "user_id")]
    pub user: UserId,
    #[sqlx(rename = "delivered_seq")]
    pub delivered: i64,
    #[sqlx(rename = "read_seq")]
    pub read: i64,
    pub joined_seq: i64,
    pub answered: bool,
}

/// Someone whose presence the asking user may see (see [`Store::watched`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Contact {
    #[sqlx(rename = "user_id")]
    pub user: UserId,
    /// Unix ms when their last device went offline; 0 if never, or if they do not share it.
    pub last_seen: i64,
}

/// One of a user's own contacts.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ContactEntry {
    #[sqlx(rename = "contact_id")]
    pub user: UserId,
    /// Unix ms when it was added.
    pub created_at: i64,
}

/// What a user shares about themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privacy {
    /// Whether the time they were last online goes out with their presence.
    pub share_last_seen: bool,
}

impl Default for Privacy {
    fn default() -> Self {
        Self { share_last_seen: true }
    }
}

/// Who sees a user's about line and avatar (their name goes to whoever shares a conversation
/// with them: see [`Store::profiles_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// Everyone who sees the name.
    Everyone,
    /// The user's own contacts.
    #[default]
    Contacts,
    Nobody,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Everyone => "everyone",
            Visibility::Contacts => "contacts",
            Visibility::Nobody => "nobody",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "everyone" => Some(Visibility::Everyone),
            "contacts" => Some(Visibility::Contacts),
            "nobody" => Some(Visibility::Nobody),
            _ => None,
        }
    }
}

impl TryFrom<String> for Visibility {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("bad profile visibility {s:?}"))
    }
}

/// What a user shows of themselves; as another user sees it, what they may not see is `None`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Profile {
    #[sqlx(rename = "user_id")]
    pub user: UserId,
    #[sqlx(rename = "profile_name")]
    pub name: Option<String>,
    pub about: Option<String>,
    /// A media id (an image).
    pub avatar: Option<String>,
    #[sqlx(rename = "profile_visibility", try_from = "String")]
    pub visibility: Visibility,
    /// When it last changed (Unix ms; 0: never set).
    #[sqlx(rename = "profile_at")]
    pub updated_at: i64,
}

impl Profile {
    /// This profile with `edit` made to it.
    pub(crate) fn edited(mut self, edit: &ProfileEdit) -> Profile {
        if let Some(name) = &edit.name {
            self.name = name.clone();
        }
        if let Some(about) = &edit.about {
            self.about = about.clone();
        }
        if let Some(avatar) = &edit.avatar {
            self.avatar = avatar.clone();
        }
        if let Some(visibility) = edit.visibility {
            self.visibility = visibility;
        }
        self
    }
}

/// A profile with how its owner stands to the one asking: whether the owner has them as a contact,
/// and whether they share a group, or a direct conversation in which the owner has written.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ProfileSeen {
    #[sqlx(flatten)]
    pub profile: Profile,
    pub contact: bool,
    pub shared: bool,
}

impl ProfileSeen {
    /// The profile as `viewer` may see it: `None` when they may not see even the name.
    fn for_viewer(self, viewer: &UserId) -> Option<Profile> {
        let ProfileSeen { mut profile, contact, shared } = self;
        if &profile.user == viewer {
            return Some(profile);
        }
        if !contact && !shared {
            return None;
        }
        let details = match profile.visibility {
            Visibility::Everyone => true,
            Visibility::Contacts => contact,
            Visibility::Nobody => false,
        };
        if !details {
            profile.about = None;
            profile.avatar = None;
        }
        Some(profile)
    }
}

/// What `PUT /v1/profile` changes; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProfileEdit {
    pub name: Option<Option<String>>,
    pub about: Option<Option<String>>,
    pub avatar: Option<Option<String>>,
    pub visibility: Option<Visibility>,
}

/// Most users one profile change is announced to.
pub(crate) const MAX_PROFILE_WATCHERS: i64 = 5000;

/// A device linked to a user.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeviceInfo {
    #[sqlx(rename = "device_id")]
    pub id: DeviceId,
    pub name: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of its last sign-in, refresh or connect; `None` if not seen since it was linked.
    pub last_seen: Option<i64>,
}

/// A newly linked device, and the one it replaced when the user had [`MAX_DEVICES`] already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linked {
    pub device: DeviceId,
    pub replaced: Option<DeviceId>,
}

/// A message whose push fell due, claimed by this node (see [`Store::claim_pushes`]).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PushIntent {
    #[sqlx(rename = "conversation_id")]
    pub conversation: ConversationId,
    pub seq: i64,
    #[sqlx(rename = "sender_user")]
    pub sender: UserId,
    /// When the message was appended (Unix ms): devices linked later are not pushed for it.
    pub created_at: i64,
    /// Claims so far, this one included.
    pub attempts: i64,
    /// Until when this claim holds (Unix ms): finishing it after that changes nothing, as
    /// another node may hold a newer claim.
    #[sqlx(rename = "due_at")]
    pub lease: i64,
}

/// A device to push: it has not acked a message it should have by now.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PushTarget {
    #[sqlx(rename = "user_id")]
    pub user: UserId,
    #[sqlx(rename = "device_id")]
    pub device: DeviceId,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversation does not exist or the user is not in it; callers answer 404 either way.
    #[error("no such conversation")]
    NotMember,
    #[error("only admins may do that")]
    NotAdmin,
    /// A direct conversation has its two members for good: none is added, none leaves.
    #[error("a direct conversation's members do not change")]
    DirectConversation,
    #[error("a group holds at most {MAX_GROUP_MEMBERS} members")]
    TooManyMembers,
    #[error("{0}")]
    Invalid(String),
    /// The sending device used this `client_id` before for another message.
    #[error("this client_id was used for another message")]
    ClientIdReused,
    /// A reaction, edit or deletion names a message the sender cannot see (none, purged, or from
    /// before they joined).
    #[error("no such message")]
    UnknownMessage,
    /// Only a message's sender may edit it or delete it for everyone.
    #[error("only its sender may edit or delete a message")]
    NotSender,
    /// The message is too old to be edited or deleted for everyone.
    #[error("the time to edit or delete this message has passed")]
    TooLate,
    /// The message cannot take that: a reaction, an edit, a tombstone, or (for an edit) not text.
    #[error("that message cannot be reacted to, edited or deleted")]
    NotEditable,
    /// A change that would change nothing (adding members who are in, promoting an admin): it
    /// writes no system message, and callers answer as if it had been made.
    #[error("nothing to change")]
    Unchanged,
    /// The last admin of a group cannot step down while it has other members: they promote one
    /// first (leaving hands the role on by itself).
    #[error("a group keeps at least one admin: make another member admin first")]
    LastAdmin,
    /// Users named in a request who do not exist.
    #[error("no such users: {0:?}")]
    UnknownUsers(Vec<UserId>),
    #[error("database: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("bad data in the database: {0}")]
    Corrupt(String),
    /// The batch this write was part of could not be committed.
    #[error("committing a batch of writes failed: {0}")]
    Batch(String),
}

/// A value the database holds that is not what we wrote (a malformed id, an unknown kind) is
/// corrupt data; anything else is the database failing.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt(e.to_string()),
            e => StoreError::Database(Box::new(e)),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => {
                StoreError::Corrupt(e.to_string())
            }
            e => StoreError::Database(Box::new(e)),
        }
    }
}

/// chat-core's tables on one of the two engines. Cloning shares the connections.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// Passes a call to whichever engine this is.
macro_rules! each {
    ($store:expr, $engine:ident => $call:expr) => {
        match $store {
            Store::Sqlite($engine) => $call,
            Store::Postgres($engine) => $call,
        }
    };
}

impl Store {
    /// Opens the database at `url` (`sqlite://PATH`, created if missing, or `postgres://…`) and
    /// applies chat-core's migrations (other crates keep theirs in the same database).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if types::is_postgres_url(url) {
            Ok(Store::Postgres(postgres::Postgres::connect(url).await?))
        } else {
            Ok(Store::Sqlite(sqlite::Sqlite::connect(url).await?))
        }
    }

    /// How many group-commit writers this engine profits from: one for SQLite (it has one writer
    /// anyway), several for PostgreSQL, where conversations lock apart.
    pub fn writers(&self) -> usize {
        match self {
            Store::Sqlite(_) => 1,
            Store::Postgres(_) => 4,
        }
    }

    /// Runs `batch` in one transaction: one commit (one fsync) for all. Each write succeeds or is
    /// refused on its own; a database error fails them all (as [`StoreError::Batch`]). The results
    /// come in the batch's order. Conversations are locked in one order for every batch, so two
    /// writers' batches never wait on each other in a cycle.
    pub async fn write_batch(&self, batch: Vec<Write>) -> Vec<Result<Written, StoreError>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let len = batch.len();
        match each!(self, s => s.write_batch(batch).await) {
            Ok(results) => results,
            Err(e) => {
                let message = match e {
                    StoreError::Batch(message) => message,
                    e => e.to_string(),
                };
                (0..len).map(|_| Err(StoreError::Batch(message.clone()))).collect()
            }
        }
    }

    /// One write, as a batch of one.
    async fn write_one(&self, write: Write) -> Result<Written, StoreError> {
        self.write_batch(vec![write]).await.pop().unwrap_or_else(|| Err(StoreError::Batch("no result".into())))
    }

    /// Appends a message with the conversation's next seq, or returns the one already stored under
    /// the sending device's `client_id` (the same key with another body is
    /// [`StoreError::ClientIdReused`]).
    pub async fn append(
        &self,
        conversation: &ConversationId,
        sender: &UserId,
        device: &DeviceId,
        client_id: &str,
        body: &str,
        now_ms: i64,
    ) -> Result<Appended, StoreError> {
        let write = Write::Append {
            conversation: *conversation,
            sender: sender.clone(),
            device: *device,
            client_id: client_id.to_owned(),
            body: body.to_owned(),
            now_ms,
            push_delay_ms: None,
            effect: Effect::Ordinary,
        };
        match self.write_one(write).await? {
            Written::Appended(appended, _) => Ok(appended),
            Written::Acked(_) => Err(StoreError::Corrupt("an append was answered as an ack".into())),
        }
    }

    /// Moves this device's delivered cursor forward to `seq` (never back, never past the log), and
    /// the user's delivered receipt with it.
    pub async fn ack(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
    ) -> Result<Acked, StoreError> {
        self.move_cursor(user, device, conversation, seq, false).await
    }

    /// Moves this device's read cursor (and delivered with it) forward to `seq`, and the user's
    /// receipts with them.
    pub async fn mark_read(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
    ) -> Result<Acked, StoreError> {
        self.move_cursor(user, device, conversation, seq, true).await
    }

    async fn move_cursor(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
        seq: i64,
        read: bool,
    ) -> Result<Acked, StoreError> {
        let write = Write::Ack { user: user.clone(), device: *device, conversation: *conversation, seq, read };
        match self.write_one(write).await? {
            Written::Acked(acked) => Ok(acked),
            Written::Appended(..) => Err(StoreError::Corrupt("an ack was answered as an append".into())),
        }
    }

    /// Registers a device for `user` (creating the user on first sight). Past [`MAX_DEVICES`], the
    /// least recently seen device is unlinked in the same transaction (its tokens and cursors go).
    pub async fn add_device(&self, user: &UserId, name: &str) -> Result<Linked, StoreError> {
        each!(self, s => s.add_device(user, name, now_ms()).await)
    }

    /// `user`'s linked devices, oldest first.
    pub async fn devices(&self, user: &UserId) -> Result<Vec<DeviceInfo>, StoreError> {
        each!(self, s => s.devices(user).await)
    }

    /// Notes that `device` was seen now (a sign-in, a refresh, a WebSocket connect).
    pub async fn device_seen(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        each!(self, s => s.device_seen(user, device, now_ms()).await)
    }

    /// The phone number `user` signed in with, if they did.
    pub async fn phone_of(&self, user: &UserId) -> Result<Option<String>, StoreError> {
        each!(self, s => s.phone_of(user).await)
    }

    /// The one direct conversation of `a` and `b`, created the first time it is asked for.
    pub async fn direct(&self, a: &UserId, b: &UserId) -> Result<Conversation, StoreError> {
        if a == b {
            return Err(StoreError::Invalid("a direct conversation needs two different users".into()));
        }
        each!(self, s => s.direct(a, b, now_ms()).await)
    }

    /// A new group; `creator` is its admin, `members` join as members.
    pub async fn create_group(
        &self,
        creator: &UserId,
        name: &str,
        members: &[UserId],
    ) -> Result<Conversation, StoreError> {
        let roster = group_roster(creator, members)?;
        each!(self, s => s.create_group(name, &roster, now_ms()).await)
    }

    /// Admins add members to a group, with the system message that says so (`None`: all were in).
    pub async fn add_members(
        &self,
        conversation: &ConversationId,
        actor: &UserId,
        users: &[UserId],
    ) -> Result<Option<Message>, StoreError> {
        self.change(conversation, actor, Change::Add(users.to_vec()), now_ms()).await
    }

    /// Admins remove members from a group; anyone may remove themselves (leave). With the system
    /// message that says so (`None`: they were not in).
    pub async fn remove_member(
        &self,
        conversation: &ConversationId,
        actor: &UserId,
        user: &UserId,
    ) -> Result<Option<Message>, StoreError> {
        self.change(conversation, actor, Change::Remove(user.clone()), now_ms()).await
    }

    /// Makes `change` to a group with its system message, as a batch of one; `None` when it
    /// changed nothing (and wrote no message).
    pub async fn change(
        &self,
        conversation: &ConversationId,
        actor: &UserId,
        change: Change,
        now_ms: i64,
    ) -> Result<Option<Message>, StoreError> {
        match self.write_one(Write::change(conversation, actor, change, now_ms)).await {
            Ok(Written::Appended(appended, _)) => Ok(Some(appended.message().clone())),
            Ok(Written::Acked(_)) => Err(StoreError::Corrupt("a change was answered as an ack".into())),
            Err(StoreError::Unchanged) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A conversation as one of its members sees it: what it is, its settings and timer, and its
    /// members (longest-standing first).
    pub async fn details(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<ConversationDetails, StoreError> {
        each!(self, s => s.details(conversation, user).await)?.ok_or(StoreError::NotMember)
    }

    /// The members of a conversation, for one of its members.
    pub async fn members(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<Vec<(UserId, Role)>, StoreError> {
        each!(self, s => s.members(conversation, user).await)
    }

    /// The first [`MAX_LIST_PAGE`] conversations of `user` (see [`Store::conversation_page`]).
    pub async fn conversations(&self, user: &UserId) -> Result<Vec<ConversationSummary>, StoreError> {
        self.conversation_page(user, None, MAX_LIST_PAGE).await
    }

    /// A page of `user`'s chat list: pinned first, then by last activity, newest first; up to
    /// `limit` (1 to [`MAX_LIST_PAGE`]) after `from`. Unread counts follow the user's read
    /// receipt, so reading on one device reads on all.
    pub async fn conversation_page(
        &self,
        user: &UserId,
        from: Option<&ListFrom>,
        limit: i64,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let limit = limit.clamp(1, MAX_LIST_PAGE);
        each!(self, s => s.conversations(user, from, limit).await)
    }

    /// Sets `user`'s flags on one of their conversations; returns them as they are now.
    pub async fn set_flags(
        &self,
        user: &UserId,
        conversation: &ConversationId,
        edit: FlagsEdit,
    ) -> Result<Flags, StoreError> {
        each!(self, s => s.set_flags(user, conversation, edit).await)?.ok_or(StoreError::NotMember)
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) messages with seq greater than `after`, in seq order,
    /// stopping before the bodies pass [`MAX_PAGE_BYTES`]; the next page starts after the last.
    pub async fn messages_after(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Message>, StoreError> {
        let mut page = each!(self, s => s.messages_after(conversation, user, after, limit.clamp(1, MAX_PAGE)).await)?;
        if let Some(fits) = within_budget(page.iter()) {
            page.truncate(fits);
        }
        Ok(page)
    }

    /// A page of history for one of its members: up to `limit` (1 to [`MAX_PAGE`]) messages after
    /// a seq, or the newest ones before a seq, in seq order, stopping before the bodies pass
    /// [`MAX_PAGE_BYTES`] (always at least one); and whether more lie that way.
    pub async fn history_page(
        &self,
        conversation: &ConversationId,
        user: &UserId,
        from: PageFrom,
        limit: i64,
    ) -> Result<(Vec<Message>, bool), StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        // One more than asked for says whether there is more.
        match from {
            PageFrom::After(after) => {
                let mut page = each!(self, s => s.messages_after(conversation, user, after, limit + 1).await)?;
                let mut more = page.len() as i64 > limit;
                page.truncate(limit as usize);
                if let Some(fits) = within_budget(page.iter()) {
                    page.truncate(fits);
                    more = true;
                }
                Ok((page, more))
            }
            PageFrom::Before(before) => {
                let mut page = each!(self, s => s.messages_before(conversation, user, before, limit + 1).await)?;
                let mut more = page.len() as i64 > limit;
                if more {
                    page.remove(0);
                }
                // The newest that fit the budget stay; what does not is "more", further back.
                if let Some(fits) = within_budget(page.iter().rev()) {
                    page.drain(..page.len() - fits);
                    more = true;
                }
                Ok((page, more))
            }
        }
    }

    /// Whether `device` is one of `user`'s linked devices.
    pub async fn device_exists(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        each!(self, s => s.device_exists(user, device).await)
    }

    /// Unlinks a device: its cursors and refresh tokens go with it. False if there was none.
    pub async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
        each!(self, s => s.remove_device(user, device).await)
    }

    /// Where `device` stands in each of `user`'s conversations.
    pub async fn sync_state(&self, user: &UserId, device: &DeviceId) -> Result<Vec<SyncState>, StoreError> {
        each!(self, s => s.sync_state(user, device).await)
    }

    /// Where `device` stands in one conversation; `NotMember` if the user is not in it.
    pub async fn sync_one(
        &self,
        user: &UserId,
        device: &DeviceId,
        conversation: &ConversationId,
    ) -> Result<SyncState, StoreError> {
        each!(self, s => s.sync_one(user, device, conversation).await)?.ok_or(StoreError::NotMember)
    }

    /// Who sent the messages of a conversation after `after` up to `upto`, but `except`: whom a
    /// receipt that moved over them concerns.
    pub async fn senders_between(
        &self,
        conversation: &ConversationId,
        after: i64,
        upto: i64,
        except: Option<&UserId>,
    ) -> Result<Vec<UserId>, StoreError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        each!(self, s => s.senders_between(conversation, after, upto, except).await)
    }

    /// Which of `users` do not exist (have never linked a device nor been named before).
    pub async fn unknown_users(&self, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        each!(self, s => s.unknown_users(users).await)
    }

    /// Every member's receipt, where they joined and whether they have written there (no
    /// membership check: callers have made theirs).
    pub async fn member_receipts(&self, conversation: &ConversationId) -> Result<Vec<MemberReceipt>, StoreError> {
        each!(self, s => s.member_receipts(conversation).await)
    }

    /// Up to `limit` members of a conversation, by id (no membership check: callers have made
    /// theirs).
    pub async fn member_sample(&self, conversation: &ConversationId, limit: i64) -> Result<Vec<UserId>, StoreError> {
        each!(self, s => s.member_sample(conversation, limit).await)
    }

    /// Who is in a conversation, for fan-out inside chat-core (no membership check: callers have
    /// made theirs).
    pub async fn member_ids(&self, conversation: &ConversationId) -> Result<Vec<UserId>, StoreError> {
        each!(self, s => s.member_ids(conversation).await)
    }

    /// The other members' receipts in `user`'s conversations, where they have any.
    pub async fn receipts(&self, user: &UserId) -> Result<Vec<Receipt>, StoreError> {
        each!(self, s => s.receipts(user).await)
    }

    /// Who sees `user`'s presence and typing: the contacts `user` added, and whoever `user` has
    /// exchanged messages with both ways in a direct conversation.
    pub async fn audience(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        each!(self, s => s.audience(user).await)
    }

    /// Whose presence `user` sees: everyone whose [`Store::audience`] holds `user`, with their
    /// last-seen time where they share it (at most 5,000: anyone may add anyone as a contact, and
    /// a connect must not fan out without bound).
    pub async fn watched(&self, user: &UserId) -> Result<Vec<Contact>, StoreError> {
        each!(self, s => s.watched(user).await)
    }

    /// `user`'s own contacts, oldest first.
    pub async fn contact_list(&self, user: &UserId) -> Result<Vec<ContactEntry>, StoreError> {
        each!(self, s => s.contact_list(user).await)
    }

    /// Adds `contacts` to `user`'s (or, with `replace`, makes them the whole list). Unknown users
    /// refuse the lot ([`StoreError::UnknownUsers`]), as does passing [`MAX_CONTACTS`]; `user`
    /// is never their own contact.
    pub async fn add_contacts(&self, user: &UserId, contacts: &[UserId], replace: bool) -> Result<(), StoreError> {
        let mut distinct: Vec<UserId> = contacts.iter().filter(|c| *c != user).cloned().collect();
        distinct.sort();
        distinct.dedup();
        if distinct.len() > MAX_CONTACTS {
            return Err(StoreError::Invalid(format!("a user keeps at most {MAX_CONTACTS} contacts")));
        }
        each!(self, s => s.add_contacts(user, &distinct, replace, now_ms()).await)
    }

    /// Takes `contact` off `user`'s contacts; false if it was not on them.
    pub async fn remove_contact(&self, user: &UserId, contact: &UserId) -> Result<bool, StoreError> {
        each!(self, s => s.remove_contact(user, contact).await)
    }

    /// What `user` shares ([`Privacy::default`] for a user never seen).
    pub async fn privacy(&self, user: &UserId) -> Result<Privacy, StoreError> {
        each!(self, s => s.privacy(user).await)
    }

    /// `user`'s own profile (an empty one for a user never seen).
    pub async fn profile(&self, user: &UserId) -> Result<Profile, StoreError> {
        let found = each!(self, s => s.profile_seen(user, user).await)?;
        Ok(found.map(|seen| seen.profile).unwrap_or_else(|| Profile {
            user: user.clone(),
            name: None,
            about: None,
            avatar: None,
            visibility: Visibility::default(),
            updated_at: 0,
        }))
    }

    /// Changes `user`'s profile; returns it as it is now.
    pub async fn set_profile(&self, user: &UserId, edit: &ProfileEdit) -> Result<Profile, StoreError> {
        each!(self, s => s.set_profile(user, edit, now_ms()).await)?;
        self.profile(user).await
    }

    /// The profiles of `users` as `viewer` may see them: the name if they share a group, or a
    /// direct conversation in which its owner has written, or the owner has them as a contact;
    /// the about line and avatar as the owner's [`Visibility`] says. Users `viewer` may not see
    /// (or that do not exist) are left out.
    pub async fn profiles_for(&self, viewer: &UserId, users: &[UserId]) -> Result<Vec<Profile>, StoreError> {
        let mut seen = Vec::with_capacity(users.len());
        for user in users {
            if let Some(profile) = each!(self, s => s.profile_seen(user, viewer).await)? {
                seen.extend(profile.for_viewer(viewer));
            }
        }
        Ok(seen)
    }

    /// Who hears that `user`'s profile changed: the members of their conversations (themselves
    /// included), at most [`MAX_PROFILE_WATCHERS`].
    pub async fn profile_watchers(&self, user: &UserId) -> Result<Vec<UserId>, StoreError> {
        each!(self, s => s.profile_watchers(user).await)
    }

    /// Sets what `user` shares.
    pub async fn set_privacy(&self, user: &UserId, privacy: Privacy) -> Result<(), StoreError> {
        each!(self, s => s.set_privacy(user, privacy, now_ms()).await)
    }

    /// Takes one request from the rate limit `bucket` of `key`, which lets `burst` through at once
    /// and one more every `every_ms` (GCRA). `None` when it may go ahead; else how many ms until
    /// it could. All nodes on one database share the buckets.
    pub async fn take_token(
        &self,
        bucket: &str,
        key: &str,
        every_ms: i64,
        burst: i64,
        now_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let limit = Bucket::new(bucket, key, every_ms, burst, now_ms);
        each!(self, s => s.take_token(&limit).await)
    }

    /// Stores `requested_by`'s request to link a device named `name`, pending until `expires_at_ms`.
    pub async fn create_link_request(
        &self,
        request_id: &str,
        user: &UserId,
        requested_by: &DeviceId,
        name: &str,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let request = NewLinkRequest { id: request_id, user, requested_by, name, expires_at_ms };
        each!(self, s => s.create_link_request(&request).await)
    }

    /// Approves or denies a pending, unexpired link request of `user` from `approver`, which must be
    /// another device than the one that asked. Once only: a second answer finds nothing pending.
    /// An approval links the device in the same transaction, for the asking device to collect.
    pub async fn answer_link_request(
        &self,
        request_id: &str,
        user: &UserId,
        approver: &DeviceId,
        approve: bool,
        now_ms: i64,
    ) -> Result<LinkAnswer, StoreError> {
        let status = if approve { "approved" } else { "denied" };
        each!(self, s => s.answer_link_request(request_id, user, approver, status, now_ms).await)
    }

    /// Where `requested_by`'s request stands; an approved one is handed over once (`Linked`), and
    /// is `Unknown` after that.
    pub async fn collect_link(
        &self,
        request_id: &str,
        user: &UserId,
        requested_by: &DeviceId,
        now_ms: i64,
    ) -> Result<LinkState, StoreError> {
        each!(self, s => s.collect_link(request_id, user, requested_by, now_ms).await)
    }

    /// Deletes link requests that expired before `before_ms`.
    pub async fn sweep_link_requests(&self, before_ms: i64) -> Result<u64, StoreError> {
        each!(self, s => s.sweep_link_requests(before_ms).await)
    }

    /// Whether [`Store::take_token`] would let a request through now, taking nothing: `None` if
    /// so, else how many ms until it would.
    pub async fn peek_token(
        &self,
        bucket: &str,
        key: &str,
        every_ms: i64,
        burst: i64,
        now_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let limit = Bucket::new(bucket, key, every_ms, burst, now_ms);
        let tat = each!(self, s => s.token_tat(bucket, key).await)?;
        Ok(tat.filter(|tat| limit.refuses(*tat)).map(|tat| limit.wait_ms(tat)))
    }

    /// Returns one token to a bucket: the request it let through did not go ahead after all.
    pub async fn give_back(&self, bucket: &str, key: &str, every_ms: i64) -> Result<(), StoreError> {
        each!(self, s => s.give_back(bucket, key, every_ms.max(1)).await)
    }

    /// Forgets rate-limit buckets that are full again by `now_ms`; returns how many went.
    pub async fn sweep_limits(&self, now_ms: i64) -> Result<u64, StoreError> {
        each!(self, s => s.sweep_limits(now_ms).await)
    }

    /// Records when the user's last device went offline.
    pub async fn set_last_seen(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
        each!(self, s => s.set_last_seen(user, at_ms).await)
    }

    /// Claims up to `limit` push intents due at `now_ms`, oldest due first, for `lease_ms`: no
    /// other node claims them meanwhile (PostgreSQL skips rows another claim holds; SQLite has one
    /// writer), and if this node dies they fall due again when the lease runs out.
    pub async fn claim_pushes(&self, now_ms: i64, lease_ms: i64, limit: i64) -> Result<Vec<PushIntent>, StoreError> {
        each!(self, s => s.claim_pushes(now_ms, now_ms + lease_ms, limit).await)
    }

    /// The devices a push for `intent` goes to: every linked device of a member other than the
    /// sender that has not acked its message (a device that acked within the delay was cancelled
    /// by that ack), counting only members who were in the conversation at its seq and devices
    /// linked before it was sent.
    pub async fn push_targets(&self, intent: &PushIntent) -> Result<Vec<PushTarget>, StoreError> {
        each!(self, s => s.push_targets(intent).await)
    }

    /// These pushes went out (or were given up on): their intents go, unless their claim lapsed
    /// and another node holds them now.
    pub async fn pushes_done(&self, intents: &[PushIntent]) -> Result<(), StoreError> {
        each!(self, s => s.pushes_done(intents).await)
    }

    /// These pushes failed: they fall due again at `retry_at_ms` (unless their claim lapsed).
    pub async fn retry_pushes(&self, intents: &[PushIntent], retry_at_ms: i64) -> Result<(), StoreError> {
        each!(self, s => s.retry_pushes(intents, retry_at_ms).await)
    }

    /// When the next push intent falls due (or its claim's lease runs out), if there is one.
    pub async fn next_push_due(&self) -> Result<Option<i64>, StoreError> {
        each!(self, s => s.next_push_due().await)
    }

    /// Up to `limit` messages whose disappearing timer ran out by `now_ms`, oldest first: their
    /// conversation, seq and body (whose media grants the caller takes back before
    /// [`Store::expire`]).
    pub async fn due_expiries(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<(ConversationId, i64, String)>, StoreError> {
        each!(self, s => s.due_expiries(now_ms, limit).await)
    }

    /// Leaves a tombstone in place of each of these messages (not of one deleted meanwhile), and
    /// queues the revocation of the media it shared in the same transaction, as a deletion does.
    pub async fn expire(&self, messages: &[(ConversationId, i64, String)]) -> Result<(), StoreError> {
        let messages: Vec<(ConversationId, i64, Option<String>)> = messages
            .iter()
            .map(|(conversation, seq, body)| {
                let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                (*conversation, *seq, body.get("media").and_then(|m| m.as_str()).map(str::to_owned))
            })
            .collect();
        each!(self, s => s.expire(&messages, now_ms()).await)
    }

    /// Puts `info` in place of the `media_info` of the media message at `seq`, unless its body
    /// changed meanwhile (a deletion, its timer); returns the body as it is now.
    pub async fn set_media_info(
        &self,
        conversation: &ConversationId,
        seq: i64,
        info: &serde_json::Value,
    ) -> Result<Option<String>, StoreError> {
        let Some(before) = each!(self, s => s.body_of(conversation, seq).await)? else { return Ok(None) };
        let Ok(serde_json::Value::Object(mut body)) = serde_json::from_str(&before) else { return Ok(None) };
        if !body.contains_key("media_info") {
            return Ok(None);
        }
        body.insert("media_info".into(), info.clone());
        let after = serde_json::Value::Object(body).to_string();
        let set = each!(self, s => s.replace_body(conversation, seq, &before, &after).await)?;
        Ok(set.then_some(after))
    }

    /// Whether the message at `seq` was deleted for everyone, disappeared or was purged.
    pub async fn is_gone(&self, conversation: &ConversationId, seq: i64) -> Result<bool, StoreError> {
        let body = each!(self, s => s.body_of(conversation, seq).await)?;
        Ok(body.is_none_or(|b| b == DELETED_BODY || b == EXPIRED_BODY))
    }

    /// Up to `limit` media grants of deleted messages still to take back: the conversation, the
    /// message's seq and its media id.
    pub async fn due_revocations(&self, limit: i64) -> Result<Vec<(ConversationId, i64, String)>, StoreError> {
        each!(self, s => s.due_revocations(limit).await)
    }

    /// These grants were taken back.
    pub async fn revoked(&self, messages: &[(ConversationId, i64)]) -> Result<(), StoreError> {
        each!(self, s => s.revoked(messages).await)
    }

    /// Deletes, in each conversation, the messages up to the newest one created before
    /// `before_ms` (a prefix of the log, as a conversation's times never go backwards), and
    /// records how far (`purged_upto`); the media grants the purged messages gave are queued to be
    /// taken back, as a deletion's are. Runs in slices of at most [`PURGE_SLICE`] messages, each its
    /// own short transaction, so sends are never held up behind a large purge. Returns how many
    /// went.
    pub async fn purge_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut purged = 0;
        // Conversations in id order, each round going on from the last: a backlog is read once.
        let mut after = String::new();
        loop {
            let horizons = each!(self, s => s.retention_horizons(before_ms, after.clone(), PURGE_CONVERSATIONS).await)?;
            let Some((last, _, _)) = horizons.last() else { return Ok(purged) };
            after = last.to_string();
            for (conversation, start, horizon) in horizons {
                let mut after = start;
                while after < horizon {
                    let upto = horizon.min(after + PURGE_SLICE);
                    purged += each!(self, s => s.purge_range(&conversation, after, upto, now_ms()).await)?;
                    after = upto;
                }
            }
        }
    }

    /// Stores the pending code of `phone`, replacing any earlier one (and its attempt count).
    pub async fn put_code(
        &self,
        phone: &str,
        code_hash: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        each!(self, s => s.put_code(phone, code_hash, expires_at_ms, now_ms).await)
    }

    /// Counts one attempt against the phone's code and says whether `code_hash` is it; the right
    /// code is used up.
    pub async fn check_code(&self, phone: &str, code_hash: &str, now_ms: i64) -> Result<CodeCheck, StoreError> {
        let Some(code) = each!(self, s => s.count_attempt(phone).await)? else { return Ok(CodeCheck::Missing) };
        let verdict = if code.attempts > MAX_CODE_ATTEMPTS {
            CodeCheck::Locked
        } else if code.expires_at <= now_ms {
            CodeCheck::Expired
        } else if code.code_hash == code_hash {
            CodeCheck::Valid
        } else {
            CodeCheck::Wrong
        };
        if verdict == CodeCheck::Valid {
            // Only the attempt that matched deletes it, and only once (a second use is Missing).
            let deleted = each!(self, s => s.use_code(phone, code_hash).await)?;
            if !deleted {
                return Ok(CodeCheck::Missing);
            }
        }
        Ok(verdict)
    }

    /// The user of a phone number, created the first time it is verified.
    pub async fn user_for_phone(&self, phone: &str, now_ms: i64) -> Result<UserId, StoreError> {
        let fresh = UserId::try_from(format!("u{}", DeviceId::new().to_string().replace('-', "")))
            .map_err(|_| StoreError::Corrupt("generated user id".into()))?;
        each!(self, s => s.user_for_phone(phone, &fresh, now_ms).await)
    }

    /// The users of those of `phones` that have one (contact discovery), as (phone, user).
    pub async fn lookup_phones(&self, phones: &[String]) -> Result<Vec<(String, UserId)>, StoreError> {
        if phones.is_empty() {
            return Ok(Vec::new());
        }
        each!(self, s => s.lookup_phones(phones).await)
    }

    /// The user of a phone number, if it has one.
    pub async fn lookup_phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
        each!(self, s => s.lookup_phone(phone).await)
    }

    /// Stores a new refresh token for a device.
    pub async fn issue_refresh(
        &self,
        token_hash: &str,
        user: &UserId,
        device: &DeviceId,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let token = NewRefresh { hash: token_hash, user, device, expires_at_ms, now_ms };
        each!(self, s => s.issue_refresh(&token).await)
    }

    /// Spends `old_hash` and stores `new_hash` in its place. A second spend unlinks the device
    /// (`Reused`; the caller closes its connections), except a retry from the same client within
    /// the grace, whose lost answer's token is taken back and replaced by `new_hash`.
    pub async fn rotate_refresh(&self, spend: &Spend<'_>) -> Result<Rotation, StoreError> {
        let rotation = each!(self, s => s.rotate_refresh(spend).await)?;
        if let Rotation::Reused { user, device } = &rotation {
            self.remove_device(user, device).await?;
        }
        Ok(rotation)
    }
}

/// The directory of a cluster: which nodes are alive and which users each holds. Times are the
/// database's clock, never a node's, so nodes whose clocks disagree still agree on who is alive.
impl Store {
    /// Records that node `node` is alive for `for_ms` more. True when its row had lapsed or was
    /// missing: other nodes counted it gone meanwhile (or swept its users), so it must record its
    /// users again and have its connections catch up.
    pub async fn node_alive(&self, node: &str, for_ms: i64) -> Result<bool, StoreError> {
        each!(self, s => s.node_alive(node, for_ms).await)
    }

    /// Forgets node `node` and whom it held (it is shutting down).
    pub async fn node_gone(&self, node: &str) -> Result<(), StoreError> {
        each!(self, s => s.node_gone(node).await)
    }

    /// Forgets the nodes silent for more than `silent_ms` and whom they held; a node that beat in
    /// the meantime is kept. Returns how many went.
    pub async fn sweep_nodes(&self, silent_ms: i64) -> Result<u64, StoreError> {
        each!(self, s => s.sweep_nodes(silent_ms).await)
    }

    /// Records that `user` has a device connected to `node`.
    pub async fn present(&self, user: &UserId, node: &str) -> Result<(), StoreError> {
        each!(self, s => s.present(user, node).await)
    }

    /// Records that `user` has no device connected to `node` any more.
    pub async fn absent(&self, user: &UserId, node: &str) -> Result<(), StoreError> {
        each!(self, s => s.absent(user, node).await)
    }

    /// The live nodes holding a connection of any of `users`, with whom each holds.
    pub async fn nodes_of(&self, users: &[UserId]) -> Result<Vec<(UserId, String)>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        each!(self, s => s.nodes_of(users).await)
    }
}

/// A refresh token to store.
#[derive(Debug)]
pub(crate) struct NewRefresh<'a> {
    hash: &'a str,
    user: &'a UserId,
    device: &'a DeviceId,
    expires_at_ms: i64,
    now_ms: i64,
}

/// A link request to store.
#[derive(Debug)]
pub(crate) struct NewLinkRequest<'a> {
    id: &'a str,
    user: &'a UserId,
    requested_by: &'a DeviceId,
    name: &'a str,
    expires_at_ms: i64,
}

/// What answering a link request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkAnswer {
    /// It was pending, and is answered now: the name the asking device gave, that device, and
    /// (approved) the device linked.
    Answered { name: String, requested_by: DeviceId, linked: Option<Linked> },
    /// The approver is the device that asked: a token alone cannot approve its own link.
    OwnRequest,
    /// No such pending request of this user (unknown, expired, or answered already).
    Unknown,
}

/// Where a link request stands, for the device that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Pending,
    /// Approved: the new device, handed over now and never again.
    Linked(DeviceId),
    Denied,
    /// Unknown, expired, or collected already.
    Unknown,
}

/// Where a request that was not collected stands, from its status and expiry.
fn link_state(status: Option<(String, i64)>, now_ms: i64) -> LinkState {
    match status {
        // An approved one whose device is still being linked is pending a moment longer.
        Some((status, expires_at)) if (status == "pending" || status == "approved") && expires_at > now_ms => {
            LinkState::Pending
        }
        Some((status, _)) if status == "denied" => LinkState::Denied,
        _ => LinkState::Unknown,
    }
}

/// One request against a rate limit.
#[derive(Debug)]
pub(crate) struct Bucket<'a> {
    bucket: &'a str,
    key: &'a str,
    every_ms: i64,
    burst: i64,
    now_ms: i64,
}

impl<'a> Bucket<'a> {
    /// A bucket of at least one token, refilled at least every millisecond.
    fn new(bucket: &'a str, key: &'a str, every_ms: i64, burst: i64, now_ms: i64) -> Self {
        Bucket { bucket, key, every_ms: every_ms.max(1), burst: burst.max(1), now_ms }
    }

    /// Whether a request now is refused, given the time the bucket is full again (`tat`): the rule
    /// `TAKE_TOKEN` applies in SQL on both engines.
    fn refuses(&self, tat: i64) -> bool {
        tat.max(self.now_ms) + self.every_ms - self.now_ms > self.burst * self.every_ms
    }

    /// How long a refused request waits, from the time the bucket is full again (`tat`).
    fn wait_ms(&self, tat: i64) -> i64 {
        (tat + self.every_ms - self.now_ms - self.burst * self.every_ms).max(1)
    }
}

/// A phone's pending code after one more attempt was counted against it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PendingCode {
    code_hash: String,
    expires_at: i64,
    attempts: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The key of a pair's direct conversation: `a|b` with `a < b`.
fn pair_key(a: &UserId, b: &UserId) -> String {
    if a < b { format!("{a}|{b}") } else { format!("{b}|{a}") }
}

/// Distinct users with their roles (the creator first, as admin), within the group limit.
fn group_roster(creator: &UserId, members: &[UserId]) -> Result<Vec<(UserId, Role)>, StoreError> {
    let mut roster = vec![(creator.clone(), Role::Admin)];
    for m in members {
        if !roster.iter().any(|(u, _)| u == m) {
            roster.push((m.clone(), Role::Member));
        }
    }
    if roster.len() > MAX_GROUP_MEMBERS {
        return Err(StoreError::TooManyMembers);
    }
    Ok(roster)
}

/// The users of `users` not yet in `present`, each once.
fn newcomers(users: &[UserId], present: &[UserId]) -> Vec<(UserId, Role)> {
    let mut new: Vec<(UserId, Role)> = Vec::new();
    for user in users {
        if !present.contains(user) && !new.iter().any(|(u, _)| u == user) {
            new.push((user.clone(), Role::Member));
        }
    }
    new
}

/// What a send whose `client_id` the device used before gets: the first message if this is a
/// retry of it (the same body), else [`StoreError::ClientIdReused`].
fn retried(first: Option<Message>, body: &str) -> Result<Appended, StoreError> {
    // Compared as stored: a retry of a message edited or deleted since is refused as reused (its
    // device knew the seq, so it had the answer), never taken for a message it is not.
    match first {
        Some(first) if same_message(&first.body, body) => Ok(Appended::Duplicate(first)),
        Some(_) => Err(StoreError::ClientIdReused),
        None => Err(StoreError::Corrupt("a conflicting message vanished".into())),
    }
}

/// The media the messages of `bodies` (seq, body) shared: what their purge takes back.
pub(crate) fn shared_media(bodies: Vec<(i64, String)>) -> impl Iterator<Item = (i64, String)> {
    bodies.into_iter().filter_map(|(seq, body)| {
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some((seq, body.get("media")?.as_str()?.to_owned()))
    })
}

/// Whether a stored body and a sent one are the same message: equal, but for the `media_info` the
/// server adds to a media message at each send (its signed URLs and status may differ by then, and
/// a media deleted meanwhile has none).
fn same_message(stored: &str, sent: &str) -> bool {
    if stored == sent {
        return true;
    }
    let client_part = |body: &str| {
        let mut value: serde_json::Value = serde_json::from_str(body).ok()?;
        value.as_object_mut()?.remove("media_info");
        Some(value)
    };
    matches!((client_part(stored), client_part(sent)), (Some(a), Some(b)) if a == b)
}

pub(crate) fn check_message(client_id: &str, body: &str) -> Result<(), StoreError> {
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_LEN {
        return Err(StoreError::Invalid(format!("client_id must be 1 to {MAX_CLIENT_ID_LEN} bytes")));
    }
    if body.len() > MAX_STORED_BODY_BYTES {
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

/// A refresh: the token presented, its successor, and who presents it.
#[derive(Debug, Clone, Copy)]
pub struct Spend<'a> {
    pub old_hash: &'a str,
    pub new_hash: &'a str,
    /// The client's address: a retry within `grace_ms` from the same one takes the spent token again.
    pub client: &'a str,
    pub grace_ms: i64,
    pub expires_at_ms: i64,
    pub now_ms: i64,
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

/// Most contacts one user may keep.
pub const MAX_CONTACTS: usize = 5000;

/// Most wrong guesses one code takes.
pub const MAX_CODE_ATTEMPTS: i64 = 5;
