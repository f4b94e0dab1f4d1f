//! Resumable uploads: tus 1.0.0 at `/v1/uploads`, with the extensions creation,
//! creation-with-upload, creation-defer-length, termination, expiration and checksum (sha1,
//! sha256).
//!
//! An upload's id is the media id it becomes. Its offset and its parts live in the database
//! (`uploads`, `upload_parts`) and the blob store (`parts`), so the next request may come after a
//! restart or to another node. Each PATCH holds the upload while it appends (a lock in its row,
//! renewed as bytes arrive), streams its body to a temp file, and stores it as one part; what
//! arrived before a dropped connection is kept unless the request named a checksum. The first
//! bytes are sniffed as soon as there are enough, so a wrong type fails at the first PATCH. The
//! request that brings the last byte joins the parts (BLAKE3 as they are read back) and hands the
//! result to the path `POST /v1/media` takes ([`crate::routes::finish`]); its answer says the
//! media's status in `Courier-Media-Status`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;
use sha1::Digest;
use transcode::MediaType;
use types::{BlobId, MediaId, UserId};

use crate::store::{Advance, NewUpload, Part, UploadRow};
use crate::{Ingest, IngestError, quota, spool};

/// The protocol version spoken, and the extensions.
const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str = "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum";
const TUS_CHECKSUMS: &str = "sha1,sha256";
/// The body type every PATCH (and a creation with bytes) must have.
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// How long a PATCH holds its upload without news; renewed while bytes arrive.
const LOCK_MS: i64 = 60_000;
const RENEW_EVERY: Duration = Duration::from_secs(20);

static TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
static UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
static UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
static UPLOAD_DEFER_LENGTH: HeaderName = HeaderName::from_static("upload-defer-length");
static UPLOAD_METADATA: HeaderName = HeaderName::from_static("upload-metadata");
static UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
static UPLOAD_CHECKSUM: HeaderName = HeaderName::from_static("upload-checksum");
static MEDIA_STATUS: HeaderName = HeaderName::from_static("courier-media-status");
static UPLOAD_COMPLETE: HeaderName = HeaderName::from_static("upload-complete");
static UPLOAD_LIMIT: HeaderName = HeaderName::from_static("upload-limit");
static DRAFT_INTEROP_VERSION: HeaderName = HeaderName::from_static("upload-draft-interop-version");
/// The IETF draft's interop version spoken.
const DRAFT_VERSION: &str = "9";
/// What the IETF draft's requests carry instead of a tus body type.
const PARTIAL_UPLOAD: &str = "application/partial-upload";

/// Which protocol a request speaks: tus 1.0.0, or the IETF resumable-upload draft
/// (draft-ietf-httpbis-resumable-upload, interop version 9), recognised by `Upload-Complete`
/// (or, on HEAD and DELETE, `Upload-Draft-Interop-Version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Tus,
    /// `complete`: the request's body ends the upload (`Upload-Complete: ?1`).
    Draft {
        complete: bool,
    },
}

impl Dialect {
    fn of(headers: &HeaderMap) -> Result<Self, IngestError> {
        // Another interop version's fields mean other things (an older `Upload-Incomplete`): such a
        // request is not taken for this one's.
        if headers.get(&DRAFT_INTEROP_VERSION).is_some_and(|v| v.as_bytes() != DRAFT_VERSION.as_bytes()) {
            return Ok(Dialect::Tus);
        }
        match headers.get(&UPLOAD_COMPLETE).map(HeaderValue::as_bytes) {
            Some(b"?1") => Ok(Dialect::Draft { complete: true }),
            Some(b"?0") => Ok(Dialect::Draft { complete: false }),
            Some(_) => Err(bad("Upload-Complete is ?0 or ?1")),
            None if headers.contains_key(&DRAFT_INTEROP_VERSION) => Ok(Dialect::Draft { complete: false }),
            None => Ok(Dialect::Tus),
        }
    }

    fn is_draft(self) -> bool {
        matches!(self, Dialect::Draft { .. })
    }
}

/// An `Upload-Complete` value.
fn sf_bool(value: bool) -> HeaderValue {
    HeaderValue::from_static(if value { "?1" } else { "?0" })
}

pub(crate) fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/uploads", post(create).options(options))
        .route("/v1/uploads/{id}", axum::routing::head(offset).patch(append).delete(terminate).post(overridden))
        .layer(axum::middleware::from_fn(tus_resumable))
        .with_state(ingest)
}

/// Every answer names the protocol version; a request for another version gets 412.
async fn tus_resumable(request: Request, next: Next) -> Response {
    let speaks = request.headers().get(&TUS_RESUMABLE).is_some_and(|v| v == TUS_VERSION);
    let draft = Dialect::of(request.headers()).is_ok_and(Dialect::is_draft);
    let mut response = if request.method() == Method::OPTIONS || speaks || draft {
        next.run(request).await
    } else {
        // Read what the client is still sending, so it reads this answer rather than a reset.
        spool::discard_body(request.into_body()).await;
        let error = IngestError::BadRequest(format!("this server speaks tus {TUS_VERSION} (Tus-Resumable)"));
        let mut response = error.into_response();
        *response.status_mut() = StatusCode::PRECONDITION_FAILED;
        response.headers_mut().insert(HeaderName::from_static("tus-version"), HeaderValue::from_static(TUS_VERSION));
        response
    };
    response.headers_mut().insert(TUS_RESUMABLE.clone(), HeaderValue::from_static(TUS_VERSION));
    response
}

