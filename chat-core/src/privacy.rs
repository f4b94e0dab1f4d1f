//! Who learns what about a user: their contacts (`/v1/contacts`) and whether they share their
//! last-seen time (`/v1/privacy`).
//!
//! Presence and typing go to a user's audience only: the contacts they added, and whoever they have
//! exchanged messages with both ways in a direct conversation (see [`crate::Store::audience`]).
//! Knowing a phone number, and opening a direct conversation with it, earns a stranger nothing
//! until the owner answers; receipts are not shared in a conversation the reader never answered.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};
use types::{Claims, UserId};

use crate::chat::Chat;
use crate::error::{ApiError, json_body};
use crate::frames::ServerFrame;
use crate::hub::Event;
use crate::limits;
use crate::store::{MAX_CONTACTS, Privacy};

fn user_id(id: &str) -> Result<UserId, ApiError> {
    id.parse().map_err(|e| ApiError::Invalid(format!("{id:?}: {e}")))
}

/// `GET /v1/contacts`: the caller's contacts, oldest first.
pub(crate) async fn list(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
) -> Result<Json<Value>, ApiError> {
    let contacts = chat.store.contact_list(&claims.sub).await?;
    let contacts: Vec<Value> =
        contacts.iter().map(|c| json!({ "user_id": c.user, "added_at": c.created_at })).collect();
    Ok(Json(json!({ "contacts": contacts })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Contacts {
    users: Vec<String>,
}

/// `PUT /v1/contacts {"users": [...]}`: the caller's whole contact list (an address book synced
/// after looking its numbers up), replacing the one before.
pub(crate) async fn replace(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<Contacts>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Contacts { users } = json_body(body)?;
    if users.len() > MAX_CONTACTS {
        return Err(ApiError::Invalid(format!("a user keeps at most {MAX_CONTACTS} contacts")));
    }
    let users = users.iter().map(|u| user_id(u)).collect::<Result<Vec<_>, _>>()?;
    chat.limit(limits::CONTACT_CHANGES_PER_USER, claims.sub.as_str()).await?;
    let before = chat.store.audience(&claims.sub).await?;
    chat.store.add_contacts(&claims.sub, &users, true).await?;
    chat.hide_from_dropped(&claims.sub, before).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /v1/contacts/{user}`: adds one contact.
pub(crate) async fn add(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let contact = user_id(&id)?;
    if contact == claims.sub {
        return Err(ApiError::Invalid("a user is not their own contact".into()));
    }
    chat.limit(limits::CONTACT_CHANGES_PER_USER, claims.sub.as_str()).await?;
    chat.store.add_contacts(&claims.sub, &[contact], false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/contacts/{user}`: takes a contact off the list; they see the caller's presence no
/// more (unless the two have exchanged messages both ways), and are told the caller is offline.
pub(crate) async fn remove(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let contact = user_id(&id)?;
    chat.limit(limits::CONTACT_CHANGES_PER_USER, claims.sub.as_str()).await?;
    if chat.store.remove_contact(&claims.sub, &contact).await? {
        chat.hide_from_dropped(&claims.sub, vec![contact]).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("contact"))
    }
}

impl Chat {
    /// Tells those of `dropped` who are no longer in `user`'s audience that `user` is offline (an
    /// "online" they saw last would otherwise stay on their screen).
    async fn hide_from_dropped(&self, user: &UserId, dropped: Vec<UserId>) -> Result<(), ApiError> {
        let audience: HashSet<UserId> = self.store.audience(user).await?.into_iter().collect();
        let gone: Vec<UserId> = dropped.into_iter().filter(|u| !audience.contains(u)).collect();
        if !gone.is_empty() {
            let frame = ServerFrame::Presence { user, online: false, last_seen: 0 }.encode();
            self.fan_out(&gone, Event::Frame(frame)).await;
        }
        Ok(())
    }
}

fn privacy_view(privacy: Privacy) -> Json<Value> {
    Json(json!({ "share_last_seen": privacy.share_last_seen }))
}

/// `GET /v1/privacy`: what the caller shares.
pub(crate) async fn get_privacy(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
) -> Result<Json<Value>, ApiError> {
    Ok(privacy_view(chat.store.privacy(&claims.sub).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrivacyUpdate {
    share_last_seen: bool,
}

/// `PUT /v1/privacy {"share_last_seen": false}`: presence frames about the caller carry
/// `last_seen: 0` from now on.
pub(crate) async fn put_privacy(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<PrivacyUpdate>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let PrivacyUpdate { share_last_seen } = json_body(body)?;
    let privacy = Privacy { share_last_seen };
    chat.store.set_privacy(&claims.sub, privacy).await?;
    Ok(privacy_view(privacy))
}
