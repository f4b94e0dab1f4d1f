//! Ingest settings, with the defaults `courier serve` documents.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest upload body, in bytes.
    pub max_upload_bytes: u64,
    /// Largest width × height of an image, checked from its header.
    pub max_pixels: u64,
    /// Uploads streaming in at once; more get 503.
    pub max_concurrent_uploads: usize,
    /// Jobs waiting or running before uploads get 503 with Retry-After.
    pub max_queued_jobs: u64,
    /// How long an upload waits for its transcode before answering `processing`, in milliseconds.
    pub wait_for_ready_ms: u64,
    /// How long a signed variant URL stays valid, in seconds.
    pub url_ttl_secs: u64,
    pub job: JobConfig,
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
            job: JobConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Wall-clock budget of one attempt, in seconds.
    pub timeout_secs: u64,
    /// Memory budget of one attempt (decoded pixels and working buffers), in bytes.
    pub memory_bytes: u64,
    /// Attempts before a job that keeps crashing or timing out is marked failed.
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