/// `OPTIONS /v1/uploads`: what this server speaks and the largest upload it takes.
async fn options(State(ingest): State<Arc<Ingest>>) -> Response {
    let config = &ingest.config;
    let max = [types::MediaKind::Image, types::MediaKind::Audio, types::MediaKind::Video]
        .into_iter()
        .map(|kind| config.max_bytes(kind))
        .max()
        .unwrap_or(0);
    let mut headers = HeaderMap::new();
    headers.insert(HeaderName::from_static("tus-version"), HeaderValue::from_static(TUS_VERSION));
    headers.insert(HeaderName::from_static("tus-extension"), HeaderValue::from_static(TUS_EXTENSIONS));
    headers.insert(HeaderName::from_static("tus-max-size"), HeaderValue::from(max));
    headers.insert(HeaderName::from_static("tus-checksum-algorithm"), HeaderValue::from_static(TUS_CHECKSUMS));
    headers.insert(UPLOAD_LIMIT.clone(), upload_limit(&ingest, max));
    (StatusCode::NO_CONTENT, headers).into_response()
}

/// `POST /v1/uploads`: a new upload of `Upload-Length` bytes (or a deferred length) whose
/// `Upload-Metadata` names its media type as `filetype`; with a body, its first bytes too.
async fn create(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let created = async {
        let dialect = Dialect::of(&headers)?;
        let (id, expires_at, max) = open_upload(&ingest, &user, &headers, dialect).await?;
        Ok::<_, IngestError>((dialect, id, expires_at, max))
    };
    let (dialect, id, expires_at, max) = match created.await {
        Ok(created) => created,
        Err(e) => {
            // Read what the client is still sending, so it reads this answer rather than a reset.
            spool::discard_body(body).await;
            return Err(e);
        }
    };
    let mut response = StatusCode::CREATED.into_response();
    let location = format!("/v1/uploads/{id}");
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&location).expect("an id is ASCII"));
    if dialect.is_draft() {
        response.headers_mut().insert(UPLOAD_LIMIT.clone(), upload_limit(&ingest, max));
    }
    if is_offset_stream(&headers) || dialect.is_draft() {
        // creation-with-upload (the draft's creation always carries the first bytes, perhaps none):
        // the body is the first PATCH's.
        let appended = append_to(&ingest, &user, id, 0, &headers, body, dialect).await;
        let (status, headers) = match appended {
            Ok(answer) => {
                if let Some(view) = answer.view {
                    // The draft: the last byte's answer is the media itself.
                    let mut made = (StatusCode::CREATED, Json(view)).into_response();
                    made.headers_mut().extend(response.headers().clone());
                    made.headers_mut().extend(answer.headers);
                    return Ok(made);
                }
                (StatusCode::CREATED, answer.headers)
            }
            Err(e) => {
                // The client never heard the upload's address, so it can neither resume nor end
                // it: it ends here, unless it holds all its bytes and failed on our side (the sweep
                // makes its media) or its media exists already.
                let now = ingest.clock.now_ms();
                let whole =
                    ingest.store.upload(id, now).await.ok().flatten().is_some_and(|row| {
                        row.done || (row.length == Some(row.upload_offset) && !refuses_the_bytes(&e))
                    });
                if !whole {
                    let _ = ingest.store.delete_upload(id, &user, now).await;
                    purge_later(&ingest);
                }
                return Ok(error_answer(e, dialect));
            }
        };
        *response.status_mut() = status;
        response.headers_mut().extend(headers);
    } else {
        response.headers_mut().insert(UPLOAD_OFFSET.clone(), HeaderValue::from(0));
        response.headers_mut().insert(UPLOAD_EXPIRES.clone(), http_date(expires_at));
    }
    Ok(response)
}

/// An error as the protocol spoken wants it: the draft's 409 also says where the upload stands.
fn error_answer(error: IngestError, dialect: Dialect) -> Response {
    let expected = match &error {
        IngestError::OffsetMismatch { expected } => Some(*expected),
        _ => None,
    };
    let mut response = error.into_response();
    if let (Dialect::Draft { .. }, Some(expected)) = (dialect, expected) {
        response.headers_mut().insert(UPLOAD_COMPLETE.clone(), sf_bool(false));
        response.headers_mut().insert(UPLOAD_OFFSET.clone(), HeaderValue::from(expected));
    }
    response
}

/// `Upload-Limit` (the draft's): the largest upload, and how long one may wait between requests.
fn upload_limit(ingest: &Ingest, max: u64) -> HeaderValue {
    let value = format!("max-size={max}, max-age={}", ingest.config.resumable_expiry_secs);
    HeaderValue::from_str(&value).expect("numbers are ASCII")
}

