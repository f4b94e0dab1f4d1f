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
use crate::hub::Event;
use crate::limits;
use crate::privacy;
use crate::store::{
    Appended, Change, Conversation, ConversationDetails, ConversationKind, ConversationSummary, FlagsEdit, InfoChange,
    LinkState, ListFrom, MAX_LIST_PAGE, MAX_PAGE, Message, PageFrom, StoreError,
};

/// Lifetime of a device-bound access token, in seconds.
const DEVICE_TOKEN_TTL: u64 = 24 * 3600;
/// Longest group or device name.
const MAX_NAME: usize = 128;
/// Longest group description, in bytes.
const MAX_DESCRIPTION: usize = 512;

/// The routes that need an authenticated caller ([`Claims`] in the extensions).
pub(crate) fn routes(chat: Arc<Chat>) -> Router {
    Router::new()
        .route("/v1/devices", post(link_device).get(list_devices))
        .route("/v1/conversations", post(create_conversation).get(list_conversations))
        .route("/v1/conversations/{id}", get(conversation_details).patch(update_group))
        .route("/v1/conversations/{id}/flags", put(set_flags))
        .route("/v1/conversations/{id}/members", post(add_members))
        .route("/v1/conversations/{id}/members/{user}", delete(remove_member))
        .route("/v1/conversations/{id}/admins/{user}", put(promote).delete(demote))
        .route("/v1/conversations/{id}/messages", post(send).get(history))
        .route("/v1/conversations/{id}/messages/{seq}/receipts", get(message_receipts))
        .route("/v1/devices/{id}", delete(unlink_device))
        .route("/v1/devices/requests", post(request_link))
        .route("/v1/devices/requests/{id}", get(link_status))
        .route("/v1/users/lookup", get(crate::accounts::lookup))
        .route("/v1/users/lookup-ids", post(crate::profiles::lookup_ids))
        .route("/v1/users/{id}", get(crate::profiles::show))
        .route("/v1/profile", get(crate::profiles::own).put(crate::profiles::update))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// Conversations a chat-list page holds unless asked for another number.
const DEFAULT_LIST_PAGE: i64 = 50;
/// Member ids a chat-list entry names (`member_count` says how many there are).
const LISTED_MEMBERS: usize = 32;
/// Characters of text a last-message preview keeps.
const PREVIEW_CHARS: usize = 100;

/// `GET /v1/conversations?after=CURSOR&limit=N`: what a chat list shows, pinned first, then by
/// last activity, newest first; `next` is the cursor of the page after this one (null at the end).
async fn list_conversations(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST_PAGE);
    if limit < 1 {
        return Err(ApiError::BadQuery("limit is at least 1".into()));
    }
    let limit = limit.min(MAX_LIST_PAGE);
    let from = match &query.after {
        Some(cursor) => Some(
            cursor
                .parse::<ListFrom>()
                .map_err(|()| ApiError::BadQuery("after is the next cursor of an earlier page".into()))?,
        ),
        None => None,
    };
    let page = chat.store.conversation_page(&claims.sub, from.as_ref(), limit).await?;
    let next =
        (page.len() as i64 == limit).then(|| page.last().map(|last| ListFrom::after(last).to_string())).flatten();
    let mut views = Vec::with_capacity(page.len());
    for summary in page {
        views.push(list_entry(&chat, &claims.sub, summary).await?);
    }
    Ok(Json(json!({ "conversations": views, "next": next, "limit": limit })))
}

/// One entry of a chat list: for a direct conversation the other member's profile (as the caller
/// may see it), for a group its avatar; the newest message previewed.
async fn list_entry(chat: &Chat, user: &UserId, summary: ConversationSummary) -> Result<Value, ApiError> {
    let ConversationSummary { conversation, unread, avatar, activity, member_count, flags, last } = summary;
    let members = chat.store.member_sample(&conversation.id, LISTED_MEMBERS as i64).await?;
    let peer = match conversation.kind {
        ConversationKind::Direct => match members.iter().find(|m| *m != user) {
            Some(other) => {
                let seen = chat.store.profiles_for(user, std::slice::from_ref(other)).await?;
                match seen.first() {
                    Some(profile) => Some(crate::profiles::view(chat, profile, false).await?),
                    None => Some(json!({ "id": other })),
                }
            }
            None => None,
        },
        ConversationKind::Group => None,
    };
    let avatar = match &avatar {
        Some(media) => chat.avatar(media).await?,
        None => None,
    };
    let last_message = match (last.sender, last.body, last.created_at) {
        (Some(sender), Some(body), Some(ts)) => {
            let mut preview = preview(&body);
            preview["seq"] = conversation.last_seq.into();
            preview["sender"] = sender.as_str().into();
            preview["ts"] = ts.into();
            Some(preview)
        }
        _ => None,
    };
    Ok(json!({
        "id": conversation.id.to_string(),
        "type": conversation.kind.as_str(),
        "name": conversation.name,
        "avatar": avatar,
        "peer": peer,
        "members": members,
        "member_count": member_count,
        "last_seq": conversation.last_seq,
        "last_message": last_message,
        "last_activity": activity,
        "unread": unread,
        "muted_until": muted_view(flags.muted_until),
        "archived": flags.archived,
        "pinned": flags.pinned,
    }))
}

