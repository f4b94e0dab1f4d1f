//! `courier edge`: a CDN edge node serving blobs from memory, local disk and its upstreams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use edge_cache::{Backend, BlobService, DEFAULT_OPEN_FILES, DiskTier, Filler, MemoryTier, Metrics, Upstream};
use serde::{Deserialize, Serialize};
use types::{Secret, UrlSigner};

use crate::config::{HttpConfig, LogFormat, layered};
use crate::listener;

/// Every setting of `courier edge`; environment variables are `COURIER_EDGE_*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct EdgeConfig {
    /// Address to listen on. Default 127.0.0.1:8081.
    pub(crate) listen: SocketAddr,
    /// Where blobs come from, tried in order: `http://` an origin or a parent edge, or `file://`
    /// the origin's blob folder. At least one.
    pub(crate) upstream: Vec<String>,
    /// The disk tier's folder. Default ./data/edge.
    pub(crate) cache_dir: PathBuf,
    /// Bytes of blobs kept in memory. Default 256 MiB.
    pub(crate) memory_bytes: u64,
    /// Blobs larger than this skip the memory tier, so one video cannot flush thousands of
    /// thumbnails. Default 1 MiB.
    pub(crate) memory_max_object_bytes: u64,
    /// Bytes of blobs kept on disk. Default 10 GiB.
    pub(crate) disk_bytes: u64,
    /// Disk tier files kept open, so hits skip `open` (like nginx's `open_file_cache`). Default 1024.
    pub(crate) open_files: u64,
    /// A copy of the origin's `url-signing.key`. Required.
    pub(crate) url_key: Option<PathBuf>,
    /// Bearer token for `DELETE /admin/blobs/{blob}`, at least 16 characters; purging is off without one.
    pub(crate) admin_token: Option<String>,
    /// Seconds to connect to an upstream and get its response headers, and the longest pause
    /// within a body. Default 10.
    pub(crate) upstream_timeout_secs: u64,
    /// A PEM CA certificate to trust for https:// upstreams, besides the public roots.
    pub(crate) upstream_ca: Option<PathBuf>,
    /// PEM certificate chain and key: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) instead of HTTP.
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    pub(crate) shutdown_grace_secs: u64,
    pub(crate) log: String,
    pub(crate) log_format: LogFormat,
    /// Threads answering HTTP, each with its own runtime and listening socket. 0 means one per
    /// core; default 0.
    pub(crate) http_threads: usize,
    pub(crate) http: HttpConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            upstream: Vec::new(),
            cache_dir: PathBuf::from("./data/edge"),
            memory_bytes: 256 * 1024 * 1024,
            memory_max_object_bytes: 1024 * 1024,
            disk_bytes: 10 * 1024 * 1024 * 1024,
            open_files: DEFAULT_OPEN_FILES,
            url_key: None,
            admin_token: None,
            upstream_timeout_secs: 10,
            upstream_ca: None,
            tls_cert: None,
            tls_key: None,
            shutdown_grace_secs: 10,
            log: "info".into(),
            log_format: LogFormat::Text,
            http_threads: 0,
            http: HttpConfig::default(),
        }
    }
}

/// Values given as flags; absent ones leave the lower layers' value.
#[derive(Debug, Default, Serialize)]
pub(crate) struct EdgeFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) upstream: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) disk_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) url_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tls_key: Option<PathBuf>,
}

impl EdgeConfig {
    pub(crate) fn load(file: Option<&std::path::Path>, flags: EdgeFlags) -> anyhow::Result<Self> {
        layered(EdgeConfig::default(), file, "COURIER_EDGE_", &[], flags)
    }
}

/// The shortest purge token `courier edge` starts with.
pub(crate) const MIN_ADMIN_TOKEN_CHARS: usize = 16;

pub(crate) async fn run(config: EdgeConfig) -> anyhow::Result<()> {
    anyhow::ensure!(!config.upstream.is_empty(), "give at least one --upstream");
    let key_path = config.url_key.as_ref().context("give --url-key: a copy of the origin's url-signing.key")?;
    let key: Secret = std::fs::read_to_string(key_path)
        .with_context(|| format!("reading {}", key_path.display()))?
        .parse()
        .with_context(|| format!("{} is not a key file", key_path.display()))?;
    let signer = UrlSigner::new(&key);
    if let Some(token) = &config.admin_token {
        anyhow::ensure!(
            token.trim().len() >= MIN_ADMIN_TOKEN_CHARS,
            "admin_token must be at least {MIN_ADMIN_TOKEN_CHARS} characters (make one with `openssl rand -hex 32`): \
             an empty or short token would let anyone who guesses it purge this edge"
        );
    }
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(listener::tls_config(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };

    let timeout = Duration::from_secs(config.upstream_timeout_secs);
    let ca = match &config.upstream_ca {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let upstreams = config
        .upstream
        .iter()
        .map(|u| Upstream::parse(u, timeout, ca.as_deref()).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let metrics = Arc::new(Metrics::default());
    let memory = MemoryTier::new(config.memory_bytes, config.memory_max_object_bytes);
    let (dir, bytes, evictions) = (config.cache_dir.clone(), config.disk_bytes, metrics.evictions.clone());
    // Kept-open files share the descriptor limit with connections: they get a quarter of it at most.
    let fd_limit = listener::raise_open_file_limit();
    let open_files = config.open_files.min(fd_limit / 4);
    if open_files < config.open_files {
        tracing::warn!(open_files, fd_limit, "keeping fewer files open than configured: the open file limit is low");
    }
    let disk = tokio::task::spawn_blocking(move || DiskTier::open_with(&dir, bytes, open_files, evictions))
        .await?
        .with_context(|| format!("opening the disk tier in {}", config.cache_dir.display()))?;
    let filler =
        Arc::new(Filler::new(upstreams, signer.clone(), disk.clone(), memory.clone(), metrics.clone(), timeout));
    let service = Arc::new(BlobService::new(
        signer,
        memory,
        Backend::Edge { disk: disk.clone(), filler },
        metrics,
        "courier-edge",
        config.admin_token.as_deref(),
    ));

    let options = config.http.options(tls, config.shutdown_grace_secs, fd_limit);
    let metrics = listener::metrics_route(service.clone(), options.connections.clone(), None);
    let app = Router::new().route("/healthz", get(|| async { "ok\n" })).merge(edge_cache::router(service.clone()));
    let app =
        listener::with_common_layers(listener::with_metrics(app, metrics, config.http.metrics_listen, &options).await?);
    let app = listener::with_cors(app, &config.http.allowed_origins)?;
    let threads = match config.http_threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let sockets =
        listener::bind_reuseport(config.listen, threads).with_context(|| format!("binding {}", config.listen))?;
    let addr = sockets[0].local_addr()?;
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let (used, count) = disk.usage();
    tracing::info!(%addr, threads, upstreams = ?config.upstream, disk_blobs = count, disk_bytes = used, "courier edge serving");
    #[allow(clippy::print_stdout, reason = "the address, for whoever started the node")]
    {
        println!("courier edge listening on {scheme}://{addr}");
    }
    listener::serve_per_core(sockets, app, Some(service), options, listener::shutdown_signal()).await?;
    tracing::info!("edge stopped");
    Ok(())
}
