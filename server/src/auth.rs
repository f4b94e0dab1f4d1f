//! Bearer-token authentication for user routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use types::{ErrorBody, TokenError, TokenKeys};

/// Lets the request through with its [`types::UserId`] in the extensions, or answers 401.
pub(crate) async fn require_user(State(keys): State<Arc<TokenKeys>>, mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    let (code, message) = match token.map(|t| keys.verify(t.trim())) {
        Some(Ok(claims)) => {
            request.extensions_mut().insert(claims.sub.clone());
            request.extensions_mut().insert(claims);
            return next.run(request).await;
        }
        None => ("missing_token", "an Authorization: Bearer token is required"),
        Some(Err(TokenError::Expired)) => ("token_expired", "the token has expired"),
        Some(Err(TokenError::Invalid)) => ("invalid_token", "the token is not valid"),
    };
    ingest::discard_body(request.into_body()).await;
    let mut response = (StatusCode::UNAUTHORIZED, Json(ErrorBody::new(code, message))).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}
