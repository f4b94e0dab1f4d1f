//! chat-core's HTTP routes: devices, conversations and messages.
//!
//! Routes expect the caller's [`Claims`] in the request extensions (the server's auth layer puts them
//! there). Sending, reading the conversation list (unread counts are per device) and cursors need a
//! token bound to a device: `POST /v1/devices` links one and returns such a token.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use types::{Claims, ConversationId, DeviceId, UserId};

use crate::chat::{Chat, LINK_REQUEST_TTL_SECS};
use crate::error::{ApiError, json_body};
use crate::limits;
use crate::privacy;
use crate::store::{Appended, Conversation, ConversationKind, LinkState, MAX_PAGE, Message, PageFrom, StoreError};

/// Lifetime of a device-bound access token, in seconds.
const DEVICE_TOKEN_TTL: u64 = 24 * 3600;
/// Longest group or device name.
const MAX_NAME: usize = 128;

/// The routes that need an authenticated caller ([`Claims`] in the extensions).
pub(crate) fn routes(chat: Arc<Chat>) -> Router {
    Router::new()
        .route("/v1/devices", post(link_device).get(list_devices))
        .route("/v1/conversations", post(create_conversation).get(list_conversations))
        .route("/v1/conversations/{id}/members", post(add_members))
        .route("/v1/conversations/{id}/members/{user}", delete(remove_member))
        .route("/v1/conversations/{id}/messages", post(send).get(history))
        .route("/v1/conversations/{id}/messages/{seq}/receipts", get(message_receipts))
        .route("/v1/devices/{id}", delete(unlink_device))
        .route("/v1/devices/requests", post(request_link))
        .route("/v1/devices/requests/{id}", get(link_status))
        .route("/v1/users/lookup", get(crate::accounts::lookup))
        .route("/v1/contacts", get(privacy::list).put(privacy::replace))
        .route("/v1/contacts/discover", post(crate::accounts::discover))
        .route("/v1/contacts/{user}", put(privacy::add).delete(privacy::remove))
        .route("/v1/privacy", get(privacy::get_privacy).put(privacy::put_privacy))
        .with_state(chat)
}

fn device(claims: &Claims) -> Result<DeviceId, ApiError> {
    claims.dev.ok_or(ApiError::DeviceRequired)
}

fn conversation_id(id: &str) -> Result<ConversationId, ApiError> {
    id.parse().map_err(|_| ApiError::Store(StoreError::NotMember))
}

fn users(names: &[String]) -> Result<Vec<UserId>, ApiError> {
    names.iter().map(|n| n.parse().map_err(|e| ApiError::Invalid(format!("{n:?}: {e}")))).collect()
}

/// Conversations are only with users that exist: a typo is 404 `unknown_user` naming it, not a
/// chat nobody reads.
async fn known(chat: &Chat, users: &[UserId]) -> Result<(), ApiError> {
    let unknown = chat.store.unknown_users(users).await?;
    if unknown.is_empty() { Ok(()) } else { Err(StoreError::UnknownUsers(unknown).into()) }
}

fn now() -> (u64, i64) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.as_millis() as i64)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkDevice {
    name: String,
    /// A fresh SMS code for the account's phone; needed when the caller is a signed-in device.
    #[serde(default)]
    code: Option<String>,
}

async fn link_device(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<LinkDevice>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let LinkDevice { name, code } = json_body(body)?;
    if name.trim().is_empty() || name.len() > MAX_NAME {
        return Err(ApiError::Invalid(format!("a device name is 1 to {MAX_NAME} bytes")));
    }
    // A device's token needs the phone's code as well. A user token (no device: minted by the
    // operator with `courier token`) links as the operator's tool.
    if claims.dev.is_some() {
        crate::accounts::check_link_code(&chat, &claims.sub, code.as_deref()).await?;
    }
    let linked = chat.store.add_device(&claims.sub, name.trim()).await?;
    chat.linked(&claims.sub, linked, name.trim()).await;
    Ok((StatusCode::CREATED, Json(device_session(&chat, &claims.sub, linked.device))))
}