/// Checks a creation's headers and the user's limits, and records the new upload: its id, when it
/// expires, and the largest it may be.
async fn open_upload(
    ingest: &Ingest,
    user: &UserId,
    headers: &HeaderMap,
    dialect: Dialect,
) -> Result<(MediaId, i64, u64), IngestError> {
    let config = &ingest.config;
    let (metadata, media_type, length) = match dialect {
        Dialect::Tus => {
            let metadata = header_str(headers, &UPLOAD_METADATA)?.unwrap_or_default().to_owned();
            let media_type = media_type_of(&metadata)?;
            let length = match (header_u64(headers, &UPLOAD_LENGTH)?, header_str(headers, &UPLOAD_DEFER_LENGTH)?) {
                (Some(length), None) => Some(length),
                (None, Some("1")) => None,
                _ => return Err(bad("send Upload-Length, or Upload-Defer-Length: 1 to name it later")),
            };
            (metadata, media_type, length)
        }
        Dialect::Draft { complete } => {
            // The draft's creation carries the representation's own type; its length when known.
            let declared = header_str(headers, &header::CONTENT_TYPE)?.unwrap_or_default();
            let mime = declared.split(';').next().unwrap_or_default().trim();
            let media_type = MediaType::from_mime(mime).map_err(|e| IngestError::UnsupportedType(e.to_string()))?;
            let content_length = header_u64(headers, &header::CONTENT_LENGTH)?;
            let length = header_u64(headers, &UPLOAD_LENGTH)?.or(if complete { content_length } else { None });
            (String::new(), media_type, length)
        }
    };
    let max = config.max_bytes(media_type.kind());
    if length.is_some_and(|length| length > max) {
        return Err(IngestError::TooLarge { limit: max });
    }
    if length == Some(0) {
        return Err(IngestError::Empty);
    }
    let now = ingest.clock.now_ms();
    let (open, open_bytes) = ingest.store.open_uploads(user, now).await?;
    if open >= config.resumable_open_per_user {
        return Err(IngestError::Quota(crate::QuotaExceeded {
            message: format!("you have {open} uploads open, the most at once; finish or delete one first"),
            retry_after: Some(60),
        }));
    }
    let limit = config.resumable_open_bytes_per_user;
    if open_bytes.saturating_add(length.unwrap_or(0)) > limit {
        let message = format!("your open uploads would pass {limit} bytes; finish or delete some first");
        return Err(IngestError::Quota(crate::QuotaExceeded { message, retry_after: None }));
    }
    let usage = ingest.records.usage(user, now).await?;
    quota::check(&config.quota, &usage, length, now)?;

    let id = MediaId::new();
    let expires_at = now + expiry_ms(ingest);
    let upload = NewUpload { id, owner: user, mime: media_type.mime(), length, metadata: &metadata, expires_at };
    ingest.store.create_upload(&upload, now).await?;
    Ok((id, expires_at, max))
}

/// `HEAD /v1/uploads/{id}`: where the upload stands.
async fn offset(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
    request: HeaderMap,
) -> Result<Response, IngestError> {
    let (_, row) = owned(&ingest, &user, &id).await?;
    let mut headers = HeaderMap::new();
    let complete = row.done || row.length == Some(row.upload_offset);
    headers.insert(UPLOAD_COMPLETE.clone(), sf_bool(complete));
    if let Ok(media_type) = MediaType::from_mime(&row.mime) {
        headers.insert(UPLOAD_LIMIT.clone(), upload_limit(&ingest, ingest.config.max_bytes(media_type.kind())));
    }
    headers.insert(UPLOAD_OFFSET.clone(), HeaderValue::from(row.upload_offset));
    match row.length {
        Some(length) => headers.insert(UPLOAD_LENGTH.clone(), HeaderValue::from(length)),
        None => headers.insert(UPLOAD_DEFER_LENGTH.clone(), HeaderValue::from_static("1")),
    };
    if let Ok(metadata) = HeaderValue::from_str(&row.metadata)
        && !row.metadata.is_empty()
    {
        headers.insert(UPLOAD_METADATA.clone(), metadata);
    }
    headers.insert(UPLOAD_EXPIRES.clone(), http_date(row.expires_at));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // tus answers 200; the draft's example is 204.
    let status = if Dialect::of(&request)?.is_draft() { StatusCode::NO_CONTENT } else { StatusCode::OK };
    Ok((status, headers).into_response())
}

/// `PATCH /v1/uploads/{id}`: bytes from `Upload-Offset` on.
async fn append(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let checked = async {
        let (id, _) = owned(&ingest, &user, &id).await?;
        let dialect = Dialect::of(&headers)?;
        let body_type = if dialect.is_draft() { PARTIAL_UPLOAD } else { OFFSET_OCTET_STREAM };
        if !has_content_type(&headers, body_type) {
            return Err(IngestError::UnsupportedType(format!("a PATCH's body must be {body_type}")));
        }
        let offset = header_u64(&headers, &UPLOAD_OFFSET)?.ok_or_else(|| bad("Upload-Offset is required"))?;
        Ok((id, offset, dialect))
    };
    let (id, offset, dialect) = match checked.await {
        Ok(checked) => checked,
        Err(e) => {
            // Read what the client is still sending, so it reads this answer rather than a reset.
            spool::discard_body(body).await;
            return Err(e);
        }
    };
    let answer = match append_to(&ingest, &user, id, offset, &headers, body, dialect).await {
        Ok(answer) => answer,
        Err(e) => return Ok(error_answer(e, dialect)),
    };
    Ok(match answer.view {
        // The draft: the last byte's answer is the media itself.
        Some(view) => (StatusCode::OK, answer.headers, Json(view)).into_response(),
        None => (StatusCode::NO_CONTENT, answer.headers).into_response(),
    })
}

/// `POST /v1/uploads/{id}` from a client behind a proxy that passes only GET and POST: the method
/// it means is in `X-HTTP-Method-Override`.
async fn overridden(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let method = headers.get("x-http-method-override").map(|v| v.as_bytes().to_ascii_uppercase());
    match method.as_deref() {
        Some(b"PATCH") => append(State(ingest), Extension(user), Path(id), headers, body).await,
        Some(b"DELETE") => Ok(terminate(State(ingest), Extension(user), Path(id)).await?.into_response()),
        Some(b"HEAD") => offset(State(ingest), Extension(user), Path(id), headers).await,
        _ => {
            spool::discard_body(body).await;
            Err(bad("POST to an upload must name PATCH, DELETE or HEAD in X-HTTP-Method-Override"))
        }
    }
}

