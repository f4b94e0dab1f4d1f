//! Courier's uploads: from request body to stored blob, media record and transcode job.
//!
//! `POST /v1/media` streams the body under its kind's byte limit, sniffs its first bytes against the
//! declared type, hashes it with BLAKE3 while spooling it to a temp file, has a sandboxed worker
//! check an image's dimensions or audio's duration, rate and channels from the headers, stores it
//! once in the originals namespace and records the media and its job in one transaction. The
//! [`Runner`] claims jobs from the database in two lanes (images and audio in the warm `quick`
//! worker pool, videos in the `video` pool, a fresh process each) and writes the variants the
//! parent checked and hashed through `edge-cache`. No byte of an upload is parsed in this process
//! beyond the sniff. `GET /v1/media/{id}` shows the result with signed variant URLs
//! (and a video's progress); `DELETE /v1/media/{id}` takes it back and stops its job.
//!
//! Routes expect the caller's [`types::UserId`] in the request extensions (the server's auth layer
//! puts it there). This crate owns the `media`, `jobs` and `media_grants` tables, on SQLite or
//! PostgreSQL ([`Store`]), and `upload_days` (the daily quota), and must never touch another crate's
//! tables. Per-user quotas (uploads at once, jobs waiting, bytes a day and in all) and `GET
//! /v1/limits` are in `quota`.

mod clock;
mod config;
mod error;
mod queue;
mod quota;
mod records;
mod resumable;
mod routes;
mod runner;
mod spool;
mod store;
mod view;

#[cfg(test)]
mod conformance;

use std::path::PathBuf;
use std::sync::Arc;

pub use clock::Clock;
pub use config::{AudioConfig, IngestConfig, JobConfig, VideoConfig};
pub use error::IngestError;
pub use queue::JobQueue;
pub use quota::{QuotaConfig, QuotaExceeded};
pub use runner::Runner;
pub use spool::discard_body;
pub use store::{DeletedBlob, Namespace, Store, StoredTotals, Usage};

/// How often the blob store's totals are counted (a pass over the job tables) for `/metrics`.
pub const STORED_TOTALS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Rows one step of a sweep takes at once.
const SWEEP_BATCH: i64 = 100;
/// How long a sweep waits for the blob store to delete one blob; well inside a deletion's claim
/// ([`store::DELETION_CLAIM_MS`]), so a delete that is still under way when it gives up (a store
/// may finish one it was asked for) most likely lands before the claim lapses.
const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How old a row of the deleted-blobs feed is before it is served.
pub const FEED_LAG_MS: i64 = 5_000;

impl SweepReport {
    fn add(&mut self, other: &SweepReport) {
        self.originals_retired += other.originals_retired;
        self.media_expired += other.media_expired;
        self.originals_deleted += other.originals_deleted;
        self.variants_deleted += other.variants_deleted;
    }
}

/// What one sweep did (or, summed, every sweep of a node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub originals_retired: u64,
    /// Media records that expired with their jobs (those whose bytes another record still
    /// refers to are not counted).
    pub media_expired: u64,
    pub originals_deleted: u64,
    pub variants_deleted: u64,
}
pub use view::{MediaView, VariantView};

use edge_cache::BlobStore;
use tokio::sync::{Notify, Semaphore, broadcast};
use transcode::WorkerPool;
use types::{BlobId, MediaId, UrlSigner, UserId};

