//! The job queue: claims with leases, heartbeats, and what a failed attempt means.
//!
//! A job is claimed by setting a lease; a runner that dies leaves its lease to expire and the job
//! is claimed again, up to `max_attempts`. Failures a retry cannot fix (corrupt or unsupported
//! input, a job killed for memory or time) end the job at once; a worker that crashed or broke its
//! contract gets one more try; others back off exponentially. The rows are the [`Store`]'s.

use types::{BlobId, MediaKind};

use crate::store::{Claimed, Completed, Failure, JobState, Store};
use crate::view::JobResult;
use crate::{Clock, JobConfig};
use transcode::TranscodeError;

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

/// The `jobs` table, worked as a queue.
#[derive(Debug, Clone)]
pub struct JobQueue {
    store: Store,
    config: JobConfig,
    clock: Clock,
}

impl JobQueue {
    pub fn new(store: Store, config: JobConfig, clock: Clock) -> Self {
        Self { store, config, clock }
    }

    /// Whether other processes may run this queue's jobs (a shared database), so a job's end is
    /// learnt by reading its row rather than from this process's runner.
    pub(crate) fn shared(&self) -> bool {
        !self.store.is_embedded()
    }

    /// Jobs waiting or running.
    pub async fn queued(&self) -> Result<u64, sqlx::Error> {
        self.store.queued().await
    }

    /// Frees every lease, and every claim a sweep had on a blob's deletion. Only for a process
    /// that alone works this queue and sweeps (the embedded database), at start-up: whatever it
    /// held before a crash is nobody's now, so it need not wait for the leases and claims to
    /// expire. On a shared database another node's leases and claims are its own.
    pub async fn release_leases(&self) -> Result<u64, sqlx::Error> {
        if !self.store.is_embedded() {
            return Ok(0);
        }
        self.store.release_leases().await
    }

    pub(crate) async fn job(&self, blob: &BlobId) -> Result<Option<JobState>, sqlx::Error> {
        self.store.job(blob).await
    }

    fn lease_until(&self, now: i64) -> i64 {
        now + (self.config.lease_secs * 1000) as i64
    }

    /// Claims the next due job of `lane` whose lease is free, or `None`.
    pub(crate) async fn claim(&self, lane: Lane) -> Result<Option<Claimed>, sqlx::Error> {
        let now = self.clock.now_ms();
        self.store.claim(lane.kinds(), now, self.lease_until(now)).await
    }

    /// Keeps a running job's lease, and records how far it has got. False when the job is no
    /// longer this claim's: its media was deleted, or its lease ran out and another runner took it.
    pub(crate) async fn heartbeat(&self, job: &Claimed, progress: Option<f32>) -> Result<bool, sqlx::Error> {
        let now = self.clock.now_ms();
        self.store.heartbeat(job, progress, now, self.lease_until(now)).await
    }

    /// Records the job's result; false when the job is no longer this claim's.
    pub(crate) async fn complete(
        &self,
        job: &Claimed,
        result: &JobResult,
        settled: &[i64],
    ) -> Result<Completed, sqlx::Error> {
        self.store.complete(job, result, settled, self.clock.now_ms()).await
    }

    /// Records a failed attempt: final when permanent, a second crash, or out of attempts; else
    /// retried after a back-off. Bytes that crashed a worker twice are refused for good, like
    /// corrupt ones. Clients see the error's fixed message; the detail was logged.
    /// False when the job is no longer this claim's.
    pub(crate) async fn fail(&self, job: &Claimed, error: &TranscodeError) -> Result<bool, sqlx::Error> {
        let now = self.clock.now_ms();
        let crashed_again = error.is_crash() && job.attempts >= 2;
        let permanent = error.is_permanent() || crashed_again;
        let failure = Failure {
            last: permanent || job.attempts >= self.config.max_attempts,
            permanent,
            code: error.code(),
            message: error.public_message(),
            run_after: now + (1000i64 << job.attempts.min(8)),
        };
        self.store.fail(job, &failure, now).await
    }
}
