//! Why a transcode did not produce its variants.

/// A failed transcode. [`TranscodeError::is_permanent`] tells whether trying the same bytes again
/// can help: a corrupt file stays corrupt, a panic or an exhausted budget might not recur.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TranscodeError {
    #[error("unsupported format: {0}")]
    Unsupported(String),
    #[error("the file is corrupt, truncated or cannot be decoded: {0}")]
    Corrupt(String),
    #[error("{width}×{height} is over the limit of {max_pixels} pixels")]
    TooManyPixels { width: u32, height: u32, max_pixels: u64 },
    #[error("{duration_ms} ms is over the limit of {max_ms} ms")]
    TooLong { duration_ms: u64, max_ms: u64 },
    #[error("{0}")]
    OverLimit(String),
    #[error("over the job's memory budget: {0}")]
    OverMemoryBudget(String),
    #[error("the job ran past its time budget")]
    TimedOut,
    #[error("the transcoder panicked: {0}")]
    Panicked(String),
    #[error("the worker pool has shut down")]
    PoolClosed,
    #[error("reading or writing media failed: {0}")]
    Io(String),
    #[error("gave up after {0} attempts")]
    TooManyAttempts(u32),
    #[error("no transcode worker was free in time")]
    Busy,
    #[error("the transcode worker misbehaved: {0}")]
    Misbehaved(String),
}

impl TranscodeError {
    /// Whether the same input would fail the same way again.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TranscodeError::Unsupported(_)
                | TranscodeError::Corrupt(_)
                | TranscodeError::TooManyPixels { .. }
                | TranscodeError::TooLong { .. }
                | TranscodeError::OverLimit(_)
                | TranscodeError::OverMemoryBudget(_)
                | TranscodeError::TimedOut
        )
    }

    /// Whether the worker process died or broke its contract: retried once, then final.
    pub fn is_crash(&self) -> bool {
        matches!(self, TranscodeError::Panicked(_) | TranscodeError::Misbehaved(_))
    }

    /// What a client is told: one fixed sentence per code. The detail (a decoder's words, a
    /// worker's stderr, a storage path) goes to the log only.
    pub fn public_message(&self) -> &'static str {
        match self {
            TranscodeError::Unsupported(_) => "the file's format or codec is not one this server takes",
            TranscodeError::Corrupt(_) => "the file is corrupt, truncated or cannot be decoded",
            TranscodeError::TooManyPixels { .. } => "the image has more pixels than this server takes",
            TranscodeError::TooLong { .. } => "the recording is longer than this server takes",
            TranscodeError::OverLimit(_) => {
                "the file is over one of this server's limits (channels, sample rate, frame rate, streams or scans)"
            }
            TranscodeError::OverMemoryBudget(_) => "decoding the file needs more memory than a job may use",
            TranscodeError::TimedOut => "processing the file took longer than a job may take",
            TranscodeError::Panicked(_) | TranscodeError::Misbehaved(_) => {
                "the transcoder stopped while processing the file"
            }
            TranscodeError::PoolClosed => "the server is shutting down; try again",
            TranscodeError::Io(_) => "storing or reading the file failed on our side; try again",
            TranscodeError::TooManyAttempts(_) => "the file could not be processed after several attempts",
            TranscodeError::Busy => "every transcode worker is busy; try again",
        }
    }

    /// A stable machine-readable name, used in API errors and the media's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            TranscodeError::Unsupported(_) => "unsupported_media_type",
            TranscodeError::Corrupt(_) => "corrupt_media",
            TranscodeError::TooManyPixels { .. } => "too_many_pixels",
            TranscodeError::TooLong { .. } => "duration_over_limit",
            TranscodeError::OverLimit(_) => "over_limit",
            TranscodeError::OverMemoryBudget(_) => "over_memory_budget",
            TranscodeError::TimedOut => "timed_out",
            TranscodeError::Panicked(_) => "transcoder_crashed",
            TranscodeError::PoolClosed => "shutting_down",
            TranscodeError::Io(_) => "storage_error",
            TranscodeError::TooManyAttempts(_) => "too_many_attempts",
            TranscodeError::Busy => "busy",
            TranscodeError::Misbehaved(_) => "transcoder_crashed",
        }
    }
}