/// `DELETE /v1/uploads/{id}`: the upload and its bytes go (a finished upload's media stays).
async fn terminate(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
) -> Result<StatusCode, IngestError> {
    let (id, _) = owned(&ingest, &user, &id).await?;
    if !ingest.store.delete_upload(id, &user, ingest.clock.now_ms()).await? {
        return Err(IngestError::NotFound);
    }
    purge_later(&ingest);
    Ok(StatusCode::NO_CONTENT)
}

/// A PATCH's answer: its headers, and (the draft's last byte) the media made.
struct Appended {
    headers: HeaderMap,
    view: Option<crate::MediaView>,
}

/// Appends `body` at `offset` to upload `id`, and finishes the upload if that was its last byte.
async fn append_to(
    ingest: &Arc<Ingest>,
    user: &UserId,
    id: MediaId,
    offset: u64,
    headers: &HeaderMap,
    body: Body,
    dialect: Dialect,
) -> Result<Appended, IngestError> {
    let mut body = body.into_data_stream();
    let result = append_body(ingest, user, id, offset, headers, &mut body, dialect).await;
    if result.is_err() {
        spool::discard(&mut body).await;
    }
    result.map(|mut answer| {
        if let Dialect::Draft { .. } = dialect {
            let complete = answer.view.is_some();
            answer.headers.insert(UPLOAD_COMPLETE.clone(), sf_bool(complete));
        }
        answer
    })
}

