//! The bottom tier: content-addressed blobs in an object store.
//!
//! Blobs live under `{namespace}/{first two hex digits}/{64 hex digits}`. Originals and variants are
//! kept in separate namespaces, and only the variants one is ever served, so an uploaded original
//! (which may carry GPS data) cannot be fetched through `/b/` even by someone who knows its hash.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use types::BlobId;

use crate::EdgeError;

/// Which set of blobs a [`BlobStore`] reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// Uploads as received. Never served.
    Originals,
    /// Our own encodes, served by signed URL.
    Variants,
    /// What resumable uploads' requests stored, until each upload completes. Never served.
    Parts,
}

impl Namespace {
    fn prefix(self) -> &'static str {
        match self {
            Namespace::Originals => "originals",
            Namespace::Variants => "variants",
            Namespace::Parts => "parts",
        }
    }
}

/// Removes what piece-by-piece writes into `dir` left behind when their process died: a local
/// store stages such a write in a file named `KEY#N` beside its blob, which nothing lists or
/// deletes. Only staging files untouched for an hour go (a live write keeps its file fresh, and
/// another process may share the folder).
fn clear_stale_staging(dir: &FsPath) {
    fn walk(dir: &FsPath, older_than: std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(&path, older_than);
            } else if entry.file_name().to_string_lossy().contains('#')
                && meta.modified().is_ok_and(|at| at < older_than)
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    walk(dir, hour_ago);
}

/// A blob being written in pieces ([`BlobStore::writer`]). Dropped unfinished, nothing is stored
/// under its name (a multipart upload left behind is the object store's to expire).
pub struct BlobWriter {
    writer: WriteMultipart,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter").finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// Adds `bytes`, waiting while two chunks are on their way to the store.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), EdgeError> {
        self.writer.wait_for_capacity(2).await?;
        self.writer.write(bytes);
        Ok(())
    }

    /// Stores what was written under the blob's name.
    pub async fn finish(self) -> Result<(), EdgeError> {
        self.writer.finish().await?;
        Ok(())
    }

    /// Gives up: nothing is stored.
    pub async fn abort(self) -> Result<(), EdgeError> {
        self.writer.abort().await?;
        Ok(())
    }
}

/// Whether a put created the blob or found it already there (dedup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Existing,
}

/// An object store and the path prefix under which Courier's blobs live in it.
#[derive(Clone)]
pub struct ObjectStoreAt {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

/// Blobs of one namespace in an object store.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    namespace: Namespace,
}

/// What a [`BlobWriter`] holds before it sends a chunk (S3's smallest part): the memory one
/// piece-by-piece write takes, at most about twice this while two chunks are on their way.
const WRITER_CHUNK: usize = 5 * 1024 * 1024;

/// Files up to this size are put in one request; larger ones go up in parts of this size.
const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;

impl BlobStore {
    /// A store over a local folder, created if missing.
    pub fn local(root: &FsPath) -> Result<ObjectStoreAt, EdgeError> {
        std::fs::create_dir_all(root)?;
        clear_stale_staging(&root.join(Namespace::Parts.prefix()));
        let store = Arc::new(LocalFileSystem::new_with_prefix(root)?.with_automatic_cleanup(true));
        Ok(ObjectStoreAt { store, prefix: Path::default() })
    }

