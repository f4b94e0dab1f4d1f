//! Receiving an upload body: bounded, hashed while written, into a temp file that removes itself.

use std::io::Write;
use std::path::Path;

use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use bytes::BytesMut;
use futures_util::StreamExt;
use tempfile::NamedTempFile;
use transcode::MediaType;
use types::BlobId;

use crate::IngestError;

/// Bytes gathered before one blocking write-and-hash step: bounds memory per upload.
const BATCH: usize = 1024 * 1024;
/// Enough of the head of a file to recognise every format we take.
const SNIFF_LEN: usize = 32;

/// A fully received upload. Dropping it deletes the temp file.
#[derive(Debug)]
pub(crate) struct Spooled {
    pub(crate) file: NamedTempFile,
    pub(crate) blob: BlobId,
    pub(crate) len: u64,
}

struct Writer {
    file: NamedTempFile,
    hasher: blake3::Hasher,
}

impl Writer {
    /// Hashes and writes on a blocking thread, never on the runtime's.
    async fn write(mut self, batch: BytesMut) -> Result<Self, IngestError> {
        tokio::task::spawn_blocking(move || {
            self.hasher.update(&batch);
            self.file.write_all(&batch)?;
            Ok(self)
        })
        .await
        .map_err(|e| IngestError::Io(std::io::Error::other(e)))?
    }
}

/// Streams `body` into a temp file under `dir`, refusing it as soon as it passes `limit` bytes or
/// its first bytes are not the `declared` format.
pub(crate) async fn receive(
    stream: &mut BodyDataStream,
    dir: &Path,
    limit: u64,
    declared: MediaType,
) -> Result<Spooled, IngestError> {
    let file = tempfile::Builder::new().prefix("upload-").tempfile_in(dir)?;
    let mut writer = Writer { file, hasher: blake3::Hasher::new() };
    let mut batch = BytesMut::new();
    let mut len: u64 = 0;
    let mut sniffed = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| IngestError::Interrupted(e.to_string()))?;
        len += chunk.len() as u64;
        if len > limit {
            return Err(IngestError::TooLarge { limit });
        }
        batch.extend_from_slice(&chunk);
        if !sniffed && batch.len() >= SNIFF_LEN {
            check_magic(&batch, declared)?;
            sniffed = true;
        }
        if batch.len() >= BATCH {
            writer = writer.write(std::mem::take(&mut batch)).await?;
        }
    }
    if len == 0 {
        return Err(IngestError::Empty);
    }
    if !sniffed {
        check_magic(&batch, declared)?;
    }
    let writer = writer.write(batch).await?;
    Ok(Spooled { blob: BlobId::from_hash(writer.hasher.finalize()), file: writer.file, len })
}

/// Builds a spooled upload from bytes that come in pieces (a resumable upload's parts), hashing
/// and writing on blocking threads as [`receive`] does.
pub(crate) struct Assembler {
    /// `None` only while a batch is being written.
    writer: Option<Writer>,
    batch: BytesMut,
    len: u64,
}

impl Assembler {
    pub(crate) fn new(dir: &Path) -> Result<Self, IngestError> {
        let file = tempfile::Builder::new().prefix("upload-").tempfile_in(dir)?;
        Ok(Self { writer: Some(Writer { file, hasher: blake3::Hasher::new() }), batch: BytesMut::new(), len: 0 })
    }

    pub(crate) async fn push(&mut self, bytes: &[u8]) -> Result<(), IngestError> {
        self.len += bytes.len() as u64;
        self.batch.extend_from_slice(bytes);
        if self.batch.len() >= BATCH {
            let writer = self.writer.take().ok_or_else(|| std::io::Error::other("an earlier write failed"))?;
            self.writer = Some(writer.write(std::mem::take(&mut self.batch)).await?);
        }
        Ok(())
    }

    pub(crate) async fn finish(mut self) -> Result<Spooled, IngestError> {
        let writer = self.writer.take().ok_or_else(|| std::io::Error::other("an earlier write failed"))?;
        let writer = writer.write(std::mem::take(&mut self.batch)).await?;
        Ok(Spooled { blob: BlobId::from_hash(writer.hasher.finalize()), file: writer.file, len: self.len })
    }
}

/// Whether `head` (an upload's first bytes) is the `declared` format; `complete` says there are no
/// more bytes, so fewer than the sniff needs are judged as they are. `Ok(false)`: too few to tell.
pub(crate) fn sniff(head: &[u8], declared: MediaType, complete: bool) -> Result<bool, IngestError> {
    if head.len() < SNIFF_LEN && !complete {
        return Ok(false);
    }
    check_magic(head, declared)?;
    Ok(true)
}

/// How many first bytes the sniff reads.
pub(crate) const SNIFF_BYTES: usize = SNIFF_LEN;

fn check_magic(head: &[u8], declared: MediaType) -> Result<(), IngestError> {
    if declared.matches(head) {
        return Ok(());
    }
    Err(IngestError::TypeMismatch { declared: declared.mime(), sniffed: MediaType::describe(head).into() })
}

/// How much of a refused body is still read, and for how long, before the answer is sent.
const DISCARD_MAX: usize = 1024 * 1024;
const DISCARD_TIME: Duration = Duration::from_secs(2);

/// Reads and drops what is left of a refused request body, within bounds, so that a client still
/// sending it reads our error instead of a reset connection. Clients sending more than this should
/// use `Expect: 100-continue` (curl does for large bodies), which lets them see the error unsent.
pub async fn discard_body(body: Body) {
    discard(&mut body.into_data_stream()).await
}

pub(crate) async fn discard(stream: &mut BodyDataStream) {
    let drain = async {
        let mut seen = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > DISCARD_MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

/// Removes temp files a crash left behind; nothing in `dir` outlives the request that made it.
pub(crate) fn clear_leftovers(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("upload-") || name.starts_with("output-") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
