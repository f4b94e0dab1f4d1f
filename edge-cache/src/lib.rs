//! Courier's blob tiers and the HTTP serving of `/b/{blob}`.
//!
//! The bottom tier is [`BlobStore`], content-addressed blobs in an object store (a local folder by
//! default), which ingest writes to. Above it sit [`MemoryTier`], a byte-weighed moka cache, and on
//! edge nodes [`DiskTier`], one file per blob bounded in bytes, filled by [`Filler`] from an
//! [`Upstream`] with one fetch per blob however many clients wait. Every fill is verified against the
//! blob's BLAKE3 name before a tier keeps it. [`serve`] answers signed blob URLs with ranges,
//! conditionals, immutable caching headers and `Cache-Status`.
//!
//! This crate must never depend on ingest, chat-core or a database: an edge node runs it alone.

mod disk;
mod error;
mod fill;
mod memory;
mod metrics;
pub mod serve;
mod store;
mod upstream;

pub use disk::{DEFAULT_OPEN_FILES, DiskTier};
pub use error::EdgeError;
pub use fill::{Fill, Filler};
pub use memory::MemoryTier;
pub use metrics::{Metrics, Tier};
pub use serve::{Backend, BlobService, metrics_text, router};
pub use store::{BlobStore, BlobWriter, Namespace, ObjectStoreAt, Stored};
pub use upstream::{Upstream, UpstreamError};
