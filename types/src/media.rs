//! Media kinds, their processing states and the names of their variants.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Image,
    Audio,
    Video,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "image" => Some(MediaKind::Image),
            "audio" => Some(MediaKind::Audio),
            "video" => Some(MediaKind::Video),
            _ => None,
        }
    }
}

impl fmt::Display for MediaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaStatus {
    Processing,
    Ready,
    Failed,
}

impl MediaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaStatus::Processing => "processing",
            MediaStatus::Ready => "ready",
            MediaStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "processing" => Some(MediaStatus::Processing),
            "ready" => Some(MediaStatus::Ready),
            "failed" => Some(MediaStatus::Failed),
            _ => None,
        }
    }
}

/// The outputs a transcode makes of one upload. The inline preview is not a blob (it travels inside
/// the media JSON) and so is not a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VariantName {
    /// Long edge at most 1600 px for images; Opus for audio; H.264 MP4 for video.
    Standard,
    /// A video's representative frame as a JPEG.
    Poster,
    /// Long edge at most 320 px (of the image, or of a video's poster).
    Thumb,
}

impl VariantName {
    pub fn as_str(self) -> &'static str {
        match self {
            VariantName::Standard => "standard",
            VariantName::Poster => "poster",
            VariantName::Thumb => "thumb",
        }
    }
}
