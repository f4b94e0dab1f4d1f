//! Courier's blob tiers and the HTTP serving of `/b/{blob}`.
//!
//! The bottom tier is [`BlobStore`], content-addressed blobs in an object store (a local folder by
//! default), which ingest writes to. Above it sits [`MemoryTier`], a byte-weighed moka cache whose
//! fills are verified against the blob's BLAKE3 name before they are kept. [`serve`] answers signed
//! blob URLs with ranges, conditionals and immutable caching headers.
//!
//! This crate must never depend on ingest, chat-core or a database: an edge node runs it alone.

mod error;
mod memory;
pub mod serve;
mod store;

pub use error::EdgeError;
pub use memory::MemoryTier;
pub use serve::{BlobService, router};
pub use store::{BlobStore, Namespace, Stored};
