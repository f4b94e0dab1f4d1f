//! `GET /b/{blob}?exp=…&sig=…`: signed, immutable, range-aware blob serving, for the origin (over its
//! blob store) and for edge nodes (memory, disk, then a verified upstream fill). Also the text of `/metrics` and,
//! on edges with an admin token, `DELETE /admin/blobs/{blob}`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use bytes::Bytes;
use futures_util::TryStreamExt;
use types::{BlobId, SignedUrlError, UrlSigner};

use crate::disk::{read_at, read_now};
use crate::fill::{Fill, read_stream};
use crate::metrics::Tier;
use crate::{BlobStore, DiskTier, EdgeError, Filler, MemoryTier, Metrics};

/// Where blobs come from below the memory tier.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The origin: its own blob store is the truth.
    Origin(BlobStore),
    /// An edge node: local disk, then upstream fills.
    Edge { disk: DiskTier, filler: Arc<Filler> },
}

/// What `/b/` needs. Clones share their tiers, fills and metrics.
#[derive(Debug, Clone)]
pub struct BlobService {
    signer: UrlSigner,
    memory: MemoryTier,
    backend: Backend,
    metrics: Arc<Metrics>,
    /// BLAKE3 of the admin token; purging is off without one.
    admin_token: Option<blake3::Hash>,
    /// Every `Cache-Status` value this service sends, by [`Outcome`].
    cache_status: [HeaderValue; Outcome::COUNT],
}

/// Which tier answered, for `Cache-Status` (RFC 9211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Refused before any tier was asked (bad signature, bad path).
    Bypass,
    /// Failed while looking for the blob.
    Miss,
    Memory,
    Disk,
    Store,
    /// Joined a fill under way.
    Collapsed,
    /// Started a fill.
    Stored,
}

impl Outcome {
    const COUNT: usize = 7;
    const ALL: [Outcome; Self::COUNT] = [
        Outcome::Bypass,
        Outcome::Miss,
        Outcome::Memory,
        Outcome::Disk,
        Outcome::Store,
        Outcome::Collapsed,
        Outcome::Stored,
    ];

    fn parameters(self) -> &'static str {
        match self {
            Outcome::Bypass => "fwd=bypass",
            Outcome::Miss => "fwd=miss",
            Outcome::Memory => "hit; detail=memory",
            Outcome::Disk => "hit; detail=disk",
            Outcome::Store => "hit; detail=store",
            Outcome::Collapsed => "fwd=miss; collapsed",
            Outcome::Stored => "fwd=miss; stored",
        }
    }
}

impl BlobService {
    /// `cache_name` names this cache in `Cache-Status` (`courier-origin`, `courier-edge`);
    /// `admin_token` turns purging on.
    pub fn new(
        signer: UrlSigner,
        memory: MemoryTier,
        backend: Backend,
        metrics: Arc<Metrics>,
        cache_name: &str,
        admin_token: Option<&str>,
    ) -> Self {
        let cache_status = Outcome::ALL.map(|outcome| {
            HeaderValue::from_str(&format!("{cache_name}; {}", outcome.parameters())).expect("cache names are ascii")
        });
        Self {
            signer,
            memory,
            backend,
            metrics,
            admin_token: admin_token.map(str::trim).filter(|t| !t.is_empty()).map(|t| blake3::hash(t.as_bytes())),
            cache_status,
        }
    }

    /// Whether [`BlobService::answer`] is the whole answer to a request for `path` with `method`,
    /// as it is for `GET` and `HEAD` of `/b/{blob}` in this service's router.
    pub fn serves(method: &Method, path: &str) -> bool {
        (*method == Method::GET || *method == Method::HEAD)
            && path.strip_prefix("/b/").is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
    }

    /// Answers `GET` or `HEAD /b/{blob}?exp=…&sig=…`: what the router's `/b/` route does, callable
    /// without a router (an edge's listener hands `/b/` straight here).
    pub async fn answer(self: &Arc<Self>, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
        let blob = uri.path().strip_prefix("/b/").unwrap_or_default();
        let mut outcome = Outcome::Bypass;
        let (mut response, body_bytes) = match respond(self, blob, uri.query(), method, headers, &mut outcome).await {
            Ok(answered) => answered,
            Err(e) => (e.into_response(), 0),
        };
        response.headers_mut().insert("cache-status", self.cache_status[outcome as usize].clone());
        self.metrics.count_response(response.status().as_u16());
        self.metrics.bytes_served.inc_by(body_bytes);
        response
    }
}

pub fn router(service: Arc<BlobService>) -> Router {
    Router::new().route("/b/{blob}", get(serve_blob)).route("/admin/blobs/{blob}", delete(purge)).with_state(service)
}

