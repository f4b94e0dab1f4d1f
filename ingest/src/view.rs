//! The JSON of a media record, and the job result it is built from.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use types::{BlobId, ErrorDetail, MediaId, MediaKind, MediaStatus, UrlSigner, VariantName};

/// What a finished job made, as kept in `jobs.result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobResult {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) variants: BTreeMap<VariantName, StoredVariant>,
    /// Base64 of the preview JPEG.
    pub(crate) preview: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredVariant {
    pub(crate) blob: BlobId,
    pub(crate) mime: String,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) bytes: u64,
}

impl JobResult {
    pub(crate) fn from_photo(out: &transcode::photo::Output) -> Self {
        let variant = |e: &transcode::photo::Encoded| StoredVariant {
            blob: e.blob,
            mime: transcode::photo::Encoded::MIME.to_string(),
            width: e.width,
            height: e.height,
            bytes: e.bytes.len() as u64,
        };
        let variants = BTreeMap::from([
            (VariantName::Standard, variant(&out.standard)),
            (VariantName::Thumb, variant(&out.thumb)),
        ]);
        Self { width: out.width, height: out.height, variants, preview: STANDARD.encode(&out.preview) }
    }
}

/// `GET /v1/media/{id}` and the body of a 201 from `POST /v1/media`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MediaView {
    pub id: MediaId,
    pub kind: MediaKind,
    /// BLAKE3 of the bytes as uploaded.
    pub blob: BlobId,
    pub status: MediaStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ErrorDetail>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub variants: BTreeMap<VariantName, VariantView>,
    /// `data:image/jpeg;base64,…`, small enough to inline in a message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preview: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantView {
    pub blob: BlobId,
    pub mime: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// Signed path and query, relative to the server: `/b/{blob}?exp=…&sig=…`.
    pub url: String,
}

/// Signed URLs expire on the hour after `ttl`, so every read within an hour mints the same URL and
/// browsers and edges can cache it.
pub(crate) fn url_expiry(now_secs: u64, ttl_secs: u64) -> u64 {
    (now_secs / 3600 + 1) * 3600 + ttl_secs
}

pub(crate) struct MediaParts<'a> {
    pub(crate) id: MediaId,
    pub(crate) kind: MediaKind,
    pub(crate) blob: BlobId,
    pub(crate) status: MediaStatus,
    pub(crate) error: Option<ErrorDetail>,
    pub(crate) result: Option<JobResult>,
    pub(crate) signer: &'a UrlSigner,
    pub(crate) url_exp: u64,
}

impl MediaParts<'_> {
    pub(crate) fn view(self) -> MediaView {
        let mut view = MediaView {
            id: self.id,
            kind: self.kind,
            blob: self.blob,
            status: self.status,
            error: self.error,
            width: None,
            height: None,
            variants: BTreeMap::new(),
            preview: None,
        };
        if let (MediaStatus::Ready, Some(result)) = (self.status, self.result) {
            view.width = Some(result.width);
            view.height = Some(result.height);
            view.preview = Some(format!("data:image/jpeg;base64,{}", result.preview));
            view.variants = result
                .variants
                .into_iter()
                .map(|(name, v)| {
                    let url = self.signer.path(&v.blob, self.url_exp);
                    (
                        name,
                        VariantView {
                            blob: v.blob,
                            mime: v.mime,
                            width: v.width,
                            height: v.height,
                            bytes: v.bytes,
                            url,
                        },
                    )
                })
                .collect();
        }
        view
    }
}
