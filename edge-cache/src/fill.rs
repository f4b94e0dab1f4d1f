//! Upstream fills: one fetch per blob however many concurrent misses, streamed to every waiter while
//! it downloads, verified against the blob's hash before either tier keeps it.
//!
//! The fill writes into a temp file of the disk tier, and waiters read from that file by offset as
//! bytes arrive, so memory stays flat however large the blob. The last chunk is withheld from waiters
//! until the whole body has been hashed: a blob whose bytes do not match its name is never served in
//! full, never kept, and its waiters' responses are cut short.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::StreamExt;
use tempfile::NamedTempFile;
use tokio::sync::watch;
use types::{BlobId, UrlSigner};

use crate::disk::{read_at, read_now};
use crate::upstream::{Upstream, UpstreamError};
use crate::{DiskTier, EdgeError, MemoryTier, Metrics};

/// Why a fill did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FillError {
    NotFound,
    Timeout,
    Upstream(String),
    Verify,
    Io(String),
}

impl From<UpstreamError> for FillError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::NotFound => FillError::NotFound,
            UpstreamError::Timeout => FillError::Timeout,
            UpstreamError::Failed(m) => FillError::Upstream(m),
        }
    }
}

impl From<std::io::Error> for FillError {
    fn from(e: std::io::Error) -> Self {
        FillError::Io(e.to_string())
    }
}

impl FillError {
    fn into_edge(self, id: BlobId) -> EdgeError {
        match self {
            FillError::NotFound => EdgeError::NotFound,
            FillError::Timeout => EdgeError::UpstreamTimeout,
            FillError::Upstream(m) => EdgeError::Upstream(m),
            FillError::Verify => EdgeError::VerifyFailed(id),
            FillError::Io(m) => EdgeError::Io(std::io::Error::other(m)),
        }
    }
}

/// How far a fill has come.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// The blob's size, once the upstream has answered.
    pub(crate) len: Option<u64>,
    /// Bytes waiters may read from the start of the file.
    pub(crate) visible: u64,
    pub(crate) outcome: Option<Result<(), FillError>>,
}

/// A fill under way, shared by every request waiting for the blob.
pub struct Fill {
    id: BlobId,
    file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

impl Fill {
    /// The blob's size, once the upstream has answered.
    pub async fn size(&self) -> Result<u64, EdgeError> {
        let mut rx = self.progress.clone();
        let progress = rx
            .wait_for(|p| p.len.is_some() || p.outcome.is_some())
            .await
            .map_err(|_| EdgeError::Io(std::io::Error::other("fill abandoned")))?
            .clone();
        match (progress.len, progress.outcome) {
            (_, Some(Err(e))) => Err(e.into_edge(self.id)),
            (Some(len), _) => Ok(len),
            (None, _) => Err(EdgeError::Io(std::io::Error::other("fill ended without a length"))),
        }
    }

    /// Waits for the whole fill; afterwards the file holds the verified blob.
    pub async fn finished(&self) -> Result<Arc<std::fs::File>, EdgeError> {
        let mut rx = self.progress.clone();
        let outcome = rx
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_| EdgeError::Io(std::io::Error::other("fill abandoned")))?
            .outcome
            .clone();
        match outcome {
            Some(Ok(())) => Ok(self.file.clone()),
            Some(Err(e)) => Err(e.into_edge(self.id)),
            None => Err(EdgeError::Io(std::io::Error::other("fill ended without an outcome"))),
        }
    }

    /// Bytes `start..=end` as they arrive; the stream fails if the fill does.
    pub fn stream(&self, start: u64, end: u64) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        read_stream(self.file.clone(), start, end, Some(self.progress.clone()))
    }
}