/// A newly linked device's ids and access token.
fn device_session(chat: &Chat, user: &UserId, device: DeviceId) -> Value {
    let token = chat.keys.mint_for_device(user, device, now().0, DEVICE_TOKEN_TTL);
    json!({"user_id": user, "device_id": device.to_string(), "access_token": token, "expires_in": DEVICE_TOKEN_TTL})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkRequest {
    name: String,
}

/// `POST /v1/devices/requests {"name"}`: asks the user's other devices to approve linking one more
/// (the way to link without an SMS code). 202 with the request's id; the other devices get a
/// `link_request` frame and answer it over the gateway.
async fn request_link(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<LinkRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let LinkRequest { name } = json_body(body)?;
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ApiError::Invalid(format!("a device name is 1 to {MAX_NAME} bytes")));
    }
    let device = device(&claims)?;
    // Each request prompts the user's devices: a stolen token cannot flood them with prompts.
    chat.limit(limits::LINKS_PER_USER, claims.sub.as_str()).await?;
    let request = chat.request_link(&claims.sub, device, name).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "request_id": request, "expires_in": LINK_REQUEST_TTL_SECS }))))
}

/// `GET /v1/devices/requests/{id}`: for the device that asked, where its request stands: 202
/// pending, 201 with the new device's token once approved (handed over once), 403 `link_denied`.
async fn link_status(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let device = device(&claims)?;
    match chat.store.collect_link(&id, &claims.sub, &device, now().1).await? {
        LinkState::Pending => Ok((StatusCode::ACCEPTED, Json(json!({ "status": "pending" })))),
        LinkState::Linked(new) => Ok((StatusCode::CREATED, Json(device_session(&chat, &claims.sub, new)))),
        LinkState::Denied => Err(ApiError::LinkDenied),
        LinkState::Unknown => Err(ApiError::NotFound("link request")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConversation {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Serialize)]
struct ConversationView {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    last_seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread: Option<i64>,
}

impl ConversationView {
    fn of(c: Conversation, unread: Option<i64>) -> Self {
        Self { id: c.id.to_string(), kind: c.kind.as_str(), name: c.name, last_seq: c.last_seq, unread }
    }
}

async fn create_conversation(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<NewConversation>, JsonRejection>,
) -> Result<(StatusCode, Json<ConversationView>), ApiError> {
    let request = json_body(body)?;
    let members = users(&request.members)?;
    known(&chat, &members).await?;
    let conversation = match request.kind.as_str() {
        "direct" => {
            let [other] = members.as_slice() else {
                return Err(ApiError::Invalid("a direct conversation names exactly one other member".into()));
            };
            chat.store.direct(&claims.sub, other).await?
        }
        "group" => {
            let name = request.name.unwrap_or_default();
            if name.trim().is_empty() || name.len() > MAX_NAME {
                return Err(ApiError::Invalid(format!("a group name is 1 to {MAX_NAME} bytes")));
            }
            chat.store.create_group(&claims.sub, name.trim(), &members).await?
        }
        other => return Err(ApiError::Invalid(format!("type is \"direct\" or \"group\", not {other:?}"))),
    };
    let status = if conversation.kind == ConversationKind::Group { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(ConversationView::of(conversation, None))))
}

async fn list_conversations(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
) -> Result<Json<Value>, ApiError> {
    let device = device(&claims)?;
    let list = chat.store.conversations(&claims.sub, &device).await?;
    let views: Vec<ConversationView> =
        list.into_iter().map(|s| ConversationView::of(s.conversation, Some(s.unread))).collect();
    Ok(Json(json!({ "conversations": views })))
}

#[derive(Deserialize)]
struct Members {
    members: Vec<String>,
}

async fn add_members(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    body: Result<Json<Members>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    let members = users(&json_body(body)?.members)?;
    known(&chat, &members).await?;
    chat.store.add_members(&id, &claims.sub, &members).await?;
    chat.forget_members(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    let user: UserId = user.parse().map_err(|_| ApiError::Store(StoreError::NotMember))?;
    chat.store.remove_member(&id, &claims.sub, &user).await?;
    chat.forget_members(&id).await;
    // The one who left may have been the last to read: a large group's totals may move.
    chat.receipts_moved.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage {
    client_id: String,
    body: Value,
}

#[derive(Serialize)]
struct MessageView {
    conversation: String,
    seq: i64,
    ts: i64,
    sender: UserId,
    client_id: String,
    body: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

impl MessageView {
    fn of(m: &Message) -> Self {
        Self {
            conversation: m.conversation.to_string(),
            seq: m.seq,
            ts: m.created_at,
            sender: m.sender.clone(),
            client_id: m.client_id.clone(),
            // Bodies were checked as JSON on the way in.
            body: serde_json::from_str(&m.body).unwrap_or(Value::Null),
            expires_at: m.expires_at,
        }
    }
}

async fn send(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    body: Result<Json<SendMessage>, JsonRejection>,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    let device = device(&claims)?;
    let id = conversation_id(&id)?;
    let SendMessage { client_id, body } = json_body(body)?;
    let appended = chat.send(&claims.sub, device, &id, &client_id, &body).await?;
    let status = match appended {
        Appended::New(_) => StatusCode::CREATED,
        Appended::Duplicate(_) => StatusCode::OK,
    };
    Ok((status, Json(MessageView::of(appended.message()))))
}

#[derive(Deserialize)]
struct Page {
    after: Option<i64>,
    before: Option<i64>,
    limit: Option<i64>,
}

/// Messages a history page holds unless asked for another number.
const DEFAULT_PAGE: i64 = 100;

/// `GET /v1/conversations/{id}/messages?after=SEQ|before=SEQ&limit=N`: a page of history in seq
/// order, forward from `after` (default 0) or back from `before`; `limit` is 1 to 500 (more is
/// capped, and the answer says how many it took), `has_more` whether the page stopped short.
async fn history(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let Query(page) = page.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if limit < 1 {
        return Err(ApiError::BadQuery("limit is at least 1".into()));
    }
    let limit = limit.min(MAX_PAGE);
    let from = match (page.after, page.before) {
        (Some(_), Some(_)) => return Err(ApiError::BadQuery("give after or before, not both".into())),
        (_, Some(before)) if before < 1 => return Err(ApiError::BadQuery("before is a seq, at least 1".into())),
        (_, Some(before)) => PageFrom::Before(before),
        (after, None) => PageFrom::After(after.unwrap_or(0).max(0)),
    };
    let (messages, has_more) = chat.store.history_page(&id, &claims.sub, from, limit).await?;
    let views: Vec<MessageView> = messages.iter().map(MessageView::of).collect();
    Ok(Json(json!({ "messages": views, "has_more": has_more, "limit": limit })))
}

/// `GET /v1/conversations/{id}/messages/{seq}/receipts`: for the sender of a message, who of the
/// other members (those in the conversation when it was sent) has read it, got it, or neither.
/// Members who never wrote in the conversation share no receipts and are only counted.
async fn message_receipts(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path((id, seq)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let Some(seq) = seq.parse::<i64>().ok().filter(|s| *s > 0) else {
        return Err(ApiError::Invalid("seq is a positive integer".into()));
    };
    let found = chat.store.messages_after(&id, &claims.sub, seq - 1, 1).await?;
    let Some(message) = found.into_iter().find(|m| m.seq == seq) else {
        return Err(StoreError::UnknownMessage.into());
    };
    if message.sender != claims.sub {
        return Err(StoreError::NotSender.into());
    }
    let (mut read, mut delivered, mut pending, mut withheld) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for member in chat.store.member_receipts(&id).await? {
        if member.user == claims.sub || member.joined_seq >= seq {
            continue;
        }
        if !member.answered {
            withheld += 1;
        } else if member.read >= seq {
            read.push(member.user);
        } else if member.delivered >= seq {
            delivered.push(member.user);
        } else {
            pending.push(member.user);
        }
    }
    Ok(Json(json!({"seq": seq, "read": read, "delivered": delivered, "pending": pending, "withheld": withheld})))
}

/// `GET /v1/devices`: the caller's linked devices, so a stolen token's devices can be seen and
/// unlinked.
async fn list_devices(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
) -> Result<Json<Value>, ApiError> {
    let devices = chat.store.devices(&claims.sub).await?;
    let devices: Vec<Value> = devices
        .iter()
        .map(|d| {
            json!({
                "id": d.id.to_string(),
                "name": d.name,
                "created_at": d.created_at,
                "last_seen": d.last_seen.unwrap_or(d.created_at),
                "current": claims.dev == Some(d.id),
            })
        })
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

async fn unlink_device(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let device: DeviceId = id.parse().map_err(|_| ApiError::NotFound("device"))?;
    if chat.log_out(&claims.sub, device).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("device"))
    }
}
