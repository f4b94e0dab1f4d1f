//! What `courier serve` and a `courier transcode-worker` say to each other: one JSON line per
//! message each way, over the worker's stdin and stdout.
//!
//! The parent writes a [`Request`]; the worker answers with any number of [`Reply::Progress`] and
//! then one [`Reply::Done`] or [`Reply::Failed`]. The worker reads its input from the file
//! [`INPUT`] in its folder and writes outputs into [`crate::sandbox::OUT_DIR`], naming them in its
//! reply. The parent trusts none of it: names, sizes and claims are checked, and every output is
//! hashed again by the parent (see [`crate::WorkerPool`]).

use serde::{Deserialize, Serialize};

use crate::sandbox::Landlock;
use crate::{TranscodeError, audio, photo, video};

/// The input's file name in the worker's folder.
pub const INPUT: &str = "input";
/// The longest line either side reads; a longer one ends the worker.
pub const MAX_LINE: usize = 64 * 1024;

/// One job for a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub task: Task,
    /// CPU seconds the job may use, across all its threads.
    pub cpu_secs: u64,
}

/// What to do with the input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "task")]
pub enum Task {
    /// Read an image's header: refuse a pixel bomb before anything is decoded.
    ProbeImage {
        format: photo::Format,
        max_pixels: u64,
    },
    /// Read an audio file's headers: rate, channels and the duration they claim.
    ProbeAudio {
        container: audio::Container,
        limits: audio::Limits,
    },
    Photo {
        format: photo::Format,
        settings: photo::Settings,
        limits: photo::Limits,
    },
    Audio {
        container: audio::Container,
        settings: audio::Settings,
        limits: audio::Limits,
    },
    Video {
        settings: video::Settings,
        limits: video::Limits,
    },
}

/// One line from the worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// How far the job has got, 0.0–1.0.
    Progress(f32),
    /// The job's outputs; `peak_rss_bytes` is the worker's resident high-water mark so far, and
    /// `landlock` how much of its sandbox the kernel enforced.
    Done {
        made: Made,
        peak_rss_bytes: u64,
        landlock: Landlock,
    },
    Failed {
        error: TranscodeError,
        peak_rss_bytes: u64,
        landlock: Landlock,
    },
}

/// An output file in the worker's `out/` folder, as the worker describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutFile {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// What a job made, by the worker's account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Made {
    Probed,
    Photo {
        width: u32,
        height: u32,
        standard: OutFile,
        thumb: OutFile,
        preview: OutFile,
    },
    Audio {
        duration_ms: u64,
        waveform: Vec<u8>,
        standard: OutFile,
    },
    Video {
        width: u32,
        height: u32,
        duration_ms: u64,
        has_audio: bool,
        standard: OutFile,
        poster: OutFile,
        thumb: OutFile,
        preview: OutFile,
    },
}