/// Reads `start..=end` of `file` in pieces: from the page cache on the calling thread when it holds
/// them, on a blocking thread otherwise. With `progress`, waits for bytes to become visible and
/// fails when the fill fails.
pub(crate) fn read_stream(
    file: Arc<std::fs::File>,
    start: u64,
    end: u64,
    progress: Option<watch::Receiver<Progress>>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    // Whole files go out in large reads (fewer trips to the blocking pool); a fill under way in
    // smaller ones, so waiters see bytes soon after they land.
    let piece: u64 = if progress.is_none() { 1024 * 1024 } else { 256 * 1024 };
    futures_util::stream::unfold(Some((file, start, progress)), move |state| async move {
        let (file, pos, mut progress) = state?;
        if pos > end {
            return None;
        }
        let visible = match progress.as_mut() {
            None => end + 1,
            Some(rx) => {
                let seen = rx.wait_for(|p| p.visible > pos || p.outcome.is_some()).await.map(|p| p.clone());
                match seen {
                    Ok(p) if p.visible > pos => p.visible,
                    Ok(Progress { outcome: Some(Err(e)), .. }) => {
                        return Some((Err(std::io::Error::other(format!("fill failed: {e:?}"))), None));
                    }
                    _ => return Some((Err(std::io::Error::other("fill ended early")), None)),
                }
            }
        };
        let n = piece.min(visible - pos).min(end + 1 - pos);
        let read = match read_now(&file, pos, n as usize) {
            Some(bytes) => Ok(bytes),
            None => {
                let reader = file.clone();
                tokio::task::spawn_blocking(move || read_at(&reader, pos, n as usize))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            }
        };
        match read {
            Ok(bytes) => Some((Ok(bytes), Some((file, pos + n, progress)))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Starts fills and lets concurrent misses join them.
pub struct Filler {
    upstreams: Vec<Upstream>,
    signer: UrlSigner,
    disk: DiskTier,
    memory: MemoryTier,
    metrics: Arc<Metrics>,
    timeout: Duration,
    inflight: Mutex<HashMap<BlobId, Arc<Fill>>>,
}

impl Filler {
    pub fn new(
        upstreams: Vec<Upstream>,
        signer: UrlSigner,
        disk: DiskTier,
        memory: MemoryTier,
        metrics: Arc<Metrics>,
        timeout: Duration,
    ) -> Self {
        Self { upstreams, signer, disk, memory, metrics, timeout, inflight: Mutex::default() }
    }

    /// The fill of `id`: the one under way, or a new one. `true` when it joined one under way.
    pub fn join(self: &Arc<Self>, id: &BlobId) -> Result<(Arc<Fill>, bool), EdgeError> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(fill) = inflight.get(id) {
            self.metrics.coalesced.inc();
            return Ok((fill.clone(), true));
        }
        let temp = self.disk.temp_file()?;
        let (tx, rx) = watch::channel(Progress::default());
        let fill = Arc::new(Fill { id: *id, file: Arc::new(temp.reopen()?), progress: rx });
        inflight.insert(*id, fill.clone());
        self.metrics.misses.inc();
        // The fill runs on its own task: a client that goes away does not cancel it for the others.
        let me = self.clone();
        let id = *id;
        tokio::spawn(async move {
            // However the fill ends, even by a panic, it leaves the map, so the next miss starts afresh.
            let _leave = LeaveMap { filler: me.clone(), id };
            if let Err(e) = me.fetch(&id, temp, &tx).await {
                tracing::warn!(blob = %id, error = ?e, "fill failed");
                tx.send_modify(|p| p.outcome = Some(Err(e)));
            }
        });
        Ok((fill, false))
    }

    async fn fetch(&self, id: &BlobId, temp: NamedTempFile, tx: &watch::Sender<Progress>) -> Result<(), FillError> {
        let started = Instant::now();
        let mut failure = FillError::NotFound;
        let mut body = None;
        for upstream in &self.upstreams {
            self.metrics.upstream_requests.inc();
            match upstream.open(id, &self.signer, self.timeout).await {
                Ok(b) => {
                    body = Some(b);
                    break;
                }
                Err(UpstreamError::NotFound) => {}
                Err(e) => {
                    self.metrics.upstream_errors.inc();
                    tracing::warn!(blob = %id, upstream = ?upstream, error = %e, "upstream failed; trying the next");
                    failure = e.into();
                }
            }
        }
        self.metrics.upstream_latency.observe(started.elapsed().as_secs_f64());
        let mut body = body.ok_or(failure)?;
        let len = body.len;
        tx.send_modify(|p| p.len = Some(len));

        let mut writer = (temp, blake3::Hasher::new());
        let mut pending: Option<Bytes> = None;
        let mut received = 0u64;
        loop {
            let next = tokio::time::timeout(self.timeout, body.stream.next()).await.map_err(|_| FillError::Timeout)?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(FillError::Upstream)?;
            received += chunk.len() as u64;
            if received > len {
                return Err(FillError::Upstream(format!("more than the announced {len} bytes")));
            }
            // Each chunk is published only once the next one has come: the last one waits for the hash.
            if let Some(previous) = pending.replace(chunk) {
                let n = previous.len() as u64;
                writer = write_and_hash(writer, previous).await?;
                tx.send_modify(|p| p.visible += n);
            }
        }
        if received != len {
            return Err(FillError::Upstream(format!("{received} of the announced {len} bytes")));
        }
        if let Some(last) = pending.take() {
            writer = write_and_hash(writer, last).await?;
        }
        let (temp, hasher) = writer;
        if BlobId::from_hash(hasher.finalize()) != *id {
            self.metrics.verify_failures.inc();
            tracing::error!(blob = %id, "upstream bytes do not match the blob's hash; not cached, not served in full");
            return Err(FillError::Verify);
        }

        let disk = self.disk.clone();
        let keep_in_memory = self.memory.admits(len);
        let (committed, small) = {
            let id = *id;
            tokio::task::spawn_blocking(move || {
                let small = if keep_in_memory { std::fs::read(temp.path()).ok().map(Bytes::from) } else { None };
                (disk.commit(&id, temp, len), small)
            })
            .await
            .map_err(|e| FillError::Io(e.to_string()))?
        };
        if let Err(e) = committed {
            // The bytes are right, so the waiters still get them; only the disk tier misses out.
            tracing::error!(blob = %id, error = %e, "could not keep a verified fill on disk");
        }
        if let Some(bytes) = small {
            self.memory.insert(id, bytes).await;
        }
        tx.send_modify(|p| {
            p.visible = len;
            p.outcome = Some(Ok(()));
        });
        Ok(())
    }
}

/// Takes a fill out of the in-flight map when dropped.
struct LeaveMap {
    filler: Arc<Filler>,
    id: BlobId,
}

impl Drop for LeaveMap {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.filler.inflight.lock() {
            inflight.remove(&self.id);
        }
    }
}

async fn write_and_hash(
    (mut temp, mut hasher): (NamedTempFile, blake3::Hasher),
    chunk: Bytes,
) -> Result<(NamedTempFile, blake3::Hasher), FillError> {
    tokio::task::spawn_blocking(move || {
        hasher.update(&chunk);
        temp.write_all(&chunk)?;
        Ok((temp, hasher))
    })
    .await
    .map_err(|e| FillError::Io(e.to_string()))?
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filler({:?})", self.upstreams)
    }
}
