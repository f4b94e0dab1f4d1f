//! The operator's routes on `courier serve`, behind `admin_token`: the feed of deleted blobs an
//! edge purge job follows (`GET /admin/deleted-blobs?after=SEQ&limit=N`).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ingest::Ingest;
use serde::Deserialize;
use serde_json::json;
use types::ErrorBody;

/// Most deleted blobs one answer lists.
const MAX_FEED: i64 = 10_000;

#[derive(Clone)]
struct Admin {
    ingest: Arc<Ingest>,
    /// The token's hash: comparing hashes is constant-time (blake3::Hash's Eq is).
    token: blake3::Hash,
}

/// The routes, when an admin token is configured (else none: they answer 404 like any unknown path).
pub(crate) fn routes(ingest: Arc<Ingest>, token: Option<&str>) -> Router {
    let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else { return Router::new() };
    let admin = Admin { ingest, token: blake3::hash(token.as_bytes()) };
    Router::new().route("/admin/deleted-blobs", get(deleted_blobs)).with_state(admin)
}

#[derive(Deserialize)]
struct Feed {
    after: Option<i64>,
    limit: Option<i64>,
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(ErrorBody::new(code, message))).into_response()
}

/// `{"blobs":[{"seq","namespace","blob","deleted_at"}],"next":SEQ}`: the blobs deleted after
/// `after` (default 0), oldest first, up to `limit` (default and most 10,000); `next` is the
/// `after` of the following call. Edges cache variants: purge those (`DELETE /admin/blobs/{blob}`
/// on each edge).
async fn deleted_blobs(
    State(admin): State<Admin>,
    headers: HeaderMap,
    query: Result<Query<Feed>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| types::bearer_token(v.to_str().ok()?));
    if given.map(|t| blake3::hash(t.trim().as_bytes())) != Some(admin.token) {
        return refuse(StatusCode::UNAUTHORIZED, "invalid_token", "this route needs the admin token");
    }
    let Ok(Query(feed)) = query else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "after and limit are integers");
    };
    let after = feed.after.unwrap_or(0).max(0);
    let limit = feed.limit.unwrap_or(MAX_FEED).clamp(1, MAX_FEED);
    match admin.ingest.deleted_blobs(after, limit).await {
        Ok(blobs) => {
            let next = blobs.last().map_or(after, |b| b.seq);
            let blobs: Vec<_> = blobs
                .iter()
                .map(|b| {
                    json!({"seq": b.seq, "namespace": b.namespace.as_str(), "blob": b.blob.to_hex(), "deleted_at": b.deleted_at})
                })
                .collect();
            Json(json!({"blobs": blobs, "next": next})).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "reading the deleted blobs failed");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", "something went wrong on our side; try again")
        }
    }
}
