//! Courier's media pipelines and the worker pool that runs them.
//!
//! A pipeline is a pure function from uploaded bytes to encoded variants ([`photo::transcode`]);
//! [`Pool`] runs such work on its own threads, never on the async runtime's, behind a bounded queue.
//! This crate knows nothing of users, HTTP or databases, and must never depend on a crate that does.

mod error;
pub mod photo;
mod pool;

pub use error::TranscodeError;
pub use pool::{Pool, PoolFull};
