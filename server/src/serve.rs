//! `courier serve`: wires the crates into one router and runs it until a signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use edge_cache::{Backend, BlobService, BlobStore, MemoryTier, Metrics, Namespace};
use ingest::{Ingest, Runner};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use types::{TokenKeys, UrlSigner};

use crate::config::{Config, LogFormat};
use crate::{auth, listener};

pub(crate) fn init_logging(log: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(log).context("invalid log filter")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

pub(crate) async fn serve(config: Config) -> anyhow::Result<()> {
    let fd_limit = listener::raise_open_file_limit();
    let data_dir = &config.data_dir;
    let _lock = crate::secrets::lock_data_dir(data_dir)?;
    let (token_key, url_key) = config.keys()?;
    let token_keys = Arc::new(TokenKeys::new(&token_key));
    let signer = UrlSigner::new(&url_key);

    let db = ingest::Store::connect(&config.ingest_database_url()).await.context("opening ingest's database")?;
    warn_about_shared_setup(&config, &db);
    let store = BlobStore::open(&config.blobs()).context("opening the blob store")?;
    let variants = BlobStore::new(store.clone(), Namespace::Variants);
    let workers = config.workers();
    let pools = worker_pools(&config)?;
    let ingest = Ingest::new(
        config.ingest.clone(),
        db,
        ingest::Clock::system(),
        BlobStore::new(store, Namespace::Originals),
        variants.clone(),
        signer.clone(),
        pools.clone(),
        data_dir.join("tmp"),
    )?;
    // Started ahead, so the first upload finds its workers warm.
    pools.probe.warm_up().await.context("starting the probe workers")?;
    if config.transcode.run_jobs {
        pools.quick.warm_up().await.context("starting the transcode workers")?;
        pools.video.warm_up().await.context("starting the video workers")?;
    }
    let media: Arc<dyn chat_core::MediaAccess> = Arc::new(SharedMedia(ingest.clone()));
    let chat_url = config.chat_database_url();
    if config.chat.bus_url.is_some() && !types::is_postgres_url(&chat_url) {
        // Each node's directory would hold only itself: nothing would cross nodes.
        anyhow::bail!("--bus needs the nodes' shared PostgreSQL database (--database-url postgres://…)");
    }
    let bus = match &config.chat.bus_url {
        Some(url) => Some(
            chat_core::Bus::connect(
                url,
                config.chat.bus_creds_file.as_deref(),
                &config.chat.bus_subject,
                &token_key,
                config.chat.test_drop_envelopes,
            )
            .await
            .with_context(|| format!("connecting to the bus at {url}"))?,
        ),
        None => None,
    };
    let store = chat_core::Store::connect(&chat_url).await.context("opening chat-core's database")?;
    let chat = ChatParts::start(store, media, &token_keys, &config, bus).await;
    if config.auth.dev_codes {
        tracing::warn!("development mode: sign-in codes are returned in responses");
    }
    // On the embedded database this process works the queue alone: jobs a previous run had claimed
    // resume now. On a shared database (and on an API-only node) leases expire on their own, so no
    // node frees another's.
    let resumed = if config.transcode.run_jobs { ingest.queue().release_leases().await? } else { 0 };
    let blobs = Arc::new(BlobService::new(
        signer,
        MemoryTier::new(config.cache.memory_bytes, config.cache.max_object_bytes),
        Backend::Origin(variants),
        Arc::new(Metrics::default()),
        "courier-origin",
        None,
    ));

    let (stop, stopped) = watch::channel(false);
    let runner = config.transcode.run_jobs.then(|| tokio::spawn(Runner::run(ingest.clone(), stopped.clone())));
    let sweeper = tokio::spawn(ingest.clone().sweeper(stopped.clone()));
    let chat_tasks = (chat.background)(stopped);

    let auth = auth::Auth { keys: token_keys, devices: chat.devices };
    let user_routes = ingest
        .router()
        .merge(chat.user_routes)
        .route_layer(axum::middleware::from_fn_with_state(auth, auth::require_user));
    let options = config.http.options(None, config.shutdown_grace_secs, fd_limit);
    let metrics = listener::metrics_route(blobs.clone(), options.connections.clone(), Some(ingest.clone()));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(edge_cache::router(blobs))
        .merge(chat.public_routes)
        .merge(crate::admin::routes(ingest.clone(), config.admin_token.as_deref()))
        .merge(user_routes);
    let app =
        listener::with_common_layers(listener::with_metrics(app, metrics, config.http.metrics_listen, &options).await?);
    let app = listener::with_cors(app, &config.http.allowed_origins)?;

    let socket =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = socket.local_addr()?;
    tracing::info!(%addr, workers, resumed_jobs = resumed, data_dir = %data_dir.display(), "courier serving");
    print_welcome(addr, &config);

    let shutdown = async move {
        listener::shutdown_signal().await;
        let _ = stop.send(true);
    };
    listener::serve(socket, app, None, options, shutdown).await;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let _ = chat_tasks.await;
    if tokio::time::timeout(grace, sweeper).await.is_err() {
        tracing::warn!("a sweep was still running after {grace:?}; the next start goes on from its log");
    }
    if let Some(runner) = runner
        && tokio::time::timeout(grace, runner).await.is_err()
    {
        tracing::warn!("jobs still running after {grace:?}; they resume on the next start");
    }
    Ok(())
}

/// The three pools of sandboxed worker processes, with their folders under `{data_dir}/tmp/work`.
pub(crate) fn worker_pools(config: &Config) -> anyhow::Result<ingest::Workers> {
    use transcode::{PoolSpec, WorkerPool, sandbox};
    let t = &config.transcode;
    let (program, args) = match &t.worker_program {
        Some(program) => (program.clone(), Vec::new()),
        None => (
            std::env::current_exe().context("finding this program, to start workers")?,
            vec!["transcode-worker".to_string()],
        ),
    };
    let tmp = config.data_dir.join("tmp");
    let launch = transcode::Launch { program, args, root: tmp.join("work"), spool: tmp, user: t.worker_ids()? };
    launch.prepare().context("preparing the workers' folder")?;
    let limits =
        |memory_bytes, file_bytes, niceness| sandbox::Limits { memory_bytes, file_bytes, open_files: 64, niceness };
    let ingest = &config.ingest;
    let pool = |name, workers, jobs_per_worker, limits| {
        let spec = PoolSpec { name, workers, jobs_per_worker, recycle_rss_bytes: t.recycle_rss_bytes, limits };
        WorkerPool::new(spec, launch.clone())
    };
    Ok(ingest::Workers {
        quick: pool("quick", config.workers(), t.jobs_per_worker, limits(ingest.job.memory_bytes, QUICK_FILE_BYTES, 0)),
        // A fresh process for each video, below the server and the photos in the scheduler.
        video: pool(
            "video",
            ingest.video.workers.max(1),
            1,
            limits(ingest.video.memory_bytes, VIDEO_FILE_BYTES, transcode::worker::VIDEO_NICENESS),
        ),
        probe: pool(
            "probe",
            t.probe_workers.max(1),
            t.jobs_per_worker,
            limits(t.probe_memory_bytes, QUICK_FILE_BYTES, 0),
        ),
        probe_timeout: Duration::from_millis(t.probe_timeout_ms),
    })
}

/// What a node on a shared database should be told at start: media records left behind in the
/// embedded database, and a blob folder other nodes cannot see.
fn warn_about_shared_setup(config: &Config, db: &ingest::Store) {
    if db.is_embedded() {
        return;
    }
    let old = config.data_dir.join("courier.db");
    if old.exists() {
        tracing::warn!(
            file = %old.display(),
            "media records in this SQLite file are not read on PostgreSQL: they are not moved, and their media answer 404"
        );
    }
    if config.blobs.is_none() {
        tracing::warn!(
            blobs = %config.blobs(),
            "the database is shared but blobs are in this node's folder: give every node the same --blobs (s3://…, or a shared mount), or another node's jobs cannot find their originals"
        );
    }
}

/// The largest file a photo or voice-note worker may write: far above any JPEG or Opus it makes.
const QUICK_FILE_BYTES: u64 = 256 * 1024 * 1024;
/// The largest file a video worker may write.
const VIDEO_FILE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

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

/// chat-core, started on one of its backends, in the shapes `serve` mounts.
struct ChatParts {
    user_routes: Router,
    public_routes: Router,
    devices: Arc<dyn chat_core::DeviceCheck>,
    background: Box<dyn FnOnce(watch::Receiver<bool>) -> tokio::task::JoinHandle<()> + Send>,
}

impl ChatParts {
    async fn start(
        store: chat_core::Store,
        media: Arc<dyn chat_core::MediaAccess>,
        keys: &TokenKeys,
        config: &Config,
        bus: Option<chat_core::Bus>,
    ) -> Self {
        let chat = chat_core::Chat::new(store, media, keys.clone(), config.chat.clone(), config.auth.clone(), bus);
        if let Err(e) = chat.join_cluster().await {
            tracing::warn!(error = %e, "could not join the cluster's directory; retrying with the next beat");
        }
        let background = chat.clone();
        Self {
            user_routes: chat.user_routes(),
            public_routes: chat.public_routes(),
            devices: chat.clone(),
            background: Box::new(move |stop| tokio::spawn(background.run_background(stop))),
        }
    }
}

/// chat-core's view of ingest: media messages may carry what their sender owns or was shared, and
/// sending one shares it with the conversation.
struct SharedMedia(Arc<Ingest>);

impl chat_core::MediaAccess for SharedMedia {
    fn may_share<'a>(
        &'a self,
        media: types::MediaId,
        user: &'a types::UserId,
    ) -> chat_core::BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move { self.0.may_share(media, user).await.map_err(|e| e.to_string()) })
    }

    fn share<'a>(
        &'a self,
        media: types::MediaId,
        users: &'a [types::UserId],
        source: &'a str,
    ) -> chat_core::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.0.share(media, users, source).await.map_err(|e| e.to_string()) })
    }

    fn unshare<'a>(&'a self, media: types::MediaId, source: &'a str) -> chat_core::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.0.unshare(media, source).await.map_err(|e| e.to_string()) })
    }

    fn settled<'a>(
        &'a self,
        media: types::MediaId,
        timeout: std::time::Duration,
    ) -> chat_core::BoxFuture<'a, Result<Option<serde_json::Value>, String>> {
        Box::pin(async move {
            let view = self.0.settled(media, timeout).await.map_err(|e| e.to_string())?;
            view.map(|v| serde_json::to_value(v).map_err(|e| e.to_string())).transpose()
        })
    }

    fn describe<'a>(
        &'a self,
        media: types::MediaId,
    ) -> chat_core::BoxFuture<'a, Result<Option<serde_json::Value>, String>> {
        Box::pin(async move {
            let Some((view, owner)) = self.0.describe_with_owner(media).await.map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            let mut view = serde_json::to_value(view).map_err(|e| e.to_string())?;
            view["owner"] = owner.into();
            Ok(Some(view))
        })
    }
}
