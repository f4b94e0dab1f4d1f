//! The JSON of a media record, and the job result it is built from.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use transcode::{Product, Variant};
use types::{BlobId, ErrorDetail, MediaId, MediaKind, MediaStatus, UrlSigner, VariantName};

/// What a finished job made, as kept in `jobs.result`. Fields a kind does not have are absent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct JobResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) height: Option<u32>,
    pub(crate) variants: BTreeMap<VariantName, StoredVariant>,
    /// Base64 of the preview JPEG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) preview: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) waveform: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) has_audio: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredVariant {
    pub(crate) blob: BlobId,
    pub(crate) mime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) height: Option<u32>,
    pub(crate) bytes: u64,
}

fn stored(v: &Variant, mime: &str) -> StoredVariant {
    StoredVariant { blob: v.blob, mime: mime.to_string(), width: v.width, height: v.height, bytes: v.len }
}

impl JobResult {
    /// What a worker made, as recorded on its job.
    pub(crate) fn from_product(product: &Product) -> Self {
        let jpeg = transcode::photo::Encoded::MIME;
        match product {
            Product::Probed => Self::default(),
            Product::Photo { width, height, standard, thumb, preview } => Self {
                width: Some(*width),
                height: Some(*height),
                variants: BTreeMap::from([
                    (VariantName::Standard, stored(standard, jpeg)),
                    (VariantName::Thumb, stored(thumb, jpeg)),
                ]),
                preview: Some(STANDARD.encode(preview)),
                ..Default::default()
            },
            Product::Audio { duration_ms, waveform, standard } => Self {
                variants: BTreeMap::from([(VariantName::Standard, stored(standard, transcode::audio::Output::MIME))]),
                duration_ms: Some(*duration_ms),
                waveform: Some(waveform.clone()),
                ..Default::default()
            },
            Product::Video { width, height, duration_ms, has_audio, standard, poster, thumb, preview } => Self {
                width: Some(*width),
                height: Some(*height),
                variants: BTreeMap::from([
                    (VariantName::Standard, stored(standard, transcode::video::Output::MIME)),
                    (VariantName::Poster, stored(poster, jpeg)),
                    (VariantName::Thumb, stored(thumb, jpeg)),
                ]),
                preview: Some(STANDARD.encode(preview)),
                duration_ms: Some(*duration_ms),
                has_audio: Some(*has_audio),
                ..Default::default()
            },
        }
    }

    /// The variants to store, in the order they are stored.
    pub(crate) fn variants_of(product: &Product) -> Vec<&Variant> {
        match product {
            Product::Probed => Vec::new(),
            Product::Photo { standard, thumb, .. } => vec![standard, thumb],
            Product::Audio { standard, .. } => vec![standard],
            Product::Video { standard, poster, thumb, .. } => vec![standard, poster, thumb],
        }
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
    /// While processing: how far a long job (a video) has got, 0.0–1.0.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub progress: Option<f32>,
    /// Images and videos: the upright size of the original.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub height: Option<u32>,
    /// Audio and video.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_ms: Option<u64>,
    /// Audio: loudness 0–255 in 64 equal slices, for the voice-note bar.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub waveform: Option<Vec<u8>>,
    /// Video: whether it has sound.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub has_audio: Option<bool>,
    #[serde(default)]
    pub variants: BTreeMap<VariantName, VariantView>,
    /// `data:image/jpeg;base64,…`, small enough to inline in a message (images and videos).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preview: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantView {
    pub blob: BlobId,
    pub mime: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub height: Option<u32>,
    pub bytes: u64,
    /// Signed path and query, `/b/{blob}?exp=…&sig=…`: relative to the server, or absolute under
    /// `public_base_url` when one is configured.
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
    pub(crate) progress: Option<f32>,
    pub(crate) signer: &'a UrlSigner,
    pub(crate) url_exp: u64,
    /// Prefixed to each variant's signed path (`public_base_url`: an edge's or a CDN's origin);
    /// empty, the URLs are relative to the server.
    pub(crate) base: &'a str,
}

impl MediaParts<'_> {
    pub(crate) fn view(self) -> MediaView {
        let mut view = MediaView {
            id: self.id,
            kind: self.kind,
            blob: self.blob,
            status: self.status,
            error: self.error,
            progress: None,
            width: None,
            height: None,
            duration_ms: None,
            waveform: None,
            has_audio: None,
            variants: BTreeMap::new(),
            preview: None,
        };
        if self.status == MediaStatus::Processing {
            view.progress = self.progress;
        }
        if let (MediaStatus::Ready, Some(result)) = (self.status, self.result) {
            view.width = result.width;
            view.height = result.height;
            view.duration_ms = result.duration_ms;
            view.waveform = result.waveform;
            view.has_audio = result.has_audio;
            view.preview = result.preview.map(|p| format!("data:image/jpeg;base64,{p}"));
            view.variants = result
                .variants
                .into_iter()
                .map(|(name, v)| {
                    let url = format!("{}{}", self.base, self.signer.path(&v.blob, self.url_exp));
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
