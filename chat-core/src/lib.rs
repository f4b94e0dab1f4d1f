//! Courier's messaging core: users and their devices, conversations (direct and group), the message
//! log with per-conversation sequence numbers, and per-device delivery and read cursors.
//!
//! [`MessageStore`] is the one storage interface; it has two real backends, SQLite (the embedded
//! default) and PostgreSQL, built from the same SQL and held to one conformance suite
//! (`tests/conformance.rs`). Appends are idempotent on the sender's `client_id` and assign gapless,
//! strictly increasing `seq`s per conversation. How the tables shard is written at the top of the
//! migration. This crate must never reach into another crate's tables; it depends on `types` only.

mod http;
mod sql;
mod store;

pub use http::{BoxFuture, MediaAccess, router};
pub use sql::migrate;
pub use store::{
    Appended, Conversation, ConversationKind, ConversationSummary, Cursor, MAX_BODY_BYTES, MAX_CLIENT_ID_LEN,
    MAX_DEVICES, MAX_GROUP_MEMBERS, MAX_PAGE, Message, MessageStore, Role, StoreError,
};
