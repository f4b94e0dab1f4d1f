//! `GET /b/{blob}?exp=…&sig=…`: signed, immutable, range-aware blob serving.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::Deserialize;
use types::{BlobId, SignedUrlError, UrlSigner};

use crate::{BlobStore, EdgeError, MemoryTier};

/// What `/b/` needs: the served blobs, the memory tier over them and the URL key.
#[derive(Debug)]
pub struct BlobService {
    pub blobs: BlobStore,
    pub memory: MemoryTier,
    pub signer: UrlSigner,
}

pub fn router(service: Arc<BlobService>) -> Router {
    Router::new().route("/b/{blob}", get(serve_blob)).with_state(service)
}

#[derive(Debug, Deserialize)]
struct SignedQuery {
    exp: Option<String>,
    sig: Option<String>,
}

/// A blob's bytes, whole in memory or to be streamed from the store.
enum Source {
    Memory(Bytes),
    Stored { len: u64 },
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Memory(b) => b.len() as u64,
            Source::Stored { len } => *len,
        }
    }
}

async fn serve_blob(
    State(svc): State<Arc<BlobService>>,
    Path(blob): Path<String>,
    query: Result<Query<SignedQuery>, QueryRejection>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, EdgeError> {
    let Ok(Query(SignedQuery { exp: Some(exp), sig: Some(sig) })) = query else {
        return Err(EdgeError::Forbidden);
    };
    let id: BlobId = blob.parse().map_err(|_| EdgeError::Forbidden)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    svc.signer.verify(&id, &exp, &sig, now).map_err(|e| match e {
        SignedUrlError::Expired => EdgeError::Expired,
        SignedUrlError::Invalid => EdgeError::Forbidden,
    })?;

    let etag = format!("\"{id}\"");
    let source = locate(&svc, &id).await?;
    let len = source.len();

    if if_none_match(&headers, &etag) {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        common_headers(response.headers_mut(), &etag);
        return Ok(response);
    }

    let range = requested_range(&headers, &etag, len)?;
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let body_len = if len == 0 { 0 } else { end - start + 1 };

    let sniff = match &source {
        Source::Memory(bytes) => bytes.slice(..bytes.len().min(16)),
        Source::Stored { len } => {
            let stream = svc.blobs.get_range_stream(&id, 0..(*len).min(16)).await?;
            let parts: Vec<Bytes> = stream.try_collect().await?;
            parts.concat().into()
        }
    };

    let body = if method == Method::HEAD || body_len == 0 {
        Body::empty()
    } else {
        match source {
            Source::Memory(bytes) => Body::from(bytes.slice(start as usize..=end as usize)),
            Source::Stored { .. } => Body::from_stream(svc.blobs.get_range_stream(&id, start..end + 1).await?),
        }
    };

    let mut response = Response::new(body);
    let h = response.headers_mut();
    common_headers(h, &etag);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&sniff)));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {start}-{end}/{len}");
        response.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("ascii"));
    }
    Ok(response)
}

/// Memory first; then the store, through memory when the blob is small enough to keep there.
async fn locate(svc: &BlobService, id: &BlobId) -> Result<Source, EdgeError> {
    if let Some(bytes) = svc.memory.get(id).await {
        return Ok(Source::Memory(bytes));
    }
    let len = svc.blobs.size(id).await?.ok_or(EdgeError::NotFound)?;
    if svc.memory.admits(len) {
        return Ok(Source::Memory(svc.memory.get_or_fill(id, &svc.blobs).await?));
    }
    Ok(Source::Stored { len })
}

fn common_headers(h: &mut HeaderMap, etag: &str) {
    h.insert(header::ETAG, HeaderValue::from_str(etag).expect("hex is ascii"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(str::trim).any(|tag| tag == "*" || tag == etag || tag.strip_prefix("W/") == Some(etag))
    })
}

/// The single range to serve, if any. A malformed `Range` is ignored (the whole blob is served), as
/// is one with several ranges; `If-Range` with another validator also means the whole blob.
fn requested_range(headers: &HeaderMap, etag: &str, len: u64) -> Result<Option<(u64, u64)>, EdgeError> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE)
        && if_range.to_str().ok() != Some(etag)
    {
        return Ok(None);
    }
    let Ok(parsed) = http_range_header::parse_range_header(value) else {
        return Ok(None);
    };
    match parsed.validate(len) {
        Ok(ranges) if ranges.len() == 1 => Ok(Some((*ranges[0].start(), *ranges[0].end()))),
        Ok(_) => Ok(None),
        Err(_) => Err(EdgeError::RangeNotSatisfiable { len }),
    }
}

/// The type of one of our own encodes, from its first bytes. Only our outputs are ever served, so
/// this names what we wrote; anything else is sent as opaque bytes.
fn content_type(prefix: &[u8]) -> &'static str {
    match prefix {
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "image/webp",
        [b'O', b'g', b'g', b'S', ..] => "audio/ogg",
        [_, _, _, _, b'f', b't', b'y', b'p', ..] => "video/mp4",
        _ => "application/octet-stream",
    }
}
