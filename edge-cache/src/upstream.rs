//! Where an edge fills from: an origin or another edge over HTTP, or an object store directly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use types::{BlobId, UrlSigner};

use crate::{BlobStore, Namespace};

/// One upstream of an edge node.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// `courier serve` or `courier edge`, asked for `/b/{blob}` with a URL the edge signs itself.
    Http { base: String, client: reqwest::Client },
    /// The variants of an object store (the origin's `--blobs`), read directly.
    Store(BlobStore),
}

/// The body of a blob being fetched.
pub(crate) struct UpstreamBody {
    pub(crate) len: u64,
    pub(crate) stream: BoxStream<'static, Result<Bytes, String>>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("no upstream has the blob")]
    NotFound,
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the upstream failed: {0}")]
    Failed(String),
}

impl Upstream {
    /// `http://` or `https://host:port` for an origin or edge (`extra_root_pem` adds a CA to trust,
    /// for shields with a private certificate); a blob store location for reading the origin's
    /// blobs directly: a folder (`file:///path` or a plain path) or an object store URL
    /// (`s3://bucket/prefix`, `gs://…`, `az://…`). `timeout` bounds connecting and waiting for
    /// response headers.
    pub fn parse(url: &str, timeout: Duration, extra_root_pem: Option<&[u8]>) -> Result<Self, String> {
        if url.starts_with("http://") || url.starts_with("https://") {
            let mut builder = reqwest::Client::builder()
                .use_rustls_tls()
                .connect_timeout(timeout)
                .pool_idle_timeout(Duration::from_secs(60));
            if let Some(pem) = extra_root_pem {
                let root = reqwest::Certificate::from_pem(pem).map_err(|e| format!("upstream CA: {e}"))?;
                builder = builder.add_root_certificate(root);
            }
            let client = builder.build().map_err(|e| e.to_string())?;
            return Ok(Upstream::Http { base: url.trim_end_matches('/').to_owned(), client });
        }
        let store = BlobStore::open(url).map_err(|e| e.to_string())?;
        Ok(Upstream::Store(BlobStore::new(store, Namespace::Variants)))
    }

    pub(crate) async fn open(
        &self,
        id: &BlobId,
        signer: &UrlSigner,
        timeout: Duration,
    ) -> Result<UpstreamBody, UpstreamError> {
        match self {
            Upstream::Http { base, client } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let url = format!("{base}{}", signer.path(id, now + 300));
                let response = tokio::time::timeout(timeout, client.get(url).send())
                    .await
                    .map_err(|_| UpstreamError::Timeout)?
                    .map_err(|e| {
                        if e.is_timeout() { UpstreamError::Timeout } else { UpstreamError::Failed(e.to_string()) }
                    })?;
                match response.status().as_u16() {
                    200 => {}
                    404 => return Err(UpstreamError::NotFound),
                    504 => return Err(UpstreamError::Timeout),
                    other => return Err(UpstreamError::Failed(format!("status {other}"))),
                }
                let len = response
                    .content_length()
                    .ok_or_else(|| UpstreamError::Failed("no Content-Length from upstream".into()))?;
                let stream = response.bytes_stream().map(|r| r.map_err(|e| e.to_string())).boxed();
                Ok(UpstreamBody { len, stream })
            }
            Upstream::Store(store) => {
                let failed = |e: crate::EdgeError| UpstreamError::Failed(e.to_string());
                let len = store.size(id).await.map_err(failed)?.ok_or(UpstreamError::NotFound)?;
                let stream = if len == 0 {
                    futures_util::stream::empty().boxed()
                } else {
                    store
                        .get_range_stream(id, 0..len)
                        .await
                        .map_err(failed)?
                        .map(|r| r.map_err(|e| e.to_string()))
                        .boxed()
                };
                Ok(UpstreamBody { len, stream })
            }
        }
    }
}
