//! `courier serve`: wires the crates into one router and runs it until a signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::MatchedPath;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use edge_cache::{Backend, BlobService, BlobStore, MemoryTier, Metrics, Namespace};
use ingest::{Ingest, Runner};
use tokio::sync::watch;
use tower_http::LatencyUnit;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing_subscriber::EnvFilter;
use types::{ErrorBody, TokenKeys, UrlSigner};

use crate::config::{Config, LogFormat};
use crate::{auth, secrets};

pub(crate) fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log).context("invalid log filter")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

pub(crate) async fn serve(config: Config) -> anyhow::Result<()> {
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let token_keys = Arc::new(TokenKeys::new(&secrets::load_or_create(data_dir, secrets::TOKEN_KEY)?));
    let signer = UrlSigner::new(&secrets::load_or_create(data_dir, secrets::URL_KEY)?);

    let db = ingest::connect_sqlite(&config.database_url()).await.context("opening the database")?;
    let store = BlobStore::local(&config.blobs_dir()).context("opening the blob store")?;
    let variants = BlobStore::new(store.clone(), Namespace::Variants);
    let workers = config.workers();
    let pool = Arc::new(transcode::Pool::new("transcode", workers, workers));
    let ingest = Ingest::new(
        config.ingest.clone(),
        db,
        BlobStore::new(store, Namespace::Originals),
        variants.clone(),
        signer.clone(),
        pool,
        data_dir.join("tmp"),
    )?;
    // This process alone works the queue: jobs a previous run had claimed resume now.
    let resumed = ingest.queue().release_leases().await?;
    let blobs = Arc::new(BlobService {
        signer,
        memory: MemoryTier::new(config.cache.memory_bytes, config.cache.max_object_bytes),
        backend: Backend::Origin(variants),
        metrics: Arc::new(Metrics::default()),
        cache_name: "courier-origin",
        admin_token: None,
    });

    let (stop, stopped) = watch::channel(false);
    let runner = config.transcode.run_jobs.then(|| tokio::spawn(Runner::run(ingest.clone(), stopped.clone())));

    let user_routes = ingest.router().route_layer(axum::middleware::from_fn_with_state(token_keys, auth::require_user));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(edge_cache::router(blobs))
        .merge(user_routes)
        .fallback(|| async {
            (StatusCode::NOT_FOUND, axum::Json(ErrorBody::new("not_found", "no such route"))).into_response()
        })
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<_>| {
                            let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
                            let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                            let method = request.method();
                            tracing::info_span!("request", id, %method, route = route.as_deref().unwrap_or("-"))
                        })
                        .on_request(())
                        .on_response(
                            DefaultOnResponse::new().level(tracing::Level::INFO).latency_unit(LatencyUnit::Micros),
                        )
                        // Our own 5xx are logged with their cause where they happen; this notes the request.
                        .on_failure(
                            DefaultOnFailure::new().level(tracing::Level::WARN).latency_unit(LatencyUnit::Micros),
                        ),
                )
                .layer(PropagateRequestIdLayer::x_request_id()),
        );

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, workers, resumed_jobs = resumed, data_dir = %data_dir.display(), "courier serving");
    print_welcome(addr, &config);

    let mut server_stopped = stopped.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = server_stopped.wait_for(|s| *s).await;
            })
            .await
    });

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; finishing what is in flight");
    let _ = stop.send(true);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    if tokio::time::timeout(grace, server).await.is_err() {
        tracing::warn!("requests still running after {grace:?}; closing them");
    }
    if let Some(runner) = runner
        && tokio::time::timeout(grace, runner).await.is_err()
    {
        tracing::warn!("jobs still running after {grace:?}; they resume on the next start");
    }
    Ok(())
}

#[allow(clippy::print_stdout, reason = "what to do next, for the person who started the server")]
fn print_welcome(addr: std::net::SocketAddr, config: &Config) {
    let data = config.data_dir.display();
    println!("courier listening on http://{addr}");
    println!("  token:  cargo run -q --bin courier -- token --data-dir {data} --user alice");
    println!(
        "  upload: curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: image/jpeg' \
         --data-binary @fixtures/rocket.jpg http://{addr}/v1/media"
    );
    println!("  status: curl -H \"Authorization: Bearer $TOKEN\" http://{addr}/v1/media/ID");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