async fn serve_blob(State(svc): State<Arc<BlobService>>, request: Request) -> Response {
    svc.answer(request.method(), request.uri(), request.headers()).await
}

/// `exp` and `sig` from a query string; `None` when either is missing or given twice.
pub fn signed_query(query: Option<&str>) -> Option<(Cow<'_, str>, Cow<'_, str>)> {
    let query = query?;
    // Our own URLs need no decoding (digits and base64url); skip the decoder for them.
    if query.contains(['%', '+']) {
        return exp_and_sig(form_urlencoded::parse(query.as_bytes()));
    }
    exp_and_sig(query.split('&').map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (Cow::Borrowed(key), Cow::Borrowed(value))
    }))
}

/// The `exp` and `sig` of a query's key-value pairs, each given exactly once.
fn exp_and_sig<'q>(pairs: impl Iterator<Item = (Cow<'q, str>, Cow<'q, str>)>) -> Option<(Cow<'q, str>, Cow<'q, str>)> {
    let (mut exp, mut sig) = (None, None);
    for (key, value) in pairs {
        let slot = match &*key {
            "exp" => &mut exp,
            "sig" => &mut sig,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return None;
        }
    }
    Some((exp?, sig?))
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

/// The answer to a blob request, with how many blob bytes its body carries (none for `HEAD` and
/// 304); `outcome` tells which tier answered, also when the answer is an error.
async fn respond(
    svc: &Arc<BlobService>,
    blob: &str,
    query: Option<&str>,
    method: &Method,
    headers: &HeaderMap,
    outcome: &mut Outcome,
) -> Result<(Response, u64), EdgeError> {
    let (exp, sig) = signed_query(query).ok_or(EdgeError::Forbidden)?;
    let id: BlobId = blob.parse().map_err(|_| EdgeError::Forbidden)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    svc.signer.verify(&id, &exp, &sig, now).map_err(|e| match e {
        SignedUrlError::Expired => EdgeError::Expired,
        SignedUrlError::Invalid => EdgeError::Forbidden,
    })?;

    *outcome = Outcome::Miss;
    let source;
    (source, *outcome) = locate(svc, &id).await?;
    let etag = etag(&id);
    let len = source.len();

    if if_none_match(headers, &etag) {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        common_headers(response.headers_mut(), etag);
        return Ok((response, 0));
    }

    let range = requested_range(headers, &etag, len)?;
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let body_len = if len == 0 { 0 } else { end - start + 1 };
    let content_type = content_type(&source.head(&id).await?);
    let sent = if *method == Method::HEAD { 0 } else { body_len };
    let body = if sent == 0 { Body::empty() } else { source.body(&id, start, end).await? };

    let mut response = Response::new(body);
    // Room for every header this response and the listener add, so the map never grows.
    *response.headers_mut() = HeaderMap::with_capacity(16);
    let h = response.headers_mut();
    common_headers(h, etag);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {start}-{end}/{len}");
        response.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("ascii"));
    }
    Ok((response, sent))
}

/// The strong validator of a blob: its hash, quoted.
fn etag(id: &BlobId) -> HeaderValue {
    let mut quoted = [b'"'; 66];
    quoted[1..65].copy_from_slice(id.hex().as_bytes());
    HeaderValue::from_bytes(&quoted).expect("hex is a valid header value")
}

