//! `GET /b/{blob}?exp=…&sig=…`: signed, immutable, range-aware blob serving, for the origin (over its
//! blob store) and for edge nodes (memory, disk, then a verified upstream fill). Also `/metrics` and,
//! on edges with an admin token, `DELETE /admin/blobs/{blob}`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::Deserialize;
use types::{BlobId, SignedUrlError, UrlSigner};

use crate::fill::{Fill, read_stream};
use crate::metrics::StatusLabel;
use crate::{BlobStore, DiskTier, EdgeError, Filler, MemoryTier, Metrics};

/// Where blobs come from below the memory tier.
#[derive(Debug)]
pub enum Backend {
    /// The origin: its own blob store is the truth.
    Origin(BlobStore),
    /// An edge node: local disk, then upstream fills.
    Edge { disk: DiskTier, filler: Arc<Filler> },
}

/// What `/b/` needs.
#[derive(Debug)]
pub struct BlobService {
    pub signer: UrlSigner,
    pub memory: MemoryTier,
    pub backend: Backend,
    pub metrics: Arc<Metrics>,
    /// Names this cache in `Cache-Status` (`courier-origin`, `courier-edge`).
    pub cache_name: &'static str,
    /// BLAKE3 of the admin token; purging is off without one.
    pub admin_token: Option<blake3::Hash>,
}

pub fn router(service: Arc<BlobService>) -> Router {
    Router::new()
        .route("/b/{blob}", get(serve_blob))
        .route("/admin/blobs/{blob}", delete(purge))
        .route("/metrics", get(metrics))
        .with_state(service)
}

#[derive(Debug, Deserialize)]
struct SignedQuery {
    exp: Option<String>,
    sig: Option<String>,
}

/// Disk hits up to this size are read whole rather than streamed.
const SMALL_FILE: u64 = 256 * 1024;

/// A blob's bytes and where they were found.
enum Source {
    /// From the memory tier, or verified just now.
    Memory(Bytes),
    /// Read whole from a disk tier file (verified when it was filled).
    Read(Bytes),
    File {
        file: Arc<std::fs::File>,
        len: u64,
    },
    Store {
        store: BlobStore,
        len: u64,
    },
    Filling {
        fill: Arc<Fill>,
        len: u64,
    },
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Memory(b) | Source::Read(b) => b.len() as u64,
            Source::File { len, .. } | Source::Store { len, .. } | Source::Filling { len, .. } => *len,
        }
    }

    /// Bytes `start..=end` as a body.
    async fn body(&self, id: &BlobId, start: u64, end: u64) -> Result<Body, EdgeError> {
        Ok(match self {
            Source::Memory(bytes) | Source::Read(bytes) => Body::from(bytes.slice(start as usize..=end as usize)),
            Source::File { file, .. } => Body::from_stream(read_stream(file.clone(), start, end, None)),
            Source::Store { store, .. } => Body::from_stream(store.get_range_stream(id, start..end + 1).await?),
            Source::Filling { fill, .. } => Body::from_stream(fill.stream(start, end)),
        })
    }

    /// The first bytes, enough to name the type.
    async fn head(&self, id: &BlobId) -> Result<Bytes, EdgeError> {
        let n = self.len().min(16);
        if n == 0 {
            return Ok(Bytes::new());
        }
        match self {
            Source::Memory(bytes) | Source::Read(bytes) => Ok(bytes.slice(..n as usize)),
            _ => {
                let parts: Vec<Bytes> = match self.body(id, 0, n - 1).await?.into_data_stream().try_collect().await {
                    Ok(parts) => parts,
                    Err(e) => return Err(EdgeError::Upstream(e.to_string())),
                };
                Ok(parts.concat().into())
            }
        }
    }
}

async fn serve_blob(
    State(svc): State<Arc<BlobService>>,
    Path(blob): Path<String>,
    query: Result<Query<SignedQuery>, QueryRejection>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let mut cache_status = format!("{}; fwd=bypass", svc.cache_name);
    let mut response = match respond(&svc, &blob, query, &method, &headers, &mut cache_status).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    let value = HeaderValue::from_str(&cache_status).expect("cache names are ascii");
    response.headers_mut().insert("cache-status", value);
    svc.metrics.requests.get_or_create(&StatusLabel { status: response.status().as_u16() }).inc();
    if method != Method::HEAD
        && let Some(len) = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok())
    {
        svc.metrics.bytes_served.inc_by(len);
    }
    response
}

