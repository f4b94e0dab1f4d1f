//! The frames the server sends over `/v1/ws`, serialised once each (see PROTOCOL.md).

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use types::{ConversationId, UserId};

use crate::store::Message;

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ServerFrame<'a> {
    Sent {
        client_id: &'a str,
        conversation: ConversationId,
        seq: i64,
        ts: i64,
    },
    Message {
        conversation: ConversationId,
        seq: i64,
        ts: i64,
        sender: &'a UserId,
        client_id: &'a str,
        body: &'a RawValue,
        /// When the conversation's disappearing timer deletes it: the client deletes its copy then.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<i64>,
    },
    Receipt {
        conversation: ConversationId,
        user: &'a UserId,
        status: &'static str,
        seq: i64,
    },
    /// In a group of more than [`crate::chat::AGGREGATE_ABOVE`] members, to a sender: every other
    /// member has reached `status` up to `seq`.
    #[serde(rename = "group_receipt")]
    GroupReceipt {
        conversation: ConversationId,
        status: &'static str,
        seq: i64,
    },
    Typing {
        conversation: ConversationId,
        user: &'a UserId,
    },
    Presence {
        user: &'a UserId,
        online: bool,
        last_seen: i64,
    },
    /// Another device was linked to this account (or replaced one, which `replaced` names).
    #[serde(rename = "device_linked")]
    DeviceLinked {
        device_id: types::DeviceId,
        name: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        replaced: Option<types::DeviceId>,
    },
    /// A device of this account asks for another to be linked; another device answers it with a
    /// `link_answer` frame.
    #[serde(rename = "link_request")]
    LinkRequest {
        request: &'a str,
        name: &'a str,
        requested_by: types::DeviceId,
        requested_by_name: &'a str,
    },
    /// A media message sent while its media was still being processed: the media is ready (or
    /// failed) now, and this is what to draw it with (the message's `media_info` in history says
    /// the same from now on).
    #[serde(rename = "media_ready")]
    MediaReady {
        conversation: ConversationId,
        seq: i64,
        media: types::MediaId,
        media_info: &'a serde_json::Value,
    },
    /// One of the user's devices read a conversation up to `seq`: the others clear its unread.
    Read {
        conversation: ConversationId,
        seq: i64,
    },
    /// A user in one of this user's conversations (or this user) changed their profile: ask for
    /// it again (`GET /v1/users/{id}`) to get what you may see of it.
    Profile {
        user: &'a UserId,
        updated_at: i64,
    },
    /// The device's cursor fell behind retention: messages before `oldest_seq` are gone.
    Expired {
        conversation: ConversationId,
        oldest_seq: i64,
    },
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
    },
}

impl ServerFrame<'_> {
    pub(crate) fn encode(&self) -> Utf8Bytes {
        // Plain structs of strings and numbers always serialise.
        serde_json::to_string(self).unwrap_or_default().into()
    }
}

/// The `message` frame of a stored message.
pub(crate) fn message_frame(m: &Message) -> Utf8Bytes {
    // Bodies were checked as JSON on the way in; a body that is not would be a corrupt row.
    let null = RawValue::NULL;
    let body = serde_json::from_str::<&RawValue>(&m.body).unwrap_or(null);
    ServerFrame::Message {
        conversation: m.conversation,
        seq: m.seq,
        ts: m.created_at,
        sender: &m.sender,
        client_id: &m.client_id,
        body,
        expires_at: m.expires_at,
    }
    .encode()
}
