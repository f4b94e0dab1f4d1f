//! Ingest settings, with the defaults `courier serve` documents.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest image upload, in bytes.
    pub max_upload_bytes: u64,
    /// Largest width × height of an image, checked from its header.
    pub max_pixels: u64,
    /// Uploads streaming in at once, all users together; more get 503 (each user has a share of
    /// its own in `quota.uploads_at_once`).
    pub max_concurrent_uploads: usize,
    /// Jobs waiting or running before uploads get 503 with Retry-After.
    pub max_queued_jobs: u64,
    /// How long an upload waits for its transcode before answering `processing`, in milliseconds.
    pub wait_for_ready_ms: u64,
    /// How long a signed variant URL stays valid, in seconds.
    pub url_ttl_secs: u64,
    /// Where clients fetch variants from (an edge's or a CDN's origin, `https://media.example.com`):
    /// variant URLs in JSON are absolute under it. Unset, they are relative to this server.
    pub public_base_url: Option<String>,
    /// How long an original is kept after its job has succeeded, in days (0: deleted at the next
    /// sweep). The variants stay, and the same bytes uploaded again still share them.
    pub keep_originals_days: u64,
    /// How long a media record no message (nor avatar) references any more is kept, in days from
    /// its upload; then it goes with its grants, and its blobs when nothing else names them.
    pub media_retention_days: u64,
    /// How long a media record that was never sent is kept, in days from its upload.
    pub unsent_media_days: u64,
    /// How often each node sweeps: retires originals, expires media and deletes the blobs logged
    /// for deletion.
    pub sweep_interval_ms: u64,
    /// The length of the "day" the three settings above count in, in milliseconds: a test hook
    /// (tests shorten it to see a month pass); leave it at 86400000.
    pub test_day_ms: u64,
    /// How long a sweep waits between claiming a blob's deletion and deleting it, in milliseconds:
    /// a test hook (tests widen the window a racing upload must survive); leave it at 0.
    pub test_delete_delay_ms: u64,
    /// How long a resumable upload waits for its next request before it expires with its bytes,
    /// in seconds (each request starts the wait again; a finished one's status is kept as long).
    pub resumable_expiry_secs: u64,
    /// Resumable uploads one user may have open at once; more get 429.
    pub resumable_open_per_user: u64,
    /// Bytes one user's open resumable uploads may add up to (their declared lengths); more get
    /// 413.
    pub resumable_open_bytes_per_user: u64,
    pub job: JobConfig,
    pub audio: AudioConfig,
    pub video: VideoConfig,
    /// What one user may hold: uploads at once, jobs waiting, bytes a day and in all.
    pub quota: crate::QuotaConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 64 * 1024 * 1024,
            max_pixels: 64_000_000,
            max_concurrent_uploads: 64,
            max_queued_jobs: 1000,
            wait_for_ready_ms: 5000,
            url_ttl_secs: 7 * 24 * 3600,
            public_base_url: None,
            keep_originals_days: 0,
            media_retention_days: 30,
            unsent_media_days: 1,
            sweep_interval_ms: 10_000,
            test_day_ms: 86_400_000,
            test_delete_delay_ms: 0,
            resumable_expiry_secs: 24 * 3600,
            resumable_open_per_user: 8,
            resumable_open_bytes_per_user: 4 * 1024 * 1024 * 1024,
            job: JobConfig::default(),
            audio: AudioConfig::default(),
            video: VideoConfig::default(),
            quota: crate::QuotaConfig::default(),
        }
    }
}

impl IngestConfig {
    /// The byte limit of an upload of `kind`.
    pub fn max_bytes(&self, kind: types::MediaKind) -> u64 {
        match kind {
            types::MediaKind::Image => self.max_upload_bytes,
            types::MediaKind::Audio => self.audio.max_bytes,
            types::MediaKind::Video => self.video.max_bytes,
        }
    }
}

/// Voice notes and audio files. They share the image workers (`[transcode] workers`): short jobs
/// that must never wait behind a video.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    pub max_bytes: u64,
    pub limits: transcode::audio::Limits,
    pub output: transcode::audio::Settings,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            max_bytes: 200 * 1024 * 1024,
            limits: transcode::audio::Limits::default(),
            output: transcode::audio::Settings::default(),
        }
    }
}

/// Videos: each job runs in a worker process of its own, on a queue of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoConfig {
    pub max_bytes: u64,
    /// Video jobs at once. Each runs libx264 on every core it finds, so one suits a small machine.
    pub workers: usize,
    /// Wall-clock budget of one attempt, in seconds.
    pub timeout_secs: u64,
    /// Address space a video worker may add to its own footprint at start (`RLIMIT_AS`), in bytes.
    pub memory_bytes: u64,
    pub limits: transcode::video::Limits,
    pub output: transcode::video::Settings,
}

impl Default for VideoConfig {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024 * 1024,
            workers: 1,
            timeout_secs: 30 * 60,
            memory_bytes: 3 * 1024 * 1024 * 1024,
            limits: transcode::video::Limits::default(),
            output: transcode::video::Settings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Wall-clock budget of one attempt, in seconds.
    pub timeout_secs: u64,
    /// Memory budget of one attempt: address space a photo or voice-note worker may add to its own
    /// footprint (`RLIMIT_AS`), every decoded copy included, in bytes.
    pub memory_bytes: u64,
    /// Attempts before a job that keeps failing for a passing reason (storage) is marked failed.
    /// A crashed worker gets one retry; a job killed for memory or time, none.
    pub max_attempts: u32,
    /// How long a claimed job stays claimed if its worker dies, in seconds.
    pub lease_secs: u64,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self { timeout_secs: 60, memory_bytes: 512 * 1024 * 1024, max_attempts: 3, lease_secs: 90 }
    }
}

impl JobConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}