async fn respond(
    svc: &Arc<BlobService>,
    blob: &str,
    query: Result<Query<SignedQuery>, QueryRejection>,
    method: &Method,
    headers: &HeaderMap,
    cache_status: &mut String,
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

    *cache_status = format!("{}; fwd=miss", svc.cache_name);
    let (source, status) = locate(svc, &id).await?;
    *cache_status = format!("{}; {status}", svc.cache_name);
    let etag = format!("\"{id}\"");
    let len = source.len();

    if if_none_match(headers, &etag) {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        common_headers(response.headers_mut(), &etag);
        return Ok(response);
    }

    let range = requested_range(headers, &etag, len)?;
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let body_len = if len == 0 { 0 } else { end - start + 1 };
    let content_type = content_type(&source.head(&id).await?);
    let body =
        if *method == Method::HEAD || body_len == 0 { Body::empty() } else { source.body(&id, start, end).await? };

    let mut response = Response::new(body);
    let h = response.headers_mut();
    common_headers(h, &etag);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {start}-{end}/{len}");
        response.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("ascii"));
    }
    Ok(response)
}

/// Finds the blob in the fastest tier that has it; returns it with its `Cache-Status` parameters.
async fn locate(svc: &Arc<BlobService>, id: &BlobId) -> Result<(Source, &'static str), EdgeError> {
    if let Some(bytes) = svc.memory.get(id).await {
        svc.metrics.hit("memory");
        return Ok((Source::Memory(bytes), "hit; detail=memory"));
    }
    match &svc.backend {
        Backend::Origin(store) => {
            let len = store.size(id).await?.ok_or(EdgeError::NotFound)?;
            svc.metrics.hit("store");
            if svc.memory.admits(len) {
                return Ok((Source::Memory(svc.memory.get_or_fill(id, store).await?), "hit; detail=store"));
            }
            Ok((Source::Store { store: store.clone(), len }, "hit; detail=store"))
        }
        Backend::Edge { disk, filler } => {
            if let Some(len) = disk.lookup(id)
                && let Some(source) = from_disk(svc, disk, id, len).await
            {
                svc.metrics.hit("disk");
                return Ok((source, "hit; detail=disk"));
            }
            let (fill, joined) = filler.join(id)?;
            let status = if joined { "fwd=miss; collapsed" } else { "fwd=miss; stored" };
            let len = fill.size().await?;
            if svc.memory.admits(len) {
                // Small blobs are quick to fetch whole: verifying before answering turns a bad
                // upstream into a clean 502 rather than a cut-off body.
                let file = fill.finished().await?;
                return Ok((Source::File { file, len }, status));
            }
            Ok((Source::Filling { fill, len }, status))
        }
    }
}

/// A disk hit: small blobs are re-verified and promoted to memory; large ones are streamed from
/// the file (verified when it was filled). A missing or damaged file is forgotten: a miss.
async fn from_disk(svc: &BlobService, disk: &DiskTier, id: &BlobId, len: u64) -> Option<Source> {
    let path = disk.path(id);
    let promote = svc.memory.admits(len);
    let (id_copy, disk_copy) = (*id, disk.clone());
    let read = tokio::task::spawn_blocking(move || {
        if promote {
            let bytes = std::fs::read(&path).ok().filter(|b| id_copy.matches(b));
            return bytes.map(|b| Source::Memory(Bytes::from(b)));
        }
        if len <= SMALL_FILE {
            // One read here costs less than a stream of them later.
            return std::fs::read(&path).ok().filter(|b| b.len() as u64 == len).map(|b| Source::Read(Bytes::from(b)));
        }
        std::fs::File::open(&path).ok().map(|file| Source::File { file: Arc::new(file), len })
    })
    .await
    .ok()
    .flatten();
    match read {
        Some(Source::Memory(bytes)) => {
            svc.memory.insert(id, bytes.clone()).await;
            Some(Source::Memory(bytes))
        }
        Some(source) => Some(source),
        None => {
            tracing::warn!(blob = %id, "disk tier file missing or damaged; refilling");
            let _ = tokio::task::spawn_blocking(move || disk_copy.remove(&id_copy)).await;
            None
        }
    }
}

/// Takes a blob out of both tiers (takedowns). It propagates nowhere: purge each tier's nodes.
async fn purge(
    State(svc): State<Arc<BlobService>>,
    Path(blob): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, EdgeError> {
    let Some(expected) = svc.admin_token else { return Err(EdgeError::NotFound) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "));
    // Comparing hashes keeps the comparison constant-time (blake3::Hash's Eq is).
    if given.map(|t| blake3::hash(t.trim().as_bytes())) != Some(expected) {
        return Err(EdgeError::Unauthorized);
    }
    let id: BlobId = blob.parse().map_err(|_| EdgeError::NotFound)?;
    svc.memory.remove(&id).await;
    if let Backend::Edge { disk, .. } = &svc.backend {
        let disk = disk.clone();
        let _ = tokio::task::spawn_blocking(move || disk.remove(&id)).await;
    }
    tracing::info!(blob = %id, "purged");
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(svc): State<Arc<BlobService>>) -> Response {
    svc.metrics.set_tier_bytes("memory", svc.memory.weighted_size());
    if let Backend::Edge { disk, .. } = &svc.backend {
        let disk = disk.clone();
        if let Ok((bytes, _)) = tokio::task::spawn_blocking(move || disk.usage()).await {
            svc.metrics.set_tier_bytes("disk", bytes);
        }
    }
    let body = svc.metrics.render();
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
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