/// What a chat list shows of a message: its kind and, for text, its first 100 characters.
fn preview(body: &str) -> Value {
    let Ok(Value::Object(body)) = serde_json::from_str::<Value>(body) else { return json!({ "kind": "unknown" }) };
    let cut = |text: &str| -> String {
        match text.char_indices().nth(PREVIEW_CHARS) {
            Some((end, _)) => format!("{}…", &text[..end]),
            None => text.to_owned(),
        }
    };
    let text = body.get("text").and_then(Value::as_str);
    if let Some(system) = body.get("system") {
        let mut preview = Value::Object(body.clone());
        preview["kind"] = "system".into();
        preview["system"] = system.clone();
        return preview;
    }
    if let Some(kind) = ["deleted", "expired"].into_iter().find(|k| body.contains_key(*k)) {
        return json!({ "kind": kind });
    }
    if body.contains_key("edit") {
        return json!({ "kind": "edit", "text": text.map(cut) });
    }
    if let Some(reaction) = body.get("reaction") {
        return json!({ "kind": "reaction", "reaction": reaction, "to": body.get("to") });
    }
    if let Some(secs) = body.get("disappearing") {
        return json!({ "kind": "disappearing", "disappearing": secs });
    }
    if let Some(text) = text {
        return json!({ "kind": "text", "text": cut(text) });
    }
    if body.contains_key("media") {
        let caption = body.get("caption").and_then(Value::as_str).map(cut);
        let media_kind = body.get("media_info").and_then(|info| info.get("kind"));
        return json!({ "kind": "media", "media_kind": media_kind, "caption": caption });
    }
    if body.contains_key("ciphertext") {
        return json!({ "kind": "ciphertext" });
    }
    json!({ "kind": "unknown" })
}

/// Muted until when, as JSON: a time (Unix ms), "always", or null.
fn muted_view(until: Option<i64>) -> Value {
    match until {
        Some(i64::MAX) => "always".into(),
        Some(at) => at.into(),
        None => Value::Null,
    }
}

