//! The runner: claims jobs lane by lane and works each through the worker pools, renewing its
//! lease while it runs and recording the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_cache::EdgeError;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use transcode::protocol::Task;
use transcode::{Body, MediaType, Product, TranscodeError, Variant, WorkerPool, audio, photo};
use types::BlobId;

use crate::queue::Lane;
use crate::store::Claimed;
use crate::view::JobResult;
use crate::{Ingest, IngestError};

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

/// A job's result and the outputs it was made of (kept until the result is recorded, in case a
/// variant must be stored again).
struct Made {
    result: JobResult,
    product: Product,
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
        // Ends only when the job is no longer this claim's: its media was deleted (on any node),
        // or its lease ran out and another runner claimed it again.
        let heartbeat = async {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let progress = *progress_rx.borrow_and_update();
                match self.queue.heartbeat(&job, progress).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(blob = %job.blob, error = %e, "renewing a job's lease failed"),
                }
            }
        };
        let outcome = tokio::select! {
            outcome = &mut work => Some(outcome),
            () = heartbeat => None,
            () = cancel.notified() => None,
        };
        self.running.finish(&job.blob);
        let Some(outcome) = outcome else {
            // Dropping the work stopped it (a video worker process is killed).
            tracing::info!(blob = %job.blob, "job stopped: its media was deleted, or another runner holds it now");
            let _ = self.job_done.send(job.blob);
            return;
        };
        let recorded = match &outcome {
            Ok(made) => self.complete(&job, made).await,
            Err(e) => self.queue.fail(&job, e).await.map_err(IngestError::from),
        };
        match (&outcome, recorded) {
            (_, Err(e)) => tracing::error!(blob = %job.blob, error = %e, "recording a job's outcome failed"),
            (_, Ok(false)) => {
                tracing::info!(blob = %job.blob, "job outcome dropped: its media was deleted, or another runner holds it")
            }
            (Ok(_), Ok(true)) => {
                tracing::info!(blob = %job.blob, kind = %job.kind, ms = started.elapsed().as_millis() as u64, "job done")
            }
            (Err(e), Ok(true)) => {
                tracing::warn!(blob = %job.blob, kind = %job.kind, attempt = job.attempts, error = %e, "job failed")
            }
        }
        let _ = self.job_done.send(job.blob);
    }

    /// Records a job's result. Variants a sweep was deleting as the job stored them are stored
    /// again once that deletion is over, before the result is recorded. False when the job is no
    /// longer this claim's.
    async fn complete(&self, job: &Claimed, made: &Made) -> Result<bool, IngestError> {
        let mut settled = Vec::new();
        loop {
            let completed = self.queue.complete(job, &made.result, &settled).await?;
            if completed.overlaps.is_empty() {
                return Ok(completed.recorded);
            }
            self.wait_for_deletions(&completed.overlaps).await?;
            for variant in JobResult::variants_of(&made.product) {
                if completed.overlaps.iter().any(|o| o.blob == variant.blob) {
                    self.store_variant(variant).await?;
                }
            }
            settled.extend(completed.overlaps.iter().map(|o| o.seq));
        }
    }

    async fn store_variant(&self, variant: &Variant) -> Result<(), EdgeError> {
        match &variant.body {
            Body::Memory(bytes) => self.variants.put(&variant.blob, bytes.clone()).await,
            Body::File(file) => self.variants.put_file(&variant.blob, file.path()).await,
        }
        .map(drop)
    }

    async fn transcode(&self, job: &Claimed, progress: watch::Sender<Option<f32>>) -> Result<Made, TranscodeError> {
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
    ) -> Result<Made, TranscodeError> {
        let mut lease = pool.checkout(budget).await?;
        if !self.originals.download(&job.blob, &lease.input()).await.map_err(storage)? {
            // Never the bytes' fault, so never refused for good: on a shared database the node that
            // took the upload may not share this node's blob store (a misconfiguration), and a
            // sweep may have deleted the original of a job just before the same bytes were
            // uploaded again. The retries fail the job for now; the next upload of the bytes
            // stores the original and queues the job again.
            return Err(TranscodeError::Io("the uploaded bytes are missing from storage".into()));
        }
        let product = lease.run(task, budget, progress).await?;
        drop(lease);
        for variant in JobResult::variants_of(&product) {
            self.store_variant(variant).await.map_err(storage)?;
        }
        Ok(Made { result: JobResult::from_product(&product), product })
    }

    async fn transcode_photo(&self, job: &Claimed, format: photo::Format) -> Result<Made, TranscodeError> {
        let limits = photo::Limits { max_pixels: self.config.max_pixels, memory_bytes: self.config.job.memory_bytes };
        let task = Task::Photo { format, settings: photo::Settings::default(), limits };
        self.in_worker(&self.workers.quick, job, task, self.config.job.timeout(), |_| {}).await
    }

    async fn transcode_audio(&self, job: &Claimed, container: audio::Container) -> Result<Made, TranscodeError> {
        let audio = &self.config.audio;
        let task = Task::Audio { container, settings: audio.output.clone(), limits: audio.limits.clone() };
        self.in_worker(&self.workers.quick, job, task, self.config.job.timeout(), |_| {}).await
    }

    async fn transcode_video(
        &self,
        job: &Claimed,
        progress: watch::Sender<Option<f32>>,
    ) -> Result<Made, TranscodeError> {
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

    pub(crate) fn len(&self) -> usize {
        self.0.lock().expect("never poisoned").len()
    }

    /// Stops the job of `blob` if it runs here; a no-op otherwise.
    pub(crate) fn cancel(&self, blob: &BlobId) {
        if let Some(cancel) = self.0.lock().expect("never poisoned").get(blob) {
            cancel.notify_one();
        }
    }
}
