//! Per-user quotas, so that one user cannot take the upload slots, the job queue or the storage
//! from the others: uploads at once (per node), jobs waiting, bytes uploaded per UTC day and bytes
//! stored. `GET /v1/limits` shows each with what the caller has used, beside the per-kind limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::{Extension, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use types::UserId;

use crate::store::{DAY_MS, Usage};
use crate::{Ingest, IngestError};

/// `[ingest.quota]`: what one user may hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// Uploads one user may stream in at once, per node; more get 429. Default 4.
    pub uploads_at_once: usize,
    /// Uploads of one user (in the last day) whose jobs wait or run; more get 429. Default 20.
    pub queued_jobs: u64,
    /// Bytes one user may upload per UTC day, deleted and refused uploads included; more get 429 until
    /// midnight UTC. Default 2 GiB.
    pub bytes_per_day: u64,
    /// Bytes one user's media may take in the blob store: originals not yet deleted and the
    /// variants made of them (bytes several users uploaded count for each); more get 413 until
    /// they delete some or it expires. Default 10 GiB.
    pub bytes_stored: u64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            uploads_at_once: 4,
            queued_jobs: 20,
            bytes_per_day: 2 * 1024 * 1024 * 1024,
            bytes_stored: 10 * 1024 * 1024 * 1024,
        }
    }
}

/// A refusal for being over a quota.
#[derive(Debug)]
pub struct QuotaExceeded {
    pub message: String,
    /// Seconds until trying again can succeed; `None` when waiting will not help (413).
    pub retry_after: Option<u64>,
}

/// Uploads streaming in on this node, per user.
#[derive(Debug, Default)]
pub(crate) struct UploadsAtOnce {
    counts: Mutex<HashMap<UserId, usize>>,
}

impl UploadsAtOnce {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, usize>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more upload of `user`, or the refusal when they have `limit` already.
    pub(crate) fn take(&self, user: &UserId, limit: usize) -> Result<UserUpload<'_>, IngestError> {
        let mut counts = self.counts();
        let count = counts.entry(user.clone()).or_default();
        if *count >= limit {
            return Err(IngestError::Quota(QuotaExceeded {
                message: format!("you have {limit} uploads under way, the most at once; finish one first"),
                retry_after: Some(5),
            }));
        }
        *count += 1;
        Ok(UserUpload { uploads: self, user: user.clone() })
    }

    pub(crate) fn of(&self, user: &UserId) -> usize {
        self.counts().get(user).copied().unwrap_or(0)
    }
}

/// One upload's place among its user's; given back when dropped.
pub(crate) struct UserUpload<'a> {
    uploads: &'a UploadsAtOnce,
    user: UserId,
}

impl Drop for UserUpload<'_> {
    fn drop(&mut self) {
        let mut counts = self.uploads.counts();
        if let Some(count) = counts.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

/// Refuses an upload of `len` bytes (when known) that `usage` says the user has no room for.
pub(crate) fn check(config: &QuotaConfig, usage: &Usage, len: Option<u64>, now_ms: i64) -> Result<(), IngestError> {
    let refuse = |message: String, retry_after| Err(IngestError::Quota(QuotaExceeded { message, retry_after }));
    if usage.queued_jobs >= config.queued_jobs {
        let limit = config.queued_jobs;
        return refuse(format!("{limit} of your uploads are still being processed; wait for them"), Some(30));
    }
    let len = len.unwrap_or(0);
    if usage.bytes_today.saturating_add(len) > config.bytes_per_day {
        let (used, limit) = (usage.bytes_today, config.bytes_per_day);
        let message = format!("you have uploaded {used} of {limit} bytes today; more after midnight UTC");
        return refuse(message, Some(seconds_to_midnight(now_ms)));
    }
    if usage.stored_bytes.saturating_add(len) > config.bytes_stored {
        let (used, limit) = (usage.stored_bytes, config.bytes_stored);
        return refuse(format!("you store {used} of {limit} bytes; delete some media to upload more"), None);
    }
    Ok(())
}

/// Seconds until the next UTC midnight, when the daily count starts again.
fn seconds_to_midnight(now_ms: i64) -> u64 {
    let next = (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS;
    ((next - now_ms) as u64).div_ceil(1000)
}

/// `GET /v1/limits`: every limit an upload is held to, and what the caller has used of theirs.
pub(crate) async fn limits(
    State(ingest): State<Arc<Ingest>>,
    Extension(user): Extension<UserId>,
) -> Result<(StatusCode, Json<Value>), IngestError> {
    let now = ingest.clock.now_ms();
    let usage = ingest.records.usage(&user, now).await?;
    let (c, q) = (&ingest.config, &ingest.config.quota);
    let body = json!({
        "media": {
            "image": { "max_bytes": c.max_upload_bytes, "max_pixels": c.max_pixels },
            "audio": {
                "max_bytes": c.audio.max_bytes,
                "max_duration_ms": c.audio.limits.max_duration_ms,
            },
            "video": {
                "max_bytes": c.video.max_bytes,
                "max_duration_ms": c.video.limits.max_duration_ms,
                "max_pixels": c.video.limits.max_pixels,
            },
        },
        "quota": {
            "uploads_at_once": { "limit": q.uploads_at_once, "used": ingest.user_uploads.of(&user) },
            "queued_jobs": { "limit": q.queued_jobs, "used": usage.queued_jobs },
            "bytes_today": {
                "limit": q.bytes_per_day,
                "used": usage.bytes_today,
                "resets_in_secs": seconds_to_midnight(now),
            },
            "bytes_stored": { "limit": q.bytes_stored, "used": usage.stored_bytes },
        },
    });
    Ok((StatusCode::OK, Json(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_quota_refuses_with_its_own_wait() {
        let config = QuotaConfig { uploads_at_once: 1, queued_jobs: 2, bytes_per_day: 100, bytes_stored: 150 };
        let noon = 20_000 * DAY_MS + DAY_MS / 2;
        let retry = |usage: Usage, len| match check(&config, &usage, len, noon) {
            Err(IngestError::Quota(q)) => Some(q.retry_after),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        };
        assert_eq!(retry(Usage { stored_bytes: 0, bytes_today: 60, queued_jobs: 0 }, Some(40)), None);
        assert_eq!(retry(Usage { stored_bytes: 0, bytes_today: 60, queued_jobs: 0 }, Some(41)), Some(Some(43_200)));
        assert_eq!(retry(Usage { stored_bytes: 120, bytes_today: 0, queued_jobs: 0 }, Some(31)), Some(None));
        assert_eq!(retry(Usage { stored_bytes: 0, bytes_today: 0, queued_jobs: 2 }, None), Some(Some(30)));
    }
}
