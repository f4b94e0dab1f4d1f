//! L1: blobs in memory, weighed in bytes, filled only with bytes that match their hash.

use std::sync::Arc;

use bytes::Bytes;
use types::BlobId;

use crate::{BlobStore, EdgeError};

/// A byte-bounded cache of whole blobs over a [`BlobStore`]. Blobs larger than `max_object` are
/// never admitted, so one large file cannot flush thousands of thumbnails.
#[derive(Clone)]
pub struct MemoryTier {
    cache: moka::future::Cache<BlobId, Bytes>,
    max_object: u64,
}

impl MemoryTier {
    pub fn new(capacity_bytes: u64, max_object: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &BlobId, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        Self { cache, max_object }
    }

    /// The blob if it is in memory; never reads the store.
    pub async fn get(&self, id: &BlobId) -> Option<Bytes> {
        self.cache.get(id).await
    }

    /// Keeps `bytes`, which the caller has just verified against `id`.
    pub async fn insert(&self, id: &BlobId, bytes: Bytes) {
        if self.admits(bytes.len() as u64) {
            self.cache.insert(*id, bytes).await;
        }
    }

    pub async fn remove(&self, id: &BlobId) {
        self.cache.invalidate(id).await;
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub fn admits(&self, size: u64) -> bool {
        size <= self.max_object
    }

    /// Whether anything but empty blobs can ever be in memory (an edge may run with the tier off).
    pub fn holds_anything(&self) -> bool {
        self.max_object > 0 && self.cache.policy().max_capacity() != Some(0)
    }

    /// The blob from memory, or read from `store`, verified and kept. Concurrent misses for one blob
    /// share a single read (moka coalesces initialisations of the same key).
    pub async fn get_or_fill(&self, id: &BlobId, store: &BlobStore) -> Result<Bytes, EdgeError> {
        let id = *id;
        self.cache
            .try_get_with(id, async move {
                let bytes = store.get(&id).await?.ok_or(EdgeError::NotFound)?;
                let checked = bytes.clone();
                // Hashing a large body is CPU work; keep it off the runtime's threads.
                let matches = tokio::task::spawn_blocking(move || id.matches(&checked))
                    .await
                    .map_err(|e| EdgeError::Io(std::io::Error::other(e)))?;
                if !matches {
                    tracing::error!(blob = %id, "stored blob does not match its hash");
                    return Err(EdgeError::VerifyFailed(id));
                }
                Ok(bytes)
            })
            .await
            .map_err(|e: Arc<EdgeError>| Arc::try_unwrap(e).unwrap_or_else(|shared| shared_error(&shared)))
    }
}

/// Rebuilds an error that several coalesced waiters share.
fn shared_error(e: &EdgeError) -> EdgeError {
    match e {
        EdgeError::NotFound => EdgeError::NotFound,
        EdgeError::VerifyFailed(id) => EdgeError::VerifyFailed(*id),
        other => EdgeError::Io(std::io::Error::other(other.to_string())),
    }
}

impl std::fmt::Debug for MemoryTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryTier({} bytes held, max object {})", self.cache.weighted_size(), self.max_object)
    }
}
