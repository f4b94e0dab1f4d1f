//! What chat-core answers when it refuses, over HTTP and as WebSocket `error` frames alike.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use types::{ErrorBody, UserId};

use crate::store::{CodeCheck, StoreError};

/// Everything the routes answer with when they refuse.
#[derive(Debug)]
pub(crate) enum ApiError {
    Store(StoreError),
    BadJson(String),
    /// A query string that does not hold what the route takes.
    BadQuery(String),
    Invalid(String),
    UnknownMedia,
    DeviceRequired,
    Media(String),
    RateLimited {
        retry_after_secs: u64,
    },
    /// The device that asked for a link tried to approve it itself.
    OwnLinkRequest,
    /// Another of the user's devices denied the link.
    LinkDenied,
    /// The operator sends no codes to this country calling code.
    CountryUnavailable(String),
    Code(CodeCheck),
    BadRefreshToken,
    NotFound(&'static str),
    /// Linking a device from a signed-in device needs a fresh SMS code, and this user has no phone.
    NoPhone,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl ApiError {
    /// Status, code and message.
    pub(crate) fn parts(self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::Store(StoreError::NotMember) => {
                (StatusCode::NOT_FOUND, "not_found", "no such conversation".into())
            }
            ApiError::Store(StoreError::NotAdmin) => {
                (StatusCode::FORBIDDEN, "not_admin", "only admins may do that".into())
            }
            ApiError::Store(e @ StoreError::DirectConversation) => {
                (StatusCode::CONFLICT, "direct_conversation", e.to_string())
            }
            ApiError::Store(e @ StoreError::TooManyMembers) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "too_many_members", e.to_string())
            }
            ApiError::Store(e @ StoreError::ClientIdReused) => (
                StatusCode::CONFLICT,
                "client_id_reused",
                format!("{e}: a retry sends the same body, a new message a new client_id"),
            ),
            ApiError::Store(e @ StoreError::UnknownMessage) => {
                (StatusCode::NOT_FOUND, "unknown_message", e.to_string())
            }
            ApiError::Store(e @ StoreError::NotSender) => (StatusCode::FORBIDDEN, "not_sender", e.to_string()),
            ApiError::Store(e @ StoreError::TooLate) => (StatusCode::CONFLICT, "too_late", e.to_string()),
            ApiError::Store(e @ StoreError::NotEditable) => (StatusCode::CONFLICT, "not_editable", e.to_string()),
            ApiError::Store(e @ StoreError::LastAdmin) => (StatusCode::CONFLICT, "last_admin", e.to_string()),
            // Callers answer a change that changed nothing as made; this is for one that does not.
            ApiError::Store(e @ StoreError::Unchanged) => (StatusCode::CONFLICT, "unchanged", e.to_string()),
            ApiError::Store(StoreError::UnknownUsers(users)) => {
                let users: Vec<&str> = users.iter().map(UserId::as_str).collect();
                (StatusCode::NOT_FOUND, "unknown_user", format!("no such users: {}", users.join(", ")))
            }
            ApiError::Store(StoreError::Invalid(m)) | ApiError::Invalid(m) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m)
            }
            ApiError::Store(e @ (StoreError::Database(_) | StoreError::Corrupt(_) | StoreError::Batch(_))) => {
                tracing::error!(error = %e, "chat request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side; try again".into())
            }
            ApiError::BadJson(m) => (StatusCode::BAD_REQUEST, "bad_json", m),
            ApiError::BadQuery(m) => (StatusCode::BAD_REQUEST, "invalid_request", m),
            ApiError::UnknownMedia => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_media",
                "the media is neither yours nor shared with you".into(),
            ),
            ApiError::Media(e) => {
                tracing::error!(error = %e, "media access failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side; try again".into())
            }
            ApiError::RateLimited { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests; try again in {retry_after_secs} s"),
            ),
            ApiError::OwnLinkRequest => (
                StatusCode::FORBIDDEN,
                "own_link_request",
                "a link is approved by another of your devices, not by the one that asked".into(),
            ),
            ApiError::LinkDenied => {
                (StatusCode::FORBIDDEN, "link_denied", "another of your devices denied this link".into())
            }
            ApiError::CountryUnavailable(code) => (
                StatusCode::FORBIDDEN,
                "country_unavailable",
                format!("this server sends no verification codes to this country ({code})"),
            ),
            ApiError::Code(check) => {
                let (code, message) = match check {
                    CodeCheck::Wrong | CodeCheck::Valid => ("wrong_code", "that is not the code we sent"),
                    CodeCheck::Expired => ("code_expired", "the code has expired; ask for a new one"),
                    CodeCheck::Locked => ("too_many_attempts", "too many wrong codes; ask for a new one"),
                    CodeCheck::Missing => ("no_code", "no code is pending for this phone; ask for one first"),
                };
                (StatusCode::UNPROCESSABLE_ENTITY, code, message.into())
            }
            ApiError::BadRefreshToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_refresh_token",
                "the refresh token is unknown, expired or already used; sign in again".into(),
            ),
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, "not_found", format!("no such {what}")),
            ApiError::NoPhone => (
                StatusCode::FORBIDDEN,
                "code_unavailable",
                "linking a device needs a code sent to the account's phone, and this account has none".into(),
            ),
            ApiError::DeviceRequired => (
                StatusCode::FORBIDDEN,
                "device_token_required",
                "this needs a token bound to a device: link one with POST /v1/devices".into(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        };
        let (status, code, message) = self.parts();
        let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// A JSON request body, or the error that says what was wrong with it.
pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t).map_err(|e| match e {
        JsonRejection::JsonDataError(e) => ApiError::Invalid(e.body_text()),
        other => ApiError::BadJson(other.body_text()),
    })
}
