//! The job queue (rows in the database) and the runner that works it off through the worker pools.
//!
//! A job is claimed by setting a lease; a server that dies leaves the lease to expire and the job is
//! claimed again, up to `max_attempts`. Failures a retry cannot fix (corrupt or unsupported input,
//! a job killed for memory or time) end the job at once; a worker that crashed or broke its
//! contract gets one more try; others back off exponentially.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Row, SqlitePool};

use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use transcode::protocol::Task;
use transcode::{Body, MediaType, TranscodeError, WorkerPool, audio, photo};
use types::{BlobId, ErrorDetail, MediaId, MediaKind, MediaStatus, UserId};

use crate::view::JobResult;
use crate::{Ingest, JobConfig, now_ms};

/// What deleting a media record left behind.
#[derive(Debug)]
pub(crate) enum Deleted {
    /// No such media of this owner's.
    NotFound,
    /// Deleted; other uploads of the same bytes keep the job and the blobs.
    Kept,
    /// Deleted with its job: these blobs are nobody's now.
    Orphaned { source: BlobId, variants: Vec<BlobId> },
}

/// The runner's two queues: images and audio must never wait behind a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Images and audio, in the warm `quick` worker pool.
    Quick,
    /// Videos, one worker process each.
    Video,
}

impl Lane {
    /// The kinds this lane claims (a pair, for the claim's `IN`).
    fn kinds(self) -> [MediaKind; 2] {
        match self {
            Lane::Quick => [MediaKind::Image, MediaKind::Audio],
            Lane::Video => [MediaKind::Video, MediaKind::Video],
        }
    }

    pub(crate) fn of(kind: MediaKind) -> Self {
        match kind {
            MediaKind::Image | MediaKind::Audio => Lane::Quick,
            MediaKind::Video => Lane::Video,
        }
    }
}

/// The `jobs` and `media` tables.
#[derive(Debug, Clone)]
pub struct JobQueue {
    db: SqlitePool,
    config: JobConfig,
}

/// A job a worker has claimed.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) blob: BlobId,
    pub(crate) kind: MediaKind,
    pub(crate) mime: String,
    pub(crate) attempts: u32,
}

/// Where a job stands.
#[derive(Debug, Clone)]
pub(crate) struct JobState {
    pub(crate) status: MediaStatus,
    pub(crate) permanent: bool,
    pub(crate) error: Option<ErrorDetail>,
    pub(crate) result: Option<JobResult>,
    pub(crate) progress: Option<f32>,
}

/// A media row joined with its job.
#[derive(Debug)]
pub(crate) struct MediaRow {
    pub(crate) owner: String,
    pub(crate) kind: MediaKind,
    pub(crate) blob: BlobId,
    pub(crate) job: JobState,
}

/// One new upload, as recorded with its job.
pub(crate) struct NewMedia<'a> {
    pub(crate) id: MediaId,
    pub(crate) owner: &'a UserId,
    pub(crate) kind: MediaKind,
    pub(crate) blob: BlobId,
    pub(crate) mime: &'a str,
    pub(crate) bytes: u64,
}

fn corrupt_row(what: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("bad {what} in the database").into())
}

fn job_state(row: &sqlx::sqlite::SqliteRow) -> Result<JobState, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let error =
        match (row.try_get::<Option<String>, _>("error_code")?, row.try_get::<Option<String>, _>("error_message")?) {
            (Some(code), message) => Some(ErrorDetail { code, message: message.unwrap_or_default() }),
            _ => None,
        };
    let result = match row.try_get::<Option<String>, _>("result")? {
        Some(json) => Some(serde_json::from_str(&json).map_err(|_| corrupt_row("job result"))?),
        None => None,
    };
    Ok(JobState {
        status: MediaStatus::parse(&status).ok_or_else(|| corrupt_row("job status"))?,
        permanent: row.try_get::<i64, _>("permanent")? != 0,
        error,
        result,
        progress: row.try_get::<Option<f64>, _>("progress")?.map(|p| p as f32),
    })
}

