//! `POST /v1/media` and `GET /v1/media/{id}`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, BodyDataStream};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use edge_cache::Stored;
use tokio::sync::broadcast::error::RecvError;
use transcode::protocol::Task;
use transcode::{MediaType, TranscodeError};
use types::{MediaId, MediaStatus, UserId};

use crate::queue::Lane;
use crate::store::{Deleted, JobState, NewMedia};
use crate::view::{MediaParts, url_expiry};
use crate::{DeletedBlob, Ingest, IngestError, MediaView, Namespace, quota, spool};

pub(crate) fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/media", post(upload))
        .route("/v1/media/{id}", get(show).delete(delete))
        .route("/v1/limits", get(crate::quota::limits))
        .with_state(ingest)
}

async fn upload(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<MediaView>), IngestError> {
    let mut body = body.into_data_stream();
    let result = accept(&ingest, &user, &headers, &mut body).await;
    if result.is_err() {
        spool::discard(&mut body).await;
    }
    result
}

async fn accept(
    ingest: &Ingest,
    user: &UserId,
    headers: &HeaderMap,
    body: &mut BodyDataStream,
) -> Result<(StatusCode, Json<MediaView>), IngestError> {
    let config = &ingest.config;
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim())
        .ok_or_else(|| {
            IngestError::UnsupportedType("a Content-Type header naming the media type is required".into())
        })?;
    let media_type = MediaType::from_mime(declared).map_err(|e| IngestError::UnsupportedType(e.to_string()))?;
    let kind = media_type.kind();
    let max_bytes = config.max_bytes(kind);
    let declared_len = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared_len.is_some_and(|len| len > max_bytes) {
        return Err(IngestError::TooLarge { limit: max_bytes });
    }
    // The user's own share first, so one over it takes none of the shared slots.
    let user_slot = ingest.user_uploads.take(user, config.quota.uploads_at_once)?;
    let now = ingest.clock.now_ms();
    let usage = ingest.records.usage(user, now).await?;
    quota::check(&config.quota, &usage, declared_len, now)?;
    let slot = ingest.uploads.try_acquire().map_err(|_| IngestError::TooManyUploads)?;
    if ingest.queue.queued().await? >= config.max_queued_jobs {
        return Err(IngestError::QueueFull);
    }

    let spooled = spool::receive(body, &ingest.tmp_dir, max_bytes, media_type).await?;
    // A body without a Content-Length is held to the quotas now that its length is known.
    if declared_len.is_none() {
        quota::check(&config.quota, &usage, Some(spooled.len), now)?;
    }
    let view = finish(ingest, user, media_type, spooled, MediaId::new(), (slot, user_slot)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Takes an upload's received bytes the rest of the way, as `POST /v1/media` and a resumable
/// upload's last request both do: the probe, deduplication against known bytes, the original
/// stored, the record `id` with its job, and a short wait for the job. `slots` (the upload's place
/// among all and among its user's) are given back once the bytes are stored.
pub(crate) async fn finish(
    ingest: &Ingest,
    user: &UserId,
    media_type: MediaType,
    spooled: spool::Spooled,
    id: MediaId,
    slots: (tokio::sync::SemaphorePermit<'_>, quota::UserUpload<'_>),
) -> Result<MediaView, IngestError> {
    let config = &ingest.config;
    let kind = media_type.kind();

    // The headers alone say how large the picture is or how long the sound: refuse a pixel bomb or
    // an hour-long "voice note" before decoding anything. A sandboxed worker reads them; this
    // process never parses more than the sniff. Videos are probed by their job, in the same kind
    // of worker.
    let task = match media_type {
        MediaType::Image(format) => Some(Task::ProbeImage { format, max_pixels: config.max_pixels }),
        MediaType::Audio(container) => Some(Task::ProbeAudio { container, limits: config.audio.limits.clone() }),
        MediaType::Video(..) => None,
    };
    if let Some(task) = task {
        probe(ingest, &spooled.file, task).await?;
    }

    // Bytes already known to be unusable are refused without storing anything.
    let known = ingest.queue.job(&spooled.blob).await?;
    if let Some(job) = known.as_ref().filter(|job| job.status == MediaStatus::Failed && job.permanent) {
        return Err(rejected(job.clone()));
    }
    // Bytes whose job has succeeded need no original: the upload shares the variants (and the
    // original may be gone for good, see `ingest.keep_originals_days`).
    let done_before = known.is_some_and(|job| job.status == MediaStatus::Ready);
    let mut stored = Stored::Existing;
    let stored_at = ingest.clock.now_ms();
    if !done_before {
        stored = ingest.originals.put_file(&spooled.blob, spooled.file.path()).await?;
    }
    let (blob, len) = (spooled.blob, spooled.len);

    let mut done = ingest.job_done.subscribe();
    let media = NewMedia { id, owner: user, kind, blob, mime: media_type.mime(), bytes: len };
    // A sweep deleting these bytes as this upload queues a job for them: the record waits until
    // that deletion is over and the original is stored again, so once it is committed the job's
    // original is there.
    let mut settled = Vec::new();
    loop {
        match ingest.records.record_upload(&media, stored_at, &settled).await {
            Ok(overlaps) if overlaps.is_empty() => break,
            Ok(overlaps) => {
                ingest.wait_for_deletions(&overlaps).await?;
                ingest.originals.put_file(&blob, spooled.file.path()).await?;
                settled.extend(overlaps.iter().map(|o| o.seq));
            }
            Err(e) => {
                // Nothing of this upload refers to bytes stored just now: they go, through the log
                // and a claim (an upload of the same bytes that committed meanwhile keeps them).
                if stored == Stored::New {
                    let now = ingest.clock.now_ms();
                    match ingest.store.log_deletion(Namespace::Originals, &blob, now).await {
                        Ok(seq) => {
                            let deleted = DeletedBlob { seq, namespace: Namespace::Originals, blob, deleted_at: now };
                            let _ = ingest.purge(&deleted).await;
                        }
                        Err(log) => tracing::warn!(%blob, error = %log, "an upload's original is left behind"),
                    }
                }
                return Err(e.into());
            }
        }
    }
    // The job went meanwhile (its last media deleted) and this upload queued a new one, which
    // needs the original after all.
    if done_before && ingest.store.original_needed(&blob).await? {
        ingest.originals.put_file(&blob, spooled.file.path()).await?;
    }
    drop(spooled);
    ingest.queued(Lane::of(kind)).notify_one();
    // The body is in; waiting for the transcode holds no upload slot.
    drop(slots);

    // Photos and voice notes take a fraction of a second: wait a little so most uploads answer
    // `ready`, and so bytes that cannot be decoded are refused here rather than reported later
    // (a video's probe is quick too, so a hostile one is refused here as well).
    let wait = tokio::time::sleep(Duration::from_millis(config.wait_for_ready_ms));
    tokio::pin!(wait);
    // On a shared database another node may run the job: its row says when it ends.
    let shared = ingest.queue.shared();
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + SHARED_POLL, SHARED_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut job = ingest.queue.job(&blob).await?;
    while job.as_ref().is_some_and(|j| j.status == MediaStatus::Processing) {
        tokio::select! {
            event = done.recv() => match event {
                Ok(finished) if finished != blob => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => job = ingest.queue.job(&blob).await?,
                Err(RecvError::Closed) => break,
            },
            _ = poll.tick(), if shared => job = ingest.queue.job(&blob).await?,
            _ = &mut wait => break,
        }
    }

    if let Some(job) = job.filter(|j| j.status == MediaStatus::Failed && j.permanent) {
        if let Some(seq) = ingest.records.forget_upload(id, &blob).await? {
            // Its original was logged for deletion: delete it now (a sweep would otherwise).
            let deleted = DeletedBlob { seq, namespace: Namespace::Originals, blob, deleted_at: ingest.clock.now_ms() };
            ingest.purge(&deleted).await?;
        }
        return Err(rejected(job));
    }
    ingest.view(id, user).await
}

/// How often an upload waiting for its job reads the job's row when another node may run it.
const SHARED_POLL: Duration = Duration::from_millis(100);

/// Runs an upload-time probe in a worker of the probe pool, within `probe_timeout` in all.
async fn probe(ingest: &Ingest, file: &tempfile::NamedTempFile, task: Task) -> Result<(), IngestError> {
    let workers = &ingest.workers;
    let deadline = tokio::time::Instant::now() + workers.probe_timeout;
    let refused = |e: TranscodeError| match e {
        TranscodeError::Busy => IngestError::TooManyUploads,
        e => IngestError::Probe(e),
    };
    let mut lease = workers.probe.checkout(workers.probe_timeout).await.map_err(refused)?;
    lease.stage(file.path()).await.map_err(refused)?;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    lease.run(task, left, |_| {}).await.map_err(refused)?;
    Ok(())
}

/// The error for bytes whose job failed for good, with the job's own code.
fn rejected(job: JobState) -> IngestError {
    IngestError::Rejected(job.error.unwrap_or_else(|| types::ErrorDetail {
        code: "corrupt_media".into(),
        message: "the file cannot be decoded".into(),
    }))
}

async fn show(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
) -> Result<Json<MediaView>, IngestError> {
    let id: MediaId = id.parse().map_err(|_| IngestError::NotFound)?;
    Ok(Json(ingest.view(id, &user).await?))
}

/// `DELETE /v1/media/{id}`: the owner takes their media back. Those it was shared with lose access;
/// when no other upload holds the same bytes, a running job is stopped and the original and the
/// variants are deleted from the blob store. Edges keep what they cached until it is purged there
/// (`DELETE /admin/blobs/{blob}`) or evicted; signed URLs already given out expire on their own.
async fn delete(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
    Path(id): Path<String>,
) -> Result<StatusCode, IngestError> {
    let id: MediaId = id.parse().map_err(|_| IngestError::NotFound)?;
    match ingest.records.delete(id, &user).await? {
        Deleted::NotFound => return Err(IngestError::NotFound),
        Deleted::Kept => {}
        Deleted::Orphaned { source } => {
            ingest.running.cancel(&source);
            // The deletion logged its blobs: delete them now, beside the answer (a sweep finishes
            // what this leaves).
            let ingest = ingest.clone();
            tokio::spawn(async move {
                if let Err(e) = ingest.purge_deleted().await {
                    tracing::warn!(error = %e, "deleting a deleted media's blobs failed; the sweep will");
                }
            });
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

impl Ingest {
    /// The media as its owner, or someone it was shared with, sees it; anyone else is told it does
    /// not exist.
    pub(crate) async fn view(&self, id: MediaId, user: &UserId) -> Result<MediaView, IngestError> {
        let row = self.records.media(id).await?.ok_or(IngestError::NotFound)?;
        if row.owner != user.as_str() && !self.records.may_read(id, user).await? {
            return Err(IngestError::NotFound);
        }
        Ok(self.view_of(id, row))
    }

    /// Media `id` as a client draws it (kind, size, preview, variants with signed URLs), for a
    /// caller that has made its own check of who may see it (a profile's or a group's avatar);
    /// `None` when it is gone.
    pub async fn describe(&self, id: MediaId) -> Result<Option<MediaView>, IngestError> {
        Ok(self.records.media(id).await?.map(|row| self.view_of(id, row)))
    }

    /// [`Ingest::describe`], with who uploaded it.
    pub async fn describe_with_owner(&self, id: MediaId) -> Result<Option<(MediaView, String)>, IngestError> {
        Ok(self.records.media(id).await?.map(|row| {
            let owner = row.owner.clone();
            (self.view_of(id, row), owner)
        }))
    }

    fn view_of(&self, id: MediaId, row: crate::store::MediaRow) -> MediaView {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        MediaParts {
            id,
            kind: row.kind,
            blob: row.blob,
            status: row.job.status,
            error: row.job.error,
            result: row.job.result,
            progress: row.job.progress,
            signer: &self.signer,
            url_exp: url_expiry(now, self.config.url_ttl_secs),
            base: self.config.public_base_url.as_deref().unwrap_or_default().trim_end_matches('/'),
        }
        .view()
    }
}