#[allow(clippy::too_many_arguments, reason = "one request's parts, passed once")]
async fn append_body(
    ingest: &Arc<Ingest>,
    user: &UserId,
    id: MediaId,
    offset: u64,
    headers: &HeaderMap,
    body: &mut axum::body::BodyDataStream,
    dialect: Dialect,
) -> Result<Appended, IngestError> {
    let config = &ingest.config;
    let completes = dialect == Dialect::Draft { complete: true };
    let now = ingest.clock.now_ms();
    let row =
        ingest.store.upload(id, now).await?.filter(|row| row.owner == user.as_str()).ok_or(IngestError::NotFound)?;
    let media_type = MediaType::from_mime(&row.mime).map_err(|e| IngestError::UnsupportedType(e.to_string()))?;
    let at = row.upload_offset as u64;
    if row.done {
        // The last request's answer may have been lost: the same last offset hears it again.
        if offset == at && row.length == Some(row.upload_offset) {
            return finished_answer(ingest, user, id, &row, dialect).await;
        }
        if dialect.is_draft() {
            return Err(bad("the upload is complete"));
        }
        return Err(IngestError::OffsetMismatch { expected: at });
    }
    if offset != at {
        return Err(IngestError::OffsetMismatch { expected: at });
    }
    let max = config.max_bytes(media_type.kind());
    let named_length = header_u64(headers, &UPLOAD_LENGTH)?;
    let length = match (row.length, named_length) {
        (Some(length), Some(named)) if named != length as u64 => {
            return Err(bad("Upload-Length cannot change"));
        }
        (Some(length), _) => Some(length as u64),
        (None, named) => named,
    };
    if let Some(length) = length
        && (length > max || length < at)
    {
        return Err(if length > max {
            IngestError::TooLarge { limit: max }
        } else {
            bad("Upload-Length is below the offset")
        });
    }
    let checksum = Checksum::parse(header_str(headers, &UPLOAD_CHECKSUM)?)?;
    let room = length.unwrap_or(max).saturating_sub(at);
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > room) {
        return Err(IngestError::TooLarge { limit: length.unwrap_or(max) });
    }
    if length.is_none() {
        // A deferred length counts toward the user's open bytes by what arrives.
        let (_, open_bytes) = ingest.store.open_uploads(user, now).await?;
        let limit = config.resumable_open_bytes_per_user;
        if open_bytes.saturating_add(declared.unwrap_or(0)) > limit {
            let message = format!("your open uploads would pass {limit} bytes; finish or delete some first");
            return Err(IngestError::Quota(crate::QuotaExceeded { message, retry_after: None }));
        }
    }

    // The same slots a POST takes while its body streams in.
    let user_slot = ingest.user_uploads.take(user, config.quota.uploads_at_once)?;
    let slot = ingest.uploads.try_acquire().map_err(|_| IngestError::TooManyUploads)?;
    let writer = uuid::Uuid::now_v7().to_string();
    if !ingest.store.lock_upload(id, at as i64, &writer, now + LOCK_MS, now).await? {
        let row = ingest.store.upload(id, now).await?.ok_or(IngestError::NotFound)?;
        return Err(if row.upload_offset as u64 != at {
            IngestError::OffsetMismatch { expected: row.upload_offset as u64 }
        } else {
            IngestError::UploadLocked
        });
    }
    let lock = UploadLock { ingest: ingest.clone(), id, writer: writer.clone(), held: true };
    // Sniffed already when bytes were stored and no head was kept for the sniff.
    let head = (at == 0 || !row.head.is_empty()).then_some(row.head.as_slice());
    // The part's key, logged for deletion first (due when the upload would have expired): a crash
    // before the part is recorded leaks nothing.
    let key = BlobId::of(format!("{id}/{at}/{writer}").as_bytes());
    let logged = ingest.store.log_part(&key.to_hex(), now + expiry_ms(ingest)).await?;
    let received = receive(ingest, id, &writer, &key, body, room, checksum, head, media_type, length).await;
    let part = match received {
        Ok(part) => part,
        Err(e) => {
            lock.release().await;
            if matches!(e, IngestError::TypeMismatch { .. }) {
                // Bytes of another type than the upload said: it ends here, with what it stored.
                let _ = ingest.store.delete_upload(id, user, ingest.clock.now_ms()).await;
                purge_later(ingest);
            }
            return Err(e);
        }
    };
    let part = match part {
        Received::Nothing => {
            // The draft's `Upload-Complete: ?1` with no bytes says the length is the offset.
            let length = if completes { Some(length.unwrap_or(at)) } else { length };
            if completes && length != Some(at) {
                lock.release().await;
                return Err(bad("Upload-Complete: ?1 but the bytes end before Upload-Length"));
            }
            // A deferred length may come with no bytes (a stream that ended on a chunk's edge).
            if row.length.is_none()
                && let Some(length) = length
            {
                ingest.store.set_upload_length(id, length).await?;
            }
            if length == Some(at) {
                // All the bytes are here (named now, or a finish that failed on our side before):
                // make the media.
                let made =
                    complete(ingest, user, id, media_type, length.unwrap_or(at), (slot, user_slot), lock).await?;
                return Ok(made_answer(at, row.expires_at, made, dialect));
            }
            lock.release().await;
            return Ok(progress_answer(at, row.expires_at));
        }
        Received::Bytes(part) => part,
    };
    // A body cut short is kept (with a lock still held) as far as it came, when no checksum was named.
    let interrupted = part.interrupted.clone();
    let new_offset = at + part.len;
    // The draft's `Upload-Complete: ?1`: these bytes end the upload, whose length is now known.
    let length = if completes && interrupted.is_none() {
        if length.is_some_and(|length| length != new_offset) {
            lock.release().await;
            return Err(bad("Upload-Complete: ?1 but the bytes do not end at Upload-Length"));
        }
        Some(new_offset)
    } else {
        length
    };
    let expires_at = ingest.clock.now_ms() + expiry_ms(ingest);
    let advance = Advance {
        writer: &writer,
        part: Part { start_at: at as i64, len: part.len as i64, key: key.to_hex() },
        head: &part.head,
        length: length.map(|l| l as i64),
        expires_at,
        logged,
    };
    let advanced = match ingest.store.advance_upload(id, &advance).await {
        Ok(advanced) => advanced,
        Err(e) => {
            let _ = ingest.parts.delete(&key).await;
            return Err(e.into());
        }
    };
    if !advanced {
        // The upload changed under us (expired, terminated, or our lock lapsed and another took it).
        let _ = ingest.parts.delete(&key).await;
        let now = ingest.clock.now_ms();
        let row = ingest.store.upload(id, now).await?.ok_or(IngestError::NotFound)?;
        return Err(IngestError::OffsetMismatch { expected: row.upload_offset as u64 });
    }
    // Moving the offset released the lock.
    lock.forget();
    if let Some(e) = interrupted {
        return Err(IngestError::Interrupted(e));
    }
    if length != Some(new_offset) {
        return Ok(progress_answer(new_offset, expires_at));
    }
    // The last byte: hold the upload again (a sweep finishing stuck uploads must not take it) and
    // make the media.
    let writer = uuid::Uuid::now_v7().to_string();
    let now = ingest.clock.now_ms();
    if !ingest.store.lock_upload(id, new_offset as i64, &writer, now + LOCK_MS, now).await? {
        // Taken by a sweep finishing it: the media comes from there; answer with it if it comes
        // soon.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(config.wait_for_ready_ms.max(1000));
        while tokio::time::Instant::now() < deadline {
            if let Ok(view) = ingest.view(id, user).await {
                return Ok(made_answer(new_offset, expires_at, view, dialect));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return Ok(progress_answer(new_offset, expires_at));
    }
    let lock = UploadLock { ingest: ingest.clone(), id, writer, held: true };
    let made = complete(ingest, user, id, media_type, new_offset, (slot, user_slot), lock).await?;
    Ok(made_answer(new_offset, expires_at, made, dialect))
}

/// Makes the media of upload `id`, which holds all its `length` bytes, under `lock`: joins the
/// parts and takes them the rest of the way as a POST would (quotas checked again now that the
/// length is sure). Bytes refused for what they are end the upload; a failure on our side leaves it
/// whole for a retry (the client's, or the sweep's). Idempotent: media made already are answered.
#[allow(clippy::too_many_arguments, reason = "one upload's parts, passed once")]
async fn complete(
    ingest: &Arc<Ingest>,
    user: &UserId,
    id: MediaId,
    media_type: MediaType,
    length: u64,
    slots: (tokio::sync::SemaphorePermit<'_>, quota::UserUpload<'_>),
    lock: UploadLock,
) -> Result<crate::MediaView, IngestError> {
    if let Ok(view) = ingest.view(id, user).await {
        // Made before (the upload's row was not marked): mark it now.
        ingest.store.finish_upload(id, ingest.clock.now_ms()).await?;
        lock.forget();
        purge_later(ingest);
        return Ok(view);
    }
    let config = &ingest.config;
    let now = ingest.clock.now_ms();
    let checked = async {
        let usage = ingest.records.usage(user, now).await?;
        quota::check(&config.quota, &usage, Some(length), now)?;
        if ingest.queue.queued().await? >= config.max_queued_jobs {
            return Err(IngestError::QueueFull);
        }
        assemble(ingest, id, length).await
    };
    let work = async {
        match checked.await {
            Ok(spooled) => crate::routes::finish(ingest, user, media_type, spooled, id, slots).await,
            Err(e) => Err(e),
        }
    };
    // Joining the parts and storing a large original take a while: the lock is renewed meanwhile,
    // so no sweep (nor a client's retry) takes the upload and makes its media a second time.
    tokio::pin!(work);
    let made = tokio::select! {
        made = &mut work => made,
        () = hold_lock(ingest, id, &lock.writer) => work.await,
    };
    match made {
        Ok(view) => {
            ingest.store.finish_upload(id, ingest.clock.now_ms()).await?;
            lock.forget();
            purge_later(ingest);
            Ok(view)
        }
        Err(e) if refuses_the_bytes(&e) => {
            // Refused for what the bytes are: the upload ends with the refusal, as a POST's would.
            let _ = ingest.store.delete_upload(id, user, ingest.clock.now_ms()).await;
            lock.forget();
            purge_later(ingest);
            Err(e)
        }
        Err(e) => {
            // Our side failed (or a quota that may free up): the bytes stay for a retry.
            lock.release().await;
            Err(e)
        }
    }
}

/// Whether an error says the upload's bytes will never be taken (so keeping them helps nobody).
fn refuses_the_bytes(error: &IngestError) -> bool {
    match error {
        IngestError::TypeMismatch { .. }
        | IngestError::UnsupportedType(_)
        | IngestError::TooLarge { .. }
        | IngestError::Empty
        | IngestError::Rejected(_) => true,
        IngestError::Probe(e) | IngestError::Media(e) => e.is_permanent(),
        IngestError::Quota(q) => q.retry_after.is_none(),
        _ => false,
    }
}

/// Makes the media of uploads whose last request failed on our side, or whose node died before
/// making it: the sweep's part, so a client told its upload is complete gets its media.
pub(crate) async fn finish_stuck(ingest: &Arc<Ingest>) -> Result<u64, IngestError> {
    let now = ingest.clock.now_ms();
    let mut finished = 0;
    for (id, owner) in ingest.store.stuck_uploads(now, 10).await? {
        // Each may take a while: the clock is read again for each lock.
        let now = ingest.clock.now_ms();
        let Some(row) = ingest.store.upload(id, now).await? else { continue };
        let Some(length) = row.length else { continue };
        let Ok(media_type) = MediaType::from_mime(&row.mime) else { continue };
        let writer = uuid::Uuid::now_v7().to_string();
        if !ingest.store.lock_upload(id, length, &writer, now + LOCK_MS, now).await? {
            continue;
        }
        let lock = UploadLock { ingest: ingest.clone(), id, writer, held: true };
        let Ok(user_slot) = ingest.user_uploads.take(&owner, ingest.config.quota.uploads_at_once) else {
            lock.release().await;
            continue;
        };
        let Ok(slot) = ingest.uploads.try_acquire() else {
            lock.release().await;
            continue;
        };
        match complete(ingest, &owner, id, media_type, length as u64, (slot, user_slot), lock).await {
            Ok(_) => finished += 1,
            Err(e) => tracing::warn!(upload = %id, error = %e, "finishing an upload that holds all its bytes failed"),
        }
    }
    Ok(finished)
}

/// A PATCH's hold on its upload. Given back when the request ends without moving the offset, also
/// when its handler is dropped mid-way (a lock never outlives its request by more than a moment).
struct UploadLock {
    ingest: Arc<Ingest>,
    id: MediaId,
    writer: String,
    held: bool,
}

impl UploadLock {
    /// Gives the lock back now, so the client's next request finds the upload free.
    async fn release(mut self) {
        self.held = false;
        if let Err(e) = self.ingest.store.release_upload_lock(self.id, &self.writer).await {
            tracing::warn!(error = %e, upload = %self.id, "releasing an upload's lock failed; it lapses");
        }
    }

    /// The lock went with the request's part (the offset moved).
    fn forget(mut self) {
        self.held = false;
    }
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        if self.held {
            let (ingest, id, writer) = (self.ingest.clone(), self.id, std::mem::take(&mut self.writer));
            tokio::spawn(async move {
                let _ = ingest.store.release_upload_lock(id, &writer).await;
            });
        }
    }
}