/// `PUT /v1/conversations/{id}/flags` with any of `muted_until` (Unix ms, "always", or null to
/// unmute), `archived` and `pinned`: the caller's flags on a conversation, for all their devices,
/// which hear of it in a `flags` frame. Answers with the flags as they are now.
async fn set_flags(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    body: Result<Json<serde_json::Map<String, Value>>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let fields = json_body(body)?;
    if fields.is_empty() {
        return Err(ApiError::Invalid("give muted_until, archived or pinned".into()));
    }
    let mut edit = FlagsEdit::default();
    for (key, value) in &fields {
        match (key.as_str(), value) {
            ("muted_until", Value::Null) => edit.muted_until = Some(None),
            ("muted_until", Value::String(always)) if always == "always" => edit.muted_until = Some(Some(i64::MAX)),
            ("muted_until", Value::Number(at)) if at.as_i64().is_some_and(|at| at > 0) => {
                edit.muted_until = Some(at.as_i64());
            }
            ("muted_until", _) => {
                return Err(ApiError::Invalid("muted_until is a time in Unix ms, \"always\", or null".into()));
            }
            ("archived", Value::Bool(archived)) => edit.archived = Some(*archived),
            ("pinned", Value::Bool(pinned)) => edit.pinned = Some(*pinned),
            ("archived" | "pinned", _) => return Err(ApiError::Invalid(format!("{key} is true or false"))),
            (other, _) => return Err(ApiError::Invalid(format!("unknown field {other:?}"))),
        }
    }
    let flags = chat.store.set_flags(&claims.sub, &id, edit).await?;
    let view = json!({
        "conversation": id.to_string(),
        "muted_until": muted_view(flags.muted_until),
        "archived": flags.archived,
        "pinned": flags.pinned,
    });
    let mut frame = view.clone();
    frame["type"] = "flags".into();
    chat.fan_out(std::slice::from_ref(&claims.sub), Event::Frame(frame.to_string().into())).await;
    Ok(Json(view))
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
    chat.change(&claims.sub, &id, Change::Add(members)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    let user: UserId = user.parse().map_err(|_| ApiError::Store(StoreError::NotMember))?;
    chat.change(&claims.sub, &id, Change::Remove(user)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /v1/conversations/{id}/admins/{user}`: an admin makes a member an admin.
async fn promote(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    set_role(&chat, &claims, &id, &user, true).await
}

/// `DELETE /v1/conversations/{id}/admins/{user}`: an admin makes an admin (themselves included) a
/// member again; the last admin cannot (409 `last_admin`).
async fn demote(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    set_role(&chat, &claims, &id, &user, false).await
}

async fn set_role(chat: &Chat, claims: &Claims, id: &str, user: &str, admin: bool) -> Result<StatusCode, ApiError> {
    let id = conversation_id(id)?;
    let user: UserId = user.parse().map_err(|e| ApiError::Invalid(format!("{user:?}: {e}")))?;
    chat.change(&claims.sub, &id, Change::Role { user, admin }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/conversations/{id}`: what the conversation is, its settings and its members with their
/// roles, for one of its members.
async fn conversation_details(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let details = chat.store.details(&id, &claims.sub).await?;
    Ok(Json(details_view(&chat, details).await?))
}

/// A conversation's details as JSON, with its avatar as a client draws it.
async fn details_view(chat: &Chat, details: ConversationDetails) -> Result<Value, ApiError> {
    let ConversationDetails { conversation, info, disappear_secs, created_at, members } = details;
    let avatar = match &info.avatar {
        Some(media) => chat.avatar(media).await?,
        None => None,
    };
    let members: Vec<Value> =
        members.iter().map(|m| json!({"user": m.user, "role": m.role.as_str(), "joined_at": m.joined_at})).collect();
    Ok(json!({
        "id": conversation.id.to_string(),
        "type": conversation.kind.as_str(),
        "name": info.name,
        "description": info.description,
        "avatar": avatar,
        "info_by_all": info.info_by_all,
        "disappear_secs": disappear_secs,
        "created_at": created_at,
        "last_seq": conversation.last_seq,
        "members": members,
    }))
}

/// `PATCH /v1/conversations/{id}` with any of `name`, `description` (a string, or null to clear),
/// `avatar` (the media id of an image the caller may share, or null) and `info_by_all` (whether
/// every member may change those three; admins only): a group's settings, each change a system
/// message. Answers with the details as they are now.
async fn update_group(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    body: Result<Json<serde_json::Map<String, Value>>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let fields = json_body(body)?;
    let mut set = InfoChange::default();
    for (key, value) in &fields {
        match (key.as_str(), value) {
            ("name", Value::String(name)) if !name.trim().is_empty() && name.len() <= MAX_NAME => {
                set.name = Some(name.trim().to_owned());
            }
            ("name", _) => return Err(ApiError::Invalid(format!("a group name is 1 to {MAX_NAME} bytes"))),
            ("description", Value::Null) => set.description = Some(None),
            ("description", Value::String(text)) if text.len() <= MAX_DESCRIPTION => {
                set.description = Some(Some(text.clone()).filter(|t| !t.is_empty()));
            }
            ("description", _) => {
                return Err(ApiError::Invalid(format!("description is a string of at most {MAX_DESCRIPTION} bytes")));
            }
            ("avatar", Value::Null) => set.avatar = Some(None),
            ("avatar", Value::String(media)) => {
                let media: types::MediaId =
                    media.parse().map_err(|_| ApiError::Invalid("avatar is a media id, or null".into()))?;
                chat.check_avatar(&claims.sub, media).await?;
                set.avatar = Some(Some(media.to_string()));
            }
            ("avatar", _) => return Err(ApiError::Invalid("avatar is a media id, or null".into())),
            ("info_by_all", Value::Bool(all)) => set.info_by_all = Some(*all),
            ("info_by_all", _) => return Err(ApiError::Invalid("info_by_all is true or false".into())),
            (other, _) => return Err(ApiError::Invalid(format!("unknown field {other:?}"))),
        }
    }
    if fields.is_empty() {
        return Err(ApiError::Invalid("give name, description, avatar or info_by_all".into()));
    }
    let source = format!("avatar/group/{id}");
    let before = chat.store.details(&id, &claims.sub).await?.info.avatar;
    chat.change(&claims.sub, &id, Change::Info(set)).await?;
    let details = chat.store.details(&id, &claims.sub).await?;
    // The avatar now shown is held (the media stays while it is one); the one before let go.
    chat.hold_avatar(&claims.sub, &source, before.as_deref(), details.info.avatar.as_deref()).await?;
    Ok(Json(details_view(&chat, details).await?))
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
    let members = chat.store.member_receipts(&id).await?;
    // One who left reads their old messages, but learns nothing more of who read them.
    if !members.iter().any(|m| m.user == claims.sub) {
        return Err(StoreError::NotMember.into());
    }
    let (mut read, mut delivered, mut pending, mut withheld) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for member in members {
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
