//! Integration tests: the real `courier` binary on an ephemeral port with a temp data dir, driven
//! over HTTP. One module per feature.

mod harness;

mod accounts;
mod auth;
mod avmedia;
mod blobs;
mod chat;
mod cluster;
mod connections;
mod edge;
mod hostile;
mod lifecycle;
mod live;
mod photos;
mod quotas;
mod resumable;
mod sandbox;
mod storage;