/// What a PATCH body brought.
enum Received {
    /// An empty body: the upload stays where it was.
    Nothing,
    Bytes(ReceivedPart),
}

struct ReceivedPart {
    len: u64,
    /// The upload's first bytes, for the sniff, while it has not been sniffed (else empty).
    head: Vec<u8>,
    /// Why the body stopped early, when it did (what came is kept).
    interrupted: Option<String>,
}

/// Bytes gathered before they go on to the part's writer (and its checksum).
const BATCH: usize = 1024 * 1024;

/// Streams one PATCH body straight into part `key` of the blob store (each byte written once), at
/// most `room` bytes, renewing the upload's lock as bytes arrive, checking the checksum (on
/// blocking threads) and sniffing the upload's first bytes once there are enough. The part is
/// stored only if the body checks out; otherwise nothing is.
#[allow(clippy::too_many_arguments, reason = "one request's parts, passed once")]
async fn receive(
    ingest: &Ingest,
    id: MediaId,
    lock: &str,
    key: &BlobId,
    body: &mut axum::body::BodyDataStream,
    room: u64,
    checksum: Option<Checksum>,
    head: Option<&[u8]>,
    media_type: MediaType,
    length: Option<u64>,
) -> Result<Received, IngestError> {
    let work = async {
        let mut writer = ingest.parts.writer(key).await?;
        let received = stream_part(&mut writer, body, room, checksum, head, media_type, length).await;
        match received {
            Ok(Received::Bytes(part)) => {
                writer.finish().await?;
                Ok(Received::Bytes(part))
            }
            other => {
                let _ = writer.abort().await;
                other
            }
        }
    };
    // The lock is renewed while the body streams and the part is stored (a slow store, a slow
    // client): the upload stays this request's until it is done.
    tokio::select! {
        received = work => received,
        () = hold_lock(ingest, id, lock) => Err(IngestError::UploadLocked),
    }
}