/// Finds the blob in the fastest tier that has it; returns it with its `Cache-Status` parameters.
async fn locate(svc: &Arc<BlobService>, id: &BlobId) -> Result<(Source, Outcome), EdgeError> {
    if svc.memory.holds_anything()
        && let Some(bytes) = svc.memory.get(id).await
    {
        svc.metrics.hit(Tier::Memory);
        return Ok((Source::Memory(bytes), Outcome::Memory));
    }
    match &svc.backend {
        Backend::Origin(store) => {
            let len = store.size(id).await?.ok_or(EdgeError::NotFound)?;
            svc.metrics.hit(Tier::Store);
            if svc.memory.admits(len) {
                return Ok((Source::Memory(svc.memory.get_or_fill(id, store).await?), Outcome::Store));
            }
            Ok((Source::Store { store: store.clone(), len }, Outcome::Store))
        }
        Backend::Edge { disk, filler } => {
            if let Some(len) = disk.lookup(id)
                && let Some(source) = from_disk(svc, disk, id, len).await
            {
                svc.metrics.hit(Tier::Disk);
                return Ok((source, Outcome::Disk));
            }
            let (fill, joined) = filler.join(id)?;
            let status = if joined { Outcome::Collapsed } else { Outcome::Stored };
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
///
/// A file kept open whose bytes are in the page cache is read right here; anything that would wait
/// for the device (opening a file, a read the page cache cannot answer, promoting) goes to the
/// blocking pool.
async fn from_disk(svc: &BlobService, disk: &DiskTier, id: &BlobId, len: u64) -> Option<Source> {
    let promote = svc.memory.admits(len);
    if !promote && let Some(file) = disk.open_handle(id) {
        if len > SMALL_FILE {
            return Some(Source::File { file, len });
        }
        if let Some(bytes) = read_now(&file, 0, len as usize) {
            return Some(Source::Read(bytes));
        }
    }
    let (id_copy, disk_copy) = (*id, disk.clone());
    let read = tokio::task::spawn_blocking(move || {
        if promote {
            let bytes = std::fs::read(disk_copy.path(&id_copy)).ok().filter(|b| id_copy.matches(b));
            return bytes.map(|b| Source::Memory(Bytes::from(b)));
        }
        let file = disk_copy.open_file(&id_copy).ok()?;
        if len <= SMALL_FILE {
            // One read here costs less than a stream of them later.
            return read_at(&file, 0, len as usize).ok().map(Source::Read);
        }
        Some(Source::File { file, len })
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
            let (id, disk) = (*id, disk.clone());
            let _ = tokio::task::spawn_blocking(move || disk.remove(&id)).await;
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
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| types::bearer_token(v.to_str().ok()?))
        .filter(|t| !t.trim().is_empty());
    // Comparing hashes keeps the comparison constant-time (blake3::Hash's Eq is).
    if given.map(|t| blake3::hash(t.as_bytes())) != Some(expected) {
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

/// The Prometheus text of blob serving (`courier_blob_*`), for the server's `/metrics`.
pub async fn metrics_text(svc: &BlobService) -> String {
    svc.metrics.set_tier_bytes(Tier::Memory, svc.memory.weighted_size());
    if let Backend::Edge { disk, .. } = &svc.backend {
        let disk = disk.clone();
        if let Ok((bytes, _)) = tokio::task::spawn_blocking(move || disk.usage()).await {
            svc.metrics.set_tier_bytes(Tier::Disk, bytes);
        }
    }
    svc.metrics.render()
}

fn common_headers(h: &mut HeaderMap, etag: HeaderValue) {
    h.insert(header::ETAG, etag);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.to_str().expect("etags are ascii");
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(str::trim).any(|tag| tag == "*" || tag == etag || tag.strip_prefix("W/") == Some(etag))
    })
}

/// The single range to serve, if any. A malformed `Range` is ignored (the whole blob is served), as
/// is one with several ranges; `If-Range` with another validator also means the whole blob.
pub fn requested_range(headers: &HeaderMap, etag: &HeaderValue, len: u64) -> Result<Option<(u64, u64)>, EdgeError> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE)
        && if_range != etag
    {
        return Ok(None);
    }
    let Ok(parsed) = http_range_header::parse_range_header(value) else {
        return Ok(None);
    };
    // An empty blob has no byte to range over (the parser would grant 0-0 of it): the whole,
    // empty, blob is the answer to any range.
    if len == 0 {
        return Ok(None);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_read_from_the_query_once() {
        let q = |query: &str| signed_query(Some(query)).map(|(e, s)| (e.into_owned(), s.into_owned()));
        assert_eq!(q("exp=12&sig=ab-_"), Some(("12".into(), "ab-_".into())));
        assert_eq!(q("sig=ab&x=1&exp=12"), Some(("12".into(), "ab".into())));
        assert_eq!(q("exp=12&sig=a%2Db"), Some(("12".into(), "a-b".into())));
        assert_eq!(q("exp=12"), None);
        assert_eq!(q("exp=12&sig=ab&sig=cd"), None, "a second signature is refused, not chosen");
        assert_eq!(q("exp=12&sig=ab&sig=c%2Dd"), None);
        assert_eq!(q("exp&sig=ab"), Some(("".into(), "ab".into())));
        assert_eq!(q("exp=1+2&sig=ab"), Some(("1 2".into(), "ab".into())));
        assert_eq!(signed_query(None), None);
    }

    #[test]
    fn only_blob_reads_skip_the_router() {
        let id = "a".repeat(64);
        assert!(BlobService::serves(&Method::GET, &format!("/b/{id}")));
        assert!(BlobService::serves(&Method::HEAD, &format!("/b/{id}")));
        assert!(!BlobService::serves(&Method::POST, &format!("/b/{id}")));
        assert!(!BlobService::serves(&Method::DELETE, &format!("/b/{id}")));
        assert!(!BlobService::serves(&Method::GET, &format!("/b/{id}/x")));
        assert!(!BlobService::serves(&Method::GET, "/b/"));
        assert!(!BlobService::serves(&Method::GET, &format!("/admin/blobs/{id}")));
    }
}
