//! Courier's media pipelines and the worker pool that runs them.
//!
//! A pipeline is a pure function from uploaded bytes to encoded variants: [`photo`] for images,
//! [`audio`] for voice notes and music, [`video`] for videos (run only inside the worker process
//! [`isolate`] starts). [`MediaType`] says which one an upload goes to. [`Pool`] runs the in-process
//! pipelines on its own threads, never on the async runtime's, behind a bounded queue.
//! This crate knows nothing of users, HTTP or databases, and must never depend on a crate that does.

pub mod audio;
mod error;
pub mod isolate;
mod media;
pub mod photo;
mod pool;
pub mod video;

pub use error::TranscodeError;
pub use media::MediaType;
pub use pool::{Pool, PoolFull};
