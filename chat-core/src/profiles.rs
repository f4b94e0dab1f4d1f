//! Who is who: a user's profile (`/v1/profile`) and other users' as the caller may see them
//! (`/v1/users/{id}`, `/v1/users/lookup-ids`).
//!
//! A name goes to whoever shares a group with its owner, or a direct conversation in which the
//! owner has written, and to the owner's contacts: a stranger who opens a direct conversation
//! learns nothing until the owner answers. The about line and avatar go where the owner's
//! `visibility` says: everyone who sees the name, their contacts (the default), or nobody. A
//! change reaches the owner's conversations as a `profile` frame, which says only who changed:
//! each device asks again, and is answered what it may see. Changes and reads are rate-limited
//! per user (see [`crate::limits`]).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use types::{Claims, MediaId, UserId};

use crate::chat::Chat;
use crate::error::{ApiError, json_body};
use crate::frames::ServerFrame;
use crate::hub::Event;
use crate::limits;
use crate::store::{Profile, ProfileEdit, Visibility};

/// Longest profile name, in bytes.
const MAX_NAME: usize = 64;
/// Longest about line, in bytes.
const MAX_ABOUT: usize = 280;
/// Most users one `lookup-ids` call asks for.
const MAX_LOOKUP: usize = 256;

/// A profile as JSON, its avatar as a client draws it; `visibility` only for its owner.
pub(crate) async fn view(chat: &Chat, profile: &Profile, own: bool) -> Result<Value, ApiError> {
    let avatar = match &profile.avatar {
        Some(media) => chat.avatar(media).await?,
        None => None,
    };
    let mut view = json!({
        "id": profile.user,
        "name": profile.name,
        "about": profile.about,
        "avatar": avatar,
        "updated_at": profile.updated_at,
    });
    if own {
        view["visibility"] = profile.visibility.as_str().into();
    }
    Ok(view)
}

/// `GET /v1/profile`: the caller's own profile, with who sees its about line and avatar.
pub(crate) async fn own(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
) -> Result<Json<Value>, ApiError> {
    let profile = chat.store.profile(&claims.sub).await?;
    Ok(Json(view(&chat, &profile, true).await?))
}

/// `PUT /v1/profile` with any of `name` (1 to 64 bytes), `about` (up to 280 bytes, or null),
/// `avatar` (the media id of an image the caller may share, or null) and `visibility`
/// (`everyone`, `contacts` or `nobody`): changes those, leaves the rest, and answers with the
/// profile as it is now. The caller's conversations get a `profile` frame.
pub(crate) async fn update(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let fields = json_body(body)?;
    if fields.is_empty() {
        return Err(ApiError::Invalid("give name, about, avatar or visibility".into()));
    }
    let mut edit = ProfileEdit::default();
    for (key, value) in &fields {
        match (key.as_str(), value) {
            ("name", Value::String(name)) if !name.trim().is_empty() && name.trim().len() <= MAX_NAME => {
                edit.name = Some(Some(name.trim().to_owned()));
            }
            ("name", _) => return Err(ApiError::Invalid(format!("name is 1 to {MAX_NAME} bytes"))),
            ("about", Value::Null) => edit.about = Some(None),
            ("about", Value::String(about)) if about.len() <= MAX_ABOUT => {
                edit.about = Some(Some(about.clone()).filter(|a| !a.trim().is_empty()));
            }
            ("about", _) => return Err(ApiError::Invalid(format!("about is at most {MAX_ABOUT} bytes, or null"))),
            ("avatar", Value::Null) => edit.avatar = Some(None),
            ("avatar", Value::String(media)) => {
                let media: MediaId =
                    media.parse().map_err(|_| ApiError::Invalid("avatar is a media id, or null".into()))?;
                chat.check_avatar(&claims.sub, media).await?;
                edit.avatar = Some(Some(media.to_string()));
            }
            ("avatar", _) => return Err(ApiError::Invalid("avatar is a media id, or null".into())),
            ("visibility", Value::String(v)) if Visibility::parse(v).is_some() => {
                edit.visibility = Visibility::parse(v)
            }
            ("visibility", _) => {
                return Err(ApiError::Invalid("visibility is \"everyone\", \"contacts\" or \"nobody\"".into()));
            }
            (other, _) => return Err(ApiError::Invalid(format!("unknown field {other:?}"))),
        }
    }
    chat.limit(limits::PROFILE_CHANGES_PER_USER, claims.sub.as_str()).await?;
    let source = format!("avatar/user/{}", claims.sub);
    let before = chat.store.profile(&claims.sub).await?;
    let profile = chat.store.set_profile(&claims.sub, &edit).await?;
    // The avatar now shown is held (the media stays while it is one); the one before let go.
    chat.hold_avatar(&claims.sub, &source, before.avatar.as_deref(), profile.avatar.as_deref()).await?;
    let mut watchers = chat.store.profile_watchers(&claims.sub).await?;
    if !watchers.contains(&claims.sub) {
        watchers.push(claims.sub.clone());
    }
    let frame = ServerFrame::Profile { user: &claims.sub, updated_at: profile.updated_at }.encode();
    chat.fan_out(&watchers, Event::Frame(frame)).await;
    Ok(Json(view(&chat, &profile, true).await?))
}

/// `GET /v1/users/{id}`: a user's profile as the caller may see it; 404 when they may not see it
/// (or there is no such user).
pub(crate) async fn show(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::NotFound("user");
    let user: UserId = id.parse().map_err(|_| not_found())?;
    chat.limit(limits::PROFILE_READS_PER_USER, claims.sub.as_str()).await?;
    let seen = chat.store.profiles_for(&claims.sub, std::slice::from_ref(&user)).await?;
    let profile = seen.into_iter().next().ok_or_else(not_found)?;
    Ok(Json(view(&chat, &profile, profile.user == claims.sub).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LookupIds {
    ids: Vec<String>,
}

/// `POST /v1/users/lookup-ids {"ids": [...]}` (at most 256): the profiles the caller may see of
/// those users, in the order asked; the others are left out.
pub(crate) async fn lookup_ids(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<LookupIds>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let LookupIds { ids } = json_body(body)?;
    if ids.len() > MAX_LOOKUP {
        return Err(ApiError::Invalid(format!("ask for at most {MAX_LOOKUP} users at once")));
    }
    let mut users: Vec<UserId> = Vec::with_capacity(ids.len());
    for id in &ids {
        let user: UserId = id.parse().map_err(|e| ApiError::Invalid(format!("{id:?}: {e}")))?;
        if !users.contains(&user) {
            users.push(user);
        }
    }
    chat.limit(limits::PROFILE_READS_PER_USER, claims.sub.as_str()).await?;
    let mut views = Vec::new();
    for profile in chat.store.profiles_for(&claims.sub, &users).await? {
        views.push(view(&chat, &profile, profile.user == claims.sub).await?);
    }
    Ok(Json(json!({ "users": views })))
}
