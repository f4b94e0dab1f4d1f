//! The JSON of a media record, and the job result it is built from.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
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

fn jpeg(e: &transcode::photo::Encoded) -> StoredVariant {
    StoredVariant {
        blob: e.blob,
        mime: transcode::photo::Encoded::MIME.to_string(),
        width: Some(e.width),
        height: Some(e.height),
        bytes: e.bytes.len() as u64,
    }
}

impl JobResult {
    pub(crate) fn from_photo(out: &transcode::photo::Output) -> Self {
        Self {
            width: Some(out.width),
            height: Some(out.height),
            variants: BTreeMap::from([
                (VariantName::Standard, jpeg(&out.standard)),
                (VariantName::Thumb, jpeg(&out.thumb)),
            ]),
            preview: Some(STANDARD.encode(&out.preview)),
            ..Default::default()
        }
    }

    pub(crate) fn from_audio(out: &transcode::audio::Output) -> Self {
        let standard = StoredVariant {
            blob: out.blob,
            mime: transcode::audio::Output::MIME.to_string(),
            width: None,
            height: None,
            bytes: out.bytes.len() as u64,
        };
        Self {
            variants: BTreeMap::from([(VariantName::Standard, standard)]),
            duration_ms: Some(out.duration_ms),
            waveform: Some(out.waveform.clone()),
            ..Default::default()
        }
    }

    pub(crate) fn from_video(out: &transcode::video::Output) -> Self {
        let file = |f: &transcode::video::FileVariant, mime: &str| StoredVariant {
            blob: f.blob,
            mime: mime.to_string(),
            width: Some(f.width),
            height: Some(f.height),
            bytes: f.bytes,
        };
        let jpeg = transcode::photo::Encoded::MIME;
        Self {
            width: Some(out.width),
            height: Some(out.height),
            variants: BTreeMap::from([
                (VariantName::Standard, file(&out.standard, transcode::video::Output::MIME)),
                (VariantName::Poster, file(&out.poster, jpeg)),
                (VariantName::Thumb, file(&out.thumb, jpeg)),
            ]),
            preview: Some(STANDARD.encode(&out.preview)),
            duration_ms: Some(out.duration_ms),
            has_audio: Some(out.has_audio),
            ..Default::default()
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
    pub(crate) progress: Option<f32>,
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
