//! Errors of the blob tiers, and the one place they become HTTP responses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("the URL's signature is missing or invalid")]
    Forbidden,
    #[error("the URL has expired")]
    Expired,
    #[error("no such blob")]
    NotFound,
    #[error("the requested range is not satisfiable")]
    RangeNotSatisfiable { len: u64 },
    #[error("blob {0} did not match its hash and was not served")]
    VerifyFailed(types::BlobId),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the upstream failed: {0}")]
    Upstream(String),
    #[error("admin token missing or wrong")]
    Unauthorized,
    #[error("blob storage failed: {0}")]
    Storage(#[from] object_store::Error),
    #[error("blob storage failed: {0}")]
    Io(#[from] std::io::Error),
}

impl EdgeError {
    pub fn status(&self) -> StatusCode {
        match self {
            EdgeError::Forbidden | EdgeError::Expired => StatusCode::FORBIDDEN,
            EdgeError::NotFound => StatusCode::NOT_FOUND,
            EdgeError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            EdgeError::VerifyFailed(_) | EdgeError::Upstream(_) => StatusCode::BAD_GATEWAY,
            EdgeError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            EdgeError::Unauthorized => StatusCode::UNAUTHORIZED,
            EdgeError::Storage(_) | EdgeError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            EdgeError::Forbidden => "forbidden",
            EdgeError::Expired => "url_expired",
            EdgeError::NotFound => "not_found",
            EdgeError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            EdgeError::VerifyFailed(_) => "verify_failed",
            EdgeError::UpstreamTimeout => "upstream_timeout",
            EdgeError::Upstream(_) => "upstream_error",
            EdgeError::Unauthorized => "unauthorized",
            EdgeError::Storage(_) | EdgeError::Io(_) => "storage_error",
        }
    }
}

impl IntoResponse for EdgeError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = if status.is_server_error() {
            // Details (paths, store errors) go to the log, not to clients.
            tracing::error!(error = %self, "blob serving failed");
            match self {
                EdgeError::UpstreamTimeout => "the upstream did not answer in time; try again later".to_string(),
                EdgeError::VerifyFailed(_) | EdgeError::Upstream(_) => {
                    "the upstream did not deliver the blob; try again later".to_string()
                }
                _ => "the blob could not be read; try again later".to_string(),
            }
        } else {
            self.to_string()
        };
        let mut response = (status, Json(ErrorBody::new(self.code(), message))).into_response();
        if let EdgeError::RangeNotSatisfiable { len } = self {
            let value = HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii");
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        response
    }
}
