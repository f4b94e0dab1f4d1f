//! Courier's messaging core: phone accounts and their devices, conversations (direct and group),
//! the message log with per-conversation sequence numbers, per-device delivery and read cursors,
//! and the real-time gateway that delivers messages exactly once and in order (PROTOCOL.md).
//!
//! [`Store`] holds the tables, on SQLite (the embedded default) or PostgreSQL, held to one
//! conformance suite (`tests/conformance.rs`). Appends are idempotent on the sender's `client_id`
//! and assign gapless, strictly increasing `seq`s per conversation. How the tables shard is written
//! at the top of the migrations. [`Chat`] wires a store to the [`Hub`] of live connections and
//! exposes the routes and background tasks. This crate never reaches into another crate's tables;
//! it depends on `types` only.
//!
//! Modules import downward only, in this order: `store`, then `frames`, `hub`, `bus` and `error`,
//! then `chat` (the service) and `limits` (its shared rate limits), then `accounts`, `http`,
//! `privacy`, `gateway` and `tasks` (its faces).

mod accounts;
mod bus;
mod chat;
mod config;
mod error;
mod frames;
mod gateway;
mod http;
mod hub;
mod limits;
mod privacy;
mod profiles;
mod store;
mod tasks;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

pub use bus::Bus;
pub use chat::{BoxFuture, Chat, DeviceCheck, MediaAccess, media_source};
pub use config::{AuthConfig, ChatConfig};
pub use gateway::{CLOSE_IDLE, CLOSE_LOGGED_OUT, CLOSE_REPLACED, CLOSE_TOO_SLOW, MAX_CLIENT_FRAME};
pub use hub::Hub;
pub use store::{
    Acked, Appended, Change, CodeCheck, Contact, ContactEntry, Conversation, ConversationDetails, ConversationKind,
    ConversationSummary, Cursor, DELETE_WINDOW_MS, DELETED_BODY, DeviceInfo, EDIT_WINDOW_MS, EXPIRED_BODY, Effect,
    Flags, FlagsEdit, GroupInfo, InfoChange, LastMessage, LinkAnswer, LinkState, Linked, ListFrom, MAX_BODY_BYTES,
    MAX_CLIENT_ID_LEN, MAX_CODE_ATTEMPTS, MAX_CONTACTS, MAX_DEVICES, MAX_GROUP_MEMBERS, MAX_LIST_PAGE, MAX_PAGE,
    MAX_PAGE_BYTES, MAX_STORED_BODY_BYTES, Member, Members, Message, PURGE_SLICE, PageFrom, Privacy, Profile,
    ProfileEdit, PushIntent, PushTarget, Receipt, Role, Rotation, Spend, Store, StoreError, SyncState, Visibility,
    Write, Written,
};

impl Chat {
    /// Routes for authenticated callers: the server's auth layer puts [`types::Claims`] in the
    /// request extensions.
    pub fn user_routes(self: &Arc<Self>) -> Router {
        http::routes(self.clone())
    }

    /// Routes that authenticate on their own: sign-in (`/v1/auth/*`) and the gateway (`/v1/ws`,
    /// whose token may come in the query string, as browsers cannot set headers on WebSockets).
    pub fn public_routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/auth/code", post(accounts::request_code))
            .route("/v1/auth/verify", post(accounts::verify))
            .route("/v1/auth/refresh", post(accounts::refresh))
            .route("/v1/ws", get(gateway::upgrade))
            .with_state(self.clone())
    }
}