/// Renews upload `id`'s lock for `writer` now and every [`RENEW_EVERY`]; ends when the lock is
/// no longer `writer`'s (a database error is logged and tried again at the next tick).
async fn hold_lock(ingest: &Ingest, id: MediaId, writer: &str) {
    let mut every = tokio::time::interval(RENEW_EVERY);
    loop {
        every.tick().await;
        match ingest.store.renew_upload_lock(id, writer, ingest.clock.now_ms() + LOCK_MS).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(upload = %id, error = %e, "renewing an upload's lock failed"),
        }
    }
}

async fn stream_part(
    writer: &mut edge_cache::BlobWriter,
    body: &mut axum::body::BodyDataStream,
    room: u64,
    mut checksum: Option<Checksum>,
    head: Option<&[u8]>,
    media_type: MediaType,
    length: Option<u64>,
) -> Result<Received, IngestError> {
    let mut batch = bytes::BytesMut::new();
    // An upload already sniffed has no head (`None`); one not yet sniffed gathers its first bytes.
    let needs_sniff = head.is_some();
    let mut head = head.unwrap_or_default().to_vec();
    let mut sniffed = false;
    let mut len: u64 = 0;
    let mut interrupted = None;
    loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(e)) => {
                interrupted = Some(e.to_string());
                None
            }
            None => None,
        };
        if let Some(chunk) = &chunk {
            len += chunk.len() as u64;
            if len > room {
                return Err(IngestError::TooLarge { limit: length.unwrap_or(room) });
            }
            if needs_sniff && !sniffed {
                let want = spool::SNIFF_BYTES.saturating_sub(head.len());
                head.extend_from_slice(&chunk[..want.min(chunk.len())]);
                sniffed = spool::sniff(&head, media_type, false)?;
            }
            batch.extend_from_slice(chunk);
        }
        let last = chunk.is_none();
        if batch.len() >= BATCH || (last && !batch.is_empty()) {
            let bytes = std::mem::take(&mut batch).freeze();
            if let Some(mut sum) = checksum.take() {
                let input = bytes.clone();
                let task = tokio::task::spawn_blocking(move || {
                    sum.update(&input);
                    sum
                });
                checksum = Some(task.await.map_err(|e| IngestError::Io(std::io::Error::other(e)))?);
            }
            writer.write(&bytes).await?;
        }
        if last {
            break;
        }
    }
    if let Some(checksum) = checksum {
        if interrupted.is_some() {
            // A checksum covers the whole body: what came cannot be checked, so none of it is kept.
            return Err(IngestError::Interrupted(interrupted.unwrap_or_default()));
        }
        if !checksum.matches() {
            return Err(IngestError::ChecksumMismatch);
        }
    }
    if len == 0 {
        // A body that failed before its first byte brought nothing, and did not end anything.
        if let Some(e) = interrupted {
            return Err(IngestError::Interrupted(e));
        }
        return Ok(Received::Nothing);
    }
    if needs_sniff && !sniffed {
        // Fewer bytes than the sniff reads, so far: judge them now if they are all there are.
        let complete = length.is_some_and(|length| head.len() as u64 >= length);
        sniffed = spool::sniff(&head, media_type, complete)?;
    }
    // Sniffed (or sniffed before): no head to keep.
    let head = if sniffed || !needs_sniff { Vec::new() } else { head };
    Ok(Received::Bytes(ReceivedPart { len, head, interrupted }))
}

/// Joins upload `id`'s parts into a spooled upload of `length` bytes, hashing as it reads.
async fn assemble(ingest: &Ingest, id: MediaId, length: u64) -> Result<spool::Spooled, IngestError> {
    let parts = ingest.store.upload_parts(id).await?;
    let mut assembler = spool::Assembler::new(&ingest.tmp_dir)?;
    let mut at = 0u64;
    for part in parts {
        if part.start_at as u64 != at {
            return Err(IngestError::Io(std::io::Error::other(format!("upload {id} has a gap at {at}"))));
        }
        let key: BlobId = part.key.parse().map_err(|_| std::io::Error::other("a part's key is not a blob id"))?;
        let mut stream = ingest.parts.get_range_stream(&key, 0..part.len as u64).await?;
        while let Some(chunk) = stream.next().await {
            assembler.push(&chunk.map_err(edge_cache::EdgeError::from)?).await?;
        }
        at += part.len as u64;
    }
    if at != length {
        return Err(IngestError::Io(std::io::Error::other(format!("upload {id} holds {at} of {length} bytes"))));
    }
    assembler.finish().await
}

/// The answer to the last offset of an upload already finished (its first answer was lost).
async fn finished_answer(
    ingest: &Ingest,
    user: &UserId,
    id: MediaId,
    row: &UploadRow,
    dialect: Dialect,
) -> Result<Appended, IngestError> {
    Ok(match ingest.view(id, user).await {
        Ok(view) => made_answer(row.upload_offset as u64, row.expires_at, view, dialect),
        Err(_) => progress_answer(row.upload_offset as u64, row.expires_at),
    })
}

