//! Bearer-token authentication for user routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chat_core::DeviceCheck;
use types::{ErrorBody, TokenError, TokenKeys, bearer_token};

/// What checking a token needs: the signing keys, and whether a device is still linked.
#[derive(Clone)]
pub(crate) struct Auth {
    pub(crate) keys: Arc<TokenKeys>,
    pub(crate) devices: Arc<dyn DeviceCheck>,
}

/// Lets the request through with its [`types::UserId`] and [`types::Claims`] in the extensions, or
/// answers 401. A token bound to a device that was logged out is refused like an invalid one.
pub(crate) async fn require_user(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let token = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    let (status, code, message) = match token.map(|t| auth.keys.verify(t)) {
        Some(Ok(claims)) => {
            let active = match claims.dev {
                None => Ok(true),
                Some(device) => auth.devices.device_active(&claims.sub, device).await,
            };
            match active {
                Ok(true) => {
                    request.extensions_mut().insert(claims.sub.clone());
                    request.extensions_mut().insert(claims);
                    return next.run(request).await;
                }
                Ok(false) => (StatusCode::UNAUTHORIZED, "device_logged_out", "this device was logged out"),
                Err(e) => {
                    tracing::error!(error = %e, "could not check a device");
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side; try again")
                }
            }
        }
        None => (StatusCode::UNAUTHORIZED, "missing_token", "an Authorization: Bearer token is required"),
        Some(Err(TokenError::Expired)) => (StatusCode::UNAUTHORIZED, "token_expired", "the token has expired"),
        Some(Err(TokenError::Invalid)) => (StatusCode::UNAUTHORIZED, "invalid_token", "the token is not valid"),
    };
    ingest::discard_body(request.into_body()).await;
    let mut response = (status, Json(ErrorBody::new(code, message))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