/// Everything the ingest routes and the job runner share.
pub struct Ingest {
    config: IngestConfig,
    queue: JobQueue,
    records: records::MediaRecords,
    originals: BlobStore,
    variants: BlobStore,
    /// Resumable uploads' parts, beside the originals.
    parts: BlobStore,
    signer: UrlSigner,
    workers: Workers,
    tmp_dir: PathBuf,
    uploads: Semaphore,
    /// Uploads streaming in per user, for their `uploads_at_once` quota.
    user_uploads: quota::UploadsAtOnce,
    /// What quotas go by (the queue and records keep their own copy).
    clock: Clock,
    /// Wake the runner's lanes when a job is queued.
    quick_queued: Notify,
    video_queued: Notify,
    running: runner::Running,
    /// Tells waiting uploads that a job has finished, one way or the other.
    job_done: broadcast::Sender<BlobId>,
    /// The tables, for the sweep (the queue and the records hold their own handles).
    store: Store,
    /// What this node's sweeps did since it started.
    swept: std::sync::Mutex<SweepReport>,
    /// What the blob store holds, as last counted, and when.
    totals: tokio::sync::Mutex<Option<(std::time::Instant, StoredTotals)>>,
}

impl Ingest {
    /// `tmp_dir` holds uploads while they stream in and large outputs on their way to storage; it
    /// is emptied of leftovers here. `workers` run every probe and transcode; `clock` is what the
    /// queue and the records go by.
    #[allow(clippy::too_many_arguments, reason = "each is a separate part the server owns")]
    pub fn new(
        config: IngestConfig,
        store: Store,
        clock: Clock,
        originals: BlobStore,
        variants: BlobStore,
        signer: UrlSigner,
        workers: Workers,
        tmp_dir: PathBuf,
    ) -> std::io::Result<Arc<Self>> {
        spool::clear_leftovers(&tmp_dir)?;
        let (job_done, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            uploads: Semaphore::new(config.max_concurrent_uploads),
            user_uploads: quota::UploadsAtOnce::default(),
            queue: JobQueue::new(store.clone(), config.job.clone(), clock.clone()),
            records: records::MediaRecords::new(store.clone(), clock.clone()),
            store,
            swept: std::sync::Mutex::new(SweepReport::default()),
            totals: tokio::sync::Mutex::new(None),
            clock,
            config,
            parts: originals.beside(edge_cache::Namespace::Parts),
            originals,
            variants,
            signer,
            workers,
            tmp_dir,
            quick_queued: Notify::new(),
            video_queued: Notify::new(),
            running: runner::Running::default(),
            job_done,
        }))
    }

    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    pub fn queue(&self) -> &JobQueue {
        &self.queue
    }

    /// Jobs this process is running now.
    pub fn running_jobs(&self) -> usize {
        self.running.len()
    }

    fn queued(&self, lane: queue::Lane) -> &Notify {
        match lane {
            queue::Lane::Quick => &self.quick_queued,
            queue::Lane::Video => &self.video_queued,
        }
    }

    /// Waits, at most `timeout`, for the job of media `id` to finish (on any node: on a shared
    /// database its row is read every second), then describes the media as [`Ingest::describe`]
    /// does; `None` when the media is gone.
    pub async fn settled(&self, id: MediaId, timeout: std::time::Duration) -> Result<Option<MediaView>, IngestError> {
        let Some(row) = self.records.media(id).await? else { return Ok(None) };
        let mut done = self.job_done.subscribe();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let every = std::time::Duration::from_secs(1);
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.queue.shared();
        let mut job = self.queue.job(&row.blob).await?;
        while job.as_ref().is_some_and(|j| j.status == types::MediaStatus::Processing) {
            tokio::select! {
                event = done.recv() => match event {
                    Ok(finished) if finished != row.blob => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => job = self.queue.job(&row.blob).await?,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = poll.tick(), if shared => job = self.queue.job(&row.blob).await?,
                _ = &mut deadline => break,
            }
        }
        self.describe(id).await
    }

    /// One sweep of the blob store: retires the originals of jobs that succeeded longer ago than
    /// `keep_originals_days`, expires media records nothing references (`media_retention_days`,
    /// `unsent_media_days`) and resumable uploads past their expiry, in batches, then deletes what
    /// the log says is to go. Safe on every node at once (PostgreSQL claims rows with `SKIP
    /// LOCKED`, and each deletion is claimed) and after a crash anywhere in it (the log is written
    /// in the deciding transaction).
    pub async fn sweep(&self) -> Result<SweepReport, IngestError> {
        let now = self.clock.now_ms();
        let day = self.config.test_day_ms.max(1) as i64;
        let days = |n: u64| (n as i64).saturating_mul(day);
        let mut report = SweepReport::default();
        loop {
            let before = now.saturating_sub(days(self.config.keep_originals_days));
            let retired = self.store.retire_originals(before, now, SWEEP_BATCH).await?;
            report.originals_retired += retired;
            if retired < SWEEP_BATCH as u64 {
                break;
            }
        }
        let (unsent, retention) = (days(self.config.unsent_media_days), days(self.config.media_retention_days));
        loop {
            let orphaned = self.store.expire_media(now, unsent, retention, SWEEP_BATCH).await?;
            for source in &orphaned {
                // A job still running for bytes nobody refers to any more stops.
                self.running.cancel(source);
            }
            report.media_expired += orphaned.len() as u64;
            if orphaned.is_empty() {
                break;
            }
        }
        loop {
            let expired = self.store.expire_uploads(now, SWEEP_BATCH).await?;
            if expired < SWEEP_BATCH as u64 {
                break;
            }
        }
        let purged = self.purge_deleted().await?;
        report.originals_deleted = purged.0;
        report.variants_deleted = purged.1;
        self.swept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(&report);
        Ok(report)
    }

    /// What the blob store holds, as the tables say, counted at most every
    /// [`STORED_TOTALS_EVERY`] (scrapes in between get the last count). `None` if it could not be
    /// counted yet.
    pub async fn stored_totals(&self) -> Option<StoredTotals> {
        let mut last = self.totals.lock().await;
        if let Some((at, totals)) = *last
            && at.elapsed() < STORED_TOTALS_EVERY
        {
            return Some(totals);
        }
        // A scrape must not hang on a database that is down: the last count is served instead.
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.store.stored_totals()).await {
            Ok(Ok(totals)) => {
                *last = Some((std::time::Instant::now(), totals));
                Some(totals)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "counting what the blob store holds failed");
                last.map(|(_, totals)| totals)
            }
            Err(_) => {
                tracing::warn!("counting what the blob store holds took too long");
                last.map(|(_, totals)| totals)
            }
        }
    }

    /// What this node's sweeps did since it started (for `/metrics`).
    pub fn swept(&self) -> SweepReport {
        *self.swept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes from the blob store what the log says is to go, in batches; returns how many
    /// originals and variants went. Each deletion is claimed first, in one transaction with the
    /// check that nothing needs its bytes again (the same bytes uploaded or made since), so a
    /// writer that needs them later sees the claim and stores them again after the delete.
    pub(crate) async fn purge_deleted(&self) -> Result<(u64, u64), IngestError> {
        let (mut originals, mut variants, mut after) = (0, 0, 0);
        loop {
            let pending = self.store.pending_deletions(SWEEP_BATCH, after, self.clock.now_ms()).await?;
            for deleted in &pending {
                after = deleted.seq;
                if self.purge(deleted).await? {
                    match deleted.namespace {
                        store::Namespace::Originals => originals += 1,
                        store::Namespace::Variants => variants += 1,
                        store::Namespace::Parts => {}
                    }
                }
            }
            if pending.len() < SWEEP_BATCH as usize {
                return Ok((originals, variants));
            }
        }
    }

    /// Claims one logged deletion and deletes its bytes: true when they went (false when they are
    /// needed again, another sweep holds the deletion, or the blob store failed: the claim lapses
    /// and a later sweep decides again).
    pub(crate) async fn purge(&self, deleted: &DeletedBlob) -> Result<bool, IngestError> {
        if !self.store.claim_deletion(deleted.seq, self.clock.now_ms()).await? {
            return Ok(false);
        }
        if self.config.test_delete_delay_ms > 0 {
            // Bounded, so the claim still outlasts the delete.
            let delay = self.config.test_delete_delay_ms.min(10_000);
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let store = match deleted.namespace {
            store::Namespace::Originals => &self.originals,
            store::Namespace::Variants => &self.variants,
            store::Namespace::Parts => &self.parts,
        };
        match tokio::time::timeout(DELETE_TIMEOUT, store.delete(&deleted.blob)).await {
            Ok(Ok(())) => {
                self.store.deletions_done(&[deleted.seq]).await?;
                Ok(true)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, blob = %deleted.blob, "deleting a blob failed; trying again later");
                self.store.release_deletion(deleted.seq).await?;
                Ok(false)
            }
            // The delete may still land: the claim stands until it lapses.
            Err(_) => {
                tracing::warn!(blob = %deleted.blob, "deleting a blob timed out; trying again later");
                Ok(false)
            }
        }
    }

    /// Waits until the deletions a writer overlapped are over (done, kept, or their claims lapsed:
    /// at most [`store::DELETION_CLAIM_MS`]), so that bytes it stores after cannot be deleted by
    /// them.
    pub(crate) async fn wait_for_deletions(&self, overlaps: &[store::Overlap]) -> Result<(), IngestError> {
        for overlap in overlaps {
            while !self.store.deletion_settled(overlap.seq, self.clock.now_ms()).await? {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Sweeps every `sweep_interval_ms` until `shutdown` turns true.
    pub async fn sweeper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = std::time::Duration::from_millis(self.config.sweep_interval_ms.max(10));
        loop {
            // Uploads holding all their bytes whose media a failure kept from being made.
            match resumable::finish_stuck(&self).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "made the media of uploads that held all their bytes"),
                Err(e) => tracing::warn!(error = %e, "finishing stuck uploads failed; trying again later"),
            }
            match self.sweep().await {
                Ok(report) if report != SweepReport::default() => tracing::info!(?report, "swept the blob store"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweeping the blob store failed; trying again later"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Up to `limit` blobs deleted after `after` (a `seq` of an earlier answer), oldest first,
    /// logged at least [`FEED_LAG_MS`] ago (so no transaction still holds an earlier `seq`).
    pub async fn deleted_blobs(&self, after: i64, limit: i64) -> Result<Vec<store::DeletedBlob>, IngestError> {
        let upto = self.clock.now_ms().saturating_sub(FEED_LAG_MS);
        Ok(self.store.deleted_since(after, limit, upto).await?)
    }

    /// Whether `user` may pass media `id` on: they own it or it was shared with them.
    pub async fn may_share(&self, id: MediaId, user: &UserId) -> Result<bool, IngestError> {
        Ok(self.records.may_read(id, user).await?)
    }

    /// Lets `users` (a conversation's members) read media `id` and its variants, on behalf of
    /// `source` (the message that shared it, as its sender names it).
    pub async fn share(&self, id: MediaId, users: &[UserId], source: &str) -> Result<(), IngestError> {
        Ok(self.records.grant(id, users, source).await?)
    }

    /// Takes back what `source` shared of media `id` (its message was deleted); what other
    /// messages shared stays.
    pub async fn unshare(&self, id: MediaId, source: &str) -> Result<(), IngestError> {
        self.records.revoke(id, source).await?;
        Ok(())
    }

    /// The `/v1/media` routes.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        routes::router(self.clone()).merge(resumable::router(self.clone()))
    }
}

/// The worker pools every probe and transcode runs in.
#[derive(Debug, Clone)]
pub struct Workers {
    /// Photos and voice notes: warm processes reused for many jobs.
    pub quick: WorkerPool,
    /// Videos: a fresh process for each.
    pub video: WorkerPool,
    /// Upload-time header checks, so they never wait behind a transcode.
    pub probe: WorkerPool,
    /// How long an upload's probe may take, waiting for a worker included.
    pub probe_timeout: std::time::Duration,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("config", &self.config).finish_non_exhaustive()
    }
}
