//! Media records: an upload's row with its job, who may read it, taking it back, and what each
//! user's records add up to for their quotas.

use types::{BlobId, MediaId, UserId};

use crate::Clock;
use crate::store::{Deleted, MediaRow, NewMedia, Overlap, Store, Usage};

/// The `media` and `media_grants` tables.
#[derive(Debug, Clone)]
pub(crate) struct MediaRecords {
    store: Store,
    clock: Clock,
}

impl MediaRecords {
    pub(crate) fn new(store: Store, clock: Clock) -> Self {
        Self { store, clock }
    }

    /// The media record and a job for its bytes, in one transaction. A job for the same bytes is
    /// reused; one that failed for a reason a retry might fix is queued again. Nothing is recorded
    /// while a sweep's deletion of the original claimed since `stored_at` (other than `settled`)
    /// may remove it: those deletions are returned instead (see [`Store::record_upload`]).
    pub(crate) async fn record_upload(
        &self,
        media: &NewMedia<'_>,
        stored_at: i64,
        settled: &[i64],
    ) -> Result<Vec<Overlap>, sqlx::Error> {
        self.store.record_upload(media, stored_at, settled, self.clock.now_ms()).await
    }

    /// What `owner` has used of their quotas at `now_ms`.
    pub(crate) async fn usage(&self, owner: &UserId, now_ms: i64) -> Result<Usage, sqlx::Error> {
        self.store.usage(owner, now_ms).await
    }

    /// Undoes an upload whose bytes turned out to be unusable. When nothing refers to the bytes
    /// any more the job is gone too and its original is logged for deletion: returns that
    /// deletion's `seq`.
    pub(crate) async fn forget_upload(&self, id: MediaId, blob: &BlobId) -> Result<Option<i64>, sqlx::Error> {
        self.store.forget_upload(id, blob, self.clock.now_ms()).await
    }

    /// Whether `user` owns media `id` or was given access to it.
    pub(crate) async fn may_read(&self, id: MediaId, user: &UserId) -> Result<bool, sqlx::Error> {
        self.store.may_read(id, user).await
    }

    /// Lets `users` read media `id` on behalf of `source` (what shared it; idempotent).
    pub(crate) async fn grant(&self, id: MediaId, users: &[UserId], source: &str) -> Result<(), sqlx::Error> {
        self.store.grant(id, users, source, self.clock.now_ms()).await
    }

    /// Takes back what `source` granted of media `id`; grants from other sources stay. Returns how
    /// many went.
    pub(crate) async fn revoke(&self, id: MediaId, source: &str) -> Result<u64, sqlx::Error> {
        self.store.revoke(id, source, self.clock.now_ms()).await
    }

    pub(crate) async fn media(&self, id: MediaId) -> Result<Option<MediaRow>, sqlx::Error> {
        self.store.media(id).await
    }

    /// Deletes `owner`'s media `id` and who it was shared with. When no other media refers to its
    /// bytes, the job goes too, and the blobs nothing refers to any more are logged for deletion.
    pub(crate) async fn delete(&self, id: MediaId, owner: &UserId) -> Result<Deleted, sqlx::Error> {
        self.store.delete(id, owner, self.clock.now_ms()).await
    }
}