    /// The store a location names: a plain path or `file://` for a local folder, or an object store
    /// URL (`s3://bucket/prefix`, `gs://…`, `az://…`, `memory:///`) configured from the usual
    /// environment variables of that service (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(location: &str) -> Result<ObjectStoreAt, EdgeError> {
        if !location.contains("://") {
            return Self::local(FsPath::new(location));
        }
        if let Some(path) = location.strip_prefix("file://") {
            return Self::local(FsPath::new(path));
        }
        let url = url::Url::parse(location).map_err(|e| EdgeError::Upstream(format!("{location}: {e}")))?;
        let options = std::env::vars().filter_map(|(k, v)| {
            let k = k.to_ascii_lowercase();
            (k.starts_with("aws_") || k.starts_with("google_") || k.starts_with("azure_")).then_some((k, v))
        });
        let (store, prefix) = object_store::parse_url_opts(&url, options)?;
        Ok(ObjectStoreAt { store: Arc::from(store), prefix })
    }

    pub fn new(at: ObjectStoreAt, namespace: Namespace) -> Self {
        Self { store: at.store, prefix: at.prefix, namespace }
    }

    /// Another namespace in the same object store, under the same prefix.
    pub fn beside(&self, namespace: Namespace) -> Self {
        Self { store: self.store.clone(), prefix: self.prefix.clone(), namespace }
    }

    fn path(&self, id: &BlobId) -> Path {
        let hex = id.to_hex();
        let mut path = self.prefix.clone();
        for part in [self.namespace.prefix(), &hex[..2], &hex] {
            path = path.child(part);
        }
        path
    }

    /// The blob's size, or `None` when it is not stored.
    pub async fn size(&self, id: &BlobId) -> Result<Option<u64>, EdgeError> {
        match self.store.head(&self.path(id)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole blob, unverified: callers that cache it check it against `id` first.
    pub async fn get(&self, id: &BlobId) -> Result<Option<Bytes>, EdgeError> {
        match self.store.get(&self.path(id)).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A byte range of the blob as a stream, for bodies too large to hold in memory.
    pub async fn get_range_stream(
        &self,
        id: &BlobId,
        range: std::ops::Range<u64>,
    ) -> Result<futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>, EdgeError> {
        let options = GetOptions { range: Some(GetRange::Bounded(range)), ..Default::default() };
        match self.store.get_opts(&self.path(id), options).await {
            Ok(result) => Ok(result.into_stream()),
            Err(object_store::Error::NotFound { .. }) => Err(EdgeError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `bytes` under `id`. The caller vouches that `id` is their hash.
    pub async fn put(&self, id: &BlobId, bytes: Bytes) -> Result<Stored, EdgeError> {
        let options = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&self.path(id), PutPayload::from(bytes), options).await {
            Ok(_) => Ok(Stored::New),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Stored::Existing),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the file at `file` under `id` unless the blob is already there. The object store
    /// makes the blob visible only once it is complete. The caller vouches that `id` is its hash.
    pub async fn put_file(&self, id: &BlobId, file: &FsPath) -> Result<Stored, EdgeError> {
        if self.size(id).await?.is_some() {
            return Ok(Stored::Existing);
        }
        let len = tokio::fs::metadata(file).await?.len();
        if len <= SINGLE_PUT_MAX {
            return self.put(id, Bytes::from(tokio::fs::read(file).await?)).await;
        }
        let upload = self.store.put_multipart(&self.path(id)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, SINGLE_PUT_MAX as usize);
        let mut reader = tokio::fs::File::open(file).await?;
        let mut chunk = vec![0u8; 1024 * 1024];
        loop {
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await?;
            writer.write(&chunk[..n]);
        }
        writer.finish().await?;
        Ok(Stored::New)
    }

    /// A writer of blob `id` in pieces as they come (a multipart upload; on a local disk a staging
    /// file renamed into place): nothing is under its name until [`BlobWriter::finish`].
    pub async fn writer(&self, id: &BlobId) -> Result<BlobWriter, EdgeError> {
        let upload = self.store.put_multipart(&self.path(id)).await?;
        Ok(BlobWriter { writer: WriteMultipart::new_with_chunk_size(upload, WRITER_CHUNK) })
    }

    /// Copies the blob into a new file at `file`, in chunks. `false` when it is not stored.
    pub async fn download(&self, id: &BlobId, file: &FsPath) -> Result<bool, EdgeError> {
        let result = match self.store.get(&self.path(id)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let mut stream = result.into_stream();
        let mut out = tokio::fs::File::create_new(file).await?;
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk?).await?;
        }
        out.sync_all().await?;
        Ok(true)
    }

    pub async fn delete(&self, id: &BlobId) -> Result<(), EdgeError> {
        match self.store.delete(&self.path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStore({}/{}, {:?})", self.store, self.prefix, self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_store_clears_stale_staging_of_piece_by_piece_writes_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("parts/ab");
        std::fs::create_dir_all(&shard).unwrap();
        let (stale, fresh, blob) = (shard.join("abcd#1"), shard.join("abce#1"), shard.join("abcf"));
        for path in [&stale, &fresh, &blob] {
            std::fs::write(path, b"bytes").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for path in [&stale, &blob] {
            std::fs::File::options().write(true).open(path).unwrap().set_modified(two_hours_ago).unwrap();
        }
        BlobStore::local(dir.path()).unwrap();
        assert!(!stale.exists(), "a write its process left an hour ago goes");
        assert!(fresh.exists(), "a live write's staging stays");
        assert!(blob.exists(), "blobs are not staging");
    }

    #[tokio::test]
    async fn puts_dedup_and_namespaces_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let originals = BlobStore::new(store.clone(), Namespace::Originals);
        let variants = BlobStore::new(store, Namespace::Variants);
        let bytes = Bytes::from_static(b"a photo");
        let id = BlobId::of(&bytes);
        assert_eq!(originals.put(&id, bytes.clone()).await.unwrap(), Stored::New);
        assert_eq!(originals.put(&id, bytes.clone()).await.unwrap(), Stored::Existing);
        assert_eq!(originals.get(&id).await.unwrap(), Some(bytes));
        assert_eq!(variants.size(&id).await.unwrap(), None);
        originals.delete(&id).await.unwrap();
        assert_eq!(originals.size(&id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn large_files_go_up_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(BlobStore::local(&dir.path().join("blobs")).unwrap(), Namespace::Originals);
        let body: Vec<u8> = (0..SINGLE_PUT_MAX as usize * 2 + 12345).map(|i| (i * 31 % 251) as u8).collect();
        let file = dir.path().join("upload");
        std::fs::write(&file, &body).unwrap();
        let id = BlobId::of(&body);
        assert_eq!(blobs.put_file(&id, &file).await.unwrap(), Stored::New);
        assert_eq!(blobs.put_file(&id, &file).await.unwrap(), Stored::Existing);
        assert!(id.matches(&blobs.get(&id).await.unwrap().unwrap()));
    }
}
