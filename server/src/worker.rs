//! `courier worker`: a transcode node of a cluster. It claims jobs of any kind from the shared
//! PostgreSQL queue (`FOR UPDATE SKIP LOCKED`, with leases it renews while a job runs), reads
//! originals from and writes variants to the shared blob store, in the same sandboxed worker
//! processes `serve` uses, and serves nothing to users: with `--listen`, only `/healthz` and
//! `/metrics` (queue depth for an autoscaler, jobs running here). A worker that dies leaves its
//! leases to expire; it never frees another node's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use edge_cache::{BlobStore, Namespace};
use ingest::{Clock, Ingest, Runner, Store};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use types::{Secret, UrlSigner};

use crate::config::Config;
use crate::connections::Connections;
use crate::{listener, serve};

pub(crate) async fn run(config: Config, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    anyhow::ensure!(config.transcode.run_jobs, "a worker with --transcode-workers 0 has nothing to do");
    let url = config
        .database_url
        .clone()
        .filter(|url| types::is_postgres_url(url))
        .context("courier worker works the queue `serve` nodes share: give --database-url postgres://…")?;
    anyhow::ensure!(
        config.blobs.is_some(),
        "courier worker reads originals from and writes variants to the store `serve` nodes use: give --blobs"
    );
    let _lock = crate::secrets::lock_data_dir(&config.data_dir)?;
    let store = Store::connect(&url).await.context("opening the shared database")?;
    let blobs = BlobStore::open(&config.blobs()).context("opening the blob store")?;
    // A worker signs no URL; the key only completes the part of ingest it shares with `serve`.
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let pools = serve::worker_pools(&config)?;
    let ingest = Ingest::new(
        config.ingest.clone(),
        store,
        Clock::system(),
        BlobStore::new(blobs.clone(), Namespace::Originals),
        BlobStore::new(blobs, Namespace::Variants),
        UrlSigner::new(&Secret::from_bytes(key)),
        pools.clone(),
        config.data_dir.join("tmp"),
    )?;
    pools.quick.warm_up().await.context("starting the transcode workers")?;
    pools.video.warm_up().await.context("starting the video workers")?;

    let (stop, stopped) = watch::channel(false);
    let sweeper = tokio::spawn(ingest.clone().sweeper(stopped.clone()));
    let runner = tokio::spawn(Runner::run(ingest.clone(), stopped));
    tracing::info!(workers = config.workers(), blobs = %config.blobs(), "courier worker running");
    let shutdown = async move {
        listener::shutdown_signal().await;
        let _ = stop.send(true);
    };
    match listen {
        Some(addr) => {
            let options = config.http.options(None, config.shutdown_grace_secs, listener::raise_open_file_limit());
            let app = Router::new()
                .route("/healthz", get(|| async { "ok\n" }))
                .route("/metrics", get(metrics))
                .with_state((ingest, options.connections.clone()));
            let socket = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            announce(&format!("courier worker serving /healthz and /metrics on http://{}", socket.local_addr()?));
            listener::serve(socket, listener::with_common_layers(app), None, options, shutdown).await;
        }
        None => {
            announce("courier worker running");
            shutdown.await
        }
    }
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, sweeper).await.is_err() {
        tracing::warn!("a sweep was still running after {grace:?}; the next start goes on from its log");
    }
    if tokio::time::timeout(grace, runner).await.is_err() {
        tracing::warn!("jobs still running after {grace:?}; their leases expire and another worker takes them");
    }
    Ok(())
}

#[allow(clippy::print_stdout, reason = "the line that tells whoever started the worker it is up")]
fn announce(line: &str) {
    println!("{line}");
}

/// Prometheus text: jobs waiting or running in the whole queue, and jobs running on this node.
async fn metrics(State((ingest, connections)): State<(Arc<Ingest>, Arc<Connections>)>) -> impl IntoResponse {
    let queued = match ingest.queue().queued().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "reading the queue depth failed");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    let mut registry = Registry::default();
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(value as i64);
        registry.register(name, help, gauge);
    };
    gauge(&mut registry, "courier_jobs_queued", "Jobs waiting or running, in the whole queue", queued);
    gauge(&mut registry, "courier_jobs_running", "Jobs running on this node", ingest.running_jobs() as u64);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode_registry(&mut text, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    listener::metrics_response([text, connections.render(), listener::storage_metrics(&ingest).await])
}