impl JobQueue {
    pub fn new(db: SqlitePool, config: JobConfig) -> Self {
        Self { db, config }
    }

    /// Jobs waiting or running.
    pub async fn queued(&self) -> Result<u64, sqlx::Error> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'processing'").fetch_one(&self.db).await?;
        Ok(n as u64)
    }

    /// Frees every lease. Only for a process that alone works this queue, at start-up: whatever it
    /// held before a crash is nobody's now, so it need not wait for the leases to expire.
    pub async fn release_leases(&self) -> Result<u64, sqlx::Error> {
        let done =
            sqlx::query("UPDATE jobs SET lease_until = NULL WHERE status = 'processing' AND lease_until IS NOT NULL")
                .execute(&self.db)
                .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn job(&self, blob: &BlobId) -> Result<Option<JobState>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT status, permanent, error_code, error_message, result, progress FROM jobs WHERE source_blob = ?",
        )
        .bind(blob.to_hex())
        .fetch_optional(&self.db)
        .await?;
        row.as_ref().map(job_state).transpose()
    }

    /// The media record and a job for its bytes, in one transaction. A job for the same bytes is
    /// reused; one that failed for a reason a retry might fix is queued again.
    pub(crate) async fn record_upload(&self, media: NewMedia<'_>) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (source_blob, kind, source_mime, status, run_after, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'processing', ?4, ?4, ?4)
             ON CONFLICT (source_blob) DO UPDATE
                SET status = 'processing', attempts = 0, run_after = ?4, lease_until = NULL,
                    error_code = NULL, error_message = NULL, updated_at = ?4
              WHERE jobs.status = 'failed' AND jobs.permanent = 0",
        )
        .bind(media.blob.to_hex())
        .bind(media.kind.as_str())
        .bind(media.mime)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO media (id, owner, kind, source_blob, source_mime, source_bytes, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(media.id.to_string())
        .bind(media.owner.as_str())
        .bind(media.kind.as_str())
        .bind(media.blob.to_hex())
        .bind(media.mime)
        .bind(media.bytes as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Undoes an upload whose bytes turned out to be unusable. Returns whether nothing refers to
    /// the bytes any more, in which case the job is gone too and the blob may be deleted.
    pub(crate) async fn forget_upload(&self, id: MediaId, blob: &BlobId) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        sqlx::query("DELETE FROM media WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
        let orphaned = sqlx::query(
            "DELETE FROM jobs WHERE source_blob = ?1 AND NOT EXISTS (SELECT 1 FROM media WHERE source_blob = ?1)",
        )
        .bind(blob.to_hex())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(orphaned)
    }

    /// Whether `user` owns media `id` or was given access to it.
    pub(crate) async fn may_read(&self, id: MediaId, user: &UserId) -> Result<bool, sqlx::Error> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM media WHERE id = ?1 AND owner = ?2
             UNION ALL SELECT 1 FROM media_grants WHERE media_id = ?1 AND user_id = ?2 LIMIT 1",
        )
        .bind(id.to_string())
        .bind(user.as_str())
        .fetch_optional(&self.db)
        .await?;
        Ok(found.is_some())
    }

    /// Lets `users` read media `id` (idempotent).
    pub(crate) async fn grant(&self, id: MediaId, users: &[UserId]) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        for user in users {
            sqlx::query(
                "INSERT INTO media_grants (media_id, user_id, granted_at) VALUES (?, ?, ?)
                 ON CONFLICT (media_id, user_id) DO NOTHING",
            )
            .bind(id.to_string())
            .bind(user.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    pub(crate) async fn media(&self, id: MediaId) -> Result<Option<MediaRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT m.owner, m.kind, m.source_blob, j.status, j.permanent, j.error_code, j.error_message, j.result,
                    j.progress
               FROM media m JOIN jobs j ON j.source_blob = m.source_blob
              WHERE m.id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get("kind")?;
        let blob: String = row.try_get("source_blob")?;
        Ok(Some(MediaRow {
            owner: row.try_get("owner")?,
            kind: MediaKind::parse(&kind).ok_or_else(|| corrupt_row("media kind"))?,
            blob: blob.parse().map_err(|_| corrupt_row("blob id"))?,
            job: job_state(&row)?,
        }))
    }

    /// Claims the next due job of `lane` whose lease is free, or `None`.
    pub(crate) async fn claim(&self, lane: Lane) -> Result<Option<Claimed>, sqlx::Error> {
        let now = now_ms();
        let lease_until = now + (self.config.lease_secs * 1000) as i64;
        let [first, second] = lane.kinds();
        let row = sqlx::query(
            "UPDATE jobs SET lease_until = ?1, attempts = attempts + 1, progress = NULL, updated_at = ?2
              WHERE source_blob = (
                    SELECT source_blob FROM jobs
                     WHERE kind IN (?3, ?4) AND status = 'processing' AND run_after <= ?2
                       AND (lease_until IS NULL OR lease_until < ?2)
                     ORDER BY run_after LIMIT 1)
                AND status = 'processing' AND (lease_until IS NULL OR lease_until < ?2)
            RETURNING source_blob, kind, source_mime, attempts",
        )
        .bind(lease_until)
        .bind(now)
        .bind(first.as_str())
        .bind(second.as_str())
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let blob: String = row.try_get("source_blob")?;
        let kind: String = row.try_get("kind")?;
        Ok(Some(Claimed {
            blob: blob.parse().map_err(|_| corrupt_row("blob id"))?,
            kind: MediaKind::parse(&kind).ok_or_else(|| corrupt_row("job kind"))?,
            mime: row.try_get("source_mime")?,
            attempts: row.try_get::<i64, _>("attempts")? as u32,
        }))
    }

    /// Keeps a running job's lease, and records how far it has got.
    pub(crate) async fn heartbeat(&self, blob: &BlobId, progress: Option<f32>) -> Result<(), sqlx::Error> {
        let now = now_ms();
        sqlx::query(
            "UPDATE jobs SET lease_until = ?1, progress = COALESCE(?2, progress), updated_at = ?3
              WHERE source_blob = ?4 AND status = 'processing'",
        )
        .bind(now + (self.config.lease_secs * 1000) as i64)
        .bind(progress.map(f64::from))
        .bind(now)
        .bind(blob.to_hex())
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Deletes `owner`'s media `id` and who it was shared with. When no other media refers to its
    /// bytes, the job goes too, and the blobs nothing refers to any more are named.
    pub(crate) async fn delete(&self, id: MediaId, owner: &UserId) -> Result<Deleted, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let source: Option<String> =
            sqlx::query_scalar("DELETE FROM media WHERE id = ? AND owner = ? RETURNING source_blob")
                .bind(id.to_string())
                .bind(owner.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(source) = source else { return Ok(Deleted::NotFound) };
        sqlx::query("DELETE FROM media_grants WHERE media_id = ?").bind(id.to_string()).execute(&mut *tx).await?;
        let job: Option<Option<String>> = sqlx::query_scalar(
            "DELETE FROM jobs WHERE source_blob = ?1 AND NOT EXISTS (SELECT 1 FROM media WHERE source_blob = ?1)
             RETURNING result",
        )
        .bind(&source)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(result) = job else {
            tx.commit().await?;
            return Ok(Deleted::Kept);
        };
        let mut variants = Vec::new();
        if let Some(json) = result {
            let result: JobResult = serde_json::from_str(&json).map_err(|_| corrupt_row("job result"))?;
            for blob in result.variants.values().map(|v| v.blob) {
                // Different uploads can come out as the same bytes (variants are named by their
                // hash too): keep what another job's result still names. Deleting is rare; the
                // scan is fine.
                let shared: Option<i64> = sqlx::query_scalar("SELECT 1 FROM jobs WHERE instr(result, ?) > 0 LIMIT 1")
                    .bind(blob.to_hex())
                    .fetch_optional(&mut *tx)
                    .await?;
                if shared.is_none() {
                    variants.push(blob);
                }
            }
        }
        tx.commit().await?;
        Ok(Deleted::Orphaned { source: source.parse().map_err(|_| corrupt_row("blob id"))?, variants })
    }

    pub(crate) async fn complete(&self, blob: &BlobId, result: &JobResult) -> Result<(), sqlx::Error> {
        let json = serde_json::to_string(result).expect("job results serialise");
        sqlx::query(
            "UPDATE jobs SET status = 'ready', result = ?, lease_until = NULL, error_code = NULL,
                    error_message = NULL, updated_at = ? WHERE source_blob = ?",
        )
        .bind(json)
        .bind(now_ms())
        .bind(blob.to_hex())
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Records a failed attempt: final when permanent, a second crash, or out of attempts; else
    /// retried after a back-off. Bytes that crashed a worker twice are refused for good, like
    /// corrupt ones. Clients see the error's fixed message; the detail was logged.
    pub(crate) async fn fail(&self, job: &Claimed, error: &TranscodeError) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let crashed_again = error.is_crash() && job.attempts >= 2;
        let last = error.is_permanent() || crashed_again || job.attempts >= self.config.max_attempts;
        let backoff_ms = 1000i64 << job.attempts.min(8);
        sqlx::query(
            "UPDATE jobs SET status = ?, permanent = ?, error_code = ?, error_message = ?, lease_until = NULL,
                    run_after = ?, updated_at = ? WHERE source_blob = ?",
        )
        .bind(if last { "failed" } else { "processing" })
        .bind(error.is_permanent() || crashed_again)
        .bind(error.code())
        .bind(error.public_message())
        .bind(now + backoff_ms)
        .bind(now)
        .bind(job.blob.to_hex())
        .execute(&self.db)
        .await?;
        Ok(())
    }
}

/// Works the queue until `shutdown` turns true, then lets running jobs finish.
#[derive(Debug)]
pub struct Runner;

impl Runner {
    pub async fn run(ingest: Arc<Ingest>, shutdown: watch::Receiver<bool>) {
        let quick = Self::lane(ingest.clone(), Lane::Quick, ingest.workers.quick.spec().workers, shutdown.clone());
        let video = Self::lane(ingest.clone(), Lane::Video, ingest.workers.video.spec().workers, shutdown);
        tokio::join!(quick, video);
    }

    async fn lane(ingest: Arc<Ingest>, lane: Lane, workers: usize, mut shutdown: watch::Receiver<bool>) {
        // Claim no more than can start at once: a claimed job's lease is ticking.
        let slots = Arc::new(Semaphore::new(workers));
        let mut running = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("never closed"),
                _ = shutdown.changed() => break,
            };
            while running.try_join_next().is_some() {}
            match ingest.queue.claim(lane).await {
                Ok(Some(job)) => {
                    let ingest = ingest.clone();
                    running.spawn(async move {
                        ingest.execute(job).await;
                        drop(permit);
                    });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        _ = ingest.queued(lane).notified() => {}
                        // Back-offs and expired leases come due without a wake-up.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                Err(e) => {
                    drop(permit);
                    tracing::error!(error = %e, "claiming a job failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        while running.try_join_next().is_some() {}
        tracing::info!(?lane, running = running.len(), "job runner stopping; waiting for running jobs");
        while running.join_next().await.is_some() {}
    }
}

/// How often a running job renews its lease and reports progress.
const HEARTBEAT: Duration = Duration::from_secs(2);

impl Ingest {
    async fn execute(&self, job: Claimed) {
        let started = Instant::now();
        let cancel = self.running.start(job.blob);
        let (progress_tx, mut progress_rx) = watch::channel(None::<f32>);
        let work = self.transcode(&job, progress_tx);
        tokio::pin!(work);
        let heartbeat = async {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let progress = *progress_rx.borrow_and_update();
                if let Err(e) = self.queue.heartbeat(&job.blob, progress).await {
                    tracing::warn!(blob = %job.blob, error = %e, "renewing a job's lease failed");
                }
            }
        };
        let outcome = tokio::select! {
            outcome = &mut work => Some(outcome),
            () = heartbeat => unreachable!("the heartbeat never ends"),
            () = cancel.notified() => None,
        };
        self.running.finish(&job.blob);
        let Some(outcome) = outcome else {
            // Dropping the work stopped it (a video worker process is killed); the job row is gone.
            tracing::info!(blob = %job.blob, "job cancelled: its media was deleted");
            let _ = self.job_done.send(job.blob);
            return;
        };
        let recorded = match &outcome {
            Ok(result) => self.queue.complete(&job.blob, result).await,
            Err(e) => self.queue.fail(&job, e).await,
        };
        match (&outcome, recorded) {
            (_, Err(e)) => tracing::error!(blob = %job.blob, error = %e, "recording a job's outcome failed"),
            (Ok(_), Ok(())) => {
                tracing::info!(blob = %job.blob, kind = %job.kind, ms = started.elapsed().as_millis() as u64, "job done")
            }
            (Err(e), Ok(())) => {
                tracing::warn!(blob = %job.blob, kind = %job.kind, attempt = job.attempts, error = %e, "job failed")
            }
        }
        let _ = self.job_done.send(job.blob);
    }

    async fn transcode(
        &self,
        job: &Claimed,
        progress: watch::Sender<Option<f32>>,
    ) -> Result<JobResult, TranscodeError> {
        if job.attempts > self.config.job.max_attempts {
            // Claimed again after its worker died each time: stop feeding it to workers.
            return Err(TranscodeError::TooManyAttempts(job.attempts - 1));
        }
        match MediaType::from_mime(&job.mime)? {
            MediaType::Image(format) => self.transcode_photo(job, format).await,
            MediaType::Audio(container) => self.transcode_audio(job, container).await,
            MediaType::Video(..) => self.transcode_video(job, progress).await,
        }
    }

    /// Runs `task` on the job's original in a worker of `pool` under `budget`, then stores the
    /// variants the parent checked and hashed.
    async fn in_worker(
        &self,
        pool: &WorkerPool,
        job: &Claimed,
        task: Task,
        budget: Duration,
        progress: impl FnMut(f32),
    ) -> Result<JobResult, TranscodeError> {
        let mut lease = pool.checkout(budget).await?;
        if !self.originals.download(&job.blob, &lease.input()).await.map_err(storage)? {
            return Err(TranscodeError::Corrupt("the uploaded bytes are missing from storage".into()));
        }
        let product = lease.run(task, budget, progress).await?;
        drop(lease);
        for variant in JobResult::variants_of(&product) {
            match &variant.body {
                Body::Memory(bytes) => self.variants.put(&variant.blob, bytes.clone()).await,
                Body::File(file) => self.variants.put_file(&variant.blob, file.path()).await,
            }
            .map_err(storage)?;
        }
        Ok(JobResult::from_product(&product))
    }

    async fn transcode_photo(&self, job: &Claimed, format: photo::Format) -> Result<JobResult, TranscodeError> {
        let limits = photo::Limits { max_pixels: self.config.max_pixels, memory_bytes: self.config.job.memory_bytes };
        let task = Task::Photo { format, settings: photo::Settings::default(), limits };
        self.in_worker(&self.workers.quick, job, task, self.config.job.timeout(), |_| {}).await
    }

    async fn transcode_audio(&self, job: &Claimed, container: audio::Container) -> Result<JobResult, TranscodeError> {
        let audio = &self.config.audio;
        let task = Task::Audio { container, settings: audio.output.clone(), limits: audio.limits.clone() };
        self.in_worker(&self.workers.quick, job, task, self.config.job.timeout(), |_| {}).await
    }

    async fn transcode_video(
        &self,
        job: &Claimed,
        progress: watch::Sender<Option<f32>>,
    ) -> Result<JobResult, TranscodeError> {
        let video = &self.config.video;
        let task = Task::Video { settings: video.output.clone(), limits: video.limits.clone() };
        let budget = Duration::from_secs(video.timeout_secs);
        self.in_worker(&self.workers.video, job, task, budget, |done| {
            progress.send_replace(Some(done));
        })
        .await
    }
}

fn storage(e: edge_cache::EdgeError) -> TranscodeError {
    TranscodeError::Io(e.to_string())
}

/// The jobs running in this process, so deleting a media can stop its job.
#[derive(Debug, Default)]
pub(crate) struct Running(std::sync::Mutex<std::collections::HashMap<BlobId, Arc<Notify>>>);

impl Running {
    fn start(&self, blob: BlobId) -> Arc<Notify> {
        let cancel = Arc::new(Notify::new());
        self.0.lock().expect("never poisoned").insert(blob, cancel.clone());
        cancel
    }

    fn finish(&self, blob: &BlobId) {
        self.0.lock().expect("never poisoned").remove(blob);
    }

    /// Stops the job of `blob` if it runs here; a no-op otherwise.
    pub(crate) fn cancel(&self, blob: &BlobId) {
        if let Some(cancel) = self.0.lock().expect("never poisoned").get(blob) {
            cancel.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue(config: JobConfig) -> (JobQueue, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        (JobQueue::new(crate::connect_sqlite(&url).await.unwrap(), config), dir)
    }

    async fn upload(queue: &JobQueue, bytes: &[u8]) -> BlobId {
        upload_kind(queue, bytes, MediaKind::Image).await
    }

    async fn upload_kind(queue: &JobQueue, bytes: &[u8], kind: MediaKind) -> BlobId {
        let blob = BlobId::of(bytes);
        let owner: UserId = "alice".parse().unwrap();
        let mime = match kind {
            MediaKind::Image => "image/jpeg",
            MediaKind::Audio => "audio/ogg",
            MediaKind::Video => "video/mp4",
        };
        let media = NewMedia { id: MediaId::new(), owner: &owner, kind, blob, mime, bytes: 1 };
        queue.record_upload(media).await.unwrap();
        blob
    }

    #[tokio::test]
    async fn videos_wait_in_a_lane_of_their_own() {
        let (queue, _dir) = queue(JobConfig::default()).await;
        let video = upload_kind(&queue, b"a video", MediaKind::Video).await;
        let voice = upload_kind(&queue, b"a voice note", MediaKind::Audio).await;
        let photo = upload(&queue, b"a photo").await;
        let quick: Vec<_> =
            [queue.claim(Lane::Quick).await.unwrap().unwrap(), queue.claim(Lane::Quick).await.unwrap().unwrap()]
                .into_iter()
                .map(|job| job.blob)
                .collect();
        assert!(quick.contains(&voice) && quick.contains(&photo), "the quick lane takes images and audio");
        assert!(queue.claim(Lane::Quick).await.unwrap().is_none(), "and never a video");
        let job = queue.claim(Lane::Video).await.unwrap().unwrap();
        assert_eq!((job.blob, job.kind), (video, MediaKind::Video));
        queue.heartbeat(&video, Some(0.25)).await.unwrap();
        assert_eq!(queue.job(&video).await.unwrap().unwrap().progress, Some(0.25));
    }

    /// Makes every back-off and lease due now.
    async fn fast_forward(queue: &JobQueue) {
        sqlx::query("UPDATE jobs SET run_after = 0, lease_until = CASE WHEN lease_until IS NULL THEN NULL ELSE 0 END")
            .execute(&queue.db)
            .await
            .unwrap();
    }

    async fn status(queue: &JobQueue, blob: &BlobId) -> (MediaStatus, bool) {
        let job = queue.job(blob).await.unwrap().unwrap();
        (job.status, job.permanent)
    }

    #[tokio::test]
    async fn retryable_failures_back_off_until_attempts_run_out() {
        let (queue, _dir) = queue(JobConfig { max_attempts: 3, ..Default::default() }).await;
        let blob = upload(&queue, b"photo").await;
        for attempt in 1..=3 {
            let job = queue.claim(Lane::Quick).await.unwrap().expect("a due job is claimable");
            assert_eq!((job.blob, job.attempts), (blob, attempt));
            assert!(queue.claim(Lane::Quick).await.unwrap().is_none(), "a leased job is nobody else's");
            queue.fail(&job, &TranscodeError::Io("the blob store is down".into())).await.unwrap();
            assert!(queue.claim(Lane::Quick).await.unwrap().is_none(), "a failed attempt backs off");
            fast_forward(&queue).await;
        }
        assert_eq!(status(&queue, &blob).await, (MediaStatus::Failed, false));
        assert!(queue.claim(Lane::Quick).await.unwrap().is_none());

        // Uploading the same bytes again gives a job that failed for a passing reason another go.
        upload(&queue, b"photo").await;
        assert_eq!(status(&queue, &blob).await, (MediaStatus::Processing, false));
        assert_eq!(queue.claim(Lane::Quick).await.unwrap().unwrap().attempts, 1);
    }

    #[tokio::test]
    async fn permanent_failures_end_at_once_and_stay_failed() {
        let (queue, _dir) = queue(JobConfig::default()).await;
        let blob = upload(&queue, b"not really a jpeg").await;
        let job = queue.claim(Lane::Quick).await.unwrap().unwrap();
        queue.fail(&job, &TranscodeError::Corrupt("bad huffman table".into())).await.unwrap();
        assert_eq!(status(&queue, &blob).await, (MediaStatus::Failed, true));
        upload(&queue, b"not really a jpeg").await;
        assert_eq!(status(&queue, &blob).await, (MediaStatus::Failed, true));
        fast_forward(&queue).await;
        assert!(queue.claim(Lane::Quick).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_dead_workers_lease_expires_and_release_frees_them_all() {
        let (queue, _dir) = queue(JobConfig::default()).await;
        let first = upload(&queue, b"one").await;
        let second = upload(&queue, b"two").await;
        let a = queue.claim(Lane::Quick).await.unwrap().unwrap();
        let b = queue.claim(Lane::Quick).await.unwrap().unwrap();
        assert_ne!(a.blob, b.blob);
        assert!([first, second].contains(&a.blob) && [first, second].contains(&b.blob));
        assert!(queue.claim(Lane::Quick).await.unwrap().is_none());

        // The worker holding `a` died: once its lease runs out the job is claimed again.
        sqlx::query("UPDATE jobs SET lease_until = 0 WHERE source_blob = ?")
            .bind(a.blob.to_hex())
            .execute(&queue.db)
            .await
            .unwrap();
        let again = queue.claim(Lane::Quick).await.unwrap().unwrap();
        assert_eq!((again.blob, again.attempts), (a.blob, 2));

        assert_eq!(queue.release_leases().await.unwrap(), 2);
        assert_eq!(queue.queued().await.unwrap(), 2);
        let result = JobResult::default();
        queue.complete(&first, &result).await.unwrap();
        assert_eq!(queue.queued().await.unwrap(), 1);
        assert_eq!(status(&queue, &first).await, (MediaStatus::Ready, false));
    }
}
