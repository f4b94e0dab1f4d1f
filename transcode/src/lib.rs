//! Courier's media pipelines and the sandboxed worker processes that run them.
//!
//! A pipeline is a pure function from uploaded bytes to encoded variants: [`photo`] for images,
//! [`audio`] for voice notes and music, [`video`] for videos. [`MediaType`] says which one an
//! upload goes to, from its declared type and its first bytes (the only bytes of an upload the
//! server itself looks at). Every probe and decode runs in a `courier transcode-worker` process
//! ([`worker`]) that puts itself in a [`sandbox`] before it reads a byte; the server keeps warm
//! pools of them ([`WorkerPool`]) and trusts nothing they report.
//! This crate knows nothing of users, HTTP or databases, and must never depend on a crate that does.

pub mod audio;
mod error;
mod media;
mod mp4_tables;
pub mod photo;
pub mod protocol;
pub mod sandbox;
pub mod video;
pub mod worker;
mod workers;

pub use error::TranscodeError;
pub use media::MediaType;
pub use workers::{Body, Launch, Lease, PoolSpec, Product, Variant, WorkerPool};
