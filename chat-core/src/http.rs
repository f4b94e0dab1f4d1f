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
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use types::{Claims, ConversationId, DeviceId, ErrorBody, MediaId, TokenKeys, UserId};

use crate::{Appended, Conversation, ConversationKind, Message, MessageStore, StoreError};

/// Lifetime of a device-bound access token, in seconds.
const DEVICE_TOKEN_TTL: u64 = 24 * 3600;
/// Longest group or device name.
const MAX_NAME: usize = 128;

/// What messaging needs from media storage, which another crate owns: whether a user may send a
/// media record (they own it, or it was shared with them), and sharing it with a conversation's
/// members so they may read it and its variants.
pub trait MediaAccess: Send + Sync {
    fn may_share<'a>(&'a self, media: MediaId, user: &'a UserId) -> BoxFuture<'a, Result<bool, String>>;
    fn share<'a>(&'a self, media: MediaId, users: &'a [UserId]) -> BoxFuture<'a, Result<(), String>>;
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

struct Api<S> {
    store: Arc<S>,
    media: Arc<dyn MediaAccess>,
    keys: TokenKeys,
}

/// The routes, over `store`; `media` answers for media bodies; `keys` mint device-bound tokens.
pub fn router<S: MessageStore + 'static>(store: Arc<S>, media: Arc<dyn MediaAccess>, keys: TokenKeys) -> Router {
    Router::new()
        .route("/v1/devices", post(link_device::<S>))
        .route("/v1/conversations", post(create_conversation::<S>).get(list_conversations::<S>))
        .route("/v1/conversations/{id}/members", post(add_members::<S>))
        .route("/v1/conversations/{id}/members/{user}", delete(remove_member::<S>))
        .route("/v1/conversations/{id}/messages", post(send::<S>).get(history::<S>))
        .with_state(Arc::new(Api { store, media, keys }))
}

/// Everything the routes answer with when they refuse.
#[derive(Debug)]
enum ApiError {
    Store(StoreError),
    BadJson(String),
    Invalid(String),
    UnknownMedia,
    DeviceRequired,
    Media(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::Store(StoreError::NotMember) => {
                (StatusCode::NOT_FOUND, "not_found", "no such conversation".into())
            }
            ApiError::Store(StoreError::NotAdmin) => {
                (StatusCode::FORBIDDEN, "not_admin", "only admins may do that".into())
            }
            ApiError::Store(e @ StoreError::TooManyMembers) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "too_many_members", e.to_string())
            }
            ApiError::Store(e @ StoreError::TooManyDevices) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "too_many_devices", e.to_string())
            }
            ApiError::Store(StoreError::Invalid(m)) | ApiError::Invalid(m) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m)
            }
            ApiError::Store(e @ (StoreError::Database(_) | StoreError::Corrupt(_))) => {
                tracing::error!(error = %e, "chat request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side; try again".into())
            }
            ApiError::BadJson(m) => (StatusCode::BAD_REQUEST, "bad_json", m),
            ApiError::UnknownMedia => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_media",
                "the media is neither yours nor shared with you".into(),
            ),
            ApiError::Media(e) => {
                tracing::error!(error = %e, "media access failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side; try again".into())
            }
            ApiError::DeviceRequired => (
                StatusCode::FORBIDDEN,
                "device_token_required",
                "this needs a token bound to a device: link one with POST /v1/devices".into(),
            ),
        };
        (status, Json(ErrorBody::new(code, message))).into_response()
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t).map_err(|e| match e {
        JsonRejection::JsonDataError(e) => ApiError::Invalid(e.body_text()),
        other => ApiError::BadJson(other.body_text()),
    })
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

fn now() -> (u64, i64) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.as_millis() as i64)
}

#[derive(Deserialize)]
struct LinkDevice {
    name: String,
}

async fn link_device<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<LinkDevice>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let LinkDevice { name } = json_body(body)?;
    if name.trim().is_empty() || name.len() > MAX_NAME {
        return Err(ApiError::Invalid(format!("a device name is 1 to {MAX_NAME} bytes")));
    }
    let device = api.store.add_device(&claims.sub, name.trim()).await?;
    let token = api.keys.mint_for_device(&claims.sub, device, now().0, DEVICE_TOKEN_TTL);
    let body = json!({"user_id": claims.sub, "device_id": device.to_string(), "access_token": token, "expires_in": DEVICE_TOKEN_TTL});
    Ok((StatusCode::CREATED, Json(body)))
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