fn progress_answer(offset: u64, expires_at: i64) -> Appended {
    let mut headers = HeaderMap::new();
    headers.insert(UPLOAD_OFFSET.clone(), HeaderValue::from(offset));
    headers.insert(UPLOAD_EXPIRES.clone(), http_date(expires_at));
    Appended { headers, view: None }
}

/// The answer of the request that made the media: tus hears its status in a header; the draft
/// gets the media itself.
fn made_answer(offset: u64, expires_at: i64, view: crate::MediaView, dialect: Dialect) -> Appended {
    let mut answer = progress_answer(offset, expires_at);
    answer.headers.insert(MEDIA_STATUS.clone(), status_value(view.status));
    if dialect.is_draft() {
        answer.view = Some(view);
    }
    answer
}

fn status_value(status: types::MediaStatus) -> HeaderValue {
    HeaderValue::from_static(status.as_str())
}

/// Deletes what the log holds (the parts of an upload that ended) beside the answer.
fn purge_later(ingest: &Arc<Ingest>) {
    let ingest = ingest.clone();
    tokio::spawn(async move {
        if let Err(e) = ingest.purge_deleted().await {
            tracing::warn!(error = %e, "deleting an upload's parts failed; the sweep will");
        }
    });
}

/// Upload `id` if `user` owns it (anyone else hears it does not exist).
async fn owned(ingest: &Ingest, user: &UserId, id: &str) -> Result<(MediaId, UploadRow), IngestError> {
    let id: MediaId = id.parse().map_err(|_| IngestError::NotFound)?;
    let row = ingest.store.upload(id, ingest.clock.now_ms()).await?;
    let row = row.filter(|row| row.owner == user.as_str()).ok_or(IngestError::NotFound)?;
    Ok((id, row))
}

fn expiry_ms(ingest: &Ingest) -> i64 {
    (ingest.config.resumable_expiry_secs as i64).saturating_mul(1000)
}

fn is_offset_stream(headers: &HeaderMap) -> bool {
    has_content_type(headers, OFFSET_OCTET_STREAM)
}

fn has_content_type(headers: &HeaderMap, expected: &str) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(expected.as_bytes()))
}

fn bad(message: &str) -> IngestError {
    IngestError::BadRequest(message.into())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, IngestError> {
    headers.get(name).map(|v| v.to_str().map_err(|_| bad(&format!("{name} is not text")))).transpose()
}

fn header_u64(headers: &HeaderMap, name: &HeaderName) -> Result<Option<u64>, IngestError> {
    header_str(headers, name)?
        .map(|v| v.trim().parse::<u64>().map_err(|_| bad(&format!("{name} must be a non-negative integer"))))
        .transpose()
}

/// The media type `Upload-Metadata` names as `filetype` (its values are base64).
fn media_type_of(metadata: &str) -> Result<MediaType, IngestError> {
    let mut filetype = None;
    for pair in metadata.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once(' ').unwrap_or((pair, ""));
        let value =
            STANDARD.decode(value.trim()).map_err(|_| bad(&format!("Upload-Metadata: {key}'s value is not base64")))?;
        if key == "filetype" {
            filetype = Some(String::from_utf8(value).map_err(|_| bad("Upload-Metadata: filetype is not text"))?);
        }
    }
    let filetype = filetype
        .ok_or_else(|| IngestError::UnsupportedType("Upload-Metadata must name the media type as filetype".into()))?;
    let mime = filetype.split(';').next().unwrap_or_default().trim();
    MediaType::from_mime(mime).map_err(|e| IngestError::UnsupportedType(e.to_string()))
}

/// An `Upload-Checksum` and the digest of the bytes so far.
enum Checksum {
    Sha1 { expected: Vec<u8>, hasher: sha1::Sha1 },
    Sha256 { expected: Vec<u8>, hasher: sha2::Sha256 },
}

impl Checksum {
    fn parse(header: Option<&str>) -> Result<Option<Self>, IngestError> {
        let Some(header) = header else { return Ok(None) };
        let (algorithm, value) =
            header.trim().split_once(' ').ok_or_else(|| bad("Upload-Checksum: ALGORITHM BASE64"))?;
        let expected = STANDARD.decode(value.trim()).map_err(|_| bad("Upload-Checksum's value is not base64"))?;
        match algorithm {
            "sha1" => Ok(Some(Checksum::Sha1 { expected, hasher: sha1::Sha1::new() })),
            "sha256" => Ok(Some(Checksum::Sha256 { expected, hasher: sha2::Sha256::new() })),
            other => Err(bad(&format!("Upload-Checksum: {other} is not one of {TUS_CHECKSUMS}"))),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Checksum::Sha1 { hasher, .. } => hasher.update(bytes),
            Checksum::Sha256 { hasher, .. } => hasher.update(bytes),
        }
    }

    fn matches(self) -> bool {
        match self {
            Checksum::Sha1 { expected, hasher } => hasher.finalize()[..] == expected[..],
            Checksum::Sha256 { expected, hasher } => hasher.finalize()[..] == expected[..],
        }
    }
}

/// An RFC 9110 date for `Upload-Expires`.
fn http_date(unix_ms: i64) -> HeaderValue {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    HeaderValue::from_str(&httpdate::fmt_http_date(at.max(SystemTime::UNIX_EPOCH))).expect("a date is ASCII")
}
