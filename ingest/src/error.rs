//! Everything an upload or a media read can fail with, and its HTTP status and code.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use transcode::TranscodeError;
use types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    UnsupportedType(String),
    #[error("the body is {sniffed}, not the declared {declared}")]
    TypeMismatch { declared: &'static str, sniffed: String },
    #[error("the body is over the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the body is empty")]
    Empty,
    /// A job's failure; clients see its fixed message, never the detail.
    #[error("{}", .0.public_message())]
    Media(#[from] TranscodeError),
    /// An upload-time probe refused the bytes (or its worker died on them: hostile bytes too).
    #[error("{}", .0.public_message())]
    Probe(TranscodeError),
    /// Bytes whose transcode failed for good, with the job's code and message.
    #[error("{}", .0.message)]
    Rejected(types::ErrorDetail),
    #[error("the transcode queue is full; try again later")]
    QueueFull,
    #[error("too many uploads at once; try again later")]
    TooManyUploads,
    /// Over one of the user's quotas.
    #[error("{}", .0.message)]
    Quota(crate::QuotaExceeded),
    #[error("the upload was interrupted: {0}")]
    Interrupted(String),
    #[error("no such media")]
    NotFound,
    /// A resumable upload's request that does not say what the protocol needs.
    #[error("{0}")]
    BadRequest(String),
    /// A PATCH from another offset than where the upload stands.
    #[error("the upload is at offset {expected}; send from there")]
    OffsetMismatch { expected: u64 },
    /// Another PATCH is appending to the upload now.
    #[error("another request is appending to this upload; try again when it ends")]
    UploadLocked,
    /// A PATCH whose bytes do not have the checksum it named; they were discarded.
    #[error("the request's bytes do not match its Upload-Checksum; they were discarded")]
    ChecksumMismatch,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("storage: {0}")]
    Storage(#[from] edge_cache::EdgeError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::UnsupportedType(_) | IngestError::TypeMismatch { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Empty => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::Media(e) => match e {
                TranscodeError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                e if e.is_permanent() => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            IngestError::Probe(e) => match e {
                TranscodeError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                TranscodeError::Io(_) | TranscodeError::PoolClosed => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            },
            IngestError::Rejected(e) if e.code == "unsupported_media_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::QueueFull | IngestError::TooManyUploads => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Quota(q) if q.retry_after.is_some() => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Quota(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Interrupted(_) => StatusCode::BAD_REQUEST,
            IngestError::NotFound => StatusCode::NOT_FOUND,
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::OffsetMismatch { .. } => StatusCode::CONFLICT,
            IngestError::UploadLocked => StatusCode::LOCKED,
            // tus's checksum extension: 460 Checksum Mismatch.
            IngestError::ChecksumMismatch => StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
            IngestError::Database(_) | IngestError::Storage(_) | IngestError::Io(_) if self.storage_full() => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            IngestError::Database(_) | IngestError::Storage(_) | IngestError::Io(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Whether this failed because a disk, a quota on it, or the database file is full: the
    /// client can do nothing but try later, and the operator must add room.
    fn storage_full(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
            {
                return true;
            }
            // SQLite's SQLITE_FULL (13), PostgreSQL's disk_full (53100): the database or the disk
            // under it is full.
            if let Some(sqlx::Error::Database(db)) = e.downcast_ref::<sqlx::Error>()
                && matches!(db.code().as_deref(), Some("13" | "53100"))
            {
                return true;
            }
            cause = e.source();
        }
        false
    }

    pub fn code(&self) -> &str {
        match self {
            IngestError::UnsupportedType(_) => "unsupported_media_type",
            IngestError::TypeMismatch { .. } => "type_mismatch",
            IngestError::TooLarge { .. } => "payload_too_large",
            IngestError::Empty => "empty_body",
            IngestError::Media(e) | IngestError::Probe(e) => e.code(),
            IngestError::Rejected(e) => &e.code,
            IngestError::QueueFull => "queue_full",
            IngestError::TooManyUploads => "too_many_uploads",
            IngestError::Quota(_) => "quota_exceeded",
            IngestError::Interrupted(_) => "upload_interrupted",
            IngestError::NotFound => "not_found",
            IngestError::BadRequest(_) => "bad_request",
            IngestError::OffsetMismatch { .. } => "offset_mismatch",
            IngestError::UploadLocked => "upload_locked",
            IngestError::ChecksumMismatch => "checksum_mismatch",
            IngestError::Database(_) | IngestError::Storage(_) | IngestError::Io(_) if self.storage_full() => {
                "storage_full"
            }
            IngestError::Database(_) | IngestError::Storage(_) | IngestError::Io(_) => "internal",
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let IngestError::Media(e) | IngestError::Probe(e) = &self {
            // The detail (a decoder's words) is for the log; the client gets the fixed message.
            tracing::info!(code = e.code(), detail = %e, "media refused");
        }
        let message = if status == StatusCode::INSUFFICIENT_STORAGE {
            tracing::error!(error = ?self, "storage is full: an upload was refused");
            "the server's storage is full; try again later".to_string()
        } else if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = ?self, "ingest request failed");
            "something went wrong on our side; try again".to_string()
        } else {
            self.to_string()
        };
        let mut response = (status, Json(ErrorBody::new(self.code(), message))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let IngestError::Quota(crate::QuotaExceeded { retry_after: Some(secs), .. }) = &self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        response
    }
}