async fn create_conversation<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<NewConversation>, JsonRejection>,
) -> Result<(StatusCode, Json<ConversationView>), ApiError> {
    let request = json_body(body)?;
    let members = users(&request.members)?;
    let conversation = match request.kind.as_str() {
        "direct" => {
            let [other] = members.as_slice() else {
                return Err(ApiError::Invalid("a direct conversation names exactly one other member".into()));
            };
            api.store.direct(&claims.sub, other).await?
        }
        "group" => {
            let name = request.name.unwrap_or_default();
            if name.trim().is_empty() || name.len() > MAX_NAME {
                return Err(ApiError::Invalid(format!("a group name is 1 to {MAX_NAME} bytes")));
            }
            api.store.create_group(&claims.sub, name.trim(), &members).await?
        }
        other => return Err(ApiError::Invalid(format!("type is \"direct\" or \"group\", not {other:?}"))),
    };
    let status = if conversation.kind == ConversationKind::Group { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(ConversationView::of(conversation, None))))
}

async fn list_conversations<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
) -> Result<Json<Value>, ApiError> {
    let device = device(&claims)?;
    let list = api.store.conversations(&claims.sub, &device).await?;
    let views: Vec<ConversationView> =
        list.into_iter().map(|s| ConversationView::of(s.conversation, Some(s.unread))).collect();
    Ok(Json(json!({ "conversations": views })))
}

#[derive(Deserialize)]
struct Members {
    members: Vec<String>,
}

async fn add_members<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    body: Result<Json<Members>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    let members = users(&json_body(body)?.members)?;
    api.store.add_members(&id, &claims.sub, &members).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    let user: UserId = user.parse().map_err(|_| ApiError::Store(StoreError::NotMember))?;
    api.store.remove_member(&id, &claims.sub, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage {
    client_id: String,
    body: Value,
}

/// A message body is an object with exactly one of `text`, `media` (a media id, with an optional
/// `caption`) or `ciphertext` (base64). Returns the media id of a media message.
fn check_body(body: &Value) -> Result<Option<MediaId>, ApiError> {
    let invalid = |m: &str| Err(ApiError::Invalid(m.into()));
    let Some(object) = body.as_object() else { return invalid("body is a JSON object") };
    let kinds: Vec<&str> = ["text", "media", "ciphertext"].into_iter().filter(|k| object.contains_key(*k)).collect();
    let (allowed, media): (&[&str], Option<MediaId>) = match kinds.as_slice() {
        ["text"] => {
            if object["text"].as_str().is_none_or(|t| t.is_empty()) {
                return invalid("text is a non-empty string");
            }
            (&["text"], None)
        }
        ["ciphertext"] => {
            let decodes = object["ciphertext"]
                .as_str()
                .is_some_and(|c| !c.is_empty() && base64::engine::general_purpose::STANDARD.decode(c).is_ok());
            if !decodes {
                return invalid("ciphertext is non-empty standard base64");
            }
            (&["ciphertext"], None)
        }
        ["media"] => {
            let Some(id) = object["media"].as_str().and_then(|m| m.parse::<MediaId>().ok()) else {
                return invalid("media is a media id");
            };
            if object.get("caption").is_some_and(|c| !c.is_string()) {
                return invalid("caption is a string");
            }
            (&["media", "caption"], Some(id))
        }
        _ => return invalid("body has exactly one of text, media or ciphertext"),
    };
    if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::Invalid(format!("unknown body field {extra:?}")));
    }
    Ok(media)
}

#[derive(Serialize)]
struct MessageView {
    conversation: String,
    seq: i64,
    ts: i64,
    sender: UserId,
    client_id: String,
    body: Value,
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
        }
    }
}

async fn send<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    body: Result<Json<SendMessage>, JsonRejection>,
) -> Result<(StatusCode, Json<MessageView>), ApiError> {
    let device = device(&claims)?;
    let id = conversation_id(&id)?;
    let SendMessage { client_id, body } = json_body(body)?;
    let media = check_body(&body)?;
    if let Some(media) = media
        && !api.media.may_share(media, &claims.sub).await.map_err(ApiError::Media)?
    {
        return Err(ApiError::UnknownMedia);
    }
    let appended = api.store.append(&id, &claims.sub, &device, &client_id, &body.to_string(), now().1).await?;
    if let Some(media) = media {
        // Also on a retried send: a share lost to a crash after the append is made good.
        let members: Vec<UserId> = api.store.members(&id, &claims.sub).await?.into_iter().map(|(u, _)| u).collect();
        api.media.share(media, &members).await.map_err(ApiError::Media)?;
    }
    let status = match appended {
        Appended::New(_) => StatusCode::CREATED,
        Appended::Duplicate(_) => StatusCode::OK,
    };
    Ok((status, Json(MessageView::of(appended.message()))))
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

async fn history<S: MessageStore>(
    State(api): State<Arc<Api<S>>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = conversation_id(&id)?;
    let Query(page) = page.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let messages = api.store.messages_after(&id, &claims.sub, page.after.max(0), page.limit).await?;
    let views: Vec<MessageView> = messages.iter().map(MessageView::of).collect();
    Ok(Json(json!({ "messages": views })))
}
